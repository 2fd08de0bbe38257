"""`eplb bench serve`: load-test an OpenAI-compatible server the way `vllm bench serve` does.

Random dataset: each prompt is ``--random-input-len`` random token ids (sent as a list of ints to
``/v1/completions``, so no tokenizer is needed and any server that takes token-id prompts works),
asking for ``--random-output-len`` tokens (``--ignore-eos`` makes that length fixed). Requests
arrive all at once (``--request-rate inf``) or as a Poisson process (gamma with
``--burstiness``), at most ``--max-concurrency`` in flight. Every response is streamed: TTFT is the
time to the first chunk, ITL the gaps between chunks, TPOT (E2E - TTFT) / (output tokens - 1) per
request; output tokens come from the stream's ``usage``. Speaks only HTTP (``sse_client`` for
http://, httpx for https://).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from eplb.benchmarks.sse_client import ConnectionPool, HTTPStatusError, stream_events

if TYPE_CHECKING:
    import httpx


@dataclass
class RequestResult:
    prompt_len: int
    output_len: int = 0  # tokens generated (usage.completion_tokens, else chunks seen)
    success: bool = False
    ttft: float = 0.0  # seconds
    latency: float = 0.0  # seconds, request sent -> last byte
    itl: list[float] = field(default_factory=list)  # seconds between chunks
    error: str = ""
    start: float = 0.0  # perf_counter when sent


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=None,
                   help="server URL, e.g. http://127.0.0.1:8000 (default: from --host/--port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default="/v1/completions", help="completions endpoint (default: %(default)s)")
    p.add_argument("--backend", default="openai", choices=("openai", "vllm", "eplb"),
                   help="accepted for vLLM compatibility; all speak the OpenAI completions API")
    p.add_argument("--model", default=None, help="model name in requests (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--dataset-name", default="random", choices=("random",), help="only random (default)")
    p.add_argument("--num-prompts", type=int, default=1000, help="requests to send (default: %(default)s)")
    p.add_argument("--random-input-len", type=int, default=1024, help="prompt tokens (default: %(default)s)")
    p.add_argument("--random-output-len", type=int, default=128, help="max_tokens per request (default: %(default)s)")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly from [len*(1-r), len*(1+r)] (default: 0, fixed)")
    p.add_argument("--random-prefix-len", type=int, default=0, help="random tokens shared by every prompt")
    p.add_argument("--random-vocab-size", type=int, default=None,
                   help="prompt ids are drawn from [0, V) (default: vocab_size of config.json in the "
                        "--tokenizer or --model folder if there is one, else 256)")
    p.add_argument("--tokenizer", default=None, help="a local model folder whose config.json gives the vocab size")
    p.add_argument("--ignore-eos", action="store_true",
                   help="send ignore_eos (vLLM's extension): every request generates exactly its max_tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second (default: inf = all at once); Poisson arrivals otherwise")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the inter-arrival times (1 = Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-warmups", type=int, default=0, help="requests sent (and not counted) before the run")
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el",
                   help="metrics to report percentiles of (default: %(default)s)")
    p.add_argument("--metric-percentiles", default="50,99", help="percentiles reported (default: %(default)s)")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    p.add_argument("--save-result", action="store_true", help="write the results as JSON")
    p.add_argument("--save-detailed", action="store_true", help="also save per-request lengths, TTFTs and ITLs")
    p.add_argument("--result-dir", default=".", help="folder of the JSON (default: current)")
    p.add_argument("--result-filename", default=None,
                   help="JSON file name (default: {backend}-{rate}qps[-concurrency{n}]-{model}-{date}.json)")
    p.add_argument("--metadata", nargs="*", default=[], metavar="KEY=VALUE", help="extra fields for the JSON")
    p.add_argument("--timeout", type=float, default=6 * 3600.0, help="per-request timeout in seconds")


def check_args(a: argparse.Namespace) -> None:
    """ValueError naming the flag."""
    for flag, lo in (("num_prompts", 1), ("random_input_len", 1), ("random_output_len", 1), ("random_prefix_len", 0),
                     ("num_warmups", 0)):
        if getattr(a, flag) < lo:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= {lo}, got {getattr(a, flag)}")
    if not 0 <= a.random_range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {a.random_range_ratio}")
    if a.max_concurrency is not None and a.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {a.max_concurrency}")
    if not a.request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (inf = all at once), got {a.request_rate}")
    if not a.burstiness > 0:
        raise ValueError(f"--burstiness must be > 0, got {a.burstiness}")
    if a.random_vocab_size is not None and a.random_vocab_size < 1:
        raise ValueError(f"--random-vocab-size must be >= 1, got {a.random_vocab_size}")
    for kv in a.metadata:
        if "=" not in kv:
            raise ValueError(f"--metadata entries must be KEY=VALUE, got {kv!r}")
    metric_names = {"ttft", "tpot", "itl", "e2el"}
    bad = [m for m in a.percentile_metrics.split(",") if m not in metric_names]
    if bad:
        raise ValueError(f"--percentile-metrics: unknown {bad}; allowed: {', '.join(sorted(metric_names))}")
    try:
        ps = [float(x) for x in a.metric_percentiles.split(",")]
    except ValueError:
        raise ValueError("--metric-percentiles must be numbers separated by commas, "
                         f"got {a.metric_percentiles!r}") from None
    if not all(0 < x <= 100 for x in ps):
        raise ValueError(f"--metric-percentiles must be in (0, 100], got {a.metric_percentiles!r}")


def vocab_size_of(a: argparse.Namespace, model: str | None) -> int:
    if a.random_vocab_size is not None:
        return a.random_vocab_size
    for folder in (a.tokenizer, model):
        path = os.path.join(folder, "config.json") if folder else None
        if path and os.path.isfile(path):
            with open(path) as f:
                v = json.load(f).get("vocab_size")
            if isinstance(v, int) and v > 0:
                return v
    return 256


def sample_random_requests(num: int, input_len: int, output_len: int, range_ratio: float, prefix_len: int,
                           vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens) per request, like vLLM's random dataset (ids uniform)."""
    rng = np.random.default_rng(seed)
    lo_i, hi_i = int(input_len * (1 - range_ratio)), int(input_len * (1 + range_ratio))
    lo_o, hi_o = int(output_len * (1 - range_ratio)), int(output_len * (1 + range_ratio))
    in_lens = rng.integers(max(lo_i, 1), hi_i + 1, size=num)
    out_lens = rng.integers(max(lo_o, 1), hi_o + 1, size=num)
    prefix = rng.integers(0, vocab, size=prefix_len).tolist()
    return [(prefix + rng.integers(0, vocab, size=int(n)).tolist(), int(m)) for n, m in zip(in_lens, out_lens)]


async def _httpx_events(client, url: str, headers: dict, payload: bytes):
    """The ``data:`` payloads of a streamed POST through httpx (https:// servers)."""
    async with client.stream("POST", url, content=payload,
                             headers={**headers, "Content-Type": "application/json"}) as r:
        if r.status_code != 200:
            raise HTTPStatusError(r.status_code, (await r.aread()).decode(errors="replace"))
        async for line in r.aiter_lines():
            line = line.strip()
            if line.startswith("data:"):
                yield line[len("data:"):].strip().encode()


async def send_request(client: ConnectionPool | httpx.AsyncClient, url: str, headers: dict, body: dict,
                       prompt_len: int) -> RequestResult:
    """One streamed completion; chunks that carry choices count as tokens arriving. ``client``:
    an httpx client for https:// URLs, a ``sse_client.ConnectionPool`` for http://."""
    res = RequestResult(prompt_len=prompt_len)
    payload = json.dumps(body).encode()
    res.start = st = time.perf_counter()
    last = st
    chunks = 0
    usage_tokens = None
    done = None
    events = (stream_events(url, payload, headers, client) if isinstance(client, ConnectionPool)
              else _httpx_events(client, url, headers, payload))
    try:
        async for data in events:
            if data == b"[DONE]":  # read on to the body's end: the connection is then reusable
                done = done or time.perf_counter()
                continue
            msg = json.loads(data)
            if "error" in msg:
                res.error = str(msg["error"])[:300]
                return res
            now = time.perf_counter()
            if msg.get("choices"):
                if chunks == 0:
                    res.ttft = now - st
                else:
                    res.itl.append(now - last)
                chunks += 1
                last = now
            if msg.get("usage"):
                usage_tokens = msg["usage"].get("completion_tokens")
        res.latency = (done or time.perf_counter()) - st
        if chunks == 0:
            res.error = "the stream carried no choices"
            return res
        res.output_len = int(usage_tokens) if usage_tokens is not None else chunks
        res.success = True
    except Exception as exc:  # noqa: BLE001 - a failed request is reported, not fatal
        res.error = (str(exc) if isinstance(exc, HTTPStatusError) else f"{type(exc).__name__}: {exc}")[:300]
    finally:
        await events.aclose()
    return res


class Progress:
    """tqdm when it is installed, else a one-line counter on stderr."""

    def __init__(self, total: int, disable: bool):
        self.total, self.n, self.disable, self._bar = total, 0, disable, None
        if disable:
            return
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc="requests", file=sys.stderr)
        except ImportError:
            self._last = 0.0

    def update(self) -> None:
        self.n += 1
        if self.disable:
            return
        if self._bar is not None:
            self._bar.update(1)
            return
        now = time.monotonic()
        if now - self._last > 0.5 or self.n == self.total:
            self._last = now
            print(f"\rrequests {self.n}/{self.total}", end="\n" if self.n == self.total else "",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def arrivals(n: int, rate: float, burstiness: float, seed: int) -> AsyncIterator[int]:
    """Yields request indices 0..n-1, sleeping gamma(burstiness, 1/(rate*burstiness)) between them."""
    rng = np.random.default_rng(seed + 1)
    for i in range(n):
        yield i
        if math.isinf(rate) or i == n - 1:
            continue
        await asyncio.sleep(float(rng.gamma(burstiness, 1.0 / (rate * burstiness))))


async def run_benchmark(a: argparse.Namespace, base: str, model: str,
                        requests: list[tuple[list[int], int]]) -> tuple[list[RequestResult], float]:
    import httpx

    url = base + a.endpoint
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}

    def body(prompt: list[int], max_tokens: int) -> dict:
        b = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": a.temperature,
             "stream": True, "stream_options": {"include_usage": True}}
        if a.ignore_eos:
            b["ignore_eos"] = True
        return b

    async with contextlib.AsyncExitStack() as stack:
        if url.startswith("http://"):  # the lean reader, on keep-alive connections
            client = ConnectionPool()
            stack.callback(client.close)
        else:
            limits = httpx.Limits(max_connections=a.max_concurrency or None, max_keepalive_connections=None)
            client = await stack.enter_async_context(
                httpx.AsyncClient(timeout=httpx.Timeout(a.timeout, connect=60.0), limits=limits))

        async def send(prompt: list[int], max_tokens: int, prompt_len: int) -> RequestResult:
            try:
                return await asyncio.wait_for(send_request(client, url, headers, body(prompt, max_tokens), prompt_len),
                                              a.timeout)
            except asyncio.TimeoutError:
                return RequestResult(prompt_len=prompt_len, error=f"timed out after {a.timeout:g} s")

        # vLLM's initial single-prompt test: fail early, with the server's reason, on a bad setup
        test = await send(*requests[0], len(requests[0][0]))
        if not test.success:
            raise RuntimeError(f"the initial test request failed: {test.error}")
        for i in range(a.num_warmups):
            await send(*requests[i % len(requests)], 0)
        sem = asyncio.Semaphore(a.max_concurrency) if a.max_concurrency else None
        bar = Progress(len(requests), a.disable_tqdm)

        async def one(i: int) -> RequestResult:
            prompt, mt = requests[i]
            if sem is None:
                r = await send(prompt, mt, len(prompt))
            else:
                async with sem:
                    r = await send(prompt, mt, len(prompt))
            bar.update()
            return r

        t0 = time.perf_counter()
        tasks = []
        async for i in arrivals(len(requests), a.request_rate, a.burstiness, a.seed):
            tasks.append(asyncio.create_task(one(i)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        bar.close()
    return list(results), duration


def compute_metrics(results: list[RequestResult], duration: float, percentiles: list[float]) -> dict[str, Any]:
    """vLLM's result keys: counts, throughputs, and mean/median/std/pXX of ttft, tpot, itl, e2el (ms)."""
    ok = [r for r in results if r.success]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1],
        "itl": [x for r in ok for x in r.itl],
        "e2el": [r.latency for r in ok],
    }
    m: dict[str, Any] = {
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
    }
    for name, xs in series.items():
        ms = np.asarray(xs, dtype=np.float64) * 1e3
        m[f"mean_{name}_ms"] = float(ms.mean()) if ms.size else 0.0
        m[f"median_{name}_ms"] = float(np.median(ms)) if ms.size else 0.0
        m[f"std_{name}_ms"] = float(ms.std()) if ms.size else 0.0
        for p in percentiles:
            key = f"p{int(p) if float(p).is_integer() else p}_{name}_ms"
            m[key] = float(np.percentile(ms, p)) if ms.size else 0.0
    return m


def print_report(m: dict[str, Any], a: argparse.Namespace, percentiles: list[float]) -> None:
    w = 50
    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="="))
    rows = [("Successful requests:", m["completed"]), ("Failed requests:", m["failed"]),
            ("Maximum request concurrency:", a.max_concurrency),
            ("Request rate configured (RPS):", a.request_rate),
            ("Benchmark duration (s):", f"{m['duration']:.2f}"),
            ("Total input tokens:", m["total_input_tokens"]), ("Total generated tokens:", m["total_output_tokens"]),
            ("Request throughput (req/s):", f"{m['request_throughput']:.2f}"),
            ("Output token throughput (tok/s):", f"{m['output_throughput']:.2f}"),
            ("Total token throughput (tok/s):", f"{m['total_token_throughput']:.2f}")]
    for k, v in rows:
        print(f"{k:<40}{v!s:<10}")
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for name in a.percentile_metrics.split(","):
        print("{s:{c}^{n}}".format(s=titles[name], n=w, c="-"))
        up = name.upper()
        print(f"{'Mean ' + up + ' (ms):':<40}{m[f'mean_{name}_ms']:<10.2f}")
        print(f"{'Median ' + up + ' (ms):':<40}{m[f'median_{name}_ms']:<10.2f}")
        for p in percentiles:
            ps = str(int(p)) if float(p).is_integer() else str(p)
            if ps == "50":  # the median row above
                continue
            print(f"{'P' + ps + ' ' + up + ' (ms):':<40}{m[f'p{ps}_{name}_ms']:<10.2f}")
    print("=" * w)


def first_model(base: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(base + "/v1/models", headers=headers, timeout=30.0)
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise RuntimeError(f"{base}/v1/models lists no model; pass --model")
    return data[0]["id"]


def _run(coro):
    """asyncio.run, on uvloop when it is installed (cheaper per chunk read)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(a: argparse.Namespace) -> int:
    try:
        check_args(a)
    except ValueError as exc:
        print(f"eplb bench serve: error: {exc}", file=sys.stderr)
        return 2
    base = (a.base_url or f"http://{a.host}:{a.port}").rstrip("/")
    percentiles = [float(x) for x in a.metric_percentiles.split(",")]
    try:
        model = a.model or first_model(base, a.api_key)
        vocab = vocab_size_of(a, model)
        requests = sample_random_requests(a.num_prompts, a.random_input_len, a.random_output_len,
                                          a.random_range_ratio, a.random_prefix_len, vocab, a.seed)
        print(f"{len(requests)} random prompts of ~{a.random_input_len} token ids in [0, {vocab}), "
              f"max_tokens ~{a.random_output_len}{', ignore_eos' if a.ignore_eos else ''}; model {model!r} at {base}",
              file=sys.stderr)
        results, duration = _run(run_benchmark(a, base, model, requests))
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        print(f"eplb bench serve: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    m = compute_metrics(results, duration, percentiles)
    print_report(m, a, percentiles)
    errors = [r.error for r in results if not r.success]
    if errors:
        print(f"{len(errors)} requests failed; first error: {errors[0]}", file=sys.stderr)
    if a.save_result or a.result_filename:
        now = datetime.datetime.now()
        res: dict[str, Any] = {
            "date": now.strftime("%Y%m%d-%H%M%S"), "backend": a.backend, "model_id": model, "base_url": base,
            "dataset_name": a.dataset_name, "num_prompts": a.num_prompts, "random_input_len": a.random_input_len,
            "random_output_len": a.random_output_len, "random_range_ratio": a.random_range_ratio,
            "random_vocab_size": vocab,
            "ignore_eos": a.ignore_eos, "request_rate": a.request_rate if not math.isinf(a.request_rate) else "inf",
            "burstiness": a.burstiness, "max_concurrency": a.max_concurrency, "seed": a.seed, **m,
            "errors": errors[:20],
        }
        res.update(dict(kv.split("=", 1) for kv in a.metadata))
        if a.save_detailed:
            ok = [r for r in results if r.success]
            res.update({"input_lens": [r.prompt_len for r in ok], "output_lens": [r.output_len for r in ok],
                        "ttfts": [r.ttft for r in ok], "itls": [r.itl for r in ok],
                        "e2els": [r.latency for r in ok]})
        name = a.result_filename
        if name is None:
            rate = "inf" if math.isinf(a.request_rate) else f"{a.request_rate:g}"
            conc = f"-concurrency{a.max_concurrency}" if a.max_concurrency else ""
            name = f"{a.backend}-{rate}qps{conc}-{model.rstrip('/').split('/')[-1]}-{res['date']}.json"
        path = os.path.join(a.result_dir, name)
        os.makedirs(a.result_dir or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {path}", file=sys.stderr)
    return 0 if not errors else 1
