"""EPLB figures of one rank (identical on every rank: every change follows the reduced packet)."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_EVENTS = 100  # rebalance events and interval balancedness figures kept for stats()


@dataclass
class EplbMetrics:
    rebalances: int = 0
    rebalances_failed: int = 0
    copies_moved: int = 0
    bytes_moved: int = 0
    last_rebalance_s: float = 0.0
    total_rebalance_s: float = 0.0
    last_policy_s: float = 0.0
    steps_during_last_rebalance: int = 0  # forward steps served while the last async one ran
    layers_committed: int = 0
    # seconds the last rebalance's layer transfers took on this rank, posting to completion
    # (CUDA: measured on the transfer stream), and the bytes this rank received in them
    transfer_seconds: float = 0.0
    transfer_bytes_received: int = 0
    # point-to-point messages (sends + receives) this rank posted for those layers: the
    # transfer's design is one send and one receive per peer and layer, and this shows it held
    transfer_messages: int = 0
    # per committed layer, the last MAX_EVENTS: (bytes received here, seconds of its transfer,
    # messages posted here)
    layer_transfers: list[tuple[int, float, int]] = field(default_factory=list)
    balancedness: float | None = None  # mean per-step balancedness of the last interval
    balancedness_history: list[float] = field(default_factory=list)  # one per interval
    verify_checks: int = 0
    verify_mismatches: int = 0
    # the last rebalances, oldest first: {"ok", "step", "layers_committed", "copies",
    # "seconds", "steps_in_flight", "why"}; layers_committed of a failed one = layers it changed
    events: list[dict] = field(default_factory=list)

    def add_event(self, **event: object) -> None:
        self.events.append(event)
        del self.events[:-MAX_EVENTS]

    def add_interval(self, value: float) -> None:
        self.balancedness = value
        self.balancedness_history.append(value)
        del self.balancedness_history[:-MAX_EVENTS]

    def record_policy(self, seconds: float) -> None:
        self.last_policy_s = seconds

    def record_rebalance(self, seconds: float, steps_in_flight: int, copies: int, layers: int, step: int) -> None:
        """One rebalance finished: its time, the steps served while it ran, and its event."""
        self.rebalances += 1
        self.last_rebalance_s = seconds
        self.total_rebalance_s += seconds
        self.steps_during_last_rebalance = steps_in_flight
        self.add_event(ok=True, step=step, layers_committed=layers, copies=copies, seconds=seconds,
                       steps_in_flight=steps_in_flight)

    def record_failure(self, why: str, seconds: float, steps_in_flight: int, copies: int, layers: int,
                       step: int) -> None:
        """One rebalance abandoned on every rank; layers = those it had already changed."""
        self.rebalances_failed += 1
        self.add_event(ok=False, step=step, layers_committed=layers, copies=copies, seconds=seconds,
                       steps_in_flight=steps_in_flight, why=why)

    def count_commit(self, copies: int, nbytes: int) -> None:
        self.layers_committed += 1
        self.copies_moved += copies
        self.bytes_moved += nbytes

    def count_transfer(self, nbytes: int, seconds: float, messages: int = 0) -> None:
        self.transfer_seconds += seconds
        self.transfer_bytes_received += nbytes
        self.transfer_messages += messages
        self.layer_transfers.append((nbytes, seconds, messages))
        del self.layer_transfers[:-MAX_EVENTS]

    def count_verify(self, mismatch: bool) -> None:
        self.verify_checks += 1
        self.verify_mismatches += int(mismatch)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["mean_rebalance_s"] = self.total_rebalance_s / self.rebalances if self.rebalances else 0.0
        d["balancedness_history"] = list(self.balancedness_history[-MAX_EVENTS:])
        d["events"] = [dict(e) for e in self.events]
        d["layer_transfers"] = [list(t) for t in self.layer_transfers]
        return d
