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

Modules: :mod:`~dreampool_gpu.batch.queries` (the query files),
:mod:`~dreampool_gpu.batch.job` (the job in one process), :mod:`~dreampool_gpu.batch.workdir`
(chunks, progress, lock, merge), :mod:`~dreampool_gpu.batch.torchrun` (the split over ranks).
Every name is importable from here as before.
"""

from dreampool_gpu.batch.job import (
    DEFAULT_CHUNK,
    JOB_FORMAT,
    JOB_VERSION,
    RETRIEVE_OPTIONS,
    BatchReport,
    check_out_path,
    run_retrieval_job,
)
from dreampool_gpu.batch.queries import QUERY_SUFFIXES, QueryFile, check_queries
from dreampool_gpu.batch.workdir import LOCK, PROGRESS, read_results, work_dir
from dreampool_gpu.errors import RankFailedError

__all__ = [
    "DEFAULT_CHUNK",
    "JOB_FORMAT",
    "JOB_VERSION",
    "LOCK",
    "PROGRESS",
    "QUERY_SUFFIXES",
    "RETRIEVE_OPTIONS",
    "BatchReport",
    "QueryFile",
    "RankFailedError",
    "check_out_path",
    "check_queries",
    "read_results",
    "run_retrieval_job",
    "work_dir",
]
