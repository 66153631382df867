"""Database engine and sessions. The schema is made only by Alembic (``unlearnd migrate``).

SQLite (embedded) is written by two processes, the API and the worker: WAL mode, a busy
timeout, foreign keys on, and every transaction opened with ``BEGIN IMMEDIATE`` so that two
writers queue on the lock instead of failing on a stale read snapshot.
"""

from __future__ import annotations

import select
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.dialects.postgresql import psycopg as pg_psycopg
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.elements import TextClause

SQLITE_BUSY_TIMEOUT_MS = 30_000
POOL_SIZE = 10  # connections kept open per process (SQLAlchemy's default: 5, and 10 more opened and closed on demand)
PING_IDLE_S = 10.0  # a pooled connection unused this long is pinged before use (PostgreSQL)
_RETURNED = "unlearnd.returned_at"  # ConnectionRecord.info: when it went back to the pool


# PostgreSQL plans a prepared statement anew for each call until it trusts a generic plan (the
# server's ``plan_cache_mode = auto``); it never came to trust one for the accept path's first query
# (service/core/repo/deletions.py: the key, the model and the samples, seven relations), and planning
# it took 0.6 ms of server time a request, more than executing it and the request's write together.
# The API plans its prepared statements once (psycopg prepares a statement on its fifth call on a
# connection; a statement used fewer times is planned with its values, as before).
GENERIC_PLANS = "-c plan_cache_mode=force_generic_plan"


def make_engine(url: str, *, generic_plans: bool = False, **kwargs) -> Engine:
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
    if generic_plans:
        kwargs["connect_args"] = kwargs.get("connect_args", {}) | {"options": GENERIC_PLANS}
    engine = create_engine(url, **{"pool_size": POOL_SIZE, "max_overflow": POOL_SIZE} | kwargs)
    if not kwargs.get("pool_pre_ping"):
        _ping_when_idle(engine)
    return engine


def _ping_when_idle(engine: Engine) -> None:
    """Ping a pooled connection on checkout only when it may be gone: the server wrote to it while it
    sat idle (it does when it ends the session: a restart, an administrator, an idle timeout; a
    poll of the socket tells, no round trip), or it sat unused for ``PING_IDLE_S``. A dead one is
    replaced before a request uses it, without ``pool_pre_ping``'s round trip on every checkout. (One
    dropped without a word within ``PING_IDLE_S`` fails its next use: an OperationalError, the 503
    with Retry-After of service/api/problems.py, and SQLAlchemy replaces the pool's connections.)"""

    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_conn, record):
        record.info[_RETURNED] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn, record, _proxy):
        returned = record.info.get(_RETURNED)
        if returned is None or (time.monotonic() - returned < PING_IDLE_S and not _readable(dbapi_conn)):
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # the pool invalidates it and checks out another (a new one if need be)
            raise DisconnectionError(f"a pooled connection is gone: {exc}") from exc


def _readable(dbapi_conn) -> bool:
    """Whether an idle connection has something to read (the server's farewell, or its end of file)."""
    try:
        return bool(select.select([dbapi_conn.fileno()], [], [], 0)[0])
    except (OSError, ValueError, AttributeError):
        return True


def is_postgres(engine_or_session) -> bool:
    bind = engine_or_session.get_bind() if isinstance(engine_or_session, Session) else engine_or_session
    return bind.dialect.name == "postgresql"


class DriverStatement:
    """A fixed PostgreSQL statement that the accept path runs on the psycopg connection under a
    SQLAlchemy connection in autocommit, past SQLAlchemy's execution layer: for the accept path's two
    statements that layer (execution context, result metadata from the cursor's description,
    parameter processing) cost about as much CPU as psycopg's own work, measured in-process
    (docs/benchmarks.md). In a session it runs as any statement does. The rows are named tuples with
    the statement's columns; errors are SQLAlchemy's, as if it had run them (an OperationalError is
    the API's 503), and a connection the server dropped is invalidated, as SQLAlchemy would."""

    def __init__(self, statement: TextClause):
        self.statement = statement
        self.sql = str(statement.compile(dialect=pg_psycopg.dialect()))  # %(name)s placeholders, % escaped

    def rows(self, bind: Session | Connection, params: dict) -> list:
        if isinstance(bind, Session):
            return bind.execute(self.statement, params).all()
        raw = bind.connection.driver_connection
        try:
            with raw.cursor(row_factory=namedtuple_row) as cursor:
                cursor.execute(self.sql, params)
                return cursor.fetchall()
        except psycopg.Error as exc:
            gone = bind.dialect.is_disconnect(exc, raw, None)
            if gone:
                bind.invalidate(exc)
            raise DBAPIError.instance(self.sql, params, exc, psycopg.Error, connection_invalidated=gone,
                                      dialect=bind.dialect) from exc


class Database:
    """An engine and its session factory. One per process."""

    def __init__(self, url: str, **kwargs):
        self.url = url
        self.engine = make_engine(url, **kwargs)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def transaction(self, connection: Connection | None = None) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on any exception; on
        ``connection`` (from :meth:`connect`, idle) if given, else on one from the pool."""
        with self.sessions(**({"bind": connection} if connection is not None else {})) as session, session.begin():
            yield session

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """One pooled connection, for a request that commits a transaction on it and then reads on it
        (:meth:`autocommit`) without a second checkout."""
        with self.engine.connect() as connection:
            yield connection

    def autocommit(self, connection: Connection) -> Connection:
        """``connection`` (idle) for reads outside a transaction: on PostgreSQL in autocommit mode (no
        BEGIN and ROLLBACK round trips; reset when it goes back to the pool); on SQLite as it is."""
        return connection.execution_options(isolation_level="AUTOCOMMIT") if is_postgres(self.engine) else connection

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
