"""The event log's storage contract, run against SQLite memory, SQLite file and PostgreSQL.

One abstract test class (:class:`StoreContract`) states what every backend must do; the
subclasses only say how to open a fresh log. PostgreSQL tests use a throwaway schema per
test in the ``test`` database on 127.0.0.1:5432 and skip, saying why, when the server is
unreachable.
"""

from __future__ import annotations

import math
import multiprocessing
import threading
import time
import uuid

import numpy as np
import pytest
import sqlalchemy as sa

from protocol.events import Heartbeat, TrainStepCompleted, TrajectoryCompleted
from store import EventLog, LogWriteError, MalformedRowError, NotAnEventLogError, QueryError, RunNotFoundError
from store.metrics import format_step, iter_step_metrics, step_metrics
from store.testing import Emitter, synthetic_run, trajectory

PG_BASE = "postgresql+psycopg://{user}@127.0.0.1:5432/test"


def _heartbeats(run_id: str, source: str, n: int) -> list:
    emit = Emitter(run_id)
    return [emit(source, Heartbeat(uptime_s=float(i), state="ok")) for i in range(n)]


def _write_batches(url: str, run_id: str, source: str, batches: int, size: int) -> None:
    """One writer: ``batches`` appends of ``size`` events (runs in a child process)."""
    log = EventLog.open(url)
    envs = _heartbeats(run_id, source, batches * size)
    for i in range(batches):
        log.append(envs[i * size : (i + 1) * size])
    log.close()


class StoreContract:
    """What every backend of the event log must do. Subclasses implement :meth:`open`."""

    #: Writers of the race test run as processes (a real second connection/client).
    processes = True

    def open(self) -> EventLog:
        raise NotImplementedError

    @pytest.fixture
    def log(self):
        log = self.open()
        yield log
        log.close()

    # ------------------------------------------------------------------ append / read

    def test_round_trip_restores_arrays_and_lossy_values(self, log: EventLog) -> None:
        emit = Emitter("rt")
        traj = trajectory("ro-1", n_response=1000, text_chars=2000)
        odd = TrajectoryCompleted(**{**{f: getattr(traj, f) for f in traj.__dataclass_fields__},
                                     "response_text": "nul\x00byte ünïcode"})  # fmt: skip
        step = TrainStepCompleted(step=1, stage="rl1", kind="rl", loss=float("nan"), metrics={"inf": -math.inf},
                                  n_sequences=1, n_tokens=2, seconds=0.5, weights_version=1)  # fmt: skip
        envs = [emit("g", traj), emit("g", odd), emit("l", step)]
        assert log.append(envs) == 3
        got = list(log.read(run_id="rt"))
        assert [p for p, _ in got] == [1, 2, 3]
        for (_, a), b in zip(got, envs):
            assert (a.event_id, a.type, a.source, a.seq, a.ts, a.causation_id) == (
                b.event_id, b.type, b.source, b.seq, b.ts, b.causation_id)  # fmt: skip
        t0, t1, s = (e.payload for _, e in got)
        for name in ("prompt_ids", "response_ids", "logprobs", "loss_mask", "versions"):
            assert getattr(t0, name).dtype == getattr(traj, name).dtype
            np.testing.assert_array_equal(getattr(t0, name), getattr(traj, name))
        assert t0.response_text == traj.response_text and t0.tool_calls == traj.tool_calls
        assert t1.response_text == "nul\x00byte ünïcode"
        assert math.isnan(s.loss) and s.metrics == {"inf": -math.inf}

    def test_duplicates_are_no_ops_and_take_no_position(self, log: EventLog) -> None:
        envs = _heartbeats("dup", "a", 5)
        assert log.append(envs[:3]) == 3
        assert log.append(envs[:3]) == 0
        assert log.append([envs[3], envs[1], envs[3], envs[4]]) == 2  # mixed, and repeated within a batch
        assert log.append([]) == 0
        assert [p for p, _ in log.read()] == [1, 2, 3, 4, 5]
        assert [e.seq for _, e in log.read()] == [0, 1, 2, 3, 4]
        assert log.last_position() == 5 and log.last_position("dup") == 5 and log.last_position("other") == 0

    def test_read_filters(self, log: EventLog) -> None:
        log.append(list(synthetic_run("f1", steps=1)) + list(synthetic_run("f2", steps=1)))
        f1 = list(log.read(run_id="f1"))
        assert f1 and all(e.run_id == "f1" for _, e in f1)
        types = {e.type for _, e in log.read(run_id="f2", types=["RewardAssigned", "TrainStepCompleted"])}
        assert types == {"RewardAssigned", "TrainStepCompleted"}
        positions = [p for p, _ in log.read()]
        assert positions == list(range(1, len(positions) + 1))
        assert [p for p, _ in log.read(after=5, limit=3)] == [6, 7, 8]
        assert len(list(log.read(limit=0))) == 0
        rollout = [e for _, e in log.read(stream_id="s1g0r0")]
        assert {e.type for e in rollout} >= {"RolloutRequested", "TrajectoryCompleted", "RewardAssigned"}
        assert log.run_ids() == ["f1", "f2"] and log.resolve_run() == "f2"
        with pytest.raises(RunNotFoundError, match="nope"):
            log.resolve_run("nope")

    def test_unstorable_payload_is_a_write_error_and_writes_nothing(self, log: EventLog) -> None:
        emit = Emitter("bad")
        ok = emit("a", Heartbeat(uptime_s=1.0, state="ok"))
        bad = emit("a", TrainStepCompleted(step=1, stage="s", kind="rl", loss=0.0, metrics={"x": object()},
                                           n_sequences=1, n_tokens=1, seconds=0.0, weights_version=0))  # fmt: skip
        with pytest.raises(LogWriteError, match=bad.event_id):
            log.append([ok, bad])
        assert log.last_position() == 0

    def test_malformed_row_names_its_position(self, log: EventLog) -> None:
        log.append(_heartbeats("m", "a", 2))
        with log.engine.begin() as conn:  # damage one row behind the API's back
            conn.execute(sa.text("UPDATE events SET type = 'NoSuchEvent' WHERE position = 2"))
        with pytest.raises(MalformedRowError, match=r"position 2 .*NoSuchEvent"):
            list(log.read())

    # ------------------------------------------------------------------ runs

    def test_runs(self, log: EventLog) -> None:
        assert log.ensure_run("r1", name="demo", config={"lr": 1e-6}, run_dir="/tmp/r1") is True
        assert log.ensure_run("r1", name="other") is False  # a restarted recorder: no change
        log.set_run_status("r1", "ok")
        [run] = log.runs()
        assert (run["run_id"], run["name"], run["status"], run["config"], run["run_dir"]) == (
            "r1", "demo", "ok", {"lr": 1e-6}, "/tmp/r1")  # fmt: skip
        with pytest.raises(RunNotFoundError, match="r2"):
            log.set_run_status("r2", "ok")

    # ------------------------------------------------------------------ views

    def test_views_expose_payload_fields(self, log: EventLog) -> None:
        envs = list(synthetic_run("v", steps=2, groups=2, group_size=4))
        log.append(envs)
        trajs = {e.payload.rollout_id: e.payload for e in envs if e.type == "TrajectoryCompleted"}
        rewards = {e.payload.rollout_id: e.payload for e in envs if e.type == "RewardAssigned"}
        cols, rows = log.query(
            "SELECT rollout_id, step, n_prompt_tokens, n_response_tokens, n_tool_calls, n_tool_errors, reward, "
            "correct, response_text FROM trajectories WHERE run_id = 'v' ORDER BY position"
        )
        assert cols[0] == "rollout_id" and len(rows) == len(trajs) == 16
        for rid, step, n_p, n_r, n_calls, n_err, reward, correct, text in rows:
            t, r = trajs[rid], rewards[rid]
            assert (step, n_p, n_r, n_calls, text) == (t.step, 50, t.response_ids.shape[0], len(t.tool_calls), t.response_text)
            assert n_err == sum(c["status"] != "ok" for c in t.tool_calls)
            assert (reward, correct) == (r.reward, int(r.correct))
        _, calls = log.query("SELECT call_id, status, stdout, duration_s, completed_ts >= requested_ts FROM tool_calls")
        done = {e.payload.call_id: e.payload for e in envs if e.type == "ToolCallCompleted"}
        assert len(calls) == len(done) > 0
        for call_id, status, stdout, duration, ordered in calls:
            assert (status, stdout, duration, ordered) == (done[call_id].status, done[call_id].stdout, 0.002, 1)
        _, acc = log.query("SELECT step, AVG(correct), COUNT(*) FROM rewards GROUP BY step ORDER BY step")
        for step, mean, n in acc:
            expect = [r.correct for r in rewards.values() if r.step == step]
            assert n == len(expect) and mean == pytest.approx(sum(expect) / len(expect))
        _, steps = log.query("SELECT step, kind, loss, n_sequences, grad_norm, clip_frac_high FROM train_steps ORDER BY step")
        logged = [e.payload for e in envs if e.type == "TrainStepCompleted"]
        assert [(s.step, s.kind, s.loss, s.n_sequences, s.metrics["actor/grad_norm"], 0.01) for s in logged] == [
            tuple(row) for row in steps]  # fmt: skip
        _, batches = log.query("SELECT step, n_sequences, n_tokens FROM batches ORDER BY step")
        assert batches == [(1, 4, 32), (2, 4, 32)]  # 2 groups x 2 kept, 8 tokens each
        _, groups = log.query("SELECT COUNT(*), SUM(n_kept), SUM(n_dropped) FROM groups")
        assert groups == [(4, 8, 8)]

    def test_query_is_read_only(self, log: EventLog) -> None:
        log.append(_heartbeats("q", "a", 3))
        for stmt in ("DELETE FROM events", "UPDATE runs SET status = 'x'", "DROP VIEW trajectories",
                     "CREATE TABLE t (x INT)", "SELECT 1; DELETE FROM events"):  # fmt: skip
            with pytest.raises(QueryError):
                log.query(stmt)
        assert log.query("SELECT COUNT(*) AS n FROM events") == (["n"], [(3,)])
        with pytest.raises(QueryError, match="(?i)syntax"):
            log.query("SELEC nothing")

    # ------------------------------------------------------------------ concurrency

    def test_two_concurrent_writers_get_gap_free_positions(self, log: EventLog) -> None:
        batches, size = 20, 25
        total = 2 * batches * size
        seen: list[int] = []

        def tail() -> None:  # a consumer following the log must never see a later fill-in
            deadline = time.monotonic() + 60
            while len(seen) < total and time.monotonic() < deadline:
                seen.extend(p for p, _ in log.read(after=seen[-1] if seen else 0))

        reader = threading.Thread(target=tail)
        reader.start()
        if self.processes:
            ctx = multiprocessing.get_context("fork")
            writers = [ctx.Process(target=_write_batches, args=(self.url, "race", f"w{i}", batches, size)) for i in (0, 1)]
        else:
            writers = [
                threading.Thread(target=lambda s=f"w{i}": [log.append(b) for b in _chunks(_heartbeats("race", s, batches * size), size)])
                for i in (0, 1)
            ]  # fmt: skip
        for w in writers:
            w.start()
        for w in writers:
            w.join(60)
            assert getattr(w, "exitcode", 0) == 0
        reader.join(60)
        assert seen == list(range(1, total + 1))
        per_source: dict[str, list[int]] = {}
        for _, env in log.read():
            per_source.setdefault(env.source, []).append(env.seq)
        assert per_source == {"w0": list(range(batches * size)), "w1": list(range(batches * size))}

    # ------------------------------------------------------------------ replay

    def test_replaying_the_log_reproduces_derived_state(self, log: EventLog) -> None:
        envs = list(synthetic_run("replay", steps=3))
        live = [format_step(m) for m in iter_step_metrics(envs)]  # what the run printed
        # at-least-once delivery: the recorder appends some events twice
        log.append(envs[:40])
        log.append(envs[20:])
        replayed = step_metrics(log, "replay")
        assert [format_step(m) for m in replayed] == live and len(live) == 3
        assert replayed == list(iter_step_metrics(envs))
        rewards = [e.payload for e in envs if e.type == "RewardAssigned" and e.payload.step == 2]
        assert replayed[1]["reward"] == pytest.approx(sum(r.reward for r in rewards) / len(rewards))
        assert replayed[1]["n_kept"] == 4


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class TestSQLiteMemory(StoreContract):
    processes = False

    def open(self) -> EventLog:
        return EventLog.open("sqlite://")


class TestSQLiteFile(StoreContract):
    @pytest.fixture(autouse=True)
    def _path(self, tmp_path):
        self.url = f"sqlite:///{tmp_path / 'events.db'}"

    def open(self) -> EventLog:
        return EventLog.open(self.url)


def _pg_admin_url() -> str | None:
    """A URL of the local server's ``test`` database, or None when unreachable."""
    for user in ("root", "postgres"):
        url = PG_BASE.format(user=user)
        engine = sa.create_engine(url, connect_args={"connect_timeout": 2})
        try:
            with engine.connect():
                return url
        except sa.exc.OperationalError:
            continue
        finally:
            engine.dispose()
    return None


@pytest.mark.postgres
class TestPostgreSQL(StoreContract):
    @pytest.fixture(autouse=True)
    def _schema(self):
        admin = _pg_admin_url()
        if admin is None:
            pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (database 'test', user root or postgres)")
        schema = f"reckon_test_{uuid.uuid4().hex[:12]}"  # one per test: tests never collide
        engine = sa.create_engine(admin)
        with engine.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
        self.url = f"{admin}?options=-csearch_path%3D{schema}"
        yield
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()

    def open(self) -> EventLog:
        return EventLog.open(self.url)

    def test_foreign_database_is_refused(self) -> None:
        engine = sa.create_engine(self.url)
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE customers (id INT)"))
        engine.dispose()
        with pytest.raises(NotAnEventLogError, match="customers"):
            EventLog.open(self.url)
