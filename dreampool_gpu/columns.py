"""The pool's metadata columns under one name each: in ``add``, ``metadata``, ``where=`` and the docs.

The names are the bank's (:func:`~dreampool_gpu.bank.column_specs`): ``ids``, ``class_label``,
``hue_category``, ``inserted_at``, ``coherence``, ... . :meth:`DreamPool.metadata` and the
mapping a ``where=`` callable receives are both :class:`Columns`: a dict under those names
whose integer columns (labels, ids, counts) are int64, so a label column is a
``cross_entropy`` target as it comes. The spellings of earlier releases (``class``, ``hue``,
``id``, ``age``, and ``add(class_labels=)``) still work for one release, with a
``DeprecationWarning``; any other name raises :class:`~dreampool_gpu.errors.UnknownColumnError`
listing the valid ones.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch

from dreampool_gpu.bank import TensorBank, column_specs
from dreampool_gpu.errors import InvalidInputError, UnknownColumnError

# the columns a ``where=`` callable receives, ``[capacity]`` each: the bank's scalar columns, in its order
WHERE_COLUMNS = tuple(name for name, spec in column_specs((1, 1, 1), 1, torch.float32).items() if spec.shape == ())
# old spelling -> the column's name (one release of DeprecationWarning)
RENAMED = {"id": "ids", "class": "class_label", "hue": "hue_category"}


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"the metadata column {old!r} is now called {new}; {old!r} stops working in the next release",
        DeprecationWarning,
        stacklevel=4,  # the caller's line: _deprecated <- _legacy <- __missing__/get <- caller
    )


class Columns(dict[str, torch.Tensor]):
    """Metadata columns by name (a dict); old spellings warn, unknown names raise.

    ``m["class"]``, ``m["hue"]``, ``m["id"]`` read ``class_label``, ``hue_category`` and ``ids``
    with a ``DeprecationWarning``; ``m["age"]`` (seconds since added, float32) reads
    ``time.time() - m["inserted_at"]`` with one. ``in`` and iteration see the names only.
    ``dict(m)`` is a plain dict (what ``torch.load(weights_only=True)`` reads back).

    Raises:
        UnknownColumnError: (a ``KeyError``) any other name, listing the columns.
    """

    def __missing__(self, key: str) -> torch.Tensor:
        return self._legacy(key)

    def get(self, key: str, default: Any = None) -> Any:
        """``m[key]`` (old spellings included), or ``default`` where the name is unknown."""
        if key in self:
            return dict.__getitem__(self, key)
        if key in RENAMED or key == "age":
            return self._legacy(key)
        return default

    def _legacy(self, key: str) -> torch.Tensor:
        new = RENAMED.get(key, "inserted_at" if key == "age" else None)
        if new is None or new not in self:
            raise UnknownColumnError(key, list(self))
        if key == "age":
            _deprecated("age", "inserted_at (age: time.time() - m['inserted_at'])")
            return (time.time() - dict.__getitem__(self, new)).float()
        _deprecated(key, new)
        return dict.__getitem__(self, new)


def as_returned(t: torch.Tensor, *, copy: bool = False) -> torch.Tensor:
    """A column as the pool hands it out: integer columns as int64 (labels, ids, counts), others as stored.

    With ``copy`` the result never shares memory with ``t``.
    """
    if t.dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
        return t.long()  # a new tensor
    return t.clone() if copy else t


def where_columns(bank: TensorBank) -> Columns:
    """What a ``where`` callable receives: :data:`WHERE_COLUMNS` as ``[capacity]`` copies on the bank's device.

    ``coherence``, ``energy``, ``violation``, ``utility`` (NaN before any feedback),
    ``util_mean`` float32; ``inserted_at`` float64 (``time.time()`` when added);
    ``ids``, ``class_label`` (-1 = none), ``hue_category``, ``usage``, ``feedback_count``
    int64; then the user columns (``PoolConfig.columns``), ``[capacity, *shape]`` each.
    Free slots have id -1 and never qualify, whatever the mask says.
    """
    names = (*WHERE_COLUMNS, *bank.user_names)
    return Columns({name: as_returned(bank.columns[name], copy=True) for name in names})


def renamed_argument(value: Any, old_value: Any, old: str, new: str, *, depth: int = 1) -> Any:
    """``value``, or ``old_value`` (passed under the old keyword ``old``, with a DeprecationWarning
    pointing ``depth`` frames above the function that calls this one: its caller by default).

    Raises:
        InvalidInputError: both keywords were given.
    """
    if old_value is None:
        return value
    if value is not None:
        raise InvalidInputError(old, f"{new}= alone ({old}= is its old name)", "both")
    warnings.warn(
        f"{old}= is now called {new}=; {old}= stops working in the next release",
        DeprecationWarning,
        stacklevel=2 + depth,
    )
    return old_value
