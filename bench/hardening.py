"""Hardening benchmark: the API under hostile uploads and under a database outage.

    python -m bench.hardening [--repeats 3] [--burst 600] [--out bench/results]

1. Hostile uploads: ``unlearnd api`` (a real uvicorn process, PostgreSQL, Redis) receives, at the
   same time, a 1 MB dataset file that would inflate to 1 GiB and a model whose safetensors header
   declares 99 MB, while another client calls ``/healthz`` every 20 ms. Reports the answers to the
   two uploads, the API process's peak resident memory (sampled every 20 ms from /proc) and the
   ``/healthz`` latency (p50, p99, max) during the uploads.
2. Outage: a burst of deletion requests from 8 client threads; a third of the way in, PostgreSQL
   refuses connections and terminates the API's sessions for 3 s, then comes back. Reports the
   answers by status (500s, 503s with and without Retry-After) and checks that every acknowledged
   (202) request is in the database afterwards.

Needs PostgreSQL (127.0.0.1:5432, trust) and Redis (127.0.0.1:6379). Not run in CI; the figures are
in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from bench.service import PG_ADMIN, _files, _register, fresh_database, processes

GiB = 1 << 30


def bomb_npz(inflated: int = GiB) -> bytes:
    """A valid-looking .npz whose x_train member inflates to ``inflated`` bytes of zeros."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                      "shape": (inflated // 784, 1, 28, 28)})
        with zf.open("x_train.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            chunk = bytes(1 << 24)
            left = (inflated // 784) * 784
            while left:
                member.write(chunk[:min(left, len(chunk))])
                left -= min(left, len(chunk))
        for key, value in (("y_train", np.zeros(inflated // 784, np.int64)), ("x_test", np.zeros((10, 1, 28, 28),
                                                                                                    np.uint8)),
                           ("y_test", np.arange(10) % 2)):
            raw = io.BytesIO()
            np.save(raw, value)
            zf.writestr(f"{key}.npy", raw.getvalue())
    return buf.getvalue()


def big_header_safetensors(header_bytes: int = 99 << 20) -> bytes:
    pad = "x" * (header_bytes - 200)
    raw = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "__metadata__": {"pad": pad}}).encode()
    return len(raw).to_bytes(8, "little") + raw + bytes(8)


def api_pid(port: int) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"api" in cmd and str(port).encode() in cmd:
                return int(entry.name)
    raise RuntimeError(f"no API process on port {port}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def hostile_uploads(files: dict, seed: int, workdir: Path, bomb: bytes, header: bytes) -> dict:
    with fresh_database() as db_url, processes(db_url, workdir, worker=False) as (url, key, _env):
        headers = {"Authorization": f"Bearer {key}"}
        pid = api_pid(int(url.rsplit(":", 1)[1]))
        with httpx.Client(base_url=url, headers=headers, timeout=300) as c, open(files["dataset"], "rb") as f:
            dataset_id = c.post("/v1/datasets", data={"name": f"d{seed}"},
                                files={"file": ("d.npz", f)}).json()["id"]
        idle_rss = rss_mb(pid)
        stop = threading.Event()
        health: list[float] = []
        peak = [idle_rss]

        def probe():
            with httpx.Client(base_url=url, timeout=30) as h:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    h.get("/healthz")
                    health.append(time.perf_counter() - t0)
                    time.sleep(0.02)

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mb(pid))
                time.sleep(0.02)

        def upload_bomb():
            with httpx.Client(base_url=url, headers=headers, timeout=300) as c:
                r = c.post("/v1/datasets", data={"name": "bomb"}, files={"file": ("bomb.npz", bomb)})
                return r.status_code, r.json().get("detail", "")[:160]

        def upload_header():
            with httpx.Client(base_url=url, headers=headers, timeout=300) as c:
                r = c.post("/v1/models", data={"name": "big", "dataset_id": str(dataset_id),
                                               "architecture": '{"name": "small_cnn"}'},
                           files={"weights": ("w.safetensors", header)})
                return r.status_code, r.json().get("detail", "")[:160]

        threads = [threading.Thread(target=probe), threading.Thread(target=sample)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            bomb_answer, header_answer = pool.submit(upload_bomb), pool.submit(upload_header)
            bomb_answer, header_answer = bomb_answer.result(), header_answer.result()
        seconds = time.perf_counter() - t0
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
    lat = np.array(health) * 1000
    return {"seed": seed, "bomb": {"bytes": len(bomb), "inflates_to": GiB, "status": bomb_answer[0],
                                   "detail": bomb_answer[1]},
            "header": {"bytes": len(header), "status": header_answer[0], "detail": header_answer[1]},
            "seconds": seconds, "idle_rss_mb": idle_rss, "peak_rss_mb": peak[0], "healthz_calls": len(lat),
            "healthz_p50_ms": float(np.percentile(lat, 50)), "healthz_p99_ms": float(np.percentile(lat, 99)),
            "healthz_max_ms": float(lat.max())}


def outage(files: dict, seed: int, workdir: Path, burst: int, down_s: float = 3.0) -> dict:
    import psycopg
    from sqlalchemy import select

    from service.core.db import Database
    from service.core.models import DeletionRequest

    with fresh_database() as db_url, processes(db_url, workdir, worker=False) as (url, key, _env):
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
            mid = _register(c, files, f"outage-{seed}", {"batching": {"max_requests": 10**5, "max_wait_s": 86400}},
                            db_url)
        name = db_url.rsplit("/", 1)[1]
        ids = files["ids"]
        answers: list[tuple[int, str | None, int | None]] = []
        lock = threading.Lock()
        local = threading.local()
        sent = [0]

        def post(i: int):
            client = getattr(local, "client", None)
            if client is None:
                client = local.client = httpx.Client(base_url=url, headers=headers, timeout=60)
            try:
                r = client.post(f"/v1/models/{mid}/deletion-requests",
                                json={"sample_ids": [ids[i % len(ids)]], "reason": "erasure", "subject_ref": f"s{i}"})
                answer = (r.status_code, r.headers.get("retry-after"),
                          r.json().get("id") if r.status_code == 202 else None)
            except httpx.HTTPError:
                answer = (0, None, None)
            with lock:
                answers.append(answer)
                sent[0] += 1

        def outage_window():
            while sent[0] < burst // 3:
                time.sleep(0.01)
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            time.sleep(down_s)
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')

        window = threading.Thread(target=outage_window)
        window.start()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(post, range(burst)))
        window.join()
        acknowledged = {a[2] for a in answers if a[0] == 202}
        db = Database(db_url)
        with db.session() as s:
            stored = set(s.scalars(select(DeletionRequest.id).where(DeletionRequest.model_id == mid)))
        db.dispose()
    codes: dict[str, int] = {}
    for code, _, _ in answers:
        codes[str(code)] = codes.get(str(code), 0) + 1
    refused = [a for a in answers if a[0] == 503]
    return {"seed": seed, "requests": len(answers), "by_status": codes, "server_errors": codes.get("500", 0),
            "refused_503": len(refused), "refused_without_retry_after": sum(1 for a in refused if not a[1]),
            "acknowledged": len(acknowledged), "acknowledged_lost": len(acknowledged - stored), "down_s": down_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--burst", type=int, default=600)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    work = Path("/tmp") / f"unlearnd-bench-hardening-{int(time.time())}"
    files = _files(work)
    bomb, header = bomb_npz(), big_header_safetensors()
    uploads = [hostile_uploads(files, s, work / f"u{s}", bomb, header) for s in range(args.repeats)]
    outages = [outage(files, s, work / f"o{s}", args.burst) for s in range(args.repeats)]

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    summary = {"peak_rss_mb_median": med(uploads, "peak_rss_mb"), "peak_rss_mb_max": max(r["peak_rss_mb"]
                                                                                          for r in uploads),
               "healthz_p99_ms_median": med(uploads, "healthz_p99_ms"),
               "healthz_p99_ms_max": max(r["healthz_p99_ms"] for r in uploads),
               "outage_server_errors": sum(r["server_errors"] for r in outages),
               "outage_refused_without_retry_after": sum(r["refused_without_retry_after"] for r in outages),
               "outage_acknowledged_lost": sum(r["acknowledged_lost"] for r in outages)}
    out = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}",
           "uploads": uploads, "outages": outages, "summary": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hardening.json").write_text(json.dumps(out, indent=2) + "\n")
    print("hostile uploads (1 GiB-inflating dataset + 99 MB safetensors header, /healthz every 20 ms):")
    for r in uploads:
        print(f"  seed {r['seed']}: bomb {r['bomb']['status']}, header {r['header']['status']}, API RSS "
              f"{r['idle_rss_mb']:.0f} -> peak {r['peak_rss_mb']:.0f} MB, /healthz p50 {r['healthz_p50_ms']:.1f} ms "
              f"p99 {r['healthz_p99_ms']:.1f} ms max {r['healthz_max_ms']:.1f} ms ({r['healthz_calls']} calls)")
    print(f"PostgreSQL down {outages[0]['down_s']:.0f} s during a burst of {args.burst} deletion requests:")
    for r in outages:
        print(f"  seed {r['seed']}: {r['by_status']}; 500s {r['server_errors']}, 503 without Retry-After "
              f"{r['refused_without_retry_after']}, acknowledged {r['acknowledged']}, lost {r['acknowledged_lost']}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
