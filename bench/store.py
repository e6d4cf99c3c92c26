"""Event-log append throughput: EventLog.append vs raw SQLAlchemy executemany.

    python -m bench.store [--events 3000] [--batch 500] [--pg-url postgresql+psycopg://root@127.0.0.1/test]

Payloads are realistic TrajectoryCompleted events: ~2 KB of response text and five token
arrays of ~1000 entries (prompt ids, response ids, logprobs, loss mask, versions). The
recorder path (``EventLog.append``: serialize each envelope to payload JSON + array blob,
lock the log head, skip duplicates, number and insert the batch) is compared with the
floor: raw SQLAlchemy Core ``executemany`` of the same, already serialized rows into the
same table definition on the same kind of database, one transaction per batch. Reported:
events/s of each (best of ``--repeat`` runs), and their ratio (goal >= 0.8).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from store import EventLog
from store.rows import envelope_to_row
from store.schema import events
from store.testing import Emitter, trajectory


def make_events(n: int, run_id: str) -> list:
    rng = np.random.default_rng(0)
    emit = Emitter(run_id)
    return [emit("generator-0", trajectory(f"r{i}", n_prompt=100, n_response=1000, text_chars=2000, rng=rng)) for i in range(n)]


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def time_append(url: str, n: int, batch: int) -> float:
    """Events/s through EventLog.append into a fresh log at ``url``."""
    envs = make_events(n, f"bench-{uuid.uuid4().hex[:8]}")
    with EventLog.open(url) as log:
        t0 = time.perf_counter()
        for b in _batches(envs, batch):
            log.append(b)
        dt = time.perf_counter() - t0
        assert log.last_position() == n
    return n / dt


def time_raw(url: str, n: int, batch: int) -> float:
    """Rows/s of raw executemany of pre-serialized rows into the same ``events`` table."""
    rows = [envelope_to_row(e) for e in make_events(n, f"raw-{uuid.uuid4().hex[:8]}")]  # not timed
    for i, row in enumerate(rows, 1):
        row["position"] = i
    EventLog.open(url).close()  # same tables, indexes, pragmas (WAL)
    engine = sa.create_engine(url)
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _wal(dbapi_conn, _rec) -> None:  # the same durability settings as the log
            dbapi_conn.execute("PRAGMA synchronous=NORMAL")

    t0 = time.perf_counter()
    for b in _batches(rows, batch):
        with engine.begin() as conn:
            conn.execute(events.insert(), b)
    dt = time.perf_counter() - t0
    engine.dispose()
    return n / dt


def run_backend(name: str, fresh_url, n: int, batch: int, repeat: int) -> None:
    append = max(time_append(fresh_url(), n, batch) for _ in range(repeat))
    raw = max(time_raw(fresh_url(), n, batch) for _ in range(repeat))
    print(
        f"{name:<10} EventLog.append {append:10.0f} events/s   raw executemany {raw:10.0f} rows/s   "
        f"ratio {append / raw:.2f}  ({n} events, batches of {batch})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--pg-url", default="postgresql+psycopg://root@127.0.0.1:5432/test")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        counter = iter(range(1000))
        run_backend("sqlite", lambda: f"sqlite:///{Path(tmp, f'{next(counter)}.db')}", args.events, args.batch, args.repeat)

    admin = sa.create_engine(args.pg_url, connect_args={"connect_timeout": 3})
    try:
        admin.connect().close()
    except sa.exc.OperationalError as e:
        print(f"postgresql skipped: {args.pg_url} unreachable ({str(e.orig).strip().splitlines()[0]})")
        return
    schemas: list[str] = []

    def fresh_pg() -> str:
        schema = f"reckon_bench_{uuid.uuid4().hex[:10]}"
        with admin.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
        schemas.append(schema)
        return f"{args.pg_url}?options=-csearch_path%3D{schema}"

    try:
        run_backend("postgresql", fresh_pg, args.events, args.batch, args.repeat)
    finally:
        with admin.begin() as conn:
            for schema in schemas:
                conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


if __name__ == "__main__":
    main()
