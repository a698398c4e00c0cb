"""Issue-15 regressions (adversarial run, new-user trial): memory budget and unallocatable sizes."""

from __future__ import annotations

import pytest
from _hardening import (
    make_pool,
)

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu import budget as budget_mod
from dreampool_gpu.errors import (
    DreamPoolError,
    InsufficientMemoryError,
)


# ------------------------------------------------------------------ item 2
class TestUnallocatableSizes:
    @pytest.mark.parametrize(
        "overrides",
        [
            {"capacity": 10**12},
            {"embedding_dim": 10**9},
            {"dream_shape": (4096, 4096, 64)},
        ],
    )
    def test_typed_error_before_allocation(self, overrides):
        cfg = PoolConfig(**{"device": "cpu", **overrides})
        with pytest.raises(InsufficientMemoryError) as info:
            DreamPool(cfg)
        err = info.value
        assert isinstance(err, MemoryError) and isinstance(err, DreamPoolError)
        assert err.field in {"capacity", "embedding_dim", "dream_shape"}
        assert err.needed_bytes > err.available_bytes and f"{err.needed_bytes:,}" in str(err)

    def test_field_named_by_what_made_it_too_big(self, monkeypatch):
        monkeypatch.setattr(budget_mod, "available_bytes", lambda device: 10**6)
        for overrides, field in [
            ({"capacity": 10**6}, "capacity"),
            ({"dream_shape": (128, 128, 8)}, "dream_shape"),
            ({"embedding_dim": 10**6}, "embedding_dim"),
        ]:
            with pytest.raises(InsufficientMemoryError) as info:
                DreamPool(PoolConfig(device="cpu", **overrides))
            assert info.value.field == field and info.value.available_bytes == 10**6

    def test_percent_budget_more_than_is_free(self, monkeypatch):
        total = 8 * 2**30
        monkeypatch.setattr(
            budget_mod.ProcessMemory, "read", lambda self: budget_mod.MemoryReading(0, total, "psutil-rss")
        )
        monkeypatch.setattr(budget_mod, "available_bytes", lambda device: 2**20)
        with pytest.raises(InsufficientMemoryError) as info:
            DreamPool(PoolConfig(device="cpu", capacity=None, memory_budget_mb="50%"))
        assert info.value.field == "memory_budget_mb" and "50%" in str(info.value)

    def test_checkpoint_from_a_bigger_machine(self, tmp_path, monkeypatch, capsys):
        from dreampool_gpu.cli import main

        make_pool().save(tmp_path / "p")
        monkeypatch.setattr(budget_mod, "available_bytes", lambda device: 1000)
        with pytest.raises(InsufficientMemoryError):
            DreamPool.load(tmp_path / "p")
        assert main(["inspect", str(tmp_path / "p")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dreampool: error: capacity=64 needs")
