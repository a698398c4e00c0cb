"""Prometheus metrics: exposition contents and a real HTTP scrape on localhost."""

from __future__ import annotations

import socket
import urllib.request

import pytest
import torch

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.errors import InvalidInputError
from dreampool_gpu.metrics import PoolMetrics

pytest.importorskip("prometheus_client")


def metric_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in exposition")


@pytest.fixture
def pool():
    pool = DreamPool(PoolConfig(dream_shape=(2, 2, 1), capacity=4, device="cpu", coherence_threshold=0.5))
    pool.add(torch.rand(6, 2, 2, 1, 3), coherence=torch.tensor([0.9, 0.9, 0.1, 0.9, 0.9, 0.9]))
    return pool


class TestMetrics:
    def test_disabled_by_default_never_observes(self, pool, monkeypatch):
        def observed(*args, **kwargs):
            raise AssertionError("a pool without metrics observed a retrieve")

        monkeypatch.setattr(PoolMetrics, "observe_retrieve", observed)
        assert pool.metrics is None
        assert pool.retrieve(torch.rand(2, 3), k=2, mode="similar").ids.shape == (2, 2)

    def test_registry_must_be_a_collector_registry(self, pool):
        with pytest.raises(InvalidInputError, match="registry"):
            pool.enable_metrics(registry={"not": "a registry"})
        assert pool.metrics is None

    def test_gauges_follow_stats(self, pool):
        metrics = pool.enable_metrics()
        query = torch.tensor([[0.2, 0.4, 0.6]])
        for _ in range(4):
            pool.retrieve(query, k=1, mode="nearest")  # one miss, three hits
        text = metrics.exposition().decode()
        assert metric_value(text, "dreampool_cache_hit_rate") == pytest.approx(0.75)
        assert metric_value(text, "dreampool_capacity") == 4
        memory = pool.stats()["memory"]
        if memory.get("device_used_bytes") is not None:
            assert metric_value(text, "dreampool_device_used_bytes") > 0

    def test_counters_and_histograms(self, pool):
        metrics = pool.enable_metrics()
        pool.add(torch.rand(1, 2, 2, 1, 3), coherence=torch.ones(1))
        pool.retrieve(torch.rand(3, 3), k=2, mode="similar")
        pool.retrieve(torch.rand(5, 3), k=2, mode="similar")
        text = metrics.exposition().decode()
        assert metric_value(text, "dreampool_added_total") == 5
        assert metric_value(text, "dreampool_rejected_total") == 1
        assert metric_value(text, "dreampool_dropped_total") == 1
        assert metric_value(text, "dreampool_evicted_total") == 1
        assert metric_value(text, "dreampool_queries_total") == 8
        assert metric_value(text, "dreampool_size") == 4
        assert metric_value(text, "dreampool_retrieve_seconds_count") == 2
        assert metric_value(text, "dreampool_retrieve_batch_size_sum") == 8
        assert metric_value(text, "dreampool_bank_bytes") == pool.stats()["bank_bytes"]

    def test_http_scrape(self, pool):
        metrics = pool.enable_metrics()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = metrics.serve(port)
        try:
            pool.retrieve(torch.rand(2, 3), k=1, mode="similar")
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            assert metric_value(body, "dreampool_queries_total") == 2
            assert metric_value(body, "dreampool_retrieve_seconds_count") == 1
        finally:
            server.shutdown()
