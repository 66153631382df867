"""``unlearnd train``: train an unlearning-ready model and write what registration accepts.

Outputs in ``--out``: ``weights.safetensors`` (state dict), ``events.npz`` (learning events, which
unlock the confidence-family proxies: docs/proxies-and-metrics.md#learning-events),
``architecture.json`` (exactly the spec ``POST /v1/models`` takes), ``recipe.json`` (the training
recipe ``POST /v1/models`` takes as ``recipe``, worker/engine/recipe.py) and ``training.json``
(recipe, normalization, accuracies).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Only the standard library at import time: ``unlearnd --help`` must not load torch.


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path, help="dataset file (.npz, see README)")
    p.add_argument("--arch", required=True,
                   help="architecture name: mlp, small_cnn, lenet5, resnet18 or an installed entry point")
    p.add_argument("--kwargs", default="{}", help='architecture keyword arguments as JSON, e.g. \'{"width": 16}\'')
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9, cosine schedule)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gr-alpha", type=float, default=0.0,
                   help="IAU gradient-restriction penalty weight (e.g. 0.005); 0 = plain cross-entropy")
    p.add_argument("--mean", type=float, nargs="+", help="per-channel normalization mean (give with --std)")
    p.add_argument("--std", type=float, nargs="+", help="per-channel normalization std")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", required=True, type=Path, help="output directory (created)")


def run_train(args: argparse.Namespace) -> int:
    from . import architectures
    from .data import load_dataset
    from .errors import EngineError
    from .events import LearningEvents
    from .runtime import RunContext, Runtime
    from .training import TrainConfig, accuracy, train_model

    try:
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        print(f"error: --kwargs: must be a JSON object ({exc})", file=sys.stderr)
        return 2
    try:
        data = load_dataset(args.data, args.mean, args.std)
        spec = architectures.default_spec(args.arch, data.input_shape, data.num_classes, **kwargs)
        model = architectures.build(spec, seed=args.seed)
        runtime = Runtime.auto(args.device)
        data = data.to(runtime.device)
        cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                          gr_alpha=args.gr_alpha)
        events = LearningEvents.empty(len(data.train))

        def progress(stage: str, fraction: float) -> None:
            print(f"\r{stage}: {fraction:6.1%}", end="", file=sys.stderr, flush=True)

        t0 = time.perf_counter()
        model = train_model(model, data.view("train"), cfg, runtime=runtime, events=events,
                            ctx=RunContext(progress=progress, stage="training"))
        seconds = time.perf_counter() - t0
        print(file=sys.stderr)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    test_acc = accuracy(model, data.view("test"), runtime)
    train_acc = accuracy(model, data.view("train"), runtime)
    args.out.mkdir(parents=True, exist_ok=True)
    architectures.save_weights(model, args.out / "weights.safetensors")
    events.save(args.out / "events.npz", data.ids)
    (args.out / "architecture.json").write_text(json.dumps(spec, indent=2) + "\n")
    (args.out / "recipe.json").write_text(json.dumps(recipe_json(cfg, len(data.train)), indent=2) + "\n")
    (args.out / "training.json").write_text(json.dumps({
        "data": str(args.data), "config": cfg.to_dict(), "mean": args.mean, "std": args.std,
        "train_accuracy": train_acc, "test_accuracy": test_acc, "seconds": seconds,
        "runtime": runtime.describe(),
    }, indent=2) + "\n")
    print(f"test accuracy {test_acc:.4f} (train {train_acc:.4f}) after {cfg.epochs} epochs in {seconds:.1f}s")
    print(f"wrote {args.out}/weights.safetensors, events.npz, architecture.json, recipe.json, training.json")
    return 0


def recipe_json(cfg, n_train: int) -> dict:
    """What registration takes as ``recipe``: how the model was trained, on how many rows."""
    return {"n_train": int(n_train), "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "optimizer": cfg.optimizer, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
            "schedule": cfg.schedule}
