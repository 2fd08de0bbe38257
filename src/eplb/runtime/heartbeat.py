"""Rank heartbeats: how the front notices a rank that stopped making progress.

Each rank's main loop writes, into shared memory, the time and the name of the operation it is
about to run (``HeartbeatWriter.beat``) before every blocking step: the per-step all-reduce, the
forward, each collective step of a rebalance. An idle rank still passes a boundary every
``IDLE_WAIT_S`` (100 ms), so a healthy rank's beat is never older than one step. The front reads
the beats (``Heartbeats.stalled``); a rank whose beat is older than the stall timeout is hung,
or waits on a peer that is (then every rank's beat ages, and the one whose operation is not a
collective is usually the culprit: the log lists all of them).

Times are ``time.monotonic()`` (system-wide on Linux, so comparable across processes of one
host); the front only compares its own node's ranks.
"""

from __future__ import annotations

import time
from collections.abc import MutableSequence
from dataclasses import dataclass
from multiprocessing.context import BaseContext

# A rank whose beat is older than this is hung (or waits on one that is). Far above any step of
# ours (CPU steps take milliseconds, a GPU step under 0.1 s, a sync rebalance beats per layer)
# and well under the process groups' 1800 s timeout.
DEFAULT_STALL_TIMEOUT_S = 10.0

OPERATIONS = (
    "starting", "idle wait", "step all-reduce", "eplb", "forward", "send outputs",
    "eplb: receive the new placement", "eplb: commit a layer", "eplb: post a layer's transfer",
    "eplb: sync policy", "eplb: sync transfer", "eplb: new transfer group", "stopping",
)


@dataclass
class Stall:
    rank: int
    seconds: float
    operation: str
    step: int

    def describe(self) -> str:
        return f"rank {self.rank}: no progress for {self.seconds:.1f}s in {self.operation!r} " \
               f"(step {self.step})"


class HeartbeatWriter:
    """A rank's end: picklable into the spawned rank process."""

    def __init__(self, times: MutableSequence[float], ops: MutableSequence[int], steps: MutableSequence[int],
                 index: int) -> None:
        self._times, self._ops, self._steps, self._index = times, ops, steps, index

    def beat(self, operation: str, step: int | None = None) -> None:
        # "eplb: sync transfer of layer 3" -> its family (the longest name it starts with), so
        # the code fits in an int
        code = max((i for i, name in enumerate(OPERATIONS) if operation.startswith(name)),
                   key=lambda i: len(OPERATIONS[i]), default=OPERATIONS.index("eplb"))
        self._ops[self._index] = code
        if step is not None:
            self._steps[self._index] = step
        self._times[self._index] = time.monotonic()


class Heartbeats:
    """The front's end, for its local ranks ``ranks`` (index i = ranks[i])."""

    def __init__(self, mp_context: BaseContext, ranks: list[int]) -> None:
        n = len(ranks)
        self.ranks = list(ranks)
        # lock-free: one writer per slot, and a torn read of a double is impossible on x86-64
        self._times = mp_context.Array("d", n, lock=False)
        self._ops = mp_context.Array("i", n, lock=False)
        self._steps = mp_context.Array("q", n, lock=False)
        now = time.monotonic()
        for i in range(n):
            self._times[i] = now

    def writer(self, rank: int) -> HeartbeatWriter:
        return HeartbeatWriter(self._times, self._ops, self._steps, self.ranks.index(rank))

    def snapshot(self) -> list[Stall]:
        now = time.monotonic()
        return [Stall(r, now - self._times[i], OPERATIONS[self._ops[i]], int(self._steps[i]))
                for i, r in enumerate(self.ranks)]

    def stalled(self, timeout_s: float) -> list[Stall]:
        """Every local rank's state if any of them is older than ``timeout_s``, else []."""
        snap = self.snapshot()
        return snap if any(s.seconds > timeout_s for s in snap) else []
