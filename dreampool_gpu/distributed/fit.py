"""The encoder of a sharded pool: feature statistics refit over the union of the shards, and
data-parallel training of a learned encoder (one ``all_reduce`` of the gradients per step)."""

from __future__ import annotations

import copy
import numbers
import time
from typing import cast

import torch

from dreampool_gpu.distributed.collectives import Collectives, _fingerprint, local
from dreampool_gpu.encoder_lifecycle import check_fit_arguments
from dreampool_gpu.encoders import FeatureEncoder
from dreampool_gpu.errors import InvalidInputError
from dreampool_gpu.fitting import FitReport, train_encoder
from dreampool_gpu.learned import LearnedEncoder, ModuleEncoder
from dreampool_gpu.pool import DreamPool


def refit_if_due(shard: DreamPool, net: Collectives, added: int) -> None:
    """Collective: refit the feature encoder's statistics over every shard when ``added``
    (entries added to the whole pool) doubled since the last fit; shards re-embed."""
    encoder = shard.encoder
    if isinstance(encoder, FeatureEncoder) and added > 0 and added >= 2 * encoder.fitted_on:
        refit(shard, net, added)


def refit_statistics(shard: DreamPool, net: Collectives, *, fitted_on: int | None = None) -> None:
    """:meth:`ShardedDreamPool.refit_statistics` on this rank's shard."""

    def check() -> int:
        if fitted_on is None:
            return -1
        if isinstance(fitted_on, bool) or not isinstance(fitted_on, numbers.Integral) or fitted_on < 0:
            raise InvalidInputError("fitted_on", "None or an int >= 0", repr(fitted_on)[:80])
        return int(fitted_on)

    value, error = local(check)
    table = net.agree([0 if value is None else value], error)
    if bool((table[:, 0] != table[0, 0]).any()):
        raise InvalidInputError("fitted_on", "the same on every rank", table[:, 0].tolist())
    refit(shard, net, None if value == -1 else value)


def refit(shard: DreamPool, net: Collectives, fitted_on: int | None) -> None:
    """The collective part of :meth:`refit_statistics` (arguments already agreed)."""
    if not isinstance(shard.encoder, FeatureEncoder):
        return
    with shard.parts.lock:
        live = shard.bank.slots_by_age()
        cols = shard.bank.columns
        c = shard.encoder.content(cols["chroma"][live], cols["spectral"][live]).double()
        sums = torch.cat(
            [c.sum(0), c.square().sum(0), torch.tensor([float(c.shape[0])], dtype=torch.float64, device=c.device)]
        )
    total = net.all_reduce(sums.to(net.device)).to(shard.device)
    d = c.shape[1]
    n = float(total[-1])
    if n == 0:
        return
    mean = total[:d] / n
    var = total[d : 2 * d] / n - mean.square()
    added = (
        fitted_on
        if fitted_on is not None
        else int(net.all_reduce(torch.tensor([shard.counters["added"]], dtype=torch.float64, device=net.device))[0])
    )
    with shard.parts.lock:
        candidate = copy.deepcopy(shard.encoder)
        candidate.set_statistics(mean, var, fitted_on=added)
        shard.parts.encoders.install(*shard.parts.encoders.embed_live(candidate), candidate)


def fit_encoder(
    shard: DreamPool,
    net: Collectives,
    *,
    steps: int = 200,
    batch_size: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    colour_jitter: float = 0.05,
    progress: bool = False,
) -> FitReport:
    """:meth:`ShardedDreamPool.fit_encoder` on this rank's shard."""
    names = ("steps", "batch_size", "lr", "seed", "colour_jitter")

    def check() -> list[int]:
        check_fit_arguments(shard.encoder, steps, batch_size, lr, seed, colour_jitter, pool="ShardedDreamPool")
        with shard.parts.lock:
            shard.parts.encoders.check_fresh()
            live = shard.bank.slots_by_age()
            labelled = int((shard.bank.columns["class_label"][live] >= 0).sum())
        values = (int(steps), int(batch_size), float(lr), int(seed), float(colour_jitter))
        return [live.numel(), labelled, *(_fingerprint(repr(x).encode()) for x in values)]

    found, error = local(check)
    table = net.agree([0] * (2 + len(names)) if found is None else found, error)
    for i, name in enumerate(names):
        column = table[:, 2 + i]
        if bool((column != column[0]).any()):
            differ = torch.nonzero(column != column[0]).squeeze(1).tolist()
            raise InvalidInputError(name, "the same value on every rank", f"rank(s) {differ} differ from rank 0")
    if bool((table[:, 0] < 2).any()):
        short = torch.nonzero(table[:, 0] < 2).squeeze(1).tolist()
        raise InvalidInputError("pool", "at least 2 entries on every shard to fit on", f"fewer on rank(s) {short}")
    start = time.perf_counter()
    with shard.parts.lock:
        candidate = cast("LearnedEncoder | ModuleEncoder", copy.deepcopy(shard.encoder))  # checked trainable
        tensors = [*candidate.parameters(), *candidate.buffers()]
        with torch.no_grad():
            flat = torch.cat([t.detach().reshape(-1).float() for t in tensors]) if tensors else torch.zeros(0)
            flat = net.broadcast(flat.to(net.device), src=0).to(shard.device)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].reshape(t.shape))
                offset += t.numel()
        cols = shard.bank.columns
        weights = 1.0 + torch.where(cols["feedback_count"] > 0, cols["util_mean"], torch.zeros_like(cols["util_mean"]))
        losses = train_encoder(
            candidate,
            cols["dreams"],
            shard.bank.slots_by_age(),
            cols["class_label"].long(),
            weights,
            steps=int(steps),
            batch_size=int(batch_size),
            lr=float(lr),
            seed=int(seed) + (net.rank << 32),
            colour_jitter=float(colour_jitter),
            progress=bool(progress) and net.rank == 0,
            reduce_step=lambda encoder, loss: _average_step(net, encoder, loss),
        )
        embedded, error = local(lambda: shard.parts.encoders.embed_live(candidate))
    net.agree([], error)
    live, vectors = cast("tuple[torch.Tensor, torch.Tensor]", embedded)  # embedded: agree raised otherwise
    with shard.parts.lock:
        shard.parts.encoders.install(live, vectors, candidate)
    return FitReport(
        losses=losses,
        steps=int(steps),
        seconds=time.perf_counter() - start,
        entries=int(table[:, 0].sum()),
        labelled=int(table[:, 1].sum()),
    )


def _average_step(net: Collectives, encoder: torch.nn.Module, loss: torch.Tensor) -> float:
    """One ``all_reduce``: the mean over ranks of every gradient and of the loss; returns the mean loss."""
    params = list(encoder.parameters())
    grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device) for p in params]
    flat = torch.cat([loss.reshape(1).float(), *[g.float() for g in grads]])
    flat = net.all_reduce(flat.to(net.device)).to(loss.device) / net.world_size
    offset = 1
    for p in params:
        if p.grad is not None:
            p.grad.copy_(flat[offset : offset + p.numel()].reshape(p.shape))
        offset += p.numel()
    return float(flat[0])
