"""Where FAISS is not installed (a GPU image with torch alone): ``auto`` is the torch engine, FAISS engines say so."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["faiss"] = None  # import faiss now raises ImportError, as where it is not installed
    import torch
    from dreampool_gpu import DreamPool, PoolConfig
    from dreampool_gpu.devices import faiss_available
    from dreampool_gpu.errors import InvalidConfigurationError

    assert not faiss_available()
    pool = DreamPool(PoolConfig(dream_shape=(4, 4, 1), capacity=64, coherence_threshold=0.0, device="cpu"))
    g = torch.Generator().manual_seed(0)
    pool.add(torch.rand(40, 4, 4, 1, 3, generator=g), coherence=torch.ones(40))
    out = pool.retrieve(torch.rand(3, 4, 4, 1, 3, generator=g), k=5, mode="hybrid")
    print("engine", pool.index.kind, "ids", tuple(out.ids.shape), int((out.ids >= 0).sum()))
    for engine in ("faiss-flat", "faiss-ivf"):
        try:
            DreamPool(PoolConfig(dream_shape=(4, 4, 1), capacity=64, engine=engine, device="cpu"))
        except InvalidConfigurationError as exc:
            print("refused", engine, "faiss-cpu" in str(exc))
    """
)


def test_auto_is_torch_and_faiss_engines_refuse_without_faiss():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "engine exact-torch ids (3, 5) 15", lines
    assert lines[1:] == ["refused faiss-flat True", "refused faiss-ivf True"]
