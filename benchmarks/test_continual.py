"""One online continual-learning step (benchmarks/continual.py) per replay arm, against an ER step.

Group ``continual step M=500`` (role ``baseline`` = ER: a plain reservoir buffer of tensors):
one step of the MNIST protocol's learner (MLP 784-400-400-10, stream batch 10 + replay 10,
SGD) with its memory work: the replay draw and gather, the SGD step, the write of the
incoming batch. The pool arms (``uniform``, ``mir``, ``knn_shapley``, ``nearest``) use
:mod:`dreampool_gpu.replay` over a reservoir pool of 500 digits-shaped dreams; the
``learner`` role is the SGD step alone (no memory), so ``report.py``'s ratios show both what
each strategy costs against ER and how much of a step is memory work. Random digits stand
in for MNIST (the cost does not depend on the pixels).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

_spec = importlib.util.spec_from_file_location("continual_bench", Path(__file__).with_name("continual.py"))
continual = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(continual)

MEMORY = 500


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.mark.parametrize("arm", ["er", "learner", "uniform", "mir", "mir+logits", "knn_shapley", "nearest"])
def test_step(benchmark, bench_device, record_median, arm):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = continual.MLP().to(bench_device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    exclude = torch.tensor([8, 9], device=bench_device)
    digits = [torch.rand(10, 784, generator=g).to(bench_device) for _ in range(16)]
    labels = [torch.randint(8, 10, (10,), generator=g).to(bench_device) for _ in range(16)]
    old_x = torch.rand(MEMORY, 784, generator=g)
    old_y = torch.randint(0, 8, (MEMORY,), generator=g)
    buffer = pool = strategy = None
    logits = arm.endswith(continual.LOGITS)
    if arm == "er":
        buffer = continual.Reservoir(MEMORY, torch.Generator().manual_seed(1))
        buffer.x, buffer.y = buffer.x.to(bench_device), buffer.y.to(bench_device)
        buffer.add(old_x.to(bench_device), old_y.to(bench_device))
    elif arm != "learner":
        pool = continual.make_pool(MEMORY, "reservoir", 0, device=str(bench_device), logits=logits)
        pool.add(continual.as_dreams(old_x), coherence=1.0, class_label=old_y)
        gen = torch.Generator().manual_seed(1)  # pool.sample draws with a CPU generator
        strategy = continual.make_strategy(arm.removesuffix(continual.LOGITS), pool, model, opt, gen)
    state = {"i": 0}

    def step():
        i = state["i"] = (state["i"] + 1) % 16
        x, y = digits[i], labels[i]
        if arm == "learner":  # the SGD step alone, on 20 digits
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(torch.cat([x, x])), torch.cat([y, y])).backward()
            opt.step()
        else:
            continual.train_step(model, opt, x, y, exclude, buffer, pool, strategy, 10, logits)
        sync(bench_device)

    benchmark.group = f"continual step M={MEMORY}"
    benchmark.extra_info.update(arm=arm, memory=MEMORY)
    benchmark.pedantic(step, rounds=30, iterations=5, warmup_rounds=2)
    record_median(benchmark, "baseline" if arm == "er" else arm)
