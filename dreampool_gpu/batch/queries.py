"""Query files of a batch job: lazy readers of ``.npy``, ``.safetensors`` and ``.pt`` files, and
the check of their shape against a pool and mode."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open

from dreampool_gpu.config import RetrievalMode
from dreampool_gpu.errors import DimensionMismatchError, InvalidInputError
from dreampool_gpu.retrieval.modes import CHROMA_MODES

if TYPE_CHECKING:
    from dreampool_gpu.pool import DreamPool

QUERY_SUFFIXES = (".npy", ".safetensors", ".pt")
_FLOAT_NAMES = {"float16", "bfloat16", "float32", "float64", "F16", "BF16", "F32", "F64"}


class QueryFile:
    """Queries in a file, read lazily one row range at a time.

    Args:
        path: a ``.npy``, ``.safetensors`` or ``.pt`` file.

    Keyword Args:
        key: the tensor to read from a ``.safetensors`` file or a ``.pt`` dict;
            default: the only tensor, else the one named ``queries``.

    Attributes:
        path: the file. key: the tensor read (None for ``.npy`` and bare ``.pt`` tensors).
        shape: the full shape ``[B, ...]``. dtype: the stored dtype's name.

    Raises:
        InvalidInputError: a missing or unreadable file, an unknown suffix, no
            tensor to read, or a dtype that is not floating point.
    """

    def __init__(self, path: str | os.PathLike[str], *, key: str | None = None) -> None:
        self.path = Path(path)
        self.key = key
        if not self.path.is_file():
            what = "a directory" if self.path.is_dir() else "no such file"
            raise InvalidInputError("queries", "a .npy, .safetensors or .pt file", f"{self.path} ({what})")
        suffix = self.path.suffix.lower()
        if suffix not in QUERY_SUFFIXES:
            raise InvalidInputError("queries", f"a file ending in {', '.join(QUERY_SUFFIXES)}", str(self.path))
        self._read: Callable[[int, int], Any]
        try:
            if suffix == ".npy":
                self._open_npy()
            elif suffix == ".safetensors":
                self._open_safetensors()
            else:
                self._open_pt()
        except InvalidInputError:
            raise
        except Exception as exc:  # every loader has its own error types; all mean "unreadable"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""  # e.g. torch's pickle refusal
            raise InvalidInputError(
                "queries", f"a readable {suffix} file", f"{self.path} ({type(exc).__name__}: {first})"
            ) from None
        if self.dtype not in _FLOAT_NAMES:
            raise InvalidInputError(
                "queries",
                "a floating-point tensor (float16, bfloat16, float32 or float64)",
                f"dtype {self.dtype} in {self.path}",
            )
        if not self.shape:
            raise DimensionMismatchError("[B, ...]", [], f"queries in {self.path}")

    def _open_npy(self) -> None:
        array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        if self.key is not None:
            raise InvalidInputError("key", "no key for a .npy file (it holds one array)", repr(self.key))
        self.shape = [int(s) for s in array.shape]
        native = array.dtype.newbyteorder("=")  # big-endian files are read in native order
        self.dtype = str(native)

        def read(start: int, stop: int) -> torch.Tensor:
            return torch.from_numpy(np.array(array[start:stop], dtype=native, copy=True))

        self._read = read

    def _pick(self, keys: list[str]) -> str:
        if self.key is not None:
            if self.key not in keys:
                raise InvalidInputError("key", f"one of {', '.join(keys) or '(no tensors)'}", repr(self.key))
            return self.key
        if len(keys) == 1:
            return keys[0]
        if "queries" in keys:
            return "queries"
        raise InvalidInputError(
            "queries",
            f"a single tensor or one named 'queries' (pick one with --key: {', '.join(keys)})",
            f"{len(keys)} tensors in {self.path}",
        )

    def _open_safetensors(self) -> None:
        handle = safe_open(str(self.path), framework="pt")
        self.key = self._pick(sorted(handle.keys()))
        part = handle.get_slice(self.key)
        self.shape = [int(s) for s in part.get_shape()]
        self.dtype = str(part.get_dtype())
        self._handle = handle  # the slice reads through it

        def read(start: int, stop: int) -> torch.Tensor:
            return part[start:stop]

        self._read = read

    def _open_pt(self) -> None:
        try:
            value = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            value = torch.load(self.path, map_location="cpu", weights_only=True)
        if isinstance(value, dict):
            tensors = {str(k): v for k, v in value.items() if isinstance(v, torch.Tensor)}
            self.key = self._pick(sorted(tensors))
            value = tensors[self.key]
        elif self.key is not None:
            raise InvalidInputError("key", "no key for a .pt file holding one tensor", repr(self.key))
        if not isinstance(value, torch.Tensor):
            raise InvalidInputError("queries", "a tensor or a dict of tensors", type(value).__name__)
        tensor = value
        self.shape = list(tensor.shape)
        self.dtype = str(tensor.dtype).removeprefix("torch.")

        def read(start: int, stop: int) -> torch.Tensor:
            return tensor[start:stop]

        self._read = read

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` as a CPU tensor of the stored dtype."""
        return self._read(start, stop)

    def identity(self) -> dict[str, Any]:
        """What identifies these queries in a job: path, size, mtime, key, shape, dtype."""
        st = self.path.stat()
        return {
            "path": str(self.path.resolve()),
            "bytes": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "key": self.key,
            "shape": self.shape,
            "dtype": self.dtype,
        }


def check_queries(queries: QueryFile, pool: DreamPool, mode: RetrievalMode) -> None:
    """Check the queries' shape against the pool and mode before any work is done.

    Raises:
        DimensionMismatchError: not ``[B, R, C, L, 3]`` dreams of the pool's shape,
            ``[B, 3]`` chroma, or (embedding modes) ``[B, D]`` with the pool's D.
    """
    shape = queries.shape
    r, c, layers = pool.config.dream_shape
    d = pool.config.embedding_dim
    if len(shape) == 5 and shape[1:] == [r, c, layers, 3]:
        return
    if len(shape) == 2 and (shape[1] == 3 or (shape[1] == d and mode not in CHROMA_MODES)):
        return
    expected = f"[B, {r}, {c}, {layers}, 3] dreams or [B, 3] chroma"
    if mode in CHROMA_MODES:
        expected += f" (mode {mode.value!r} takes no embeddings)"
    else:
        expected += f" or [B, {d}] embeddings (the pool's embedding_dim is {d})"
    if shape == [r, c, layers, 3]:
        expected += "; the file holds one dream without a batch dimension: save it as dream[None]"
    raise DimensionMismatchError(expected, shape, f"queries in {queries.path} for mode {mode.value!r}")
