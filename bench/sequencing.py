"""How long an audit-log entry waits for a signed tree head, under the accept load.

    python -m bench.sequencing [--requests 1000] [--concurrency 8] [--repeats 3] [--out bench/results]

``unlearnd api`` and ``unlearnd worker --beat`` (the beat sends the transparency log's sequencer
every ``UNLEARND_SEQUENCE_INTERVAL_S``, 2 s by default) on PostgreSQL with Redis; a burst of
deletion requests from ``--concurrency`` client threads (the client of bench/service.py), each
request appending an audit-log entry. Afterwards, from the database: for every entry appended
during the burst, the time from its append to the first signed tree head that contains it (the
head of the smallest tree larger than its leaf index). Reports the accept rate of the run and the
lag's median, p99 and maximum; the goal is a head within 5 s of an entry (docs/benchmarks.md).

Needs PostgreSQL (127.0.0.1:5432, trust) and Redis (127.0.0.1:6379). Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import httpx
import numpy as np

from bench.service import _files, _register, burst, fresh_database, processes

LAG_SQL = """
SELECT EXTRACT(EPOCH FROM (
         (SELECT min(h.created_at) FROM tree_heads h
           WHERE h.tenant_id = l.tenant_id AND h.tree_size > l.leaf_index) - e.created_at))
  FROM audit_log e JOIN log_leaves l ON l.entry_id = e.id
 WHERE e.id > %s
"""


def one_run(files: dict, n_requests: int, concurrency: int, seed: int, workdir: Path) -> dict:
    import psycopg

    with fresh_database() as db_url, processes(db_url, workdir, worker=True) as (url, key, _env):
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
            mid = _register(c, files, f"seq-{seed}", {"batching": {"max_requests": 10**5, "max_wait_s": 86400}},
                            db_url)
        plain = db_url.replace("+psycopg", "")
        with psycopg.connect(plain) as conn:
            first = conn.execute("SELECT coalesce(max(id), 0) FROM audit_log").fetchone()[0]
        rng = random.Random(seed)
        bodies = [{"sample_ids": [rng.choice(files["ids"])], "reason": "erasure", "subject_ref": f"s{i}"}
                  for i in range(n_requests + 20)]
        run = burst(url, f"/v1/models/{mid}/deletion-requests", headers, bodies, concurrency)
        deadline = time.monotonic() + 120
        with psycopg.connect(plain, autocommit=True) as conn:
            while conn.execute("SELECT count(*) FROM log_pending").fetchone()[0] and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(3)  # the batch sequenced last gets its head
            lags = [float(r[0]) for r in conn.execute(LAG_SQL, (first,)).fetchall() if r[0] is not None]
            unsigned = conn.execute("SELECT count(*) FROM audit_log WHERE id > %s", (first,)).fetchone()[0] - len(lags)
    lag = np.array(lags)
    return {"seed": seed, "requests": n_requests, "accepted_per_second": run["per_second"],
            "accept_p99_ms": run["p99_ms"], "entries": len(lags), "entries_without_head": int(unsigned),
            "lag_p50_s": float(np.percentile(lag, 50)), "lag_p99_s": float(np.percentile(lag, 99)),
            "lag_max_s": float(lag.max())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sequencing", description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    work = Path("/tmp") / f"unlearnd-bench-sequencing-{int(time.time())}"
    files = _files(work)
    rows = [one_run(files, args.requests, args.concurrency, seed, work / f"r{seed}") for seed in range(args.repeats)]
    summary = {key: statistics.median(r[key] for r in rows)
               for key in ("accepted_per_second", "lag_p50_s", "lag_p99_s", "lag_max_s")}
    summary["lag_max_s_overall"] = max(r["lag_max_s"] for r in rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sequencing.json").write_text(json.dumps({"runs": rows, "summary": summary}, indent=2) + "\n")
    for r in rows:
        print(f"seed {r['seed']}: {r['accepted_per_second']:.0f} accepted/s (p99 {r['accept_p99_ms']:.0f} ms); "
              f"{r['entries']} entries, tree head after p50 {r['lag_p50_s']:.2f} s, p99 {r['lag_p99_s']:.2f} s, "
              f"max {r['lag_max_s']:.2f} s; {r['entries_without_head']} without a head")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
