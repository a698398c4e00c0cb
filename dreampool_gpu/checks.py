"""Value checks without host synchronisation: recorded on the device, raised at the next sync.

Reading a check's outcome (``bool(t.all())``) makes the host wait for the device: on
CUDA that is a stall in every training step. Under :func:`deferred` the value checks
of :mod:`dreampool_gpu._validation` record their outcome as a 0-d bool tensor in a
:class:`DeferredChecks` instead; the pool turns a failed call into empty results
(every id -1) with no effect on its state, and keeps the first failure's code in a
:class:`FaultFlag` on the device, which raises the typed error at the pool's next host
read (``add``'s one read, ``feedback``, or :meth:`DreamPool.check`). Saving, ``stats``
and ``state_dict`` neither raise nor carry it: a pending fault belongs to a call, not to
the pool's state (which that call did not change).

Shape, dtype, device and option checks stay immediate: they read no tensor values.
The policy is the config's ``checks`` (docs/api.md, "Checks and host synchronisation").

A call that reads the host anyway (``add``, ``feedback``) collects its range and finiteness
checks under :func:`bounded` instead: each checked tensor costs one ``aminmax``, and the
extremes ride in the call's one host transfer (:class:`Bounds`); when one fails, the call runs
its checks again immediately to name the argument.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from dreampool_gpu.errors import InvalidInputError

_ACTIVE: ContextVar[DeferredChecks | None] = ContextVar("dreampool_deferred_checks", default=None)
_BOUNDS: ContextVar[Bounds | None] = ContextVar("dreampool_bounds", default=None)
_CODES_PER_CALL = 64  # a call records at most this many checks (a retrieve or add records under 10)


class DeferredChecks:
    """The value checks of one call, as device tensors (no host read).

    Attributes:
        flags: 0-d bool tensors, True where a check passed.
        labels: ``(argument, expected)`` of each flag, on the host.
    """

    def __init__(self) -> None:
        self.flags: list[torch.Tensor] = []
        self.labels: list[tuple[str, str]] = []

    def record(self, ok: torch.Tensor, name: str, expected: str) -> None:
        """Add one check's outcome ``ok`` (0-d bool, on the checked tensor's device: the pool's)."""
        if len(self.flags) >= _CODES_PER_CALL:  # unreachable with the pool's own calls; a guard for new ones
            raise InvalidInputError(name, f"at most {_CODES_PER_CALL} deferred checks per call", len(self.flags))
        self.flags.append(ok)
        self.labels.append((name, expected))

    def first_failure(self, device: torch.device, offset: int = 0) -> torch.Tensor:
        """0-d int64 on ``device``: 0 when every check passed, else ``offset`` + 1 + the index of the first failed one.

        One ``where`` per check, from the last to the first (calls record a handful).
        """
        code = torch.zeros((), dtype=torch.int64, device=device)
        for i in range(len(self.flags) - 1, -1, -1):
            code = torch.where(self.flags[i], code, offset + i + 1)  # flags are on the pool's device
        return code


class Bounds:
    """The range and finiteness checks of one call as limits on each checked tensor's extremes.

    :meth:`extremes` gives two 0-d tensors (min, max) per checked tensor, one ``aminmax``
    each, for the caller to read with its own host transfer; :meth:`hold` judges the read
    values on the host. NaN fails every check (its extremes are NaN).
    """

    def __init__(self) -> None:
        self._slot: dict[int, int] = {}
        self._tensors: list[torch.Tensor] = []
        self._limits: list[tuple[float, float, bool]] = []  # (low, high, finite) per tensor

    def limit(self, t: torch.Tensor, low: float, high: float, *, finite: bool = False) -> None:
        """Require ``low <= t <= high`` everywhere (and finite values with ``finite``); ``t`` non-empty."""
        i = self._slot.get(id(t))
        if i is None:
            self._slot[id(t)] = len(self._tensors)
            self._tensors.append(t)
            self._limits.append((low, high, finite))
            return
        lo, hi, fin = self._limits[i]
        self._limits[i] = (max(lo, low), min(hi, high), fin or finite)

    def extremes(self) -> list[torch.Tensor]:
        """``[min_0, max_0, min_1, max_1, ...]`` 0-d tensors of the checked tensors (no host read)."""
        return [x for t in self._tensors for x in torch.aminmax(t)]

    def hold(self, values: Sequence[float]) -> bool:
        """Whether every limit holds, given :meth:`extremes` read on the host (as floats)."""
        for i, (low, high, finite) in enumerate(self._limits):
            lo, hi = values[2 * i], values[2 * i + 1]
            if not (low <= lo and hi <= high) or (finite and not (math.isfinite(lo) and math.isfinite(hi))):
                return False
        return True


def host_values(values: Sequence[torch.Tensor]) -> list[float]:
    """0-d tensors on one device, read on the host in one transfer (stacked in their promoted dtype:
    include a float64 one where counts above 2**24 must stay exact beside float32 values).

    On CPU, with no torch function mode active, each is read in place instead: there is no
    transfer to wait for, and stacking mixed dtypes costs more than the reads. (Under a mode,
    e.g. :func:`~dreampool_gpu.sync_guard.forbid_host_sync`, the read is the one stacked call
    it is on CUDA.)
    """
    if values[0].device.type == "cpu" and not torch._C._is_torch_function_mode_enabled():
        return [t.item() for t in values]
    return torch.stack(list(values)).tolist()


def bounds() -> Bounds | None:
    """The :class:`Bounds` collecting this context's range checks, or None."""
    return _BOUNDS.get()


@contextmanager
def bounded() -> Iterator[Bounds]:
    """Collect range and finiteness checks as :class:`Bounds` while inside (no tensor is reduced yet)."""
    collected = Bounds()
    token = _BOUNDS.set(collected)
    try:
        yield collected
    finally:
        _BOUNDS.reset(token)


def active() -> DeferredChecks | None:
    """The checks being deferred in this context, or None (checks are immediate)."""
    return _ACTIVE.get()


def sync_free() -> bool:
    """Whether the running call must not read device values on the host."""
    return _ACTIVE.get() is not None


@contextmanager
def deferred(enabled: bool = True) -> Iterator[DeferredChecks | None]:
    """Record value checks instead of reading them, while inside (a no-op when not ``enabled``)."""
    if not enabled:
        yield None
        return
    checks = DeferredChecks()
    token = _ACTIVE.set(checks)
    try:
        yield checks
    finally:
        _ACTIVE.reset(token)


@contextmanager
def immediate() -> Iterator[None]:
    """Read checks on the host while inside, even within :func:`deferred` (to name a failure)."""
    token, kept = _ACTIVE.set(None), _BOUNDS.set(None)
    try:
        yield
    finally:
        _BOUNDS.reset(kept)
        _ACTIVE.reset(token)


class FaultFlag:
    """The first failed deferred check of a pool, kept on its device until read.

    ``code`` is a 0-d int64 tensor: 0 while nothing failed. The host keeps a table of
    the check lists calls recorded (one row per distinct list, so the table stays small)
    to name the argument when the fault is raised.
    """

    def __init__(self, device: torch.device) -> None:
        self.code = torch.zeros((), dtype=torch.int64, device=device)
        self._rows: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
        self._table: list[tuple[str, tuple[tuple[str, str], ...]]] = []

    def to(self, device: torch.device) -> None:
        """Keep the flag on ``device`` from now on."""
        self.code = self.code.to(device)

    def record(self, call: str, checks: DeferredChecks) -> torch.Tensor:
        """Keep the first failure of ``checks`` (made by ``call``) unless an earlier one is kept.

        Returns:
            0-d bool on the flag's device: ``checks`` all passed.
        """
        device = self.code.device
        key = (call, tuple(checks.labels))
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = len(self._table)
            self._table.append(key)
        new = checks.first_failure(device, offset=row * _CODES_PER_CALL)
        torch.where(self.code > 0, self.code, new, out=self.code)  # in place: a captured graph keeps writing here
        return new == 0

    def error(self, code: int) -> InvalidInputError:
        """The typed error of a fault ``code`` (> 0) read from :attr:`code`."""
        call, labels = self._table[(code - 1) // _CODES_PER_CALL]
        name, expected = labels[(code - 1) % _CODES_PER_CALL]
        return InvalidInputError(
            name,
            expected,
            f"a value that failed this check in an earlier {call} call (checks='deferred': that call "
            "returned empty results and changed nothing)",
        )

    def clear(self) -> None:
        """Forget the kept failure (after raising it)."""
        self.code.zero_()

    def raise_code(self, code: int) -> None:
        """Raise the error of ``code`` (and clear the flag) when it is a fault."""
        if code > 0:
            self.clear()
            raise self.error(code)
