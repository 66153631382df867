"""A small, documented search for unlearner defaults that work on our small models.

    python -m bench.tune_unlearners            # search + validation + test (~6 min on 1 core)
    python -m bench.tune_unlearners --quick    # one config per method on one seed (smoke test)
    python -m bench.tune_unlearners --final    # only the test stage: the shipped defaults

Setup (digits, as the test fixture): 1,197 train / 200 holdout / 400 test, uint8 (N,1,8,8),
mean/std 0.5. Per seed: an original small_cnn trained on the whole train split with
``TrainConfig()`` defaults (SGD 0.05, cosine; init and data order seeded) — width 32 for 30
epochs, or, for one seed in three, the tests' fixture model, width 16 for 12 epochs (less
converged: forget-set loss ~0.013 instead of ~0.002, so defaults must also work on a model not
trained to zero loss) — a forget set of 6% random train rows (72), and the reference
``retrain`` on the retain set with the same recipe. Every config starts from a fresh copy of the
original and is measured against the reference: ToW (ALGORITHMS §2.1), ToW-MIA (§2.2, SVC MIA
on the confidence feature), the forget-set CE loss, and wall-clock seconds of the unlearning
call alone.

Why not ToW alone: digits is easy. The retrain reference still classifies 97–100% of a random
forget set correctly, so the *original* model already scores ToW ≈ 0.97–1.0 and a config that
does nothing ties with the best (the "defaults that do nothing" complaint). Two finer measures of
"treats the forget set like unseen data" separate them: the MIA gap (in ToW-MIA) and the
forget-set loss, which retraining raises 5–20×. Hence:

- ``progress`` = log(L_F(u)/L_F(orig)) / log(L_F(ref)/L_F(orig)): 0 = did nothing to the
  forget set, 1 = as far as retraining, > 1 overshoot;
- ``score`` = (ToW + ToW-MIA) / 2, which penalizes both doing too little and wrecking.

Three stages on disjoint seeds (each seed: its own original, forget set and reference):

1. search (SEARCH): every config of the method's grid; keep the TOP_K best mean scores among
   configs with mean progress ≥ MIN_PROGRESS (all configs if none qualifies);
2. validation (VALIDATE): re-run those candidates; the winner has the best *robust* score over
   all six seeds, ½(mean + worst seed), unless a candidate within TOL of it is ≥ SPEEDUP× faster
   (then the fastest such). Search alone picked configs next to a cliff (neggrad at lr 0.02
   collapsed on a new seed); three more seeds and the worst-seed term catch that;
3. test (TEST): the classes' shipped ``defaults`` (and the winner, if different) on three
   untouched seeds — the numbers TUNING.md reports.

Writes bench/results/tuning.json; bench/results/TUNING.md summarizes it.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from worker.engine import architectures, metrics
from worker.engine.data import from_arrays
from worker.engine.datafile import validate_arrays
from worker.engine.runtime import Runtime, predict
from worker.engine.sample_data import digits_arrays
from worker.engine.training import TrainConfig, train_model
from worker.engine.unlearners import REGISTRY, UnlearningTask, get_unlearner

RESULTS = Path(__file__).parent / "results"
# (seed, small_cnn width, training epochs): two thirds the 30-epoch width-32 model, one third the
# tests' fixture model (width 16, 12 epochs).
SEARCH = ((0, 32, 30), (1, 32, 30), (2, 16, 12))
VALIDATE = ((3, 32, 30), (4, 32, 30), (5, 16, 12))
TEST = ((6, 32, 30), (7, 32, 30), (8, 16, 12))
TOP_K = 3  # candidates per method that go on to validation
SPEEDUP = 1.5  # a tie (within TOL) replaces the best config only if it is this many times faster
FORGET_FRACTION = 0.06
TOL = 0.005  # configs within TOL of the best mean score count as ties

# Method grids (product over the listed values; everything else from the class defaults). Earlier,
# wider passes (lr over a log grid 1e-4…0.1, 3 and 5 epochs, the papers' α/k/threshold values; see
# TUNING.md) located the useful region; these grids are centred on it. ``finetune`` and ``none``
# are baselines: only their shipped defaults are evaluated, in the test stage.
GRIDS: dict[str, dict[str, list]] = {
    "neggrad": {"lr": [0.005, 0.01, 0.02], "epochs": [3, 5], "batch_size": [16, 32]},
    "neggrad_plus": {"lr": [0.05, 0.1], "epochs": [3, 5], "alpha": [0.9, 0.95, 0.97]},
    "l1_sparse": {"lr": [0.05, 0.1], "epochs": [3, 5], "alpha": [3e-4, 5e-4, 1e-3]},
    "random_label": {"lr": [0.003, 0.005, 0.008], "epochs": [2, 3], "label_mode": ["any", "wrong"]},
    "salun": {"lr": [0.005, 0.01, 0.02], "epochs": [2, 3], "k": [0.3, 0.5]},
    "scrub": {"lr": [0.01, 0.02], "epochs": [3, 5], "beta": [0.5, 1.0], "msteps": [2, 3]},
    "del": {"lr": [0.05, 0.1, 0.2], "epochs": [5, 10], "threshold": [0.3, 0.5]},
    "iau": {"lr": [5e-5, 1e-4, 2e-4, 3e-4], "steps": [1, 2, 3]},
    "finetune": {},
    "none": {},
}
MIN_PROGRESS = 0.5  # a default must move the forget-set loss at least halfway (log scale) to retrain's
QUICK = {"neggrad": {"lr": [0.01], "epochs": [2]}}


def digits(seed: int = 0):
    """The tests' digits split (``worker.engine.sample_data.digits_arrays``), normalized with mean/std 0.5."""
    return from_arrays(validate_arrays(digits_arrays(seed)), mean=[0.5], std=[0.5])


def configs(method: str, quick: bool) -> list[dict]:
    grid = QUICK.get(method, {}) if quick else GRIDS.get(method, {})
    if not grid and not quick:
        return []  # baseline: held-out evaluation of the defaults only
    if quick and method not in QUICK:  # one config: the defaults with few epochs
        d = REGISTRY[method].defaults
        return [{"epochs": min(2, d["epochs"])} if "epochs" in d else {}]
    keys = list(grid)
    return [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*(grid[k] for k in keys))]


class Setting:
    """One seed s: an original trained from a seeded init, a forget set, the retrain reference.

    Every setting has its *own* original (init and data order seeded by s), so the search
    averages over models as well as forget sets and does not fit one model's quirks.
    """

    def __init__(self, data, seed: int, width: int, epochs: int, runtime: Runtime):
        spec = architectures.default_spec("small_cnn", data.input_shape, data.num_classes, width=width)
        cfg = TrainConfig(epochs=epochs, seed=seed)  # otherwise TrainConfig() defaults: SGD 0.05, cosine
        self.config = {"seed": seed, "arch": spec, "train": cfg.to_dict()}
        torch.manual_seed(seed)  # torch's default generator is not seeded per process: seed the init
        original = train_model(architectures.build(spec), data.view("train"), cfg, runtime=runtime)
        self.state = {k: v.detach().clone() for k, v in original.state_dict().items()}
        n = len(data.train)
        g = torch.Generator().manual_seed(1000 + seed)
        rows = torch.randperm(n, generator=g)[: round(FORGET_FRACTION * n)].sort().values
        self.forget, self.retain = data.forget_retain(rows)
        self.test = data.view("test")
        self.spec, self.seed, self.runtime = spec, seed, runtime
        self.task = UnlearningTask(self.forget, self.retain, data.num_classes, seed=seed)
        t = time.perf_counter()
        ref = get_unlearner("retrain", epochs=cfg.epochs, lr=cfg.lr).unlearn(self.original(), self.task, runtime)
        self.retrain_seconds = time.perf_counter() - t
        self.ref = self.audit(ref)
        self.orig = self.audit(self.original())
        self.orig["loss_forget"] = max(self.orig["loss_forget"], 1e-12)
        self.orig["tow"] = metrics.tow(self.orig, self.ref)
        self.orig["tow_mia"] = metrics.tow_mia(self.orig, self.ref)

    def original(self):
        m = architectures.build(self.spec)
        m.load_state_dict(copy.deepcopy(self.state))
        return m.eval()

    def audit(self, model) -> dict:
        a = metrics.audit(model, self.forget, self.retain, self.test, self.runtime, mia=True)
        logits = predict(model, self.forget, self.runtime)
        a["loss_forget"] = F.cross_entropy(logits, self.forget.y.cpu()).item()
        return a

    def run(self, method: str, hp: dict) -> dict:
        u = get_unlearner(method, **hp)
        model = self.original()
        t = time.perf_counter()
        model = u.unlearn(model, self.task, self.runtime)
        seconds = time.perf_counter() - t
        a = self.audit(model)
        tw, tm = metrics.tow(a, self.ref), metrics.tow_mia(a, self.ref)
        return {**a, "tow": tw, "tow_mia": tm, "score": (tw + tm) / 2, "progress": self.progress(a),
                "seconds": seconds}

    def progress(self, a: dict) -> float:
        """Forget-loss progress on a log scale: 0 = the original's forget-set CE, 1 = the reference's."""
        lo, hi = math.log(self.orig["loss_forget"]), math.log(self.ref["loss_forget"])
        return (math.log(max(a["loss_forget"], 1e-12)) - lo) / (hi - lo)


METRICS = ("score", "tow", "tow_mia", "progress", "acc_forget", "acc_retain", "acc_test", "mia", "loss_forget",
           "seconds")


def summarize(per_seed: list[dict]) -> dict:
    out = {k: float(np.mean([r[k] for r in per_seed])) for k in METRICS}
    out["score_min"] = float(min(r["score"] for r in per_seed))
    out["seconds_min"] = float(min(r["seconds"] for r in per_seed))  # robust to a shared, noisy machine
    return out


def shortlist(rows: list[dict]) -> list[dict]:
    """The TOP_K best mean scores among configs with mean progress ≥ MIN_PROGRESS (all if none qualifies)."""
    eligible = [r for r in rows if r["progress"] >= MIN_PROGRESS] or rows
    return sorted(eligible, key=lambda r: -r["score"])[:TOP_K]


def robust(r: dict) -> float:
    """Selection statistic: the mean of the average and the worst-seed score (a collapse on one seed costs)."""
    return (r["score"] + r["score_min"]) / 2


def pick(rows: list[dict]) -> dict:
    """The best robust score; a row within TOL of it that is ≥ SPEEDUP× faster (min-over-seeds seconds)
    wins instead (the fastest such): quality first, cost when qualities tie."""
    eligible = [r for r in rows if r["progress"] >= MIN_PROGRESS] or rows
    best = max(eligible, key=robust)
    faster = [r for r in eligible if robust(r) >= robust(best) - TOL
              and r["seconds_min"] * SPEEDUP <= best["seconds_min"]]
    return min(faster, key=lambda r: r["seconds_min"]) if faster else best


def fmt(hp: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in hp.items()) or "(defaults)"


def line(label: str, r: dict) -> str:
    return (f"{label:52s} score {r['score']:.4f} (min {r['score_min']:.4f}) ToW {r['tow']:.4f} "
            f"ToW-MIA {r['tow_mia']:.4f}  "
            f"F {r['acc_forget']:.3f} R {r['acc_retain']:.3f} T {r['acc_test']:.3f} MIA {r['mia']:.3f} "
            f"LF {r['loss_forget']:.3f} P {r['progress']:5.2f} "
            f"{r['seconds']:.2f}s")


def evaluate(settings: dict, seeds: list[int], method: str, hp: dict, label: str) -> dict:
    per_seed = [settings[s].run(method, hp) for s in seeds]
    row = {"hp": hp, **summarize(per_seed), "per_seed": per_seed}
    print(line(f"{method} {label}{fmt(hp)}", row), flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one config per method on one seed (smoke test)")
    ap.add_argument("--final", action="store_true", help="only the test stage (the shipped defaults)")
    ap.add_argument("--methods", default=",".join(GRIDS), help="comma-separated methods")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/tuning.json; none with --quick)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    runtime = Runtime.auto("cpu")
    data = digits()
    methods = [m for m in args.methods.split(",") if m]
    stages = {"search": SEARCH, "validate": VALIDATE, "test": TEST}
    if args.quick:
        stages = {k: v[:1] for k, v in stages.items()}
    if args.final:
        stages = {"test": stages["test"]}
    seeds = {k: [s for s, _, _ in v] for k, v in stages.items()}
    settings = {s: Setting(data, s, w, e, runtime) for v in stages.values() for s, w, e in v}
    print(f"setup {time.perf_counter() - t0:.1f}s")
    for s, st in settings.items():
        width, epochs = st.config["arch"]["kwargs"]["width"], st.config["train"]["epochs"]
        print(f"seed {s} (width {width}, {epochs} ep): retrain F {st.ref['acc_forget']:.3f} "
              f"R {st.ref['acc_retain']:.3f} T {st.ref['acc_test']:.3f} MIA {st.ref['mia']:.3f} "
              f"LF {st.ref['loss_forget']:.3f} | original F {st.orig['acc_forget']:.3f} T {st.orig['acc_test']:.3f} "
              f"MIA {st.orig['mia']:.3f} LF {st.orig['loss_forget']:.3f} ToW {st.orig['tow']:.4f} "
              f"ToW-MIA {st.orig['tow_mia']:.4f}")
    report: dict = {
        "setup": {"dataset": "digits", "forget_fraction": FORGET_FRACTION,
                  "forget_size": len(next(iter(settings.values())).forget), "seeds": seeds,
                  "settings": {str(s): st.config for s, st in settings.items()}, "top_k": TOP_K, "tol": TOL,
                  "speedup": SPEEDUP, "min_progress": MIN_PROGRESS, "score": "(ToW + ToW-MIA) / 2",
                  "robust": "(mean score + worst-seed score) / 2 over search + validation seeds",
                  "torch_threads": 1, "grids": GRIDS},
        "reference": {str(s): st.ref for s, st in settings.items()},
        "original": {str(s): st.orig for s, st in settings.items()},
        "search": {}, "validate": {}, "winners": {}, "test": {},
    }

    if "search" in stages:
        for method in methods:
            rows = [evaluate(settings, seeds["search"], method, hp, "") for hp in configs(method, args.quick)]
            if not rows:
                continue
            report["search"][method] = rows
            candidates = []
            for r in shortlist(rows):  # validation: the same configs on three new seeds, pooled with search
                v = evaluate(settings, seeds["validate"], method, r["hp"], "[validate] ")
                pooled = summarize(r["per_seed"] + v["per_seed"])
                candidates.append({"hp": r["hp"], **pooled, "search": {k: r[k] for k in METRICS},
                                   "validate": {k: v[k] for k in METRICS}})
            report["validate"][method] = candidates
            win = pick(candidates)
            report["winners"][method] = win
            print(line(f"-> {method} (6 seeds, robust {robust(win):.4f}) {fmt(win['hp'])}", win) + "\n", flush=True)

    print("test stage (seeds " + ", ".join(map(str, seeds["test"])) + "):")
    for method in methods:
        defaults = REGISTRY[method].defaults
        out = {"defaults": evaluate(settings, seeds["test"], method, {}, "[defaults] ")}
        out["defaults"]["hp"] = dict(defaults)
        win = report["winners"].get(method)
        if win and any(defaults.get(k) != v for k, v in win["hp"].items()):
            out["winner"] = evaluate(settings, seeds["test"], method, win["hp"], "[winner] ")
        report["test"][method] = out
    report["total_seconds"] = time.perf_counter() - t0
    print(f"total {report['total_seconds']:.0f}s")
    if args.out is None and args.quick:
        return  # a smoke test does not overwrite the results
    out_path = Path(args.out or RESULTS / "tuning.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1, default=float))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
