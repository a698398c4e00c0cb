"""The pool's encoder slot: choose the encoder, check it is fresh, train it, re-embed the bank.

:class:`EncoderSlot` is a part of a :class:`~dreampool_gpu.pool.DreamPool`: it owns the
encoder, the encoder version the bank's embeddings come from, whether a learned encoder
was fitted, and the query cache (entries computed under the current encoder). It reads
the bank, index, config and counters of the :class:`~dreampool_gpu.parts.PoolParts` it
belongs to; its methods run under the pool's lock. Swapping embeddings is all or nothing
(:meth:`EncoderSlot.install`).
"""

from __future__ import annotations

import copy
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

import torch

from dreampool_gpu import _validation as v
from dreampool_gpu.cache import QueryCache
from dreampool_gpu.config import PoolConfig
from dreampool_gpu.encoders import Encoder, FeatureEncoder, bank_form
from dreampool_gpu.errors import IndexStaleError, InvalidConfigurationError, InvalidInputError
from dreampool_gpu.fitting import FitReport, train_encoder
from dreampool_gpu.learned import LearnedEncoder, ModuleEncoder
from dreampool_gpu.retrieval import stages

if TYPE_CHECKING:
    from dreampool_gpu.parts import PoolParts
    from dreampool_gpu.retrieval.request import Queries

_EMBED_CHUNK = 4096  # entries embedded per encoder call when the whole bank is re-embedded


class _HeldInterrupt:
    """Hold SIGINT for a block (main thread, Python handler only): recorded in ``arrived``, not raised.

    On exit the previous handler is restored and, for a signal the block left in
    ``arrived``, called (the default one raises KeyboardInterrupt).
    """

    def __enter__(self) -> _HeldInterrupt:
        self.arrived = False
        self._previous: Callable[[int, FrameType | None], Any] | None = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if callable(previous):
                self._previous = previous
                signal.signal(signal.SIGINT, self._record)
        return self

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.arrived = True

    def take_keyboard_interrupt(self) -> bool:
        """True (once) when a signal arrived that the previous handler, Python's default,
        would have raised as KeyboardInterrupt; a caller's own handler is left to :meth:`__exit__`."""
        if self.arrived and self._previous is signal.default_int_handler:
            self.arrived = False
            return True
        return False

    def __exit__(self, *_: object) -> None:
        if self._previous is None:
            return
        signal.signal(signal.SIGINT, self._previous)
        if self.arrived:  # never lost: the default handler raises KeyboardInterrupt here
            self._previous(signal.SIGINT, None)


def check_fit_arguments(
    encoder: Encoder, steps: Any, batch_size: Any, lr: Any, seed: Any, colour_jitter: Any, *, pool: str
) -> tuple[LearnedEncoder | ModuleEncoder, int, int, float, int, float]:
    """``fit_encoder``'s checks of its encoder and arguments (``pool`` names the class in the message).

    Returns:
        ``(encoder, steps, batch_size, lr, seed, colour_jitter)`` as checked.

    Raises:
        InvalidConfigurationError: ``encoder`` is not trainable.
        InvalidInputError: an argument out of its range.
    """
    if not isinstance(encoder, (LearnedEncoder, ModuleEncoder)):
        raise InvalidConfigurationError(
            "encoder",
            type(encoder).__name__,
            f"a trainable encoder: PoolConfig(encoder='learned') or {pool}(config, encoder=<nn.Module>)",
        )
    counts = v.check_count(steps, "steps"), v.check_count(batch_size, "batch_size"), v.check_count(seed, "seed")
    rate = v.check_number(lr, "lr", 0.0, 1.0)
    jitter = v.check_number(colour_jitter, "colour_jitter", 0.0, 1.0)
    for name, value, ok, expected in (
        ("steps", counts[0], counts[0] >= 1, "an int >= 1"),
        ("batch_size", counts[1], counts[1] >= 2, "an int >= 2"),
        ("lr", rate, rate > 0.0, "a learning rate in (0, 1]"),
    ):
        if not ok:
            raise InvalidInputError(name, expected, value)
    return encoder, counts[0], counts[1], rate, counts[2], jitter


class EncoderSlot:
    """The encoder of one pool and what depends on it (a part of :class:`~dreampool_gpu.parts.PoolParts`).

    Args:
        parts: the pool's parts (bank, index, config, device, counters), read at each call.
        encoder: the encoder, on the pool's device (:func:`make_encoder`).
        fitted: False for a learned encoder with its initial weights (retrievals warn).
        cache: the query cache.

    Attributes:
        encoder: the encoder. embedded_version: the encoder version the bank's embeddings
            come from. fitted: see above. cache: the query cache.
    """

    def __init__(self, parts: PoolParts, encoder: Encoder, *, fitted: bool, cache: QueryCache) -> None:
        self.parts = parts
        self.encoder = encoder
        self.embedded_version = encoder.version
        self.fitted = fitted
        self.cache = cache

    def fit(self, *, steps: Any, batch_size: Any, lr: Any, seed: Any, colour_jitter: Any, progress: Any) -> FitReport:
        """:meth:`DreamPool.fit_encoder`'s work (the caller holds the pool's lock)."""
        trainable, steps, batch_size, lr, seed, colour_jitter = check_fit_arguments(
            self.encoder, steps, batch_size, lr, seed, colour_jitter, pool="DreamPool"
        )
        self.check_fresh()
        slots = self.parts.bank.slots_by_age()
        if slots.numel() < 2:
            raise InvalidInputError("pool", "at least 2 entries to fit the encoder on", f"{slots.numel()} entries")
        start = time.perf_counter()
        cols = self.parts.bank.columns
        labels = cols["class_label"].long()
        weights = 1.0 + torch.where(cols["feedback_count"] > 0, cols["util_mean"], torch.zeros_like(cols["util_mean"]))
        candidate = copy.deepcopy(trainable)
        losses = train_encoder(
            candidate,
            cols["dreams"],
            slots,
            labels,
            weights,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            colour_jitter=colour_jitter,
            progress=progress,
        )
        live, embeddings = self.embed_live(candidate)
        report = FitReport(
            losses=losses,
            steps=steps,
            seconds=time.perf_counter() - start,
            entries=int(slots.numel()),
            labelled=int((labels[slots] >= 0).sum()),
        )
        self.install(live, embeddings, candidate)  # the last step: nothing raises after it
        self.fitted = True
        return report

    def reembed(self) -> None:
        """Recompute every entry's embedding with the current encoder and install them (:meth:`install`)."""
        live, embeddings = self.embed_live(self.encoder)
        self.install(live, embeddings, self.encoder)

    def query_embeddings(self, q: Queries, hint: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` embeddings of parsed queries, through the query cache where it applies."""
        if q.embeddings is not None:
            return q.embeddings
        return stages.embed_queries(
            self.encoder, self.cache, self.parts.config, q.chroma, q.spectral, q.dreams, hint, prior
        )

    def check_fresh(self) -> None:
        """Raise when the encoder changed since the bank's embeddings were computed."""
        if self.encoder.version != self.embedded_version:
            raise IndexStaleError(
                f"the encoder changed (version {self.encoder.version}) since the bank was embedded "
                f"(version {self.embedded_version}): call pool.reembed() (or pool.fit_encoder())"
            )

    def embed_live(self, encoder: Encoder) -> tuple[torch.Tensor, torch.Tensor]:
        """Live slots in age order ``[n]`` and their embeddings ``[n, D]`` under ``encoder``."""
        slots = self.parts.bank.slots_by_age()
        cols = self.parts.bank.columns
        parts = [torch.empty(0, self.parts.config.embedding_dim, device=self.parts.device)]
        for start in range(0, slots.numel(), _EMBED_CHUNK):
            s = slots[start : start + _EMBED_CHUNK]
            z = encoder.encode_entries(
                cols["dreams"][s].float(),
                chroma=cols["chroma"][s],
                spectral=cols["spectral"][s],
                class_labels=cols["class_label"][s].long(),
            )
            parts.append(bank_form(z.float(), self.parts.config.metric))
        return slots, torch.cat(parts)

    def install(self, slots: torch.Tensor, embeddings: torch.Tensor, encoder: Encoder) -> None:
        """Swap in ``encoder`` and its ``embeddings`` of ``slots``; rebuild the index; clear the cache.

        One step an interrupt cannot split: on any failure (a KeyboardInterrupt raised
        anywhere in it included) the previous rows, encoder and index come back (the
        cache holds no entry of the new encoder: as it was, or empty) before the error
        propagates; a Ctrl-C on the main thread is
        held while the step and its undo run, then acted on (the install undone) or, when
        it lands after the install is complete, re-raised once the pool is consistent.
        """
        column = self.parts.bank.columns["embeddings"]
        previous = (column[slots].clone(), self.encoder, self.embedded_version)
        with _HeldInterrupt() as held:
            try:
                column[slots] = embeddings
                self.encoder, self.embedded_version = encoder, encoder.version
                self.parts.bank.revision += 1
                self.parts.index.reset()
                self.parts.index.add(slots)
                self.cache.clear()  # its entries were computed under the previous encoder
                if held.take_keyboard_interrupt():
                    raise KeyboardInterrupt  # Ctrl-C during the install: undone below, as if it came before
            except BaseException:
                column[slots] = previous[0]
                self.encoder, self.embedded_version = previous[1], previous[2]
                self.parts.index.reset()
                self.parts.index.add(slots)
                raise

    def restore(self, state: dict[str, torch.Tensor] | None) -> None:
        """Checkpoint hook (bank already restored): load the saved encoder state.

        A format-1 checkpoint has none: its embeddings came from an older feature
        encoder, so the statistics are fitted on the bank and every entry re-embedded
        (the caller rebuilds the index).
        """
        if state is not None:
            self.encoder.load_state_dict(state)
            self.fitted = self.fitted or _moved_from_init(self.encoder, self.parts.config)
        elif isinstance(self.encoder, FeatureEncoder):
            live = self.parts.bank.slots_by_age()
            cols = self.parts.bank.columns
            self.encoder.fit_statistics(
                cols["chroma"][live], cols["spectral"][live], fitted_on=self.parts.counters["added"]
            )
            slots, embeddings = self.embed_live(self.encoder)
            cols["embeddings"][slots] = embeddings
        self.embedded_version = self.encoder.version

    def refit_statistics(self, chroma: torch.Tensor, spectral: torch.Tensor) -> None:
        """Refit the feature encoder's standardisation on the bank plus a new batch; re-embed the bank."""
        if not isinstance(self.encoder, FeatureEncoder):
            return
        live = self.parts.bank.slots_by_age()
        cols = self.parts.bank.columns
        candidate = copy.deepcopy(self.encoder)
        candidate.fit_statistics(
            torch.cat([cols["chroma"][live], chroma]),
            torch.cat([cols["spectral"][live], spectral]),
            fitted_on=self.parts.counters["added"] + chroma.shape[0],
        )
        slots, embeddings = self.embed_live(candidate)
        self.install(slots, embeddings, candidate)


def _moved_from_init(encoder: Encoder, config: PoolConfig) -> bool:
    """Whether a learned encoder's weights differ from those it starts with (it was fitted); True for others."""
    if not isinstance(encoder, LearnedEncoder):
        return True
    initial = LearnedEncoder(config.dream_shape, config.embedding_dim, seed=config.encoder_seed).state_dict()
    return any(not torch.equal(t.cpu(), initial[name]) for name, t in encoder.state_dict().items())


def make_encoder(encoder: Any, config: PoolConfig, device: torch.device) -> Encoder:
    """The pool's encoder on ``device``, from ``DreamPool``'s ``encoder`` argument or ``config``."""
    cfg, d = config, config.embedding_dim
    if encoder is None:
        if cfg.encoder == "learned":
            return LearnedEncoder(cfg.dream_shape, d, seed=cfg.encoder_seed).to(device).eval()
        return FeatureEncoder(
            d,
            include_spectral=cfg.include_spectral,
            include_class=cfg.include_class,
            include_utility=cfg.include_utility,
            num_classes=cfg.num_classes,
            seed=cfg.encoder_seed,
            device=device,
        )
    if isinstance(encoder, Encoder):
        if getattr(encoder, "dim", None) != d:
            raise InvalidConfigurationError(
                "encoder", f"an encoder of dim {getattr(encoder, 'dim', None)}", f"dim {d} (embedding_dim)"
            )
        mover = getattr(encoder, "to", None)
        moved = mover(device) if callable(mover) else encoder
        moved = moved.eval() if isinstance(moved, torch.nn.Module) else moved
        return cast(Encoder, moved)  # an Encoder's ``to`` returns the (moved) encoder, as nn.Module's does
    if isinstance(encoder, torch.nn.Module):
        return ModuleEncoder(encoder.to(device).eval(), cfg.dream_shape, d)
    raise InvalidConfigurationError(
        "encoder",
        type(encoder).__name__,
        "None, an Encoder, or a torch.nn.Module mapping [N, R, C, L, 3] to [N, D]",
    )
