"""The ``unlearnd`` command: keys, migrations, and ``serve`` as a newcomer runs it (API + a real
worker on the embedded default, everything under --data-dir)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import marked_processes
from tests.servicekit import ROOT, free_port, register_dataset, register_model, wait_for

CLI = [sys.executable, "-m", "service.cli"]


def _env() -> dict[str, str]:
    drop = ("UNLEARND_", "DATABASE_URL", "BROKER_URL", "ARTIFACT_DIR")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)} | {"PYTHONPATH": str(ROOT)}


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([*CLI, *args], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def test_the_api_side_never_imports_torch():
    code = ("import sys; from service.api.app import create_app; from service.cli import build_parser; "
            "import service.api.uploads, service.core.policy, service.core.celery_app, worker.tasks; "
            "from service.core.settings import Settings; import tempfile; "
            "create_app(Settings(data_dir=tempfile.mkdtemp())); build_parser(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_keys_need_a_migrated_database_then_authenticate(tmp_path):
    data = str(tmp_path / "d")
    early = _run("keys", "create", "--tenant", "acme", "--data-dir", data, check=False)
    assert early.returncode == 1 and "unlearnd migrate" in early.stderr and "--data-dir" in early.stderr
    assert not (tmp_path / "d").exists()  # a mistyped directory is not created empty
    assert "revision" in _run("migrate", "--data-dir", data).stdout
    key = _run("keys", "create", "--tenant", "acme", "--data-dir", data).stdout.strip()
    assert key.startswith("ulk_")
    other = _run("keys", "create", "--tenant", "acme", "--data-dir", data).stdout.strip()
    assert other != key

    from service.core.auth import authenticate
    from service.core.db import Database

    db = Database(f"sqlite:///{tmp_path / 'd' / 'unlearnd.sqlite3'}")
    try:
        with db.transaction() as s:
            a, b = authenticate(s, f"Bearer {key}"), authenticate(s, f"Bearer {other}")
        assert a.tenant == b.tenant == "acme" and a.tenant_id == b.tenant_id and a.key_prefix != b.key_prefix
    finally:
        db.dispose()
    assert _run("keys", "create", "--tenant", " ", "--data-dir", data, check=False).returncode == 2


def test_serve_runs_api_and_worker_on_the_embedded_default(tmp_path, user_files):
    data, port = tmp_path / "unlearnd-data", free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([*CLI, "serve", "--data-dir", str(data), "--port", str(port)], env=_env(),
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready():
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None and (_ for _ in ()).throw(AssertionError("serve exited"))

        wait_for(ready, timeout=60, what="serve to be ready")
        printed = (tmp_path / "serve.log").read_text()
        assert url in printed and "keys create --tenant" in printed
        assert {p.name for p in data.iterdir()} >= {"unlearnd.sqlite3", "artifacts"}
        key = _run("keys", "create", "--tenant", "acme", "--data-dir", str(data)).stdout.strip()
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
            ds = register_dataset(c, user_files)
            r = register_model(c, user_files, ds["id"])
            assert r.status_code == 201, r.text
            mid = r.json()["id"]

            def checked():
                v = c.get(f"/v1/models/{mid}/versions/1").json()
                return v if v["status"] != "pending" else None

            v1 = wait_for(checked, timeout=90, what="the embedded worker to check version 1")
            assert v1["status"] == "ready", v1
            assert abs(v1["metrics"]["test_accuracy"] - user_files.test_accuracy) < 1e-6
            blob = c.get(f"/v1/models/{mid}/versions/production/checkpoint").content
            assert hashlib.sha256(blob).hexdigest() == v1["checkpoint"]["sha256"]
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert children, "serve runs its worker as a child process"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    # the worker child went down with the API
    time.sleep(0.5)
    for pid in map(int, children):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"worker {pid} outlived serve")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_serve_stops_every_process_it_started(tmp_path, sig):
    """``kill`` (SIGTERM) or Ctrl-C (SIGINT) of ``unlearnd serve`` takes its worker (and the worker's
    beat) down with it: nothing it started keeps running."""
    data, port = tmp_path / "unlearnd-data", free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([*CLI, "serve", "--data-dir", str(data), "--port", str(port)], env=_env(),
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def worker_ready():
            if proc.poll() is not None:
                raise AssertionError(f"serve exited: {(tmp_path / 'serve.log').read_text()[-2000:]}")
            ours = [cmd for pid, cmd in marked_processes().items() if pid != proc.pid]
            with contextlib.suppress(httpx.HTTPError):
                up = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
                return up and any("service.cli worker" in cmd for cmd in ours) and b" ready." in (
                    tmp_path / "serve.log").read_bytes()
            return False

        wait_for(worker_ready, timeout=90, what="serve and its worker to be ready")
        started = {pid for pid, cmd in marked_processes().items() if "service.cli" in cmd}
        assert len(started) >= 2, started  # serve and its worker
        proc.send_signal(sig)
        code = proc.wait(40)
        if sig == signal.SIGTERM:
            assert code == 128 + signal.SIGTERM  # unwound through its cleanup, not killed by the signal
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 10
    while (left := set(marked_processes()) & started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"still running after serve stopped: {left}"


def test_demo_runs_the_whole_path_on_the_embedded_default(tmp_path):
    """The README's first command runs this: register, calibrate, three requests, one job, the report."""
    out = subprocess.run([*CLI, "demo", "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "demo")],
                         env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "guardrails" in out.stdout and "report:" in out.stdout
    # the calibration step: scores, the chosen policy, its cost and when it pays for itself
    assert "check set, uncalibrated default" in out.stdout and "chosen (" in out.stdout
    assert "retrain-equivalents" in out.stdout
    assert "pays for itself after" in out.stdout or "buys quality, not speed" in out.stdout
    results = list((tmp_path / "demo").glob("model-*-job-*"))
    assert len(results) == 1
    files = {p.name for p in results[0].iterdir()}
    assert {"v2.safetensors", "report.json", "report.html"} <= files
    report = json.loads((results[0] / "report.json").read_text())
    assert report["job"]["new_version"] == 2 and len(report["requests"]) == 3
    assert report["forget_set"]["n"] == 40  # 10 + 15 + 15 new ids; the 3 repeated ones are linked, not redone
    # the mislabeled request's 15 rows take the corrective step, the 25 erased ones RUM's bins
    assert "rows with wrong labels: 15 → random_label" in out.stdout
    assert sum(b["n"] for b in report["bins"] if b["index"] >= 0) == 25


def test_sigterm_to_a_worker_with_beat_stops_it_and_its_beat(tmp_path):
    """``unlearnd worker --beat`` (Celery's warm shutdown: the current task ends first) leaves nothing
    running after SIGTERM: neither the worker nor the beat it embeds."""
    data = tmp_path / "d"
    _run("migrate", "--data-dir", str(data))
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*CLI, "worker", "--beat", "--data-dir", str(data)], env=_env(), cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: b" ready." in log.read_bytes() or proc.poll() is not None, timeout=90,
                 what="the worker to be ready")
        assert proc.poll() is None, log.read_text()[-2000:]
        wait_for(lambda: len([p for p, cmd in marked_processes().items() if "service.cli" in cmd]) >= 2,
                 timeout=30, what="the embedded beat to start")
        started = {p for p, cmd in marked_processes().items() if "service.cli" in cmd}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 15
    while (left := set(marked_processes()) & started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"still running after the worker stopped: {left}"
