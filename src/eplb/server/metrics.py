"""Prometheus metrics of the server: request/token counters kept here, engine and EPLB figures
read from ``DPEngineClient.stats()`` at scrape time (so they are never stale or double-counted).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

disable_created_metrics()  # the *_created series only add noise to a scrape

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# stats() key -> (metric name, help, kind); counters get the _total suffix from prometheus_client
EPLB_FIGURES: list[tuple[str, str, str, str]] = [
    ("rebalances", "eplb_rebalances", "EPLB rebalances completed (committed on every rank)", "counter"),
    ("rebalances_failed", "eplb_rebalances_failed",
     "EPLB rebalances abandoned (timeout or transfer error); old placement kept", "counter"),
    ("copies_moved", "eplb_expert_copies_moved", "expert copies moved by completed rebalances",
     "counter"),
    ("bytes_moved", "eplb_expert_bytes_moved", "expert weight bytes moved by completed rebalances",
     "counter"),
    ("last_rebalance_s", "eplb_last_rebalance_seconds", "duration of the last completed rebalance",
     "gauge"),
    ("mean_rebalance_s", "eplb_mean_rebalance_seconds", "mean duration of completed rebalances",
     "gauge"),
    ("steps", "eplb_engine_steps", "forward steps run (every rank steps together)", "counter"),
    ("balancedness", "eplb_balancedness",
     "mean/max rank load of recent steps, averaged over MoE layers (1.0 = perfect)", "gauge"),
]


def per_rank(stats: dict[str, Any], key: str) -> list[float]:
    """Per-rank values of ``key``: from ``stats["ranks"][i][key]`` or a list ``stats[key]``."""
    ranks = stats.get("ranks")
    if isinstance(ranks, list) and ranks and isinstance(ranks[0], dict):
        return [float(r.get(key, 0) or 0) for r in ranks]
    value = stats.get(key)
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    if isinstance(value, (int, float)):
        return [float(value)]
    return []


class _EngineCollector(Collector):
    def __init__(self, stats_fn: Callable[[], dict[str, Any]]) -> None:
        self._stats_fn = stats_fn

    def collect(self) -> Iterable[Any]:
        try:
            stats = self._stats_fn() or {}
        except Exception:  # noqa: BLE001 - engine not started or gone: /metrics still answers
            stats = {}
        for key, name, doc in (("running", "eplb_num_requests_running", "requests being decoded"),
                               ("waiting", "eplb_num_requests_waiting", "requests queued")):
            g = GaugeMetricFamily(name, doc, labels=["rank"])
            for rank, v in enumerate(per_rank(stats, key)):
                g.add_metric([str(rank)], v)
            yield g
        for key, name, doc, kind in EPLB_FIGURES:
            value = stats.get(key)
            if value is None:
                continue
            if kind == "counter":
                yield CounterMetricFamily(name, doc, value=float(value))
            else:
                yield GaugeMetricFamily(name, doc, value=float(value))


class ServerMetrics:
    """Counters updated by the request handlers plus the engine collector, in one registry."""

    def __init__(self, stats_fn: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("eplb_requests", "HTTP requests to the OpenAI endpoints",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("eplb_prompt_tokens", "prompt tokens of finished requests",
                                     registry=self.registry)
        self.generation_tokens = Counter("eplb_generation_tokens",
                                         "generated tokens of finished requests",
                                         registry=self.registry)
        self.registry.register(_EngineCollector(stats_fn))

    def render(self) -> bytes:
        return generate_latest(self.registry)
