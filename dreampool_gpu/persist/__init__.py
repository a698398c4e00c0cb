"""Checkpoint format of a :class:`~dreampool_gpu.pool.DreamPool`: save, load, verify, recover.

One concern per module, every name importable from here as before:

- :mod:`~dreampool_gpu.persist.format`: the file layout, :class:`PoolSnapshot`, the checks
  that assemble one from its parts, the state-dict form, the index file's bank tag;
- :mod:`~dreampool_gpu.persist.files`: crash-safe writes (:func:`write_checkpoint`, the
  directory swap, :func:`atomic_write`) and non-blocking reads of regular files;
- :mod:`~dreampool_gpu.persist.verify`: :func:`read_checkpoint`, every checksum verified
  on the bytes it parses, recovery from an interrupted save;
- :mod:`~dreampool_gpu.persist.restore`: the checks a snapshot passes before it goes into
  a pool (:func:`check_restorable`) and what a restore derives from it.

What goes into a :class:`PoolSnapshot`, and how it goes back into a pool, is
:mod:`dreampool_gpu.checkpointing`'s: each part of the pool gives and takes its own
state (``state_dict`` / ``load_state_dict``).
"""

from dreampool_gpu.persist.files import (
    WRITE_LOCK,
    atomic_write,
    fsync_path,
    read_manifest_bytes,
    write_checkpoint,
    write_synced,
)
from dreampool_gpu.persist.format import (
    BANK,
    CONFIG,
    ENCODER,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX,
    MANIFEST,
    STATE,
    CheckpointRecoveryWarning,
    PathArg,
    PoolSnapshot,
    _digest,
    bank_digest,
    from_state_dict,
    tag_index,
    to_state_dict,
)
from dreampool_gpu.persist.restore import check_restorable, config_for_load, encoder_kind, index_state
from dreampool_gpu.persist.verify import checkpoint_source, manifest_digest, read_checkpoint

__all__ = [
    "BANK",
    "CONFIG",
    "ENCODER",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX",
    "MANIFEST",
    "STATE",
    "WRITE_LOCK",
    "CheckpointRecoveryWarning",
    "PathArg",
    "PoolSnapshot",
    "_digest",
    "atomic_write",
    "bank_digest",
    "check_restorable",
    "checkpoint_source",
    "config_for_load",
    "encoder_kind",
    "from_state_dict",
    "fsync_path",
    "index_state",
    "manifest_digest",
    "read_checkpoint",
    "read_manifest_bytes",
    "tag_index",
    "to_state_dict",
    "write_checkpoint",
    "write_synced",
]
