"""EventLog: the append-only SQL log of every event of every run (SQLite or PostgreSQL).

Positions are global and gap-free in commit order: an append locks the single row of
``log_head`` (``SELECT ... FOR UPDATE`` on PostgreSQL; ``BEGIN IMMEDIATE`` takes SQLite's
write lock), numbers its new rows after the head, and commits. A concurrent appender waits
on that lock, so positions are handed out and committed in the same order, a reader that
has seen position p never later finds a new row below p, and a rolled-back append leaves
no hole. Duplicate event ids (at-least-once delivery resends) are skipped under the same
lock, so they are exact no-ops and never consume a position.

Every driver exception is translated here into :mod:`store.errors`.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.pool import QueuePool, StaticPool

from protocol.codec import DecodeError
from protocol.events import Envelope
from store import schema
from store.errors import (
    LogReadError,
    LogWriteError,
    MalformedRowError,
    NotAnEventLogError,
    QueryError,
    RunNotFoundError,
    StoreError,
)
from store.rows import envelope_to_row, row_to_envelope
from store.schema import events, log_head, reckon_meta, runs

#: File name of the SQLite log inside a run directory.
DB_FILENAME = "events.db"
#: Seconds an SQLite connection waits for another writer's lock before failing.
SQLITE_BUSY_TIMEOUT_S = 60.0
#: Rows fetched per page by read(); pages keep no transaction open between yields.
READ_PAGE = 1000
#: event_ids per duplicate-check query (well under every backend's bind-parameter cap).
_ID_CHUNK = 900
#: Arbitrary constant key of the PostgreSQL advisory lock that serializes schema setup.
_PG_SETUP_LOCK = 0x7265636B6F6E  # "reckon"


def resolve_url(url_or_path: str | Path) -> URL:
    """A SQLAlchemy URL for a URL, an SQLite file path, or a run directory (its events.db)."""
    s = str(url_or_path)
    if "://" in s:
        try:
            return make_url(s)
        except SQLAlchemyError as e:
            raise StoreError(f"invalid database URL {s!r}: {e}") from e
    path = Path(s).expanduser()
    if path.is_dir():
        path = path / DB_FILENAME
    return URL.create("sqlite", database=str(path.resolve()))


def _is_memory(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _display(url: URL) -> str:
    return url.render_as_string(hide_password=True)


class EventLog:
    """The event log of one database. Thread-safe; open one per process.

    Use :meth:`open`; the constructor is internal.
    """

    def __init__(self, engine: Engine, url: URL, *, readonly: bool) -> None:
        self.engine = engine
        self.url = url
        self.readonly = readonly
        self.dialect = engine.dialect.name
        # An in-memory SQLite database is one shared connection: serialize its users.
        self._lock: contextlib.AbstractContextManager = (
            threading.RLock() if _is_memory(url) else contextlib.nullcontext()
        )
        self._query_engine: Engine | None = None

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, url_or_path: str | Path, *, readonly: bool = False) -> EventLog:
        """Open (and, unless ``readonly``, create if missing) the log at ``url_or_path``.

        ``url_or_path``: ``sqlite:///path.db``, ``sqlite://`` (memory), a ``.db`` path, a run
        directory (uses its ``events.db``), or ``postgresql+psycopg://user@host/db``.
        ``readonly=True`` opens SQLite with ``mode=ro`` and PostgreSQL sessions with
        ``default_transaction_read_only``; nothing can be written through it.

        Raises NotAnEventLogError for a corrupt file, a non-database file, a database with
        other tables and no reckon marker, a log of a newer schema, or (readonly) a missing
        or empty database; StoreError when the database cannot be reached.
        """
        url = resolve_url(url_or_path)
        engine = _make_engine(url, readonly=readonly)
        log = cls(engine, url, readonly=readonly)
        try:
            log._setup(create=not readonly)
        except BaseException:
            engine.dispose()
            raise
        return log

    def close(self) -> None:
        """Release connections. The object is unusable afterwards."""
        if self._query_engine is not None and self._query_engine is not self.engine:
            self._query_engine.dispose()
        self.engine.dispose()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EventLog({_display(self.url)!r}{', readonly' if self.readonly else ''})"

    def _setup(self, *, create: bool) -> None:
        where = _display(self.url)
        try:
            with self._tx(write=create) as conn:
                if create and self.dialect == "postgresql":
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_SETUP_LOCK})
                tables = set(sa.inspect(conn).get_table_names())
                if "reckon_meta" in tables:
                    meta = dict(conn.execute(sa.select(reckon_meta.c.key, reckon_meta.c.value)).all())
                    if meta.get("kind") != schema.LOG_KIND:
                        raise NotAnEventLogError(f"{where} has a reckon_meta table but is not a reckon event log")
                    version = int(meta.get("schema_version", "0"))
                    if version != schema.SCHEMA_VERSION:
                        raise NotAnEventLogError(
                            f"{where} holds an event log of schema version {version}; this reckon reads "
                            f"version {schema.SCHEMA_VERSION} (use the reckon version that wrote it)"
                        )
                    return
                if tables:
                    raise NotAnEventLogError(
                        f"{where} is not a reckon event log (it has tables {', '.join(sorted(tables)[:5])} "
                        "and no reckon_meta); point reckon at a new file or an empty database"
                    )
                if not create:
                    raise NotAnEventLogError(f"{where} is empty: no event log has been written there")
                schema.metadata.create_all(conn)
                conn.execute(log_head.insert().values(id=1, position=0))
                conn.execute(
                    reckon_meta.insert(),
                    [
                        {"key": "kind", "value": schema.LOG_KIND},
                        {"key": "schema_version", "value": str(schema.SCHEMA_VERSION)},
                    ],
                )
                for ddl in schema.view_sql(self.dialect).values():
                    conn.exec_driver_sql(ddl)
        except StoreError:
            raise
        except DBAPIError as e:
            orig = e.orig
            if isinstance(orig, sqlite3.DatabaseError) and not isinstance(orig, sqlite3.OperationalError):
                raise NotAnEventLogError(f"{where} is corrupt or not an SQLite database ({orig})") from e
            raise StoreError(f"cannot open the event log at {where}: {orig}") from e
        except SQLAlchemyError as e:
            raise StoreError(f"cannot open the event log at {where}: {e}") from e

    @contextlib.contextmanager
    def _tx(self, *, write: bool) -> Iterator[Connection]:
        """One transaction; ``write=True`` takes the write lock up front on SQLite."""
        with self._lock, self.engine.connect() as conn:
            if write:
                conn = conn.execution_options(reckon_write=True)
            with conn.begin():
                yield conn

    # ------------------------------------------------------------------ writing

    def append(self, envelopes: Sequence[Envelope]) -> int:
        """Append ``envelopes`` in one transaction, in order; return how many were new.

        Events whose ``event_id`` is already in the log (or earlier in the same call) are
        skipped: appending the same event twice is a no-op. Raises LogWriteError (nothing
        of this call is written) when a payload cannot be stored or the commit fails.
        """
        self._check_writable("append")
        unique: dict[str, Envelope] = {}
        for env in envelopes:
            unique.setdefault(env.event_id, env)
        if not unique:
            return 0
        rows = []
        for env in unique.values():  # CPU work before taking the lock
            try:
                rows.append(envelope_to_row(env))
            except (TypeError, ValueError) as e:
                raise LogWriteError(f"event {env.event_id} ({env.type}) cannot be stored: {e}") from e
        ids = list(unique)
        try:
            with self._tx(write=True) as conn:
                head = conn.execute(
                    sa.select(log_head.c.position).where(log_head.c.id == 1).with_for_update()
                ).scalar_one()
                seen: set[str] = set()
                for i in range(0, len(ids), _ID_CHUNK):
                    chunk = ids[i : i + _ID_CHUNK]
                    seen.update(conn.execute(sa.select(events.c.event_id).where(events.c.event_id.in_(chunk))).scalars())
                new = [row for row in rows if row["event_id"] not in seen] if seen else rows
                if not new:
                    return 0
                for position, row in enumerate(new, head + 1):
                    row["position"] = position
                conn.execute(events.insert(), new)
                conn.execute(log_head.update().where(log_head.c.id == 1).values(position=head + len(new)))
            return len(new)
        except SQLAlchemyError as e:
            raise LogWriteError(f"appending {len(rows)} events to {_display(self.url)} failed: {_reason(e)}") from e

    def ensure_run(self, run_id: str, *, name: str = "", config: dict | None = None, run_dir: str = "") -> bool:
        """Register ``run_id`` (status ``running``) if it is not in ``runs``; True if added.

        An existing row is left as it is (a restarted recorder calls this again).
        """
        self._check_writable("ensure_run")
        try:
            text = json.dumps(config or {}, default=str)
        except ValueError as e:
            raise LogWriteError(f"run {run_id}: config is not JSON-serializable: {e}") from e
        insert = pg_dialect.insert if self.dialect == "postgresql" else sqlite_dialect.insert
        stmt = insert(runs).values(
            run_id=run_id, name=name or run_id, created=time.time(), config=text, status="running", run_dir=run_dir
        )
        try:
            with self._tx(write=True) as conn:
                stmt = stmt.on_conflict_do_nothing(index_elements=["run_id"]).returning(runs.c.run_id)
                return conn.execute(stmt).first() is not None
        except SQLAlchemyError as e:
            raise LogWriteError(f"registering run {run_id} in {_display(self.url)} failed: {_reason(e)}") from e

    def set_run_status(self, run_id: str, status: str) -> None:
        """Set a run's status (``running`` | ``ok`` | ``interrupted`` | ``failed``).

        Raises RunNotFoundError if ``run_id`` was never registered with :meth:`ensure_run`.
        """
        self._check_writable("set_run_status")
        try:
            with self._tx(write=True) as conn:
                n = conn.execute(runs.update().where(runs.c.run_id == run_id).values(status=status)).rowcount
        except SQLAlchemyError as e:
            raise LogWriteError(f"setting status of run {run_id} failed: {_reason(e)}") from e
        if n == 0:
            raise RunNotFoundError(f"run {run_id!r} is not in {_display(self.url)} (call ensure_run first)")

    def _check_writable(self, what: str) -> None:
        if self.readonly:
            raise LogWriteError(f"{what}: {_display(self.url)} was opened read-only")

    # ------------------------------------------------------------------ reading

    def read(
        self,
        run_id: str | None = None,
        types: Iterable[str] | None = None,
        after: int = 0,
        limit: int | None = None,
        stream_id: str | None = None,
    ) -> Iterator[tuple[int, Envelope]]:
        """Yield ``(position, envelope)`` in position order, arrays restored.

        ``after``: only positions greater than this (resume point). ``types``: event type
        names to keep. ``stream_id``: only events of that stream (a rollout id, group id,
        step number as text). Pages through the log without holding a transaction between
        yields, so a long consumer never blocks writers. Raises MalformedRowError naming
        the position of a row that does not decode, LogReadError if the database fails.
        """
        type_list = sorted(set(types)) if types is not None else None
        cond = []
        if run_id is not None:
            cond.append(events.c.run_id == run_id)
        if type_list is not None:
            cond.append(events.c.type.in_(type_list))
        if stream_id is not None:
            cond.append(events.c.stream_id == stream_id)
        remaining = limit
        last = after
        while remaining is None or remaining > 0:
            page = READ_PAGE if remaining is None else min(READ_PAGE, remaining)
            stmt = sa.select(events).where(events.c.position > last, *cond).order_by(events.c.position).limit(page)
            try:
                with self._tx(write=False) as conn:
                    rows = conn.execute(stmt).all()
            except SQLAlchemyError as e:
                raise LogReadError(f"reading {_display(self.url)} failed: {_reason(e)}") from e
            for row in rows:
                yield row.position, self._decode(row)
            if len(rows) < page:
                return
            last = rows[-1].position
            if remaining is not None:
                remaining -= len(rows)

    def _decode(self, row: Any) -> Envelope:
        try:
            return row_to_envelope(row)
        except (DecodeError, ValueError, TypeError, KeyError) as e:
            raise MalformedRowError(
                f"event at position {row.position} (event_id {row.event_id}, type {row.type}) in "
                f"{_display(self.url)} is malformed: {e}"
            ) from e

    def last_position(self, run_id: str | None = None) -> int:
        """The highest committed position (of ``run_id``'s events if given); 0 when none."""
        if run_id is None:
            stmt = sa.select(log_head.c.position).where(log_head.c.id == 1)
        else:
            stmt = sa.select(sa.func.max(events.c.position)).where(events.c.run_id == run_id)
        try:
            with self._tx(write=False) as conn:
                return conn.execute(stmt).scalar() or 0
        except SQLAlchemyError as e:
            raise LogReadError(f"reading {_display(self.url)} failed: {_reason(e)}") from e

    def runs(self) -> list[dict[str, Any]]:
        """Every registered run, oldest first: run_id, name, created, config, status, run_dir."""
        try:
            with self._tx(write=False) as conn:
                rows = conn.execute(sa.select(runs).order_by(runs.c.created, runs.c.run_id)).mappings().all()
        except SQLAlchemyError as e:
            raise LogReadError(f"reading runs from {_display(self.url)} failed: {_reason(e)}") from e
        out = []
        for row in rows:
            d = dict(row)
            if isinstance(d["config"], str):
                d["config"] = json.loads(d["config"])
            out.append(d)
        return out

    def run_ids(self) -> list[str]:
        """Run ids that have events, in order of their first event (registered or not)."""
        stmt = sa.select(events.c.run_id).group_by(events.c.run_id).order_by(sa.func.min(events.c.position))
        try:
            with self._tx(write=False) as conn:
                return list(conn.execute(stmt).scalars())
        except SQLAlchemyError as e:
            raise LogReadError(f"reading {_display(self.url)} failed: {_reason(e)}") from e

    def resolve_run(self, run_id: str | None = None) -> str:
        """``run_id`` if it has events, or the only/latest run when None; RunNotFoundError else."""
        ids = self.run_ids()
        if run_id is None:
            if not ids:
                raise RunNotFoundError(f"{_display(self.url)} holds no events yet")
            return ids[-1]
        if run_id not in ids:
            known = ", ".join(ids[-5:]) or "none"
            raise RunNotFoundError(f"run {run_id!r} has no events in {_display(self.url)} (runs: {known})")
        return run_id

    # ------------------------------------------------------------------ user SQL

    def query(self, sql: str, params: dict | Sequence | None = None) -> tuple[list[str], list[tuple]]:
        """Run one read-only SQL statement; return ``(column names, rows)``.

        Writes are refused by the database itself: SQLite through an authorizer that
        denies everything but reads (and a ``mode=ro`` connection for files); PostgreSQL
        through a read-only session and a prepared statement (one statement only, so a
        ``COMMIT; DELETE ...`` cannot escape the read-only transaction). Raises QueryError
        with the database's message for a bad or writing statement.
        """
        if not isinstance(sql, str) or not sql.strip():
            raise QueryError("empty SQL statement")
        engine = self._readonly_engine()
        lock = self._lock if engine is self.engine else contextlib.nullcontext()
        try:
            with lock, engine.connect() as conn:
                raw = conn.connection.driver_connection
                if self.dialect == "sqlite":
                    return _sqlite_query(raw, sql, params)
                return _pg_query(raw, sql, params)
        except QueryError:
            raise
        except (DBAPIError, sqlite3.Error) as e:
            raise QueryError(f"query failed: {_reason(e)}") from e
        except Exception as e:  # psycopg raises its own hierarchy from the raw cursor
            if type(e).__module__.startswith("psycopg"):
                raise QueryError(f"query failed: {e}") from e
            raise

    def _readonly_engine(self) -> Engine:
        if self.readonly or _is_memory(self.url):
            return self.engine  # memory: the authorizer alone guards the one connection
        if self._query_engine is None:
            self._query_engine = _make_engine(self.url, readonly=True)
        return self._query_engine


# --------------------------------------------------------------------------- engines


def _make_engine(url: URL, *, readonly: bool) -> Engine:
    backend = url.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(url, readonly=readonly)
    if backend == "postgresql":
        if readonly:
            opts = url.query.get("options", "")
            opts = " ".join(opts) if isinstance(opts, tuple) else opts
            url = url.update_query_dict({"options": f"{opts} -c default_transaction_read_only=on".strip()})
        return sa.create_engine(url, pool_pre_ping=True)
    raise StoreError(f"unsupported database {backend!r} in {_display(url)}: use sqlite:/// or postgresql+psycopg://")


def _sqlite_engine(url: URL, *, readonly: bool) -> Engine:
    if _is_memory(url):
        engine = sa.create_engine(
            "sqlite://",
            poolclass=StaticPool,
            creator=lambda: sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None),
        )
    else:
        path = Path(url.database).expanduser()
        if readonly and not path.is_file():
            raise NotAnEventLogError(f"no event log at {path} (expected an events.db written by a run)")
        if not readonly:
            path.parent.mkdir(parents=True, exist_ok=True)
        target = f"file:{quote(str(path))}?mode=ro" if readonly else f"file:{quote(str(path))}"

        def connect() -> sqlite3.Connection:
            return sqlite3.connect(
                target, uri=True, timeout=SQLITE_BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None
            )

        engine = sa.create_engine("sqlite://", poolclass=QueuePool, creator=connect)

    @sa_event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        if not readonly and not _is_memory(url):
            dbapi_conn.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            dbapi_conn.execute("PRAGMA synchronous=NORMAL")  # durable against process kill in WAL

    # isolation_level=None hands transaction control to us: take the write lock at BEGIN
    # for writers (a deferred BEGIN that upgrades later can fail with SQLITE_BUSY instead
    # of waiting), plain BEGIN for readers.
    @sa_event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("reckon_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def _reason(e: BaseException) -> str:
    """The driver's message (first line) rather than SQLAlchemy's wrapper with the SQL."""
    orig = getattr(e, "orig", None)
    lines = str(orig if orig is not None else e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# --------------------------------------------------------------------------- read-only SQL

_SQLITE_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
#: PRAGMAs that only report (without an argument): for users exploring the schema.
_SQLITE_READ_PRAGMAS = {"table_info", "table_xinfo", "table_list", "index_list", "index_info", "database_list"}


def _sqlite_authorizer(action: int, arg1: str | None, arg2: str | None, _db: str | None, _trigger: str | None) -> int:
    if action in _SQLITE_READ_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and arg1 in _SQLITE_READ_PRAGMAS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def _sqlite_query(raw: sqlite3.Connection, sql: str, params: Any) -> tuple[list[str], list[tuple]]:
    raw.set_authorizer(_sqlite_authorizer)
    try:
        cur = raw.execute(sql, params if params is not None else ())
        cols = [d[0] for d in cur.description or ()]
        return cols, [tuple(r) for r in cur.fetchall()]
    except sqlite3.DatabaseError as e:
        if "not authorized" in str(e):
            raise QueryError(f"refused: the log is read-only here and this statement would modify it ({e})") from e
        raise QueryError(f"query failed: {e}") from e
    except sqlite3.ProgrammingError as e:  # e.g. "You can only execute one statement at a time."
        raise QueryError(f"query failed: {e}") from e
    finally:
        raw.set_authorizer(None)
        if raw.in_transaction:
            raw.rollback()


def _pg_query(raw: Any, sql: str, params: Any) -> tuple[list[str], list[tuple]]:
    import psycopg

    try:
        with raw.cursor() as cur:
            cur.execute("SET TRANSACTION READ ONLY")
            cur.execute(sql, params, prepare=True)  # prepared: exactly one statement
            cols = [d.name for d in cur.description or ()]
            return cols, [tuple(r) for r in cur.fetchall()] if cur.description else []
    except psycopg.errors.ReadOnlySqlTransaction as e:
        raise QueryError(f"refused: the log is read-only here and this statement would modify it ({e})") from e
    except psycopg.Error as e:
        raise QueryError(f"query failed: {e}") from e
    finally:
        raw.rollback()
