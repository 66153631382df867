"""True memorization by Feldman & Zhang's subsampling estimator: a slow reference
(docs/proxies-and-metrics.md#true-memorization-the-feldmanzhang-estimator).

    mem(i) = mean_{k: i ∈ S_k} 1[f_k(x_i) = y_i]  −  mean_{k: i ∉ S_k} 1[f_k(x_i) = y_i]

Each of ``runs`` models is trained from a fresh seeded init on a random ``subset_frac`` of the
train split and scores every train row (eval mode). A row that was never in, or never out of,
the subsets has no estimate: NaN. The paper uses 400 runs on 70% subsets; the estimate's noise
per row shrinks like 1/√runs, so use it to *evaluate* proxies (bench/proxies.py), never in a job.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from . import architectures
from .data import UnlearningData
from .errors import ConfigError
from .runtime import RunContext, Runtime, predict
from .training import TrainConfig, train_model


def run_seed(seed: int, run: int) -> int:
    """Seed of run ``run`` (init, data order and subset draw), distinct across runs and base seeds."""
    return int(np.random.SeedSequence([int(seed), int(run)]).generate_state(1)[0])


def subset_rows(n: int, subset_frac: float, seed: int, run: int) -> np.ndarray:
    """Sorted train rows of run ``run``'s subset: round(subset_frac · n) rows without replacement."""
    m = int(round(subset_frac * n))
    return np.sort(np.random.default_rng(run_seed(seed, run)).permutation(n)[:m])


def estimate_memorization(
    spec: dict, data: UnlearningData, train_cfg: TrainConfig, runs: int = 400, subset_frac: float = 0.7,
    seed: int = 0, runtime: Runtime | None = None, ctx: RunContext | None = None,
) -> np.ndarray:
    """Memorization estimate per train row (float64 in [−1, 1], NaN where a row was never in/out).

    ``spec`` is an architecture spec (:func:`architectures.build`); ``train_cfg`` the recipe of
    every run (its ``seed`` is replaced by the run's seed). Progress goes to ``ctx.report`` after
    each run; ``ctx.check`` is polled every batch (through the training loop).
    """
    if not isinstance(runs, int) or isinstance(runs, bool) or runs < 2:
        raise ConfigError(f"runs: need an integer >= 2, got {runs!r}")
    if not (isinstance(subset_frac, int | float) and 0.0 < subset_frac < 1.0):
        raise ConfigError(f"subset_frac: need a fraction strictly between 0 and 1, got {subset_frac!r}")
    runtime = runtime or Runtime()
    ctx = ctx or RunContext(stage="memorization")
    n = len(data.train)
    if not 1 <= int(round(subset_frac * n)) < n:
        raise ConfigError(f"subset_frac: {subset_frac} of {n} rows leaves no row in or no row out")
    y = data.train.y.cpu()
    hits_in = np.zeros(n)
    hits_out = np.zeros(n)
    n_in = np.zeros(n, dtype=np.int64)
    all_rows = data.view("train")
    for k in range(runs):
        ctx.check()
        s = run_seed(seed, k)
        rows = subset_rows(n, subset_frac, seed, k)
        inside = np.zeros(n, dtype=bool)
        inside[rows] = True
        torch.manual_seed(s)
        model = architectures.build(spec)
        model = train_model(model, data.view("train", torch.from_numpy(rows)), replace(train_cfg, seed=s),
                            runtime=runtime, ctx=ctx.sub(k / runs, (k + 1) / runs))
        correct = (predict(model, all_rows, runtime).argmax(1) == y).double().numpy()
        hits_in += np.where(inside, correct, 0.0)
        hits_out += np.where(inside, 0.0, correct)
        n_in += inside
        ctx.report((k + 1) / runs)
    n_out = runs - n_in
    with np.errstate(invalid="ignore", divide="ignore"):
        mem = hits_in / n_in - hits_out / n_out
    mem[(n_in == 0) | (n_out == 0)] = math.nan
    return mem
