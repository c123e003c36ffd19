"""The invoker's ``/metrics`` (Prometheus text format): what each instance's engine is doing, in
vLLM's metric names with sllm's prefix, labelled by ``instance`` and ``function``.

- ``sllm_num_requests_running`` / ``sllm_num_requests_waiting`` (gauges): sequences in the
  engine's last iteration, and those it holds that did not run in it (queued or preempted);
- ``sllm_kv_cache_usage_perc`` (gauge, 0-1): KV-cache positions allocated over the instance's
  KV budget;
- ``sllm_num_preemptions_total``: a sequence that ran in one iteration and not in the next,
  unfinished; ``sllm_kv_cache_dropped_total``: caches freed under memory pressure (recomputed);
- ``sllm_iterations_total``, ``sllm_iteration_seconds_total``: forward passes and their time
  (their rates' ratio is the mean iteration time);
- ``sllm_prompt_tokens_total`` (positions prefilled, a recompute counting again),
  ``sllm_generation_tokens_total`` (tokens sampled), ``sllm_request_cancelled_total``;
- ``sllm_prefix_cache_hits_total``: prompt positions a sequence took from a sibling of the
  same prompt instead of computing them (vLLM's prefix-cache hits, for whole prompts).

Values are read from the engines when scraped (:class:`EngineCollector`), so an iteration pays
nothing for them; an instance's series go away with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from invoker.engine.batching import InstanceEngine

LABELS = ["instance", "function"]


class EngineCollector(Collector):
    """Collects the metrics above from ``engines()``: instance id -> (function, engine)."""

    def __init__(self, engines: Callable[[], Mapping[str, tuple[str, InstanceEngine]]]) -> None:
        self._engines = engines

    def collect(self) -> Iterator[Metric]:
        gauges = {
            "running": GaugeMetricFamily("sllm_num_requests_running",
                                         "Sequences in the engine's last iteration", labels=LABELS),
            "waiting": GaugeMetricFamily("sllm_num_requests_waiting",
                                         "Sequences held that did not run in the last iteration",
                                         labels=LABELS),
            "kv": GaugeMetricFamily("sllm_kv_cache_usage_perc",
                                    "KV-cache positions allocated over the KV budget (0-1)",
                                    labels=LABELS),
        }
        counters = {
            "preemptions": CounterMetricFamily("sllm_num_preemptions",
                                               "Sequences preempted at an iteration boundary",
                                               labels=LABELS),
            "dropped": CounterMetricFamily("sllm_kv_cache_dropped",
                                           "KV caches freed under memory pressure", labels=LABELS),
            "iterations": CounterMetricFamily("sllm_iterations", "Forward passes", labels=LABELS),
            "iteration_seconds": CounterMetricFamily("sllm_iteration_seconds",
                                                     "Time in forward passes", labels=LABELS),
            "prompt": CounterMetricFamily("sllm_prompt_tokens", "Positions prefilled",
                                          labels=LABELS),
            "generation": CounterMetricFamily("sllm_generation_tokens", "Tokens sampled",
                                              labels=LABELS),
            "cancelled": CounterMetricFamily("sllm_request_cancelled",
                                             "Sequences whose client went away", labels=LABELS),
            "shared": CounterMetricFamily("sllm_prefix_cache_hits",
                                          "Prompt positions copied from a sibling's KV cache",
                                          labels=LABELS),
        }
        for instance_id, (function, eng) in sorted(self._engines().items()):
            labels = [instance_id, function]
            s, c = eng.scheduler, eng.counters
            gauges["running"].add_metric(labels, s.running())
            gauges["waiting"].add_metric(labels, s.waiting())
            gauges["kv"].add_metric(labels, s.used / s.kv_tokens if s.kv_tokens else 0.0)
            for key, value in (("preemptions", s.counters.preemptions),
                               ("dropped", s.counters.dropped), ("iterations", c.iterations),
                               ("iteration_seconds", c.iteration_seconds),
                               ("prompt", c.prompt_tokens), ("generation", c.generation_tokens),
                               ("cancelled", c.cancelled), ("shared", c.shared_tokens)):
                counters[key].add_metric(labels, value)
        yield from gauges.values()
        yield from counters.values()


def registry(engines: Callable[[], Mapping[str, tuple[str, InstanceEngine]]]) -> CollectorRegistry:
    """A registry holding an :class:`EngineCollector` over ``engines``."""
    reg = CollectorRegistry()
    reg.register(EngineCollector(engines))
    return reg
