"""DPEngineClient end to end: spawned ranks, async streaming, routing, stats, abort, trace,
shutdown, and no orphan rank processes when the front dies."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from eplb.cli import main as cli_main
from eplb.config import EPLBConfig, ParallelConfig
from eplb.engine import LLM, SamplingParams
from eplb.model.tiny import make_tiny_checkpoint
from eplb.parallel.all2all import make_dispatcher
from eplb.runtime.dp_client import DPEngineClient

torch.set_num_threads(1)
ENGINE = {"dtype": "float32", "max_model_len": 128, "max_num_seqs": 8}
TOP_K = 2


def _requests():
    g = torch.Generator().manual_seed(11)
    return [(torch.randint(3, 128, (4 + 3 * i,), generator=g).tolist(),
             SamplingParams(max_tokens=5 + 2 * i, temperature=0, ignore_eos=True))
            for i in range(6)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_qwen3_moe_client"))
    make_tiny_checkpoint(path, "qwen3_moe", seed=5)
    return path


async def _collect(client, rid, prompt, params):
    outs = [o async for o in client.generate(rid, prompt, params)]
    return outs


@pytest.fixture(scope="module")
def served(model, tmp_path_factory):
    """One client (2 ranks, EP, async EPLB) that serves ``_requests()`` concurrently; what the
    tests check is recorded here, so no test depends on another having run first."""
    trace = str(tmp_path_factory.mktemp("trace") / "loads.npz")
    eplb = EPLBConfig(window_size=4, step_interval=3, num_redundant_experts=2, use_async=True,
                      debug_verify_commits=True)
    client = DPEngineClient(model, ENGINE, ParallelConfig(data_parallel_size=2,
                                                          enable_expert_parallel=True),
                            eplb, record_trace=trace, num_threads=1)
    client.start()
    reqs = _requests()

    async def run():
        return await asyncio.gather(*[_collect(client, f"a{i}", p, s)
                                      for i, (p, s) in enumerate(reqs)])

    try:
        streams = asyncio.run(run())
        stats = client.stats()
    except BaseException:
        client.shutdown()
        raise
    state = {"client": client, "trace": trace, "requests": reqs, "streams": streams,
             "stats": stats, "tokens_fed": sum(len(p) + s.max_tokens - 1 for p, s in reqs)}
    yield state
    client.shutdown()


def test_streams_equal_single_process_and_spread_over_ranks(model, served):
    reqs, streams, stats = served["requests"], served["streams"], served["stats"]
    want = [o.token_ids for o in LLM(model, **ENGINE).generate([p for p, _ in reqs],
                                                                [s for _, s in reqs])]
    for outs, tokens in zip(streams, want):
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert outs[-1].token_ids == tokens
        # streamed: each output strictly extends the one before (one per step, or the newest
        # of several when the consumer fell behind: eplb.runtime.mailbox)
        assert len(outs[0].token_ids) >= 1 and not any(o.finished for o in outs[:-1])
        for a, b in zip(outs, outs[1:]):
            assert len(b.token_ids) > len(a.token_ids) and b.token_ids[:len(a.token_ids)] == a.token_ids
    assert stats["healthy"] and len(stats["ranks"]) == 2
    assert all(r["requests_added"] >= 2 for r in stats["ranks"])  # least-loaded routing spreads
    assert stats["requests_added"] == sum(r["requests_added"] for r in stats["ranks"])
    assert stats["rebalances"] >= 1 and stats["verify_mismatches"] == 0
    for key in ("rebalances_failed", "copies_moved", "bytes_moved", "last_rebalance_s",
                "mean_rebalance_s", "balancedness"):
        assert key in stats
    assert stats["running"] == 0 and stats["waiting"] == 0


def test_shutdown_is_idempotent_and_writes_the_trace(served):
    client = served["client"]
    procs = list(client._procs.values())
    # a terminal's Ctrl-C reaches every process of the group: ranks leave shutdown to the front
    for p in procs:
        os.kill(p.pid, signal.SIGINT)
    time.sleep(0.5)
    assert client.is_healthy() and all(p.is_alive() for p in procs)
    client.shutdown()
    client.shutdown()
    assert not client.is_healthy()
    assert all(not p.is_alive() for p in procs)
    assert not os.path.exists(served["trace"] + ".partial")
    with np.load(served["trace"]) as f:
        load = f["load"]
    assert load.dtype == np.int64 and load.ndim == 3 and load.shape[1:] == (2, 8)
    per_step = load.sum(axis=2)  # [steps, L]: every layer sees every real token TOP_K times
    assert (per_step[:, 0] == per_step[:, 1]).all()
    # exactly the real tokens fed (prompt + generated but the last): padding and dummy steps
    # never count as load
    assert per_step[:, 0].sum() == TOP_K * served["tokens_fed"]
    # and real traffic replays through the simulator
    assert cli_main(["simulate", "--trace", served["trace"], "--num-ranks", "2",
                     "--num-redundant", "2", "--policy", "deepseek", "--window-size", "4",
                     "--step-interval", "3"]) == 0


@pytest.fixture(scope="module")
def plain(model):
    """A second client: EP with the naive backend, EPLB off."""
    client = DPEngineClient(model, ENGINE, ParallelConfig(data_parallel_size=2,
                                                          enable_expert_parallel=True,
                                                          all2all_backend="naive"),
                            None, num_threads=1)
    client.start()
    yield client
    client.shutdown()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_idle_ranks_sleep_instead_of_spinning(plain):
    pids = [p.pid for p in plain._procs.values()]
    time.sleep(0.5)  # let any tail of earlier work finish
    before = [_cpu_seconds(p) for p in pids]
    time.sleep(2.0)
    used = [_cpu_seconds(p) - b for p, b in zip(pids, before)]
    assert all(u < 0.5 for u in used), used  # a spinning rank would burn ~2 s of CPU here


def test_rejected_and_aborted_requests(plain):
    client = plain

    async def run():
        with pytest.raises(ValueError, match="max_model_len"):
            await _collect(client, "too-long", [5] * 200, SamplingParams(max_tokens=4))
        got = []
        async for out in client.generate("long", [5, 6, 7], SamplingParams(max_tokens=100,
                                                                           temperature=0,
                                                                           ignore_eos=True)):
            got.append(out)
            if len(got) == 3:
                await client.abort("long")
        return got

    got = asyncio.run(run())
    assert 3 <= len(got) < 100 and not got[-1].finished
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the rank drops the request at its next step
        stats = client.stats()
        if stats["running"] == 0 and stats["waiting"] == 0:
            break
        time.sleep(0.1)
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert client.is_healthy()
    # and it still serves
    outs = asyncio.run(_collect(client, "after", [8, 9], SamplingParams(max_tokens=3)))
    assert outs[-1].finished and len(outs[-1].token_ids) == 3


def test_stream_interval_thins_outputs_on_the_rank(plain):
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)

    async def run():
        every = [o async for o in plain.generate("i1", [9, 8, 7], params)]
        fourth = [o async for o in plain.generate("i4", [9, 8, 7], params, stream_interval=4)]
        final = [o async for o in plain.generate("i0", [9, 8, 7], params, stream_interval=None)]
        with pytest.raises(ValueError, match="stream_interval"):
            [o async for o in plain.generate("bad", [9], params, stream_interval=0)]
        return every, fourth, final

    every, fourth, final = asyncio.run(run())
    assert every[-1].finished and len(every[-1].token_ids) == 14
    assert fourth[-1].token_ids == final[-1].token_ids == every[-1].token_ids
    # sent at 1, 5, 9, 13 tokens (a lagging consumer may skip some: it gets the newest), then 14
    assert [len(o.token_ids) % 4 for o in fourth[:-1]] == [1] * (len(fourth) - 1)
    assert len(final) == 1 and final[0].finished


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match="allgather_reducescatter, naive"):
        ParallelConfig(all2all_backend="deepep")
    with pytest.raises(ValueError, match="allgather_reducescatter, naive"):
        make_dispatcher("deepep", None, 2)
    with pytest.raises(ValueError, match="unknown eplb config key 'windowsize'"):
        EPLBConfig.from_json('{"windowsize": 3}')
    with pytest.raises(ValueError, match="enable_expert_parallel"):
        DPEngineClient("unused", ENGINE, ParallelConfig(data_parallel_size=2), EPLBConfig())


def test_slot_count_must_divide_over_ranks(model):
    with pytest.raises(ValueError, match="num_redundant_experts 1"):
        DPEngineClient(model, ENGINE, ParallelConfig(data_parallel_size=2,
                                                     enable_expert_parallel=True),
                       EPLBConfig(num_redundant_experts=1))


FRONT = textwrap.dedent("""
    import sys, time
    from eplb.config import ParallelConfig
    from eplb.runtime.dp_client import DPEngineClient
    if __name__ == "__main__":
        c = DPEngineClient(sys.argv[1], {"dtype": "float32", "max_model_len": 64},
                           ParallelConfig(data_parallel_size=2, enable_expert_parallel=True),
                           None, num_threads=1)
        c.start()
        print(" ".join(str(p.pid) for p in c._procs.values()), flush=True)
        time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by init) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_ranks_exit_when_the_front_is_killed(model, tmp_path):
    script = tmp_path / "front.py"
    script.write_text(FRONT)
    front = subprocess.Popen([sys.executable, str(script), model], stdout=subprocess.PIPE,
                             text=True)
    try:
        pids = [int(x) for x in front.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        front.send_signal(signal.SIGKILL)
        front.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        assert not any(_alive(p) for p in pids), "rank processes outlived their front"
    finally:
        if front.poll() is None:
            front.kill()


def test_rendezvous_explicit_torchrun_and_local():
    from eplb.parallel.groups import resolve_rendezvous

    explicit = ParallelConfig(data_parallel_size=8, data_parallel_size_local=4, node_rank=1,
                              data_parallel_address="10.0.0.1", data_parallel_rpc_port=29600)
    r = resolve_rendezvous(explicit, env={"MASTER_ADDR": "x", "MASTER_PORT": "1"})
    assert (r.address, r.port, r.node_rank, r.local_size) == ("10.0.0.1", 29600, 1, 4)
    # torchrun with one front per node: 2 nodes share 8 ranks, node 1 holds ranks 4..7
    env = {"MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "29500", "WORLD_SIZE": "2",
           "GROUP_RANK": "1"}
    r = resolve_rendezvous(ParallelConfig(data_parallel_size=8), env=env)
    assert (r.address, r.port, r.node_rank, r.local_size) == ("10.0.0.2", 29501, 1, 4)
    r = resolve_rendezvous(ParallelConfig(data_parallel_size=4), env={})
    assert (r.port, r.node_rank, r.local_size) == (0, 0, 4)
    with pytest.raises(ValueError, match="data_parallel_rpc_port"):
        resolve_rendezvous(ParallelConfig(data_parallel_size=4, data_parallel_size_local=2),
                           env={})
    with pytest.raises(ValueError, match="data_parallel_size_local"):
        resolve_rendezvous(ParallelConfig(data_parallel_size=4, data_parallel_size_local=3),
                           env={})
