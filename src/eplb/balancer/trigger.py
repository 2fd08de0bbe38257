"""When to rebalance: every ``step_interval`` steps (vLLM's rule), and, with ``"shift"``, early
when the live balancedness drops. Pure and deterministic: fed the same per-step balancedness
(the same float on every rank), every rank decides the same at the same step.

Use, once per forward step, at the step boundary::

    trigger.observe(balancedness_of_this_step)
    d = trigger.decide()
    if d.rebalance:
        if d.fit_steps is not None:
            estimator.keep_last(d.fit_steps)   # fit on the steps since the shift only
        ... start the rebalance ...
        trigger.started()                      # the gap and the reference restart here

``"shift"``: the balancedness of each of the last ``shift_steps`` steps below the drop level
starts a
rebalance fitted on those last steps, at least ``min_gap`` steps after the previous one; a
follow-up ``min_gap`` steps later refits on every step since the shift (more tokens, less
sampling noise). The interval rule stays in force. The drop level is the higher of
``shift_threshold`` times the reference and the reference minus ``shift_drop`` (absolute
balancedness; 0 = relative rule only); the reference is the larger of the mean of the steps since
the last rebalance before those, and the mean of the period before that rebalance. The absolute
rule catches a lasting drop on a shape whose balancedness is low to start with (Mixtral-8x7B
EP 4 R 0: 0.605 -> 0.563, 7% relative, 4 points below a refit), where a relative 10% never
fires; the every-step rule keeps a burst shorter than ``shift_steps`` from firing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from eplb.config import EPLBConfig

TRIGGERS = ("interval", "shift")


@dataclass(frozen=True)
class Decision:
    rebalance: bool
    reason: str = ""  # "interval", "shift" or "shift-followup"; "" when not rebalancing
    # Fit on the last ``fit_steps`` steps only (estimator.keep_last); None: the whole estimate.
    fit_steps: int | None = None


class RebalanceTrigger:
    """Decides at each step boundary whether to start a rebalance (see the module docstring)."""

    def __init__(self, mode: str = "interval", step_interval: int = 3000, *,
                 shift_threshold: float = 0.9, shift_steps: int = 12, min_gap: int = 16,
                 shift_drop: float = 0.02) -> None:
        if mode not in TRIGGERS:
            raise ValueError(f"rebalance_trigger must be one of {', '.join(TRIGGERS)}, got {mode!r}")
        self.mode = mode
        self.step_interval = step_interval
        self.shift_threshold = shift_threshold
        self.shift_steps = shift_steps
        self.shift_drop = shift_drop
        self.min_gap = min_gap
        self.steps = 0  # forward steps observed
        self._since = 0  # steps since the last rebalance started
        self._recent: deque[float] = deque(maxlen=shift_steps)
        self._ref_sum = 0.0  # sum and count of the steps since the last rebalance, minus recent
        self._ref_n = 0
        self._prev_ref = 0.0  # mean balancedness of the previous period (between rebalances)
        self._followup_at: int | None = None  # step of a pending follow-up refit
        self._shift_step = 0  # step at which the last shift rebalance started

    def observe(self, balancedness: float) -> None:
        """Record one forward step's balancedness (mean over layers, the same on every rank)."""
        self.steps += 1
        self._since += 1
        if len(self._recent) == self._recent.maxlen:
            self._ref_sum += self._recent[0]
            self._ref_n += 1
        self._recent.append(float(balancedness))

    def decide(self) -> Decision:
        """Whether to start a rebalance now (call once per step boundary, after ``observe``)."""
        if self.steps > 0 and self.steps % self.step_interval == 0:
            return Decision(True, "interval")
        if self.mode != "shift":
            return Decision(False)
        if self._followup_at is not None and self.steps >= self._followup_at:
            return Decision(True, "shift-followup", self.steps - self._shift_step + self.shift_steps)
        if self._since >= self.min_gap and len(self._recent) == self.shift_steps:
            # The reference also remembers the previous period: a shift that lands together
            # with a rebalance would otherwise become its own reference.
            ref = max(self._prev_ref, self._ref_sum / self._ref_n if self._ref_n else 0.0)
            # Every recent step below (not their mean): one bad step does not fire, and the
            # steps fit on are all after the drop.
            level = self.shift_threshold * ref
            if self.shift_drop > 0:
                level = max(level, ref - self.shift_drop)
            if max(self._recent) < level:
                return Decision(True, "shift", self.shift_steps)
        return Decision(False)

    def started(self, decision: Decision | None = None) -> None:
        """A rebalance started now: measure the gap and the reference from here."""
        seen = self._ref_n + len(self._recent)
        if seen:
            self._prev_ref = (self._ref_sum + sum(self._recent)) / seen
        self._since = 0
        self._recent.clear()
        self._ref_sum, self._ref_n = 0.0, 0
        reason = decision.reason if decision is not None else ""
        if reason == "shift":
            self._shift_step = self.steps
            self._followup_at = self.steps + self.min_gap
        elif reason == "shift-followup":
            self._followup_at = None


def make_trigger(cfg: "EPLBConfig") -> RebalanceTrigger:
    """The trigger ``cfg.rebalance_trigger`` names, with the config's interval and shift keys."""
    return RebalanceTrigger(cfg.rebalance_trigger, cfg.step_interval,
                            shift_threshold=cfg.shift_threshold, shift_steps=cfg.shift_steps,
                            min_gap=cfg.shift_min_gap, shift_drop=cfg.shift_drop)
