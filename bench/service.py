"""Service benchmark: how fast the API accepts deletion requests, against the floor of its stack,
and what batching buys.

    python -m bench.service [--requests 1000] [--concurrency 8] [--processes 1 2] [--n 8] [--repeats 3]
                            [--out bench/results] [--json]

1. Acceptance against the floor: deletion requests (one sample each) POSTed by ``--concurrency``
   client threads (keep-alive, one connection each) to ``unlearnd api --workers P`` (real uvicorn
   processes) on PostgreSQL with Redis as the broker, and in the same run, by the same client, to
   the floor app (``bench/floor_app.py``: the same stack, FastAPI, pydantic, SQLAlchemy 2, psycopg,
   PostgreSQL, uvicorn with P workers, that only validates, INSERTs the request and its samples,
   COMMITs and answers 202). Each repeat registers a fresh model (batching window long enough that
   no job starts: this measures the API and the database) and runs both apps one after the other,
   the order alternating between repeats so that drift in a shared machine's load cancels out.
   Reports, for each P, requests per second and p50 / p99 latency of both, their ratio, requests
   lost (answered 202 but not in the database), per repeat and as median with a 95% interval; and
   the CPU time per request of each app's processes and of PostgreSQL's (Linux ``/proc``), with
   ``cpu_ratio`` = floor's / ours: CPU time is what a request costs, whatever else (other work,
   a hypervisor's steal) slows the machine, so it compares runs that rates cannot.
2. Batching: with a real worker, N deletion requests answered by one batched job
   (``max_requests = N``) against the same N requests arriving one after the other, each answered
   by a job of its own (``max_requests = 1``; the next request is sent when the previous one is
   completed): wall time from the first POST until every request is completed. (Requests that
   arrive while a job runs are claimed together when it ends: a batch takes every pending request.)

``--json`` prints one row per P with the keys ``processes``, ``accept_rps``, ``accept_p99_ms``,
``floor_rps``, ``floor_p99_ms``, ``ratio``, ``accept_cpu_ms``, ``floor_cpu_ms``,
``accept_pg_cpu_ms``, ``floor_pg_cpu_ms``, ``cpu_ratio`` (medians over the repeats) and their intervals.
Needs PostgreSQL (127.0.0.1:5432, trust) and Redis (127.0.0.1:6379), as the tests do. Not run in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("UNLEARND_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("UNLEARND_BENCH_REDIS", "redis://127.0.0.1:6379/9")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def fresh_database():
    import psycopg

    name = f"unlearnd_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def processes(db_url: str, workdir: Path, worker: bool, api_workers: int = 1, floor: bool = False):
    """``unlearnd migrate``, ``unlearnd api --workers api_workers``, optionally ``unlearnd worker --beat``
    and the floor app (``bench/floor_app.py``, as many workers, on the same database)."""
    import redis

    redis.Redis.from_url(REDIS).flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNLEARND_")}
    env.update({"DATABASE_URL": db_url, "BROKER_URL": REDIS, "UNLEARND_DATA_DIR": str(workdir),
                "ARTIFACT_DIR": str(workdir / "artifacts"), "PYTHONPATH": str(ROOT),
                "UNLEARND_SWEEP_INTERVAL_S": "1", "UNLEARND_JOB_HEARTBEAT_S": "1"})
    cli = [sys.executable, "-m", "service.cli"]
    workdir.mkdir(parents=True, exist_ok=True)
    subprocess.run([*cli, "migrate"], env=env, check=True, capture_output=True)
    port, floor_port = _port(), _port()
    commands = {"api": [*cli, "api", "--port", str(port), "--workers", str(api_workers)]}
    if worker:
        commands["worker"] = [*cli, "worker", "--beat", "--loglevel", "warning"]
    if floor:
        commands["floor"] = [sys.executable, "-m", "bench.floor_app", "--port", str(floor_port),
                             "--workers", str(api_workers)]
    procs = []
    for name, cmd in commands.items():
        with open(workdir / f"{name}.log", "wb") as log:
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log))
        env[f"{name.upper()}_PID"] = str(procs[-1].pid)  # for cpu_seconds; not passed to a child
    url = f"http://127.0.0.1:{port}"
    try:
        for name, ready in (("api", f"{url}/readyz"), ("floor", f"http://127.0.0.1:{floor_port}/openapi.json")):
            deadline = time.monotonic() + 60
            while name in commands:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(ready, timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start; see {workdir / f'{name}.log'}")
                time.sleep(0.2)
        key_out = subprocess.run([*cli, "keys", "create", "--tenant", "bench"], env=env, check=True,
                                 capture_output=True, text=True)
        env["FLOOR_URL"] = f"http://127.0.0.1:{floor_port}"
        yield url, key_out.stdout.strip(), env
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


HZ = os.sysconf("SC_CLK_TCK")


def _stat(pid: int | str) -> tuple[str, list[str]]:
    """A process's name and the fields of ``/proc/<pid>/stat`` after it (OSError once it is gone)."""
    head, _, rest = Path(f"/proc/{pid}/stat").read_text().rpartition(")")
    return head.partition("(")[2], rest.split()


def _processes() -> list[tuple[int, str, list[str]]]:
    """Every process: its pid, name and stat fields."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                found.append((int(entry), *_stat(entry)))
    return found


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User and system CPU time each process used so far (Linux ``/proc``; one gone is left out).
    CPU time, not wall time: what a request costs a process, whatever else shares the machine."""
    used = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = _stat(pid)[1]
            used[pid] = (int(fields[11]) + int(fields[12])) / HZ  # utime, stime
    return used


def cpu_since(before: dict[int, float], pids: list[int]) -> float:
    """CPU seconds ``pids`` used since ``before`` was read; a process started since counts from 0
    (a PostgreSQL backend for a connection the pool opened meanwhile)."""
    return sum(t - before.get(pid, 0.0) for pid, t in cpu_seconds(pids).items())


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it (an app's uvicorn workers)."""
    children: dict[int, list[int]] = {}
    for pid, _name, fields in _processes():
        children.setdefault(int(fields[1]), []).append(pid)  # by parent
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def postgres_processes() -> list[int]:
    """The local PostgreSQL server's processes (its backends, WAL writer, checkpointer)."""
    return [pid for pid, name, _fields in _processes() if name == "postgres"]


def _files(workdir: Path) -> dict:
    from service.demo import prepare_files

    return prepare_files(workdir / "inputs")


def _register(c: httpx.Client, files: dict, name: str, policy: dict, db_url: str | None = None) -> int:
    with open(files["dataset"], "rb") as f:
        ds = c.post("/v1/datasets", data={"name": name, "mean": "[0.5]", "std": "[0.5]"},
                    files={"file": ("digits.npz", f)}).json()
    with open(files["weights"], "rb") as w, open(files["events"], "rb") as e:
        m = c.post("/v1/models", data={"name": name, "dataset_id": str(ds["id"]),
                                       "architecture": json.dumps(files["architecture"]), "policy": json.dumps(policy)},
                   files={"weights": ("weights.safetensors", w), "events": ("events.npz", e)}).json()
    if db_url:  # no worker in the acceptance run: mark version 1 ready as the registration task would
        from service.core.db import Database
        from service.core.models import ModelVersion
        from service.core.repo.models import finish_registration

        db = Database(db_url)
        with db.transaction() as s:
            vid = s.query(ModelVersion.id).filter(ModelVersion.model_id == m["id"]).scalar()
            finish_registration(s, vid, ok=True, reason=None, metrics={})
        db.dispose()
    else:
        deadline = time.monotonic() + 120
        while c.get(f"/v1/models/{m['id']}/versions/1").json()["status"] == "pending":
            if time.monotonic() > deadline:
                raise RuntimeError("version 1 stayed pending")
            time.sleep(0.3)
    return m["id"]


def burst(url: str, path: str, headers: dict, bodies: list[dict], concurrency: int) -> dict:
    """POST ``bodies`` from ``concurrency`` threads, each with its own keep-alive connection (20 of
    them first, one thread, to warm up): requests per second, latencies, the ids answered 202."""
    latencies: list[float] = []
    accepted: list[int] = []
    lock = threading.Lock()
    local = threading.local()
    clients: list[httpx.Client] = []

    def post(body: dict) -> int:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(base_url=url, headers=headers, timeout=60)
            with lock:
                clients.append(client)
        t0 = time.perf_counter()
        r = client.post(path, json=body)
        dt = time.perf_counter() - t0
        with lock:
            latencies.append(dt)
            if r.status_code == 202:
                accepted.append(r.json()["id"])
        return r.status_code

    for body in bodies[:20]:
        post(body)
    latencies.clear()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        codes = list(pool.map(post, bodies[20:]))
    wall = time.perf_counter() - t0
    for client in clients:
        client.close()
    lat = np.array(latencies) * 1000
    return {"requests": len(codes), "accepted": sum(c == 202 for c in codes), "seconds": wall,
            "per_second": len(codes) / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "ids": accepted}


def _lost(db_url: str, table: str, ids: list[int]) -> int:
    """Requests answered 202 whose row is not in the database."""
    import psycopg

    with psycopg.connect(db_url.replace("+psycopg", "")) as conn:
        found = conn.execute(f"SELECT count(*) FROM {table} WHERE id = ANY(%s)", (ids,)).fetchone()[0]
    return len(set(ids)) - found


def acceptance(files: dict, n_requests: int, concurrency: int, api_workers: int, repeats: int,
               workdir: Path) -> list[dict]:
    """``repeats`` rounds of our accept path and the floor app's, alternating which goes first."""
    out = []
    with fresh_database() as db_url, processes(db_url, workdir, worker=False, api_workers=api_workers,
                                               floor=True) as (url, key, env):
        headers = {"Authorization": f"Bearer {key}"}
        for seed in range(repeats):
            with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
                mid = _register(c, files, f"accept-{api_workers}-{seed}",
                                {"batching": {"max_requests": 10**5, "max_wait_s": 86400}}, db_url)
            rng = random.Random(seed)
            bodies = [{"sample_ids": [rng.choice(files["ids"])], "reason": "erasure", "subject_ref": f"s{i}"}
                      for i in range(n_requests + 20)]
            row = {"processes": api_workers, "seed": seed, "first": "accept" if seed % 2 == 0 else "floor"}
            runs = {"accept": (url, f"/v1/models/{mid}/deletion-requests", headers, "deletion_requests"),
                    "floor": (env["FLOOR_URL"], f"/v1/models/{mid}/deletion-requests", {}, "floor_requests")}
            for name in (("accept", "floor") if seed % 2 == 0 else ("floor", "accept")):
                base, path, hdrs, table = runs[name]
                app = int(env["API_PID" if name == "accept" else "FLOOR_PID"])
                app_cpu, pg_cpu = cpu_seconds(process_tree(app)), cpu_seconds(postgres_processes())
                r = burst(base, path, hdrs, bodies, concurrency)
                sent = r["requests"] + 20  # with the warm-up
                r["cpu_ms"] = 1000 * cpu_since(app_cpu, process_tree(app)) / sent
                r["pg_cpu_ms"] = 1000 * cpu_since(pg_cpu, postgres_processes()) / sent
                r["lost"] = _lost(db_url, table, r.pop("ids"))
                row[name] = r
            row["ratio"] = row["accept"]["per_second"] / row["floor"]["per_second"]
            row["cpu_ratio"] = row["floor"]["cpu_ms"] / row["accept"]["cpu_ms"]
            out.append(row)
    return out


def batching(files: dict, n: int, seed: int, workdir: Path) -> dict:
    out = {"seed": seed, "n": n}
    ids = files["ids"]
    rng = random.Random(seed)
    chosen = rng.sample(ids, 5 * n)
    with fresh_database() as db_url, processes(db_url, workdir, worker=True) as (url, key, _), \
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        # Warm-up: the worker's first job pays one-off imports and caches; neither side should.
        warm = _register(c, files, f"warmup-{seed}", {"method": "finetune", "hparams": {"epochs": 1},
                                                      "batching": {"max_requests": 1, "max_wait_s": 86400}})
        first = c.post(f"/v1/models/{warm}/deletion-requests", json={"sample_ids": chosen[:1], "reason": "erasure"})
        _wait_completed(c, [first.headers["location"]], "warm-up")
        for label, max_requests in (("batched", n), ("single", 1)):
            # A plain fine-tune: every job does the same work whatever it forgets (RUM's default leaves
            # low-memorization rows alone, so tiny single-request jobs would often do nothing at all).
            policy = {"method": "finetune", "hparams": {"epochs": 3}, "seed": seed,
                      "batching": {"max_requests": max_requests, "max_wait_s": 86400}}
            mid = _register(c, files, f"{label}-{seed}", policy)
            t0 = time.perf_counter()
            locs: list[str] = []
            for i in range(n):
                locs.append(c.post(f"/v1/models/{mid}/deletion-requests",
                                   json={"sample_ids": chosen[5 * i:5 * i + 5], "reason": "erasure"}
                                   ).headers["location"])
                if label == "single":  # requests spread out in time: each one is a job of its own
                    _wait_completed(c, locs[-1:], label)
            _wait_completed(c, locs, label)
            jobs = c.get(f"/v1/models/{mid}/jobs").json()["items"]
            out[label] = {"seconds": time.perf_counter() - t0, "jobs": len(jobs),
                          "versions": len(c.get(f"/v1/models/{mid}/versions").json()["items"]) - 1}
    out["speedup"] = out["single"]["seconds"] / out["batched"]["seconds"]
    return out


def _wait_completed(c: httpx.Client, locs: list[str], label: str) -> None:
    deadline = time.monotonic() + 3600
    while not all(c.get(loc).json()["status"] == "completed" for loc in locs):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{label}: requests not completed")
        time.sleep(0.1)


def median_ci(values: list[float]) -> tuple[float, float, float]:
    """Median and a 95% t-interval of the mean (few repeats: the interval is wide, and says so)."""
    from worker.engine.metrics import mean_ci

    mean, half = mean_ci(values)
    return statistics.median(values), mean - half, mean + half


ROW_KEYS = (("accept_rps", "accept", "per_second"), ("accept_p50_ms", "accept", "p50_ms"),
            ("accept_p99_ms", "accept", "p99_ms"), ("floor_rps", "floor", "per_second"),
            ("floor_p50_ms", "floor", "p50_ms"), ("floor_p99_ms", "floor", "p99_ms"),
            ("accept_cpu_ms", "accept", "cpu_ms"), ("floor_cpu_ms", "floor", "cpu_ms"),
            ("accept_pg_cpu_ms", "accept", "pg_cpu_ms"), ("floor_pg_cpu_ms", "floor", "pg_cpu_ms"))


def summarize(rounds: list[dict], processes: int) -> dict:
    """One row for ``processes``: medians over the repeats, with 95% intervals (``*_ci``)."""
    mine = [r for r in rounds if r["processes"] == processes]
    row: dict = {"processes": processes, "repeats": len(mine)}
    for key, app, measure in ROW_KEYS:
        m, lo, hi = median_ci([r[app][measure] for r in mine])
        row[key], row[f"{key}_ci"] = m, [lo, hi]
    for key in ("ratio", "cpu_ratio"):
        m, lo, hi = median_ci([r[key] for r in mine])
        row[key], row[f"{key}_ci"] = m, [lo, hi]
    row["accept_lost"] = sum(r["accept"]["lost"] for r in mine)
    row["floor_lost"] = sum(r["floor"]["lost"] for r in mine)
    row["accept_non_202"] = sum(r["accept"]["requests"] - r["accept"]["accepted"] for r in mine)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.service", description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000, help="requests per app per repeat (after 20 warm-up)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="API (and floor) worker processes")
    ap.add_argument("--n", type=int, default=8, help="requests in the batching comparison")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-batching", action="store_true")
    ap.add_argument("--skip-acceptance", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the acceptance rows as JSON")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = _files(tmp)
        accept = [] if args.skip_acceptance else [
            r for p in args.processes for r in acceptance(files, args.requests, args.concurrency, p, args.repeats,
                                                          tmp / f"a{p}")]
        batches = [] if args.skip_batching else [batching(files, args.n, seed, tmp / f"b{seed}")
                                                 for seed in range(args.repeats)]
    rows = [summarize(accept, p) for p in args.processes] if accept else []
    summary: dict = {"acceptance": rows}
    if batches:
        summary["batching"] = {"batched_s": median_ci([b["batched"]["seconds"] for b in batches]),
                               "single_s": median_ci([b["single"]["seconds"] for b in batches]),
                               "speedup": median_ci([b["speedup"] for b in batches])}
    result = {"config": vars(args) | {"out": str(args.out)}, "machine": {"cpus": os.cpu_count()},
              "acceptance": accept, "batching": batches, "summary": summary}
    (args.out / "service.json").write_text(json.dumps(result, indent=2))
    lines = []
    if rows:
        lines += ["| API processes | accepted / s | p99 (ms) | floor / s | floor p99 (ms) | ratio | lost "
                  "| API CPU ms / request: ours, floor | PostgreSQL CPU ms / request: ours, floor | CPU ratio |",
                  "|---:|---|---|---|---|---|---:|---|---|---|"]
        for r in rows:
            def cell(k, f="{:.1f}", r=r):
                lo, hi = r[f"{k}_ci"]
                return f"{f.format(r[k])} ({f.format(lo)} – {f.format(hi)})"
            lines.append(f"| {r['processes']} | {cell('accept_rps')} | {cell('accept_p99_ms')} | {cell('floor_rps')} | "
                         f"{cell('floor_p99_ms')} | {cell('ratio', '{:.2f}')} | {r['accept_lost']} | "
                         f"{r['accept_cpu_ms']:.2f}, {r['floor_cpu_ms']:.2f} | "
                         f"{r['accept_pg_cpu_ms']:.2f}, {r['floor_pg_cpu_ms']:.2f} | {cell('cpu_ratio', '{:.2f}')} |")
    if batches:
        lines += ["", "| measure | median | 95% CI of the mean |", "|---|---|---|"]
        for k, label in (("batched_s", f"{args.n} requests, one batched job (s)"),
                         ("single_s", f"{args.n} requests, {args.n} single jobs (s)"),
                         ("speedup", "speedup of batching (×)")):
            m, lo, hi = summary["batching"][k]
            lines.append(f"| {label} | {m:.2f} | {lo:.2f} – {hi:.2f} |")
    table = "\n".join(lines)
    (args.out / "service.md").write_text(table + "\n")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table)
        print(f"\nwrote {args.out / 'service.json'} and service.md ({args.repeats} repeats, seeds "
              f"0..{args.repeats - 1}; {args.requests} requests per app at concurrency {args.concurrency})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
