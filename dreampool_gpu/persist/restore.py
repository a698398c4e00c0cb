"""The checks a snapshot passes before it goes into a pool, and what a restore derives from it.

:func:`check_restorable` runs every check before the first part of the pool
changes (the configurations agree, the capacity holds the saved extent, the
encoder state fits, a sample of entries recomputes from its dreams), so a
refused snapshot leaves the pool as it was. :func:`index_state` hands the
saved index back only when it was built from the saved bank.
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Any

import torch

from dreampool_gpu.config import PoolConfig
from dreampool_gpu.devices import resolve_device
from dreampool_gpu.dreams import chroma_signature
from dreampool_gpu.errors import CheckpointCorruptError, InvalidConfigurationError, InvalidInputError
from dreampool_gpu.persist.format import (
    _INDEX_MAGIC,
    BANK,
    ENCODER,
    CheckpointRecoveryWarning,
    PoolSnapshot,
    _dtype_name,
    bank_digest,
)
from dreampool_gpu.spectral import spectral_features

if TYPE_CHECKING:
    from dreampool_gpu.parts import PoolParts

# Config fields that shape what the bank stores: a state can only go into a pool that agrees on them.
_STRUCTURAL = (
    "dream_shape",
    "embedding_dim",
    "metric",
    "window",
    "include_spectral",
    "include_class",
    "include_utility",
    "encoder_seed",
    "encoder",
    "num_classes",
    "columns",
)

_SPOT_SAMPLE = 32  # live entries recomputed from their dreams on every restore
# |recomputed - stored| allowed, by the dreams' storage dtype (features were computed from the
# caller's dreams before the cast to it): chroma absolute, embeddings relative to their scale
# (float32: tight enough to catch an encoder scaled by 1 + 1e-3, loose enough for another CPU's
# or a GPU's TF32 convolutions, which move a learned encoder's unit embeddings by ~2e-5)
_SPOT_TOLERANCE = {torch.float32: (1e-5, 3e-5), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1e-2, 2e-2)}


def encoder_kind(encoder: Any) -> str:
    """The checkpoint's name for the kind of ``encoder``."""
    from dreampool_gpu.encoders import FeatureEncoder
    from dreampool_gpu.learned import LearnedEncoder, ModuleEncoder

    kinds = ((FeatureEncoder, "features"), (LearnedEncoder, "learned"), (ModuleEncoder, "module"))
    return next((name for cls, name in kinds if isinstance(encoder, cls)), "custom")


def _check_encoder(parts: PoolParts, snap: PoolSnapshot) -> None:
    """The saved encoder state fits ``parts.encoder``: same kind, names, shapes and dtypes, and
    for the feature encoder the projection its configuration (seed, parts, classes) makes.

    Raises:
        CheckpointCorruptError: (read from a directory) naming the encoder file.
        InvalidConfigurationError: (a state dict) naming ``encoder``.
    """
    mine = encoder_kind(parts.encoder)
    if snap.encoder_state is None:  # format 1: the bank is re-embedded by a feature encoder
        if mine != "features":
            raise InvalidConfigurationError(
                "encoder", mine, "the feature encoder: a format-1 checkpoint carries no encoder state"
            )
        return
    problem = None
    if mine != snap.encoder_kind and snap.encoder_kind in ("module", "custom") and mine in ("features", "learned"):
        problem = (  # the caller gave no encoder=: name what to pass, not the config's default kind
            "none (no encoder= given)",
            f"the user {snap.encoder_kind!r} encoder the state was saved with: pass encoder= a fresh "
            "module of the saved architecture (DreamPool.load(path, encoder=...)); its weights are loaded into it",
        )
    elif mine != snap.encoder_kind:
        problem = (
            mine,
            f"a {snap.encoder_kind!r} encoder, as the state was saved with (pass encoder= a module "
            "of the saved architecture for a 'module' or 'custom' encoder)",
        )
    current = parts.encoder.state_dict()
    for name in sorted(set(current) | set(snap.encoder_state)):
        a, b = current.get(name), snap.encoder_state.get(name)
        if problem is None and (a is None or b is None or a.shape != b.shape or a.dtype != b.dtype):
            got = "absent" if b is None else f"{list(b.shape)} {b.dtype}"
            problem = (f"state {name!r}: {got}", "absent" if a is None else f"{list(a.shape)} {a.dtype}")
    if (
        problem is None
        and mine == "features"
        and not torch.equal(current["projection"].cpu(), snap.encoder_state["projection"])
    ):
        problem = ("another projection", "the projection of this configuration (encoder_seed, include_*, num_classes)")
    if problem is None:
        return
    caller_supplied = mine != snap.encoder_kind or mine in ("module", "custom")  # the caller's encoder= is off
    if snap.origin is not None and not caller_supplied:
        raise CheckpointCorruptError(
            snap.origin / ENCODER, f"inconsistent data: expected {problem[1]}, got {problem[0]}"
        )
    raise InvalidConfigurationError("encoder", problem[0], problem[1])


def check_restorable(parts: PoolParts, snap: PoolSnapshot) -> None:
    """Refuse ``snap`` where the pool of ``parts`` cannot hold it (caller holds the lock; nothing is changed).

    The structural fields of the configurations agree, the pool's capacity holds the
    saved extent, the saved encoder state fits the pool's encoder, and a sample of
    entries recomputes from their stored dreams (:func:`_spot_check`).

    Raises:
        InvalidConfigurationError: the pool's configuration cannot hold ``snap``
            (a structural field differs, or ``capacity`` is below the saved extent).
        CheckpointCorruptError, InvalidInputError: the snapshot's data is inconsistent.
    """
    for name in _STRUCTURAL:
        mine, theirs = getattr(parts.config, name), getattr(snap.config, name)
        if mine != theirs:
            expected = f"{_plain(mine)!r}, the value this pool was built with"
            raise InvalidConfigurationError(name, _plain(theirs), expected)
    if snap.extent > parts.bank.capacity:
        raise InvalidConfigurationError(
            "capacity", parts.bank.capacity, f"at least {snap.extent} (the saved extent) to hold this state"
        )
    _check_encoder(parts, snap)
    _spot_check(parts, snap)


def index_state(snap: PoolSnapshot, revision: int) -> dict[str, Any]:
    """The ``SearchIndex.state_dict()`` to load once ``snap``'s bank is in a bank at ``revision``.

    ``data`` is the saved engine state when its header names ``snap``'s bank (then it is
    stamped with ``revision``); None, with a :class:`CheckpointRecoveryWarning`, for an
    index of another bank; None for a format-1 snapshot (its embeddings are recomputed).
    """
    data = None if snap.encoder_state is None else _untag_index(snap)
    return {"kind": snap.index_kind, "revision": revision, "data": data}


def _untag_index(snap: PoolSnapshot) -> bytes | None:
    """The engine bytes of ``snap``'s index when it was built from ``snap``'s bank, else None.

    An index of another bank (copied from another pool, or from another save) would
    answer for entries that are not there: it is rebuilt from the bank, with a
    :class:`CheckpointRecoveryWarning`.
    """
    data = snap.index_bytes
    if data is None:
        return None
    head, _, body = data.partition(b"\n")
    if not head.startswith(_INDEX_MAGIC):
        reason = "it names no bank it was built from"
    elif head[len(_INDEX_MAGIC) :].decode(errors="replace") != bank_digest(snap.columns):
        reason = "it was built from another bank (digest mismatch)"
    else:
        return body
    where = "" if snap.origin is None else f" in {snap.origin}"
    warnings.warn(
        f"search index{where} not used: {reason}; rebuilt from the bank", CheckpointRecoveryWarning, stacklevel=6
    )
    return None


def _spot_check(parts: PoolParts, snap: PoolSnapshot) -> None:
    """Refuse a snapshot whose derived columns do not follow from its dreams under the pool's encoder.

    Checksums prove the bytes are the ones written, not that they agree: a manifest
    signed again with another ``encoder_seed``, embeddings scaled under cosine, or
    chroma of other dreams would load and answer differently. Checked: every live
    embedding has unit norm under cosine; for up to :data:`_SPOT_SAMPLE` live entries
    (evenly spaced), chroma and embeddings recomputed from the stored dreams match.

    Raises:
        CheckpointCorruptError: (read from a directory) naming the bank file.
        InvalidInputError: (a state dict) naming ``state_dict``.
    """
    alive = torch.nonzero(snap.columns["ids"] >= 0).squeeze(1)
    problem = None
    if alive.numel():
        stored = snap.columns["embeddings"][alive]
        if parts.config.metric.value == "cosine":
            norms = stored.norm(dim=1)
            worst = float((norms - 1).abs().max())
            if worst > 1e-3:
                problem = f"cosine embeddings of unit norm, norms up to {float(norms.max()):.6g}"
        if problem is None:
            problem = _recompute_problem(parts, snap, alive)
    if problem is None:
        return
    reason = f"inconsistent data: {problem}; the bank does not follow from its dreams with this configuration"
    if snap.origin is not None:
        raise CheckpointCorruptError(snap.origin / BANK, reason)
    raise InvalidInputError("state_dict", "a bank whose derived columns follow from its dreams", reason)


def _recompute_problem(parts: PoolParts, snap: PoolSnapshot, alive: torch.Tensor) -> str | None:
    """What differs when a sample of entries is recomputed from its dreams; None when nothing does."""
    picks = alive[torch.linspace(0, alive.numel() - 1, min(_SPOT_SAMPLE, alive.numel())).round().long().unique()]
    cols = {
        name: snap.columns[name][picks].to(parts.device) for name in ("dreams", "chroma", "embeddings", "class_label")
    }
    chroma_tol, embed_tol = _SPOT_TOLERANCE.get(cols["dreams"].dtype, _SPOT_TOLERANCE[torch.bfloat16])
    chroma = chroma_signature(cols["dreams"])
    chroma_gap = float((chroma - cols["chroma"]).abs().max())
    if chroma_gap > chroma_tol:
        return f"stored chroma differs from the chroma of the stored dreams by up to {chroma_gap:.3g}"
    if snap.encoder_state is None:  # format 1: re-embedded on restore, nothing to compare with
        return None
    embeddings = _embeddings_as_added(parts, snap.encoder_state, cols["dreams"], cols["class_label"].long())
    scale = 1.0 + float(cols["embeddings"].abs().max())
    embed_gap = float((embeddings - cols["embeddings"]).abs().max())
    if embed_gap > embed_tol * scale:
        return (
            f"stored embeddings differ from the encoder's embeddings of the stored dreams by up to "
            f"{embed_gap:.3g} (encoder_seed, include_* or metric changed?)"
        )
    return None


def _embeddings_as_added(
    parts: PoolParts, encoder_state: dict[str, torch.Tensor], dreams: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """``[n, D]`` bank embeddings of ``dreams`` ``[n, R, C, L, 3]`` under a snapshot's ``encoder_state``.

    Computed as :meth:`DreamPool.add` embeds (features of the dreams, then
    ``encode_entries``), by a copy of the pool's encoder holding ``encoder_state``.
    """
    from dreampool_gpu.encoders import bank_form

    encoder = copy.deepcopy(parts.encoder)
    encoder.load_state_dict(encoder_state)
    dreams = dreams.float()
    spectral = spectral_features(dreams, window=parts.config.window)
    z = encoder.encode_entries(dreams, chroma=chroma_signature(dreams), spectral=spectral, class_labels=labels)
    return bank_form(z, parts.config.metric)


def config_for_load(snap: PoolSnapshot, device: str | torch.device | None) -> PoolConfig:
    """The configuration a pool loaded from ``snap`` onto ``device`` is built with.

    ``device`` None keeps the saved device. The dream dtype follows the saved
    column: an ``auto`` dtype that would pick another dtype on ``device`` is
    replaced by the saved dtype's name.

    Raises:
        InvalidConfigurationError: ``device`` names no device.
        DeviceUnavailableError: ``device`` (or the saved one) is CUDA and absent.
    """
    config = snap.config
    if device is not None:
        if not isinstance(device, (str, torch.device)):
            raise InvalidConfigurationError("device", device, '"auto", "cpu", "cuda" or "cuda:N"')
        config = config.replace(device=str(device))
    saved = _dtype_name(snap.columns["dreams"].dtype)
    if config.dream_dtype == "auto":
        auto = "float16" if resolve_device(config.device).type == "cuda" else "float32"
        if auto != saved:
            config = config.replace(dream_dtype=saved)
    return config


def _plain(value: Any) -> Any:
    return getattr(value, "value", value)
