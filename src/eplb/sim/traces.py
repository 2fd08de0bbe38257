"""Load traces: synthetic ones shaped like real routing, and the ``.npz`` file format.

A trace is an int64 array ``load [steps, L, E]``: tokens routed to each expert of each layer at
each step. File: ``.npz`` with key ``load``.

Synthetic model, per layer: expert popularity follows a Zipf law with exponent ``skew`` over a
random ranking of the experts; the log-popularity drifts as a random walk (``drift`` = std per
step, relative to the Zipf spread) and a sudden workload change at step ``shift_at`` draws a new
ranking. With ``burst_every``, the last ``burst_len`` steps of every ``burst_every`` route by
another fixed ranking (bursts of a different workload). Each step routes ``tokens`` (token,
expert) pairs by a multinomial draw, so the load has routing noise like a real batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np


@dataclass
class SyntheticSpec:
    steps: int = 1000
    layers: int = 8
    experts: int = 64
    tokens: int = 4096  # (token, expert) pairs per step and layer
    skew: float = 1.0
    drift: float = 0.02
    shift_at: int = 500  # -1: no sudden change
    seed: int = 0
    # bursts: the last burst_len steps of every burst_every steps route by another, fixed
    # ranking (a batch of a different workload); 0 = no bursts
    burst_every: int = 0
    burst_len: int = 10

    def validate(self) -> None:
        for name in ("steps", "layers", "experts", "tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"synthetic spec {name} must be an integer >= 1, got {value!r}")
        for name in ("skew", "drift"):
            if getattr(self, name) < 0:
                raise ValueError(f"synthetic spec {name} must be >= 0, got {getattr(self, name)!r}")
        if not isinstance(self.shift_at, int) or self.shift_at < -1:
            raise ValueError(f"synthetic spec shift_at must be an integer >= -1, got {self.shift_at!r}")
        if not isinstance(self.burst_every, int) or self.burst_every < 0:
            raise ValueError(f"synthetic spec burst_every must be an integer >= 0, got {self.burst_every!r}")
        if not isinstance(self.burst_len, int) or self.burst_len < 1 or (
                self.burst_every and self.burst_len > self.burst_every):
            raise ValueError(f"synthetic spec burst_len must be an integer in [1, burst_every], "
                             f"got {self.burst_len!r}")


def parse_spec(text: str) -> SyntheticSpec:
    """``"default"`` or ``"key=value,key=value"`` (keys: the fields of ``SyntheticSpec``;
    unspecified keys keep their defaults; ``shift_at`` defaults to half of ``steps``)."""
    spec = SyntheticSpec()
    if text.strip() in ("", "default"):
        return spec
    types = {f.name: f.type for f in fields(SyntheticSpec)}
    given = set()
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in types:
            raise ValueError(
                f"bad synthetic spec item {part!r}: expected key=value with key in "
                f"{', '.join(types)} (or 'default')"
            )
        try:
            parsed = float(value) if types[key] in (float, "float") else int(value)
        except ValueError:
            raise ValueError(f"synthetic spec {key} must be a number, got {value!r}") from None
        setattr(spec, key, parsed)
        given.add(key)
    if "shift_at" not in given:
        spec.shift_at = spec.steps // 2
    spec.validate()
    return spec


def synthetic_trace(spec: SyntheticSpec) -> np.ndarray:
    """``load [steps, L, E]`` int64 following ``spec`` (deterministic for a seed)."""
    spec.validate()
    rng = np.random.default_rng(spec.seed)
    L, E = spec.layers, spec.experts
    base = -spec.skew * np.log(np.arange(1, E + 1, dtype=np.float64))  # Zipf log-popularity

    def ranking() -> np.ndarray:
        return np.stack([base[rng.permutation(E)] for _ in range(L)])  # [L, E]

    logits = ranking()
    burst = None
    if spec.burst_every:  # its own generator: the main draws stay those of the trace without bursts
        burst_rng = np.random.default_rng([spec.seed, 1])
        burst = np.stack([base[burst_rng.permutation(E)] for _ in range(L)])
    spread = max(float(np.std(base)), 1e-3)
    out = np.empty((spec.steps, L, E), dtype=np.int64)
    for t in range(spec.steps):
        if t == spec.shift_at:
            logits = ranking()
        elif t:
            logits = logits + rng.normal(0.0, spec.drift * spread, size=(L, E))
        now = logits
        if burst is not None and t % spec.burst_every >= spec.burst_every - spec.burst_len:
            now = burst
        p = np.exp(now - now.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[t] = rng.multinomial(spec.tokens, p)
    return out


def spec_dict(spec: SyntheticSpec) -> dict:
    return asdict(spec)


def save_trace(path: str | Path, load: np.ndarray) -> None:
    load = np.asarray(load)
    check_trace(load)
    np.savez_compressed(path, load=load.astype(np.int64))


def load_trace(path: str | Path) -> np.ndarray:
    """Read a trace file; ValueError naming the problem when it is not ``load [steps, L, E]``."""
    try:
        with np.load(path) as data:
            if "load" not in data.files:
                raise ValueError(f"trace {path} has no 'load' array (has: {', '.join(data.files)})")
            load = data["load"]
    except (OSError, EOFError) as exc:
        raise ValueError(f"cannot read trace {path}: {exc}") from None
    check_trace(load)
    return load.astype(np.int64)


def check_trace(load: np.ndarray) -> None:
    if load.ndim != 3:
        raise ValueError(f"trace load must be 3-D [steps, layers, experts], got shape {load.shape}")
    if not np.issubdtype(load.dtype, np.integer):
        raise ValueError(f"trace load must hold integers, got {load.dtype}")
    if min(load.shape) < 1:
        raise ValueError(f"trace load must not be empty, got shape {load.shape}")
    if (load < 0).any():
        raise ValueError("trace load must be >= 0")
