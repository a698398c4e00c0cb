"""Prometheus metrics for a pool (optional: needs the ``metrics`` extra, prometheus-client).

Counters and gauges are read from :meth:`DreamPool.stats` when Prometheus
scrapes, so they cost nothing between scrapes. Only the retrieve latency and
batch-size histograms are observed per call, and only once
:meth:`DreamPool.enable_metrics` was called; a pool without metrics pays one
``is None`` check per retrieve.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from dreampool_gpu.counters import COUNTERS
from dreampool_gpu.errors import DreamPoolError, InvalidInputError

if TYPE_CHECKING:
    from dreampool_gpu.pool import DreamPool

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384)


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:  # optional dependency
        raise DreamPoolError("metrics need prometheus-client: pip install 'dreampool_gpu[metrics]'") from exc
    return prometheus_client


class _StatsCollector:
    """Reads the pool's stats at scrape time."""

    def __init__(self, pool: DreamPool, namespace: str) -> None:
        self.pool = pool
        self.namespace = namespace

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.pool.stats()
        ns = self.namespace
        for name, help_text in COUNTERS.items():
            family = CounterMetricFamily(f"{ns}_{name}", help_text)
            family.add_metric([], stats.counters[name])
            yield family
        gauges = {
            "size": ("live entries", stats.size),
            "capacity": ("slots preallocated", stats.capacity),
            "bank_bytes": ("bytes of the tensor bank", stats.bank_bytes),
            "index_bytes": ("bytes of the search index", stats.index_bytes),
            "cache_hit_rate": ("query cache hit rate", stats.cache.hit_rate),
        }
        memory = stats.memory
        for key in ("device_used_bytes", "device_total_bytes"):
            if memory.get(key) is not None:
                gauges[key] = (f"device memory ({memory.get('source', 'unknown')})", memory[key])
        for name, (help_text, value) in gauges.items():
            gauge = GaugeMetricFamily(f"{ns}_{name}", help_text)
            gauge.add_metric([], float(value))
            yield gauge


class PoolMetrics:
    """Prometheus metrics of one pool, in a registry of their own.

    Args:
        pool: the pool to watch.

    Keyword Args:
        registry: a ``prometheus_client.CollectorRegistry`` (a fresh one by default).
        namespace: metric name prefix.
    """

    def __init__(self, pool: DreamPool, *, registry: Any = None, namespace: str = "dreampool") -> None:
        prom = _prometheus()
        if registry is not None and not isinstance(registry, prom.CollectorRegistry):
            raise InvalidInputError(
                "registry", "a prometheus_client.CollectorRegistry or None", type(registry).__name__
            )
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        self.retrieve_seconds = prom.Histogram(
            f"{namespace}_retrieve_seconds", "retrieve latency", buckets=_LATENCY_BUCKETS, registry=self.registry
        )
        self.batch_size = prom.Histogram(
            f"{namespace}_retrieve_batch_size",
            "queries per retrieve call",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StatsCollector(pool, namespace))

    def observe_retrieve(self, seconds: float, batch: int) -> None:
        """Record one retrieve call."""
        self.retrieve_seconds.observe(seconds)
        self.batch_size.observe(batch)

    def exposition(self) -> bytes:
        """The current metrics in the Prometheus text format."""
        return bytes(_prometheus().generate_latest(self.registry))

    def serve(self, port: int, *, addr: str = "127.0.0.1") -> Any:
        """Serve ``/metrics`` over HTTP on ``addr:port`` from a daemon thread; returns the server."""
        server, _thread = _prometheus().start_http_server(port, addr=addr, registry=self.registry)
        return server
