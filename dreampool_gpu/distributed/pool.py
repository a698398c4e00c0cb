"""ShardedDreamPool: one pool across the ranks of a torch.distributed group.

Every rank holds one shard, a :class:`~dreampool_gpu.pool.DreamPool` on its own
device with its own capacity, budget and eviction. Methods other than a local
``add`` and ``to`` are collectives: every rank of the group calls them, in the same
order. The replay calls of :class:`DreamPool` (``retrieve`` with every option,
``sample``, ``len``, ``stats``, ``diversity``, ``fit_encoder``) have the same
signatures; ``where`` is a callable run on every shard (a mask is refused).

The class holds the shard, the group's :class:`~dreampool_gpu.distributed.collectives.Collectives`
and the id watermarks, and adds; the other calls live beside it: retrieve
(:mod:`.retrieve`), requests by id and draws (:mod:`.routing`), the encoder
(:mod:`.fit`), checkpoints (:mod:`.checkpoint`, :mod:`.manifest`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.distributed as dist

from dreampool_gpu import _validation as v
from dreampool_gpu import persist, user_columns
from dreampool_gpu.columns import Columns, renamed_argument
from dreampool_gpu.config import PoolConfig, RetrievalMode
from dreampool_gpu.distributed import checkpoint, fit, retrieve, routing
from dreampool_gpu.distributed.collectives import (
    Collectives,
    _fingerprint,
    _pack,
    _pad_rows,
    _require_group,
    _unpack,
    local,
)
from dreampool_gpu.distributed.ids import TAG_BITS
from dreampool_gpu.distributed.manifest import _PER_SHARD_FIELDS
from dreampool_gpu.distributed.shards import rank_config
from dreampool_gpu.distributed.stats import ShardedPoolStats, _sharded_stats
from dreampool_gpu.dreams import validate_dreams
from dreampool_gpu.encoders import FeatureEncoder
from dreampool_gpu.errors import InvalidConfigurationError, InvalidInputError
from dreampool_gpu.fitting import FitReport
from dreampool_gpu.pool import DreamPool, Retrieval
from dreampool_gpu.retrieval.context import retrieve_options

_ROUTES = ("least_full",)  # routes of a collective add ("local" is not one)
_USER = "user:"  # prefix of user columns among a routed batch's columns


class ShardedDreamPool:
    """A dream pool sharded over the ranks of a torch.distributed group.

    Create it on every rank after ``torch.distributed.init_process_group`` (gloo on
    CPU, NCCL on CUDA). With a CUDA device in ``config`` and no index, each rank's
    shard goes to ``torch.cuda.current_device()`` (set it to the local rank, as DDP does).

    Args:
        config: the pool configuration; every field but capacity, device and
            memory budget must be the same on every rank.

    Keyword Args:
        group: the process group (default: the world).
        encoder: handed to each shard's :class:`DreamPool` when given.
        timeout: seconds (or a ``datetime.timedelta``) a rank waits in one collective
            before it raises :class:`~dreampool_gpu.errors.CollectiveError`; default
            :data:`DEFAULT_TIMEOUT_S` (300), and never longer than the group's own timeout.

    Attributes:
        shard: this rank's :class:`DreamPool`. rank, world_size: within ``group``.
        timeout: the bound on each collective's wait, in seconds.
    """

    def __init__(
        self, config: PoolConfig | None = None, *, group: Any = None, encoder: Any = None, timeout: Any = None
    ) -> None:
        _require_group()
        self._bind(group)

        def build() -> DreamPool:
            self._net.set_timeout(timeout)
            if config is not None and not isinstance(config, PoolConfig):
                raise InvalidConfigurationError("config", type(config).__name__, "a PoolConfig (or None)")
            extra = {} if encoder is None else {"encoder": encoder}
            shard = DreamPool(rank_config(config if config is not None else PoolConfig()), **extra)
            shard.bank.next_id = self.rank << TAG_BITS
            return shard

        shard, error = local(build)
        self._attach(shard, {self.rank: self.rank << TAG_BITS}, error)

    def _bind(self, group: Any) -> None:
        """Take ``group``'s rank and size; communicate on the CPU (CUDA under a pure NCCL backend)."""
        self._net = Collectives(group)
        self.group, self.rank, self.world_size = group, self._net.rank, self._net.world_size

    @property
    def timeout(self) -> float:
        """The bound on each collective's wait, in seconds."""
        return self._net.timeout

    def _attach(self, shard: DreamPool | None, watermarks: dict[int, int], error: BaseException | None) -> None:
        """Adopt ``shard`` and agree with the other ranks on the configuration and encoder kind (collective).

        ``error``: this rank could not build its shard; every rank raises it after the agreement.
        """
        fields = [0, 0, 0]
        if shard is not None:
            if isinstance(shard.encoder, FeatureEncoder):  # statistics are the pool's, refit collectively
                shard.encoder.auto_refit = False
            self._net.follow(shard.device)
            shared = {k: val for k, val in shard.config.to_dict().items() if k not in _PER_SHARD_FIELDS}
            fields = [
                _fingerprint(json.dumps(shared, sort_keys=True, default=str).encode()),
                _fingerprint(persist.encoder_kind(shard.encoder).encode()),
                shard.capacity,
            ]
        table = self._net.agree(fields, error)
        if bool((table[:, 0] != table[0, 0]).any()):
            raise InvalidConfigurationError(
                "config", "differs between ranks", f"the same configuration on every rank (except {_PER_SHARD_FIELDS})"
            )
        if bool((table[:, 1] != table[0, 1]).any()):
            raise InvalidConfigurationError(
                "encoder", "differs between ranks", "the same kind of encoder on every rank"
            )
        self.shard = cast(DreamPool, shard)  # built: agree raised on every rank otherwise
        # tags this shard owns -> the next id it would issue there; the issuing tag's is bank.next_id
        self._watermarks = dict(watermarks)
        self._issuing = max(self._watermarks, key=lambda t: self._watermarks[t])
        self.total_capacity = int(table[:, 2].sum())

    # ------------------------------------------------------------------- add
    def add(
        self,
        dreams: Any,
        *,
        coherence: Any = None,
        energy: Any = None,
        violation: Any = None,
        class_label: Any = None,
        force: bool = False,
        route: str = "local",
        columns: Any = None,
        class_labels: Any = None,
    ) -> torch.Tensor:
        """Add a batch of dreams; returns ``[N]`` global ids (-1 where rejected or dropped).

        ``route="local"`` (default) adds to this rank's shard, with no communication:
        only this rank calls it. ``route="least_full"`` is a collective: every rank
        passes its batch (any size, 0 included), and the shard with the lowest fill
        fraction (ties to the lower rank) adds every rank's batch, in rank order, as
        one :meth:`DreamPool.add`. The coherence gate is the same on every shard.
        Arguments as :meth:`DreamPool.add` (``columns``: the user columns, on either route).
        Any other ``route`` is taken as a collective call and refused on every rank
        (``InvalidInputError``), as is a ``route`` or ``force`` that differs between ranks.
        """
        class_label = renamed_argument(class_label, class_labels, "class_labels", "class_label")
        if coherence is None and force is True:
            coherence = 1.0
        if isinstance(route, str) and route == "local":
            return self.shard.add(
                dreams,
                coherence=coherence,
                energy=energy,
                violation=violation,
                class_label=class_label,
                force=force,
                columns=columns,
            )
        return self._add_routed(dreams, coherence, energy, violation, class_label, force, route, columns)

    def _add_routed(
        self,
        dreams: Any,
        coherence: Any,
        energy: Any,
        violation: Any,
        class_labels: Any,
        force: Any,
        route: Any,
        columns: Any,
    ) -> torch.Tensor:
        shard = self.shard

        def parse() -> dict[str, torch.Tensor]:
            if not (isinstance(route, str) and route in _ROUTES):
                raise InvalidInputError("route", " or ".join(map(repr, ("local", *_ROUTES))), repr(route)[:80])
            v.check_flag(force, "force")
            batch = validate_dreams(
                v.as_tensor(dreams, "dreams", device=shard.device), dream_shape=shard.config.dream_shape
            )
            n = batch.shape[0]
            if coherence is None:
                raise InvalidInputError("coherence", "[N] values in [0, 1]; optional only with force=True", None)
            return {
                "dreams": batch.float(),
                "coherence": v.per_item(coherence, n, "coherence", 0.0, 1.0, shard.device),
                "energy": v.per_item(energy, n, "energy", 0.0, float("inf"), shard.device),
                "violation": v.per_item(violation, n, "violation", 0.0, 1.0, shard.device),
                "class_labels": v.class_labels(class_labels, n, "class_label", shard.config.num_classes, shard.device),
                **_user_rows(shard, columns, n),
            }

        cols, error = local(parse)
        n = 0 if cols is None else int(cols["coherence"].shape[0])
        agreed = [0, 0] if cols is None else [_ROUTES.index(route), int(v.check_flag(force, "force"))]
        table = self._net.agree([n, *agreed, shard.bank.size, shard.capacity], error)
        if bool((table[:, 1] != table[0, 1]).any()):
            raise InvalidInputError("route", "the same on every rank", [_ROUTES[i] for i in table[:, 1].tolist()])
        if bool((table[:, 2] != table[0, 2]).any()):
            raise InvalidInputError("force", "the same on every rank", table[:, 2].tolist())
        counts = table[:, 0].tolist()
        fill = table[:, 3].double() / table[:, 4].double()
        owner = int(torch.argmin(fill))  # the first minimum: ties to the lower rank
        nmax = max(counts)
        rows, layout = _pack({name: _pad_rows(t, nmax) for name, t in cols.items()}, nmax)
        gathered = [torch.empty_like(rows, device=self._net.device) for _ in range(self.world_size)]
        self._net.run(
            "gather",
            lambda: dist.gather(
                rows.to(self._net.device),
                gathered if self.rank == owner else None,
                dst=self._net.global_rank(owner),
                group=self.group,
                async_op=True,
            ),
        )
        ids, error = None, None
        if self.rank == owner:
            parts = [_unpack(g[:c], layout) for g, c in zip(gathered, counts, strict=False)]
            union = {name: torch.cat([p[name] for p in parts]).to(shard.device) for name, _, _ in layout}
            ids, error = local(
                lambda: shard.add(
                    union["dreams"],
                    coherence=union["coherence"],
                    energy=union["energy"],
                    violation=union["violation"],
                    class_label=union["class_labels"],
                    force=bool(force),
                    columns={name: union[_USER + name] for name in shard.bank.user_names},
                )
            )
        self._net.agree([], error)
        out = (
            ids.to(self._net.device)
            if ids is not None
            else torch.empty(sum(counts), dtype=torch.int64, device=self._net.device)
        )
        out = self._net.broadcast(out, src=owner)
        start = sum(counts[: self.rank])
        return out[start : start + n].to(shard.device)

    # -------------------------------------------------------------- retrieve
    def retrieve(
        self,
        queries: Any,
        *,
        k: int | None = None,
        mode: str | RetrievalMode | None = None,
        class_hint: Any = None,
        classes: Sequence[int] | None = None,
        category: Any = None,
        utility_threshold: float = 0.0,
        utility_prior: Any = None,
        fetch_k: int | None = None,
        mmr_lambda: float | None = None,
        min_dispersion: float = 0.0,
        with_dreams: bool = False,
        where: Any = None,
        chroma_metric: str = "cosine",
    ) -> Retrieval:
        """Retrieve over the whole pool for this rank's queries (collective; any B, 0 included).

        Arguments and result as :meth:`DreamPool.retrieve`, except ``where``: None or a
        callable of the metadata columns (as :meth:`DreamPool.retrieve` passes them), run
        on every shard over that shard's entries (a ``[capacity]`` mask is refused:
        it names the slots of one pool). Every rank must pass the same mode, k,
        fetch_k, mmr_lambda, min_dispersion, utility_threshold, classes, with_dreams,
        chroma_metric and ``where`` function (compared by its code), and give a
        category filter or not alike; a difference raises ``InvalidInputError`` naming
        the argument, on every rank. The result equals that of one :class:`DreamPool`
        holding every shard's entries in global id order.
        """
        options = retrieve_options(locals())
        return retrieve.retrieve(self, queries, options, with_dreams)

    def refit_statistics(self, *, fitted_on: int | None = None) -> None:
        """Collective: fit the feature encoder's standardisation on the union of the shards.

        One ``all_reduce`` of per-feature sums, sums of squares and the count; every
        shard then holds identical statistics and re-embeds its entries (as a single
        pool's automatic refit does). Runs by itself inside :meth:`retrieve` whenever
        the pool's count of added entries doubles. A no-op for other encoders.

        Raises:
            InvalidInputError: (on every rank) ``fitted_on`` is not None or an int >= 0
                on some rank, or differs between ranks.
        """
        fit.refit_statistics(self.shard, self._net, fitted_on=fitted_on)

    def fit_encoder(
        self,
        *,
        steps: int = 200,
        batch_size: int = 256,
        lr: float = 2e-3,
        seed: int = 0,
        colour_jitter: float = 0.05,
        progress: bool = False,
    ) -> FitReport:
        """Train the shared encoder data-parallel over the shards, then re-embed every shard (collective).

        As :meth:`DreamPool.fit_encoder`, with every rank a data-parallel worker: the
        training starts from rank 0's encoder weights (broadcast); each step every rank
        draws ``batch_size`` entries of its own shard (its generator seeded with
        ``seed + rank * 2**32``), and one ``all_reduce`` averages the gradients and the
        loss over the ranks, so every rank takes the same step and ends with the same
        encoder. Every rank then re-embeds its shard. All or nothing on every rank: a
        diverged loss is seen by every rank at the same step, and the pools are
        unchanged. Arguments must be the same on every rank; every shard holds >= 2 entries.

        Returns:
            :class:`FitReport`: the losses averaged over the ranks; ``entries`` and
            ``labelled`` of the whole pool.

        Raises:
            InvalidConfigurationError: (on every rank) the encoder is not trainable.
            InvalidInputError: (on every rank) a bad or differing argument, or a shard with fewer than 2 entries.
            EncoderFitError: (on every rank) the loss became NaN or infinite.
        """
        return fit.fit_encoder(
            self.shard,
            self._net,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            colour_jitter=colour_jitter,
            progress=progress,
        )

    def feedback(self, ids: Any, utility: Any) -> int:
        """Record utility feedback for global ids, at their owners (collective).

        Arguments as :meth:`DreamPool.feedback`. When several ranks give feedback to
        one entry, it is recorded in rank order (the last utility is the highest rank's).

        Returns:
            The number of this rank's (id, utility) pairs recorded.
        """
        return routing.feedback(self, ids, utility)

    def update(self, ids: Any, **columns: Any) -> int:
        """Write user columns of global ids at their owners (collective), as :meth:`DreamPool.update`.

        Every rank names the same columns (any number of ids, 0 included). When several ranks
        write one entry, the highest rank's value is the one kept.

        Returns:
            The number of this rank's ids written.
        """
        return routing.update(self, ids, columns)

    def dreams(self, ids: Any) -> torch.Tensor:
        """Dreams of global ``ids`` (any shape) as ``[..., R, C, L, 3]``; zeros where absent (collective)."""
        return routing.dreams(self, ids)

    def metadata(self, ids: Any) -> Columns:
        """Every column except dreams for global ``ids`` (any shape), plus ``found`` (collective).

        Named and typed as :meth:`DreamPool.metadata` (labels, ids and counts int64).
        """
        return routing.metadata(self, ids)

    def diversity(self, ids: Any) -> dict[str, torch.Tensor]:
        """Diversity of each result set, as :meth:`DreamPool.diversity` (collective: chroma fetched from the owners).

        Args:
            ids: ``[B, k]`` global ids, e.g. ``retrieve(...).ids``; -1 and evicted ids are left out.

        Returns:
            ``{"mean", "min", "max"}``, each ``[B]`` float32; NaN for a set with fewer than two live entries.
        """
        return routing.diversity(self, ids)

    def sample(
        self, n: int, *, where: Any = None, replace: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Ids of ``n`` uniform draws from the ``m`` live entries of the whole pool passing ``where``
        (collective; each rank passes its own ``n``, 0 included, and ``replace``).

        As :meth:`DreamPool.sample`, over the union of the shards indexed in global id
        order: with the same ``generator`` state, the draw is the one a single pool
        holding the union in global id order makes. ``where`` is None or a callable of
        the metadata columns, run on every shard (a mask is refused, as in :meth:`retrieve`).
        Costs one status all_gather, one all_gather of each shard's (tag, count) pairs,
        one all_gather of the draws and one all_reduce of their ids.

        Returns:
            ``[n]`` (``replace=True``: with replacement) or ``[min(n, m)]`` (``replace=False``:
            distinct) int64 global ids on this shard's device; ``[0]`` when ``m = 0``.

        Raises:
            InvalidInputError: (on every rank) ``n`` not an int >= 0, ``replace`` not a bool, a bad
                ``where`` or ``generator`` on some rank.
        """
        return routing.sample(self, n, where=where, replace=replace, generator=generator)

    def __len__(self) -> int:
        """Live entries of the whole pool: a collective (one all_reduce), so every rank calls ``len`` alike.

        A sharded pool is always true (``bool(pool)`` is no collective): test ``len(pool) == 0``.
        """
        return int(self._net.all_reduce(torch.tensor([self.shard.bank.size], dtype=torch.int64))[0])

    def __bool__(self) -> bool:
        return True

    def to(self, device: str | torch.device) -> ShardedDreamPool:
        """Move this rank's shard to ``device`` in place and return the pool (no communication).

        Each rank moves its own shard (e.g. to ``cuda:LOCAL_RANK``), as :meth:`DreamPool.to`.
        Under NCCL, later collectives run on the shard's CUDA device.

        Raises:
            As :meth:`DreamPool.to` (the shard is then unchanged).
        """
        self.shard.to(device)
        self._net.follow(self.shard.device)
        return self

    def stats(self) -> ShardedPoolStats:
        """The whole pool's :class:`ShardedPoolStats` (collective): a :class:`PoolStats` of totals,
        plus ``world_size`` and each shard's own ``PoolStats`` (``shards``, in rank order).

        ``stats["size"]``, ``stats["world_size"]``, ``stats["added"]`` and
        ``stats["shards"][r]["size"]`` read the plain dict (``to_dict``), as before.
        """
        return _sharded_stats(self._net.all_gather_objects(self.shard.stats()), self.rank)

    # ----------------------------------------------------------- persistence
    def save(self, path: persist.PathArg) -> None:
        """Write a sharded checkpoint directory at ``path`` (collective; a filesystem every rank sees).

        The ranks first agree on ``path`` (the same absolute path, holding the same
        manifest, on every rank) and on a fresh generation name (a uuid4: never the
        torch RNG, never a name used before). Each rank writes its shard into the new
        generation directory, beside the committed one; after every rank has written,
        rank 0 replaces ``manifest.json`` atomically, which commits the new generation,
        then removes every other generation. Until the manifest is replaced the
        committed checkpoint is untouched: a failure or crash of any rank before it
        leaves that checkpoint loadable, as it was.

        Raises:
            InvalidInputError: (on every rank) ``path`` is not a path on some rank, differs
                between ranks, or names something other than a sharded checkpoint or an
                empty directory.
            OSError: (on every rank) a rank's filesystem failed.
            CollectiveError: a rank left or timed out.
        """
        checkpoint.save(self, path)

    @classmethod
    def load(
        cls,
        path: persist.PathArg,
        *,
        group: Any = None,
        device: str | torch.device | None = None,
        timeout: Any = None,
    ) -> ShardedDreamPool:
        """Open a sharded checkpoint (collective), at its world size or another one.

        The ranks first agree on ``path`` (the same absolute path and manifest everywhere).
        At the saved world size each rank reads its own shard. At another, each rank
        reads the shards holding ids it now owns (``(id >> 40) % world_size``) and
        keeps those entries, ids and all columns unchanged; capacities grow to hold them.
        ``timeout`` as in :class:`ShardedDreamPool`.

        Raises:
            CheckpointCorruptError: (on every rank) a missing, altered or inconsistent
                manifest or shard (one of another save or rank included), naming the file.
            InvalidInputError: (on every rank) ``path`` differs between ranks.
        """
        _require_group()
        pool = cls.__new__(cls)
        pool._bind(group)
        built, error = checkpoint.open_shard(pool._net, path, device, timeout)
        pool._attach(None if built is None else built[0], {} if built is None else built[1], error)
        return pool

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard as a dict (``torch.save``-safe), tagged with rank and world size."""
        return checkpoint.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Replace every shard with the state this rank saved (collective; same rank and world size).

        On any rank's error every rank raises and every shard is left as it was.
        """
        checkpoint.load_state_dict(self, state_dict)


def _user_rows(shard: DreamPool, columns: Any, n: int) -> dict[str, torch.Tensor]:
    """Every user column of a routed batch of ``n``, checked, ``[n, *shape]`` (fill where not given),
    under :data:`_USER`-prefixed names: the same layout on every rank (the shards' configurations agree)."""
    given = user_columns.checked_values(shard.config.columns, columns, n, shard.device)
    out = {}
    for name, (shape, dtype) in shard.config.columns.specs().items():
        fill = torch.zeros((n, *shape), dtype=dtype, device=shard.device)
        out[_USER + name] = given[name].contiguous() if name in given else fill
    return out
