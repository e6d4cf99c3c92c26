"""``reckon replay train``: re-running the learner from a run's logged batches reproduces
its logged losses, catches a tampered log, and never writes to the log.

The run's log is made by the real learner actor (``actors.learner.run``) on a tiny model,
fed four BatchFormed (SFT, then RL with a per-batch lr and an optimizer reset) through an
in-memory context, so the replay is checked against exactly what the actor logs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import time
from pathlib import Path
from types import SimpleNamespace

import msgspec
import numpy as np
import pytest
import structlog
import trio
import typer
from typer.testing import CliRunner

from actors.config import Config
from bench.learner import TOKENIZER_CORPUS, random_batch
from protocol.events import BatchFormed, Envelope, RunStarted, TrainStepCompleted, WeightsPublished
from store import EventLog
from store.cli import replay_app
from store.replay_train import ReplayError, load_steps, relocate
from store.testing import Emitter, synthetic_run
from training.learner import LearnerConfig

VOCAB = 300
RUN_ID = "replay-test"
LEARNER = LearnerConfig(
    lr=2e-3, warmup_steps=2, schedule="cosine", total_steps=8, micro_batch_tokens=64, old_logprobs="generator"
)


def _batch(step: int, kind: str, **kw) -> BatchFormed:
    """Random sequences with generator logprobs near the tiny model's own, so the RL loss
    depends on the weights (with recomputed old logprobs it would be -mean(advantage))."""
    b = random_batch(n_seqs=6, seq_len=40, vocab_size=VOCAB, step=step, kind=kind)
    noise = np.random.default_rng(step).normal(0, 0.3, len(b.loss_mask))
    old = np.where(b.loss_mask == 1, -5.7 + noise, 0).astype(np.float32)
    return dataclasses.replace(b, stage="sft" if kind == "sft" else "rl1", old_logprobs=old, **kw)


BATCHES = [
    _batch(1, "sft"),
    _batch(2, "rl", lr=8e-4),
    _batch(3, "rl", lr=5e-4, optimizer_reset=True),
    _batch(4, "rl", lr=5e-4),
]


class _Drained(Exception):
    pass


class _Ctx:
    """What actors.learner.run uses of a Context: config, an inbox, emit, ack, state."""

    def __init__(self, config: Config, inbox: list[Envelope], emit: Emitter) -> None:
        self.config, self.inbox, self._emit, self.state = config, list(inbox), emit, ""
        self.name, self.restarts, self.started_wall = "learner", 0, time.time()
        self.log = structlog.get_logger("test.learner")
        self.net = SimpleNamespace(links={})  # no peer ever holds an unacknowledged result
        self.emitted: list[Envelope] = []

    def ack(self, env: Envelope) -> None:
        pass

    async def receive(self) -> Envelope:
        if not self.inbox:
            raise _Drained
        return self.inbox.pop(0)

    def emit(self, event, to=(), cause=None) -> Envelope:
        env = self._emit("learner", event, cause.event_id if isinstance(cause, Envelope) else cause)
        self.emitted.append(env)
        return env


def _write_log(path: Path, envs: list[Envelope]) -> None:
    with EventLog.open(path) as log:
        log.ensure_run(RUN_ID, name=RUN_ID, config={}, run_dir=str(path))
        log.append(envs)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[Envelope]]:
    """A run directory whose events.db holds what the learner actor logged for BATCHES."""
    from actors import learner as learner_actor
    from training.tiny import build_tiny_model

    run_dir = tmp_path_factory.mktemp("run")
    model = build_tiny_model(run_dir / "model", corpus=TOKENIZER_CORPUS, vocab_size=VOCAB, hidden_size=64,
                             layers=2, heads=2, kv_heads=1)  # fmt: skip
    cfg = Config.model_validate({
        "run": {"run_dir": str(run_dir), "run_id": RUN_ID}, "model": {"path": model},
        "learner": LEARNER.model_dump(mode="json"),
    })  # fmt: skip
    emit = Emitter(RUN_ID)
    envs = [emit("scheduler", RunStarted(config=cfg.model_dump(mode="json"), run_dir=str(run_dir), version="test"))]
    batches = [emit("scheduler", b) for b in BATCHES]
    ctx = _Ctx(cfg, batches, emit)
    with pytest.raises(_Drained):
        trio.run(learner_actor.run, ctx)
    # as the recorder would interleave them: each batch, then the learner's answer to it
    for b in batches:
        envs += [b] + [e for e in ctx.emitted if e.causation_id == b.event_id]
    _write_log(run_dir, envs)
    return run_dir, envs


def _invoke(*args: str):
    root = typer.Typer()
    root.add_typer(replay_app, name="replay")
    return CliRunner().invoke(root, ["replay", "train", *args])


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _fingerprint(db: Path) -> str:
    """The log's bytes. A read-only SQLite reader of a WAL database may leave an empty
    ``-wal`` and a ``-shm`` index beside it; anything written would sit in the ``-wal``."""
    wal = db.with_name(db.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0, f"{wal} holds writes"
    return hashlib.sha256(db.read_bytes()).hexdigest()


def _tampered(tmp_path: Path, envs: list[Envelope], change) -> Path:
    """A copy of the run's log (as a .db file) with ``change(payload)`` applied to each event."""
    out = [msgspec.structs.replace(e, payload=change(e.payload)) for e in envs]
    _write_log(tmp_path / "tampered.db", out)
    return tmp_path / "tampered.db"


def test_chain_replay_reproduces_every_logged_loss_and_leaves_the_log_unchanged(run) -> None:
    run_dir, envs = run
    before = _fingerprint(run_dir / "events.db")
    out = _invoke(str(run_dir), "--json")
    assert out.exit_code == 0, out.output
    rows = _rows(out)
    logged = [e.payload for e in envs if isinstance(e.payload, TrainStepCompleted)]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["kind"] for r in rows] == ["sft", "rl", "rl", "rl"]
    for r, t in zip(rows, logged):
        assert r["logged_loss"] == t.loss
        assert abs(r["replayed_loss"] - t.loss) <= 1e-5, r
        assert r["worst_diff"] <= 1e-5, r
        assert r["metrics"]["actor/lr"] == t.metrics["actor/lr"]
    # the steps really differ (per-batch lr, warmup restarted by the reset), so the match is not vacuous
    assert len({r["metrics"]["actor/lr"] for r in rows}) == 4
    assert "OK" in out.output
    # a later window: the steps before it are trained, not checked
    out = _invoke(str(run_dir), "--from-step", "3", "--steps", "1", "--json")
    assert out.exit_code == 0, out.output
    assert [(r["step"], r["loss_diff"] <= 1e-5) for r in _rows(out)] == [(3, True)]
    assert _fingerprint(run_dir / "events.db") == before


def test_table_and_from_published_checks_steps_independently(run) -> None:
    run_dir, _ = run
    out = _invoke(str(run_dir), "--from-published", "--from-step", "3", "--tol", "1e-5")
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert lines[0].split()[:5] == ["step", "stage", "kind", "logged", "loss"]
    assert [line.split()[0] for line in lines[1:-1]] == ["3", "4"]
    assert "from published weights" in lines[-1] and lines[-1].endswith("OK")


def test_tampered_loss_is_detected(run, tmp_path) -> None:
    _, envs = run

    def bump(ev):
        return dataclasses.replace(ev, loss=ev.loss + 1e-4) if isinstance(ev, TrainStepCompleted) and ev.step == 4 else ev

    db = _tampered(tmp_path, envs, bump)
    before = _fingerprint(db)
    out = _invoke(str(db), "--from-published", "--from-step", "4")
    assert out.exit_code == 1, out.output
    assert "FAILED at step(s) 4" in out.output
    assert _fingerprint(db) == before


def test_tampered_batch_is_detected_and_carries_into_later_steps(run, tmp_path) -> None:
    _, envs = run

    def flip(ev):
        if isinstance(ev, BatchFormed) and ev.step == 1:
            ids = ev.input_ids.copy()
            ids[-5:] = (ids[-5:] + 1) % VOCAB
            return dataclasses.replace(ev, input_ids=ids)
        return ev

    out = _invoke(str(_tampered(tmp_path, envs, flip)), "--steps", "2", "--json")
    assert out.exit_code == 1, out.output
    rows = _rows(out)
    # step 1 trains on different tokens: its loss differs, and so do step 2's weights
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss_diff"] > 1e-5 for r in rows), rows


def test_malformed_batch_is_named(run, tmp_path) -> None:
    _, envs = run

    def break_prompt(ev):
        if isinstance(ev, BatchFormed) and ev.step == 1:
            return dataclasses.replace(ev, prompt_lens=np.zeros_like(ev.prompt_lens))
        return ev

    out = _invoke(str(_tampered(tmp_path, envs, break_prompt)), "--steps", "1")
    assert out.exit_code == 1
    assert "BatchFormed of step 1 at position" in out.output and "prompt_lens" in out.output


def test_malformed_row_is_named(run, tmp_path) -> None:
    _, envs = run
    db = _tampered(tmp_path, envs, lambda ev: ev)
    with sqlite3.connect(db) as conn:  # damage one BatchFormed's arrays behind the API's back
        pos = conn.execute("SELECT min(position) FROM events WHERE type = 'BatchFormed'").fetchone()[0]
        conn.execute("UPDATE events SET blob = x'c1c1' WHERE position = ?", (pos,))
    out = _invoke(str(db))
    assert out.exit_code == 1
    assert f"position {pos}" in out.output and "BatchFormed" in out.output and "malformed" in out.output


def _step(step: int, version: int, **batch) -> list:
    b = dataclasses.replace(BATCHES[1], step=step, **batch)
    done = TrainStepCompleted(step=step, stage=b.stage, kind="rl", loss=0.0, metrics={}, n_sequences=6,
                              n_tokens=1, seconds=0.0, weights_version=version)  # fmt: skip
    return [b, done, WeightsPublished(version=version, step=step, path=f"/w/v{version}", sha256="")]


def test_load_steps_follows_restarts_resets_and_reannouncements() -> None:
    emit = Emitter(RUN_ID)
    config = {"learner": {}, "model": {"path": "/m"}}
    events = [RunStarted(config=config, run_dir="/r", version="test")]
    events += _step(1, 1) + _step(2, 2, optimizer_reset=True) + _step(3, 3)
    events += _step(3, 3)[1:]  # a resumed learner announces its checkpointed step again
    events += _step(4, 4) + _step(5, 1)  # the learner restarted from the initial model
    with EventLog.open("sqlite://") as log:
        log.append([emit("x", e) for e in events])
        training = load_steps(log, RUN_ID)
        assert [s.done.step for s in training.steps] == [1, 2, 3, 4, 5]
        assert [s.fresh_start for s in training.steps] == [True, False, False, False, True]
        assert [s.optimizer_steps for s in training.steps] == [0, 1, 1, 2, 0]  # before the step (and its reset)
        assert [s.start_weights for s in training.steps] == [None, "/w/v1", "/w/v2", "/w/v3", None]

        log.append([emit("x", e) for e in _step(6, 5)])  # version 2 expected after a restart
        with pytest.raises(ReplayError, match="step 6 .*weights_version 5 after version 1.*--from-published"):
            load_steps(log, RUN_ID)
        log.append([emit("x", _step(9, 9)[1])])
        with pytest.raises(ReplayError, match="step 9 .*no BatchFormed"):
            load_steps(log, RUN_ID)


def test_paths_of_a_moved_run_directory_are_found_under_it(tmp_path) -> None:
    (tmp_path / "moved" / "weights" / "v00001").mkdir(parents=True)
    logged = "/gone/run/weights/v00001"
    assert relocate(logged, "/gone/run", tmp_path / "moved") == tmp_path / "moved" / "weights" / "v00001"
    assert relocate(logged, "/gone/run", None) == Path(logged)  # no local run directory: as logged
    assert relocate("/elsewhere/model", "/gone/run", tmp_path / "moved") == Path("/elsewhere/model")


def test_clear_errors_for_bad_input(tmp_path) -> None:
    missing = tmp_path / "no-such-run"
    out = _invoke(str(missing))
    assert out.exit_code != 0 and str(missing) in out.output

    # a log with events but no learner steps / no learner config
    _write_log(tmp_path / "synthetic.db", [e for e in synthetic_run(RUN_ID, steps=1) if e.type != "TrainStepCompleted"])
    out = _invoke(str(tmp_path / "synthetic.db"))
    assert out.exit_code == 1 and "no TrainStepCompleted" in out.output

    out = _invoke(str(tmp_path / "synthetic.db"), "--run-id", "nope")
    assert out.exit_code == 1 and "'nope'" in out.output

    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    out = _invoke(str(tmp_path / "junk.db"))
    assert out.exit_code == 1 and "junk.db" in out.output
