"""How the unlearners' recipe-relative defaults are chosen: a budget × lr_scale grid on digits.

    python -m bench.tune_unlearners --seeds 3 --threads 1        # the record: bench/results/tuning_budgets.*
    python -m bench.tune_unlearners --quick --methods finetune   # smoke test (1 seed, 2×2 grid, 5 epochs)

Digits only (the tuning set; every other dataset is held out): ``data/digits.npz`` normalized with
mean/std 0.5, written as ``python -m bench.datasets --which digits`` does if it is missing. Per
seed s = 0 … ``--seeds``−1, everything seeded with s:

1. the original: small_cnn trained on the whole training split with ``TrainConfig(epochs=30,
   seed=s)``, recording learning events; its recipe, ``Recipe.from_dict({"epochs": 30},
   n_train=n)``, is the unit of every ``budget`` (share of its optimizer steps) and ``lr_scale``;
2. the proxy: ``compute_proxy(default_proxy(True), ...)`` (the learning-event confidence);
3. the forget set: RUM's mixed set, ``build_forget_set(proxy, round(n / 45), "mixed", seed=s)``
   (equal parts high / mid / low memorization);
4. the reference: ``retrain`` on the retain set with the recipe on |retain| rows.

Every point runs ``run_unlearning(copy of the original, PlainConfig(method, hp), recipe=recipe,
seed=s)`` and is scored with ``metrics.audit`` (SVC MIA) and ToW / ToW-MIA against the reference.
Per seed we record score = (ToW + ToW-MIA) / 2, ToW, ToW-MIA, the accuracies, MIA, the test drop
(the original's test accuracy minus the point's), the retain guard's outcome, ``cost_share``
(steps done / the original's steps) and seconds.

Grid: ``budget`` ∈ BUDGETS × ``lr_scale`` ∈ LR_SCALES for every loop method, times EXTRAS
(neggrad_plus ``alpha``, del ``threshold``); IAU takes one step whatever the budget, so its grid is
``step_size`` ∈ IAU_STEPS instead. The method's current default (``get_unlearner(m).hp``) is run
too (or found on the grid), for comparison.

Selection rule: among the points whose guard outcome is ``within`` on every seed and whose mean
test drop is ≤ MAX_TEST_DROP (0.02), the highest mean (ToW + ToW-MIA) / 2; points within TIE
(0.005) of it are ties, and among ties the smallest budget wins (IAU: the smallest step_size;
then the higher score). A method with no such point has no best point (shown as "—").
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.datasets import write
from worker.engine import architectures, metrics
from worker.engine.data import load_dataset
from worker.engine.events import LearningEvents
from worker.engine.proxies import compute_proxy, default_proxy
from worker.engine.recipe import Recipe
from worker.engine.refine import build_forget_set
from worker.engine.rum import PlainConfig, run_unlearning
from worker.engine.runtime import Runtime
from worker.engine.sample_data import digits_arrays
from worker.engine.training import TrainConfig, train_model
from worker.engine.unlearners import UnlearningTask, get_unlearner

RESULTS = Path(__file__).parent / "results"
METHODS = ("finetune", "neggrad", "neggrad_plus", "l1_sparse", "random_label", "salun", "scrub", "del", "iau")
EPOCHS = 30  # the original's (and the reference's) training epochs
QUICK_EPOCHS = 5  # --quick: a smoke test of the code path, not a result
BUDGETS = (0.01, 0.03, 0.05, 0.08)
LR_SCALES = (0.25, 0.5, 1, 2, 4)
EXTRAS = {"neggrad_plus": {"alpha": (0.3, 0.5)}, "del": {"threshold": (0.003, 0.01)}}
IAU_STEPS = (0.002, 0.005, 0.01, 0.02)
QUICK_BUDGETS, QUICK_LR_SCALES = (0.01, 0.05), (0.5, 1)
MAX_TEST_DROP = 0.02
TIE = 0.005
KEYS = ("budget", "lr_scale", "alpha", "threshold", "step_size")  # the tuned hyperparameters
PER_SEED = ("score", "tow", "tow_mia", "acc_forget", "acc_retain", "acc_test", "mia", "test_drop", "cost_share",
            "seconds")


def grid(method: str, quick: bool) -> list[dict]:
    """The method's grid points, as hyperparameter dicts."""
    if method == "iau":
        return [{"step_size": s} for s in (IAU_STEPS[:2] if quick else IAU_STEPS)]
    axes = {"budget": QUICK_BUDGETS if quick else BUDGETS, "lr_scale": QUICK_LR_SCALES if quick else LR_SCALES}
    axes.update({k: v[:1] if quick else v for k, v in EXTRAS.get(method, {}).items()})
    return [dict(zip(axes, vals, strict=True)) for vals in itertools.product(*axes.values())]


def tuned(method: str, hp: dict) -> dict:
    """The tuned hyperparameters of ``hp`` (budget, lr_scale, the method's extra), None where not used."""
    used = ("step_size",) if method == "iau" else ("budget", "lr_scale", *EXTRAS.get(method, {}))
    return {k: hp.get(k) if k in used else None for k in KEYS}


def label(method: str, hp: dict) -> str:
    t = tuned(method, hp)
    if method == "iau":
        return f"step {t['step_size']:g}"
    extra = "".join(f" {k} {t[k]:g}" for k in EXTRAS.get(method, {}))
    return f"{t['budget']:.0%} x{t['lr_scale']:g}{extra}"


class Seed:
    """One seed: the original, its proxy and recipe, the mixed forget set, the retrain reference."""

    def __init__(self, data, seed: int, runtime: Runtime, epochs: int = EPOCHS):
        n = len(data.train)
        self.data, self.seed, self.runtime = data, seed, runtime
        spec = architectures.default_spec("small_cnn", data.input_shape, data.num_classes)
        events = LearningEvents.empty(n)
        self.original = train_model(architectures.build(spec, seed=seed), data.view("train"),
                                    TrainConfig(epochs=epochs, seed=seed), runtime=runtime, events=events)
        self.recipe = Recipe.from_dict({"epochs": epochs}, n_train=n)
        self.proxy = compute_proxy(default_proxy(True), self.original, data, runtime, events=events).values
        self.rows = build_forget_set(self.proxy, round(n / 45), "mixed", seed=seed)
        forget, retain = data.forget_retain(self.rows)
        self.views = (forget, retain, data.view("test"))
        task = UnlearningTask(forget, retain, data.num_classes, seed=seed, recipe=self.recipe.with_n_train(len(retain)))
        reference = get_unlearner("retrain").unlearn(copy.deepcopy(self.original), task, runtime)
        self.ref = metrics.audit(reference, *self.views, runtime, mia=True)
        self.orig: dict | None = None
        self.orig = self.score(self.original)

    def score(self, model) -> dict:
        a = metrics.audit(model, *self.views, self.runtime, mia=True)
        tw, tm = metrics.tow(a, self.ref), metrics.tow_mia(a, self.ref)
        drop = self.orig["acc_test"] - a["acc_test"] if self.orig else 0.0
        return {**a, "tow": tw, "tow_mia": tm, "score": (tw + tm) / 2, "test_drop": drop}

    def run(self, method: str, hp: dict) -> dict:
        try:
            result = run_unlearning(copy.deepcopy(self.original), self.data, self.rows, self.proxy,
                                    PlainConfig(method, hp), self.runtime, recipe=self.recipe, seed=self.seed)
        except Exception as exc:  # a failing point is recorded, not fatal
            return {"error": f"{type(exc).__name__}: {exc}", "guard": "error"}
        step = result.steps[0].run
        return {**self.score(result.model), "guard": step.get("guard", {}).get("outcome"),
                "cost_share": result.cost_share, "seconds": result.seconds}


def evaluate(seeds: list[Seed], method: str, hp: dict, *, on_grid: bool, log) -> dict:
    """One point on every seed: per-seed results and their means; ``eligible`` by the selection rule."""
    per_seed = [{"seed": s.seed, **s.run(method, hp)} for s in seeds]
    ok = [r for r in per_seed if "error" not in r]
    means = {k: float(np.mean([r[k] for r in ok])) if ok else float("nan") for k in PER_SEED}
    guard = [r["guard"] for r in per_seed]
    within = all(g == "within" for g in guard)
    row = {"method": method, **tuned(method, hp), "hp": hp, "grid": on_grid, "default": False, **means,
           "guard": guard, "within_all": within, "eligible": within and means["test_drop"] <= MAX_TEST_DROP,
           "per_seed": per_seed}
    log(f"{method:<13} {label(method, hp):<26} score {row['score']:.4f} ToW {row['tow']:.4f} "
        f"ToW-MIA {row['tow_mia']:.4f} drop {row['test_drop']:+.3f} cost {row['cost_share']:.3f} "
        f"guard {','.join(map(str, guard))}")
    return row


def pick(rows: list[dict]) -> dict | None:
    """The selection rule (module docstring) over the grid rows of one method."""
    eligible = [r for r in rows if r["grid"] and r["eligible"]]
    if not eligible:
        return None
    top = max(r["score"] for r in eligible)
    ties = [r for r in eligible if r["score"] >= top - TIE]
    return min(ties, key=lambda r: (r["budget"] if r["budget"] is not None else r["step_size"], -r["score"]))


def tune(seeds: list[Seed], method: str, quick: bool, log) -> tuple[list[dict], dict | None, dict]:
    """Every grid point of ``method`` and its current default; (rows, best, default row)."""
    rows = [evaluate(seeds, method, hp, on_grid=True, log=log) for hp in grid(method, quick)]
    current = tuned(method, get_unlearner(method).hp)
    default = next((r for r in rows if tuned(method, r["hp"]) == current), None)
    if default is None:
        hp = {k: v for k, v in current.items() if v is not None}
        default = evaluate(seeds, method, hp, on_grid=False, log=log)
        rows.append(default)
    default["default"] = True
    best = pick(rows)
    if best is not None:
        best["best"] = True
    return rows, best, default


def table(results: dict[str, tuple[list[dict], dict | None, dict]]) -> list[str]:
    head = ["method", "best point", "score", "ToW", "ToW-MIA", "drop", "cost", "eligible",
            "current default", "score", "drop", "guard", "same"]
    lines = []
    for method, (rows, best, default) in results.items():
        n_ok = sum(r["eligible"] for r in rows if r["grid"])
        b = ([label(method, best["hp"]), f"{best['score']:.4f}", f"{best['tow']:.4f}", f"{best['tow_mia']:.4f}",
              f"{best['test_drop']:+.3f}", f"{best['cost_share']:.3f}"] if best else ["—"] * 6)
        guard = "within" if default["within_all"] else ",".join(map(str, default["guard"]))
        same = "yes" if best is default else "no"
        lines.append([method, *b, f"{n_ok}/{sum(r['grid'] for r in rows)}", label(method, default["hp"]),
                      f"{default['score']:.4f}", f"{default['test_drop']:+.3f}", guard, same])
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip(),
           "  ".join("-" * w for w in widths)]
    return out + ["  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip() for x in lines]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tune_unlearners", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..K-1 (default 3)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all nine)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 seed, a 2x2 grid, a 5-epoch original")
    ap.add_argument("--data", type=Path, default=Path("data/digits.npz"), help="digits file (written if missing)")
    ap.add_argument("--json", type=Path, default=None,
                    help="every point, as JSON (default bench/results/tuning_budgets.json; none with --quick)")
    ap.add_argument("--table", type=Path, default=None,
                    help="the printed table (default bench/results/tuning_budgets.txt; none with --quick)")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"--methods: unknown {unknown}; tunable: {list(METHODS)}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    n_seeds = 1 if args.quick else args.seeds

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    if not args.data.exists():
        write(digits_arrays(0), args.data)
    runtime = Runtime.auto("cpu")
    data = load_dataset(args.data, mean=[0.5], std=[0.5])
    epochs = QUICK_EPOCHS if args.quick else EPOCHS
    seeds = [Seed(data, s, runtime, epochs) for s in range(n_seeds)]
    for s in seeds:
        log(f"seed {s.seed}: |S| {len(s.rows)}, original test {s.orig['acc_test']:.3f} ToW {s.orig['tow']:.4f} "
            f"ToW-MIA {s.orig['tow_mia']:.4f}; reference test {s.ref['acc_test']:.3f} forget {s.ref['acc_forget']:.3f}")
    results = {m: tune(seeds, m, args.quick, log) for m in methods}
    s0 = seeds[0]
    lines = [f"# bench.tune_unlearners  digits n_train={len(data.train)} |S|={len(s0.rows)} (mixed) seeds={n_seeds} "
             f"small_cnn, recipe {epochs} epochs ({s0.recipe.steps} steps), threads={torch.get_num_threads()}"
             f"{' QUICK' if args.quick else ''}",
             f"# original (mean over seeds): test acc {np.mean([s.orig['acc_test'] for s in seeds]):.3f}, "
             f"score {np.mean([s.orig['score'] for s in seeds]):.4f}; reference test acc "
             f"{np.mean([s.ref['acc_test'] for s in seeds]):.3f}",
             f"# best = highest mean (ToW+ToW-MIA)/2 among points within the guard on every seed with mean test "
             f"drop <= {MAX_TEST_DROP}; ties (within {TIE}) -> the smaller budget. cost = steps / the original's",
             *table(results), f"# wall {time.perf_counter() - started:.0f}s"]
    print("\n".join(lines))
    setup = {"data": str(args.data), "seeds": n_seeds, "quick": args.quick, "epochs": epochs,
             "recipe": s0.recipe.to_dict(), "forget_size": len(s0.rows), "max_test_drop": MAX_TEST_DROP, "tie": TIE,
             "budgets": BUDGETS, "lr_scales": LR_SCALES, "extras": EXTRAS, "iau_steps": IAU_STEPS,
             "threads": torch.get_num_threads(), "seconds": time.perf_counter() - started,
             "original": [s.orig for s in seeds], "reference": [s.ref for s in seeds]}
    rows = [r for m in methods for r in results[m][0]]
    if not args.quick:  # a smoke test does not overwrite the record
        args.json = args.json or RESULTS / "tuning_budgets.json"
        args.table = args.table or RESULTS / "tuning_budgets.txt"
    for path, text in ((args.json, json.dumps({"setup": setup, "rows": rows}, indent=1, default=float)),
                       (args.table, "\n".join(lines) + "\n")):
        if path is None:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
