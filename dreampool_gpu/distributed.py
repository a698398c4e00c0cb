"""ShardedDreamPool: one pool across the ranks of a torch.distributed group.

Every rank holds one shard, a :class:`~dreampool_gpu.pool.DreamPool` on its own
device with its own capacity, budget and eviction. Methods other than a local
``add`` and ``to`` are collectives: every rank of the group calls them, in the same
order. The replay calls of :class:`DreamPool` (``retrieve`` with every option,
``sample``, ``len``, ``stats``, ``diversity``, ``fit_encoder``) have the same
signatures; ``where`` is a callable run on every shard (a mask is refused).

Ids are global: ``id = tag << 40 | counter``. A fresh shard issues ids in tag
``rank``; the owner of an id is ``tag % world_size``. A shard stores the global
ids in its bank, so ids survive save and load, and a re-sharded load (another
world size) keeps every id. The pool's age order, used to break ties (oldest
first), is the global id order: tag first, then insertion order within the tag.
A single :class:`DreamPool` that received the same entries in global id order
answers every retrieval exactly as the sharded pool does.

Every collective call first agrees on a status (one ``all_gather`` of a few
int64): a rank whose input is bad makes every rank raise the same error class,
and no rank is left waiting in a data collective. A failed collective, or one
that a rank does not enter within the pool's ``timeout`` (default
:data:`DEFAULT_TIMEOUT_S`), raises :class:`~dreampool_gpu.errors.CollectiveError`.
"""

from __future__ import annotations

import builtins
import copy
import dataclasses
import datetime
import errno
import hashlib
import json
import math
import numbers
import os
import pickle
import re
import shutil
import struct
import time
import types
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist

from dreampool_gpu import _validation as v
from dreampool_gpu import checkpointing, errors, persist, user_columns
from dreampool_gpu.atomic import atomic_write, fsync_path, write_synced
from dreampool_gpu.columns import Columns, as_returned, renamed_argument
from dreampool_gpu.config import DREAM_DTYPES, PoolConfig, RetrievalMode
from dreampool_gpu.counters import COUNTERS
from dreampool_gpu.devices import resolve_device
from dreampool_gpu.dreams import validate_dreams
from dreampool_gpu.encoders import FeatureEncoder
from dreampool_gpu.errors import (
    CheckpointCorruptError,
    CollectiveError,
    DreamPoolError,
    InvalidConfigurationError,
    InvalidInputError,
)
from dreampool_gpu.fitting import FitReport, train_encoder
from dreampool_gpu.learned import LearnedEncoder, ModuleEncoder
from dreampool_gpu.merge import merge_candidates
from dreampool_gpu.pool import DreamPool, Retrieval
from dreampool_gpu.rerank import diversity_stats, mmr_row_bytes, row_chunks
from dreampool_gpu.retrieval import request, stages
from dreampool_gpu.retrieval.modes import EMBEDDING_MODES, MODES, RERANK_MODES
from dreampool_gpu.retrieval.request import Queries
from dreampool_gpu.retrieval.topk import empty_results, pad_results
from dreampool_gpu.stats import CacheStats, PoolStats
from dreampool_gpu.updates import checked_update

TAG_BITS = 40
SHARDED_FORMAT = "dreampool-sharded-checkpoint"
SHARDED_VERSION = 2  # 2: each shard listed with its rank, generation and manifest sha256 (1 is still read)
_MANIFEST = "manifest.json"
_MANIFEST_MAX = 1 << 20  # bytes: a manifest listing ~1,000 shards
_GENERATION = re.compile(r"gen-[0-9a-f]{16,32}")  # version 1 wrote 16 digits; uuid4 hex is 32
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TAG = re.compile(r"0|[1-9][0-9]{0,7}")  # a tag as a JSON key, in canonical form
_MAX_TAG = (1 << (63 - TAG_BITS)) - 1  # ids are int64
_MODES = list(RetrievalMode)
_USER = "user:"  # prefix of user columns among a routed batch's columns
_ROUTES = ("least_full",)  # routes of a collective add ("local" is not one)
# fields of PoolConfig that may differ between shards; every other field must agree
_PER_SHARD_FIELDS = ("capacity", "device", "memory_budget_mb")
DEFAULT_TIMEOUT_S = 300.0
"""Seconds a rank waits in one collective of a sharded pool before it raises ``CollectiveError``
(the ``timeout`` argument of ``ShardedDreamPool``, bounded by the group's own timeout)."""


def owner_of(ids: torch.Tensor, world_size: int) -> torch.Tensor:
    """Rank owning each global id (any shape, int64): ``(id >> 40) % world_size``; 0 for -1."""
    return torch.where(ids >= 0, (ids >> TAG_BITS) % world_size, torch.zeros_like(ids))


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


def _bits(x: float) -> int:
    """The float64 bit pattern of ``x`` as an int (exact comparison across ranks)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


# the retrieve arguments every rank must share, in the order of _Request.fields (after the counts)
_AGREED = (
    "mode",
    "k",
    "fetch_k",
    "mmr_lambda",
    "min_dispersion",
    "utility_threshold",
    "classes",
    "category",
    "with_dreams",
    "chroma_metric",
    "where",
)


@dataclass
class _Request:
    """One rank's checked retrieve: the single pool's request, over this rank's shard.

    ``r.keep`` is this shard's ``where`` mask; ``embedded`` the ``[B, D]`` query
    embeddings of an embedding mode; ``passing`` the shard's live entries passing
    ``where``; ``where_print`` a fingerprint of the ``where`` function (0: none).
    """

    r: request.Request
    embedded: torch.Tensor | None
    with_dreams: bool
    passing: int
    where_print: int

    def fields(self) -> list[int]:
        """Status fields: this rank's counts, then the arguments of :data:`_AGREED`."""
        r = self.r
        return [
            r.q.count,
            self.passing,
            _MODES.index(r.mode),
            r.k,
            r.fetch,
            _bits(r.lam),
            _bits(r.min_dispersion),
            _bits(r.utility_threshold),
            _crc(repr(r.classes)),
            int(r.categories is not None),
            int(self.with_dreams),
            stages.CHROMA_METRICS.index(r.chroma_metric),
            self.where_print,
        ]


def _shard_where(where: Any) -> Any:
    """``where`` as a sharded pool takes it: None or a callable of the metadata columns.

    A ``[capacity]`` mask names the slots of one pool; a sharded pool has a bank per
    shard, so a mask is refused rather than applied to an unknown shard.

    Raises:
        InvalidInputError: a tensor, array or anything else that is not callable.
    """
    if where is None or (callable(where) and not isinstance(where, (torch.Tensor, np.ndarray))):
        return where
    raise InvalidInputError(
        "where",
        "None or a callable of the metadata columns, run on every shard "
        "(a [capacity] mask names the slots of one pool, and a sharded pool has one bank per shard)",
        type(where).__name__,
    )


def _where_print(where: Any) -> int:
    """A fingerprint of a ``where`` callable's code (0 for None), compared across ranks.

    Functions and lambdas by their bytecode, constants and names, nested code (a
    comprehension) included, not by the values a closure captures; ``functools.partial``
    by its function and arguments; other callables by their type.
    """
    if where is None:
        return 0
    func = getattr(where, "func", where)  # functools.partial
    code = getattr(func, "__code__", None)
    text = type(where).__qualname__ if not isinstance(code, types.CodeType) else _code_text(code)
    if func is not where:
        text += repr((getattr(where, "args", ()), sorted(getattr(where, "keywords", {}).items())))
    return _fingerprint(text.encode())


def _code_text(code: types.CodeType) -> str:
    """``code`` as text that is the same in every process (no addresses, no set order)."""

    def const(c: Any) -> str:
        if isinstance(c, types.CodeType):
            return _code_text(c)
        if isinstance(c, (tuple, frozenset)):
            parts = [const(x) for x in c]
            return f"{type(c).__name__}({sorted(parts) if isinstance(c, frozenset) else parts})"
        return repr(c)

    return repr((code.co_code, [const(c) for c in code.co_consts], code.co_names))


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


class ShardedDreamPool:
    """A dream pool sharded over the ranks of a torch.distributed group.

    Create it on every rank after ``torch.distributed.init_process_group`` (gloo on
    CPU, NCCL on CUDA). With a CUDA device in ``config`` and no index, each rank's
    shard goes to ``torch.cuda.current_device()`` (set it to the local rank, as DDP does).

    Args:
        config: the pool configuration; every field but capacity, device and
            memory budget must be the same on every rank.

    Keyword Args:
        group: the process group (default: the world).
        encoder: handed to each shard's :class:`DreamPool` when given.
        timeout: seconds (or a ``datetime.timedelta``) a rank waits in one collective
            before it raises :class:`~dreampool_gpu.errors.CollectiveError`; default
            :data:`DEFAULT_TIMEOUT_S` (300), and never longer than the group's own timeout.

    Attributes:
        shard: this rank's :class:`DreamPool`. rank, world_size: within ``group``.
        timeout: the bound on each collective's wait, in seconds.
    """

    def __init__(
        self, config: PoolConfig | None = None, *, group: Any = None, encoder: Any = None, timeout: Any = None
    ) -> None:
        _require_group()
        self._bind(group)

        def build() -> DreamPool:
            self._set_timeout(timeout)
            if config is not None and not isinstance(config, PoolConfig):
                raise InvalidConfigurationError("config", type(config).__name__, "a PoolConfig (or None)")
            extra = {} if encoder is None else {"encoder": encoder}
            shard = DreamPool(_rank_config(config if config is not None else PoolConfig()), **extra)
            shard.bank.next_id = self.rank << TAG_BITS
            return shard

        shard, error = self._local(build)
        self._attach(shard, {self.rank: self.rank << TAG_BITS}, error)

    def _bind(self, group: Any) -> None:
        """Take ``group``'s rank and size; communicate on the CPU (CUDA under a pure NCCL backend)."""
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        nccl = str(dist.get_backend(group)) == "nccl"
        self._comm = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self._group_timeout = _group_timeout(group)
        self._set_timeout(None)

    def _set_timeout(self, timeout: Any) -> None:
        """Bound every later collective's wait by ``timeout`` (see :func:`_seconds`) and the group's own."""
        seconds = _seconds(timeout)
        self.timeout = seconds if self._group_timeout is None else min(seconds, self._group_timeout)

    def _attach(self, shard: DreamPool | None, watermarks: dict[int, int], error: BaseException | None) -> None:
        """Adopt ``shard`` and agree with the other ranks on the configuration and encoder kind (collective).

        ``error``: this rank could not build its shard; every rank raises it after the agreement.
        """
        fields = [0, 0, 0]
        if shard is not None:
            if isinstance(shard.encoder, FeatureEncoder):  # statistics are the pool's, refit collectively
                shard.encoder.auto_refit = False
            if shard.device.type == "cuda" and "nccl" in str(dist.get_backend(self.group)):
                self._comm = shard.device
            shared = {k: val for k, val in shard.config.to_dict().items() if k not in _PER_SHARD_FIELDS}
            fields = [
                _fingerprint(json.dumps(shared, sort_keys=True, default=str).encode()),
                _fingerprint(persist.encoder_kind(shard.encoder).encode()),
                shard.capacity,
            ]
        table = self._agree(fields, error)
        if bool((table[:, 0] != table[0, 0]).any()):
            raise InvalidConfigurationError(
                "config", "differs between ranks", f"the same configuration on every rank (except {_PER_SHARD_FIELDS})"
            )
        if bool((table[:, 1] != table[0, 1]).any()):
            raise InvalidConfigurationError(
                "encoder", "differs between ranks", "the same kind of encoder on every rank"
            )
        self.shard = cast(DreamPool, shard)  # built: _agree raised on every rank otherwise
        # tags this shard owns -> the next id it would issue there; the issuing tag's is bank.next_id
        self._watermarks = dict(watermarks)
        self._issuing = max(self._watermarks, key=lambda t: self._watermarks[t])
        self.total_capacity = int(table[:, 2].sum())

    # ----------------------------------------------------------- collectives
    def _run(self, name: str, start: Callable[[], Any]) -> None:
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

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """``[W, *t.shape]`` on the communication device: every rank's ``t``."""
        t = t.to(self._comm).contiguous()
        out = torch.empty((self.world_size, *t.shape), dtype=t.dtype, device=self._comm)
        self._run("all_gather", lambda: dist.all_gather(list(out.unbind(0)), t, group=self.group, async_op=True))
        return out

    def _all_to_all(self, rows: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        """Send ``send[r]`` consecutive rows of ``rows`` to rank r; receive ``recv[r]`` from each."""
        rows = rows.to(self._comm).contiguous()
        out = torch.empty((sum(recv), *rows.shape[1:]), dtype=rows.dtype, device=self._comm)
        self._run(
            "all_to_all",
            lambda: dist.all_to_all_single(
                out, rows, output_split_sizes=recv, input_split_sizes=send, group=self.group, async_op=True
            ),
        )
        return out

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self._comm).contiguous()
        self._run("all_reduce", lambda: dist.all_reduce(t, group=self.group, async_op=True))
        return t

    def _all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order (two bounded all_gathers; only between
        ranks of one job: unpickling runs what a peer sent, as ``all_gather_object`` does)."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = self._all_gather(torch.tensor([data.numel()], dtype=torch.int64)).cpu()[:, 0].tolist()
        table = self._all_gather(_pad_rows(data, max(sizes))).cpu()
        return [pickle.loads(table[r, :n].numpy().tobytes()) for r, n in enumerate(sizes)]

    def _agree(self, fields: list[int], error: BaseException | None) -> torch.Tensor:
        """All-gather ``[failed, *fields]`` int64; raise on every rank when any rank failed.

        The failing rank re-raises its own error; the others raise the same error
        class with the failing rank's message. Returns the ``[W, len(fields)]`` fields.
        """
        row = torch.tensor([0 if error is None else 1, *fields], dtype=torch.int64)
        table = self._all_gather(row).cpu()
        if bool(table[:, 0].any()):
            self._raise_everywhere(error)
        return table[:, 1:]

    def _raise_everywhere(self, error: BaseException | None) -> None:
        info = None
        if error is not None:
            attrs = {
                k: val if isinstance(val, (str, int, float, bool, type(None))) else repr(val)
                for k, val in vars(error).items()
            }
            info = (type(error).__name__, str(error), attrs)
        infos = self._all_gather_objects(info)
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

    def _local(self, fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
        try:
            return fn(), None
        except Exception as exc:  # reported to every rank by _agree, then re-raised here
            return None, exc

    # ------------------------------------------------------------------- add
    def add(
        self,
        dreams: Any,
        *,
        coherence: Any = None,
        energy: Any = None,
        violation: Any = None,
        class_label: Any = None,
        force: bool = False,
        route: str = "local",
        columns: Any = None,
        class_labels: Any = None,
    ) -> torch.Tensor:
        """Add a batch of dreams; returns ``[N]`` global ids (-1 where rejected or dropped).

        ``route="local"`` (default) adds to this rank's shard, with no communication:
        only this rank calls it. ``route="least_full"`` is a collective: every rank
        passes its batch (any size, 0 included), and the shard with the lowest fill
        fraction (ties to the lower rank) adds every rank's batch, in rank order, as
        one :meth:`DreamPool.add`. The coherence gate is the same on every shard.
        Arguments as :meth:`DreamPool.add` (``columns``: the user columns, on either route).
        Any other ``route`` is taken as a collective call and refused on every rank
        (``InvalidInputError``), as is a ``route`` or ``force`` that differs between ranks.
        """
        class_label = renamed_argument(class_label, class_labels, "class_labels", "class_label")
        if coherence is None and force is True:
            coherence = 1.0
        if isinstance(route, str) and route == "local":
            return self.shard.add(
                dreams,
                coherence=coherence,
                energy=energy,
                violation=violation,
                class_label=class_label,
                force=force,
                columns=columns,
            )
        return self._add_routed(dreams, coherence, energy, violation, class_label, force, route, columns)

    def _add_routed(
        self,
        dreams: Any,
        coherence: Any,
        energy: Any,
        violation: Any,
        class_labels: Any,
        force: Any,
        route: Any,
        columns: Any,
    ) -> torch.Tensor:
        shard = self.shard

        def parse() -> dict[str, torch.Tensor]:
            if not (isinstance(route, str) and route in _ROUTES):
                raise InvalidInputError("route", " or ".join(map(repr, ("local", *_ROUTES))), repr(route)[:80])
            v.check_flag(force, "force")
            batch = validate_dreams(
                v.as_tensor(dreams, "dreams", device=shard.device), dream_shape=shard.config.dream_shape
            )
            n = batch.shape[0]
            if coherence is None:
                raise InvalidInputError("coherence", "[N] values in [0, 1]; optional only with force=True", None)
            return {
                "dreams": batch.float(),
                "coherence": shard._per_dream(coherence, n, "coherence", 0.0, 1.0),
                "energy": shard._per_dream(energy, n, "energy", 0.0, float("inf")),
                "violation": shard._per_dream(violation, n, "violation", 0.0, 1.0),
                "class_labels": shard._labels(class_labels, n, "class_label"),
                **_user_rows(shard, columns, n),
            }

        cols, error = self._local(parse)
        n = 0 if cols is None else int(cols["coherence"].shape[0])
        agreed = [0, 0] if cols is None else [_ROUTES.index(route), int(v.check_flag(force, "force"))]
        table = self._agree([n, *agreed, shard.bank.size, shard.capacity], error)
        if bool((table[:, 1] != table[0, 1]).any()):
            raise InvalidInputError("route", "the same on every rank", [_ROUTES[i] for i in table[:, 1].tolist()])
        if bool((table[:, 2] != table[0, 2]).any()):
            raise InvalidInputError("force", "the same on every rank", table[:, 2].tolist())
        counts = table[:, 0].tolist()
        fill = table[:, 3].double() / table[:, 4].double()
        owner = int(torch.argmin(fill))  # the first minimum: ties to the lower rank
        nmax = max(counts)
        rows, layout = _pack({name: _pad_rows(t, nmax) for name, t in cols.items()}, nmax)
        gathered = [torch.empty_like(rows, device=self._comm) for _ in range(self.world_size)]
        self._run(
            "gather",
            lambda: dist.gather(
                rows.to(self._comm),
                gathered if self.rank == owner else None,
                dst=self._global_rank(owner),
                group=self.group,
                async_op=True,
            ),
        )
        ids, error = None, None
        if self.rank == owner:
            parts = [_unpack(g[:c], layout) for g, c in zip(gathered, counts, strict=False)]
            union = {name: torch.cat([p[name] for p in parts]).to(shard.device) for name, _, _ in layout}
            ids, error = self._local(
                lambda: shard.add(
                    union["dreams"],
                    coherence=union["coherence"],
                    energy=union["energy"],
                    violation=union["violation"],
                    class_label=union["class_labels"],
                    force=bool(force),
                    columns={name: union[_USER + name] for name in shard.bank.user_names},
                )
            )
        self._agree([], error)
        out = ids.to(self._comm) if ids is not None else torch.empty(sum(counts), dtype=torch.int64, device=self._comm)
        out = self._broadcast(out, src=owner)
        start = sum(counts[: self.rank])
        return out[start : start + n].to(shard.device)

    # -------------------------------------------------------------- retrieve
    def retrieve(
        self,
        queries: Any,
        *,
        k: int | None = None,
        mode: str | RetrievalMode | None = None,
        class_hint: Any = None,
        classes: Sequence[int] | None = None,
        category: Any = None,
        utility_threshold: float = 0.0,
        utility_prior: Any = None,
        fetch_k: int | None = None,
        mmr_lambda: float | None = None,
        min_dispersion: float = 0.0,
        with_dreams: bool = False,
        where: Any = None,
        chroma_metric: str = "cosine",
    ) -> Retrieval:
        """Retrieve over the whole pool for this rank's queries (collective; any B, 0 included).

        Arguments and result as :meth:`DreamPool.retrieve`, except ``where``: None or a
        callable of the metadata columns (as :meth:`DreamPool.retrieve` passes them), run
        on every shard over that shard's entries (a ``[capacity]`` mask is refused:
        it names the slots of one pool). Every rank must pass the same mode, k,
        fetch_k, mmr_lambda, min_dispersion, utility_threshold, classes, with_dreams,
        chroma_metric and ``where`` function (compared by its code), and give a
        category filter or not alike; a difference raises ``InvalidInputError`` naming
        the argument, on every rank. The result equals that of one :class:`DreamPool`
        holding every shard's entries in global id order.
        """
        shard = self.shard
        options = dict(
            k=k,
            mode=mode,
            class_hint=class_hint,
            classes=classes,
            category=category,
            utility_threshold=utility_threshold,
            utility_prior=utility_prior,
            fetch_k=fetch_k,
            mmr_lambda=mmr_lambda,
            min_dispersion=min_dispersion,
            where=where,
            chroma_metric=chroma_metric,
        )
        req, error = self._local(lambda: self._parse(queries, options, with_dreams))
        fields = [0] * (2 + len(_AGREED)) if req is None else req.fields()
        table = self._agree([*fields, shard.counters["added"]], error)
        for i, name in enumerate(_AGREED):
            column = table[:, 2 + i]
            if bool((column != column[0]).any()):
                differ = torch.nonzero(column != column[0]).squeeze(1).tolist()
                raise InvalidInputError(name, "the same value on every rank", f"rank(s) {differ} differ from rank 0")
        self._refit_if_due(int(table[:, -1].sum()))
        counts, sizes = table[:, 0].tolist(), table[:, 1].tolist()
        if req.r.mode is RetrievalMode.DIVERSE:
            scores, ids = self._diverse(req, sizes)
        else:
            scores, ids = self._sharded_topk(req, counts)
        with shard._lock:
            shard.counters["queries"] += req.r.q.count
        flat = ids.reshape(-1)
        self._count_usage(flat, [c * ids.shape[1] for c in counts])
        dreams = None
        if req.with_dreams:
            found = self._lookup(flat, [c * ids.shape[1] for c in counts], ("dreams",))
            dreams = found["dreams"].reshape(*ids.shape, *found["dreams"].shape[1:])
        return Retrieval(ids=ids, scores=scores, dreams=dreams)

    def _refit_if_due(self, added: int) -> None:
        """Collective: refit the feature encoder's statistics over every shard when ``added``
        (entries added to the whole pool) doubled since the last fit; shards re-embed."""
        encoder = self.shard.encoder
        if isinstance(encoder, FeatureEncoder) and added > 0 and added >= 2 * encoder.fitted_on:
            self._refit(added)

    def refit_statistics(self, *, fitted_on: int | None = None) -> None:
        """Collective: fit the feature encoder's standardisation on the union of the shards.

        One ``all_reduce`` of per-feature sums, sums of squares and the count; every
        shard then holds identical statistics and re-embeds its entries (as a single
        pool's automatic refit does). Runs by itself inside :meth:`retrieve` whenever
        the pool's count of added entries doubles. A no-op for other encoders.

        Raises:
            InvalidInputError: (on every rank) ``fitted_on`` is not None or an int >= 0
                on some rank, or differs between ranks.
        """

        def check() -> int:
            if fitted_on is None:
                return -1
            if isinstance(fitted_on, bool) or not isinstance(fitted_on, numbers.Integral) or fitted_on < 0:
                raise InvalidInputError("fitted_on", "None or an int >= 0", repr(fitted_on)[:80])
            return int(fitted_on)

        value, error = self._local(check)
        table = self._agree([0 if value is None else value], error)
        if bool((table[:, 0] != table[0, 0]).any()):
            raise InvalidInputError("fitted_on", "the same on every rank", table[:, 0].tolist())
        self._refit(None if value == -1 else value)

    def _refit(self, fitted_on: int | None) -> None:
        """The collective part of :meth:`refit_statistics` (arguments already agreed)."""
        shard = self.shard
        if not isinstance(shard.encoder, FeatureEncoder):
            return
        with shard._lock:
            live = shard.bank.slots_by_age()
            cols = shard.bank.columns
            c = shard.encoder.content(cols["chroma"][live], cols["spectral"][live]).double()
            local = torch.cat(
                [c.sum(0), c.square().sum(0), torch.tensor([float(c.shape[0])], dtype=torch.float64, device=c.device)]
            )
        total = self._all_reduce(local.to(self._comm)).to(shard.device)
        d = c.shape[1]
        n = float(total[-1])
        if n == 0:
            return
        mean = total[:d] / n
        var = total[d : 2 * d] / n - mean.square()
        added = (
            fitted_on
            if fitted_on is not None
            else int(
                self._all_reduce(torch.tensor([shard.counters["added"]], dtype=torch.float64, device=self._comm))[0]
            )
        )
        with shard._lock:
            candidate = copy.deepcopy(shard.encoder)
            candidate.set_statistics(mean, var, fitted_on=added)
            shard._install_embeddings(*shard._embed_live(candidate), candidate)

    def fit_encoder(
        self,
        *,
        steps: int = 200,
        batch_size: int = 256,
        lr: float = 2e-3,
        seed: int = 0,
        colour_jitter: float = 0.05,
        progress: bool = False,
    ) -> FitReport:
        """Train the shared encoder data-parallel over the shards, then re-embed every shard (collective).

        As :meth:`DreamPool.fit_encoder`, with every rank a data-parallel worker: the
        training starts from rank 0's encoder weights (broadcast); each step every rank
        draws ``batch_size`` entries of its own shard (its generator seeded with
        ``seed + rank * 2**32``), and one ``all_reduce`` averages the gradients and the
        loss over the ranks, so every rank takes the same step and ends with the same
        encoder. Every rank then re-embeds its shard. All or nothing on every rank: a
        diverged loss is seen by every rank at the same step, and the pools are
        unchanged. Arguments must be the same on every rank; every shard holds >= 2 entries.

        Returns:
            :class:`FitReport`: the losses averaged over the ranks; ``entries`` and
            ``labelled`` of the whole pool.

        Raises:
            InvalidConfigurationError: (on every rank) the encoder is not trainable.
            InvalidInputError: (on every rank) a bad or differing argument, or a shard with fewer than 2 entries.
            EncoderFitError: (on every rank) the loss became NaN or infinite.
        """
        shard = self.shard
        names = ("steps", "batch_size", "lr", "seed", "colour_jitter")

        def check() -> list[int]:
            _check_fit(shard, steps, batch_size, lr, seed, colour_jitter)
            with shard._lock:
                shard._check_fresh()
                live = shard.bank.slots_by_age()
                labelled = int((shard.bank.columns["class_label"][live] >= 0).sum())
            values = (int(steps), int(batch_size), float(lr), int(seed), float(colour_jitter))
            return [live.numel(), labelled, *(_fingerprint(repr(x).encode()) for x in values)]

        found, error = self._local(check)
        table = self._agree([0] * (2 + len(names)) if found is None else found, error)
        for i, name in enumerate(names):
            column = table[:, 2 + i]
            if bool((column != column[0]).any()):
                differ = torch.nonzero(column != column[0]).squeeze(1).tolist()
                raise InvalidInputError(name, "the same value on every rank", f"rank(s) {differ} differ from rank 0")
        if bool((table[:, 0] < 2).any()):
            short = torch.nonzero(table[:, 0] < 2).squeeze(1).tolist()
            raise InvalidInputError("pool", "at least 2 entries on every shard to fit on", f"fewer on rank(s) {short}")
        start = time.perf_counter()
        with shard._lock:
            candidate = cast("LearnedEncoder | ModuleEncoder", copy.deepcopy(shard.encoder))  # checked trainable
            tensors = [*candidate.parameters(), *candidate.buffers()]
            with torch.no_grad():
                flat = torch.cat([t.detach().reshape(-1).float() for t in tensors]) if tensors else torch.zeros(0)
                flat = self._broadcast(flat.to(self._comm), src=0).to(shard.device)
                offset = 0
                for t in tensors:
                    t.copy_(flat[offset : offset + t.numel()].reshape(t.shape))
                    offset += t.numel()
            cols = shard.bank.columns
            weights = 1.0 + torch.where(
                cols["feedback_count"] > 0, cols["util_mean"], torch.zeros_like(cols["util_mean"])
            )
            losses = train_encoder(
                candidate,
                cols["dreams"],
                shard.bank.slots_by_age(),
                cols["class_label"].long(),
                weights,
                steps=int(steps),
                batch_size=int(batch_size),
                lr=float(lr),
                seed=int(seed) + (self.rank << 32),
                colour_jitter=float(colour_jitter),
                progress=bool(progress) and self.rank == 0,
                reduce_step=self._average_step,
            )
            embedded, error = self._local(lambda: shard._embed_live(candidate))
        self._agree([], error)
        live, vectors = cast("tuple[torch.Tensor, torch.Tensor]", embedded)  # embedded: _agree raised otherwise
        with shard._lock:
            shard._install_embeddings(live, vectors, candidate)
        return FitReport(
            losses=losses,
            steps=int(steps),
            seconds=time.perf_counter() - start,
            entries=int(table[:, 0].sum()),
            labelled=int(table[:, 1].sum()),
        )

    def _broadcast(self, t: torch.Tensor, *, src: int) -> torch.Tensor:
        """``t`` of group rank ``src`` on every rank (same shape and dtype everywhere)."""
        t = t.contiguous()
        source = self._global_rank(src)
        self._run("broadcast", lambda: dist.broadcast(t, src=source, group=self.group, async_op=True))
        return t

    def _global_rank(self, rank: int) -> int:
        """The world rank of ``rank`` of this pool's group (torch's ``src``/``dst`` are world ranks)."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _average_step(self, encoder: torch.nn.Module, loss: torch.Tensor) -> float:
        """One ``all_reduce``: the mean over ranks of every gradient and of the loss; returns the mean loss."""
        params = list(encoder.parameters())
        grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device) for p in params]
        flat = torch.cat([loss.reshape(1).float(), *[g.float() for g in grads]])
        flat = self._all_reduce(flat.to(self._comm)).to(loss.device) / self.world_size
        offset = 1
        for p in params:
            if p.grad is not None:
                p.grad.copy_(flat[offset : offset + p.numel()].reshape(p.shape))
            offset += p.numel()
        return float(flat[0])

    def _parse(self, queries: Any, options: dict[str, Any], with_dreams: Any) -> _Request:
        """This rank's retrieve arguments, checked by the single pool's :func:`request.check_request`.

        ``k`` and ``fetch_k`` are bounded by the whole sharded pool's capacity; ``where``
        is evaluated on this rank's shard.
        """
        shard = self.shard
        where = _shard_where(options["where"])
        with shard._lock:
            r = request.check_request(shard, queries, **options, total_capacity=self.total_capacity)
            embedded = shard._query_embeddings(r.q, r.hint, r.prior) if r.mode in EMBEDDING_MODES else None
            alive = shard.bank.alive()
            passing = int((alive if r.keep is None else alive & r.keep).sum())
        return _Request(r, embedded, v.check_flag(with_dreams, "with_dreams"), passing, _where_print(where))

    def _sharded_topk(self, req: _Request, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather queries, take each shard's candidates, send them to the owners, merge (and re-rank)."""
        shard, r, b = self.shard, req.r, req.r.q.count
        nmax = max(counts)
        if r.mode in EMBEDDING_MODES:
            cats = r.categories if r.categories is not None else torch.full((b,), -1, device=shard.device)
            # the parse set these: embeddings for an embedding mode, query chroma for a chroma mode
            mine = {"embedded": cast(torch.Tensor, req.embedded), "category": cats.long()}
        else:
            mine = {"chroma": cast(torch.Tensor, r.q.chroma), "hint": r.hint}
        rows, layout = _pack({name: _pad_rows(t, nmax) for name, t in mine.items()}, nmax)
        table = self._all_gather(rows)
        everyone = _unpack(torch.cat([table[rank, :c] for rank, c in enumerate(counts)]), layout)
        everyone = {name: t.to(shard.device) for name, t in everyone.items()}
        width = max(r.fetch, r.k) if r.mode in RERANK_MODES else r.k
        with shard._lock:
            cand = self._candidates(req, everyone, width)
        blocks = cand["scores"].shape[1]
        packed, cand_layout = _pack(cand, cand["scores"].shape[0])
        received = self._all_to_all(packed, counts, [b] * self.world_size)
        got = _unpack(received.reshape(self.world_size, b, packed.shape[1]).transpose(0, 1), cand_layout)
        got = {name: t.to(shard.device) for name, t in got.items()}  # each [b, W, blocks, width, ...]
        if r.mode not in RERANK_MODES:
            parts = [merge_candidates(got["scores"][:, :, j], got["ids"][:, :, j], r.k)[:2] for j in range(blocks)]
            return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)
        return self._rerank(req, got, width)

    def _candidates(self, req: _Request, q_all: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
        """This shard's best ``width`` per gathered query: ``[T, blocks, width]`` scores and ids (+ payload).

        Chroma modes run the single pool's row of the mode table (:data:`MODES`) on this
        shard, with the gathered queries; embedding modes take the engine's k-NN
        (:func:`stages.knn`), the candidate stage of their row. ``where`` is this shard's mask.
        """
        shard, r = self.shard, req.r
        bank, count = shard.bank, next(iter(q_all.values())).shape[0]
        if r.mode in EMBEDDING_MODES:
            cats = q_all["category"] if r.categories is not None else None
            if count:
                scores, slots = stages.knn(bank, shard.index, shard.config, q_all["embedded"], width, cats, r.keep)
            else:
                scores, slots = empty_results(0, shard.device)
            if scores.shape[1] < width:  # no queries: keep the [0, width] layout
                scores, slots = pad_results(scores, slots, width)
            out = {"scores": scores.float()[:, None], "ids": bank.gather("ids", slots)[:, None]}
            if r.mode in RERANK_MODES:
                out.update(
                    util=bank.gather("util_mean", slots)[:, None],
                    label=bank.gather("class_label", slots)[:, None],
                    vectors=bank.gather("embeddings", slots)[:, None],
                    points=bank.gather("chroma", slots)[:, None],
                )
            return out
        blocks = len(r.classes) if r.mode is RetrievalMode.BALANCED else 1
        if count == 0:
            scores, slots = empty_results(0, shard.device)
        else:
            everyone = dataclasses.replace(
                r,
                q=Queries(count, chroma=q_all["chroma"]),
                hint=q_all["hint"],
                prior=torch.zeros(count, device=shard.device),
                categories=None,
            )
            scores, slots = MODES[r.mode].run(shard, everyone)
        return {
            "scores": scores.float().reshape(count, blocks, r.k),
            "ids": bank.gather("ids", slots).reshape(count, blocks, r.k),
        }

    def _rerank(self, req: _Request, got: dict[str, torch.Tensor], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft/hybrid at the query's owner: merged candidates -> the single pool's hybrid re-rank -> k."""
        shard, r, b = self.shard, req.r, req.r.q.count
        if r.k == 0:
            return empty_results(b, shard.device)
        sim, cand, pos = merge_candidates(got["scores"][:, :, 0], got["ids"][:, :, 0], width)
        valid = cand >= 0
        take = pos.clamp(min=0)

        def column(name: str, fill: float) -> torch.Tensor:
            flat = got[name][:, :, 0].reshape(b, self.world_size * width, *got[name].shape[4:])
            idx = take.reshape(b, width, *([1] * (flat.dim() - 2))).expand(b, width, *flat.shape[2:])
            picked = flat.gather(1, idx)
            mask = valid.reshape(b, width, *([1] * (picked.dim() - 2)))
            return picked.masked_fill(~mask, fill)

        util, label = column("util", 0.0), column("label", -1)
        vectors, points = column("vectors", 0.0), column("points", 0.0)
        d, p = vectors.shape[2], points.shape[2]
        row_bytes = 2 * width * (4 * d + 4 * p) + 64 * width + mmr_row_bytes(width, d)
        score_parts, id_parts = [], []
        for rows in row_chunks(b, row_bytes, shard.config.rerank_chunk_mb):
            picks, scores = stages.hybrid_rerank(
                sim[rows],
                valid[rows],
                util[rows],
                label[rows],
                vectors[rows],
                points[rows],
                r.hint[rows],
                r.k,
                r.lam,
                r.min_dispersion,
                shard.weights,
            )
            score_parts.append(scores)
            id_parts.append(torch.where(picks >= 0, cand[rows].gather(1, picks.clamp(min=0)), picks))
        return torch.cat(score_parts), torch.cat(id_parts)

    def _diverse(self, req: _Request, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """MMR over the whole pool: every shard's (id, chroma) passing ``where`` gathered, then
        :func:`stages.diverse_over` at the query's owner."""
        shard, r = self.shard, req.r
        nmax = max(sizes)
        with shard._lock:
            by_age = shard.bank.slots_by_age()
            if r.keep is not None:
                by_age = by_age[r.keep[by_age]]
            mine = {"ids": shard.bank.columns["ids"][by_age], "chroma": shard.bank.columns["chroma"][by_age]}
            rows, layout = _pack({name: _pad_rows(t, nmax) for name, t in mine.items()}, nmax)
        table = self._all_gather(rows)
        union = _unpack(torch.cat([table[rank, :c] for rank, c in enumerate(sizes)]), layout)
        order = union["ids"].argsort(stable=True)
        ids = union["ids"][order].to(shard.device)
        chroma = union["chroma"][order].to(shard.device)
        query_chroma = cast(torch.Tensor, r.q.chroma)  # diverse is a chroma mode: its queries carry chroma
        scores, picks = stages.diverse_over(
            query_chroma,
            chroma,
            r.k,
            r.lam,
            r.min_dispersion,
            None,
            metric=r.chroma_metric,
            chunk_mb=shard.config.rerank_chunk_mb,
        )
        out = torch.where(picks >= 0, ids[picks.clamp(min=0)] if ids.numel() else picks, picks)
        return scores, out

    def _count_usage(self, ids: torch.Tensor, counts: list[int]) -> None:
        """Add 1 to the usage of every returned entry, on its owner (one all_gather of the result ids)."""
        table = self._all_gather(_pad_rows(ids, max(counts)))
        flat = torch.cat([table[r, :c] for r, c in enumerate(counts)]).to(self.shard.device)
        with self.shard._lock:
            slots = self.shard.bank.slots_of(self._mine(flat))
            usage = self.shard.bank.columns["usage"]
            usage.index_add_(0, slots.clamp(min=0), (slots >= 0).to(usage.dtype))

    def _mine(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` where this rank owns them, -1 elsewhere."""
        return torch.where((ids >= 0) & (owner_of(ids, self.world_size) == self.rank), ids, torch.full_like(ids, -1))

    def _issued(self, ids: torch.Tensor) -> torch.Tensor:
        """``[n]`` bool: ids (owned by this rank) that this shard has issued or inherited."""
        tags = ids >> TAG_BITS
        ok = torch.zeros_like(ids, dtype=torch.bool)
        for tag, mark in self._watermarks.items():
            mark = self.shard.bank.next_id if tag == self._issuing else mark
            ok |= (tags == tag) & (ids < mark)
        return ok

    # ---------------------------------------------------------- id routing
    def _route_ids(self, ids: Any, error: BaseException | None = None) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """Validate this rank's ids, agree, gather and check every id at its owner (collective).

        ``error``: this rank's input already failed (the ranks still agree, then raise).
        Returns this rank's flat ``[n]`` ids, every rank's count and every rank's
        ids concatenated in rank order.
        """

        def parse() -> torch.Tensor:
            t = v.as_tensor(ids, "ids", device=self.shard.device)
            v.check_int(t, "ids")
            t = t.long()
            if t.numel() and bool((t < -1).any()):
                raise InvalidInputError("ids", "global ids >= 0, or -1 padding", "ids below -1")
            return t

        t, error = self._local(parse) if error is None else (None, error)
        table = self._agree([0 if t is None else t.numel()], error)
        counts = table[:, 0].tolist()
        flat = cast(torch.Tensor, t).reshape(-1)  # parsed: _agree raised on every rank if any parse failed
        everyone = self._all_gather(_pad_rows(flat, max(counts)))
        gathered = torch.cat([everyone[r, :c] for r, c in enumerate(counts)]).to(self.shard.device)
        mine = self._mine(gathered)
        unknown = torch.zeros(self.world_size, dtype=torch.int64)
        with self.shard._lock:
            unknown[self.rank] = int(((mine >= 0) & ~self._issued(mine)).any())
        unknown = self._all_reduce(unknown).cpu()
        if bool(unknown.any()):
            owners = torch.nonzero(unknown).squeeze(1).tolist()
            raise InvalidInputError(
                "ids", "ids issued by this sharded pool (or -1)", f"unknown ids owned by rank(s) {owners}"
            )
        return flat, counts, gathered

    def _lookup(self, ids: torch.Tensor, counts: list[int], names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Columns ``names`` (plus ``found``) of valid ``ids`` ``[n]``, each fetched from its owner."""
        nmax = max(counts)
        table = self._all_gather(_pad_rows(ids, nmax)).to(self.shard.device)  # [W, nmax]
        with self.shard._lock:
            slots = self.shard.bank.slots_of(self._mine(table))
            cols = {name: self.shard.bank.gather(name, slots) for name in names}
            cols["found"] = slots >= 0
        rows, layout = _pack(
            {n: c.reshape(self.world_size * nmax, *c.shape[2:]) for n, c in cols.items()}, self.world_size * nmax
        )
        counts_out = [nmax] * self.world_size
        received = self._all_to_all(rows, counts_out, counts_out).reshape(self.world_size, nmax, rows.shape[1])
        got = _unpack(received[:, : ids.numel()], layout)  # [W sources, n, ...]
        source = owner_of(ids, self.world_size).to(self._comm)
        pick = torch.arange(ids.numel(), device=self._comm)
        return {name: t[source, pick].to(self.shard.device) for name, t in got.items()}

    def feedback(self, ids: Any, utility: Any) -> int:
        """Record utility feedback for global ids, at their owners (collective).

        Arguments as :meth:`DreamPool.feedback`. When several ranks give feedback to
        one entry, it is recorded in rank order (the last utility is the highest rank's).

        Returns:
            The number of this rank's (id, utility) pairs recorded.
        """
        shard = self.shard

        def parse() -> tuple[torch.Tensor, torch.Tensor]:
            id_t = v.as_tensor(ids, "ids", device=shard.device)
            v.check_int(id_t, "ids")
            u = v.as_tensor(utility, "utility", device=shard.device)
            v.check_float(u, "utility")
            if u.dim() == 0:
                u = u.expand(id_t.shape)
            if u.shape != id_t.shape:
                raise errors.DimensionMismatchError(list(id_t.shape), list(u.shape), "utility")
            v.check_finite(u, "utility")
            v.check_range(u, "utility", 0.0, 1.0)
            return id_t, u.reshape(-1).float()

        parsed, error = self._local(parse)
        _, counts, everyone_ids = self._route_ids(None if parsed is None else parsed[0], error)
        values = self._all_gather(_pad_rows(parsed[1], max(counts)))
        everyone_u = torch.cat([values[r, :c] for r, c in enumerate(counts)]).to(shard.device)
        mine = self._mine(everyone_ids)
        with shard._lock:
            found = (shard.bank.slots_of(mine) >= 0).to(torch.int64)
        per_source = torch.stack([part.sum() for part in found.split(counts)])
        recorded = self._all_reduce(per_source).cpu()
        keep = mine >= 0
        shard.feedback(mine[keep], everyone_u[keep])
        return int(recorded[self.rank])

    def update(self, ids: Any, **columns: Any) -> int:
        """Write user columns of global ids at their owners (collective), as :meth:`DreamPool.update`.

        Every rank names the same columns (any number of ids, 0 included). When several ranks
        write one entry, the highest rank's value is the one kept.

        Returns:
            The number of this rank's ids written.
        """
        shard = self.shard
        names = tuple(shard.config.columns)

        def parse() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with shard._lock:
                return checked_update(shard.config, ids, columns, shard.device)

        parsed, error = self._local(parse)
        given = 0 if parsed is None else sum(1 << names.index(name) for name in parsed[1])
        table = self._agree([given], error)
        if bool((table[:, 0] != table[0, 0]).any()):
            sets = [[n for i, n in enumerate(names) if mask >> i & 1] for mask in table[:, 0].tolist()]
            raise InvalidInputError("columns", "the same user columns named on every rank", sets)
        flat, values = cast(tuple[torch.Tensor, dict[str, torch.Tensor]], parsed)
        _, counts, everyone_ids = self._route_ids(flat)
        rows, layout = _pack(values, flat.numel())
        gathered = self._all_gather(_pad_rows(rows, max(counts)))
        everyone = _unpack(torch.cat([gathered[r, :c] for r, c in enumerate(counts)]), layout)
        mine = self._mine(everyone_ids)
        with shard._lock:
            found = (shard.bank.slots_of(mine) >= 0).to(torch.int64)
        per_source = torch.stack([part.sum() for part in found.split(counts)])
        written = self._all_reduce(per_source).cpu()
        keep = mine >= 0
        if bool(keep.any()):
            shard.update(mine[keep], **{name: t.to(shard.device)[keep] for name, t in everyone.items()})
        return int(written[self.rank])

    def dreams(self, ids: Any) -> torch.Tensor:
        """Dreams of global ``ids`` (any shape) as ``[..., R, C, L, 3]``; zeros where absent (collective)."""
        flat, counts, _ = self._route_ids(ids)
        shape = v.as_tensor(ids, "ids").shape
        out = self._lookup(flat, counts, ("dreams",))["dreams"]
        return out.reshape(*shape, *out.shape[1:])

    def metadata(self, ids: Any) -> Columns:
        """Every column except dreams for global ``ids`` (any shape), plus ``found`` (collective).

        Named and typed as :meth:`DreamPool.metadata` (labels, ids and counts int64).
        """
        flat, counts, _ = self._route_ids(ids)
        shape = v.as_tensor(ids, "ids").shape
        names = [n for n in self.shard.bank.columns if n != "dreams"]
        out = self._lookup(flat, counts, names)
        return Columns({n: as_returned(t.reshape(*shape, *t.shape[1:])) for n, t in out.items()})

    def diversity(self, ids: Any) -> dict[str, torch.Tensor]:
        """Diversity of each result set, as :meth:`DreamPool.diversity` (collective: chroma fetched from the owners).

        Args:
            ids: ``[B, k]`` global ids, e.g. ``retrieve(...).ids``; -1 and evicted ids are left out.

        Returns:
            ``{"mean", "min", "max"}``, each ``[B]`` float32; NaN for a set with fewer than two live entries.
        """

        def check() -> None:
            t = v.as_tensor(ids, "ids")
            if t.dim() != 2:
                raise errors.DimensionMismatchError("[B, k] ids", list(t.shape), "ids")

        _, error = self._local(check)
        flat, counts, _ = self._route_ids(ids, error)
        found = self._lookup(flat, counts, ("chroma",))
        b, k = v.as_tensor(ids, "ids").shape
        chroma = found["chroma"]
        return diversity_stats(chroma.reshape(b, k, *chroma.shape[1:]), found["found"].reshape(b, k))

    def sample(
        self, n: int, *, where: Any = None, replace: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Ids of ``n`` uniform draws from the ``m`` live entries of the whole pool passing ``where``
        (collective; each rank passes its own ``n``, 0 included, and ``replace``).

        As :meth:`DreamPool.sample`, over the union of the shards indexed in global id
        order: with the same ``generator`` state, the draw is the one a single pool
        holding the union in global id order makes. ``where`` is None or a callable of
        the metadata columns, run on every shard (a mask is refused, as in :meth:`retrieve`).
        Costs one status all_gather, one all_gather of each shard's (tag, count) pairs,
        one all_gather of the draws and one all_reduce of their ids.

        Returns:
            ``[n]`` (``replace=True``: with replacement) or ``[min(n, m)]`` (``replace=False``:
            distinct) int64 global ids on this shard's device; ``[0]`` when ``m = 0``.

        Raises:
            InvalidInputError: (on every rank) ``n`` not an int >= 0, ``replace`` not a bool, a bad
                ``where`` or ``generator`` on some rank.
        """
        shard = self.shard

        def parse() -> tuple[int, torch.Tensor]:
            count = v.check_count(n, "n")
            v.check_flag(replace, "replace")
            if generator is not None and not isinstance(generator, torch.Generator):
                raise InvalidInputError("generator", "a torch.Generator or None", type(generator).__name__)
            with shard._lock:
                keep = request.where_mask(_shard_where(where), shard.bank, shard.device)
                slots = shard.bank.slots_by_age()
                if keep is not None:
                    slots = slots[keep[slots]]
                return count, shard.bank.columns["ids"][slots].sort().values.cpu()

        parsed, error = self._local(parse)
        table = self._agree([0 if parsed is None else parsed[0], int(replace is True)], error)
        ids = cast("tuple[int, torch.Tensor]", parsed)[1]  # parsed: _agree raised on every rank otherwise
        tags, per_tag = (ids >> TAG_BITS).unique_consecutive(return_counts=True)  # ids sorted: tags too
        pairs = list(zip(tags.tolist(), per_tag.tolist(), strict=True))
        listing = sorted(pair for part in self._all_gather_objects(pairs) for pair in part)  # tags are unique
        total = sum(c for _, c in listing)
        draws = [
            (int(c) if total else 0) if with_replacement else min(int(c), total)
            for c, with_replacement in table[:, :2].tolist()
        ]
        if max(draws) == 0:
            return torch.empty(0, dtype=torch.int64, device=shard.device)
        # a draw is a position in the union (tag-major = global id order), sent as (tag, index within tag)
        mine_n = draws[self.rank]
        if not mine_n:
            pos = ids[:0]
        elif replace:
            pos = torch.randint(total, (mine_n,), generator=generator)
        else:
            pos = torch.randperm(total, generator=generator)[:mine_n]
        all_tags = torch.tensor([t for t, _ in listing], dtype=torch.int64)
        sizes = torch.tensor([c for _, c in listing], dtype=torch.int64)
        ends = sizes.cumsum(0)
        which = torch.searchsorted(ends, pos, right=True)
        keys = (all_tags[which] << TAG_BITS) + pos - (ends - sizes)[which]
        asked = self._all_gather(_pad_rows(keys, max(draws))).cpu()  # [W, max draws], -1 padding
        mine = (asked >= 0) & (owner_of(asked, self.world_size) == self.rank)
        first = torch.searchsorted(ids, (asked >> TAG_BITS) << TAG_BITS)  # my first id of the key's tag
        at = (first + (asked & ((1 << TAG_BITS) - 1))).clamp(max=max(ids.numel() - 1, 0))
        answer = torch.where(mine, ids[at] if ids.numel() else torch.zeros_like(asked), torch.zeros_like(asked))
        answer = self._all_reduce(answer).cpu()  # every key answered by its one owner
        return answer[self.rank, : draws[self.rank]].to(shard.device)

    def __len__(self) -> int:
        """Live entries of the whole pool: a collective (one all_reduce), so every rank calls ``len`` alike.

        A sharded pool is always true (``bool(pool)`` is no collective): test ``len(pool) == 0``.
        """
        return int(self._all_reduce(torch.tensor([self.shard.bank.size], dtype=torch.int64))[0])

    def __bool__(self) -> bool:
        return True

    def to(self, device: str | torch.device) -> ShardedDreamPool:
        """Move this rank's shard to ``device`` in place and return the pool (no communication).

        Each rank moves its own shard (e.g. to ``cuda:LOCAL_RANK``), as :meth:`DreamPool.to`.
        Under NCCL, later collectives run on the shard's CUDA device.

        Raises:
            As :meth:`DreamPool.to` (the shard is then unchanged).
        """
        self.shard.to(device)
        if self.shard.device.type == "cuda" and "nccl" in str(dist.get_backend(self.group)):
            self._comm = self.shard.device
        return self

    def stats(self) -> ShardedPoolStats:
        """The whole pool's :class:`ShardedPoolStats` (collective): a :class:`PoolStats` of totals,
        plus ``world_size`` and each shard's own ``PoolStats`` (``shards``, in rank order).

        ``stats["size"]``, ``stats["world_size"]``, ``stats["added"]`` and
        ``stats["shards"][r]["size"]`` read the plain dict (``to_dict``), as before.
        """
        return _sharded_stats(self._all_gather_objects(self.shard.stats()), self.rank)

    # ----------------------------------------------------------- persistence
    def save(self, path: persist.PathArg) -> None:
        """Write a sharded checkpoint directory at ``path`` (collective; a filesystem every rank sees).

        The ranks first agree on ``path`` (the same absolute path, holding the same
        manifest, on every rank) and on a fresh generation name (a uuid4: never the
        torch RNG, never a name used before). Each rank writes its shard into the new
        generation directory, beside the committed one; after every rank has written,
        rank 0 replaces ``manifest.json`` atomically, which commits the new generation,
        then removes every other generation. Until the manifest is replaced the
        committed checkpoint is untouched: a failure or crash of any rank before it
        leaves that checkpoint loadable, as it was.

        Raises:
            InvalidInputError: (on every rank) ``path`` is not a path on some rank, differs
                between ranks, or names something other than a sharded checkpoint or an
                empty directory.
            OSError: (on every rank) a rank's filesystem failed.
            CollectiveError: a rank left or timed out.
        """

        def check() -> tuple[Path, list[int]]:
            root = _check_target(path)
            return root, _target_fields(root, _manifest_bytes(root))

        found, error = self._local(check)
        hi, lo = struct.unpack("<qq", uuid.uuid4().bytes)  # every rank draws; rank 0's is used
        table = self._agree([*(found[1] if found is not None else [0, 0]), hi, lo], error)
        self._same_target(table)
        root = cast("tuple[Path, list[int]]", found)[0]  # checked: _agree raised otherwise
        generation = "gen-" + struct.pack("<qq", int(table[0, 2]), int(table[0, 3])).hex()
        committed = False
        try:
            entry, error = self._local(lambda: self._write_shard(root, generation))
            self._agree([], error)
            entries = self._all_gather_objects(entry)
            error = None
            if self.rank == 0:
                _, error = self._local(lambda: _commit_manifest(root, generation, entries))
            self._agree([], error)
            committed = True
        finally:
            if self.rank == 0:
                _remove_generations(root, generation, keep_new=committed)

    def _write_shard(self, root: Path, generation: str) -> dict[str, Any]:
        """Write this rank's shard into ``root/generation``; its manifest entry."""
        relative = f"{generation}/shard-{self.rank:05d}"
        target = root / relative
        if os.path.lexists(target):  # a generation is written once: never over another save's shard
            raise FileExistsError(errno.EEXIST, "a shard of this generation already exists", str(target))
        with persist.WRITE_LOCK:
            with self.shard._lock:
                snap = checkpointing.snapshot(self.shard)
                marks = {**self._watermarks, self._issuing: self.shard.bank.next_id}
            persist.write_checkpoint(snap, target)
        return {
            "rank": self.rank,
            "generation": generation,
            "path": relative,
            "shard_digest": persist.manifest_digest(target),
            "size": snap.size,
            "watermarks": {str(t): m for t, m in sorted(marks.items())},
            "counters": snap.counters,
            "config": snap.config.to_dict(),
            "dream_dtype": str(snap.columns["dreams"].dtype).removeprefix("torch."),
        }

    def _same_target(self, table: torch.Tensor) -> None:
        """Refuse, on every rank, a save or load whose path or manifest differs between ranks."""
        if bool((table[:, 0] != table[0, 0]).any()):
            paths = len(set(table[:, 0].tolist()))
            raise InvalidInputError("path", "the same path on every rank", f"{paths} different paths")
        if bool((table[:, 1] != table[0, 1]).any()):
            raise InvalidInputError(
                "path",
                "the same checkpoint on every rank (a filesystem every rank sees)",
                "ranks that find different manifests (or none) at the path",
            )

    @classmethod
    def load(
        cls,
        path: persist.PathArg,
        *,
        group: Any = None,
        device: str | torch.device | None = None,
        timeout: Any = None,
    ) -> ShardedDreamPool:
        """Open a sharded checkpoint (collective), at its world size or another one.

        The ranks first agree on ``path`` (the same absolute path and manifest everywhere).
        At the saved world size each rank reads its own shard. At another, each rank
        reads the shards holding ids it now owns (``(id >> 40) % world_size``) and
        keeps those entries, ids and all columns unchanged; capacities grow to hold them.
        ``timeout`` as in :class:`ShardedDreamPool`.

        Raises:
            CheckpointCorruptError: (on every rank) a missing, altered or inconsistent
                manifest or shard (one of another save or rank included), naming the file.
            InvalidInputError: (on every rank) ``path`` differs between ranks.
        """
        _require_group()
        pool = cls.__new__(cls)
        pool._bind(group)

        def check() -> tuple[Path, _Manifest, list[int]]:
            pool._set_timeout(timeout)
            root = _as_root(path)
            data = _manifest_bytes(root)
            if data is None:
                raise CheckpointCorruptError(root / _MANIFEST, "missing")
            return root, _parse_manifest(root / _MANIFEST, data), _target_fields(root, data)

        found, error = pool._local(check)
        pool._same_target(pool._agree(found[2] if found is not None else [0, 0], error))
        root, manifest, _ = cast("tuple[Path, _Manifest, list[int]]", found)  # agreed: checked everywhere
        built, error = pool._local(lambda: _open_rank(root, manifest, pool.rank, pool.world_size, device))
        pool._attach(None if built is None else built[0], {} if built is None else built[1], error)
        return pool

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard as a dict (``torch.save``-safe), tagged with rank and world size."""
        with self.shard._lock:
            marks = {**self._watermarks, self._issuing: self.shard.bank.next_id}
        return {
            "format": "dreampool-shard",
            "rank": self.rank,
            "world_size": self.world_size,
            "watermarks": {str(t): m for t, m in marks.items()},
            "shard": self.shard.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Replace every shard with the state this rank saved (collective; same rank and world size).

        On any rank's error every rank raises and every shard is left as it was.
        """
        shard = self.shard

        def apply() -> tuple[Any, dict[int, int]]:
            if not isinstance(state_dict, dict) or state_dict.get("format") != "dreampool-shard":
                raise InvalidInputError("state_dict", "a ShardedDreamPool.state_dict()", type(state_dict).__name__)
            where = (state_dict.get("rank"), state_dict.get("world_size"))
            if where != (self.rank, self.world_size):
                raise InvalidInputError(
                    "state_dict",
                    f"the state of rank {self.rank} of {self.world_size}",
                    f"rank {repr(where[0])[:40]} of {repr(where[1])[:40]}",
                )
            marks = _state_watermarks(state_dict.get("watermarks"), self.rank, self.world_size)
            inner = state_dict.get("shard")
            if not isinstance(inner, dict):
                raise InvalidInputError("state_dict['shard']", "a DreamPool.state_dict()", type(inner).__name__)
            with shard._lock:
                backup = checkpointing.snapshot(shard)
                shard.load_state_dict(inner)
                problem = _ids_problem(shard.bank.columns["ids"], shard.bank.next_id, marks)
                if problem is not None:
                    checkpointing.restore(shard, backup)
                    raise InvalidInputError("state_dict['watermarks']", "watermarks that fit the shard", problem)
            return backup, marks

        done, error = self._local(apply)
        try:
            self._agree([], error)
        except DreamPoolError:
            if done is not None:
                with shard._lock:
                    checkpointing.restore(shard, done[0])
            raise
        self._watermarks = done[1]
        self._issuing = max(self._watermarks, key=lambda t: self._watermarks[t])


@dataclass(frozen=True)
class ShardedPoolStats(PoolStats):
    """A sharded pool's :class:`PoolStats`: totals over the shards, plus each shard's own.

    Summed over the shards: size, capacity, counters, bytes, index bytes and the cache's
    size, hits and misses (acceptance and hit rates from the sums); the means weighted
    by each shard's size; ``engine`` the shards' engine kinds, comma-joined when they
    differ. This rank's shard's: ``device``, ``next_id`` (the id its next local add
    issues), ``memory`` and ``search`` (facts of one device and one index).

    Attributes:
        world_size: ranks in the group. shards: every shard's :class:`PoolStats`, in rank order.
    """

    world_size: int
    shards: tuple[PoolStats, ...]

    def to_dict(self) -> dict[str, Any]:
        """:meth:`PoolStats.to_dict`, plus ``world_size`` and ``shards`` (each shard's ``to_dict()``)."""
        return {**super().to_dict(), "world_size": self.world_size, "shards": [s.to_dict() for s in self.shards]}


def _sharded_stats(every: list[PoolStats], rank: int) -> ShardedPoolStats:
    """Every shard's stats (rank order) as the whole pool's, seen from ``rank``."""
    mine, size = every[rank], sum(s.size for s in every)
    counters = {name: sum(int(s.counters[name]) for s in every) for name in COUNTERS}
    added, rejected = counters["added"], counters["rejected"]
    hits, misses = sum(s.cache.hits for s in every), sum(s.cache.misses for s in every)
    bytes_by_column = {name: sum(s.bytes_by_column.get(name, 0) for s in every) for name in mine.bytes_by_column}

    def mean(name: str) -> float:
        return sum(getattr(s, name) * s.size for s in every) / size if size else 0.0

    return ShardedPoolStats(
        size=size,
        capacity=sum(s.capacity for s in every),
        device=mine.device,
        engine=",".join(dict.fromkeys(s.engine for s in every)),
        next_id=mine.next_id,
        counters=counters,
        acceptance_rate=added / max(1, added + rejected),
        mean_coherence=mean("mean_coherence"),
        mean_energy=mean("mean_energy"),
        mean_violation=mean("mean_violation"),
        bytes_by_column=bytes_by_column,
        bank_bytes=sum(s.bank_bytes for s in every),
        index_bytes=sum(s.index_bytes for s in every),
        memory=mine.memory,
        search=mine.search,
        cache=CacheStats(
            size=sum(s.cache.size for s in every),
            hits=hits,
            misses=misses,
            hit_rate=hits / (hits + misses) if hits + misses else 0.0,
        ),
        world_size=len(every),
        shards=tuple(every),
    )


def _check_fit(shard: DreamPool, steps: Any, batch_size: Any, lr: Any, seed: Any, colour_jitter: Any) -> None:
    """:meth:`DreamPool.fit_encoder`'s checks of its encoder and arguments, on one shard."""
    if not isinstance(shard.encoder, (LearnedEncoder, ModuleEncoder)):
        raise InvalidConfigurationError(
            "encoder",
            type(shard.encoder).__name__,
            "a trainable encoder: PoolConfig(encoder='learned') or ShardedDreamPool(config, encoder=<nn.Module>)",
        )
    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 2), ("seed", seed, 0)):
        if v.check_count(value, name) < low:
            raise InvalidInputError(name, f"an int >= {low}", value)
    if v.check_number(lr, "lr", 0.0, 1.0) <= 0.0:
        raise InvalidInputError("lr", "a learning rate in (0, 1]", lr)
    v.check_number(colour_jitter, "colour_jitter", 0.0, 1.0)


def _state_watermarks(raw: Any, rank: int, world: int) -> dict[int, int]:
    """The watermarks of a shard state dict, checked as a manifest's are."""
    if not isinstance(raw, dict) or not raw:
        raise InvalidInputError("state_dict['watermarks']", "a non-empty mapping of tag -> next id", repr(raw)[:80])
    marks: dict[int, int] = {}
    for key, mark in raw.items():
        tag = int(key) if isinstance(key, str) and _TAG.fullmatch(key) else -1
        problem = _watermark_problem(tag, mark, rank, world) if tag >= 0 else f"tag {repr(key)[:40]} is not an int"
        if problem is not None:
            raise InvalidInputError("state_dict['watermarks']", f"watermarks of rank {rank} of {world}", problem)
        marks[tag] = mark
    return marks


def _remove_generations(root: Path, generation: str, *, keep_new: bool) -> None:
    """After a save of ``generation``: every other generation and temporary manifest once it is
    committed (``keep_new``), else ``generation`` itself unless the manifest names it. Best
    effort: leftovers are removed by a later save, and a load only reads what the manifest names."""
    if not keep_new:
        try:
            keep_new = _committed_generation(root) == generation
        except CheckpointCorruptError:
            return
        if not keep_new:
            shutil.rmtree(root / generation, ignore_errors=True)
        return
    for stale in root.glob("gen-*"):
        if stale.name != generation:
            shutil.rmtree(stale, ignore_errors=True)
    for tmp in root.glob(f".{_MANIFEST}.tmp-*"):  # a manifest write killed before its rename
        tmp.unlink(missing_ok=True)


def _user_rows(shard: DreamPool, columns: Any, n: int) -> dict[str, torch.Tensor]:
    """Every user column of a routed batch of ``n``, checked, ``[n, *shape]`` (fill where not given),
    under :data:`_USER`-prefixed names: the same layout on every rank (the shards' configurations agree)."""
    given = user_columns.checked_values(shard.config.columns, columns, n, shard.device)
    out = {}
    for name, (shape, dtype) in shard.config.columns.specs().items():
        fill = torch.zeros((n, *shape), dtype=dtype, device=shard.device)
        out[_USER + name] = given[name].contiguous() if name in given else fill
    return out


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


def _rank_config(config: PoolConfig) -> PoolConfig:
    """``config`` with a bare CUDA device pinned to this process's current CUDA device."""
    if resolve_device(config.device).type == "cuda" and config.device in ("auto", "cuda"):
        return config.replace(device=f"cuda:{torch.cuda.current_device()}")
    return config


# ------------------------------------------------------------ checkpoints
@dataclass(frozen=True)
class _ShardEntry:
    """One shard as the sharded manifest lists it (checked by :func:`_parse_manifest`)."""

    rank: int
    path: str  # relative to the checkpoint: "<generation>/shard-<rank:05d>"
    digest: str | None  # sha256 of the shard's own manifest.json (None in version 1)
    size: int
    watermarks: dict[int, int]  # tag -> the next id that tag would issue
    counters: dict[str, int]
    config: PoolConfig
    dream_dtype: str


@dataclass(frozen=True)
class _Manifest:
    """A verified sharded manifest: ``world_size`` shards of one generation, in rank order."""

    path: Path  # the manifest file
    version: int
    world_size: int
    generation: str
    shards: list[_ShardEntry]


def is_sharded_checkpoint(path: Any) -> bool:
    """True when ``path`` is a directory holding a sharded checkpoint's manifest."""
    try:
        manifest = json.loads(persist.read_manifest_bytes(Path(os.fspath(path)) / _MANIFEST))
    except (OSError, TypeError, ValueError, RecursionError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == SHARDED_FORMAT


def _as_root(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidInputError("path", "a str or os.PathLike", type(path).__name__)
    text = os.fspath(path)
    if not isinstance(text, str) or not text or "\0" in text:
        raise InvalidInputError("path", "a non-empty str path without NUL bytes", repr(text)[:80])
    return Path(text)


def _check_target(path: Any) -> Path:
    root = _as_root(path)
    if root.exists() and not is_sharded_checkpoint(root) and (not root.is_dir() or any(root.iterdir())):
        raise InvalidInputError(
            "path", "a sharded checkpoint, an empty directory or a new path", f"{root}, which holds something else"
        )
    return root


def _fingerprint(data: bytes) -> int:
    """A signed int64 of the sha256 of ``data``: compared across ranks in an agreement."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little", signed=True)


def _target_fields(root: Path, manifest: bytes | None) -> list[int]:
    """Agreement fields of a checkpoint path: its absolute path and the manifest found there (0: none)."""
    return [_fingerprint(os.fsencode(os.path.abspath(root))), 0 if manifest is None else _fingerprint(manifest)]


def _manifest_bytes(root: Path) -> bytes | None:
    """The manifest file's bytes, None when there is none (never blocks on a special file)."""
    try:
        return persist.read_manifest_bytes(root / _MANIFEST)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointCorruptError(root / _MANIFEST, f"unreadable sharded manifest ({exc})") from None


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _manifest_data(generation: str, shards: list[dict[str, Any]]) -> bytes:
    body = {
        "format": SHARDED_FORMAT,
        "version": SHARDED_VERSION,
        "world_size": len(shards),
        "tag_bits": TAG_BITS,
        "generation": generation,
        "shards": shards,
    }
    return json.dumps({**body, "digest": _digest(body)}, indent=2, sort_keys=True).encode()


def _commit_manifest(root: Path, generation: str, shards: list[dict[str, Any]]) -> None:
    """Commit ``generation``: check the manifest naming its shards reads back, then write
    ``root/manifest.json`` through a temporary file (fsync, rename, fsync the directory)."""
    data = _manifest_data(generation, shards)
    _parse_manifest(root / _MANIFEST, data)  # never commit what a load would refuse
    fsync_path(root)  # the generation directory's entry is durable before the manifest names it
    atomic_write(root / _MANIFEST, lambda tmp: write_synced(tmp, data))


def _committed_generation(root: Path) -> str | None:
    """The generation the manifest at ``root`` names; None when there is no manifest.

    Raises:
        CheckpointCorruptError: a manifest that cannot be read or verified.
    """
    data = _manifest_bytes(root)
    return None if data is None else _parse_manifest(root / _MANIFEST, data).generation


def read_manifest(root: Path) -> _Manifest:
    """The verified manifest of the sharded checkpoint at ``root`` (see :func:`_parse_manifest`).

    Raises:
        CheckpointCorruptError: missing, unreadable or malformed, naming the manifest file.
    """
    data = _manifest_bytes(root)
    if data is None:
        raise CheckpointCorruptError(root / _MANIFEST, "missing")
    return _parse_manifest(root / _MANIFEST, data)


def _is_int(value: Any, low: int, high: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)


def _parse_manifest(target: Path, data: bytes) -> _Manifest:
    """Verify a sharded manifest's bytes as a single checkpoint's manifest is verified.

    Checked: format, version, digest; every field's type; world size = number of shards;
    shard ``r`` listed once, at index ``r``, at the relative path ``<generation>/shard-<r>``
    (nothing absolute, no ``..``); its tags ``t`` with ``t % world_size == r`` and watermarks
    inside their tag; the configuration shared by every shard (capacity, device and
    memory budget aside); in version 2, each shard's rank, generation and manifest sha256.

    Raises:
        CheckpointCorruptError: naming ``target``, for every problem.
    """

    def bad(reason: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(target, reason)

    if len(data) > _MANIFEST_MAX:
        raise bad(f"larger than a sharded manifest can be ({_MANIFEST_MAX} bytes)")
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise bad(f"unreadable sharded manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != SHARDED_FORMAT:
        raise bad(f"not a {SHARDED_FORMAT} manifest")
    body = {k: val for k, val in manifest.items() if k != "digest"}
    if manifest.get("digest") != _digest(body):
        raise bad("digest mismatch (the manifest was altered)")
    version = manifest.get("version")
    if not isinstance(version, int) or not _is_int(version, 1, SHARDED_VERSION) or manifest.get("tag_bits") != TAG_BITS:
        raise bad(
            f"expected version 1..{SHARDED_VERSION} with tag_bits {TAG_BITS}, got version {version!r} "
            f"and tag_bits {manifest.get('tag_bits')!r} (a newer version: upgrade dreampool_gpu)"
        )
    world, generation, shards = manifest.get("world_size"), manifest.get("generation"), manifest.get("shards")
    if not _is_int(world, 1, 1 << (63 - TAG_BITS)):
        raise bad(f"expected world_size: an int >= 1, got {world!r}")
    if not isinstance(generation, str) or not _GENERATION.fullmatch(generation):
        raise bad(f"expected generation: 'gen-' and 16 to 32 hex digits, got {repr(generation)[:80]}")
    if not isinstance(shards, list) or len(shards) != world:
        got = f"{len(shards)} shards" if isinstance(shards, list) else type(shards).__name__
        raise bad(f"expected world_size {world} shards (one per rank), got {got}")
    entries = [_parse_entry(bad, raw, r, world, generation, version) for r, raw in enumerate(shards)]
    shared = [{k: val for k, val in e.config.to_dict().items() if k not in _PER_SHARD_FIELDS} for e in entries]
    for r, fields in enumerate(shared):
        if fields != shared[0]:
            raise bad(f"shard {r}'s configuration differs from shard 0's (only {', '.join(_PER_SHARD_FIELDS)} may)")
    return _Manifest(target, version, world, generation, entries)


def _parse_entry(
    bad: Callable[[str], CheckpointCorruptError], raw: Any, rank: int, world: int, generation: str, version: int
) -> _ShardEntry:
    """Shard ``rank``'s manifest entry, every field checked (see :func:`_parse_manifest`)."""
    if not isinstance(raw, dict):
        raise bad(f"expected shard {rank}: a mapping, got {type(raw).__name__}")
    required: tuple[str, ...] = ("path", "size", "watermarks", "counters", "config", "dream_dtype")
    required += ("rank", "generation", "shard_digest") if version >= 2 else ()
    missing = [key for key in required if key not in raw]
    if missing:
        raise bad(f"expected shard {rank} to list {', '.join(required)}, got no {missing[0]!r}")
    if version >= 2 and (not _is_int(raw["rank"], 0) or raw["rank"] != rank or raw["generation"] != generation):
        raise bad(
            f"expected shard {rank} to be rank {rank} of generation {generation}, "
            f"got rank {repr(raw['rank'])[:40]} of {repr(raw['generation'])[:80]} (listed twice, or out of order)"
        )
    expected_path = f"{generation}/shard-{rank:05d}"
    if raw["path"] != expected_path:
        raise bad(
            f"expected shard {rank} at the relative path {expected_path!r} inside the checkpoint, "
            f"got {repr(raw['path'])[:120]}"
        )
    digest = raw.get("shard_digest") if version >= 2 else None
    if version >= 2 and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
        raise bad(f"expected shard {rank}'s shard_digest: 64 hex digits, got {repr(digest)[:80]}")
    if not _is_int(raw["size"], 0):
        raise bad(f"expected shard {rank}'s size: an int >= 0, got {repr(raw['size'])[:40]}")
    marks = raw["watermarks"]
    if not isinstance(marks, dict) or not marks:
        raise bad(f"expected shard {rank}'s watermarks: a non-empty mapping of tag -> next id, got {repr(marks)[:80]}")
    watermarks: dict[int, int] = {}
    for key, mark in marks.items():
        tag = int(key) if isinstance(key, str) and _TAG.fullmatch(key) else -1
        problem = _watermark_problem(tag, mark, rank, world) if tag >= 0 else f"tag {repr(key)[:40]} is not an int"
        if problem is not None:
            raise bad(f"shard {rank}'s watermarks: {problem}")
        watermarks[tag] = mark
    counters = raw["counters"]
    if not isinstance(counters, dict) or not all(isinstance(k, str) and _is_int(c, 0) for k, c in counters.items()):
        raise bad(f"expected shard {rank}'s counters: a mapping of name -> int >= 0, got {repr(counters)[:80]}")
    try:
        config = PoolConfig.from_dict(raw["config"])
    except (DreamPoolError, TypeError, ValueError) as exc:
        raise bad(f"expected shard {rank}'s config: a PoolConfig, got {str(exc)[:200]}") from None
    dtype = raw["dream_dtype"]
    if not isinstance(dtype, str) or dtype not in DREAM_DTYPES or dtype == "auto":
        raise bad(f"expected shard {rank}'s dream_dtype: a stored dtype name, got {repr(dtype)[:40]}")
    return _ShardEntry(rank, expected_path, digest, raw["size"], watermarks, dict(counters), config, dtype)


def _watermark_problem(tag: int, mark: Any, rank: int, world: int) -> str | None:
    """Why ``tag -> mark`` cannot be a watermark of shard ``rank`` of ``world``; None when it can."""
    if tag > _MAX_TAG:
        return f"tag {tag} is beyond the largest ({_MAX_TAG})"
    if tag % world != rank:
        return f"tag {tag} belongs to rank {tag % world} of {world} (tag % world_size), not {rank}"
    if not _is_int(mark, tag << TAG_BITS, (tag + 1) << TAG_BITS):
        return f"next id of tag {tag}: an int in [{tag << TAG_BITS}, {(tag + 1) << TAG_BITS}], got {repr(mark)[:40]}"
    return None


def _ids_problem(ids: torch.Tensor, next_id: int, marks: dict[int, int]) -> str | None:
    """Why a shard holding ``ids`` (with ``next_id``) does not fit the watermarks ``marks``; None when it does.

    Every live id lies in a listed tag, below that tag's watermark (else a later add would
    issue it again), and the shard's ``next_id`` is its issuing (highest) tag's watermark.
    """
    live = ids[ids >= 0].cpu()
    for tag in (live >> TAG_BITS).unique().tolist():
        top = int(live[(live >> TAG_BITS) == tag].max())
        if tag not in marks:
            return f"ids of tag {tag} (up to {top}), a tag its watermarks do not list"
        if top >= marks[tag]:
            return f"id {top} at or above its tag's watermark {marks[tag]}: a later add would issue it again"
    if next_id != max(marks.values()):
        return f"next id {next_id}, where its watermarks say {max(marks.values())}"
    return None


def _read_shard(root: Path, manifest: _Manifest, rank: int) -> persist.PoolSnapshot:
    """Read shard ``rank`` of ``manifest`` and check it is the shard the manifest lists.

    Its own manifest's sha256 is the one listed (version 2: a shard of another save or
    another rank is refused, before and after reading), and its entries, counters and
    configuration agree with the listing.

    Raises:
        CheckpointCorruptError: naming the shard's file, or the sharded manifest where
            the listing disagrees with the shard.
    """
    entry = manifest.shards[rank]
    where = root / entry.path
    if not where.resolve().is_relative_to(root.resolve()):
        raise CheckpointCorruptError(where, f"leads outside the checkpoint {root} (a link)")
    found = persist.manifest_digest(where) if entry.digest is not None else None
    if entry.digest is not None and found != entry.digest:
        raise CheckpointCorruptError(
            where / persist.MANIFEST,
            "missing"
            if found is None
            else f"not shard {rank} of generation {manifest.generation}: its manifest's sha256 is {found}, "
            f"the sharded manifest lists {entry.digest} (a shard of another save or another rank)",
        )
    snap = persist.read_checkpoint(where)
    if snap.origin != where or (entry.digest is not None and persist.manifest_digest(where) != entry.digest):
        raise CheckpointCorruptError(where / persist.MANIFEST, f"replaced while it was read (read {snap.origin})")
    problem = _ids_problem(snap.columns["ids"], snap.next_id, entry.watermarks)
    if problem is None and snap.size != entry.size:
        problem = f"{snap.size} entries, where the listing says {entry.size}"
    if problem is None and snap.counters != entry.counters:
        problem = "other counters than the listing's"
    if problem is None and snap.config.to_dict() != entry.config.to_dict():
        problem = "another configuration than the listing's"
    if problem is None and str(snap.columns["dreams"].dtype).removeprefix("torch.") != entry.dream_dtype:
        problem = f"dreams of dtype {snap.columns['dreams'].dtype}, where the listing says {entry.dream_dtype}"
    if problem is not None:
        raise CheckpointCorruptError(manifest.path, f"shard {rank} ({entry.path}) holds {problem}")
    return snap


def _open_rank(root: Path, manifest: _Manifest, rank: int, world: int, device: Any) -> tuple[DreamPool, dict[int, int]]:
    """This rank's shard of the checkpoint at ``root`` for ``world`` ranks, and its tag watermarks."""
    if manifest.world_size == world:  # same layout: the rank's own shard, as saved
        snap = _read_shard(root, manifest, rank)
        pool = checkpointing.build_pool(DreamPool, _rank_config(persist.config_for_load(snap, device)), snap.capacity)
        with pool._lock:
            checkpointing.restore(pool, snap)
        return pool, dict(manifest.shards[rank].watermarks)
    return _collect(
        root, manifest, lambda tag: tag % world == rank, lambda s: s % world == rank, device, default_tag=rank
    )


def load_merged(path: persist.PathArg, *, device: str | torch.device | None = None) -> DreamPool:
    """The whole sharded checkpoint at ``path`` as one :class:`DreamPool` (ids unchanged).

    New ids continue after the highest id ever issued. Used by :meth:`DreamPool.load`.

    Raises:
        CheckpointCorruptError: a missing, altered or inconsistent manifest or shard, naming the file.
    """
    root = _as_root(path)
    pool, _ = _collect(root, read_manifest(root), lambda tag: True, lambda s: True, device, default_tag=0)
    return pool


def _collect(
    root: Path,
    manifest: _Manifest,
    keep_tag: Callable[[int], bool],
    keep_counters: Callable[[int], bool],
    device: Any,
    *,
    default_tag: int,
) -> tuple[DreamPool, dict[int, int]]:
    """A pool of the entries whose tags ``keep_tag`` accepts, read from every shard holding some.

    Counters of the old shards ``keep_counters`` accepts are summed; the new pool
    issues ids in its highest kept tag, after that tag's watermark.
    """
    shards = manifest.shards
    marks = {t: m for entry in shards for t, m in entry.watermarks.items() if keep_tag(t)}
    if not marks:
        marks = {default_tag: default_tag << TAG_BITS}
    parts: list[dict[str, torch.Tensor]] = []
    encoder: tuple[str, dict[str, torch.Tensor] | None] = ("features", None)
    capacity: int | None = None  # a shard's resolved capacity (the first shard read)
    for entry in shards:
        if not any(keep_tag(t) for t in entry.watermarks):
            continue
        snap = _read_shard(root, manifest, entry.rank)
        if encoder[1] is None:  # every shard holds the same encoder state (statistics are refit collectively)
            encoder = (snap.encoder_kind, snap.encoder_state)
        if capacity is None:
            capacity = snap.capacity if snap.capacity is not None else snap.config.capacity
        ids = snap.columns["ids"]
        keep = (ids >= 0) & torch.tensor([keep_tag(int(t)) for t in (ids >> TAG_BITS).tolist()], dtype=torch.bool)
        parts.append({name: col[keep] for name, col in snap.columns.items()})
    config = shards[0].config
    if device is not None:
        config = config.replace(device=str(device))
    if config.dream_dtype == "auto":
        config = config.replace(dream_dtype=shards[0].dream_dtype)
    columns: dict[str, torch.Tensor] = {}
    if parts:
        columns = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        order = columns["ids"].argsort(stable=True)
        columns = {name: col[order] for name, col in columns.items()}
    size = int(columns["ids"].numel()) if columns else 0
    if capacity is None:
        capacity = config.capacity
    if capacity is not None and size > capacity:
        capacity = size
    pool = checkpointing.build_pool(DreamPool, _rank_config(config), capacity)
    if not columns:
        columns = {name: col[:0].cpu() for name, col in pool.bank.columns.items()}
    counters: dict[str, int] = {}
    for s, entry in enumerate(shards):
        if keep_counters(s):
            for key, value in entry.counters.items():
                counters[key] = counters.get(key, 0) + value
    issuing = max(marks, key=lambda t: marks[t])
    snap = persist.PoolSnapshot(
        config=pool.config,
        size=size,
        next_id=marks[issuing],
        extent=size,
        counters=counters,
        columns=columns,
        index_kind="",
        index_bytes=None,
        encoder_kind=encoder[0],
        encoder_state=encoder[1],
    )
    with pool._lock:
        checkpointing.restore(pool, snap)
    return pool, marks
