"""Load estimators: what a rebalance fits on. Pure CPU tensors, no torch.distributed.

Every estimator follows ``LoadEstimator``: ``record(load[L, E])`` once per forward step (the load
summed over DP ranks, the same on every rank), ``total() -> Tensor[L, E]`` (what the policy
fits; only its proportions matter to a policy), ``num_recorded``, ``reset()`` and
``keep_last(steps)`` (forget all but the last ``steps`` steps: after a load shift the past
misleads) and ``steps() -> Tensor[n, L, E]`` (recent raw steps, for judging placements per
step). Deterministic: every rank that records the same loads gets the same total.

- ``LoadWindow`` (``stats.py``): the flat sum of the last ``window_size`` steps (vLLM's).
- ``EwmaLoad``: an exponentially weighted sum, ``sum_k 0.5 ** (k / half_life) * load[t - k]``:
  recent steps count most, so it follows drift; it keeps the last ``keep`` raw steps for
  ``keep_last``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from eplb.balancer.stats import LoadWindow

if TYPE_CHECKING:  # config imports the balancer lazily; no import cycle at run time
    from eplb.config import EPLBConfig


class LoadEstimator(Protocol):
    num_recorded: int

    def record(self, load: torch.Tensor) -> None: ...

    def total(self) -> torch.Tensor: ...

    def reset(self) -> None: ...

    def keep_last(self, steps: int) -> None: ...

    def steps(self) -> torch.Tensor: ...


def _check_load(load: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    load = torch.as_tensor(load)
    if tuple(load.shape) != shape:
        raise ValueError(f"load must have shape {shape} [layers, experts], got {tuple(load.shape)}")
    return load.to(torch.float64)


class EwmaLoad:
    """Exponentially weighted load ``[L, E]`` (float64) with a half-life in steps."""

    def __init__(self, half_life: float, num_layers: int, num_experts: int, keep: int = 64) -> None:
        if isinstance(half_life, bool) or not isinstance(half_life, (int, float)) or not half_life > 0:
            raise ValueError(f"half_life must be a number > 0, got {half_life!r}")
        for name, value in (("num_layers", num_layers), ("num_experts", num_experts), ("keep", keep)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.half_life = float(half_life)
        self.decay = 0.5 ** (1.0 / self.half_life)
        self._shape = (num_layers, num_experts)
        self._total = torch.zeros(self._shape, dtype=torch.float64)
        self._recent = torch.zeros(keep, num_layers, num_experts, dtype=torch.float64)  # ring
        self.num_recorded = 0
        self._held = 0  # raw steps in the ring that count (keep_last drops the others)

    def record(self, load: torch.Tensor) -> None:
        """Add one step's ``load [L, E]``; older steps fade by ``decay`` per step."""
        load = _check_load(load, self._shape)
        self._total.mul_(self.decay).add_(load)
        self._recent[self.num_recorded % self._recent.shape[0]] = load
        self.num_recorded += 1
        self._held = min(self._held + 1, self._recent.shape[0])

    def total(self) -> torch.Tensor:
        """``[L, E]`` float64: the weighted sum (weights 1, decay, decay**2, ... newest first)."""
        return self._total.clone()

    def reset(self) -> None:
        self._total.zero_()
        self._recent.zero_()
        self.num_recorded = 0
        self._held = 0

    def steps(self) -> torch.Tensor:
        """``[n, L, E]``: the last raw steps still counted (at most ``keep``), oldest first."""
        keep = self._recent.shape[0]
        n = self._held
        return self._recent[[(self.num_recorded - n + i) % keep for i in range(n)]]

    def keep_last(self, steps: int) -> None:
        """Forget every step but the last ``min(steps, keep, num_recorded)``."""
        n = min(steps, self._held)
        self._held = n
        total = torch.zeros(self._shape, dtype=torch.float64)
        for age in range(n - 1, -1, -1):  # oldest first, as record() would have added them
            total.mul_(self.decay).add_(self._recent[(self.num_recorded - 1 - age) % self._recent.shape[0]])
        self._total = total


ESTIMATORS = ("window", "ewma")


def make_load_estimator(cfg: "EPLBConfig", num_layers: int, num_experts: int) -> LoadEstimator:
    """The estimator ``cfg.load_estimator`` names: ``"window"`` (a ``LoadWindow`` of
    ``cfg.window_size`` steps) or ``"ewma"`` (``EwmaLoad`` with ``cfg.load_half_life``); both keep
    enough recent steps for the shift trigger's ``keep_last(cfg.shift_steps ...)``."""
    if cfg.load_estimator == "window":
        return LoadWindow(cfg.window_size, num_layers, num_experts)
    if cfg.load_estimator == "ewma":
        keep = max(64, cfg.shift_steps + cfg.shift_min_gap)
        return EwmaLoad(cfg.load_half_life, num_layers, num_experts, keep=keep)
    raise ValueError(f"load_estimator must be one of {', '.join(ESTIMATORS)}, got {cfg.load_estimator!r}")
