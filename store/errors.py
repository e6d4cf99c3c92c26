"""The store's error hierarchy: every storage failure reaches callers as one of these.

Database-driver exceptions (sqlite3, psycopg, SQLAlchemy) are translated once, at the
:class:`~store.log.EventLog` boundary, and chained (``raise ... from e``) so the driver's
detail stays available in the traceback.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error the event store raises."""


class NotAnEventLogError(StoreError):
    """The database is corrupt, not a database, or holds something other than a reckon log."""


class LogWriteError(StoreError):
    """An append or run update could not be committed; nothing of that call was written."""


class LogReadError(StoreError):
    """Reading from the log failed (connection lost, locked past the busy timeout, ...)."""


class MalformedRowError(LogReadError):
    """A stored row does not decode into a valid event; the message names its position."""


class RunNotFoundError(StoreError):
    """The run id asked for is not in the log."""


class QueryError(StoreError):
    """A user SQL query failed or tried to modify the log (queries are read-only)."""
