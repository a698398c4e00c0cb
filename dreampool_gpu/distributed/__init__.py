"""ShardedDreamPool: one pool across the ranks of a torch.distributed group.

Every rank holds one shard, a :class:`~dreampool_gpu.pool.DreamPool`. Ids are global:
``id = tag << 40 | counter``; a fresh shard issues ids in tag ``rank``, and the owner of
an id is ``tag % world_size``. A single :class:`DreamPool` that received the same
entries in global id order answers every retrieval exactly as the sharded pool does.

Modules: :mod:`.collectives` (bounded-wait collectives, the agreement on errors),
:mod:`.ids` (global ids, watermarks), :mod:`.pool` (the class, its adds),
:mod:`.retrieve`, :mod:`.routing` (requests by id, draws), :mod:`.fit` (the encoder),
:mod:`.checkpoint` and :mod:`.manifest` (sharded checkpoints), :mod:`.stats`.
"""

from __future__ import annotations

from dreampool_gpu.distributed.checkpoint import load_merged
from dreampool_gpu.distributed.collectives import DEFAULT_TIMEOUT_S
from dreampool_gpu.distributed.ids import TAG_BITS, owner_of
from dreampool_gpu.distributed.manifest import SHARDED_FORMAT, SHARDED_VERSION, is_sharded_checkpoint, read_manifest
from dreampool_gpu.distributed.pool import ShardedDreamPool
from dreampool_gpu.distributed.stats import ShardedPoolStats

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "SHARDED_FORMAT",
    "SHARDED_VERSION",
    "TAG_BITS",
    "ShardedDreamPool",
    "ShardedPoolStats",
    "is_sharded_checkpoint",
    "load_merged",
    "owner_of",
    "read_manifest",
]
