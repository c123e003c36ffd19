"""Prometheus metrics of the gateway, named after vLLM's de-facto standard where one exists.

Served at ``GET /metrics``. Labels: ``function``, ``cold`` (``True``/``False``), ``status``,
``reason`` (why a running stream moved: ``migrated``, ``preempted``, ``failed``).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True)
class GatewayMetrics:
    registry: CollectorRegistry
    activations: Counter
    cold_starts: Counter
    cold_start_seconds: Histogram
    ttft: Histogram
    moves: Counter
    move_pause_seconds: Histogram


def _build() -> GatewayMetrics:
    reg = CollectorRegistry()
    return GatewayMetrics(
        registry=reg,
        activations=Counter("sllm_activations", "Invocations that ran, by outcome",
                            ["function", "cold", "status"], registry=reg),
        cold_starts=Counter("sllm_cold_starts", "Invocations that waited for an instance to load",
                            ["function"], registry=reg),
        cold_start_seconds=Histogram("sllm_cold_start_load_seconds",
                                     "Time invocations waited for a checkpoint load",
                                     ["function"], buckets=_LATENCY_BUCKETS, registry=reg),
        ttft=Histogram("sllm_time_to_first_token_seconds",
                       "Request arrival at the gateway to the first token",
                       ["function", "cold"], buckets=_LATENCY_BUCKETS, registry=reg),
        moves=Counter("sllm_stream_moves", "Streams moved to another instance while running, by "
                      "reason (migrated, preempted, failed)", ["function", "reason"], registry=reg),
        move_pause_seconds=Histogram("sllm_stream_move_pause_seconds",
                                     "Gap between tokens a client saw where its stream moved",
                                     ["function", "reason"], buckets=_LATENCY_BUCKETS,
                                     registry=reg),
    )


METRICS = _build()
