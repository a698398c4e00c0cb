"""Exception hierarchy of dreampool_gpu.

Every error derives from :class:`DreamPoolError` and from the builtin a caller
would naturally catch (``ValueError`` for bad input, ``RuntimeError`` for bad
state), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import errno
from typing import Any


class DreamPoolError(Exception):
    """Base class of every error raised by dreampool_gpu."""


class InvalidConfigurationError(DreamPoolError, ValueError):
    """A configuration field is outside its allowed range.

    Attributes:
        field: name of the offending field.
        value: the value that arrived.
        expected: what the field accepts.
    """

    def __init__(self, field: str, value: Any, expected: str) -> None:
        self.field = field
        self.value = value
        self.expected = expected
        super().__init__(f"invalid configuration {field}={value!r}: expected {expected}")


class InvalidInputError(DreamPoolError, ValueError):
    """An argument has a bad value: NaN/inf, out of range, wrong dtype, unknown name.

    Attributes:
        name: the argument.
        expected: what was expected.
        got: what arrived.
    """

    def __init__(self, name: str, expected: str, got: Any) -> None:
        self.name = name
        self.expected = expected
        self.got = got
        super().__init__(f"invalid {name}: expected {expected}, got {got}")


class DimensionMismatchError(DreamPoolError, ValueError):
    """A tensor has the wrong shape.

    Attributes:
        expected: the expected shape (or dimension), as text.
        got: the shape that arrived.
        context: the argument or operation concerned.
    """

    def __init__(self, expected: Any, got: Any, context: str) -> None:
        self.expected = expected
        self.got = got
        self.context = context
        super().__init__(f"{context}: expected shape {expected}, got {got}")


class IndexNotBuiltError(DreamPoolError, RuntimeError):
    """A search index was queried before it was built."""


class IndexStaleError(DreamPoolError, RuntimeError):
    """A derived structure was built from an older bank revision."""


class EncoderFitError(DreamPoolError, RuntimeError):
    """Training an encoder failed (the loss diverged); the pool is unchanged."""


class HostSyncError(DreamPoolError, RuntimeError):
    """An operation that makes the host wait for the device ran under
    :func:`~dreampool_gpu.sync_guard.forbid_host_sync`.

    Attributes:
        operation: what would have synchronised.
    """

    def __init__(self, operation: str) -> None:
        self.operation = operation
        super().__init__(f"host synchronisation under forbid_host_sync: {operation}")


class CapacityExceededError(DreamPoolError, RuntimeError):
    """An add does not fit the pool's capacity or memory budget (strict mode)."""


class DeviceUnavailableError(DreamPoolError, RuntimeError):
    """An explicitly requested device (e.g. ``cuda:1``) is not present."""


class CheckpointCorruptError(DreamPoolError, RuntimeError):
    """A checkpoint file is missing, truncated or fails its checksum.

    Attributes:
        path: the file concerned.
    """

    def __init__(self, path: Any, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"corrupt checkpoint file {path}: {reason}")


class CollectiveError(DreamPoolError, RuntimeError):
    """A torch.distributed collective of a sharded pool failed or timed out.

    Attributes:
        rank: the rank that saw the failure.
        collective: the operation concerned (``all_gather``, ``all_to_all``, ...).
    """

    def __init__(self, rank: int, collective: str, reason: str) -> None:
        self.rank = rank
        self.collective = collective
        super().__init__(
            f"rank {rank}: collective {collective} failed (a rank that did not take part, or a timeout): {reason}"
        )


class RankFailedError(DreamPoolError, RuntimeError):
    """Another rank of a batch job under torchrun failed (that rank raises its own error).

    Attributes:
        rank: the first rank that failed. step: what the ranks were doing. reason: its error, one line.
    """

    def __init__(self, rank: int, step: str, reason: str) -> None:
        self.rank = rank
        self.step = step
        self.reason = reason
        super().__init__(f"rank {rank} failed ({step}): {reason}")


class CheckpointNotFoundError(DreamPoolError, FileNotFoundError):
    """No checkpoint at a path (nothing there, and no copy left by an interrupted save).

    Attributes:
        path: the path asked for.
    """

    def __init__(self, path: Any, reason: str = "no such file or directory") -> None:
        self.path = path
        self.reason = reason
        super().__init__(errno.ENOENT, f"no checkpoint at {path}: {reason}")
        self.filename = str(path)

    def __str__(self) -> str:
        return f"no checkpoint at {self.path}: {self.reason}"


class InsufficientMemoryError(DreamPoolError, MemoryError):
    """A pool's preallocated storage does not fit the memory available on its device.

    Raised before anything is allocated.

    Attributes:
        field: the configuration field that sized the allocation.
        needed_bytes: bytes the allocation would take.
        available_bytes: bytes available on the device now.
    """

    def __init__(
        self, field: str, value: Any, needed_bytes: int, available_bytes: int, device: Any, advice: str | None = None
    ) -> None:
        self.field = field
        self.value = value
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes
        super().__init__(
            f"{field}={value!r} needs {needed_bytes:,} bytes on {device}, but {available_bytes:,} bytes "
            f"are available: {advice or f'lower {field}'}"
        )


class UnknownColumnError(DreamPoolError, KeyError):
    """A metadata column asked for by a name the pool does not have.

    Raised by the mapping of :meth:`DreamPool.metadata` and the one a ``where=`` callable
    receives (:mod:`dreampool_gpu.columns`); a ``KeyError``, so ``except KeyError`` works.

    Attributes:
        key: the name asked for.
        valid: the names the mapping has.
    """

    def __init__(self, key: Any, valid: list[str]) -> None:
        self.key = key
        self.valid = valid
        super().__init__(key)

    def __str__(self) -> str:
        return f"no metadata column {self.key!r}: the columns are {', '.join(self.valid)}"
