"""reckon's event store: the append-only SQL log of every event, its views, and replay.

``EventLog`` appends and reads events (SQLite or PostgreSQL); ``store.metrics`` rebuilds
per-step metrics from the log; ``store.cli`` holds ``reckon sql`` and ``reckon replay``.
docs/store.md documents the schema and views.
"""

from store.errors import (
    LogReadError,
    LogWriteError,
    MalformedRowError,
    NotAnEventLogError,
    QueryError,
    RunNotFoundError,
    StoreError,
)
from store.log import DB_FILENAME, EventLog, resolve_url

__all__ = [
    "DB_FILENAME",
    "EventLog",
    "LogReadError",
    "LogWriteError",
    "MalformedRowError",
    "NotAnEventLogError",
    "QueryError",
    "RunNotFoundError",
    "StoreError",
    "resolve_url",
]
