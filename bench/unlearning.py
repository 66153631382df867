"""Every unlearner alone and inside RUM, against the retrain reference (ALGORITHMS §2, §4).

    python -m bench.unlearning --data data/digits.npz --mean 0.5 --std 0.5 --seeds 3
    python -m bench.unlearning --data data/fashion_mnist.npz --mean 0.2860 --std 0.3530 \\
        --arch small_cnn --epochs 30 --seeds 3 --json bench/results/unlearning_fashion.json

Per seed s (everything seeded with s):

1. train the original (``--arch``, ``TrainConfig(epochs, lr, batch_size, seed=s)``) on the whole
   train split while recording learning events;
2. compute the default memorization proxy (``proxies.default_proxy(has_events=True)``, i.e. the
   learning-event confidence, oriented higher = more memorized);
3. build the forget set S: ``mixed`` = equal parts high / mid / low memorization by the proxy
   (RUM's experiments, §4.1, deduplicated) or ``random`` = uniform, ``--forget-size`` rows in all
   (default: 3 × round(n_train / 45), RUM's 3,000 of 45,000);
4. train the retrain reference on D \\ S with the original's recipe (timed: ``retrain_seconds``);
5. run every method alone (``rum`` = no: one call on S, retain D \\ S), every method inside RUM with
   the same method and hyperparameters in all three tertile bins (RUM^F, ``rum`` = yes), and the
   default RUM pipeline (:func:`worker.engine.rum.default_rum_config`, row ``rum_default``), each from
   a fresh copy of the original with the unlearners' default hyperparameters;
6. audit each model (forget / retain / test accuracy, SVC MIA with the confidence feature), and
   score ToW and ToW-MIA against the reference; ``seconds`` is the unlearning call alone.

The table shows mean ± half-width of the 95% t-interval over seeds (``metrics.mean_ci``; no
interval with one seed). ``share`` = seconds / retrain seconds. The original model and the
reference itself are listed for context (the reference has ToW = 1 by definition).
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

from worker.engine import architectures, metrics
from worker.engine.data import load_dataset
from worker.engine.events import LearningEvents
from worker.engine.refine import build_forget_set, entanglement_score, refine
from worker.engine.rum import PlainConfig, bin_audit, default_rum_config, rum_same_method, run_unlearning
from worker.engine.runtime import Runtime
from worker.engine.training import TrainConfig, train_model
from worker.engine.unlearners import REGISTRY, UnlearningTask, get_unlearner

EXCLUDED_METHODS = ("retrain", "none")
COLUMNS = (("tow", "ToW"), ("tow_mia", "ToW-MIA"), ("acc_forget", "acc F"), ("acc_retain", "acc R"),
           ("acc_test", "acc T"), ("mia", "MIA"), ("seconds", "seconds"), ("share", "share"))


def compute_default_proxy(model, data, runtime, events: LearningEvents) -> tuple[str, np.ndarray]:
    """The service's default proxy with learning events; 1 − mean p_y if proxies is not importable."""
    try:
        from worker.engine.proxies import compute_proxy, default_proxy
    except ImportError:  # TODO: drop once worker.engine.proxies is everywhere
        return "confidence (fallback)", 1.0 - events.means()["confidence"].astype(np.float64)
    name = default_proxy(True)
    return name, compute_proxy(name, model, data, runtime, events=events).values


def score(model, views, runtime, reference: dict | None) -> dict:
    forget, retain, test = views
    row = metrics.audit(model, forget, retain, test, runtime, mia=True)
    if reference is not None:
        row["tow"] = metrics.tow(row, reference)
        row["tow_mia"] = metrics.tow_mia(row, reference)
    return row


def run_seed(args, data, spec: dict, seed: int, methods: list[str], runtime: Runtime, log) -> list[dict]:
    n = len(data.train)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=seed)
    events = LearningEvents.empty(n)
    t0 = time.perf_counter()
    model = architectures.build(spec, seed=seed)  # seeded init: the run is reproducible
    original = train_model(model, data.view("train"), cfg, runtime=runtime, events=events)
    original_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    proxy_name, proxy = compute_default_proxy(original, data, runtime, events)
    proxy_seconds = time.perf_counter() - t0

    forget_rows = build_forget_set(proxy, args.forget_size // 3, args.forget, seed=seed)
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
    ref = score(reference, views, runtime, None)
    ref.update(tow=1.0, tow_mia=1.0)

    common = {"seed": seed, "retrain_seconds": retrain_seconds, "original_seconds": original_seconds,
              "proxy": proxy_name, "proxy_seconds": proxy_seconds, "forget_kind": args.forget,
              "forget_size": len(forget_rows), "es": es}
    rows = []

    def add(method: str, rum: bool, model, seconds: float, extra: dict) -> None:
        row = {"method": method, "rum": rum, **common, **score(model, views, runtime, ref), "seconds": seconds,
               **extra}
        row["share"] = seconds / retrain_seconds if retrain_seconds > 0 else float("nan")
        per_bin = bin_audit(model, data, bins_for_audit, runtime, mia=False)
        row["bins_acc_forget"] = [b["acc_forget"] for b in per_bin]
        rows.append(row)
        log(f"seed {seed} {method:<14} rum={'yes' if rum else 'no ':<3} ToW {row['tow']:.3f} "
            f"ToW-MIA {row['tow_mia']:.3f} accF {row['acc_forget']:.3f} {seconds:6.2f}s")

    # the per-bin split of S (tertiles of the proxy), for per-bin forget accuracy of every row
    bins_for_audit = refine(forget_rows, proxy)
    common["bins_n"] = [len(b) for b in bins_for_audit]
    add("original", False, original, 0.0, {})
    add("retrain", False, reference, retrain_seconds, {})

    runs: list[tuple[str, bool, object]] = []
    for m in methods:
        runs.append((m, False, PlainConfig(m)))
        runs.append((m, True, rum_same_method(m)))
    runs.append(("rum_default", True, default_rum_config()))
    for method, rum, policy in runs:
        try:
            result = run_unlearning(copy.deepcopy(original), data, forget_rows, proxy, policy, runtime, seed=seed)
        except Exception as exc:  # a broken method must not sink the whole benchmark
            log(f"seed {seed} {method} rum={rum}: FAILED {type(exc).__name__}: {exc}")
            rows.append({"method": method, "rum": rum, **common, "error": f"{type(exc).__name__}: {exc}"})
            continue
        add(method, rum, result.model, result.seconds,
            {"config": result.config, "step_seconds": [s.seconds for s in result.steps]})
    return rows


def fmt(mean: float, half: float, digits: int = 3) -> str:
    if np.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" if np.isnan(half) else f"{mean:.{digits}f}±{half:.{digits}f}"


def table(rows: list[dict]) -> str:
    groups: dict[tuple[str, bool], list[dict]] = defaultdict(list)
    for r in rows:
        if "error" not in r:
            groups[(r["method"], r["rum"])].append(r)
    head = ["method", "rum", "n"] + [c[1] for c in COLUMNS]
    lines = []
    for (method, rum), rs in groups.items():
        cells = [method, "yes" if rum else "no", str(len(rs))]
        for key, _ in COLUMNS:
            digits = 2 if key == "seconds" else 3
            cells.append(fmt(*metrics.mean_ci([r[key] for r in rs]), digits=digits))
        lines.append(cells)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    failed = sorted({(r["method"], r["rum"]) for r in rows if "error" in r})
    if failed:
        out.append("failed: " + ", ".join(f"{m} (rum={'yes' if u else 'no'})" for m, u in failed))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.unlearning", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="dataset file (.npz), e.g. data/digits.npz")
    ap.add_argument("--mean", type=float, nargs="+", default=None, help="normalization mean per channel")
    ap.add_argument("--std", type=float, nargs="+", default=None, help="normalization std per channel")
    ap.add_argument("--arch", default="small_cnn")
    ap.add_argument("--arch-kwargs", default="{}", help='JSON, e.g. \'{"width": 16}\'')
    ap.add_argument("--epochs", type=int, default=TrainConfig.epochs, help="original and retrain epochs")
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--forget", choices=("mixed", "random"), default="mixed")
    ap.add_argument("--forget-size", type=int, default=None, help="|S| (default 3 x round(n_train / 45))")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..K-1")
    ap.add_argument("--methods", default=None, help="comma-separated (default: all registered but retrain, none)")
    ap.add_argument("--json", type=Path, default=None, help="write one object per (method, rum, seed) here")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    runtime = Runtime.auto(args.device)
    data = load_dataset(args.data, mean=args.mean, std=args.std).to(runtime.device)
    n = len(data.train)
    if args.forget_size is None:
        args.forget_size = 3 * max(1, round(n / 45))
    if args.forget_size < 3:
        ap.error("--forget-size: need at least 3 rows (one per bin)")
    methods = ([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods
               else [m for m in REGISTRY if m not in EXCLUDED_METHODS])
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; registered: {sorted(REGISTRY)}")
    try:
        kwargs = json.loads(args.arch_kwargs)
    except json.JSONDecodeError as exc:
        ap.error(f"--arch-kwargs: not JSON ({exc})")
    spec = architectures.default_spec(args.arch, data.input_shape, data.num_classes, **kwargs)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    rows: list[dict] = []
    for seed in range(args.seeds):
        rows += run_seed(args, data, spec, seed, methods, runtime, log)
    meta = {"data": str(args.data), "arch": spec, "epochs": args.epochs, "lr": args.lr, "forget": args.forget,
            "forget_size": args.forget_size, "seeds": args.seeds, "runtime": runtime.describe()}
    print(f"# bench.unlearning  data={args.data} n_train={n} arch={args.arch} {json.dumps(kwargs)} "
          f"epochs={args.epochs} lr={args.lr}")
    print(f"# forget={args.forget} |S|={args.forget_size} seeds={args.seeds} proxy={rows[0]['proxy']} "
          f"device={runtime.describe()['device']} threads={torch.get_num_threads()}")
    dflt = default_rum_config().to_dict()
    print(f"# rum_default: {' / '.join(b['method'] + json.dumps(b['hparams']) for b in dflt['bins'])}, "
          f"quantiles {[round(q, 3) for q in dflt['quantiles']]}")
    print("# mean ± 95% t-interval half-width over seeds; share = seconds / retrain seconds; "
          "RUM^F = same method in every tertile bin")
    print(table(rows))
    ok = [r for r in rows if "error" not in r]
    bins_n = ok[0].get("bins_n") if ok else None
    print(f"# per-bin sizes (low/mid/high) of seed 0: {bins_n}; ES(original) = "
          f"{fmt(*metrics.mean_ci([r['es'] for r in ok if r['method'] == 'original']), digits=2)}; "
          f"wall {time.perf_counter() - started:.0f}s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        for r in rows:
            r.update(meta=meta)
        args.json.write_text(json.dumps(rows, indent=1, default=float))
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
