"""A rank that stops making progress is never silent.

- A rank whose main loop hangs inside an async rebalance (``debug_fail_mode: freeze``, in each
  phase: while rank 0 computes the policy, and when the transfers are posted) breaks the engine
  within the stall timeout: the open request fails with an error that names the ranks and
  their operations, the client turns unhealthy, new requests are refused at once, the
  ``on_fatal`` callbacks run and shutdown does not wait for the hung ranks.
- The same for a rank frozen from outside (SIGSTOP), with EPLB off.
- ``eplb serve``: /health turns 503, the request in flight gets a JSON error, the process exits 1.

Rebalances that can be abandoned (a policy or transfer that raises or never finishes) are
covered in tests/test_parallel_eplb.py: they keep the old placement and serving goes on.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from eplb.config import EPLBConfig, ParallelConfig
from eplb.engine import SamplingParams
from eplb.model.tiny import make_tiny_checkpoint
from eplb.parallel.groups import find_free_port
from eplb.runtime.dp_client import DPEngineClient

ENGINE = {"dtype": "float32", "max_model_len": 256, "max_num_seqs": 8}
STALL_S = 3.0  # far above a healthy beat (100 ms) even on a loaded 2-core machine
LONG = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_qwen3_moe_stalls"))
    make_tiny_checkpoint(path, "qwen3_moe", seed=7)
    return path


def _client(model: str, eplb: EPLBConfig | None) -> DPEngineClient:
    client = DPEngineClient(model, ENGINE, ParallelConfig(data_parallel_size=2,
                                                          enable_expert_parallel=True),
                            eplb, num_threads=1, stall_timeout_s=STALL_S)
    client.start()
    return client


async def _run(client: DPEngineClient, rid: str) -> list:
    return [o async for o in client.generate(rid, [5, 6, 7, 8], LONG)]


def _assert_broken(client: DPEngineClient, fatal: list[str], started: float) -> None:
    assert not client.is_healthy()
    deadline = time.monotonic() + 2.0  # they run right after the open streams were failed
    while not fatal and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert len(fatal) == 1, fatal  # the callbacks ran exactly once
    assert time.monotonic() - started < STALL_S + 15, "the stall was noticed too late"
    # a new request is refused at once, not queued behind the hung ranks
    t0 = time.monotonic()
    with pytest.raises(RuntimeError):
        asyncio.run(_run(client, "after"))
    assert time.monotonic() - t0 < 1.0
    t0 = time.monotonic()
    client.shutdown()
    assert time.monotonic() - t0 < 8.0, "shutdown waited for hung ranks"
    assert all(not p.is_alive() for p in client._procs.values())


@pytest.mark.parametrize("phase", ["policy", "transfer"])
def test_a_rank_hung_inside_an_async_rebalance_breaks_the_engine(model, phase):
    # rank 0 computes the policy, so it is the one that hangs in that phase
    eplb = EPLBConfig(window_size=2, step_interval=3, use_async=True, debug_fail_mode="freeze",
                      debug_fail_rank=0 if phase == "policy" else 1, debug_fail_phase=phase)
    client = _client(model, eplb)
    fatal: list[str] = []
    client.on_fatal(fatal.append)
    started = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        asyncio.run(_run(client, "r0"))
    message = str(err.value)
    assert "hung" in message and "rank 0" in message and "rank 1" in message, message
    assert client.error is not None and "no progress" in client.error
    _assert_broken(client, fatal, started)


def test_a_rank_frozen_from_outside_breaks_the_engine(model):
    client = _client(model, None)
    fatal: list[str] = []
    client.on_fatal(fatal.append)
    # a first request proves the job serves before the freeze
    assert asyncio.run(_run(client, "warm"))[-1].finished
    pid = client.rank_info[1]["pid"]
    started = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        while client.is_healthy() and time.monotonic() - started < STALL_S + 15:
            time.sleep(0.1)
        assert "rank 1" in (client.error or ""), client.error
        _assert_broken(client, fatal, started)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def test_serve_answers_503_and_exits_1_when_a_rank_hangs(model, tmp_path):
    port = find_free_port()
    cfg = {"window_size": 2, "step_interval": 3, "use_async": True, "debug_fail_rank": 1,
           "debug_fail_mode": "freeze"}
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "eplb", "serve", model, "--port", str(port), "--device", "cpu",
         "--data-parallel-size", "2", "--enable-expert-parallel", "--enable-eplb",
         "--eplb-config", json.dumps(cfg), "--rank-stall-timeout", str(STALL_S),
         "--max-model-len", "256"],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 120
        while _get(f"http://127.0.0.1:{port}/health") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.5)
        body = json.dumps({"prompt": [5, 6, 7, 8], "max_tokens": 200, "temperature": 0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        assert err.value.code == 503
        error = json.loads(err.value.read())["error"]
        assert "hung" in error["message"], error
        assert proc.wait(60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "no progress" in text and "rank 1" in text
    assert "Traceback" not in text




def test_heartbeat_names_the_most_specific_operation():
    import multiprocessing

    from eplb.runtime.heartbeat import Heartbeats

    beats = Heartbeats(multiprocessing.get_context("spawn"), [3])
    writer = beats.writer(3)
    for operation, reported in [("eplb: commit a layer", "eplb: commit a layer"),
                                ("eplb: sync transfer of layer 7", "eplb: sync transfer"),
                                ("eplb", "eplb"), ("forward", "forward")]:
        writer.beat(operation, step=5)
        (stall,) = beats.snapshot()
        assert (stall.rank, stall.operation, stall.step) == (3, reported, 5)
        assert stall.seconds < 5
