"""Find host synchronisations on any device: :func:`forbid_host_sync`.

On CUDA, reading a tensor's value on the host (``item``, ``bool``, ``tolist``, a copy
to the CPU) or an operation whose output size depends on values (``nonzero``,
``unique``, boolean-mask indexing) makes the host wait for the device. On a CPU the
same calls cost nothing, so a sync slips into code unnoticed. This guard raises
:class:`~dreampool_gpu.errors.HostSyncError` on every such operation, on CPU too, so a
CPU test proves that a code path would not synchronise on CUDA. (On CUDA,
``torch.cuda.set_sync_debug_mode("error")`` is the authority; it also sees copies
from pageable host memory, which this guard does not.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from dreampool_gpu._validation import check_count
from dreampool_gpu.errors import HostSyncError

_aten = torch.ops.aten

# Python-level reads of values: these never reach the dispatcher on a CPU tensor.
_HOST_READS: dict[Callable[..., Any], str] = {
    torch.Tensor.item: "Tensor.item",
    torch.Tensor.tolist: "Tensor.tolist",
    torch.Tensor.cpu: "Tensor.cpu",
    torch.Tensor.numpy: "Tensor.numpy",
    torch.Tensor.__bool__: "bool(tensor)",
    torch.Tensor.__int__: "int(tensor)",
    torch.Tensor.__float__: "float(tensor)",
    torch.Tensor.__index__: "a tensor used as a Python int",
}

# Operators that read a value on the host or size their output by the data.
_SYNC_OPS = {
    _aten._local_scalar_dense.default: "a scalar read (item/bool/int/float)",
    _aten.is_nonzero.default: "bool(tensor)",
    _aten.nonzero.default: "nonzero (output sized by the data)",
    _aten.masked_select.default: "masked_select (output sized by the data)",
    _aten._unique2.default: "unique (output sized by the data)",
    _aten.unique_dim.default: "unique (output sized by the data)",
    _aten.unique_consecutive.default: "unique_consecutive (output sized by the data)",
    _aten.equal.default: "torch.equal (a host bool)",
    _aten.allclose.default: "torch.allclose (a host bool)",
}


def _is_bool_index(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


class _Budget:
    """Host reads still allowed, and whether one is running (its inner operators are part of it)."""

    def __init__(self, allowed: int) -> None:
        self.left = allowed
        self.inside = False

    def spend(self, name: str) -> None:
        if self.left <= 0:
            raise HostSyncError(name)
        self.left -= 1


class _FunctionGuard(TorchFunctionMode):
    def __init__(self, budget: _Budget) -> None:
        super().__init__()
        self.budget = budget

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = _HOST_READS.get(func)
        if name is None or self.budget.inside:
            return func(*args, **(kwargs or {}))
        self.budget.spend(name)
        self.budget.inside = True
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.budget.inside = False


class _DispatchGuard(TorchDispatchMode):
    def __init__(self, budget: _Budget) -> None:
        super().__init__()
        self.budget = budget

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = _SYNC_OPS.get(func)
        if name is None and func.overloadpacket in (_aten.index, _aten.index_put, _aten.index_put_):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(_is_bool_index(i) for i in indices):
                name = "boolean-mask indexing (output sized by the data)"
        if name is None and func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            name = "repeat_interleave without output_size"
        if name is not None and not self.budget.inside:
            self.budget.spend(name)
        return func(*args, **kwargs)


@contextmanager
def forbid_host_sync(allowed: int = 0) -> Iterator[None]:
    """Raise :class:`~dreampool_gpu.errors.HostSyncError` on any operation that would sync on CUDA.

    Args:
        allowed: host reads let through before the guard raises (e.g. 1 for ``add``'s one read);
            an int >= 0, else :class:`~dreampool_gpu.errors.InvalidInputError`.

    Examples:
        >>> with forbid_host_sync():
        ...     hits = pool.retrieve(queries, k=10, mode="nearest")   # raises if it would sync
    """
    budget = _Budget(check_count(allowed, "allowed"))
    with _FunctionGuard(budget), _DispatchGuard(budget):
        yield
