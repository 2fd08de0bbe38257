"""Configuration dataclasses shared by the CLI, the runtime and the server.

Every parser here raises ``ValueError`` whose message names the offending field
and what is allowed, so a bad flag never fails deep inside a worker process.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

ALL2ALL_BACKENDS = ("allgather_reducescatter", "naive", "alltoall")


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _check_float(name: str, value: Any, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= minimum:
        raise ValueError(f"{name} must be a number > {minimum}, got {value!r}")
    return float(value)


@dataclass
class EPLBConfig:
    """Expert-parallel load balancing settings; keys and defaults follow vLLM's ``EPLBConfig``.

    The fields after ``log_balancedness`` are ours.
    """

    window_size: int = 1000
    step_interval: int = 3000
    num_redundant_experts: int = 0
    use_async: bool = True
    log_balancedness: bool = False
    # vLLM's default is DeepSeek's greedy; ours balances better on the next interval's traffic
    # on average and moves ~40% of the copies (bench/results/balancer.md), at a policy cost that
    # async EPLB hides.
    policy: str = "refined"
    # ours: a rebalance that makes no progress for this long (async: no layer planned, staged
    # or committed; sync: one layer's transfer) is abandoned on every rank
    transfer_timeout_s: float = 60.0
    # ours: async staging holds at most this many layers' incoming experts at once
    max_staged_layers: int = 4
    # ours: cap on expert copies moved per rebalance (None = no cap); only for policies that honour it
    max_moves_per_rebalance: int | None = None
    # ours: what a rebalance fits: "window" (the flat sum of the last window_size steps, vLLM's)
    # or "ewma" (exponentially weighted, half-life load_half_life steps; follows drift)
    load_estimator: str = "window"
    load_half_life: float = 100.0
    # ours: "interval" (every step_interval steps, vLLM's) or "shift" (also early, when each of
    # the last shift_steps steps' balancedness falls below shift_threshold times the mean since
    # the last rebalance, or below that mean minus shift_drop, at least shift_min_gap steps
    # after the previous one)
    rebalance_trigger: str = "interval"
    shift_threshold: float = 0.9
    shift_steps: int = 12  # longer than a typical burst: only a lasting drop fires
    shift_min_gap: int = 16
    # absolute drop in balancedness (0.02 = two points) that also fires "shift"; number in
    # [0, 1), 0 = only the relative shift_threshold
    shift_drop: float = 0.02
    # ours: a layer takes a new placement only when its predicted balancedness gain on the
    # estimate is at least this (absolute, 0.01 = one point); 0 = always (vLLM's)
    skip_gain_threshold: float = 0.0
    # ours: how a step splits an expert's tokens over its replicas: "static" (round robin) or
    # "load_aware" (water-filling over the replicas' ranks by this step's load)
    replica_dispatch: str = "static"
    # ours: artificial delay per transferred layer, for tests that need a slow transfer
    debug_transfer_delay_s: float = 0.0
    # ours, tests only: this rank fails in the first rebalance (-1 = never), in phase
    # "transfer" (its first layer) or "policy" (rank 0's policy computation), by raising
    # ("raise"), by never finishing ("stall": only the timeout can end it) or by hanging its
    # main loop ("freeze": the serving group is broken; the front must notice and exit)
    debug_fail_rank: int = -1
    debug_fail_mode: str = "raise"
    debug_fail_phase: str = "transfer"
    # ours, tests only: after every commit compare each rank's expert weights with the
    # checkpoint and the maps across ranks (counted in stats as verify_checks/verify_mismatches)
    debug_verify_commits: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_int("window_size", self.window_size, 1)
        _check_int("step_interval", self.step_interval, 1)
        _check_int("num_redundant_experts", self.num_redundant_experts, 0)
        _check_bool("use_async", self.use_async)
        _check_bool("log_balancedness", self.log_balancedness)
        from eplb.balancer.policies import POLICIES  # lazy: keep config importable on its own

        if not isinstance(self.policy, str) or self.policy not in POLICIES:
            raise ValueError(
                f"policy must be one of {', '.join(sorted(POLICIES))}, got {self.policy!r}"
            )
        _check_float("transfer_timeout_s", self.transfer_timeout_s, 0.0)
        _check_int("max_staged_layers", self.max_staged_layers, 1)
        if self.max_moves_per_rebalance is not None:
            _check_int("max_moves_per_rebalance", self.max_moves_per_rebalance, 0)
        _check_choice("load_estimator", self.load_estimator, ("window", "ewma"))
        _check_float("load_half_life", self.load_half_life, 0.0)
        _check_choice("rebalance_trigger", self.rebalance_trigger, ("interval", "shift"))
        if (isinstance(self.shift_threshold, bool) or not isinstance(self.shift_threshold, (int, float))
                or not 0 < self.shift_threshold <= 1):
            raise ValueError(f"shift_threshold must be a number in (0, 1], got {self.shift_threshold!r}")
        _check_int("shift_steps", self.shift_steps, 1)
        _check_int("shift_min_gap", self.shift_min_gap, 1)
        if (isinstance(self.shift_drop, bool) or not isinstance(self.shift_drop, (int, float))
                or not 0 <= self.shift_drop < 1):
            raise ValueError(f"shift_drop must be a number in [0, 1), got {self.shift_drop!r}")
        if (isinstance(self.skip_gain_threshold, bool)
                or not isinstance(self.skip_gain_threshold, (int, float))
                or not 0 <= self.skip_gain_threshold <= 1):
            raise ValueError(
                f"skip_gain_threshold must be a number in [0, 1], got {self.skip_gain_threshold!r}")
        _check_choice("replica_dispatch", self.replica_dispatch, ("static", "load_aware"))
        if isinstance(self.debug_transfer_delay_s, bool) or not isinstance(
            self.debug_transfer_delay_s, (int, float)
        ) or self.debug_transfer_delay_s < 0:
            raise ValueError(
                f"debug_transfer_delay_s must be a number >= 0, got {self.debug_transfer_delay_s!r}"
            )
        _check_int("debug_fail_rank", self.debug_fail_rank, -1)
        if self.debug_fail_mode not in ("raise", "stall", "freeze"):
            raise ValueError("debug_fail_mode must be one of raise, stall, freeze, got "
                             f"{self.debug_fail_mode!r}")
        if self.debug_fail_phase not in ("transfer", "policy"):
            raise ValueError("debug_fail_phase must be one of transfer, policy, got "
                             f"{self.debug_fail_phase!r}")
        _check_bool("debug_verify_commits", self.debug_verify_commits)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EPLBConfig":
        if not isinstance(data, dict):
            raise ValueError(f"eplb config must be a JSON object, got {type(data).__name__}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in allowed:
                raise ValueError(
                    f"unknown eplb config key {key!r}; allowed keys: {', '.join(allowed)}"
                )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "EPLBConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--eplb-config is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ParallelConfig:
    """How ranks are laid out. DP size == EP size: every DP rank is one EP rank."""

    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    all2all_backend: str = "allgather_reducescatter"
    # multi-node (torchrun / vLLM style): address and port of rank 0's rendezvous
    data_parallel_address: str = "127.0.0.1"
    data_parallel_rpc_port: int = 0  # 0 = pick a free port
    data_parallel_size_local: int | None = None  # ranks on this node (None = all)
    node_rank: int = 0
    data_parallel_start_rank: int | None = None  # first rank of this node (None = node_rank * local)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_int("data_parallel_size", self.data_parallel_size, 1)
        if self.all2all_backend not in ALL2ALL_BACKENDS:
            raise ValueError(
                f"all2all_backend must be one of {', '.join(ALL2ALL_BACKENDS)}, "
                f"got {self.all2all_backend!r}"
            )
        _check_int("data_parallel_rpc_port", self.data_parallel_rpc_port, 0)
        _check_int("node_rank", self.node_rank, 0)
        if self.data_parallel_size_local is not None:
            _check_int("data_parallel_size_local", self.data_parallel_size_local, 1)
        if self.data_parallel_start_rank is not None:
            _check_int("data_parallel_start_rank", self.data_parallel_start_rank, 0)

    def check_expert_slots(self, num_experts: int, num_redundant_experts: int) -> None:
        """With EP, every rank holds the same number of expert slots: ValueError naming the
        fields when ``data_parallel_size`` does not divide experts + redundant ones."""
        physical = num_experts + num_redundant_experts
        if self.enable_expert_parallel and physical % self.data_parallel_size:
            raise ValueError(
                f"data_parallel_size ({self.data_parallel_size}) must divide the physical expert "
                f"count {physical} ({num_experts} experts + num_redundant_experts "
                f"{num_redundant_experts})")
