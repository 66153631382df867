"""The ``unlearnd`` command. It never imports torch itself: engine commands load it lazily."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unlearnd", description="Make trained classifiers forget, and prove it.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train an unlearning-ready model (weights, events, architecture)")
    from worker.engine.cli import add_train_arguments  # cheap: torch loads when the command runs

    add_train_arguments(train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from worker.engine.cli import run_train

        return run_train(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
