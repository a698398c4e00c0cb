"""The work directory of a batch job (``<out>.parts/``): finished chunks, progress files, the
job's lock, and the merge of the chunks into the output.

Every finished chunk is written atomically; ``progress.json`` (``progress-rank<r>.json``
under torchrun) records the job's identity and its finished chunks, so a rerun of the
same job skips them and a different job discards them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dreampool_gpu.errors import InvalidInputError
from dreampool_gpu.persist.files import atomic_write

PROGRESS = "progress.json"
LOCK = "lock"
_OWN_PREFIXES = ("chunk-", "progress", LOCK)  # "progress" covers progress.json and progress-rank<r>.json


def work_dir(out: str | os.PathLike[str]) -> Path:
    """The sidecar directory that holds the finished chunks of ``out``'s job."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def _chunk_name(index: int) -> str:
    return f"chunk-{index:06d}.safetensors"


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))


def save_chunk(parts: Path, index: int, ids: torch.Tensor, scores: torch.Tensor) -> None:
    """Write one finished chunk atomically (the runners call it as ``workdir.save_chunk``)."""
    tensors = {"ids": ids.contiguous(), "scores": scores.contiguous()}
    atomic_write(parts / _chunk_name(index), lambda tmp: save_file(tensors, str(tmp)))


def load_progress(parts: Path, job: dict[str, Any]) -> tuple[set[int], bool]:
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


def rank_file(rank: int) -> str:
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


class JobLock:
    """An exclusive lock on a work directory, so two runs never write the same chunks."""

    def __init__(self, parts: Path, out: Path) -> None:
        self.path = parts / LOCK
        self.out = out
        self.fd = -1

    def __enter__(self) -> JobLock:
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


def chunks_on_disk(parts: Path) -> set[int]:
    found = set()
    for path in parts.glob("chunk-*.safetensors"):
        try:
            found.add(int(path.stem.removeprefix("chunk-")))
        except ValueError:
            continue
    return found


def chunk_rows(index: int, chunk: int, total: int) -> int:
    return max(0, min(total, (index + 1) * chunk) - index * chunk)


def progress_bar(total: int, enabled: bool, *, initial: int) -> Any:
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


def merge_chunks(parts: Path, out: Path, n_chunks: int, total: int, width: int, job: dict[str, Any]) -> None:
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
