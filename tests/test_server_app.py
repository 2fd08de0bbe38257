"""The HTTP app on a real socket (uvicorn in a thread) over a fake engine: body limit, tokenizing
off the event loop, bounded metrics, auth, bad text, unsupported fields, n/echo/logprobs shapes,
engine failures and the drain on shutdown. No model is loaded, so these run in seconds.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from eplb.engine.core import RequestOutput
from eplb.engine.sampling import TokenLogprob
from eplb.server.app import ServerSettings, create_app

KEY = "sekrit"
LIMIT = 64 * 1024
VOCAB = 64


class FakeTokenizer:
    """Character-level: token id = ord(c) % VOCAB. ``BLOCK`` in a text blocks encode() until
    ``release`` is set (and records the thread that ran it)."""

    chat_template = None
    eos_token = ""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.threads: list[str] = []

    def __len__(self) -> int:
        return VOCAB

    def get_vocab(self) -> dict[str, int]:
        return {chr(48 + i): i for i in range(VOCAB)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.threads.append(threading.current_thread().name)
        if "BLOCK" in text:
            self.entered.set()
            self.release.wait(30)
        return [ord(c) % VOCAB for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(48 + i) for i in ids)


class FakeEngine:
    """Token i of a request is (first prompt id + i) % VOCAB. Prompts starting with "H" (id 24)
    hang until aborted; with "F" (id 22) the engine fails after one token."""

    def __init__(self) -> None:
        self.tokenizer = FakeTokenizer()
        self.aborted: list[str] = []
        self.params: list = []
        self.intervals: list = []  # each request's stream_interval
        self.healthy = True

    def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def is_healthy(self) -> bool:
        return self.healthy

    def stats(self) -> dict:
        return {}

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def generate(self, request_id, prompt_ids, params, *, stream_interval=1):
        self.params.append(params)
        self.intervals.append(stream_interval)
        ids: list[int] = []
        lps: list[TokenLogprob] = []
        for i in range(params.max_tokens):
            if prompt_ids[0] == ord("H") % VOCAB:
                await asyncio.sleep(3600)
            if prompt_ids[0] == ord("F") % VOCAB and i == 1:
                raise RuntimeError("DP rank 1 died")
            await asyncio.sleep(0)
            tok = (prompt_ids[0] + i + (params.seed or 0)) % VOCAB
            ids.append(tok)
            if params.logprobs is not None:
                lps.append(TokenLogprob(-0.5, [(tok, -0.5), ((tok + 1) % VOCAB, -1.5)][:params.logprobs]))
            done = i + 1 == params.max_tokens
            plp = None
            if params.prompt_logprobs is not None:
                plp = [None] + [TokenLogprob(-2.0, [(t, -2.0)][:params.prompt_logprobs])
                                for t in prompt_ids[1:]]
            yield RequestOutput(request_id, list(prompt_ids), list(ids),
                                self.tokenizer.decode(ids), done, "length" if done else None,
                                list(lps) if params.logprobs is not None else None, plp)


class Running:
    def __init__(self, app, port: int, engine: FakeEngine) -> None:
        self.app, self.port, self.engine = app, port, engine
        self.url = f"http://127.0.0.1:{port}"
        self.headers = {"Authorization": f"Bearer {KEY}"}
        self.ctx = app.state.eplb

    def post(self, path: str, body: dict, **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=kw.pop("headers", self.headers),
                          timeout=30, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def srv():
    engine = FakeEngine()
    settings = ServerSettings(served_model_names=["fake"], max_model_len=64, api_key=KEY,
                              max_request_bytes=LIMIT, rebalance_log_interval_s=3600)
    app = create_app(engine, settings)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    yield Running(app, port, engine)
    engine.tokenizer.release.set()
    server.should_exit = True
    thread.join(30)


def _raw(port: int, head: bytes, body: bytes = b"") -> bytes:
    """Sends ``head`` and ``body`` and returns whatever the server answers (without sending
    anything more)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def _sse(text: str) -> list:
    lines = [ln[len("data: "):] for ln in text.splitlines() if ln.startswith("data: ")]
    return [ln if ln == "[DONE]" else json.loads(ln) for ln in lines]


def test_declared_huge_body_is_413_before_it_is_sent(srv):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {50 * 2**20}\r\n\r\n").encode()
    # only 1 KB of the declared 50 MB is ever sent: the answer cannot wait for the rest
    reply = _raw(srv.port, head, b'{"prompt": "' + b"ab " * 300)
    assert reply.startswith(b"HTTP/1.1 413")
    assert b"connection: close" in reply.lower()
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert "--max-request-bytes" in body["error"]["message"]
    assert srv.post("/v1/completions", {"prompt": "ab", "max_tokens": 2}).status_code == 200


def test_chunked_body_is_413_once_it_passes_the_limit(srv):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    piece = b"a" * 8192
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(LIMIT // 8192 + 2))
    reply = _raw(srv.port, head, chunks)  # no terminating chunk: the body never ends
    assert reply.startswith(b"HTTP/1.1 413")


def test_tokenizing_runs_off_the_event_loop(srv):
    tok = srv.engine.tokenizer
    result: dict = {}

    def send() -> None:
        result["r"] = srv.post("/v1/completions", {"prompt": "BLOCK me", "max_tokens": 2})

    t = threading.Thread(target=send)
    t.start()
    assert tok.entered.wait(30)
    # the tokenizer is stuck inside this request; the loop must still answer
    assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
    r2 = srv.post("/v1/completions", {"prompt": [5, 6], "max_tokens": 2})
    assert r2.status_code == 200
    tok.release.set()
    t.join(30)
    assert result["r"].status_code == 200
    assert tok.threads and all(name.startswith("eplb-tokenize") for name in tok.threads)


def test_a_text_too_long_to_fit_is_refused_without_tokenizing(srv):
    tok = srv.engine.tokenizer
    tok.threads.clear()
    r = srv.post("/v1/completions", {"prompt": "ab" * 1000})  # 2000 chars > 64 tokens x 1 x 4
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert tok.threads == []


def test_metrics_labels_stay_bounded(srv):
    def scrape() -> list[str]:
        return [ln for ln in httpx.get(srv.url + "/metrics").text.splitlines()
                if ln.startswith("eplb_requests_total")]

    for i in range(5):
        httpx.post(f"{srv.url}/v1/x-{i}", headers=srv.headers)
        httpx.post(f"{srv.url}/v1/y-{i}")  # 401
    before = scrape()
    for i in range(5, 20):
        httpx.post(f"{srv.url}/v1/x-{i}", headers=srv.headers)
        httpx.post(f"{srv.url}/v1/y-{i}")
    after = scrape()
    assert len(after) == len(before)
    assert any('endpoint="other",status="404"' in ln for ln in after)
    assert any('endpoint="other",status="401"' in ln for ln in after)
    assert not any("x-" in ln or "y-" in ln for ln in after)


def test_auth_scheme_is_case_insensitive_and_one_header_only(srv):
    body = {"prompt": "ab", "max_tokens": 1}
    assert srv.post("/v1/completions", body, headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    assert srv.post("/v1/completions", body, headers={"Authorization": f"BEARER  {KEY}"}).status_code == 200
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEY}"},
                    [("Authorization", "Bearer nope"), ("Authorization", f"Bearer {KEY}")],
                    [("Authorization", f"Bearer {KEY}"), ("Authorization", "Bearer nope")]):
        r = httpx.post(srv.url + "/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
    two = [("Authorization", f"Bearer {KEY}"), ("Authorization", f"Bearer {KEY}")]
    r = httpx.post(srv.url + "/v1/completions", json=body, headers=two)
    assert r.status_code == 401 and "exactly one" in r.json()["error"]["message"]


@pytest.mark.parametrize("path, raw, param", [
    ("/v1/completions", b'{"prompt": "a\\ud800b"}', "prompt"),
    # the form is told by the first element, so the error names the element at fault
    ("/v1/completions", b'{"prompt": ["ok", "a\\udfffb"]}', "prompt.1"),
    ("/v1/completions", b'{"prompt": [5, 6, "7"]}', "prompt.2"),
    ("/v1/completions", b'{"prompt": [[5], [6.5]]}', "prompt.1.0"),
    ("/v1/completions", b'{"prompt": 5}', "prompt"),
    ("/v1/completions", b'{"prompt": "a", "stop": ["\\ud800"]}', "stop"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages.0.content"),
    ("/v1/completions", b'{"prompt": "a", "seed": 18446744073709551616}', "seed"),
    ("/v1/completions", b'{"prompt": "a", "seed": -9223372036854775809}', "seed"),
])
def test_bad_text_and_seed_name_the_field(srv, path, raw, param):
    r = httpx.post(srv.url + path, content=raw,
                   headers={**srv.headers, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    if raw == b'{"prompt": 5}':  # the forms a prompt may take, not one guessed member's error
        assert "a list of token ids" in r.json()["error"]["message"]
    assert srv.post("/v1/completions", {"prompt": "ab", "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("path, extra, param", [
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"verbosity": "low"}, "verbosity"),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logit_bias": {"999": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"stop_token_ids": [64]}, "stop_token_ids"),
    ("/v1/completions", {"suffix": "z"}, "suffix"),
    ("/v1/completions", {"min_tokens": 17}, "min_tokens"),  # over the default max_tokens 16
    ("/v1/completions", {"best_of": 2}, "best_of"),
    ("/v1/completions", {"guided_json": {"type": "object"}}, "guided_json"),
])
def test_unsupported_or_bad_fields_are_400_naming_them(srv, path, extra, param):
    body = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "a"}
    r = srv.post(path, {**body, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_neutral_values_of_unsupported_fields_are_accepted(srv):
    r = srv.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "tools": [],
        "tool_choice": "none", "response_format": {"type": "text"}, "user": "u1"})
    assert r.status_code == 200, r.text
    r = srv.post("/v1/completions", {"prompt": "a", "max_tokens": 2, "suffix": None, "best_of": 1})
    assert r.status_code == 200, r.text


def test_n_echo_and_completion_logprobs(srv):
    r = srv.post("/v1/completions", {"prompt": ["ab", "cd"], "n": 2, "max_tokens": 3,
                                     "echo": True, "seed": 7}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in r["choices"]]
    assert texts[0].startswith("ab") and texts[2].startswith("cd")
    assert texts[0] != texts[1]  # choice j of a seeded request draws with seed + j
    assert [p.seed for p in srv.engine.params[-4:]] == [7, 8, 7, 8]
    assert r["usage"] == {"prompt_tokens": 4, "completion_tokens": 12, "total_tokens": 16}
    r = srv.post("/v1/completions", {"prompt": "ab", "max_tokens": 3, "logprobs": 2}).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
    assert "".join(lp["tokens"]) == r["choices"][0]["text"]
    assert lp["text_offset"] == [0, 1, 2]
    assert all(len(t) == 2 for t in lp["top_logprobs"]) and lp["token_logprobs"] == [-0.5] * 3


def test_echo_with_logprobs_scores_the_prompt(srv):
    body = {"prompt": "abc", "max_tokens": 2, "echo": True, "logprobs": 1}
    r = srv.post("/v1/completions", body).json()
    lp = r["choices"][0]["logprobs"]
    assert r["choices"][0]["text"].startswith("abc")
    assert lp["token_logprobs"][:3] == [None, -2.0, -2.0] and lp["top_logprobs"][0] is None
    assert len(lp["tokens"]) == 5 and lp["text_offset"] == [0, 1, 2, 3, 4]
    assert srv.engine.params[-1].prompt_logprobs == 1
    events = _sse(srv.post("/v1/completions", {**body, "stream": True}).text)
    assert events[0]["choices"][0]["text"] == "abc"  # the echo, with the prompt's logprobs
    assert events[0]["choices"][0]["logprobs"]["token_logprobs"] == [None, -2.0, -2.0]
    streamed = [v for e in events[:-1] for v in e["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed == lp["token_logprobs"]


def test_chat_logprobs_and_streamed_logprobs(srv):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "logprobs": True,
            "top_logprobs": 1, "n": 2}
    r = srv.post("/v1/chat/completions", body).json()
    assert len(r["choices"]) == 2
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and len(content[0]["top_logprobs"]) == 1
    assert "".join(c["token"] for c in content) == r["choices"][0]["message"]["content"]
    assert content[0]["bytes"] == list(content[0]["token"].encode())
    events = _sse(srv.post("/v1/chat/completions", {**body, "stream": True}).text)
    assert events[-1] == "[DONE]"
    streamed = [e for e in events[:-1] if e["choices"] and e["choices"][0]["index"] == 0]
    got = [c for e in streamed if e["choices"][0]["logprobs"] for c in e["choices"][0]["logprobs"]["content"]]
    assert got == content
    assert streamed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_only_streamed_requests_ask_the_engine_for_outputs_before_the_final(srv):
    srv.post("/v1/completions", {"prompt": "ab", "max_tokens": 3, "n": 2})
    srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3})
    assert srv.engine.intervals == [None, None, None]  # collected: the final output only
    srv.post("/v1/completions", {"prompt": "ab", "max_tokens": 3, "stream": True})
    srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                                      "stream": True})
    assert srv.engine.intervals[3:] == [1, 1]  # the server's --stream-interval (default 1)


def test_streamed_echo_and_usage(srv):
    events = _sse(srv.post("/v1/completions", {"prompt": "ab", "max_tokens": 3, "echo": True,
                                               "stream": True,
                                               "stream_options": {"include_usage": True}}).text)
    full = srv.post("/v1/completions", {"prompt": "ab", "max_tokens": 3, "echo": True}).json()
    assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == \
        full["choices"][0]["text"]
    assert events[-2]["usage"] == full["usage"] and events[-1] == "[DONE]"


def test_engine_failure_is_clean_json_and_sse(srv):
    r = srv.post("/v1/completions", {"prompt": "Fail", "max_tokens": 5})
    assert r.status_code == 503 and "DP rank 1 died" in r.json()["error"]["message"]
    events = _sse(srv.post("/v1/completions", {"prompt": "Fail", "max_tokens": 5,
                                               "stream": True}).text)
    assert events[-1] == "[DONE]" and "DP rank 1 died" in events[-2]["error"]["message"]
    assert srv.post("/v1/completions", {"prompt": "ab", "max_tokens": 1}).status_code == 200


def test_drain_ends_open_requests_cleanly(srv):
    results: dict = {}

    def plain() -> None:
        results["plain"] = srv.post("/v1/completions", {"prompt": "Hang", "max_tokens": 5})

    def streamed() -> None:
        results["stream"] = srv.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "x"}], "stream": True, "max_tokens": 5})

    # a chat prompt starts with the template's "user: "; make the engine hang on it too
    threads = [threading.Thread(target=plain), threading.Thread(target=streamed)]
    orig = srv.engine.generate

    def generate(rid, ids, params, **kw):
        return orig(rid, [ord("H") % VOCAB] + list(ids), params, **kw)

    srv.engine.generate = generate
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while srv.ctx.lifecycle.in_flight < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    srv.ctx.lifecycle.begin_drain(0.1)
    for t in threads:
        t.join(30)
    assert results["plain"].status_code == 503
    assert "shutting down" in results["plain"].json()["error"]["message"]
    events = _sse(results["stream"].text)
    assert events[-1] == "[DONE]" and "shutting down" in events[-2]["error"]["message"]
    assert len(srv.engine.aborted) >= 2  # the engine requests were aborted too
    r = srv.post("/v1/completions", {"prompt": "ab"})  # new work during the drain
    assert r.status_code == 503


def test_a_handler_runs_without_the_http_app():
    from eplb.server.context import ServingContext
    from eplb.server.handlers import CompletionHandler
    from eplb.server.protocol import CompletionRequest
    from eplb.server.responses import CompletionResponse

    ctx = ServingContext(FakeEngine(), ServerSettings(served_model_names=["fake"], max_model_len=64))
    ctx.on_ready()

    async def never() -> None:
        await asyncio.Event().wait()

    async def go():
        handler = CompletionHandler(ctx)
        full = await handler(CompletionRequest(prompt=[3, 4], max_tokens=3, n=2, seed=1), never)
        stream = await handler(CompletionRequest(prompt=[3, 4], max_tokens=3, stream=True), never)
        return full, [line async for line in stream]

    try:
        full, lines = asyncio.run(go())
    finally:
        ctx.close()
    assert isinstance(full, CompletionResponse)
    assert [c.text for c in full.choices] == ["456", "567"]
    assert full.usage.completion_tokens == 6 and full.usage.prompt_tokens == 2
    assert lines[-1] == "data: [DONE]\n\n"
    assert "".join(e["choices"][0]["text"] for e in _sse("".join(lines))[:-1]) == "345"


def test_engine_that_fails_to_start_is_kept_and_reported_once():
    """The engine's start raises: /health stays 503, ``on_fatal`` gets that exception once (eplb
    serve then stops uvicorn), and the context keeps it for the exit message."""

    class NoStart(FakeEngine):
        def start(self) -> None:
            raise RuntimeError("rank 1 died while loading")

    fatal: list[BaseException] = []
    settings = ServerSettings(served_model_names=["fake"], max_model_len=64,
                              rebalance_log_interval_s=3600, on_fatal=fatal.append)
    app = create_app(NoStart(), settings)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not fatal and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(fatal) == 1 and str(fatal[0]) == "rank 1 died while loading"
        assert app.state.eplb.start_error is fatal[0]
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 503
    finally:
        server.should_exit = True
        thread.join(30)
