"""The background half of an async EPLB rebalance on one rank.

A thread, on its own process group (and its own CUDA stream on GPU), computes the new placement
(rank 0 computes, every rank receives it), plans the transfers and stages the moving layers one
by one into at most ``max_staged_layers`` staging buffers, while the main loop keeps serving with
the old placement. The main loop reads ``ready_count()`` into its per-step all-reduce, commits a
layer once every rank has staged it, and only then hands its staging slot back (``take``), so a
staging buffer is never reused before its rows were copied out.

The thread never touches the live maps or weights except to read the rows it sends (which stay
valid until the layer is committed on every rank, i.e. after every rank's sends are done).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.distributed as dist

from eplb.parallel.transfer import StagedLayer, stage_layer

log = logging.getLogger(__name__)


class InjectedTransferError(RuntimeError):
    """Raised on purpose by ``debug_fail_rank`` to test that a failed transfer is survivable."""


class AsyncRebalance:
    """One async rebalance on one rank (see the module docstring).

    ``compute_new(group)`` returns the new placement, identical on every rank (it runs the
    policy on rank 0 and broadcasts over ``group``); ``plan_fn(old, new)`` gives per-layer
    transfers; ``tensors_of(layer)`` the live ``expert_tensors()`` of a layer.
    """

    def __init__(
        self,
        *,
        generation: int,
        rank: int,
        slots_per_rank: int,
        group: dist.ProcessGroup | None,
        old,
        compute_new: Callable,
        plan_fn: Callable,
        tensors_of: Callable[[int], dict[str, torch.Tensor]],
        max_staged_layers: int,
        delay_per_layer_s: float = 0.0,
        fail_at_layer: int | None = None,
        fail_mode: str = "raise",
        device: torch.device | None = None,
    ) -> None:
        self.generation = generation
        self.rank = rank
        self.slots_per_rank = slots_per_rank
        self.group = group
        self.old = old
        self.compute_new = compute_new
        self.plan_fn = plan_fn
        self.tensors_of = tensors_of
        self.delay_per_layer_s = delay_per_layer_s
        self.fail_at_layer = fail_at_layer
        self.fail_mode = fail_mode
        self.device = device
        self.new = None
        self.transfers: list[list] = []
        self.moving: list[int] = []  # layer indices with at least one transfer, in commit order
        self.planned = False
        self.error: BaseException | None = None
        self.policy_s = 0.0
        self.started = time.monotonic()
        # last time this rebalance moved forward here (plan known, a layer staged or committed);
        # the timeout runs from it, so a long but steadily paced rebalance never times out
        self.last_progress = self.started
        self._staged: dict[int, StagedLayer] = {}
        self._n_staged = 0
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(max_staged_layers)
        # pacing: one layer per step boundary, so each forward step overlaps at most one layer's
        # transfer instead of the whole rebalance landing on a few steps (CPU ranks share cores)
        self._tick = threading.Event()
        self._cancelled = threading.Event()
        # GPU: the worker's stream must see every write the main stream made before the start
        # (e.g. the previous rebalance's last commit), so it waits on this event first
        self._start_event = None
        if device is not None and device.type == "cuda":
            self._start_event = torch.cuda.Event()
            self._start_event.record(torch.cuda.current_stream(device))
        self._thread = threading.Thread(
            target=self._run, name=f"eplb-async-{generation}", daemon=True
        )

    # ----- main-thread API -------------------------------------------------------------------
    def start(self) -> "AsyncRebalance":
        self._thread.start()
        return self

    def tick(self) -> None:
        """Called by the main loop at every step boundary: lets the thread stage one more layer."""
        self._tick.set()

    def ready_count(self) -> int:
        """0 until the plan is known, then 1 + the number of layers staged (in ``moving`` order)."""
        with self._lock:
            return (1 + self._n_staged) if self.planned else 0

    def failed(self) -> bool:
        return self.error is not None

    def take(self, index: int) -> StagedLayer:
        """The staged rows of ``moving[index]``; frees its staging slot for the next layer."""
        with self._lock:
            staged = self._staged.pop(index)
            self.last_progress = time.monotonic()
        self._slots.release()
        return staged

    def cancel(self) -> None:
        """Abandon: the thread stops at its next check (a P2P op in flight ends by its timeout)."""
        self._cancelled.set()
        with self._lock:
            self._staged.clear()
        self._slots.release()
        self._tick.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ----- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        stream = None
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            stream = torch.cuda.Stream(self.device)
            stream.wait_event(self._start_event)
        try:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                t0 = time.monotonic()
                new = self.compute_new(self.group)
                self.policy_s = time.monotonic() - t0
                transfers = self.plan_fn(self.old, new)
                with self._lock:
                    self.new = new
                    self.transfers = transfers
                    self.moving = [layer for layer, t in enumerate(transfers) if t]
                    self.planned = True
                    self.last_progress = time.monotonic()
                for index, layer in enumerate(self.moving):
                    while not self._slots.acquire(timeout=0.05):
                        if self._cancelled.is_set():
                            return
                    while not self._tick.wait(timeout=0.05):
                        if self._cancelled.is_set():
                            return
                    self._tick.clear()
                    if self._cancelled.is_set():
                        return
                    if self.fail_at_layer is not None and index == self.fail_at_layer:
                        if self.fail_mode == "stall":  # never report ready; only a timeout ends it
                            while not self._cancelled.wait(0.05):
                                pass
                            return
                        raise InjectedTransferError(
                            f"debug_fail_rank: rank {self.rank} fails its transfer of layer {layer}"
                        )
                    staged = stage_layer(
                        layer, transfers[layer], self.rank, self.tensors_of(layer),
                        self.slots_per_rank, self.group,
                    )
                    if stream is not None:
                        stream.synchronize()  # rows are complete before the main loop copies them
                    if self.delay_per_layer_s:
                        time.sleep(self.delay_per_layer_s)
                    with self._lock:
                        if self._cancelled.is_set():
                            return
                        self._staged[index] = staged
                        self._n_staged += 1
                        self.last_progress = time.monotonic()
        except BaseException as exc:  # noqa: BLE001 - reported to every rank via the all-reduce
            if not self._cancelled.is_set():
                log.warning("EPLB async rebalance %d failed on rank %d: %s",
                            self.generation, self.rank, exc)
            self.error = exc

