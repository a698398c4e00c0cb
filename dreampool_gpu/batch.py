"""Batch retrieval jobs: queries from a file, chunked, resumable, results to safetensors.

A job reads queries lazily from a ``.npy`` (memory-mapped), ``.safetensors``
(sliced) or ``.pt`` file (memory-mapped where the file allows it), runs
:meth:`DreamPool.retrieve` chunk by chunk and writes ``ids`` ``[B, k]`` int64 and
``scores`` ``[B, k]`` float32 to a safetensors file.

Resuming: every finished chunk is written (atomically) to a work directory next
to the output, ``<out>.parts/``, together with ``progress.json``, which records
the job's identity (pool checkpoint digest, queries file size and mtime, k, mode,
chunk size and retrieval options) and the finished chunks. A rerun of the same
job skips those chunks; a different job discards them. At the end the chunks are
merged into ``<out>`` with one atomic rename and the work directory is removed.
The output's safetensors metadata keeps the job identity, so rerunning a job
whose output is already complete does nothing.

The pool is loaded read-only: retrievals bump usage counts in memory only and
the checkpoint is never written.

Under torchrun (``group=`` a ``torch.distributed`` process group, see
:func:`run_retrieval_job`) every rank loads the same checkpoint (the pool is
replicated, no collective runs per chunk), rank ``r`` answers the chunks ``i``
with ``i % world == r`` and records them in ``progress-rank<r>.json``; rank 0
takes the lock, merges the one output file and removes the work directory. The
ranks agree on success or failure at each step, so an error on one rank ends
every rank with an error instead of a hang.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dreampool_gpu.atomic import atomic_write
from dreampool_gpu.config import RetrievalMode
from dreampool_gpu.errors import CollectiveError, DimensionMismatchError, DreamPoolError, InvalidInputError
from dreampool_gpu.persist import manifest_digest
from dreampool_gpu.pool import DreamPool
from dreampool_gpu.retrieval.modes import CHROMA_MODES, OPTIONS

JOB_FORMAT = "dreampool-batch-retrieval"
JOB_VERSION = 1
DEFAULT_CHUNK = 65_536
PROGRESS = "progress.json"
LOCK = "lock"
_OWN_PREFIXES = ("chunk-", "progress", LOCK)  # "progress" covers progress.json and progress-rank<r>.json
QUERY_SUFFIXES = (".npy", ".safetensors", ".pt")
_FLOAT_NAMES = {"float16", "bfloat16", "float32", "float64", "F16", "BF16", "F32", "F64"}


# ------------------------------------------------------------------ queries
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


# ---------------------------------------------------------------------- job
@dataclass(frozen=True)
class BatchReport:
    """What a batch job did.

    Attributes:
        out: the results file. queries: rows answered. width: result columns (k,
        or ``len(classes) * k`` for ``balanced``). chunks: chunks in the job.
        computed: chunks computed by this run. resumed: chunks reused from an
        interrupted run. computed_queries: rows computed by this run.
        already_done: the output was complete before this run.
        discarded: partial results of a different job were thrown away.
        seconds: wall time of this run (loading the pool included).
    """

    out: Path
    queries: int
    width: int
    chunks: int
    computed: int
    resumed: int
    computed_queries: int
    already_done: bool
    discarded: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return {**self.__dict__, "out": str(self.out)}


def work_dir(out: str | os.PathLike[str]) -> Path:
    """The sidecar directory that holds the finished chunks of ``out``'s job."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def _chunk_name(index: int) -> str:
    return f"chunk-{index:06d}.safetensors"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))


def _save_chunk(parts: Path, index: int, ids: torch.Tensor, scores: torch.Tensor) -> None:
    """Write one finished chunk atomically."""
    tensors = {"ids": ids.contiguous(), "scores": scores.contiguous()}
    atomic_write(parts / _chunk_name(index), lambda tmp: save_file(tensors, str(tmp)))


def _pool_digest(path: Path) -> str | None:
    """sha256 of the checkpoint's manifest (it holds every file's checksum)."""
    return manifest_digest(path)


def _finished_job(out: Path) -> dict[str, Any] | None:
    """The job identity stored in an existing output file, if it is one of ours."""
    if not out.is_file():
        return None
    try:
        with safe_open(str(out), framework="pt") as handle:
            meta = handle.metadata() or {}
        job = json.loads(meta.get("job", "null"))
    except (SafetensorError, OSError, ValueError):
        return None
    return job if isinstance(job, dict) else None


def _load_progress(parts: Path, job: dict[str, Any]) -> tuple[set[int], bool]:
    """Finished chunk indices of ``job`` in ``parts``; True when another job's were discarded."""
    progress = parts / PROGRESS
    if not progress.is_file():
        return set(), False
    try:
        saved = json.loads(progress.read_text())
        same = saved.get("job") == job
        done = {int(i) for i in saved.get("done", [])} if same else set()
    except (OSError, ValueError, TypeError, AttributeError):
        same, done = False, set()
    if not same:
        _clear_parts(parts, keep_dir=True)
        return set(), True
    done |= _rank_progress(parts, job)
    return {i for i in done if (parts / _chunk_name(i)).is_file()}, False


def _rank_file(rank: int) -> str:
    return f"progress-rank{rank}.json"


def _rank_progress(parts: Path, job: dict[str, Any]) -> set[int]:
    """Chunks recorded by the ranks of a torchrun run of ``job`` (``progress-rank<r>.json``)."""
    done: set[int] = set()
    for path in sorted(parts.glob("progress-rank*.json")):
        try:
            saved = json.loads(path.read_text())
            if saved.get("job") == job:
                done |= {int(i) for i in saved.get("done", [])}
        except (OSError, ValueError, TypeError, AttributeError):
            continue  # unreadable: its chunks are computed again
    return done


def _clear_parts(parts: Path, *, keep_dir: bool) -> None:
    """Remove the files this module writes in ``parts`` (nothing else), then the directory."""
    for entry in parts.iterdir():
        name = entry.name.lstrip(".")
        if entry.is_file() and name.startswith(_OWN_PREFIXES):
            entry.unlink()
    if not keep_dir:
        try:
            parts.rmdir()
        except OSError:  # someone else's files are in there: leave them
            pass


def check_out_path(out: Path, pool_dir: Path, queries: Path) -> None:
    """Refuse an output that would overwrite the queries or write into the pool's checkpoint.

    A missing ``pool_dir`` is left to :meth:`DreamPool.load` (it may recover the
    checkpoint from the copy an interrupted save left).

    Raises:
        InvalidInputError: ``out`` is the queries file, or lies inside ``pool_dir``;
            ``pool_dir`` is a file.
    """
    if os.path.lexists(pool_dir) and not pool_dir.is_dir():
        raise InvalidInputError("pool", "a checkpoint directory written by DreamPool.save", f"{pool_dir} (a file)")
    resolved = out.resolve()
    if resolved == queries.resolve():
        raise InvalidInputError(
            "out", "a results file other than the queries file", f"{out} (the queries file: it would be overwritten)"
        )
    for place in (resolved, work_dir(resolved)):
        if place.is_relative_to(pool_dir.resolve()):
            raise InvalidInputError(
                "out", "a path outside the pool's checkpoint directory (it is only read)", f"{out} (inside {pool_dir})"
            )


def run_retrieval_job(
    pool_path: str | os.PathLike[str],
    queries_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    k: int | None = None,
    mode: str | RetrievalMode = "hybrid",
    chunk: int = DEFAULT_CHUNK,
    key: str | None = None,
    device: str = "auto",
    options: dict[str, Any] | None = None,
    progress: bool = False,
    group: Any = None,
) -> BatchReport:
    """Answer every query in ``queries_path`` from the pool saved at ``pool_path``.

    Args:
        pool_path: a checkpoint directory written by :meth:`DreamPool.save`.
        queries_path: ``[B, R, C, L, 3]`` dreams, ``[B, 3]`` chroma or ``[B, D]``
            embeddings (embedding modes), float, in a ``.npy``, ``.safetensors``
            or ``.pt`` file.
        out: the results file (safetensors): ``ids`` ``[B, k]`` int64 (-1
            padding) and ``scores`` ``[B, k]`` float32 (``-inf`` padding).

    Keyword Args:
        k: results per query (default: the pool's ``retrieval_limit``).
        mode: any :class:`RetrievalMode` name.
        chunk: queries per :meth:`DreamPool.retrieve` call, >= 1.
        key: the tensor to read from a multi-tensor queries file.
        device: where the pool is loaded (``"auto"``, ``"cpu"``, ``"cuda[:N]"``).
        options: further keyword arguments of :meth:`DreamPool.retrieve`, scalars
            or lists only (``class_hint``, ``classes``, ``category``,
            ``utility_threshold``, ``fetch_k``, ``mmr_lambda``, ``min_dispersion``, ``chroma_metric``;
            :data:`~dreampool_gpu.retrieval.modes.OPTIONS`).
        progress: show a tqdm bar on stderr (rank 0 only under torchrun).
        group: a ``torch.distributed`` process group whose ranks share the job
            (every rank calls this function with the same arguments, on a
            filesystem they all see); None or a group of one: this process alone.
            Each rank loads the pool itself; rank ``r`` answers chunks
            ``i % world == r``; rank 0 writes ``out``. Every rank gets the same
            report (``computed``, ``resumed`` and ``computed_queries`` summed over
            the ranks).

    Returns:
        A :class:`BatchReport`.

    Raises:
        InvalidInputError: a missing queries file, a bad option, an ``out`` that is the
            queries file or lies inside the pool's directory.
        CheckpointNotFoundError: no checkpoint at ``pool_path`` (nor a copy left by an
            interrupted save, which is read instead).
        DimensionMismatchError: queries that do not fit the pool and mode.
        CheckpointCorruptError: the pool checkpoint fails verification.
        RankFailedError: (``group``) another rank failed; that rank raises its own error.
        Whatever interrupts the run (``KeyboardInterrupt``) leaves the finished
        chunks in :func:`work_dir` for the next run.
    """
    args = (pool_path, queries_path, out, k, mode, chunk, key, device, options)
    if group is not None and _world(group) > 1:
        return _run_distributed(group, args, progress)
    job = _prepare(*args)
    if job.already_done:
        return job.report(0, 0, 0, done=True)
    parts = work_dir(job.out)
    parts.mkdir(parents=True, exist_ok=True)
    with _JobLock(parts, job.out):
        return _run_chunks(
            job.pool,
            job.queries,
            parts,
            job.out,
            job.job,
            job.k,
            job.mode,
            job.options,
            job.width,
            progress,
            job.report,
        )


@dataclass
class _Job:
    """A checked job, its pool loaded: what :func:`_prepare` hands to the runners."""

    pool: DreamPool
    queries: QueryFile
    out: Path
    job: dict[str, Any]
    k: int
    mode: RetrievalMode
    options: dict[str, Any]
    width: int
    n_chunks: int
    already_done: bool
    report: Callable[..., BatchReport]


def _prepare(
    pool_path: str | os.PathLike[str],
    queries_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    k: int | None,
    mode: str | RetrievalMode,
    chunk: int,
    key: str | None,
    device: str,
    options: dict[str, Any] | None,
) -> _Job:
    """Check the arguments, load the pool and probe one row; nothing is written."""
    start = time.perf_counter()
    pool_dir, out = Path(pool_path), Path(out)
    mode_ = RetrievalMode.parse(mode)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise InvalidInputError("chunk", "an int >= 1", repr(chunk))
    if out.is_dir():
        raise InvalidInputError("out", "a file path for the results", f"{out} (a directory)")
    if out.suffix.lower() != ".safetensors":
        raise InvalidInputError("out", "a path ending in .safetensors", str(out))
    check_out_path(out, pool_dir, Path(queries_path))
    queries = QueryFile(queries_path, key=key)
    options = dict(options or {})
    unknown = sorted(set(options) - set(RETRIEVE_OPTIONS))
    if unknown:
        raise InvalidInputError("options", f"names among {', '.join(sorted(RETRIEVE_OPTIONS))}", ", ".join(unknown))

    pool = DreamPool.load(pool_dir, device=device)
    k_ = pool.config.retrieval_limit if k is None else k
    check_queries(queries, pool, mode_)
    total = len(queries)
    n_chunks = -(-total // chunk)
    job: dict[str, Any] = {
        "format": JOB_FORMAT,
        "version": JOB_VERSION,
        "pool": {"path": str(pool_dir.resolve()), "manifest_sha256": _pool_digest(pool_dir)},
        "queries": queries.identity(),
        "k": k_,
        "mode": mode_.value,
        "chunk": chunk,
        "options": options,
    }
    job = json.loads(json.dumps(job))  # the form it takes in progress.json and the output (tuples -> lists)
    # one row through the pool's own validation (k, options), before anything is written
    probe = pool.retrieve(queries.read(0, min(1, total)), k=k_, mode=mode_, **options)
    width = probe.ids.shape[1]

    def report(computed: int, resumed: int, rows: int, *, done: bool = False, discarded: bool = False) -> BatchReport:
        return BatchReport(
            out,
            total,
            width,
            n_chunks,
            computed,
            resumed,
            rows,
            done,
            discarded,
            time.perf_counter() - start,
        )

    done = _finished_job(out) == job
    return _Job(pool, queries, out, job, k_, mode_, options, width, n_chunks, done, report)


def _run_chunks(
    pool: DreamPool,
    queries: QueryFile,
    parts: Path,
    out: Path,
    job: dict[str, Any],
    k: int,
    mode: RetrievalMode,
    options: dict[str, Any],
    width: int,
    progress: bool,
    report: Callable[..., BatchReport],
) -> BatchReport:
    total, chunk = len(queries), int(job["chunk"])
    n_chunks = -(-total // chunk)
    done, discarded = _load_progress(parts, job)
    resumed = len(done)
    state = {"job": job, "chunks": n_chunks, "done": sorted(done)}
    _write_json(parts / PROGRESS, state)

    computed = rows = 0
    bar = _progress_bar(total, progress, initial=sum(_rows(i, chunk, total) for i in done))
    try:
        for index in range(n_chunks):
            if index in done:
                continue
            lo = index * chunk
            hi = min(total, lo + chunk)
            try:
                hits = pool.retrieve(queries.read(lo, hi), k=k, mode=mode, **options)
                pool.check()  # a deferred check (CUDA) fails here, in its chunk, before the chunk is saved
            except DreamPoolError as exc:
                if hasattr(exc, "add_note"):  # Python >= 3.11; the CLI prints notes
                    exc.add_note(
                        f"in query rows {lo}..{hi - 1} (chunk {index} of {n_chunks}); "
                        f"the {len(done)} finished chunks are kept in {parts}"
                    )
                raise
            _save_chunk(parts, index, hits.ids.cpu(), hits.scores.float().cpu())
            done.add(index)
            state["done"] = sorted(done)
            _write_json(parts / PROGRESS, state)
            computed += 1
            rows += hi - lo
            bar.update(hi - lo)
    finally:
        bar.close()

    _merge(parts, out, n_chunks, total, width, job)
    return report(computed, resumed, rows, discarded=discarded)


class _JobLock:
    """An exclusive lock on a work directory, so two runs never write the same chunks."""

    def __init__(self, parts: Path, out: Path) -> None:
        self.path = parts / LOCK
        self.out = out
        self.fd = -1

    def __enter__(self) -> _JobLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            raise InvalidInputError(
                "out",
                "an output no other job is writing",
                f"{self.out} (another run holds {self.path})",
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # closing releases the lock
        if exc[0] is None:
            _clear_parts(self.path.parent, keep_dir=False)


# ----------------------------------------------------------- under torchrun
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


def _world(group: Any) -> int:
    import torch.distributed as dist

    return int(dist.get_world_size(group))


def _describe(exc: BaseException) -> str:
    """One line for the other ranks: the message (notes included), or the exception's type."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    text = str(exc) if isinstance(exc, DreamPoolError) else f"{type(exc).__name__}: {exc}"
    text += "".join(f"; {note}" for note in getattr(exc, "__notes__", ()))
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def _agree(group: Any, step: str, failure: BaseException | None, payload: Any = None) -> list[Any]:
    """Every rank's ``payload`` once all ranks finished ``step``; raise on every rank if any failed.

    One ``all_gather_object`` of (error or None, payload) per step, never per chunk.
    The failing rank re-raises its own exception, the others raise
    :class:`RankFailedError` naming the first rank that failed.
    """
    import torch.distributed as dist

    gathered: list[Any] = [None] * _world(group)
    mine = (None if failure is None else _describe(failure), payload)
    try:
        dist.all_gather_object(gathered, mine, group=group)
    except Exception as exc:  # a rank that died, or the group's timeout
        if failure is not None:
            raise failure from None
        raise CollectiveError(int(dist.get_rank(group)), f"all_gather_object ({step})", _describe(exc)) from None
    if failure is not None:
        raise failure
    for rank, (reason, _) in enumerate(gathered):
        if reason is not None:
            raise RankFailedError(rank, step, reason)
    return [item for _, item in gathered]


def _run_distributed(group: Any, args: tuple[Any, ...], progress: bool) -> BatchReport:
    """:func:`run_retrieval_job` on every rank of ``group``: each rank its share of the chunks, rank 0 merges."""
    import torch.distributed as dist

    start = time.perf_counter()
    rank, world = int(dist.get_rank(group)), _world(group)
    prepared: _Job | None = None
    failure: BaseException | None = None
    try:
        prepared = _prepare(*args)
    except BaseException as exc:  # Ctrl-C included: the other ranks must not wait for this one
        failure = exc
    finished = _agree(group, "loading the pool and checking the job", failure, prepared and prepared.already_done)
    if prepared is None:  # unreachable: _agree raised
        raise RankFailedError(rank, "setup", "no job")
    job = prepared
    if finished[0]:  # rank 0 decides: the output already holds this job
        return job.report(0, 0, 0, done=True)

    parts = work_dir(job.out)
    lock = _JobLock(parts, job.out)
    locked = False
    state: tuple[list[int], bool] | None = None
    if rank == 0:  # the only rank that reads, discards or creates progress.json
        try:
            parts.mkdir(parents=True, exist_ok=True)
            lock.__enter__()
            locked = True
            done0, discarded0 = _load_progress(parts, job.job)
            _write_json(parts / PROGRESS, {"job": job.job, "chunks": job.n_chunks, "done": sorted(done0)})
            state = (sorted(done0), discarded0)
        except BaseException as exc:
            failure = exc
    try:
        states = _agree(group, "opening the work directory", failure, state)
        done, discarded = set(states[0][0]), bool(states[0][1])
        total, chunk = len(job.queries), int(job.job["chunk"])
        bar = _progress_bar(total, progress and rank == 0, initial=sum(_rows(i, chunk, total) for i in done))
        try:
            counts = _agree(group, "retrieval", *_run_share(job, parts, rank, world, done, bar))
            bar.update(total - bar.n)  # every rank's chunks are on disk now
        finally:
            bar.close()
        failure = None
        if rank == 0:
            try:
                _merge(parts, job.out, job.n_chunks, len(job.queries), job.width, job.job)
            except BaseException as exc:
                failure = exc
        _agree(group, "merging the output", failure)
    except BaseException as exc:
        if locked:
            lock.__exit__(type(exc), exc, exc.__traceback__)  # keeps the finished chunks
        raise
    if locked:
        lock.__exit__(None, None, None)  # removes the work directory
    computed = sum(c for c, _ in counts)
    rows = sum(r for _, r in counts)
    report = job.report(computed, len(done), rows, discarded=discarded)
    return dataclasses.replace(report, seconds=time.perf_counter() - start)


def _run_share(
    job: _Job, parts: Path, rank: int, world: int, done: set[int], bar: Any
) -> tuple[BaseException | None, tuple[int, int]]:
    """This rank's chunks (``index % world == rank``, not yet done): (the failure or None, (chunks, rows))."""
    total, chunk = len(job.queries), int(job.job["chunk"])
    mine = [i for i in range(job.n_chunks) if i % world == rank and i not in done]
    done_here: list[int] = []
    state = {"job": job.job, "rank": rank, "world": world, "done": done_here}
    computed = rows = 0
    try:
        for index in mine:
            lo, hi = index * chunk, min(total, (index + 1) * chunk)
            try:
                hits = job.pool.retrieve(job.queries.read(lo, hi), k=job.k, mode=job.mode, **job.options)
                job.pool.check()  # a deferred check (CUDA) fails here, in its chunk
            except DreamPoolError as exc:
                if hasattr(exc, "add_note"):  # Python >= 3.11; the CLI prints notes
                    exc.add_note(
                        f"in query rows {lo}..{hi - 1} (chunk {index} of {job.n_chunks}, rank {rank}); "
                        f"finished chunks are kept in {parts}"
                    )
                raise
            _save_chunk(parts, index, hits.ids.cpu(), hits.scores.float().cpu())
            done_here.append(index)
            _write_json(parts / _rank_file(rank), state)
            computed += 1
            rows += hi - lo
            if bar.disable:
                continue
            bar.n = sum(_rows(i, chunk, total) for i in _chunks_on_disk(parts))  # every rank's, approximately
            bar.refresh()
    except BaseException as exc:  # Ctrl-C included
        return exc, (computed, rows)
    return None, (computed, rows)


def _chunks_on_disk(parts: Path) -> set[int]:
    found = set()
    for path in parts.glob("chunk-*.safetensors"):
        try:
            found.add(int(path.stem.removeprefix("chunk-")))
        except ValueError:
            continue
    return found


RETRIEVE_OPTIONS = OPTIONS
"""The keyword options of :meth:`DreamPool.retrieve` a batch job passes through."""


def _rows(index: int, chunk: int, total: int) -> int:
    return max(0, min(total, (index + 1) * chunk) - index * chunk)


def _progress_bar(total: int, enabled: bool, *, initial: int) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="q",
        unit_scale=True,
        desc="retrieve",
        disable=not enabled,
        dynamic_ncols=True,
    )


def _merge(parts: Path, out: Path, n_chunks: int, total: int, width: int, job: dict[str, Any]) -> None:
    """Concatenate the chunks into ``out`` with one atomic rename."""
    ids = torch.empty(total, width, dtype=torch.int64)
    scores = torch.empty(total, width, dtype=torch.float32)
    row = 0
    for index in range(n_chunks):
        part = load_file(str(parts / _chunk_name(index)))
        n = part["ids"].shape[0]
        ids[row : row + n] = part["ids"]
        scores[row : row + n] = part["scores"]
        row += n
    if row != total:  # unreachable unless the work directory was edited by hand
        raise InvalidInputError(str(parts), f"chunks holding {total} rows", f"{row} rows")
    meta = {
        "job": json.dumps(job, sort_keys=True),
        "mode": job["mode"],
        "k": str(job["k"]),
        "queries": str(total),
    }
    tensors = {"ids": ids, "scores": scores}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=meta)
        _sort_header(tmp)

    atomic_write(out, write)


def _sort_header(path: Path) -> None:
    """Rewrite a safetensors file's JSON header in place with sorted keys, so equal results are equal bytes.

    safetensors writes the metadata in hash order, which changes from process to
    process; the header keeps its length (the spaces that pad it grow or shrink).
    Left as it is where Python's JSON would come out longer than safetensors' own.
    """
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:
            f.seek(8)
            f.write(text + b" " * (size - len(text)))


def read_results(path: str | os.PathLike[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, k] int64, scores [B, k] float32)`` from a batch job's output file."""
    data = load_file(str(path))
    return data["ids"], data["scores"]
