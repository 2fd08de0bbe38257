"""`eplb bench serve` against a real `eplb serve` (the shipped tiny model, and a dummy-weight copy of
the Qwen3-30B-A3B-FP8 config scaled down), plus its pure parts (dataset, metrics, flags)."""

from __future__ import annotations

import argparse
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

from eplb.benchmarks.serve import RequestResult, add_arguments, compute_metrics, sample_random_requests
from eplb.resources import default_model_path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(args: list[str]):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "eplb.cli", "serve", *args, "--port", str(port),
                             "--device", "cpu", "--log-level", "warning"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"eplb serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError("eplb serve did not become healthy")


def _stop(proc) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _bench(port: int, out: Path, *extra: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "eplb.cli", "bench", "serve", "--port", str(port),
                        "--disable-tqdm", "--save-result", "--save-detailed", "--result-dir", str(out),
                        "--result-filename", "r.json", *extra],
                       env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Serving Benchmark Result" in r.stdout and "Mean TTFT (ms):" in r.stdout
    return json.loads((out / "r.json").read_text())


def _check_consistent(res: dict, n: int, in_len: int, out_len: int) -> None:
    assert res["completed"] == n and res["failed"] == 0 and res["errors"] == []
    assert res["total_input_tokens"] == n * in_len and res["input_lens"] == [in_len] * n
    assert res["total_output_tokens"] == n * out_len and res["output_lens"] == [out_len] * n
    assert res["request_throughput"] == pytest.approx(n / res["duration"])
    assert res["output_throughput"] == pytest.approx(n * out_len / res["duration"])
    assert res["total_token_throughput"] == pytest.approx(n * (in_len + out_len) / res["duration"])
    for ttft, e2el, itl in zip(res["ttfts"], res["e2els"], res["itls"]):
        assert 0 < ttft <= e2el <= res["duration"]
        assert len(itl) <= out_len - 1 and sum(itl) <= e2el - ttft + 1e-6
    assert res["mean_ttft_ms"] <= res["mean_e2el_ms"]
    tpots = [(e - t) / (out_len - 1) for t, e in zip(res["ttfts"], res["e2els"])]
    assert res["mean_tpot_ms"] == pytest.approx(1e3 * sum(tpots) / n)
    for m in ("ttft", "tpot", "itl", "e2el"):
        assert res[f"median_{m}_ms"] == res[f"p50_{m}_ms"] <= res[f"p99_{m}_ms"]


def test_bench_serve_against_the_shipped_model(tmp_path):
    proc, port = _serve(["--max-num-seqs", "4", "--max-model-len", "256"])
    try:
        res = _bench(port, tmp_path, "--num-prompts", "6", "--random-input-len", "12",
                     "--random-output-len", "5", "--max-concurrency", "3", "--ignore-eos", "--seed", "3",
                     "--metadata", "note=ci", "--tokenizer", str(default_model_path()))
        _check_consistent(res, 6, 12, 5)
        assert res["model_id"] == "tiny-qwen3-moe" and res["max_concurrency"] == 3 and res["note"] == "ci"
        # the vocabulary came from the --tokenizer folder's config.json (576 ids), not the 256
        # fallback (the served name is not a folder)
        assert res["random_vocab_size"] == 576
        # Poisson arrivals at a finite rate
        res = _bench(port, tmp_path, "--num-prompts", "4", "--random-input-len", "8", "--random-output-len", "3",
                     "--request-rate", "50", "--ignore-eos")
        _check_consistent(res, 4, 8, 3)
        assert res["request_rate"] == 50 and res["max_concurrency"] is None
    finally:
        _stop(proc)


def test_bench_serve_against_dummy_weights_of_any_vocabulary(tmp_path):
    """A scaled-down copy of the FP8 config served with --load-format dummy and the IdTokenizer:
    token ids up to the config's vocabulary are accepted, and tokens stream as chunks: one per
    token while the front keeps up (output_len - 1 gaps), fewer when it merged steps it had not
    sent yet (a loaded CI machine), never more."""
    model = tmp_path / "model"
    model.mkdir()
    cfg = json.loads((ROOT / "configs" / "Qwen3-30B-A3B-FP8" / "config.json").read_text())
    cfg.update(num_hidden_layers=2, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
               num_attention_heads=2, num_key_value_heads=1, head_dim=64, vocab_size=5000)
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "id_tokenizer.json").write_text("{}")
    proc, port = _serve([str(model), "--load-format", "dummy", "--dummy-router-skew", "--max-num-seqs", "4",
                         "--max-model-len", "128"])
    try:
        out = tmp_path / "out"
        res = _bench(port, out, "--num-prompts", "4", "--random-input-len", "10", "--random-output-len", "6",
                     "--ignore-eos", "--tokenizer", str(model))
        _check_consistent(res, 4, 10, 6)
        assert res["random_vocab_size"] == 5000
        assert all(len(itl) <= 5 for itl in res["itls"]) and sum(len(itl) for itl in res["itls"]) >= 4
        # ids near the top of the vocabulary are valid prompts; one past it is refused by the server
        body = {"prompt": [4999, 0], "max_tokens": 2, "temperature": 0}
        assert httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).status_code == 200
        body["prompt"] = [5000]
        assert httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).status_code == 400
    finally:
        _stop(proc)


def test_bench_serve_reports_a_dead_server(tmp_path):
    r = subprocess.run([sys.executable, "-m", "eplb.cli", "bench", "serve", "--port", str(_free_port()),
                        "--model", "m", "--num-prompts", "2"], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("eplb bench serve: error: ")


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("argv, needle", [
    (["--num-prompts", "0"], "--num-prompts must be >= 1"),
    (["--random-range-ratio", "1.5"], "--random-range-ratio must be in [0, 1)"),
    (["--max-concurrency", "0"], "--max-concurrency must be >= 1"),
    (["--request-rate", "0"], "--request-rate must be > 0"),
    (["--percentile-metrics", "ttft,foo"], "--percentile-metrics: unknown ['foo']"),
    (["--metadata", "novalue"], "--metadata entries must be KEY=VALUE"),
])
def test_bad_flags_name_the_flag(argv, needle, capsys):
    from eplb.benchmarks.serve import main

    assert main(_args(*argv)) == 2
    assert needle in capsys.readouterr().err


def test_random_dataset_lengths_and_ids():
    reqs = sample_random_requests(200, 100, 20, 0.5, 4, vocab=300, seed=1)
    assert len(reqs) == 200
    assert all(54 <= len(p) <= 154 and 10 <= m <= 30 for p, m in reqs)  # prefix 4 + [50, 150]
    assert all(0 <= t < 300 for p, _ in reqs for t in p)
    assert len({tuple(p[:4]) for p, _ in reqs}) == 1  # the shared prefix
    assert len({len(p) for p, _ in reqs}) > 10
    fixed = sample_random_requests(5, 7, 3, 0.0, 0, vocab=10, seed=0)
    assert [(len(p), m) for p, m in fixed] == [(7, 3)] * 5
    assert fixed == sample_random_requests(5, 7, 3, 0.0, 0, vocab=10, seed=0)


def test_metrics_from_known_timings():
    rs = [RequestResult(prompt_len=10, output_len=5, success=True, ttft=0.1, latency=0.5, itl=[0.1] * 4),
          RequestResult(prompt_len=10, output_len=3, success=True, ttft=0.3, latency=0.5, itl=[0.1, 0.1]),
          RequestResult(prompt_len=10, error="HTTP 500")]
    m = compute_metrics(rs, 2.0, [50.0, 99.0])
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (2, 1, 20, 8)
    assert m["output_throughput"] == 4.0 and m["request_throughput"] == 1.0 and m["total_token_throughput"] == 14.0
    assert m["mean_ttft_ms"] == pytest.approx(200.0) and m["mean_tpot_ms"] == pytest.approx(100.0)
    assert m["mean_itl_ms"] == pytest.approx(100.0) and m["p99_e2el_ms"] == pytest.approx(500.0)
