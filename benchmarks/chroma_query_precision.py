"""How well a ``[B, 3]`` chroma query finds dreams of its colour in the embedding modes.

A pool of 3,000 synthetic class-coloured dreams (16x16x4, the original's
dataset: class colour + uniform noise 0.1); 200 queries, each the mean colour
of a fresh dream of a known class. Precision@10 = share of the 10 nearest
entries (``mode="nearest"``) with the query's class, for four ways of filling
the query's missing spectral features:

- ``zeros``: the original's rule;
- ``flat``: the flat dream of the query colour (what the pool does);
- ``pool mean``: the mean spectral features of the pool's entries;
- ``dream``: the query dream's own features (the upper bound).

    .venv/bin/python benchmarks/chroma_query_precision.py
"""

from __future__ import annotations

import torch

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.dreams import synthetic_dreams
from dreampool_gpu.spectral import flat_field_features, spectral_features, window_spectrum

SHAPE = (16, 16, 4)


def main() -> None:
    pool = DreamPool(PoolConfig(dream_shape=SHAPE, capacity=3000, device="cpu", coherence_threshold=0.0,
                                query_cache_size=0))
    dreams, labels = synthetic_dreams(3000, SHAPE, generator=torch.Generator().manual_seed(0))
    pool.add(dreams, coherence=torch.ones(3000), class_labels=labels)
    queries, query_labels = synthetic_dreams(200, SHAPE, generator=torch.Generator().manual_seed(5))
    chroma = queries.mean(dim=(1, 2, 3))
    fills = {
        "zeros": None,
        "flat": flat_field_features(chroma, window_spectrum(SHAPE[0], SHAPE[1])),
        "pool mean": pool.bank.columns["spectral"][:3000].mean(0, keepdim=True).expand(200, -1),
        "dream": spectral_features(queries),
    }
    for name, spectral in fills.items():
        _, slots = pool.index.search(pool.encoder.encode(chroma, spectral=spectral), 10)
        precision = (pool.bank.columns["class_label"][slots] == query_labels[:, None]).float().mean()
        print(f"{name:10} precision@10 {precision:.3f}")


if __name__ == "__main__":
    main()
