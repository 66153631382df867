"""How well, and how cheaply, each memorization proxy tracks true memorization on digits.

    python -m bench.proxies                     # 400 estimator runs (as the paper), ~6–10 min on one core
    python -m bench.proxies --runs 20           # smoke test
    python -m bench.proxies --json bench/results/proxies_digits.json

Setup: digits as the test fixture (``worker.engine.sample_data.digits_arrays``: 1,197 train /
200 holdout / 400 test, mean/std 0.5 — the split ``bench/datasets.py`` writes too); small_cnn
width 16, ``TrainConfig(epochs=15)`` otherwise default (SGD 0.05, momentum 0.9, wd 5e-4,
cosine, batch 128).

Reference: Feldman & Zhang's subsampling estimate of true memorization
(:func:`worker.engine.memorization.estimate_memorization`, ``--runs`` models on random 70%
subsets, same recipe). Every proxy scores the *original* model, trained with the same recipe on
the whole train split while recording learning events. For each proxy we report Spearman ρ
with the estimate over rows that have one (a row never left out has none), its sign (after
orientation every proxy should be positive), and ρ on two subsets, because digits is easy and
most rows have mem = 0 exactly (ties): rows with mem ≠ 0, and the top quartile of mem.

How costs are counted (all wall-clock seconds in this one process, ``--threads`` CPU threads):
- estimator: the whole ``estimate_memorization`` call (``runs`` trainings + evaluations);
- learning-event proxies: the *recording overhead*, i.e. the wall time spent inside the
  recorder's ``update`` calls during the original's training (median over ``--timing-repeats``
  trainings), plus the time to read the proxy off the recorded means. Training itself is not
  counted: the model is trained anyway. As a check, the JSON also has the median training time
  with and without the recorder (interleaved runs after one warm-up); on a shared CPU their
  difference is dominated by noise, which is why it is not the number we charge;
- post-hoc proxies (``*_final``, ``holdout_retrain``, ``loss_curvature``): the median time of the
  ``compute_proxy`` call on the trained model (``--timing-repeats`` calls).
Share = proxy cost / estimator cost. The goal (measured, not asserted): the default proxy has
|ρ| ≥ 0.8 at ≤ 1% of the estimator's cost.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from worker.engine import architectures
from worker.engine.data import from_arrays
from worker.engine.datafile import validate_arrays
from worker.engine.events import LearningEvents
from worker.engine.memorization import estimate_memorization
from worker.engine.proxies import PROXIES, compute_proxy, default_proxy
from worker.engine.runtime import RunContext, Runtime
from worker.engine.sample_data import digits_arrays
from worker.engine.training import TrainConfig, train_model

RESULTS = Path(__file__).parent / "results"


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


class TimedEvents(LearningEvents):
    """A recorder that also sums the wall time spent inside its ``update`` calls."""

    seconds: float = 0.0

    def update(self, rows, logits, y) -> None:
        start = time.perf_counter()
        super().update(rows, logits, y)
        self.seconds += time.perf_counter() - start


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """AUROC of ``scores`` for telling ``positive`` rows from the rest (NaN if one class is empty)."""
    if positive.all() or not positive.any():
        return math.nan
    return float(roc_auc_score(positive, scores))


def train_timed(spec: dict, data, cfg: TrainConfig, runtime: Runtime, record: bool):
    events = TimedEvents.empty(len(data.train)) if record else None
    torch.manual_seed(cfg.seed)
    model = architectures.build(spec)
    start = time.perf_counter()
    model = train_model(model, data.view("train"), cfg, runtime=runtime, events=events)
    return model, events, time.perf_counter() - start


def progress_printer(label: str):
    last = {"t": 0.0}

    def show(stage: str, fraction: float) -> None:
        now = time.perf_counter()
        if now - last["t"] > 30 or fraction >= 1.0:
            last["t"] = now
            print(f"  {label}: {100 * fraction:5.1f}%", file=sys.stderr, flush=True)

    return show


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=400, help="estimator runs (models on 70%% subsets)")
    ap.add_argument("--subset-frac", type=float, default=0.7)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="seed of the original model and of the estimator")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timing-repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--label-noise", type=float, default=0.0,
                    help="flip this fraction of training labels to another class (seeded): the "
                         "mislabeled-data use case, where some examples can only be memorized")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    runtime = Runtime.auto("cpu")

    arrays = digits_arrays(0)
    if args.label_noise > 0:
        rng = np.random.default_rng(1000 + args.seed)
        y = arrays["y_train"].copy()
        flip = rng.choice(len(y), int(round(args.label_noise * len(y))), replace=False)
        y[flip] = (y[flip] + rng.integers(1, 10, len(flip))) % 10
        arrays = dict(arrays, y_train=y)
    data = from_arrays(validate_arrays(arrays), mean=[0.5], std=[0.5])
    spec = architectures.default_spec("small_cnn", data.input_shape, data.num_classes, width=args.width)
    cfg = TrainConfig(epochs=args.epochs, seed=args.seed)

    # Original model, and the recorder's overhead (interleaved to share the machine's noise).
    train_timed(spec, data, cfg, runtime, record=False)  # warm-up: the first training in a process is slower
    plain, recorded, inside = [], [], []
    model = events = None
    for _ in range(args.timing_repeats):
        plain.append(train_timed(spec, data, cfg, runtime, record=False)[2])
        model, events, t = train_timed(spec, data, cfg, runtime, record=True)
        recorded.append(t)
        inside.append(events.seconds)
    train_plain, train_recorded = statistics.median(plain), statistics.median(recorded)
    overhead = statistics.median(inside)

    print(f"estimating memorization: {args.runs} runs of small_cnn(width {args.width}) × {args.epochs} epochs "
          f"on {args.subset_frac:.0%} subsets …", file=sys.stderr, flush=True)
    start = time.perf_counter()
    mem = estimate_memorization(spec, data, cfg, runs=args.runs, subset_frac=args.subset_frac, seed=args.seed,
                                runtime=runtime, ctx=RunContext(progress=progress_printer("estimator")))
    estimator_s = time.perf_counter() - start

    has = np.isfinite(mem)
    nonzero = has & (mem != 0)
    q75 = float(np.nanquantile(mem, 0.75))
    top = has & (mem >= q75) if q75 > 0 else None  # with most rows at mem = 0 a "top quartile" is all ties
    memorized = mem[has] > 0
    # The best ρ a proxy without ties can reach: mem against itself with its ties broken at random.
    jitter = np.random.default_rng(args.seed).uniform(0, 1e-9, int(has.sum()))
    ceiling = spearman(mem[has] + jitter, mem[has])

    rows = []
    for name, info in PROXIES.items():
        seconds, result = [], None
        for _ in range(1 if info.needs_events else args.timing_repeats):
            result = compute_proxy(name, model, data, runtime, events=events)
            seconds.append(result.seconds)
        cost = statistics.median(seconds) + (overhead if info.needs_events else 0.0)
        v = result.values
        rho = spearman(v[has], mem[has])
        rows.append({
            "proxy": name, "source": info.source, "cost_class": info.cost,
            "spearman": rho, "abs_spearman": abs(rho), "sign": "+" if rho > 0 else "-" if rho < 0 else "0",
            "spearman_nonzero": spearman(v[nonzero], mem[nonzero]),
            "spearman_top25": spearman(v[top], mem[top]) if top is not None else math.nan,
            "auc_mem_positive": auc(v[has], memorized),
            "seconds": cost, "share_of_estimator": cost / estimator_s,
        })

    dp = {True: default_proxy(True), False: default_proxy(False)}
    by_name = {r["proxy"]: r for r in rows}
    goal = {str(k): {"proxy": p, "abs_spearman": by_name[p]["abs_spearman"],
                     "share_of_estimator": by_name[p]["share_of_estimator"],
                     "met": bool(by_name[p]["abs_spearman"] >= 0.8 and by_name[p]["share_of_estimator"] <= 0.01)}
            for k, p in dp.items()}
    out = {
        "dataset": "digits (sample_data.digits_arrays(0): 1197 train / 200 holdout / 400 test, mean/std 0.5)",
        "label_noise": args.label_noise,
        "architecture": spec, "train_config": cfg.to_dict(), "runs": args.runs, "subset_frac": args.subset_frac,
        "seeds": {"original": args.seed, "estimator": args.seed, "split": 0}, "threads": args.threads,
        "runtime": runtime.describe(),
        "timing": {"estimator_s": estimator_s, "train_plain_s": train_plain, "train_recorded_s": train_recorded,
                   "recording_overhead_s": overhead, "repeats": args.timing_repeats,
                   "train_plain_all_s": plain, "train_recorded_all_s": recorded, "recorder_inside_all_s": inside},
        "memorization": {
            "tie_ceiling_spearman": ceiling, "rows_with_estimate": int(has.sum()), "rows_nonzero": int(nonzero.sum()),
            "fraction_zero": float((mem[has] == 0).mean()), "mean": float(np.nanmean(mem)),
            "quantiles": {str(q): float(np.nanquantile(mem, q)) for q in (0.5, 0.75, 0.9, 0.99, 1.0)},
            "values": [None if not math.isfinite(x) else round(float(x), 6) for x in mem],
            "ids": [str(i) for i in data.ids],
        },
        "proxies": rows, "default_proxy": goal,
    }
    print(render(out))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_finite(out), indent=1, allow_nan=False) + "\n")
    return out


def _finite(x):
    """NaN and infinities become null, so the JSON is strict."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def render(out: dict) -> str:
    t, m = out["timing"], out["memorization"]
    lines = [
        f"digits (label noise {out.get('label_noise', 0):.0%}), "
        f"small_cnn width {out['architecture']['kwargs']['width']}, {out['train_config']['epochs']} epochs; "
        f"estimator: {out['runs']} runs on {out['subset_frac']:.0%} subsets in {t['estimator_s']:.0f} s "
        f"({out['threads']} thread(s))",
        f"training the original: {t['train_plain_s']:.2f} s plain, {t['train_recorded_s']:.2f} s recording events "
        f"(median of {t['repeats']}); time inside the recorder {t['recording_overhead_s']:.3f} s",
        f"memorization estimate: {m['rows_with_estimate']} rows with an estimate, {m['fraction_zero']:.0%} exactly 0, "
        f"{m['rows_nonzero']} nonzero; mean {m['mean']:.3f}; "
        + ", ".join(f"q{float(k):g}={v:.2f}" for k, v in m["quantiles"].items()),
        f"tie ceiling: a proxy without ties reaches at most rho {m['tie_ceiling_spearman']:.3f} over all rows "
        "(the estimate against itself with its ties broken at random)",
        "",
        f"{'proxy':<18} {'source':<7} {'cost':<9} {'rho':>7} {'|rho|':>6} {'rho nz':>7} {'rho top25':>9} "
        f"{'AUC m>0':>7} {'seconds':>9} {'share':>9}",
    ]
    for r in out["proxies"]:
        lines.append(
            f"{r['proxy']:<18} {r['source']:<7} {r['cost_class']:<9} {_f(r['spearman'], 7)} {_f(r['abs_spearman'], 6)} "
            f"{_f(r['spearman_nonzero'], 7)} {_f(r['spearman_top25'], 9)} {_f(r['auc_mem_positive'], 7)} "
            f"{r['seconds']:>9.3f} {100 * r['share_of_estimator']:>8.4f}%"
        )
    lines.append("")
    for has_events, g in out["default_proxy"].items():
        lines.append(
            f"default proxy ({'with' if has_events == 'True' else 'without'} events) {g['proxy']}: "
            f"|rho| {g['abs_spearman']:.3f} at {100 * g['share_of_estimator']:.4f}% of the estimator's cost; "
            f"goal |rho| >= 0.8 at <= 1%: {'met' if g['met'] else 'NOT met'}"
        )
    lines.append("rho: Spearman with the estimate over rows that have one; rho nz: over rows with mem != 0; rho top25: "
                 "over rows with mem >= its 75th percentile (n/a when that is 0); AUC m>0: AUROC of the proxy for "
                 "rows with mem > 0 vs the rest. Every proxy is oriented higher = more memorized; seconds as in "
                 "the module docstring.")
    return "\n".join(lines)


def _f(x: float, width: int) -> str:
    return f"{'n/a':>{width}}" if x is None or not math.isfinite(x) else f"{x:>{width}.3f}"


if __name__ == "__main__":
    main()
