"""Tables and SQL views of the event log (docs/store.md documents them for users).

One append-only ``events`` table holds every event of every run; ``runs`` describes the
runs; ``log_head`` is a single-row counter holding the last assigned ``position`` (the
append transaction locks it, which is what makes positions gap-free in commit order);
``reckon_meta`` marks the database as a reckon log and records the schema version.

The views turn payload JSON into typed columns so users never need the payload layout.
They are generated per dialect from one spec (:data:`VIEWS`) so SQLite (JSON1) and
PostgreSQL (JSONB) return the same columns with the same values; booleans are 0/1
integers on both so ``AVG(correct)`` works everywhere.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    cast,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import UserDefinedType

#: Bump when tables or views change; a log with another version is upgraded or refused.
SCHEMA_VERSION = 1
#: The value of reckon_meta["kind"] that marks a reckon event log.
LOG_KIND = "reckon-event-log"


class _JsonbFromText(UserDefinedType):
    """JSONB column bound from already-serialized JSON text (``CAST(:p AS JSONB)``).

    The store serializes payloads itself (it must sanitize values JSON cannot hold), so
    the driver's JSON adapter must not serialize the text a second time.
    """

    cache_ok = True

    def get_col_spec(self, **kw: object) -> str:
        return "JSONB"

    def bind_expression(self, bindvalue):  # type: ignore[no-untyped-def]
        return cast(bindvalue, JSONB)


#: JSON text column: TEXT on SQLite (JSON1 functions read it), JSONB on PostgreSQL.
JsonText = Text().with_variant(_JsonbFromText(), "postgresql")
#: 64-bit integer primary key; plain INTEGER on SQLite so it aliases the rowid (fast).
_Position = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

events = Table(
    "events",
    metadata,
    Column("position", _Position, primary_key=True, autoincrement=False),  # global, gap-free
    Column("event_id", String(128), nullable=False, unique=True),
    Column("run_id", String(128), nullable=False),
    Column("type", String(64), nullable=False),
    Column("stream_id", String(256)),  # trajectory / group / step the event belongs to
    Column("source", String(256), nullable=False),  # actor instance
    Column("seq", BigInteger, nullable=False),  # per source
    Column("ts", Double, nullable=False),  # unix seconds at emission
    Column("schema_version", Integer, nullable=False),
    Column("causation_id", String(128)),
    Column("payload", JsonText, nullable=False),  # non-array fields (see store/rows.py)
    Column("blob", LargeBinary),  # msgpack of array fields and JSON-lossy fields
    Index("ix_events_run_type_pos", "run_id", "type", "position"),
    Index("ix_events_run_stream", "run_id", "stream_id"),
    Index("ix_events_run_source_seq", "run_id", "source", "seq"),
)

runs = Table(
    "runs",
    metadata,
    Column("run_id", String(128), primary_key=True),
    Column("name", String(256), nullable=False),
    Column("created", Double, nullable=False),  # unix seconds
    Column("config", JsonText, nullable=False),
    Column("status", String(32), nullable=False),  # running | ok | interrupted | failed
    Column("run_dir", Text, nullable=False),
)

log_head = Table(
    "log_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1
    Column("position", BigInteger, nullable=False),  # last assigned position (0: empty)
)

reckon_meta = Table(
    "reckon_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)


# --------------------------------------------------------------------------- views
#
# A column spec is (name, kind, path): ``path`` is a payload key or a tuple of keys.
# Kinds: text, int, float, bool (0/1), len (JSON array length), alen (stored array
# length, see rows.py), nerr (tool calls with status != ok), json (nested value as text).

_TRAJ = [
    ("rollout_id", "text", "rollout_id"),
    ("group_id", "text", "group_id"),
    ("step", "int", "step"),
    ("stage", "text", "stage"),
    ("problem_id", "text", "problem_id"),
    ("generator", "text", "generator"),
    ("n_prompt_tokens", "alen", "prompt_ids"),
    ("n_response_tokens", "alen", "response_ids"),
    ("turns", "int", "turns"),
    ("n_tool_calls", "len", "tool_calls"),
    ("n_tool_errors", "nerr", "tool_calls"),
    ("finish_reason", "text", "finish_reason"),
    ("seconds", "float", "seconds"),
    ("gold", "text", "answer"),
    ("response_text", "text", "response_text"),
]
_REWARD = [
    ("rollout_id", "text", "rollout_id"),
    ("group_id", "text", "group_id"),
    ("step", "int", "step"),
    ("stage", "text", "stage"),
    ("reward", "float", "reward"),
    ("correct", "bool", "correct"),
    ("extracted", "text", "extracted"),
    ("gold", "text", "gold"),
    ("method", "text", "method"),
    ("seconds", "float", "seconds"),
    ("answer_tags", "int", "answer_tags"),
    ("turns", "int", "turns"),
]
_TOOL_REQ = [
    ("call_id", "text", "call_id"),
    ("rollout_id", "text", "rollout_id"),
    ("turn", "int", "turn"),
    ("executor", "text", "executor"),
    ("code", "text", "code"),
    ("timeout_s", "float", "timeout_s"),
]
_TOOL_DONE = [
    ("status", "text", "status"),
    ("stdout", "text", "stdout"),
    ("stderr", "text", "stderr"),
    ("exit_code", "int", "exit_code"),
    ("signal", "int", "signal"),
    ("duration_s", "float", "duration_s"),
    ("tool_text", "text", "text"),
]
#: train_steps columns read from TrainStepCompleted.metrics: column -> metric key.
#: The learner emits these keys (namespaced like ``actor/grad_norm``).
TRAIN_METRIC_COLUMNS = {
    "grad_norm": "actor/grad_norm",
    "clip_frac_low": "actor/clip_frac_low",
    "clip_frac_high": "actor/clip_frac_high",
    "clip_frac_dual": "actor/clip_frac_dual",
    "entropy": "actor/entropy",
    "lr": "actor/lr",
}
_TRAIN = [
    ("step", "int", "step"),
    ("stage", "text", "stage"),
    ("kind", "text", "kind"),
    ("loss", "float", "loss"),
    ("n_sequences", "int", "n_sequences"),
    ("n_tokens", "int", "n_tokens"),
    ("seconds", "float", "seconds"),
    ("weights_version", "int", "weights_version"),
    *[(col, "float", ("metrics", key)) for col, key in TRAIN_METRIC_COLUMNS.items()],
    ("metrics", "json", "metrics"),
]

#: Simple views: name -> (event type, columns). Joined views are written out below.
_SIMPLE_VIEWS: dict[str, tuple[str, list[tuple[str, str, str | tuple[str, ...]]]]] = {
    "rewards": ("RewardAssigned", _REWARD),
    "train_steps": ("TrainStepCompleted", _TRAIN),
    "batches": (
        "BatchFormed",
        [
            ("step", "int", "step"),
            ("stage", "text", "stage"),
            ("kind", "text", "kind"),
            ("n_sequences", "len", "rollout_ids"),
            ("n_tokens", "alen", "input_ids"),
            ("lr", "float", "lr"),
            ("optimizer_reset", "bool", "optimizer_reset"),
        ],
    ),
    "groups": (
        "GroupResampled",
        [
            ("group_id", "text", "group_id"),
            ("step", "int", "step"),
            ("mode", "text", "mode"),
            ("reason", "text", "reason"),
            ("n_kept", "len", "kept"),
            ("n_dropped", "len", "dropped"),
        ],
    ),
    "capacity": (
        "CapacityReported",
        [
            ("kind", "text", "kind"),
            ("free_tokens", "int", "free_tokens"),
            ("total_tokens", "int", "total_tokens"),
            ("free_slots", "int", "free_slots"),
            ("total_slots", "int", "total_slots"),
            ("running", "int", "running"),
            ("queued", "int", "queued"),
            ("busy_s", "float", "busy_s"),
        ],
    ),
    "stages": (
        "StageStarted",
        [
            ("stage", "text", "stage"),
            ("stage_index", "int", "index"),
            ("kind", "text", "kind"),
            ("steps", "int", "steps"),
            ("max_tokens", "int", "max_tokens"),
            ("max_turns", "int", "max_turns"),
            ("prompts_per_step", "int", "prompts_per_step"),
            ("rollouts_per_prompt", "int", "rollouts_per_prompt"),
            ("group_size", "int", "group_size"),
            ("lr", "float", "lr"),
            ("optimizer_reset", "bool", "optimizer_reset"),
            ("n_problems", "int", "n_problems"),
        ],
    ),
    "evals": (
        "EvalCompleted",
        [
            ("dataset", "text", "dataset"),
            ("step", "int", "step"),
            ("weights_version", "int", "weights_version"),
            ("k", "int", "k"),
            ("temperature", "float", "temperature"),
            ("pass_at_1", "float", "pass_at_1"),
            ("n_problems", "int", "n_problems"),
            ("mean_response_tokens", "float", "mean_response_tokens"),
            ("mean_tool_calls", "float", "mean_tool_calls"),
        ],
    ),
    "weights": (
        "WeightsPublished",
        [
            ("version", "int", "version"),
            ("step", "int", "step"),
            ("path", "text", "path"),
            ("sha256", "text", "sha256"),
        ],
    ),
    "actor_errors": (
        "ActorError",
        [
            ("role", "text", "role"),
            ("error_type", "text", "error_type"),
            ("message", "text", "message"),
            ("traceback", "text", "traceback"),
            ("fatal", "bool", "fatal"),
        ],
    ),
}

VIEW_NAMES = ("trajectories", "tool_calls", *_SIMPLE_VIEWS)


def _sqlite_path(path: str | tuple[str, ...]) -> str:
    keys = (path,) if isinstance(path, str) else path
    return "$" + "".join(f'."{k}"' for k in keys)


def _expr(dialect: str, alias: str, kind: str, path: str | tuple[str, ...]) -> str:
    """SQL for one payload value of event row ``alias`` as a typed column."""
    if dialect == "sqlite":
        p = f"'{_sqlite_path(path)}'"
        val = f"json_extract({alias}.payload, {p})"
        return {
            "text": val,
            "int": f"CAST({val} AS INTEGER)",
            "bool": f"CAST({val} AS INTEGER)",
            "float": f"CAST({val} AS REAL)",
            "len": f"json_array_length({alias}.payload, {p})",
            "alen": f"CAST(json_extract({alias}.payload, '{_sqlite_path((path, 'len'))}') AS INTEGER)",
            "nerr": f"(SELECT COUNT(*) FROM json_each({alias}.payload, {p}) tc "
            f"WHERE json_extract(tc.value, '$.status') <> 'ok')",
            "json": f"json(json_extract({alias}.payload, {p}))",
        }[kind]
    keys = (path,) if isinstance(path, str) else path
    node = f"{alias}.payload" + "".join(f"->'{k}'" for k in keys[:-1])
    text = f"{node}->>'{keys[-1]}'"
    obj = f"{node}->'{keys[-1]}'"
    return {
        "text": text,
        "int": f"CAST({text} AS BIGINT)",
        "bool": f"CAST(CAST({text} AS BOOLEAN) AS INTEGER)",
        "float": f"CAST({text} AS DOUBLE PRECISION)",
        "len": f"jsonb_array_length({obj})",
        "alen": f"CAST({obj}->>'len' AS BIGINT)",
        "nerr": f"(SELECT COUNT(*) FROM jsonb_array_elements({obj}) tc WHERE tc->>'status' <> 'ok')",
        "json": f"CAST({obj} AS TEXT)",
    }[kind]


def _cols(dialect: str, alias: str, spec: list) -> str:
    return ",\n  ".join(f"{_expr(dialect, alias, kind, path)} AS {name}" for name, kind, path in spec)


def _latest(alias: str, of: str, typ: str, extra: str = "") -> str:
    """Join condition: row ``alias`` is the latest ``typ`` event in ``of``'s stream."""
    return (
        f"{alias}.position = (SELECT MAX(x.position) FROM events x WHERE x.run_id = {of}.run_id "
        f"AND x.stream_id = {of}.stream_id AND x.type = '{typ}'{extra})"
    )


def view_sql(dialect: str) -> dict[str, str]:
    """``CREATE VIEW`` statements (name -> SQL) for ``dialect`` ("sqlite" or "postgresql")."""
    head = "e.position, e.run_id, e.ts, e.source"
    out: dict[str, str] = {}
    reward_cols = _cols(dialect, "r", [("reward", "float", "reward"), ("correct", "bool", "correct")])
    out["trajectories"] = (
        f"SELECT {head},\n  {_cols(dialect, 'e', _TRAJ)},\n  {reward_cols}\n"
        f"FROM events e LEFT JOIN events r ON {_latest('r', 'e', 'RewardAssigned')}\n"
        "WHERE e.type = 'TrajectoryCompleted'"
    )
    same_call = f" AND {_expr(dialect, 'x', 'text', 'call_id')} = {_expr(dialect, 'e', 'text', 'call_id')}"
    out["tool_calls"] = (
        f"SELECT {head},\n  {_cols(dialect, 'e', _TOOL_REQ)},\n  {_cols(dialect, 'c', _TOOL_DONE)},\n"
        "  e.ts AS requested_ts, c.ts AS completed_ts\n"
        f"FROM events e LEFT JOIN events c ON {_latest('c', 'e', 'ToolCallCompleted', same_call)}\n"
        "WHERE e.type = 'ToolCallRequested'"
    )
    for name, (typ, spec) in _SIMPLE_VIEWS.items():
        out[name] = f"SELECT {head},\n  {_cols(dialect, 'e', spec)}\nFROM events e WHERE e.type = '{typ}'"
    return {name: f"CREATE VIEW {name} AS\n{body}" for name, body in out.items()}
