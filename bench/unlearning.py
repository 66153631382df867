"""Every unlearner alone and inside RUM, against the retrain reference (docs/benchmarks.md).

    python -m bench.unlearning --data data/digits.npz --mean 0.5 --std 0.5 --seeds 3
    python -m bench.unlearning --data data/fashion_mnist_n3500_t2000.npz --mean 0.2860 --std 0.3530 \\
        --arch small_cnn --epochs 40 --seeds 2 --calibrate --json bench/results/unlearning_fashion3500_mixed.json
    python -m bench.unlearning --data data/digits.npz --mean 0.5 --std 0.5 --scenario poisoned --fraction 0.03

Scenarios (``--scenario``, alias ``--forget``; builders in :mod:`bench.scenarios`): ``mixed``
(default) and ``random`` choose S from the original's proxy; ``mislabeled`` flips ``--fraction``
(default 5%) of the training labels and ``poisoned`` stamps a backdoor trigger on ``--fraction``
(default 3%) of the rows relabeled to ``--target``, and S is exactly those rows.

Per seed s (everything seeded with s):

1. build the scenario's training set (modified for mislabeled / poisoned), train the original
   (``--arch``, ``TrainConfig(epochs, lr, batch_size, seed=s)``) on all of it while recording
   learning events, and measure its train accuracy (a memorizing original has ≈ 1; the table
   header warns below 0.98, where doing nothing already looks like forgetting);
2. compute the default memorization proxy (``proxies.default_proxy(has_events=True)``, i.e. the
   learning-event confidence, oriented higher = more memorized);
3. the forget set S: ``mixed`` = equal parts high / mid / low memorization by the proxy
   (RUM's experiments, deduplicated: docs/proxies-and-metrics.md#forget-sets-of-rums-experiments)
   or ``random`` = uniform, ``--forget-size`` rows in all
   (default: 3 × round(n_train / 45), RUM's 3,000 of 45,000); the modified rows otherwise;
4. train the retrain reference on D \\ S with the original's recipe (timed: ``retrain_seconds``);
5. run every method alone (``rum`` = no: one call on S, retain D \\ S), every method inside RUM with
   the same method and hyperparameters in all three tertile bins (RUM^F, ``rum`` = yes), and the
   default RUM pipeline (:func:`worker.engine.rum.default_rum_config`, row ``rum_default``), each from
   a fresh copy of the original with the unlearners' default hyperparameters; for ``mislabeled``
   and ``poisoned``, row ``corrective`` is what the service runs for a request of that reason: the
   whole forget set as rows with wrong labels (:func:`worker.engine.rum.default_corrective_config`);
   every method runs with the recipe of step 1 (budgets and learning rates are relative to it);
   with ``--calibrate``, row ``rum_calibrated`` runs the policy that a calibration
   (:func:`worker.engine.calibration.calibrate`) recommends, calibrated on two sets disjoint from S
   (S is excluded from them); its JSON rows carry ``calibration_seconds`` and
   ``calibration_retrains`` (its cost in retrain-equivalents);
6. audit each model (forget / retain / test accuracy, SVC MIA with the confidence feature), and
   score ToW and ToW-MIA against the reference; ``seconds`` is the unlearning call alone.

The table shows mean ± half-width of the 95% t-interval over seeds (``metrics.mean_ci``; no
interval with one seed). ``share`` = seconds / retrain seconds; ``test_drop`` = the original's
test accuracy minus the row's; ``ASR`` (poisoned only) = attack success rate of the trigger on
the test rows not of the target class. The original model and the reference itself are listed
for context (the reference has ToW = 1 by definition), and so is ``retrain_other``, a second
retrain with another seed scored against the reference: the noise floor of the scores, what the
exact answer itself gets (no method can be expected to score above it). JSON rows carry ``scenario``,
``test_drop``, ``asr`` (poisoned) and, in common, ``recipe`` (the original's training recipe,
:class:`worker.engine.recipe.Recipe`), ``train_acc_original`` and ``asr_original`` /
``asr_reference``. ``--time-budget`` skips the runs that would start after it (listed as skipped).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from bench import scenarios
from worker.engine import architectures, metrics
from worker.engine.calibration import CalibrationSettings, calibrate
from worker.engine.data import load_dataset
from worker.engine.errors import ConfigError
from worker.engine.events import LearningEvents
from worker.engine.recipe import Recipe
from worker.engine.refine import entanglement_score, refine
from worker.engine.rum import (
    JOB_COST_CAP,
    PlainConfig,
    RumConfig,
    bin_audit,
    default_corrective_config,
    default_rum_config,
    parse_policy,
    rum_same_method,
    run_unlearning,
)
from worker.engine.runtime import Runtime
from worker.engine.training import TrainConfig, accuracy, train_model
from worker.engine.unlearners import REGISTRY, UnlearningTask, get_unlearner

EXCLUDED_METHODS = ("retrain", "none")
OTHER_SEED = 10_000  # the second retrain's seed offset (row ``retrain_other``)
COLUMNS = (("tow", "ToW"), ("tow_mia", "ToW-MIA"), ("acc_forget", "acc F"), ("acc_retain", "acc R"),
           ("acc_test", "acc T"), ("test_drop", "test_drop"), ("mia", "MIA"), ("seconds", "seconds"),
           ("share", "share"))
ASR_COLUMN = ("asr", "ASR")  # poisoned only
MEMORIZING = 0.98  # train accuracy below which the original is called under-fit in the header


def compute_default_proxy(model, data, runtime, events: LearningEvents) -> tuple[str, np.ndarray]:
    """The service's default proxy with learning events; 1 − mean p_y if proxies is not importable."""
    try:
        from worker.engine.proxies import compute_proxy, default_proxy
    except ImportError:  # TODO: drop once worker.engine.proxies is everywhere
        return "confidence (fallback)", 1.0 - events.means()["confidence"].astype(np.float64)
    name = default_proxy(True)
    return name, compute_proxy(name, model, data, runtime, events=events).values


def score(model, views, runtime, reference: dict | None, scenario: scenarios.Scenario | None = None) -> dict:
    forget, retain, test = views
    row = metrics.audit(model, forget, retain, test, runtime, mia=True)
    if reference is not None:
        row["tow"] = metrics.tow(row, reference)
        row["tow_mia"] = metrics.tow_mia(row, reference)
    if scenario is not None and scenario.has_asr:
        row["asr"] = scenario.asr(model, runtime)
    return row


def recipe_of(cfg: TrainConfig, n_train: int) -> Recipe:
    """The original's training recipe (what unlearning budgets are measured against)."""
    return Recipe(n_train=n_train, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, optimizer=cfg.optimizer,
                  momentum=cfg.momentum, weight_decay=cfg.weight_decay, schedule=cfg.schedule)


def method_runs(methods: list[str], scenario: str = "mixed",
                extra: dict[str, object] | None = None) -> list[tuple[str, bool, object]]:
    """(method, rum, policy) of every unlearning run: the service's defaults first (so that a
    ``--time-budget`` never skips them: ``corrective`` for scenarios whose rows have wrong labels,
    then the default pipeline), then the ``--policy`` rows (``extra``: name -> parsed policy),
    then each method alone and as RUM^F. ``corrective``'s policy is None: run_seed passes the
    whole forget set as ``corrective_rows``."""
    runs: list[tuple[str, bool, object]] = []
    if scenario in scenarios.CORRECTIVE_SCENARIOS:
        runs.append(("corrective", False, None))
    runs.append(("rum_default", True, default_rum_config()))
    for name, policy in (extra or {}).items():
        runs.append((name, isinstance(policy, RumConfig), policy))
    for m in methods:
        runs.append((m, False, PlainConfig(m)))
        runs.append((m, True, rum_same_method(m)))
    return runs


def run_seed(args, data, spec: dict, seed: int, methods: list[str], runtime: Runtime, log,
             deadline: float | None = None) -> list[dict]:
    name = args.scenario
    # mislabeled / poisoned modify the training set before the original is trained on it
    scen = None if name in scenarios.PROXY_SCENARIOS else scenarios.build(
        name, data, seed=seed, fraction=args.fraction, target=args.target)
    train_data = data if scen is None else scen.data
    n = len(train_data.train)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=seed)
    events = LearningEvents.empty(n)
    t0 = time.perf_counter()
    model = architectures.build(spec, seed=seed)  # seeded init: the run is reproducible
    original = train_model(model, train_data.view("train"), cfg, runtime=runtime, events=events)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    original_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    proxy_name, proxy = compute_default_proxy(original, train_data, runtime, events)
    proxy_seconds = time.perf_counter() - t0
    if scen is None:  # mixed / random: chosen from the original's proxy
        scen = scenarios.build(name, data, seed=seed, proxy=proxy, forget_size=args.forget_size)
    data = scen.data
    train_acc = accuracy(original, data.view("train"), runtime)
    log(f"seed {seed} original: train accuracy {train_acc:.4f} ({original_seconds:.1f}s)")

    forget_rows = scen.forget_rows
    forget, retain = data.forget_retain(forget_rows)
    views = (forget, retain, data.view("test"))
    es = entanglement_score(original, retain, forget, runtime)

    retrain = get_unlearner("retrain", epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    t0 = time.perf_counter()
    reference = retrain.unlearn(copy.deepcopy(original), UnlearningTask(forget, retain, data.num_classes, seed),
                                runtime)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    retrain_seconds = time.perf_counter() - t0
    ref = score(reference, views, runtime, None, scen)
    ref.update(tow=1.0, tow_mia=1.0)
    orig = score(original, views, runtime, ref, scen)

    recipe = recipe_of(cfg, n)
    common = {"seed": seed, "scenario": name, "retrain_seconds": retrain_seconds,
              "original_seconds": original_seconds, "proxy": proxy_name, "proxy_seconds": proxy_seconds,
              "forget_kind": name, "forget_size": len(forget_rows), "es": es, "train_acc_original": train_acc,
              "recipe": recipe.to_dict(),
              "scenario_info": {k: v for k, v in scen.info.items() if k != "original_labels"}}
    if scen.has_asr:
        common.update(asr_original=orig["asr"], asr_reference=ref["asr"])
    rows = []

    def add(method: str, rum: bool, model, seconds: float, extra: dict, scored: dict | None = None) -> None:
        scored = scored if scored is not None else score(model, views, runtime, ref, scen)
        row = {"method": method, "rum": rum, **common, **scored, "seconds": seconds, **extra}
        row["test_drop"] = orig["acc_test"] - row["acc_test"]
        row["share"] = seconds / retrain_seconds if retrain_seconds > 0 else float("nan")
        per_bin = bin_audit(model, data, bins_for_audit, runtime, mia=False)
        row["bins_acc_forget"] = [b["acc_forget"] for b in per_bin]
        rows.append(row)
        asr = f" ASR {row['asr']:.3f}" if "asr" in row else ""
        log(f"seed {seed} {method:<14} rum={'yes' if rum else 'no ':<3} ToW {row['tow']:.3f} "
            f"ToW-MIA {row['tow_mia']:.3f} accF {row['acc_forget']:.3f} test_drop {row['test_drop']:+.3f}{asr} "
            f"{seconds:6.2f}s")

    # the per-bin split of S (tertiles of the proxy), for per-bin forget accuracy of every row
    bins_for_audit = refine(forget_rows, proxy)
    common["bins_n"] = [len(b) for b in bins_for_audit]
    add("original", False, original, 0.0, {}, orig)
    add("retrain", False, reference, retrain_seconds, {}, dict(ref))
    # the noise floor: a second retrain (another seed: initialization and batch order) scored
    # against the reference, i.e. what the exact answer itself scores; no method can be expected above it
    t0 = time.perf_counter()
    other_task = UnlearningTask(forget, retain, data.num_classes, seed + OTHER_SEED)
    other = retrain.unlearn(copy.deepcopy(original), other_task, runtime)
    add("retrain_other", False, other, time.perf_counter() - t0, {})

    for method, rum, policy in method_runs(methods, name, args.policies):
        if deadline is not None and time.perf_counter() > deadline:
            log(f"seed {seed} {method} rum={rum}: SKIPPED (--time-budget spent)")
            rows.append({"method": method, "rum": rum, **common, "skipped": "time budget"})
            continue
        try:
            wrong = forget_rows if policy is None else None  # corrective: every row has a wrong label
            # a method's own rows (alone, RUM^F) run without the job's cost cap: RUM^F plans three
            # times the method's budget, past the cap, and would lose the guard retries the one-shot
            # row keeps, which is no comparison of the two; the service's rows run as a job would
            cap = None if method in REGISTRY else JOB_COST_CAP
            result = run_unlearning(copy.deepcopy(original), data, forget_rows, proxy, policy or default_rum_config(),
                                    runtime, seed=seed, recipe=recipe, corrective_rows=wrong, max_cost_share=cap)
        except Exception as exc:  # a broken method must not sink the whole benchmark
            log(f"seed {seed} {method} rum={rum}: FAILED {type(exc).__name__}: {exc}")
            rows.append({"method": method, "rum": rum, **common, "error": f"{type(exc).__name__}: {exc}"})
            continue
        add(method, rum, result.model, result.seconds,
            {"config": result.config, "step_seconds": [s.seconds for s in result.steps],
             "cost_share": result.cost_share, "guard": [s.run.get("guard", {}).get("outcome") for s in result.steps]})
    if args.calibrate:
        calibrated_row(args, original, data, forget_rows, proxy, recipe, runtime, seed, retrain_seconds, add, log)
    return rows


def calibrated_row(args, original, data, forget_rows, proxy, recipe, runtime, seed, retrain_seconds, add, log):
    """``rum_calibrated``: calibrate on two sets disjoint from the evaluated forget set (it is excluded
    from every calibration set), then run the recommended policy on the evaluated set."""
    settings = CalibrationSettings(n_trials=args.calibration_trials, forget_fraction=args.calibration_forget_fraction,
                                   seed=seed)
    t0 = time.perf_counter()
    cal = calibrate(original, data, recipe, proxy, runtime, settings=settings, excluded_rows=forget_rows)
    calibration_seconds = time.perf_counter() - t0
    log(f"seed {seed} calibration: {len(cal.trials)} trials, chosen {cal.chosen}, search {cal.search.score:.3f}, "
        f"check {cal.check.score:.3f} (default {cal.default_check.score:.3f}), "
        f"{calibration_seconds / retrain_seconds:.2f} retrains")
    result = run_unlearning(copy.deepcopy(original), data, forget_rows, proxy, parse_policy(cal.policy), runtime,
                            seed=seed, recipe=recipe)
    add("rum_calibrated", True, result.model, result.seconds,
        {"config": result.config, "cost_share": result.cost_share, "calibration_seconds": calibration_seconds,
         "calibration_retrains": calibration_seconds / retrain_seconds, "calibration_chosen": cal.chosen,
         "calibration_trials": len(cal.trials), "calibration_forget_fraction": settings.forget_fraction,
         "calibration_check": cal.check.to_dict(),
         "calibration_default_check": cal.default_check.to_dict(),
         "guard": [s.run.get("guard", {}).get("outcome") for s in result.steps]})


def fmt(mean: float, half: float, digits: int = 3) -> str:
    if np.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" if np.isnan(half) else f"{mean:.{digits}f}±{half:.{digits}f}"


def completed(rows: list[dict]) -> list[dict]:
    """Rows of runs that finished (not failed, not skipped)."""
    return [r for r in rows if "error" not in r and "skipped" not in r]


def table(rows: list[dict]) -> str:
    groups: dict[tuple[str, bool], list[dict]] = defaultdict(list)
    for r in sorted(completed(rows), key=lambda r: r["method"] == "rum_default"):  # stable: default last
        groups[(r["method"], r["rum"])].append(r)
    columns = COLUMNS + ((ASR_COLUMN,) if any("asr" in r for r in completed(rows)) else ())
    head = ["method", "rum", "n"] + [c[1] for c in columns]
    lines = []
    for (method, rum), rs in groups.items():
        cells = [method, "yes" if rum else "no", str(len(rs))]
        for key, _ in columns:
            digits = 2 if key == "seconds" else 3
            cells.append(fmt(*metrics.mean_ci([r.get(key, float("nan")) for r in rs]), digits=digits))
        lines.append(cells)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    failed = sorted({(r["method"], r["rum"]) for r in rows if "error" in r})
    if failed:
        out.append("failed: " + ", ".join(f"{m} (rum={'yes' if u else 'no'})" for m, u in failed))
    skipped = sorted({(r["method"], r["rum"]) for r in rows if "skipped" in r})
    if skipped:
        out.append("skipped (--time-budget): " + ", ".join(f"{m} (rum={'yes' if u else 'no'})" for m, u in skipped))
    return "\n".join(out)


def _capability(runtime: Runtime) -> str:
    """The CPU's vector path, in brackets: the small CNN's results differ between machines that
    take different ones (docs/benchmarks.md#the-same-run-on-another-machine)."""
    cap = runtime.describe().get("cpu_capability")
    return f" ({cap})" if cap else ""


def header(args, rows: list[dict], n: int, kwargs: dict, runtime: Runtime) -> list[str]:
    """The ``#`` lines above the table: setup, recipe, the original's fit, scenario figures, timings."""
    ok = completed(rows)
    firsts = [r for r in ok if r["method"] == "original"]

    def mean(key: str, src: list[dict] = firsts) -> str:
        return fmt(*metrics.mean_ci([r[key] for r in src if key in r]), digits=3)

    size = rows[0]["forget_size"] if rows else args.forget_size
    frac = f" fraction={args.fraction}" if args.scenario not in scenarios.PROXY_SCENARIOS else ""
    out = [f"# bench.unlearning  data={args.data} n_train={n} arch={args.arch} {json.dumps(kwargs)} "
           f"epochs={args.epochs} lr={args.lr} batch={args.batch_size}",
           f"# scenario={args.scenario}{frac} |S|={size} seeds={args.seeds} proxy={rows[0]['proxy'] if rows else '?'} "
           f"device={runtime.describe()['device']}{_capability(runtime)} threads={torch.get_num_threads()}"]
    train_acc = metrics.mean_ci([r["train_acc_original"] for r in firsts])[0] if firsts else float("nan")
    out.append(f"# original train accuracy {mean('train_acc_original')} (on the scenario's training set)")
    if not train_acc >= MEMORIZING:
        out.append(f"# WARNING: UNDER-FIT ORIGINAL: train accuracy {train_acc:.3f} < {MEMORIZING}. The original "
                   "does not memorize its training set, so doing nothing already scores like forgetting and this "
                   "table cannot tell methods apart: train longer (--epochs) or use a larger model.")
    refs = [r for r in ok if r["method"] == "retrain"]
    out.append(f"# test accuracy: original {mean('acc_test')}, retrain reference {mean('acc_test', refs)}")
    if any("asr_original" in r for r in firsts):
        info = firsts[0]["scenario_info"]
        out.append(f"# ASR (trigger {info['trigger']}, target {info['target']}, {info['n_asr_test']} test rows): "
                   f"original {mean('asr_original')}, retrain reference {mean('asr_reference')}")
    out.append(f"# timings: original {mean('original_seconds')}s, proxy {mean('proxy_seconds')}s, "
               f"retrain {mean('retrain_seconds')}s (mean over seeds)")
    dflt = default_rum_config().to_dict()
    out.append(f"# rum_default: {' / '.join(b['method'] + json.dumps(b['hparams']) for b in dflt['bins'])}, "
               f"quantiles {[round(q, 3) for q in dflt['quantiles']]}")
    if args.scenario in scenarios.CORRECTIVE_SCENARIOS:
        fix = default_corrective_config()
        out.append(f"# corrective (a request's reason says the labels are wrong): "
                   f"{fix.method}{json.dumps(fix.hparams)} on the whole forget set")
    for name, policy in getattr(args, "policies", {}).items():
        out.append(f"# {name} (--policy): {json.dumps(policy.to_dict())}")
    out.append("# mean ± 95% t-interval half-width over seeds; share = seconds / retrain seconds; "
               "test_drop = original's test acc − row's; RUM^F = same method in every tertile bin")
    return out


def cuda_missing(device: str | None) -> bool:
    return device is not None and device.startswith("cuda") and not torch.cuda.is_available()


def add_original_args(ap: argparse.ArgumentParser) -> None:
    """The arguments that say which data and how the original is trained (shared by the benchmarks
    that train one: this one and bench/rate_stability.py); read ``--arch-kwargs`` with :func:`arch_kwargs`."""
    ap.add_argument("--data", type=Path, required=True, help="dataset file (.npz), e.g. data/digits.npz")
    ap.add_argument("--mean", type=float, nargs="+", default=None, help="normalization mean per channel")
    ap.add_argument("--std", type=float, nargs="+", default=None, help="normalization std per channel")
    ap.add_argument("--arch", default="small_cnn")
    ap.add_argument("--arch-kwargs", default="{}", help='JSON, e.g. \'{"width": 16}\'')
    ap.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="original and retrain epochs")
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)


def arch_kwargs(ap: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """``--arch-kwargs`` parsed, or a usage error naming it."""
    try:
        return json.loads(args.arch_kwargs)
    except json.JSONDecodeError as exc:
        ap.error(f"--arch-kwargs: not JSON ({exc})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.unlearning", description=__doc__.split("\n\n")[0])
    add_original_args(ap)
    ap.add_argument("--scenario", "--forget", dest="scenario", choices=scenarios.SCENARIOS, default="mixed",
                    help="what to forget (--forget is the old name); see bench/scenarios.py")
    ap.add_argument("--fraction", type=float, default=None,
                    help="mislabeled / poisoned: share of training rows modified and forgotten "
                         f"(default {scenarios.DEFAULT_FRACTION})")
    ap.add_argument("--target", type=int, default=0, help="poisoned: the backdoor's target class (default 0)")
    ap.add_argument("--forget-size", type=int, default=None,
                    help="mixed / random: |S| (default 3 x round(n_train / 45))")
    ap.add_argument("--seeds", type=int, default=3, help="seeds F..F+K-1 (F = --first-seed)")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="first seed (to run seeds of one table in separate processes and merge the JSON)")
    ap.add_argument("--methods", default=None, help="comma-separated (default: all registered but retrain, none)")
    ap.add_argument("--policy", action="append", default=[], metavar="NAME=JSON",
                    help="add a row NAME running this policy (the API's policy JSON, e.g. "
                         "'cand={\"method\": \"rum\", \"bins\": [\"none\", \"finetune\", \"salun\"]}'); repeatable")
    ap.add_argument("--calibrate", action="store_true",
                    help="add rum_calibrated: the policy a calibration on disjoint sets recommends")
    ap.add_argument("--calibration-forget-fraction", type=float, default=CalibrationSettings.forget_fraction,
                    help="size of each calibration forget set, share of the training rows (the policy's "
                         "calibration.forget_fraction)")
    ap.add_argument("--calibration-trials", type=int, default=CalibrationSettings.n_trials,
                    help="Optuna trials of --calibrate (default %(default)s)")
    ap.add_argument("--json", type=Path, default=None, help="write one object per (method, rum, seed) here")
    ap.add_argument("--table", type=Path, default=None, help="also write the printed table (and header) here")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--time-budget", type=float, default=0.0,
                    help="seconds; unlearning runs that would start later are skipped (0 = no limit)")
    args = ap.parse_args(argv)

    if cuda_missing(args.device):
        print(f"bench.unlearning: --device {args.device}: CUDA is not available on this machine "
              "(torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    if args.fraction is not None and not 0 < args.fraction < 1:
        ap.error(f"--fraction: must be in (0, 1), got {args.fraction}")
    if args.fraction is None:
        args.fraction = scenarios.DEFAULT_FRACTION.get(args.scenario)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    runtime = Runtime.auto(args.device)
    data = load_dataset(args.data, mean=args.mean, std=args.std).to(runtime.device)
    n = len(data.train)
    if args.forget_size is None:
        args.forget_size = 3 * max(1, round(n / 45))
    if args.forget_size < 3:
        ap.error("--forget-size: need at least 3 rows (one per bin)")
    if args.scenario == "poisoned" and not 0 <= args.target < data.num_classes:
        ap.error(f"--target: must be a class in [0, {data.num_classes})")
    methods = ([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods
               else [m for m in REGISTRY if m not in EXCLUDED_METHODS])
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; registered: {sorted(REGISTRY)}")
    args.policies = {}
    for item in args.policy:
        name, sep, text = item.partition("=")
        if not sep or not name or name in args.policies or name in REGISTRY or name.startswith("rum_default"):
            ap.error(f"--policy: expected a new row name NAME=JSON, got {item!r}")
        try:
            args.policies[name] = parse_policy(json.loads(text))
        except (json.JSONDecodeError, ConfigError) as exc:
            ap.error(f"--policy {name}: {exc}")
    kwargs = arch_kwargs(ap, args)
    spec = architectures.default_spec(args.arch, data.input_shape, data.num_classes, **kwargs)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    deadline = started + args.time_budget if args.time_budget > 0 else None
    rows: list[dict] = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        rows += run_seed(args, data, spec, seed, methods, runtime, log, deadline)
    meta = {"data": str(args.data), "arch": spec, "epochs": args.epochs, "lr": args.lr,
            "batch_size": args.batch_size, "scenario": args.scenario, "forget": args.scenario,
            "fraction": args.fraction, "target": args.target if args.scenario == "poisoned" else None,
            "forget_size": args.forget_size, "seeds": args.seeds, "runtime": runtime.describe()}
    ok = completed(rows)
    bins_n = ok[0].get("bins_n") if ok else None
    lines = header(args, rows, n, kwargs, runtime) + [table(rows)]
    lines.append(f"# per-bin sizes (low/mid/high) of seed 0: {bins_n}; ES(original) = "
                 f"{fmt(*metrics.mean_ci([r['es'] for r in ok if r['method'] == 'original']), digits=2)}; "
                 f"wall {time.perf_counter() - started:.0f}s")
    print("\n".join(lines))
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text("\n".join(lines) + "\n")
        print(f"# wrote {args.table}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        for r in rows:
            r.update(meta=meta)
        args.json.write_text(json.dumps(rows, indent=1, default=float))
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
