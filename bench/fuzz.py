"""Long API fuzz run: schemathesis against ``unlearnd api`` (a real uvicorn process on PostgreSQL with
Redis), every check on, with the configuration of the CI test (tests/api/schemathesis.toml) and a
dataset and a ready model to work on.

    python -m bench.fuzz [--max-examples 200] [--seed 7] [--out bench/results]

Prints schemathesis' summary and writes ``fuzz.json`` (cases generated, failures by code, server
errors, seconds). Needs PostgreSQL (127.0.0.1:5432, trust) and Redis (127.0.0.1:6379). Not run in
CI: tests/api/test_openapi.py is its short, deterministic version.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.service import _files, _register, fresh_database, processes

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests" / "api" / "schemathesis.toml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-examples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    work = Path("/tmp") / f"unlearnd-bench-fuzz-{int(time.time())}"
    files = _files(work)
    with fresh_database() as db_url, processes(db_url, work / "svc", worker=False) as (url, key, _env):
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
            _register(c, files, "fuzz", {}, db_url)
        t0 = time.perf_counter()
        out = subprocess.run(
            [str(Path(sys.executable).with_name("st")), "--config-file", str(CONFIG), "run", f"{url}/openapi.json",
             "--max-examples", str(args.max_examples), "--seed", str(args.seed), "-H",
             f"Authorization: Bearer {key}", "--workers", "2", "--no-color"],
            cwd=work, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    text = out.stdout
    generated = re.search(r"(\d+) generated", text)
    failures = dict(re.findall(r"(ST\d+ [^:\n]+): (\d+)", text))
    result = {"max_examples": args.max_examples, "seed": args.seed, "cases": int(generated.group(1)) if generated
              else None, "failures": {k: int(v) for k, v in failures.items()},
              "server_errors": int(failures.get("ST101 Server error", 0)) if failures else 0,
              "exit_code": out.returncode, "seconds": round(seconds, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fuzz.json").write_text(json.dumps(result, indent=2) + "\n")
    (work / "schemathesis.log").write_text(text + out.stderr)  # every failure with its curl reproduction
    print(f"full output: {work / 'schemathesis.log'}; the API's log: {work / 'svc' / 'api.log'}")
    summary = text[text.find("SUMMARY") - 40:] if "SUMMARY" in text else text[-3000:]
    print(summary)
    print(json.dumps(result))
    return 0 if out.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
