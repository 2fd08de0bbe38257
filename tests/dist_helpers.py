"""Test-only helpers for multi-process tests: spawn gloo ranks and collect what they report, and
merge the per-rank token results of ``eplb.runtime.dp_offline.run_scenarios``."""

from __future__ import annotations

import queue
import time
from typing import Any, Callable

import torch.multiprocessing as mp

from eplb.parallel.groups import find_free_port


def spawn_ranks(worker: Callable[..., None], world: int, timeout_s: float) -> list[Any]:
    """Run ``worker(rank, world, port, results_queue)`` in ``world`` spawned processes and return
    what each put on the queue (one item per rank). Fails fast, naming the exit codes, when a
    rank dies (gloo aborts on a size mismatch) and when ``timeout_s`` passes."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = find_free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, q), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(results) < world:
        try:
            results.append(q.get(timeout=1.0))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not dead and time.monotonic() < deadline, f"ranks died or hung: {dead}"
    for p in procs:
        p.join(30)
    return results


def merged_tokens(per_rank: list[dict]) -> dict[int, list[int]]:
    """Token ids of every request over the ranks; a request must finish on one rank only."""
    tokens: dict[int, list[int]] = {}
    for r in per_rank:
        assert not set(tokens) & set(r["tokens"]), "a request finished on two ranks"
        tokens.update(r["tokens"])
    return tokens
