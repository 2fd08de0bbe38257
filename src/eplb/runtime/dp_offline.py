"""Offline DP+EP runs: a fixed list of requests per rank, no front process in between.

Tests and benchmarks use it to run several configurations (backend, EPLB on/off/sync/async, fault
injection) in ONE group of spawned rank processes, paying process start-up and torch import once.
Each scenario builds a fresh ``RankWorker`` (fresh engine, weights from the checkpoint, default
placement) on the already-joined process group, hands every rank its requests up front and runs
the real rank loop until no rank has work and no rebalance is in flight.

``run_scenarios`` returns, per scenario, per rank: ``{"tokens": {index: token_ids},
"finish": {index: reason}, "stats": RankWorker.stats(), "step_log": [(seconds, phase)] | None,
"modes": [(kind, own decode rows, padded size or 0)] per forward (``RankWorker.mode_log``),
"verifier_caught": bool | None}``.
"""

from __future__ import annotations

import logging
import os
import queue
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.multiprocessing as mp

from eplb.config import EPLBConfig, ParallelConfig
from eplb.parallel.groups import find_free_port
from eplb.runtime.dp_worker import RankSpec, RankWorker, exit_with_parent
from eplb.runtime.messages import AddRequest, RankOutputs, RequestRejected
from eplb.runtime.output_stream import DeltaDecoder


@dataclass
class Scenario:
    name: str
    backend: str = "allgather_reducescatter"
    eplb: dict[str, Any] | None = None  # EPLBConfig keys; None = EPLB off
    # (prompt_token_ids, SamplingParams) of every request; request i runs on rank assign[i]
    requests: list[tuple[list[int], Any]] = field(default_factory=list)
    assign: list[int] | None = None  # default: i % world_size
    record_steps: bool = False
    engine: dict[str, Any] | None = None  # overrides of run_scenarios' engine_kwargs
    # after the run, corrupt one local expert row and check that the commit verifier sees it
    check_verifier: bool = False
    # before the requests, every rank runs the startup warm-up forwards
    # (EngineCore.warm_eager_kernels), which warm_up runs only where graphs are captured (CUDA)
    warm: bool = False


class _Collector:
    """Stands in for the front's output queue: keeps finished outputs."""

    def __init__(self) -> None:
        self.final: dict[str, Any] = {}
        self.other: list[tuple] = []
        self._outputs = DeltaDecoder()

    def expect(self, request_id: str, prompt_token_ids: list[int]) -> None:
        self._outputs.start(request_id, prompt_token_ids)

    def put(self, msg: object) -> None:
        if isinstance(msg, RankOutputs):
            for delta in msg.outputs:
                out = self._outputs.apply(delta)
                if out is not None and out.finished:
                    self.final[out.request_id] = out
        else:
            self.other.append(msg)


def _rank_process(rank: int, world_size: int, port: int, model_path: str,
                  engine_kwargs: dict, scenarios: list[Scenario], results, num_threads: int
                  ) -> None:
    exit_with_parent(os.getppid())  # a killed test or benchmark leaves no ranks behind
    torch.set_num_threads(num_threads)
    logging.basicConfig(level=logging.WARNING,
                        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    worker = None
    try:
        for index, sc in enumerate(scenarios):
            spec = RankSpec(
                rank=rank, world_size=world_size, local_rank=rank, model_path=model_path,
                engine_kwargs={**engine_kwargs, **(sc.engine or {})},
                parallel=ParallelConfig(data_parallel_size=world_size,
                                        enable_expert_parallel=True, all2all_backend=sc.backend),
                eplb=EPLBConfig(**sc.eplb) if sc.eplb is not None else None,
                record_trace=None, address="127.0.0.1", port=port, parent_pid=os.getppid(),
            )
            collector = _Collector()
            worker = RankWorker(spec, collector)
            if sc.warm:
                worker.engine.warm_eager_kernels()
            worker.record(steps=sc.record_steps, modes=True)
            in_q: queue.Queue = queue.Queue()
            assign = sc.assign or [i % world_size for i in range(len(sc.requests))]
            for i, ((prompt, params), r) in enumerate(zip(sc.requests, assign)):
                if r == rank:
                    collector.expect(f"req-{i}", prompt)
                    in_q.put(AddRequest(f"req-{i}", prompt, params, stream_interval=None))  # finals only
            worker.loop(in_q, exit_when_idle=True)
            stats = worker.stats()
            caught = _verifier_catches_corruption(worker) if sc.check_verifier else None
            mine = {int(k.split("-")[1]): v for k, v in collector.final.items()}
            results.put((index, rank, {
                "tokens": {i: o.token_ids for i, o in mine.items()},
                "finish": {i: o.finish_reason for i, o in mine.items()},
                "stats": stats,
                "step_log": worker.step_log,
                "modes": worker.mode_log,
                "verifier_caught": caught,
                "rejected": [m for m in collector.other if isinstance(m, RequestRejected)],
            }))
            worker.close(leave_group=index == len(scenarios) - 1)
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((-1, rank, traceback.format_exc()))
        results.close()
        results.join_thread()  # flush the traceback to the parent before the hard exit
        os._exit(1)


def _verifier_catches_corruption(worker: RankWorker) -> bool:
    """Flip one weight of local slot 0 of layer 0; the verifier must count a mismatch."""
    before = worker.state.stats()["verify_mismatches"]
    w = next(iter(worker.layers[0].expert_tensors().values()))
    saved = w[0].clone()
    w[0].view(torch.uint8).view(-1)[0] ^= 1  # flip one bit: any dtype, float8 included
    worker.state.verify_layer(0)
    w[0].copy_(saved)
    return worker.state.stats()["verify_mismatches"] == before + 1


def run_scenarios(
    model_path: str,
    world_size: int,
    scenarios: list[Scenario],
    engine_kwargs: dict,
    *,
    timeout_s: float = 300.0,
    num_threads: int = 1,
) -> list[list[dict]]:
    """Run ``scenarios`` one after another on ``world_size`` spawned ranks (gloo on CPU)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = find_free_port()
    procs = [
        ctx.Process(target=_rank_process, args=(r, world_size, port, model_path, engine_kwargs,
                                                scenarios, results, num_threads), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: list[list[dict | None]] = [[None] * world_size for _ in scenarios]
    want = len(scenarios) * world_size
    got = 0
    deadline = time.monotonic() + timeout_s
    try:
        while got < want:
            try:
                index, rank, payload = results.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"DP scenarios not done after {timeout_s:.0f}s") from None
                if any(not p.is_alive() for p in procs) and results.empty():
                    time.sleep(1.0)
                    if results.empty():
                        raise RuntimeError("a rank process died") from None
                continue
            if index < 0:
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            out[index][rank] = payload
            got += 1
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    return out  # type: ignore[return-value]
