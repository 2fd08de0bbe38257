"""The global load every rank sees: the estimate the policy fits on (``load_estimator``: the
flat window or an exponentially weighted one), each step's and the interval's balancedness, and
(rank 0) the trace file of ``--record-trace``."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from eplb.balancer.estimate import LoadEstimator
from eplb.balancer.placement import Placement
from eplb.balancer.stats import balancedness

log = logging.getLogger("eplb.controller")


class LoadRecorder:
    """Records each forward step's global load ``[L, E]`` (summed over ranks).

    Rank 0 streams the trace to ``PATH.partial`` (raw int64 ``[L, E]`` per step) so a long run
    holds no trace in memory; ``close()`` turns it into the simulator's ``.npz`` at ``PATH``.
    """

    def __init__(self, estimator: LoadEstimator, num_layers: int, num_experts: int,
                 trace_path: str | None) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.estimator = estimator
        self.steps = 0  # forward steps recorded (identical on every rank)
        self.last_step_balancedness: float | None = None
        self._trace_path = trace_path
        self._trace_file = open(trace_path + ".partial", "wb") if trace_path else None  # noqa: SIM115
        self._trace_steps = 0
        self._bal_sum = 0.0
        self._bal_n = 0

    def record(self, load: torch.Tensor, placement: Placement) -> float | None:
        """One forward step's global load ``[L, E]``, scored against the live ``placement``;
        returns the step's balancedness (mean over layers; None for a step without load)."""
        self.steps += 1
        self.estimator.record(load)
        if self._trace_file is not None:
            self._trace_file.write(load.numpy().astype(np.int64).tobytes())
            self._trace_steps += 1
        self.last_step_balancedness = None
        if int(load.sum()) > 0:
            value = float(balancedness(load, placement).mean())
            self.last_step_balancedness = value
            self._bal_sum += value
            self._bal_n += 1
        return self.last_step_balancedness

    def close_interval(self) -> float | None:
        """Mean per-step balancedness since the last call (None if no step carried load)."""
        if not self._bal_n:
            return None
        value = self._bal_sum / self._bal_n
        self._bal_sum, self._bal_n = 0.0, 0
        return value

    def interval_so_far(self) -> float | None:
        return self._bal_sum / self._bal_n if self._bal_n else None

    def close(self) -> None:
        """Write the trace (rank 0); idempotent."""
        if self._trace_file is None:
            return
        self._trace_file.close()
        self._trace_file = None
        partial = self._trace_path + ".partial"
        if not self._trace_steps:
            log.warning("EPLB trace: no forward step ran; %s not written", self._trace_path)
            os.remove(partial)
            return
        from eplb.sim.traces import save_trace  # the simulator's own format

        load = np.memmap(partial, dtype=np.int64, mode="r",
                         shape=(self._trace_steps, self.num_layers, self.num_experts))
        with open(self._trace_path, "wb") as f:  # exactly this path (numpy adds .npz)
            save_trace(f, load)
        del load
        os.remove(partial)
