"""Training a pool's encoder from what the pool holds (:meth:`DreamPool.fit_encoder`).

Each step draws ``batch_size`` live entries, makes two augmented views of each
(cell noise, a small colour jitter, a random circular spatial shift) and
minimises a supervised contrastive loss (Khosla et al., 2020) at temperature
``tau``: a view's positives are its twin and every view of an entry with the
same class label; unlabelled entries have only their twin (self-supervised,
SimCLR-style). Utility feedback weighs the anchors: an entry's term counts
``1 + util_mean`` times once it has feedback, so dreams that helped shape the
space more. A second, cross-modal term of the same form trains the chroma head of a
:class:`~dreampool_gpu.learned.LearnedEncoder`: each view's mean colour is an
anchor whose keys are the views' (detached) dream embeddings, positives its own
dream and the dreams of its class, so a chroma-only query lands next to the
dreams its colour predicts.

The encoder trained here is the pool's candidate copy: the pool swaps it in
only when training and re-embedding both succeeded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from dreampool_gpu.errors import EncoderFitError
from dreampool_gpu.learned import LearnedEncoder, ModuleEncoder

TrainableEncoder = LearnedEncoder | ModuleEncoder


@dataclass(frozen=True)
class FitReport:
    """What :meth:`DreamPool.fit_encoder` did.

    Attributes:
        losses: the loss of every step.
        steps: steps run. seconds: wall time of training and re-embedding.
        entries: live entries trained on; labelled: how many carried a class label.
    """

    losses: list[float] = field(repr=False)
    steps: int
    seconds: float
    entries: int
    labelled: int

    @property
    def final_loss(self) -> float:
        """Mean loss of the last 10% of steps (NaN when no step ran)."""
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail) if tail else math.nan


def augment(dreams: torch.Tensor, generator: torch.Generator, colour_jitter: float = 0.05) -> torch.Tensor:
    """One random view of ``dreams`` ``[N, R, C, L, 3]`` (float32, same device), values in [0, 1].

    Per-channel gain ``1 + U(-j, j)`` and shift ``U(-0.4 j, 0.4 j)`` for ``j = colour_jitter``,
    Gaussian cell noise (sigma 0.03), a random circular shift of rows and columns.
    """
    n, rows, cols = dreams.shape[:3]
    device = dreams.device

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=device)

    gain = 1.0 + (uniform(n, 1, 1, 1, 3) - 0.5) * (2.0 * colour_jitter)
    shift = (uniform(n, 1, 1, 1, 3) - 0.5) * (0.8 * colour_jitter)
    noise = torch.randn(dreams.shape, generator=generator, device=device) * 0.03
    x = dreams * gain + shift + noise
    dr = (uniform(n) * rows).long()
    dc = (uniform(n) * cols).long()
    r_idx = (torch.arange(rows, device=device)[None, :] + dr[:, None]) % rows  # [N, R]
    c_idx = (torch.arange(cols, device=device)[None, :] + dc[:, None]) % cols  # [N, C]
    x = x[torch.arange(n, device=device)[:, None, None], r_idx[:, :, None], c_idx[:, None, :]]
    return x.clamp(0.0, 1.0)


def supervised_contrastive(
    z: torch.Tensor,
    entry: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    tau: float,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted SupCon loss of unit anchors ``z`` ``[2N, D]`` against ``keys`` (default: ``z`` itself).

    ``entry`` ``[2N]`` says which entry each view came from, ``labels`` ``[2N]``
    its class (-1 none), ``weights`` ``[2N]`` each anchor's weight. With
    ``keys`` (e.g. detached dream embeddings for chroma anchors) an anchor's
    positives include its own row; without, an anchor is never its own key.
    """
    own = keys is None
    logits = (z @ (z if keys is None else keys).T) / tau
    self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    if own:
        logits = logits.masked_fill(self_mask, float("-inf"))
    same_class = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    positive = (entry[:, None] == entry[None, :]) | same_class
    if own:
        positive = positive & ~self_mask
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    per_anchor = -(log_prob.masked_fill(~positive, 0.0).sum(1)) / positive.sum(1).clamp(min=1)
    return (per_anchor * weights).sum() / weights.sum()


def train_encoder(
    encoder: TrainableEncoder,
    dreams: torch.Tensor,
    slots: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    colour_jitter: float = 0.05,
    tau: float = 0.1,
    progress: bool = False,
    reduce_step: Callable[[TrainableEncoder, torch.Tensor], float] | None = None,
) -> list[float]:
    """Train ``encoder`` in place on the rows ``slots`` ``[n]`` of the bank columns; returns the losses.

    ``dreams`` ``[capacity, R, C, L, 3]``, ``labels`` ``[capacity]`` int64 (-1 none) and
    ``weights`` ``[capacity]`` (anchor weights) are the bank's, read in place one
    batch at a time. Deterministic on CPU for a ``seed``. ``reduce_step(encoder, loss)``, when
    given, runs after each backward pass and returns the loss to record (the sharded pool
    averages gradients and losses over its ranks there).

    Raises:
        EncoderFitError: the loss became NaN or infinite (the caller discards ``encoder``).
    """
    device = dreams.device
    generator = torch.Generator(device=device).manual_seed(seed)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=1e-4)
    n = slots.shape[0]
    b = min(batch_size, n)
    losses: list[float] = []
    encoder.train()
    bar = tqdm(range(steps), desc="fit encoder", unit="step", disable=not progress, leave=False)
    try:
        for step in bar:
            rows = slots[torch.randperm(n, generator=generator, device=device)[:b]]
            batch = dreams[rows].float()
            views = torch.cat([augment(batch, generator, colour_jitter), augment(batch, generator, colour_jitter)])
            z = encoder.embed_dreams(views)
            entry = torch.arange(b, device=device).repeat(2)
            view_labels, view_weights = labels[rows].repeat(2), weights[rows].repeat(2)
            loss = supervised_contrastive(z, entry, view_labels, view_weights, tau)
            if isinstance(encoder, LearnedEncoder):  # chroma anchors against the (fixed) dream embeddings
                colour = encoder.embed_chroma(views.mean((1, 2, 3)))
                loss = loss + supervised_contrastive(colour, entry, view_labels, view_weights, tau, keys=z.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # one host read per step: the NaN check and the report
            value = float(loss.detach()) if reduce_step is None else reduce_step(encoder, loss.detach())
            if not math.isfinite(value):
                raise EncoderFitError(
                    f"loss became {value} at step {step}; the pool is unchanged (try a lower lr than {lr})"
                )
            optimizer.step()
            losses.append(value)
            if progress:
                bar.set_postfix(loss=f"{value:.4f}")
    finally:
        encoder.eval()
        bar.close()
    return losses
