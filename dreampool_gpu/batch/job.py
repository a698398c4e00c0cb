"""A batch retrieval job in one process: its checks, its identity, the loop over chunks.

:func:`run_retrieval_job` hands a job under torchrun (a group of more than one rank) to
:mod:`dreampool_gpu.batch.torchrun`.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from dreampool_gpu.batch import torchrun, workdir
from dreampool_gpu.batch.queries import QueryFile, check_queries
from dreampool_gpu.config import RetrievalMode
from dreampool_gpu.errors import DreamPoolError, InvalidInputError
from dreampool_gpu.persist import manifest_digest
from dreampool_gpu.pool import DreamPool
from dreampool_gpu.retrieval.modes import OPTIONS

JOB_FORMAT = "dreampool-batch-retrieval"
JOB_VERSION = 1
DEFAULT_CHUNK = 65_536

RETRIEVE_OPTIONS = OPTIONS
"""The keyword options of :meth:`DreamPool.retrieve` a batch job passes through."""


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
    for place in (resolved, workdir.work_dir(resolved)):
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
    if group is not None and torchrun.world_size(group) > 1:
        return torchrun.run_distributed(group, functools.partial(_prepare, *args), progress)
    job = _prepare(*args)
    if job.already_done:
        return job.report(0, 0, 0, done=True)
    parts = workdir.work_dir(job.out)
    parts.mkdir(parents=True, exist_ok=True)
    with workdir.JobLock(parts, job.out):
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
    done, discarded = workdir.load_progress(parts, job)
    resumed = len(done)
    state = {"job": job, "chunks": n_chunks, "done": sorted(done)}
    workdir.write_json(parts / workdir.PROGRESS, state)

    computed = rows = 0
    bar = workdir.progress_bar(total, progress, initial=sum(workdir.chunk_rows(i, chunk, total) for i in done))
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
            workdir.save_chunk(parts, index, hits.ids.cpu(), hits.scores.float().cpu())
            done.add(index)
            state["done"] = sorted(done)
            workdir.write_json(parts / workdir.PROGRESS, state)
            computed += 1
            rows += hi - lo
            bar.update(hi - lo)
    finally:
        bar.close()

    workdir.merge_chunks(parts, out, n_chunks, total, width, job)
    return report(computed, resumed, rows, discarded=discarded)
