"""One async EPLB rebalance on one rank: a state machine the rank's MAIN thread drives at step
boundaries.

Phases (each transition is decided from the reduced per-step packet, so every rank makes it at
the same boundary):

1. ``policy``: rank 0 runs the policy on a CPU thread (``PolicyJob``: pure CPU work, no
   torch.distributed, no CUDA) while serving goes on. Rank 0 reports the job's state in the
   packet; at the boundary where the reduced packet says "done", every rank's main thread
   receives the new ``phy2log`` by a broadcast over the EP group (``EplbState``) and plans.
2. ``transfer``: at each boundary the main thread posts the next moving layer's P2P ops
   (``post_next``; at most ``max_staged_layers`` posted and not committed) on the transfer group
   (and, on CUDA, a side stream) and polls the posted layers without blocking
   (``ready_count``). A layer every rank reported done is committed by every rank at the same
   boundary (``EplbState``).

No thread but the main one enqueues a collective or P2P op, and each enqueue is a function of
the reduced packet and of counters that advance identically everywhere, so every rank enqueues
the same operations in the same order (docs/runtime.md has the argument).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from eplb.balancer.placement import Placement
from eplb.controller.faults import Fault
from eplb.parallel.transfer import PendingLayer, start_layer_transfer

log = logging.getLogger("eplb.controller")

POLICY_PENDING, POLICY_DONE, POLICY_FAILED = 0, 1, 2


class PolicyJob:
    """Rank 0's policy computation on a daemon thread (CPU only)."""

    def __init__(self, compute: Callable[[], Placement], fault: Fault | None) -> None:
        self._compute = compute
        self._fault = fault if fault is not None and fault.phase == "policy" else None
        self._cancelled = threading.Event()
        self.result: Placement | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self._done = threading.Event()
        threading.Thread(target=self._run, name="eplb-policy", daemon=True).start()

    def _run(self) -> None:
        t0 = time.monotonic()
        try:
            if self._fault is not None and self._fault.mode == "stall":
                self._cancelled.wait()  # never finishes: only the timeout ends the rebalance
                return
            if self._fault is not None and self._fault.mode == "raise":
                raise self._fault.error("the policy raises on rank 0")
            self.result = self._compute()
        except BaseException as exc:  # noqa: BLE001 - reported through the packet
            log.warning("EPLB policy failed: %s", exc)
            self.error = exc
        self.seconds = time.monotonic() - t0
        self._done.set()

    def state(self) -> int:
        if not self._done.is_set():
            return POLICY_PENDING
        return POLICY_FAILED if self.error is not None or self.result is None else POLICY_DONE

    def cancel(self) -> None:
        self._cancelled.set()


class AsyncRebalance:
    """See the module docstring. ``policy`` is rank 0's ``PolicyJob`` (None elsewhere)."""

    def __init__(self, *, generation: int, old: Placement, policy: PolicyJob | None,
                 max_staged_layers: int, fault: Fault | None) -> None:
        self.generation = generation
        self.old = old
        self.policy = policy
        self.max_staged_layers = max_staged_layers
        self.fault = fault if fault is not None and fault.phase == "transfer" else None
        self.phase = "policy"
        self.new: Placement | None = None
        self.transfers: list[list] = []
        self.moving: list[int] = []  # layers with at least one transfer, in commit order
        self.posted: list[PendingLayer] = []  # index i = moving[i]; None once committed
        self.committed = 0
        self.started = time.monotonic()
        # the timeout runs from the last time the rebalance moved forward (planned, a layer
        # committed): a long but steadily paced rebalance never times out
        self.last_progress = self.started
        self.error: BaseException | None = None
        self.steps_in_flight = 0
        self.copies = 0

    # ----- packet ----------------------------------------------------------------------------
    def policy_state(self) -> int:
        return self.policy.state() if self.policy is not None else POLICY_PENDING

    def ready_count(self) -> int:
        """Layers committed plus the posted ones done here, counted in commit order."""
        n = self.committed
        for pending in self.posted[self.committed:]:
            if self.fault is not None and self.fault.mode == "stall":
                break  # injected: this rank never reports its first layer done
            try:
                if not pending.done():
                    break
            except BaseException as exc:  # noqa: BLE001 - a failed transfer: flag it
                self.error = exc
                break
            n += 1
        return n

    def failed_here(self, timeout_s: float) -> str | None:
        """Why this rank wants the rebalance abandoned, or None."""
        if self.error is not None:
            return f"{type(self.error).__name__}: {self.error}"
        idle = time.monotonic() - self.last_progress
        if idle > timeout_s:
            return f"no progress for {idle:.1f}s in phase {self.phase} (transfer_timeout_s)"
        return None

    # ----- boundary actions (main thread, same order on every rank) --------------------------
    def set_plan(self, new: Placement, transfers: list[list]) -> None:
        self.new = new
        self.transfers = transfers
        self.moving = [layer for layer, t in enumerate(transfers) if t]
        self.phase = "transfer"
        self.last_progress = time.monotonic()

    def post_next(self, rank: int, tensors_of: Callable[[int], dict[str, torch.Tensor]],
                  slots_per_rank: int, group: dist.ProcessGroup | None,
                  stream: torch.cuda.Stream | None) -> None:
        """Post the next moving layer if the staging window allows (a pure function of
        ``committed`` and ``len(posted)``, which are the same on every rank)."""
        if len(self.posted) >= len(self.moving):
            return
        if len(self.posted) - self.committed >= self.max_staged_layers:
            return
        index = len(self.posted)
        layer = self.moving[index]
        if self.fault is not None and self.fault.mode == "raise" and index == 0:
            self.error = self.fault.error(f"this rank fails to post layer {layer}")
            self.posted.append(_NeverDone(layer))
            return
        self.posted.append(start_layer_transfer(
            layer, self.transfers[layer], rank, tensors_of(layer), slots_per_rank, group, stream))

    def count_step(self) -> None:
        """One more forward step ran while this rebalance was in flight."""
        self.steps_in_flight += 1

    def take(self) -> tuple[int, PendingLayer]:
        """The next layer to commit (every rank reported it done); frees its staging slot and
        counts its copies."""
        index = self.committed
        pending = self.posted[index]
        self.posted[index] = None  # type: ignore[call-overload]
        self.committed += 1
        self.last_progress = time.monotonic()
        layer = self.moving[index]
        self.copies += len(self.transfers[layer])
        return layer, pending

    @property
    def complete(self) -> bool:
        return self.phase == "transfer" and self.committed == len(self.moving)

    def unfinished(self) -> list[PendingLayer]:
        """Posted layers not committed (on abandon or shutdown the caller drains them)."""
        return [p for p in self.posted[self.committed:] if p is not None]

    def cancel(self) -> None:
        if self.policy is not None:
            self.policy.cancel()


class _NeverDone:
    """Stands in for a layer a rank failed to post (it never completes)."""

    def __init__(self, layer: int) -> None:
        self.layer_idx = layer

    def done(self) -> bool:
        return False

    def wait(self, timeout_s: float | None = None) -> None:
        return None
