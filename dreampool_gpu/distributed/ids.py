"""Global ids of a sharded pool and the watermarks of the tags a shard owns.

Ids are global: ``id = tag << 40 | counter``. A fresh shard issues ids in tag
``rank``; the owner of an id is ``tag % world_size``. A shard's watermarks map each
tag it owns to the next id that tag would issue.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from dreampool_gpu.errors import InvalidInputError

TAG_BITS = 40
_TAG = re.compile(r"0|[1-9][0-9]{0,7}")  # a tag as a JSON key, in canonical form
_MAX_TAG = (1 << (63 - TAG_BITS)) - 1  # ids are int64


def _is_int(value: Any, low: int, high: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)


def owner_of(ids: torch.Tensor, world_size: int) -> torch.Tensor:
    """Rank owning each global id (any shape, int64): ``(id >> 40) % world_size``; 0 for -1."""
    return torch.where(ids >= 0, (ids >> TAG_BITS) % world_size, torch.zeros_like(ids))


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
