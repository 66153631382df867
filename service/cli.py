"""The ``unlearnd`` command. It never imports torch itself: engine commands load it lazily.

- ``serve``: the embedded default, API + one real worker process, everything under ``--data-dir``
- ``api`` / ``worker`` / ``beat``: the production processes (same code, ``DATABASE_URL``,
  ``BROKER_URL``, ``ARTIFACT_DIR`` from the environment)
- ``migrate``: bring the database schema to the newest migration
- ``keys create --tenant T``: print a new API key
- ``train``: train an unlearning-ready model (weights, events, architecture)
- ``verify FILE``: check a tree head, a proof or an erasure certificate offline (docs/transparency.md)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

DEFAULT_DATA_DIR = "unlearnd-data"


def _data_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"embedded default's directory (database, broker, artifacts); env UNLEARND_DATA_DIR, "
                        f"default ./{DEFAULT_DATA_DIR}. DATABASE_URL, BROKER_URL, ARTIFACT_DIR override its parts")


def _worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--queues", default="gpu,default", help="comma-separated queues to consume (default: gpu,default)")
    p.add_argument("--concurrency", type=int, default=1, help="tasks at once (keep 1 per GPU)")
    p.add_argument("--pool", choices=("solo", "threads", "prefork"), default="solo",
                   help="solo (default) or threads: CUDA is not fork-safe")
    p.add_argument("--loglevel", default="info")
    p.add_argument("--beat", action="store_true", help="also run the periodic sweeper in this process")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unlearnd", description="Make trained classifiers forget, and prove it.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the API and one worker on the embedded default (no server needed)")
    _data_dir_arg(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--no-worker", action="store_true", help="API only (a worker runs elsewhere)")

    api = sub.add_parser("api", help="run the API process only (production)")
    _data_dir_arg(api)
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")

    worker = sub.add_parser("worker", help="run a Celery worker (one per GPU: set CUDA_VISIBLE_DEVICES)")
    _data_dir_arg(worker)
    _worker_args(worker)

    beat = sub.add_parser("beat", help="run the periodic sweeper (one per deployment)")
    _data_dir_arg(beat)
    beat.add_argument("--loglevel", default="info")

    migrate = sub.add_parser("migrate", help="create or upgrade the database schema (Alembic)")
    _data_dir_arg(migrate)

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create an API key for a tenant (created on first use)")
    _data_dir_arg(create)
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", default=None, help="a label for the key")

    demo = sub.add_parser("demo", help="register digits and a small CNN, send deletion requests, show the report")
    _data_dir_arg(demo)
    demo.add_argument("--url", default=None, help="a running service (default: start the embedded one)")
    demo.add_argument("--key", default=os.environ.get("UNLEARND_API_KEY"),
                      help="API key for --url (env UNLEARND_API_KEY)")
    demo.add_argument("--port", type=int, default=None, help="port of the embedded service (default: a free one)")
    demo.add_argument("--out", type=Path, default=Path("unlearnd-demo"), help="where inputs and results go")
    demo.add_argument("--no-calibration", action="store_true",
                      help="skip the policy calibration step (a few tens of seconds on digits)")
    demo.add_argument("--keep-serving", action="store_true",
                      help="keep the embedded service running afterwards (Ctrl-C stops it)")

    verify = sub.add_parser("verify", help="check a signed tree head, a proof or an erasure certificate offline; "
                                           "exit 0 if it verifies, 1 if anything in it was altered")
    verify.add_argument("file", help="the JSON document ('-': standard input)")
    key = verify.add_mutually_exclusive_group(required=True)
    key.add_argument("--public-key", type=Path, metavar="PEM", help="the deployment's Ed25519 public key (PEM)")
    key.add_argument("--url", metavar="BASE", help="fetch the public key from BASE/v1/public-key")

    train = sub.add_parser("train", help="train an unlearning-ready model (weights, events, architecture)")
    from worker.engine.cli import add_train_arguments  # cheap: torch loads when the command runs

    add_train_arguments(train)
    return parser


def _settings(args: argparse.Namespace, *, create: bool = True):
    """Settings from the environment, with ``--data-dir`` exported so child processes agree.
    ``create=False``: a command that only uses an existing service never creates its directories."""
    if getattr(args, "data_dir", None) is not None:
        os.environ["UNLEARND_DATA_DIR"] = str(args.data_dir.resolve())
    from service.core.settings import Settings

    settings = Settings()
    os.environ["UNLEARND_DATA_DIR"] = str(settings.data_dir.resolve())
    if create:
        settings.ensure_dirs()
    return settings


def cmd_migrate(args) -> int:
    from service.core.migrate import head_revision, upgrade

    settings = _settings(args)
    upgrade(settings.db_url)
    print(f"database at revision {head_revision(settings.db_url)}: {settings.public()['database']}")
    return 0


def cmd_keys_create(args) -> int:
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from service.core.auth import create_key
    from service.core.db import Database

    settings = _settings(args, create=False)
    if settings.database_url is None and not (settings.data_dir / "unlearnd.sqlite3").is_file():
        print(f"error: no unlearnd database in {settings.data_dir.resolve()}; give the service's data "
              "directory with --data-dir (or UNLEARND_DATA_DIR), or DATABASE_URL for PostgreSQL. A new "
              f"service starts with '{_prog()} serve' or '{_prog()} migrate --data-dir DIR'.", file=sys.stderr)
        return 1
    db = Database(settings.db_url)
    try:
        with db.transaction() as session:
            key, row = create_key(session, args.tenant, args.name)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OperationalError, ProgrammingError) as exc:
        print(f"error: the database is not ready ({type(exc).__name__}); run 'unlearnd migrate' first",
              file=sys.stderr)
        return 1
    finally:
        db.dispose()
    print(key)
    print(f"# tenant {args.tenant!r}, key prefix {row.prefix}; shown once, stored hashed. "
          f"Use it as 'Authorization: Bearer <key>'.", file=sys.stderr)
    return 0


def _worker_argv(args) -> list[str]:
    settings = _settings(args)
    argv = ["worker", f"--queues={args.queues}", f"--pool={args.pool}", f"--concurrency={args.concurrency}",
            f"--loglevel={args.loglevel}", "--hostname=unlearnd-%h-" + str(os.getpid())]
    if args.beat:
        argv += ["--beat", f"--schedule={settings.data_dir.resolve() / 'beat-schedule'}"]
    return argv


def cmd_worker(args) -> int:
    argv = _worker_argv(args)
    from worker.tasks import app  # sets the worker's torch threads once, at start (worker_init)

    app.worker_main(argv)
    return 0


def cmd_beat(args) -> int:
    settings = _settings(args)
    from worker.tasks import app

    app.start(["beat", f"--loglevel={args.loglevel}", f"--schedule={settings.data_dir.resolve() / 'beat-schedule'}"])
    return 0


def cmd_api(args) -> int:
    import uvicorn

    _settings(args)
    uvicorn.run("service.api.app:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
                log_level="info", http="service.api.server:H11NoDelay")
    return 0


class WorkerSupervisor:
    """The embedded worker as a child process, restarted if it dies (a killed worker must not stall
    the queue); stopped with the API.

    The worker runs in its own process group, so that stopping it reaches everything it started
    (Celery's beat, a pool's children): SIGTERM first (Celery's warm shutdown lets the current task
    end), then SIGKILL of the whole group after ``timeout``. A job killed that way is not lost: its
    heartbeat stops and the sweeper gives it to another worker (docs/architecture.md)."""

    def __init__(self, argv: list[str]):
        self.argv, self.proc, self.stopping = argv, None, threading.Event()
        self.restarts = 0
        self._lock = threading.Lock()

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen(self.argv, start_new_session=True)

    def start(self) -> None:
        self.proc = self._spawn()
        threading.Thread(target=self._watch, daemon=True, name="worker-supervisor").start()

    def _watch(self) -> None:
        while not self.stopping.is_set():
            if self.proc.poll() is not None and not self.stopping.is_set():
                self.restarts += 1
                print(f"unlearnd: worker exited with {self.proc.returncode}; restarting", file=sys.stderr)
                time.sleep(min(30.0, 1.0 * self.restarts))
                with self._lock:
                    if not self.stopping.is_set():
                        self.proc = self._spawn()
            self.stopping.wait(0.5)

    def stop(self, timeout: float = 15.0) -> None:
        with self._lock:
            self.stopping.set()
        proc = self.proc
        if proc is None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"unlearnd: worker still running after {timeout:.0f} s; killing it", file=sys.stderr)
        _signal_group(proc.pid, signal.SIGKILL)  # whatever the worker left behind in its group
        proc.wait()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _exit_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C. uvicorn handles SIGTERM during its run and re-raises it
    afterwards; with the default disposition that re-raise would end the process before any
    ``finally`` ran, leaving the embedded worker behind."""
    def handler(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def cmd_serve(args) -> int:
    import uvicorn

    from service.api.app import create_app
    from service.core.migrate import upgrade

    settings = _settings(args)
    upgrade(settings.db_url)
    _register_signing_key(settings)
    _exit_on_sigterm()
    supervisor = None
    try:
        if not args.no_worker:
            supervisor = WorkerSupervisor([sys.executable, "-m", "service.cli", "worker", "--beat",
                                           "--queues", "gpu,default"])
            supervisor.start()
        url = f"http://{args.host}:{args.port}"
        data_flag = f" --data-dir {settings.data_dir}" if settings.embedded else ""
        print(f"unlearnd is serving on {url}  (API docs: {url}/docs)\n"
              f"  data:      {settings.public()}\n"
              f"  get a key: {_prog()} keys create --tenant <name>{data_flag}", flush=True)
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=settings.log_level)
    finally:
        if supervisor:
            supervisor.stop()
    return 0


def _register_signing_key(settings) -> None:
    """The deployment's signing key (created on first start for the embedded default), registered so
    that the API serves its public half from the start. Only its id is printed."""
    from service.core.db import Database
    from service.core.repo.transparency import register_key
    from service.core.signing import load_signer

    signer = load_signer(settings)
    db = Database(settings.db_url)
    try:
        with db.transaction() as session:
            register_key(session, signer)
    finally:
        db.dispose()


def _prog() -> str:
    """How the user called us (``.venv/bin/unlearnd`` when it is not on PATH)."""
    me = sys.argv[0]
    if os.path.basename(me) != "unlearnd":
        return "unlearnd"
    rel = os.path.relpath(me)
    return rel if not rel.startswith("..") and os.sep in rel else me if os.sep in me else "unlearnd"


def cmd_demo(args) -> int:
    from service.demo import DemoError, embedded_service, make_key, run_demo

    args.out.mkdir(parents=True, exist_ok=True)
    try:
        if args.url:
            if not args.key:
                print("error: --key (or UNLEARND_API_KEY) is needed with --url", file=sys.stderr)
                return 2
            run_demo(args.url.rstrip("/"), args.key, args.out, calibration=not args.no_calibration)
            return 0
        settings = _settings(args)
        log = args.out / "serve.log"
        with embedded_service(settings.data_dir, args.port, log) as (url, proc):
            key = make_key(settings.data_dir, "demo")
            run_demo(url, key, args.out, calibration=not args.no_calibration)
            if args.keep_serving:
                print(f"\nthe service keeps running on {url} (API docs {url}/docs; log {log}); "
                      f"your demo key: {key}\nCtrl-C stops it.", flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    proc.wait()
        return 0
    except DemoError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1


def cmd_verify(args) -> int:
    """0: the document verifies; 1: it does not (altered, or signed by another key); 2: it could
    not be checked (unreadable file or key)."""
    import json

    from service.core.evidence import Altered, verify
    from service.core.signing import key_id, load_public_key

    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        public = load_public_key(args.public_key.read_bytes() if args.public_key else _fetch_public_key(args.url))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        doc = json.loads(text)
    except ValueError as exc:
        print(f"FAILED: {args.file} is not JSON ({exc})", file=sys.stderr)
        return 1
    try:
        summary = verify(doc, public)
    except Altered as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"OK ({key_id(public)[:16]}…): {summary}")
    return 0


def _fetch_public_key(base: str) -> str:
    import httpx

    try:
        answer = httpx.get(base.rstrip("/") + "/v1/public-key", timeout=30)
        answer.raise_for_status()
        return answer.json()["public_key_pem"]
    except httpx.HTTPError as exc:
        raise OSError(f"could not fetch the public key from {base}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from worker.engine.cli import run_train

        return run_train(args)
    if args.command == "keys":
        return cmd_keys_create(args)
    return {"serve": cmd_serve, "api": cmd_api, "worker": cmd_worker, "beat": cmd_beat,
            "migrate": cmd_migrate, "demo": cmd_demo, "verify": cmd_verify}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
