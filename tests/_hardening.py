"""Shared helpers of the issue-15 regression tests (*_hardening.py): small pools of spread-out dreams."""

from __future__ import annotations

import hashlib
import json

import torch

from dreampool_gpu import DreamPool, PoolConfig, persist
from dreampool_gpu.persist import MANIFEST

SHAPE = (3, 4, 2)


MODES = ["similar", "class", "balanced", "utility", "diverse", "soft", "hybrid", "category", "nearest"]


def dreams(n, *, seed=0, shape=SHAPE):
    """Dreams around a random base colour each, so chroma signatures spread out."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, 1, 1, 3, generator=g)
    return (base + 0.05 * (torch.rand(n, *shape, 3, generator=g) - 0.5)).clamp(0, 1)


def make_pool(n=40, *, seed=0, **overrides):
    cfg = {"dream_shape": SHAPE, "capacity": 64, "device": "cpu", "coherence_threshold": 0.0, **overrides}
    pool = DreamPool(PoolConfig(**cfg))
    labels = torch.randint(-1, 10, (n,), generator=torch.Generator().manual_seed(seed + 1))
    pool.add(dreams(n, seed=seed, shape=cfg["dream_shape"]), coherence=torch.ones(n), class_label=labels)
    return pool


def mode_kwargs(mode):
    return {"class": {"class_hint": 1}, "balanced": {"classes": [0, 1]}}.get(mode, {})


def resign(ckpt, name, data):
    """Replace file ``name`` of checkpoint ``ckpt`` by ``data`` and sign the manifest again."""
    (ckpt / name).write_bytes(data)
    manifest = json.loads((ckpt / MANIFEST).read_bytes())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    body = {key: value for key, value in manifest.items() if key != "digest"}
    manifest["digest"] = persist._digest(body)
    (ckpt / MANIFEST).write_bytes(json.dumps(manifest).encode())
