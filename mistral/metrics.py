"""The server's Prometheus metrics: one registry per app, so that several apps in one process
(tests) don't share counters. Engine figures are read from `Engine.stats()` when scraped."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Seconds: a first token from ~10 ms (a short prompt on a GPU) to a minute (a long prompt on a CPU).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self, engine_stats: Callable[[], object | None]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mistral_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("mistral_prompt_tokens", "prompt tokens of completed requests", registry=r)
        self.generation_tokens = Counter("mistral_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("mistral_time_to_first_token_seconds", "request to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("mistral_inter_token_latency_seconds", "between two streamed chunks",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("mistral_e2e_request_latency_seconds", "request to last byte of the answer",
                             buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(engine_stats))

    def usage(self, usage: dict | None) -> None:
        if usage:
            self.prompt_tokens.inc(usage.get("prompt_tokens", 0))
            self.generation_tokens.inc(usage.get("completion_tokens", 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    def __init__(self, engine_stats: Callable[[], object | None]):
        self.engine_stats = engine_stats

    def collect(self):
        s = self.engine_stats()
        if s is None:  # still loading
            return
        yield GaugeMetricFamily("mistral_requests_waiting", "sequences queued for a cache row", value=s.waiting)
        yield GaugeMetricFamily("mistral_requests_running", "sequences holding a cache row", value=s.running)
        yield GaugeMetricFamily("mistral_kv_blocks_used", "KV-cache blocks in use", value=s.kv_blocks_used)
        yield GaugeMetricFamily("mistral_kv_blocks_free", "KV-cache blocks free",
                                value=s.kv_blocks_total - s.kv_blocks_used)
        yield CounterMetricFamily("mistral_prefix_cache_queries", "prompt tokens looked up in the prefix cache",
                                  value=s.prefix_cache_queries)
        yield CounterMetricFamily("mistral_prefix_cache_hits", "prompt tokens served from the prefix cache",
                                  value=s.prefix_cache_hits)
        rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        yield GaugeMetricFamily("mistral_prefix_cache_hit_rate", "hits / queries since start", value=rate)
