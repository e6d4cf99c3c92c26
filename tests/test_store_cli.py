"""``reckon sql`` / ``reckon replay`` over an SQLite run directory, and bad-database errors."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from store import EventLog, LogWriteError, NotAnEventLogError
from store.cli import app, replay_app
from store.metrics import format_step, iter_step_metrics
from store.testing import synthetic_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, list]:
    run = tmp_path_factory.mktemp("run")
    envs = list(synthetic_run("demo", steps=2))
    with EventLog.open(run) as log:  # a directory: the log is its events.db
        log.ensure_run("demo", name="demo", config={}, run_dir=str(run))
        log.append(envs)
    return run, envs


def _cli() -> typer.Typer:
    root = typer.Typer()
    root.command("sql")(app)
    root.add_typer(replay_app, name="replay")
    return root


def _invoke(*args: str):
    return CliRunner().invoke(_cli(), list(args))


def _fingerprint(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.glob("events.db*"))}


def test_sql_formats(run_dir) -> None:
    run, envs = run_dir
    n_traj = sum(e.type == "TrajectoryCompleted" for e in envs)
    q = "SELECT step, COUNT(*) AS n FROM trajectories GROUP BY step ORDER BY step"
    out = _invoke("sql", str(run), q, "--format", "json")
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    assert [r["step"] for r in rows] == [1, 2] and sum(r["n"] for r in rows) == n_traj
    out = _invoke("sql", str(run / "events.db"), q, "-f", "csv")
    assert out.stdout.splitlines()[0] == "step,n" and len(out.stdout.splitlines()) == 3
    out = _invoke("sql", "--url", f"sqlite:///{run / 'events.db'}", "SELECT COUNT(*) AS n FROM rewards")
    assert out.exit_code == 0 and str(n_traj) in out.stdout


def test_sql_refuses_writes_and_leaves_the_log_unchanged(run_dir) -> None:
    run, _ = run_dir
    before = _fingerprint(run)
    for stmt in ("DELETE FROM events", "DROP TABLE runs", "UPDATE runs SET status='x'", "PRAGMA user_version=7"):
        out = _invoke("sql", str(run), stmt)
        assert out.exit_code == 1 and "error:" in out.output, (stmt, out.output)
    assert _fingerprint(run) == before
    out = _invoke("sql", str(run), "SELECT COUNT(*) FROM events")
    assert out.exit_code == 0


def test_sql_usage_errors(run_dir, tmp_path) -> None:
    run, _ = run_dir
    assert _invoke("sql", str(run)).exit_code == 2  # no statement
    out = _invoke("sql", str(tmp_path / "missing.db"), "SELECT 1")
    assert out.exit_code == 1 and "missing.db" in out.output


def test_replay_metrics_prints_the_live_lines(run_dir) -> None:
    run, envs = run_dir
    before = _fingerprint(run)
    out = _invoke("replay", "metrics", str(run))
    assert out.exit_code == 0, out.output
    assert out.stdout.splitlines() == [format_step(m) for m in iter_step_metrics(envs)]
    out = _invoke("replay", "metrics", str(run), "--run-id", "nope")
    assert out.exit_code == 1 and "nope" in out.output
    assert _fingerprint(run) == before


def test_replay_show_renders_a_trajectory(run_dir) -> None:
    run, envs = run_dir
    rid = next(e.payload.rollout_id for e in envs if e.type == "TrajectoryCompleted" and e.payload.tool_calls)
    out = _invoke("replay", "show", rid, str(run))
    assert out.exit_code == 0, out.output
    code = next(e.payload.code for e in envs if e.type == "ToolCallRequested" and e.payload.rollout_id == rid)
    assert f"trajectory {rid}" in out.stdout and code in out.stdout and "reward " in out.stdout
    assert _invoke("replay", "show", "no-such-rollout", str(run)).exit_code == 1


def test_readonly_log_refuses_appends(run_dir) -> None:
    run, envs = run_dir
    with EventLog.open(run, readonly=True) as log:
        with pytest.raises(LogWriteError, match="read-only"):
            log.append(envs[:1])
        assert log.last_position() == len(envs)


def test_corrupt_file_is_refused(tmp_path) -> None:
    bad = tmp_path / "events.db"
    bad.write_bytes(b"this is not a database, just text " * 200)
    for readonly in (False, True):
        with pytest.raises(NotAnEventLogError, match="corrupt or not an SQLite database"):
            EventLog.open(bad, readonly=readonly)
    assert bad.read_bytes().startswith(b"this is not")  # left as it was


def test_foreign_sqlite_database_is_refused(tmp_path) -> None:
    path = tmp_path / "shop.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER)")
    with pytest.raises(NotAnEventLogError, match="not a reckon event log.*customers"):
        EventLog.open(path)
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    with pytest.raises(NotAnEventLogError, match="empty"):
        EventLog.open(empty, readonly=True)
