"""Service fixtures and helpers with real parts, loaded for every test tree by tests/conftest.py:
uvicorn over real HTTP, SQLite and PostgreSQL databases made by the Alembic migrations, the embedded
SQLite broker or Redis, and real Celery worker processes.

PostgreSQL (127.0.0.1:5432, trust auth) and Redis (127.0.0.1:6379) must be running: ``.ci/run``
starts them. A missing service fails the tests; it never skips them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from safetensors.torch import save_file
from sqlalchemy import func, select, text

from service.api.app import create_app
from service.core.artifacts import LocalArtifactStore
from service.core.auth import create_key
from service.core.db import Database
from service.core.migrate import upgrade
from service.core.settings import Settings
from worker.engine.runtime import Runtime
from worker.engine.training import accuracy

PG_ADMIN = os.environ.get("UNLEARND_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("UNLEARND_TEST_REDIS", "redis://127.0.0.1:6379")
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- real services


def _reachable(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=2):
        return True
    return False


@pytest.fixture(scope="session")
def postgres_admin() -> str:
    if not _reachable("127.0.0.1", 5432):
        pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432 (.ci/run starts it; see README)")
    return PG_ADMIN


@pytest.fixture(scope="session")
def redis_url() -> str:
    if not _reachable("127.0.0.1", 6379):
        pytest.fail("Redis is not reachable on 127.0.0.1:6379 (.ci/run starts it; see README)")
    return REDIS


@contextlib.contextmanager
def fresh_postgres(admin: str):
    """A new, empty PostgreSQL database for one test; dropped afterwards."""
    import psycopg

    name = f"unlearnd_t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'unlearnd.sqlite3'}"
    else:
        with fresh_postgres(request.getfixturevalue("postgres_admin")) as url:
            yield url


@pytest.fixture
def migrated_db(db_url):
    """A Database on a fresh schema made by the migrations (SQLite and PostgreSQL)."""
    upgrade(db_url)
    database = Database(db_url)
    yield database
    database.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving an app on a free loopback port, in a thread of the test process."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


# --------------------------------------------------------------------------- the service under test

COUNTED = ("datasets", "dataset_samples", "models", "model_versions", "model_aliases", "audit_log")


@dataclass
class Service:
    settings: Settings
    url: str
    db: Database
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def store(self) -> LocalArtifactStore:
        return LocalArtifactStore(self.settings.artifacts)

    def key(self, tenant: str = "acme") -> str:
        if tenant not in self.keys:
            with self.db.transaction() as s:
                self.keys[tenant] = create_key(s, tenant)[0]
        return self.keys[tenant]

    def client(self, tenant: str | None = "acme", **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.key(tenant)}"} if tenant else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kw)

    def counts(self) -> dict[str, int]:
        with self.db.session() as s:
            return {t: s.scalar(select(func.count()).select_from(text(t))) for t in COUNTED}

    def files(self) -> list[str]:
        """Every file under the artifact directory (blobs and staging leftovers)."""
        root = self.settings.artifacts
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def snapshot(self) -> tuple[dict, list]:
        return self.counts(), self.files()


def make_settings(tmp_path: Path, db_url: str, broker_url: str | None = None, **kw) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=db_url,
                    broker_url=broker_url or f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}", **kw)


@contextlib.contextmanager
def running_service(settings: Settings):
    upgrade(settings.db_url)
    db = Database(settings.db_url)
    try:
        with LiveServer(create_app(settings)) as server:
            yield Service(settings=settings, url=server.url, db=db)
    finally:
        db.dispose()


@pytest.fixture
def service(tmp_path, db_url):
    with running_service(make_settings(tmp_path, db_url)) as svc:
        yield svc


# --------------------------------------------------------------------------- a real worker process


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNLEARND_")}
    env.update({"UNLEARND_DATA_DIR": str(settings.data_dir), "DATABASE_URL": settings.db_url,
                "BROKER_URL": settings.broker, "ARTIFACT_DIR": str(settings.artifacts),
                "PYTHONPATH": str(ROOT), **extra})
    return env


@contextlib.contextmanager
def worker_process(settings: Settings, log: Path, *, beat: bool = False, **env: str):
    """``unlearnd worker`` as a child process; waits until Celery says it is ready."""
    cmd = [sys.executable, "-m", "service.cli", "worker", "--loglevel", "info"] + (["--beat"] if beat else [])
    with open(log, "wb") as out:
        # its own process group: whatever it starts (the embedded beat) goes down with it below, even
        # when a test SIGKILLs the worker itself
        proc = subprocess.Popen(cmd, env=worker_env(settings, **env), stdout=out, stderr=subprocess.STDOUT,
                                cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while b" ready." not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def flush_redis(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


def wait_for(fn, timeout: float = 60.0, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- files a user uploads


@dataclass(frozen=True)
class UserFiles:
    dataset: Path
    weights: Path
    events: Path
    spec: dict
    mean: list[float]
    std: list[float]
    test_accuracy: float

    def architecture(self) -> str:
        return json.dumps(self.spec)


@pytest.fixture(scope="session")
def user_files(tmp_path_factory, digits_raw, digits, _trained) -> UserFiles:
    """digits as a dataset file, and the session's trained small CNN as safetensors + events."""
    from worker.engine import architectures

    d = tmp_path_factory.mktemp("user")
    np.savez(d / "digits.npz", **digits_raw)
    spec, state, events = _trained
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "weights.safetensors"))
    events.save(d / "events.npz", digits.ids)
    model = architectures.build(spec)
    model.load_state_dict(state)
    acc = accuracy(model, digits.view("test"), Runtime.auto("cpu"))
    return UserFiles(d / "digits.npz", d / "weights.safetensors", d / "events.npz", spec, [0.5], [0.5], acc)


def register_dataset(client: httpx.Client, files: UserFiles, name: str = "digits") -> dict:
    with open(files.dataset, "rb") as f:
        r = client.post("/v1/datasets", data={"name": name, "mean": json.dumps(files.mean),
                                              "std": json.dumps(files.std)},
                        files={"file": ("digits.npz", f, "application/octet-stream")})
    assert r.status_code == 201, r.text
    return r.json()


def register_model(client: httpx.Client, files: UserFiles, dataset_id: int, name: str = "cnn", *,
                   spec: dict | None = None, weights: Path | None = None, events: bool = True,
                   policy: dict | None = None, recipe: dict | str | None = None) -> httpx.Response:
    data = {"name": name, "dataset_id": str(dataset_id), "architecture": json.dumps(spec or files.spec)}
    if policy is not None:
        data["policy"] = json.dumps(policy)
    if recipe is not None:
        data["recipe"] = recipe if isinstance(recipe, str) else json.dumps(recipe)
    with contextlib.ExitStack() as stack:
        up = {"weights": ("weights.safetensors", stack.enter_context(open(weights or files.weights, "rb")))}
        if events:
            up["events"] = ("events.npz", stack.enter_context(open(files.events, "rb")))
        return client.post("/v1/models", data=data, files=up)
