"""User columns: per-entry tensors a pool stores beside its own (logits, task ids, targets, ...).

Declared by name in :attr:`PoolConfig.columns <dreampool_gpu.config.PoolConfig>` as
``{name: (shape, dtype)}``: ``shape`` the per-entry shape (a tuple of ints >= 0, ``()``
for a scalar), ``dtype`` one of :data:`USER_DTYPES`. The bank preallocates each as a
``[capacity, *shape]`` column filled with 0 (``False`` for bool) beside its own
(:func:`~dreampool_gpu.bank.column_specs`), so the memory budget, ``state_dict`` and
checkpoints carry them. ``add(..., columns={name: [N, *shape]})`` writes them with the
batch (:func:`checked_values`), ``metadata`` and ``where=`` read them, and
``DreamPool.update(ids, name=...)`` writes them by id (:mod:`dreampool_gpu.updates`).
"""

from __future__ import annotations

import keyword
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from dreampool_gpu import _validation as v
from dreampool_gpu.errors import InvalidConfigurationError, InvalidInputError

USER_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
"""The dtypes a user column may have, by name."""

RESERVED = frozenset(
    {
        # the bank's own columns (bank.column_specs)
        "ids",
        "embeddings",
        "dreams",
        "chroma",
        "spectral",
        "coherence",
        "energy",
        "violation",
        "utility",
        "util_mean",
        "feedback_count",
        "usage",
        "class_label",
        "hue_category",
        "inserted_at",
        # metadata's ``found``, the old spellings (columns.RENAMED, ``age``), add's own keywords
        "found",
        "id",
        "class",
        "hue",
        "age",
        "class_labels",
        "force",
        "columns",
    }
)
"""Names a user column may not take: the bank's own columns and the names ``metadata``,
``where=`` callables and ``add`` already give a meaning."""


class UserColumns(Mapping[str, tuple[tuple[int, ...], str]]):
    """Declared user columns: an immutable, hashable mapping ``name -> (shape, dtype name)``, sorted by name.

    Built by :func:`parse_columns`; equal to a dict of the same declarations. :meth:`specs` gives
    ``name -> (shape, torch dtype)``.
    """

    def __init__(self, items: tuple[tuple[str, tuple[int, ...], str], ...] = ()) -> None:
        self._items = items
        self._map = {name: (shape, dtype) for name, shape, dtype in items}

    def __getitem__(self, name: str) -> tuple[tuple[int, ...], str]:
        return self._map[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        return repr(self._map)

    def specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """``name -> (shape, torch dtype)``, sorted by name."""
        return {name: (shape, USER_DTYPES[dtype]) for name, shape, dtype in self._items}

    def to_dict(self) -> dict[str, list[Any]]:
        """JSON/YAML-safe form: ``{name: [[*shape], dtype]}`` (what :func:`parse_columns` reads back)."""
        return {name: [list(shape), dtype] for name, shape, dtype in self._items}


def parse_columns(value: Any) -> UserColumns:
    """Check the ``columns`` field of a configuration and normalise it.

    Accepts None (no columns), a :class:`UserColumns`, or a mapping ``name -> (shape, dtype)``
    where ``(shape, dtype)`` is a pair (tuple or list; YAML/JSON give lists) or a mapping with
    keys ``shape`` and ``dtype``; ``shape`` is a sequence of ints >= 0 (``[]`` for a scalar).

    Raises:
        InvalidConfigurationError: naming ``columns`` (or ``columns[name]``) and what is allowed.
    """
    if value is None:
        return UserColumns()
    if isinstance(value, UserColumns):
        return value
    if not isinstance(value, Mapping):
        raise InvalidConfigurationError("columns", value, "a mapping of name -> (shape, dtype), or None")
    items = []
    for name, decl in value.items():
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise InvalidConfigurationError(
                "columns", name, "column names that are Python identifiers (update(ids, name=...) takes them)"
            )
        if name in RESERVED:
            raise InvalidConfigurationError(
                "columns", name, f"a name other than the pool's own ({', '.join(sorted(RESERVED))})"
            )
        where = f"columns[{name!r}]"
        if isinstance(decl, Mapping) and set(decl) == {"shape", "dtype"}:
            decl = (decl["shape"], decl["dtype"])
        if isinstance(decl, str) or not isinstance(decl, (tuple, list)) or len(decl) != 2:
            raise InvalidConfigurationError(where, decl, "a pair (shape, dtype), e.g. ((10,), 'float32')")
        shape, dtype = decl
        if (
            isinstance(shape, str)
            or not isinstance(shape, (tuple, list))
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
        ):
            raise InvalidConfigurationError(where, shape, "a shape: a tuple of ints >= 0, () for a scalar")
        if not isinstance(dtype, str) or dtype not in USER_DTYPES:
            raise InvalidConfigurationError(where, dtype, f"a dtype among {', '.join(USER_DTYPES)}")
        items.append((name, tuple(shape), dtype))
    return UserColumns(tuple(sorted(items)))  # one order wherever it is declared or read back (JSON sorts keys)


def checked_values(declared: UserColumns, given: Any, n: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The user columns of a batch of ``n`` entries, checked and cast: ``name -> [n, *shape]`` on ``device``.

    ``given`` is None or a mapping of declared names to tensors (arrays, lists; a 0-d value is
    broadcast to every entry). Columns not given are left out (the
    bank writes their fill value). Checked like every input: the dtype must cast to the
    declared one without changing kind (floats into a float column; ints or bools into an int
    column; bools into a bool column), float values must be finite and fit the declared float
    dtype (no overflow to inf, e.g. above 65504 for float16), int32 values fit int32.
    Value checks join the caller's :func:`~dreampool_gpu.checks.bounded` read when inside one.

    Raises:
        InvalidInputError: an unknown name, a dtype that does not cast, non-finite values
            (named ``columns['name']``).
        DimensionMismatchError: a value not of shape ``[n, *shape]``.
    """
    if given is None:
        return {}
    if not isinstance(given, Mapping):
        raise InvalidInputError("columns", "a mapping of declared column name -> [N, ...] tensor", type(given).__name__)
    specs = declared.specs()
    out = {}
    for name, value in given.items():
        if name not in specs:
            names = ", ".join(specs) if specs else "none (declare them in PoolConfig(columns=...))"
            raise InvalidInputError("columns", f"names of the declared columns: {names}", repr(name))
        out[name] = checked_column(f"columns[{name!r}]", value, specs[name], (n,), device)
    return out


def checked_column(
    label: str, value: Any, spec: tuple[tuple[int, ...], torch.dtype], lead: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """One user column's values for entries laid out as ``lead``: ``[*lead, *shape]`` of the declared dtype.

    ``label`` names the argument in errors; checks as :func:`checked_values`.
    """
    shape, dtype = spec
    t = v.as_tensor(value, label, device=device)
    if t.is_complex() or not torch.can_cast(t.dtype, dtype):
        raise InvalidInputError(label, f"values castable to {str(dtype).removeprefix('torch.')}", f"dtype {t.dtype}")
    if t.dim() == 0:  # one value for every entry (e.g. the batch's task id)
        t = t.expand(*lead, *shape)
    v.check_shape(t, (*lead, *shape), label)
    if t.is_floating_point():
        v.check_finite(t, label)
    if dtype.is_floating_point and t.dtype != torch.bool:  # values the cast would turn into inf
        top = torch.finfo(dtype).max
        source = torch.finfo(t.dtype).max if t.is_floating_point() else torch.iinfo(t.dtype).max
        if source > top:
            v.check_range(t, label, -top, top)
    elif dtype == torch.int32 and t.dtype == torch.int64:
        info = torch.iinfo(torch.int32)
        v.check_int_range(t, label, info.min, info.max, f"int32 values in [{info.min}, {info.max}]")
    return t.to(dtype)
