"""A batch job split over the ranks of a ``torch.distributed`` group (torchrun).

Every rank loads the same checkpoint (the pool is replicated, no collective runs per
chunk), rank ``r`` answers the chunks ``i`` with ``i % world == r`` and records them in
``progress-rank<r>.json``; rank 0 takes the lock, merges the one output file and
removes the work directory. The ranks agree on success or failure at each step
(:func:`_agree`), so an error on one rank ends every rank with an error instead of a hang.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dreampool_gpu.batch import workdir
from dreampool_gpu.errors import CollectiveError, DreamPoolError, RankFailedError

if TYPE_CHECKING:
    from dreampool_gpu.batch.job import BatchReport, _Job


def world_size(group: Any) -> int:
    """Ranks in ``group``."""
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

    gathered: list[Any] = [None] * world_size(group)
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


def run_distributed(group: Any, prepare: Callable[[], _Job], progress: bool) -> BatchReport:
    """``run_retrieval_job`` on every rank of ``group``: each rank its share of the chunks, rank 0 merges.

    ``prepare()`` checks the job and loads the pool on this rank; every rank calls it.
    """
    import torch.distributed as dist

    start = time.perf_counter()
    rank, world = int(dist.get_rank(group)), world_size(group)
    prepared: _Job | None = None
    failure: BaseException | None = None
    try:
        prepared = prepare()
    except BaseException as exc:  # Ctrl-C included: the other ranks must not wait for this one
        failure = exc
    finished = _agree(group, "loading the pool and checking the job", failure, prepared and prepared.already_done)
    if prepared is None:  # unreachable: _agree raised
        raise RankFailedError(rank, "setup", "no job")
    job = prepared
    if finished[0]:  # rank 0 decides: the output already holds this job
        return job.report(0, 0, 0, done=True)

    parts = workdir.work_dir(job.out)
    lock = workdir.JobLock(parts, job.out)
    locked = False
    state: tuple[list[int], bool] | None = None
    if rank == 0:  # the only rank that reads, discards or creates progress.json
        try:
            parts.mkdir(parents=True, exist_ok=True)
            lock.__enter__()
            locked = True
            done0, discarded0 = workdir.load_progress(parts, job.job)
            workdir.write_json(
                parts / workdir.PROGRESS, {"job": job.job, "chunks": job.n_chunks, "done": sorted(done0)}
            )
            state = (sorted(done0), discarded0)
        except BaseException as exc:
            failure = exc
    try:
        states = _agree(group, "opening the work directory", failure, state)
        done, discarded = set(states[0][0]), bool(states[0][1])
        total, chunk = len(job.queries), int(job.job["chunk"])
        bar = workdir.progress_bar(
            total, progress and rank == 0, initial=sum(workdir.chunk_rows(i, chunk, total) for i in done)
        )
        try:
            counts = _agree(group, "retrieval", *_run_share(job, parts, rank, world, done, bar))
            bar.update(total - bar.n)  # every rank's chunks are on disk now
        finally:
            bar.close()
        failure = None
        if rank == 0:
            try:
                workdir.merge_chunks(parts, job.out, job.n_chunks, len(job.queries), job.width, job.job)
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
            workdir.save_chunk(parts, index, hits.ids.cpu(), hits.scores.float().cpu())
            done_here.append(index)
            workdir.write_json(parts / workdir.rank_file(rank), state)
            computed += 1
            rows += hi - lo
            if bar.disable:
                continue
            bar.n = sum(
                workdir.chunk_rows(i, chunk, total) for i in workdir.chunks_on_disk(parts)
            )  # every rank's, approximately
            bar.refresh()
    except BaseException as exc:  # Ctrl-C included
        return exc, (computed, rows)
    return None, (computed, rows)
