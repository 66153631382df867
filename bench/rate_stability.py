"""How much of its own peak learning rate a trained model tolerates (docs/benchmarks.md).

    python -m bench.rate_stability --data data/digits.npz --mean 0.5 --std 0.5 --seeds 3
    python -m bench.rate_stability --data data/fashion_mnist_n3500_t2000.npz --mean 0.2860 --std 0.3530 \\
        --epochs 40 --seeds 1 --json bench/results/rate_stability_fashion3500.json

Unlearners' learning rates are set relative to the original's (``lr_scale`` × the recipe's rate,
worker/engine/unlearners/base.py), and the recipe's rate is the *peak* of a schedule that ended
near zero. Whether a model sits where that peak rate keeps it is a property of the model, not of
the recipe: this measures it with the mildest update any method makes. Per seed it trains the
original (``--arch``, ``TrainConfig(epochs, lr, batch_size, seed)``), then, for each fraction f of
``--fractions``, from a fresh copy: ``--steps`` steps of plain cross-entropy on the training rows
themselves (correct labels, nothing to forget), with the recipe's optimizer, momentum and weight
decay at the constant rate f × lr, in train mode, inside the service's own
:class:`~worker.engine.unlearners.base.RetainGuard` (its probes of training and held-out rows,
``--max-drop``, a check every ``--check-every`` steps, never stopping early). A row reports the
probes' reference and worst accuracy and whether every check stayed within the limit; a seed's
``stable_fraction`` is the largest f at which it and every smaller one stayed within (0 if none).

A model with ``stable_fraction`` 1 forgives any rate the defaults choose; one with 0.1 is knocked
off its minimum by fine-tuning at half its own peak rate, before any forgetting starts.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.unlearning import add_original_args, arch_kwargs
from worker.engine import architectures
from worker.engine.data import UnlearningData, load_dataset
from worker.engine.runtime import Runtime, seed_everything
from worker.engine.training import TrainConfig, fit, make_optimizer, train_model
from worker.engine.unlearners.base import RetainGuard

FRACTIONS = (1.0, 0.5, 0.25, 0.1, 0.03)


def ladder(model: torch.nn.Module, data: UnlearningData, cfg: TrainConfig, runtime: Runtime, *,
           fractions: tuple[float, ...] = FRACTIONS, steps: int = 27, check_every: int = 9,
           max_drop: float = 0.03, seed: int = 0) -> list[dict]:
    """One row per fraction: the guard's report of ``steps`` clean fine-tuning steps at that share
    of ``cfg.lr`` (see the module docstring). ``model`` is not changed."""
    train = data.view("train")
    holdout = data.view("holdout") if data.holdout is not None and len(data.holdout.y) else None
    rows = []
    for frac in fractions:
        m = copy.deepcopy(model)
        guard = RetainGuard(m, train, runtime, max_drop, seed=seed, patience=None, holdout=holdout)
        gen = seed_everything(seed)
        opt = make_optimizer(m.parameters(), cfg.optimizer, frac * cfg.lr, cfg.momentum, cfg.weight_decay)
        fit(m, epochs=10**6, batches=lambda e, g=gen: train.batches(cfg.batch_size, shuffle=True, generator=g),
            loss_fn=lambda mod, x, b, e: F.cross_entropy(mod(x), b.y.to(x.device)), optimizer=opt,
            runtime=runtime, monitor=guard, monitor_every=check_every, max_steps=steps)
        report = guard.finish()
        rows.append({"fraction": frac, "lr": frac * cfg.lr, "steps": steps, "checks": report["checks"],
                     "within": report["checks_outside"] == 0, **{k: v for k, v in report.items()
                                                                 if k.endswith(("_reference", "_worst"))}})
    return rows


def stable_fraction(rows: list[dict]) -> float:
    """The largest fraction at which it and every smaller one stayed within the guard (0 if none)."""
    ordered = sorted(rows, key=lambda r: -r["fraction"])
    for i, r in enumerate(ordered):
        if all(o["within"] for o in ordered[i:]):
            return r["fraction"]
    return 0.0


def table(rows: list[dict]) -> str:
    head = (f"{'seed':>4}  {'fraction':>8}  {'lr':>8}  {'retain ref':>10}  {'worst':>6}  {'holdout ref':>11}  "
            f"{'worst':>6}  within")
    out = [head, "-" * len(head)]
    for r in rows:
        ho = (f"{r['holdout_probe_reference']:>11.3f}  {r['holdout_probe_worst']:>6.3f}"
              if "holdout_probe_reference" in r else f"{'—':>11}  {'—':>6}")
        out.append(f"{r['seed']:>4}  {r['fraction']:>8g}  {r['lr']:>8.4g}  {r['retain_probe_reference']:>10.3f}  "
                   f"{r['retain_probe_worst']:>6.3f}  {ho}  {'yes' if r['within'] else 'no'}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rate_stability", description=__doc__.split("\n\n")[0])
    add_original_args(ap)
    ap.add_argument("--seeds", type=int, default=3, help="seeds F..F+K-1 (F = --first-seed)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    ap.add_argument("--steps", type=int, default=27)
    ap.add_argument("--check-every", type=int, default=9)
    ap.add_argument("--max-drop", type=float, default=0.03, help="the guard's limit (the methods' default)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--table", type=Path, default=None)
    args = ap.parse_args(argv)
    if not all(f > 0 for f in args.fractions):
        ap.error("--fractions: every fraction must be > 0")
    if args.steps < 1 or args.check_every < 1:
        ap.error("--steps and --check-every: must be >= 1")
    kwargs = arch_kwargs(ap, args)
    torch.set_num_threads(args.threads)
    runtime = Runtime.auto("cpu")
    data = load_dataset(args.data, mean=args.mean, std=args.std)
    spec = architectures.default_spec(args.arch, data.input_shape, data.num_classes, **kwargs)
    rows, stable, started = [], [], time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=seed)
        original = train_model(architectures.build(spec, seed=seed), data.view("train"), cfg, runtime=runtime)
        seed_rows = ladder(original, data, cfg, runtime, fractions=tuple(args.fractions), steps=args.steps,
                           check_every=args.check_every, max_drop=args.max_drop, seed=seed)
        stable.append(stable_fraction(seed_rows))
        rows += [{"seed": seed, **r} for r in seed_rows]
        print(f"seed {seed}: stable fraction {stable[-1]:g}", file=sys.stderr, flush=True)
    lines = [f"# bench.rate_stability data={args.data} n_train={len(data.train)} arch={args.arch} {json.dumps(kwargs)} "
             f"epochs={args.epochs} lr={args.lr} batch={args.batch_size} steps={args.steps} "
             f"check_every={args.check_every} max_drop={args.max_drop} device={runtime.describe()['device']} "
             f"({runtime.describe().get('cpu_capability')})",
             f"# clean fine-tuning on the training rows at fraction × lr; stable fraction per seed {stable} "
             f"(median {float(np.median(stable)):g}); wall {time.perf_counter() - started:.0f}s",
             table(rows)]
    print("\n".join(lines))
    if args.table:
        args.table.write_text("\n".join(lines) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"meta": {k: str(v) if isinstance(v, Path) else v
                                                  for k, v in vars(args).items()},
                                         "runtime": runtime.describe(), "stable_fraction": stable, "rows": rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
