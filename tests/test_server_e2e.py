"""The real server: `eplb serve` in a subprocess (DP 2, EP, async EPLB rebalancing every few
steps) on a tiny random Qwen3-MoE made here, driven by the `openai` client and raw HTTP.

One server serves the whole module (start-up is the slow part); the last test stops it with
SIGTERM and checks that nothing it started is left behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

API_KEY = "test-key"
MAX_MODEL_LEN = 256
EPLB_CONFIG = {"window_size": 4, "step_interval": 4, "use_async": True}


def make_tiny_model(out: Path, num_experts: int = 8, seed: int = 0) -> Path:
    """A random 2-layer Qwen3-MoE with a small byte-level BPE tokenizer, in the HF layout."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(["Question: Tom has 12 apples.\nAnswer: 12 + 3 = 15\n#### 15"] * 4,
                           trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
        num_experts=num_experts, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id, bos_token_id=None)
    Qwen3MoeForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    c = json.loads((out / "config.json").read_text())
    c.setdefault("num_experts", c.get("num_local_experts", num_experts))
    (out / "config.json").write_text(json.dumps(c))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _procs_in_session(sid: int) -> list[int]:
    """Live (non-zombie) processes whose session id is ``sid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state ppid pgrp session ...
            found.append(int(entry))
    return found


class Server:
    def __init__(self, model: Path, log: Path, eplb_config: dict = EPLB_CONFIG):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self.name = "tiny-moe"
        cmd = [sys.executable, "-m", "eplb", "serve", str(model), "--port", str(self.port),
               "--served-model-name", self.name, "--api-key", API_KEY,
               "--data-parallel-size", "2", "--enable-expert-parallel", "--enable-eplb",
               "--eplb-config", json.dumps(eplb_config), "--all2all-backend",
               "allgather_reducescatter", "--max-model-len", str(MAX_MODEL_LEN),
               "--max-num-seqs", "16", "--device", "cpu", "--enforce-eager",
               "--drain-timeout", "1"]
        self.log = open(log, "w")  # noqa: SIM115 - the server's log, closed in stop()
        env = dict(os.environ, OMP_NUM_THREADS="1")
        # its own session: every process it starts can be found (and must be gone) afterwards
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.headers = {"Authorization": f"Bearer {API_KEY}"}
        self.health_codes: list[int] = []

    def wait_healthy(self, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                code = httpx.get(self.url + "/health", timeout=2).status_code
                self.health_codes.append(code)
                if code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not healthy after {timeout_s}s:\n{self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text().splitlines()[-40:])

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise KeyError(name)

    def metric_sum(self, name: str) -> float:
        """Sum of every labelled series of ``name`` (0 when there is none yet)."""
        text = httpx.get(self.url + "/metrics", timeout=30).text
        return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name + "{"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_moe"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = Server(model_dir, tmp_path_factory.mktemp("server") / "server.log")
    try:
        srv.wait_healthy()
        yield srv
    finally:
        srv.stop()
        for pid in _procs_in_session(srv.proc.pid):  # never leave strays, even on failure
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_health_models_and_auth(server):
    # the port answers while the ranks load: 503 until every rank is up, then 200
    assert server.health_codes[0] == 503 and server.health_codes[-1] == 200
    assert httpx.get(server.url + "/health").status_code == 200
    models = httpx.get(server.url + "/v1/models", headers=server.headers).json()
    assert [m["id"] for m in models["data"]] == [server.name]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(server.url + "/v1/models", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"


def test_openai_completions_match_offline_engine(server, client, model_dir):
    prompts = ["Question: Tom has 12 apples.", "Answer: 12 + 3"]
    from eplb.engine import LLM, SamplingParams

    offline = LLM(str(model_dir), max_model_len=MAX_MODEL_LEN).generate(
        prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    for prompt, ref in zip(prompts, offline):
        resp = client.completions.create(model=server.name, prompt=prompt, max_tokens=10,
                                         temperature=0, extra_body={"ignore_eos": True})
        assert resp.choices[0].text == ref.text
        assert resp.choices[0].finish_reason == "length"
        assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert resp.usage.completion_tokens == 10
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + 10
    # a list prompt gives one choice per prompt, in order
    both = client.completions.create(model=server.name, prompt=prompts, max_tokens=10,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(both.choices, key=lambda c: c.index)] == [o.text for o in offline]
    assert both.usage.completion_tokens == 20


def test_openai_streaming_equals_non_streaming(server, client):
    kwargs = dict(model=server.name, prompt="Question: Tom has", max_tokens=12, temperature=0,
                  extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                            **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    # the raw stream ends with the SSE terminator
    with httpx.stream("POST", server.url + "/v1/completions", headers=server.headers, timeout=60,
                      json={**{k: v for k, v in kwargs.items() if k != "extra_body"},
                            "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_openai_chat_and_chat_streaming(server, client):
    messages = [{"role": "system", "content": "You count apples."},
                {"role": "user", "content": "Tom has 12 apples. How many?"}]
    resp = client.chat.completions.create(model=server.name, messages=messages, max_tokens=8,
                                          temperature=0, extra_body={"ignore_eos": True})
    msg = resp.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert resp.usage.completion_tokens == 8
    stream = client.chat.completions.create(model=server.name, messages=messages, max_tokens=8,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_and_seeded_sampling(server, client):
    base = client.completions.create(model=server.name, prompt="Tom has", max_tokens=16,
                                     temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    assert len(base) > 3
    stop = base[2:4]  # cut the greedy text where this pair first appears
    cut = client.completions.create(model=server.name, prompt="Tom has", max_tokens=16,
                                    temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == base[:base.index(stop)] and cut.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=server.name, prompt="Tom has", max_tokens=16, temperature=0, stop=[stop],
        stream=True, extra_body={"ignore_eos": True}))
    assert streamed == cut.text  # a half-generated stop string is never streamed
    a, b = (client.completions.create(model=server.name, prompt="Tom has", max_tokens=12,
                                      temperature=1.0, top_p=0.9, seed=1234,
                                      extra_body={"ignore_eos": True, "top_k": 50}
                                      ).choices[0].text
            for _ in range(2))
    assert a == b  # a seed makes one request reproducible


# requests that use every sampling feature; seeded, so each has one right answer
FEATURE_BODIES = [
    {"prompt": "Tom has 3 apples", "max_tokens": 8, "temperature": 0, "presence_penalty": 1.5,
     "frequency_penalty": 0.5, "repetition_penalty": 1.3, "ignore_eos": True},
    {"prompt": "Answer: 12", "max_tokens": 8, "temperature": 0.8, "top_p": 0.9, "seed": 11,
     "logit_bias": {"5": 5.0, "7": -100}, "logprobs": 3, "ignore_eos": True},
    {"prompt": [5, 6, 7, 8], "max_tokens": 8, "temperature": 1.0, "seed": 3, "n": 2,
     "min_tokens": 4, "stop_token_ids": [9, 10], "echo": True},
    {"prompt": "Question: Tom", "max_tokens": 6, "temperature": 0.7, "top_k": 20, "min_p": 0.05,
     "seed": 5, "logprobs": 0},
    {"prompt": "Tom has 3 apples.", "max_tokens": 4, "temperature": 0, "echo": True,
     "logprobs": 2, "ignore_eos": True},
]


def _choices(body: dict) -> list:
    return [(c["text"], c["finish_reason"],
             c["logprobs"]["tokens"] if c["logprobs"] else None)
            for c in sorted(body["choices"], key=lambda c: c["index"])]


def _logprob_values(body: dict) -> list:
    return [[v for v in c["logprobs"]["token_logprobs"] if v is not None]
            for c in body["choices"] if c["logprobs"]]


async def _load(url: str, bodies: list[dict], headers: dict) -> list:
    """Every body at once; odd ones stream (their chunks joined back into one completion)."""
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=limits) as c:
        async def one(i: int, body: dict) -> dict:
            if i % 2 == 0 or body.get("n", 1) > 1 or "logprobs" in body:
                r = await c.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()
            text, finish = "", None
            async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunk = json.loads(line[6:])
                        assert "error" not in chunk, chunk
                        text += chunk["choices"][0]["text"]
                        finish = chunk["choices"][0]["finish_reason"] or finish
            return {"choices": [{"index": 0, "text": text, "finish_reason": finish,
                                 "logprobs": None}]}

        return await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))


def test_200_concurrent_equal_one_by_one_during_async_rebalances(server):
    """200 requests at once (half streaming; 20 greedy prompts and the feature requests, each
    many times) while async rebalances commit: every answer equals the one-by-one answer."""
    check_load_equals_one_by_one(server, 200, 20)


def check_load_equals_one_by_one(server: Server, total: int, num_greedy: int) -> None:
    greedy = [{"model": server.name, "prompt": f"Question: Tom has {i} apples and {i % 7} pears.",
               "max_tokens": 6, "temperature": 0, "ignore_eos": True} for i in range(num_greedy)]
    distinct = greedy + [{"model": server.name, **b} for b in FEATURE_BODIES]
    one_by_one = []
    for body in distinct:
        r = httpx.post(server.url + "/v1/completions", json=body, headers=server.headers, timeout=60)
        assert r.status_code == 200, r.text
        one_by_one.append(r.json())
    before = server.metric("eplb_rebalances_total")
    order = [i % len(distinct) for i in range(total)]
    answers = asyncio.run(_load(server.url, [distinct[i] for i in order], server.headers))
    for i, got in zip(order, answers):
        assert _choices(got) == _choices(one_by_one[i]), distinct[i]
        for a, b in zip(_logprob_values(got), _logprob_values(one_by_one[i])):
            assert a == pytest.approx(b, abs=1e-4)
    after = server.metric("eplb_rebalances_total")
    assert after > before, f"no rebalance completed while the {total} requests ran"
    assert server.metric("eplb_expert_copies_moved_total") > 0
    assert server.metric("eplb_rebalances_failed_total") == 0
    assert "EPLB rebalance completed" in server.log_path.read_text()  # reaches the server log


BAD_REQUESTS = [
    ("malformed json", "/v1/completions", b'{"prompt": "x", ', None),
    ("not an object", "/v1/completions", b"[1, 2]", None),
    ("unknown model", "/v1/completions", {"model": "gpt-17", "prompt": "x"}, "model"),
    ("max_tokens type", "/v1/completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("temperature type", "/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("prompt type", "/v1/completions", {"prompt": 5}, "prompt"),
    ("stream type", "/v1/completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("max_tokens 0", "/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("max_tokens -3", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}, "max_tokens"),
    ("prompt too long", "/v1/completions", {"prompt": "apples " * (2 * MAX_MODEL_LEN)}, "prompt"),
    ("chat too long", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "apples " * (2 * MAX_MODEL_LEN)}]}, "messages"),
    ("prompt + max_tokens too long", "/v1/completions",
     {"prompt": "x", "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ("token id out of vocab", "/v1/completions", {"prompt": [1, 2, 10**6]}, "prompt"),
    ("n 0", "/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("lone surrogate", "/v1/completions", b'{"prompt": "a\\ud800b"}', "prompt"),
    ("lone surrogate in chat", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages.0.content"),
    ("seed 2^64", "/v1/completions", {"prompt": "x", "seed": 2**64}, "seed"),
    ("tools", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                       "tools": [{"type": "function"}]}, "tools"),
    ("stop token id out of vocab", "/v1/completions", {"prompt": "x", "stop_token_ids": [10**6]},
     "stop_token_ids"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]},
     "messages.0.role"),
    ("messages type", "/v1/chat/completions", {"messages": "hello"}, "messages"),
    ("no messages", "/v1/chat/completions", {"messages": []}, "messages"),
    ("unknown chat model", "/v1/chat/completions",
     {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, "model"),
]


@pytest.mark.parametrize("case, path, body, param", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_is_400_openai_error(server, case, path, body, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, headers={**server.headers,
                                               "Content-Type": "application/json"},
                   timeout=30, **kwargs)
    assert r.status_code == 400, (case, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param


def test_still_serving_after_bad_input_and_metrics(server, client):
    r = client.completions.create(model=server.name, prompt="Tom", max_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    text = httpx.get(server.url + "/metrics").text
    assert 'eplb_requests_total{endpoint="/v1/completions",status="400"}' in text
    assert 'eplb_requests_total{endpoint="/v1/completions",status="200"}' in text
    for name in ("eplb_prompt_tokens_total", "eplb_generation_tokens_total",
                 'eplb_num_requests_running{rank="1"}', 'eplb_num_requests_waiting{rank="0"}',
                 "eplb_rebalances_total", "eplb_expert_copies_moved_total",
                 "eplb_expert_bytes_moved_total", "eplb_last_rebalance_seconds",
                 "eplb_mean_rebalance_seconds", "eplb_balancedness"):
        assert name in text, name
    assert server.metric("eplb_generation_tokens_total") >= 3


def test_eval_client_against_our_server(server, tmp_path):
    data = tmp_path / "q_test.jsonl"
    data.write_text("".join(json.dumps({"question": f"Tom has {i} apples. How many?",
                                        "answer": f"{i}\n#### {i}"}) + "\n" for i in range(6)))
    out = tmp_path / "res.json"
    proc = subprocess.run(
        [sys.executable, "-m", "eplb", "eval", "gsm8k", "--port", str(server.port),
         "--api-key", API_KEY, "--data-path", str(data), "--num-shots", "2",
         "--num-questions", "4", "--max-tokens", "8", "--save-results", str(out)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["num_questions"] == 4 and res["num_shots"] == 2 and res["model"] == server.name
    assert 0.0 <= res["accuracy"] <= 1.0 and res["questions_per_second"] > 0


def _open_request(url: str, headers: dict, stream: bool, out: dict) -> None:
    body = {"prompt": "Tom has", "max_tokens": MAX_MODEL_LEN - 8, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    try:
        r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60)
        out["status"], out["text"] = r.status_code, r.text
    except httpx.HTTPError as exc:  # a connection cut mid-answer: what must not happen
        out["status"], out["text"] = None, repr(exc)


def test_sigterm_ends_open_requests_cleanly_and_stops_every_process(server):
    # runs last in this module: it stops the shared server
    import threading

    sid = server.proc.pid
    assert len(_procs_in_session(sid)) >= 3  # the front and its two ranks (at least)
    results: list[dict] = [{}, {}]
    threads = [threading.Thread(target=_open_request, args=(server.url, server.headers, s, r))
               for s, r in zip((False, True), results)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30  # both requests are generating
    while server.metric_sum("eplb_num_requests_running") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    plain, streamed = results
    # each either finished in the 1 s drain or ended with the OpenAI error shape
    assert plain["status"] in (200, 503), plain
    if plain["status"] == 503:
        assert "shutting down" in json.loads(plain["text"])["error"]["message"]
    assert streamed["status"] == 200, streamed
    events = [ln for ln in streamed["text"].splitlines() if ln.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert "error" in last or last["choices"][0]["finish_reason"] == "length", last
    assert server.proc.wait(30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while _procs_in_session(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _procs_in_session(sid) == [], server.tail()
    with pytest.raises(httpx.ConnectError):  # nobody listens any more
        httpx.get(server.url + "/health", timeout=5)
    with socket.socket() as s:  # and a new server can bind the port (as uvicorn does)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", server.port))
    log = server.log_path.read_text()
    assert "shutting down the engine" in log
    assert "Traceback" not in log and "leaked semaphore" not in log, server.tail()
