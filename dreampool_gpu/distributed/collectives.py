"""Bounded-wait collectives over one process group, and the agreement on errors.

Every collective call of a sharded pool first agrees on a status (one ``all_gather``
of a few int64, :meth:`Collectives.agree`): a rank whose input is bad makes every
rank raise the same error class, and no rank is left waiting in a data collective.
A failed collective, or one that a rank does not enter within ``timeout`` (default
:data:`DEFAULT_TIMEOUT_S`), raises :class:`~dreampool_gpu.errors.CollectiveError`.
Rows of mixed columns travel as bytes (:func:`_pack`, :func:`_unpack`).
"""

from __future__ import annotations

import builtins
import datetime
import hashlib
import math
import numbers
import pickle
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from dreampool_gpu import errors
from dreampool_gpu.errors import CollectiveError, DreamPoolError, InvalidConfigurationError, InvalidInputError

DEFAULT_TIMEOUT_S = 300.0
"""Seconds a rank waits in one collective of a sharded pool before it raises ``CollectiveError``
(the ``timeout`` argument of ``ShardedDreamPool``, bounded by the group's own timeout)."""


# ---------------------------------------------------------------- byte rows
# ---------------------------------------------------------------- byte rows
_Layout = list[tuple[str, torch.dtype, tuple[int, ...]]]


def _pack(columns: dict[str, torch.Tensor], rows: int) -> tuple[torch.Tensor, _Layout]:
    """``[rows, width]`` uint8: every ``[rows, ...]`` column's bytes side by side, and their layout."""
    parts, layout = [], []
    for name, t in columns.items():
        shape = tuple(t.shape[1:])
        width = math.prod(shape)
        parts.append(t.reshape(rows, width).contiguous().view(torch.uint8))
        layout.append((name, t.dtype, shape))
    return torch.cat(parts, dim=1), layout


def _unpack(buf: torch.Tensor, layout: _Layout) -> dict[str, torch.Tensor]:
    """Inverse of :func:`_pack` on ``[..., width]`` uint8 rows."""
    lead = tuple(buf.shape[:-1])
    flat = buf.reshape(-1, buf.shape[-1])
    out, start = {}, 0
    for name, dtype, shape in layout:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        part = flat[:, start : start + size].clone(memory_format=torch.contiguous_format).view(dtype)
        out[name] = part.reshape(*lead, *shape)
        start += size
    return out


def _seconds(timeout: Any) -> float:
    """``timeout`` (seconds > 0, or a ``datetime.timedelta``; None: the default) in seconds.

    Raises:
        InvalidInputError: anything else.
    """
    if timeout is None:
        return DEFAULT_TIMEOUT_S
    if isinstance(timeout, datetime.timedelta):
        value = timeout.total_seconds()
    elif isinstance(timeout, numbers.Real) and not isinstance(timeout, bool):
        value = float(timeout)
    else:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise InvalidInputError("timeout", "seconds > 0 (a number or a datetime.timedelta) or None", repr(timeout))
    return value


def _group_timeout(group: Any) -> float | None:
    """The timeout ``group`` was created with, in seconds (None where torch does not say)."""
    try:
        pg = group if group is not None else dist.distributed_c10d._get_default_group()
        backend = pg._get_backend(torch.device("cpu"))
        return float(backend.options._timeout.total_seconds())
    except (AttributeError, RuntimeError, ValueError):  # a private API: absent in some versions / backends
        return None


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` ``[n, ...]`` padded with zeros (or -1 for int64 ids) to ``[rows, ...]``."""
    missing = rows - t.shape[0]
    if missing <= 0:
        return t
    fill = -1 if t.dtype == torch.int64 else 0
    return torch.cat([t, torch.full((missing, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)])


def _require_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidConfigurationError(
            "torch.distributed", "not initialised", "init_process_group called on every rank first"
        )


def _fingerprint(data: bytes) -> int:
    """A signed int64 of the sha256 of ``data``: compared across ranks in an agreement."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little", signed=True)


def local(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """``(fn(), None)``, or ``(None, error)`` when ``fn`` raised: the error goes to
    :meth:`Collectives.agree`, which re-raises it on this rank after every rank has reported."""
    try:
        return fn(), None
    except Exception as exc:  # reported to every rank by agree, then re-raised there
        return None, exc


class Collectives:
    """One process group's collectives, each waiting at most :attr:`timeout` seconds.

    Attributes:
        group: the process group (None: the world). rank, world_size: within ``group``.
        device: where tensors travel (the CPU; a CUDA device under a pure NCCL backend).
        timeout: the bound on each collective's wait, in seconds.
        group_timeout: the timeout the group was created with (None where torch does not say).
    """

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        nccl = str(dist.get_backend(group)) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.group_timeout = _group_timeout(group)
        self.set_timeout(None)

    def follow(self, device: torch.device) -> None:
        """Under NCCL, communicate on ``device`` (a shard's CUDA device) from now on."""
        if device.type == "cuda" and "nccl" in str(dist.get_backend(self.group)):
            self.device = device

    def set_timeout(self, timeout: Any) -> None:
        """Bound every later collective's wait by ``timeout`` (see :func:`_seconds`) and the group's own."""
        seconds = _seconds(timeout)
        self.timeout = seconds if self.group_timeout is None else min(seconds, self.group_timeout)

    def run(self, name: str, start: Callable[[], Any]) -> None:
        """Start a collective (``async_op=True``) and wait for it at most :attr:`timeout` seconds.

        Raises:
            CollectiveError: the collective failed, or did not finish in time (a rank
                that never entered it). The group is then unusable: the unfinished
                operation stays posted on the other ranks.
        """
        try:
            work = start()
            if work is not None:
                work.wait(timeout=datetime.timedelta(seconds=self.timeout))
        except DreamPoolError:
            raise
        except RuntimeError as exc:  # gloo/NCCL failures and timeouts (DistBackendError is one)
            reason = str(exc).splitlines()[0] if str(exc) else repr(exc)
            if "timed out" in reason.lower() or "timeout" in reason.lower():
                reason += f" (waited up to {self.timeout:g} s: a rank that did not enter the call)"
            raise CollectiveError(self.rank, name, reason) from exc

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """``[W, *t.shape]`` on the communication device: every rank's ``t``."""
        t = t.to(self.device).contiguous()
        out = torch.empty((self.world_size, *t.shape), dtype=t.dtype, device=self.device)
        self.run("all_gather", lambda: dist.all_gather(list(out.unbind(0)), t, group=self.group, async_op=True))
        return out

    def all_to_all(self, rows: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        """Send ``send[r]`` consecutive rows of ``rows`` to rank r; receive ``recv[r]`` from each."""
        rows = rows.to(self.device).contiguous()
        out = torch.empty((sum(recv), *rows.shape[1:]), dtype=rows.dtype, device=self.device)
        self.run(
            "all_to_all",
            lambda: dist.all_to_all_single(
                out, rows, output_split_sizes=recv, input_split_sizes=send, group=self.group, async_op=True
            ),
        )
        return out

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device).contiguous()
        self.run("all_reduce", lambda: dist.all_reduce(t, group=self.group, async_op=True))
        return t

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order (two bounded all_gathers; only between
        ranks of one job: unpickling runs what a peer sent, as ``all_gather_object`` does)."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = self.all_gather(torch.tensor([data.numel()], dtype=torch.int64)).cpu()[:, 0].tolist()
        table = self.all_gather(_pad_rows(data, max(sizes))).cpu()
        return [pickle.loads(table[r, :n].numpy().tobytes()) for r, n in enumerate(sizes)]

    def broadcast(self, t: torch.Tensor, *, src: int) -> torch.Tensor:
        """``t`` of group rank ``src`` on every rank (same shape and dtype everywhere)."""
        t = t.contiguous()
        source = self.global_rank(src)
        self.run("broadcast", lambda: dist.broadcast(t, src=source, group=self.group, async_op=True))
        return t

    def global_rank(self, rank: int) -> int:
        """The world rank of ``rank`` of this pool's group (torch's ``src``/``dst`` are world ranks)."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def agree(self, fields: list[int], error: BaseException | None) -> torch.Tensor:
        """All-gather ``[failed, *fields]`` int64; raise on every rank when any rank failed.

        The failing rank re-raises its own error; the others raise the same error
        class with the failing rank's message. Returns the ``[W, len(fields)]`` fields.
        """
        row = torch.tensor([0 if error is None else 1, *fields], dtype=torch.int64)
        table = self.all_gather(row).cpu()
        if bool(table[:, 0].any()):
            self.raise_everywhere(error)
        return table[:, 1:]

    def raise_everywhere(self, error: BaseException | None) -> None:
        info = None
        if error is not None:
            attrs = {
                k: val if isinstance(val, (str, int, float, bool, type(None))) else repr(val)
                for k, val in vars(error).items()
            }
            info = (type(error).__name__, str(error), attrs)
        infos = self.all_gather_objects(info)
        if error is not None:
            raise error
        first = next(r for r, i in enumerate(infos) if i is not None)
        name, message, attrs = infos[first]
        cls = getattr(errors, name, None)
        builtin = getattr(builtins, name, None)
        exc: Exception
        if isinstance(cls, type) and issubclass(cls, DreamPoolError):
            exc = cls.__new__(cls)
            Exception.__init__(exc, f"rank {first}: {message}")
            exc.__dict__.update(attrs)
        elif isinstance(builtin, type) and issubclass(builtin, Exception):  # OSError from a save, ...
            exc = builtin(f"rank {first}: {message}")
        else:
            exc = DreamPoolError(f"rank {first}: {name}: {message}")
        raise exc
