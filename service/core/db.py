"""Database engine and sessions. The schema is made only by Alembic (``unlearnd migrate``).

SQLite (embedded) is written by two processes, the API and the worker: WAL mode, a busy
timeout, foreign keys on, and every transaction opened with ``BEGIN IMMEDIATE`` so that two
writers queue on the lock instead of failing on a stale read snapshot.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
POOL_SIZE = 10  # connections kept open per process (SQLAlchemy's default: 5, and 10 more opened and closed on demand)


def make_engine(url: str, **kwargs) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
                                                  "check_same_thread": False}, **kwargs)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # pragma: no cover - exercised by every SQLite test
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):  # pragma: no cover
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # A connection per request in flight (routes run in a thread pool): below POOL_SIZE requests at
    # once, none is closed on return only to be opened again by the next request.
    return create_engine(url, **{"pool_pre_ping": True, "pool_size": POOL_SIZE, "max_overflow": POOL_SIZE} | kwargs)


def is_postgres(engine_or_session) -> bool:
    bind = engine_or_session.get_bind() if isinstance(engine_or_session, Session) else engine_or_session
    return bind.dialect.name == "postgresql"


class Database:
    """An engine and its session factory. One per process."""

    def __init__(self, url: str, **kwargs):
        self.url = url
        self.engine = make_engine(url, **kwargs)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on any exception."""
        with self.sessions() as session, session.begin():
            yield session

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as session:
            yield session

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def dispose(self) -> None:
        self.engine.dispose()


def ensure_optuna_schema(db: Database) -> None:
    """PostgreSQL: create the schema Optuna's storage lives in (``service.core.settings.OPTUNA_SCHEMA``),
    apart from ours; nothing to do on SQLite (Optuna gets a file of its own)."""
    from service.core.settings import OPTUNA_SCHEMA

    if is_postgres(db.engine):
        with db.engine.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{OPTUNA_SCHEMA}"')
