"""Staleness 1 on the real system: a small `reckon run` whose next RL step's rollouts start
while the learner trains the last batch, on weights one version behind.

The log shows it: step n+1's RolloutRequested carry the weights version from *before*
step n's training (min_version), every token of a trained trajectory comes from a version
at most one behind its step's newest, each trajectory is still in exactly one batch, and
every trained step published one new weights version.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from tests.test_chaos import CONFIG, ROOT, SEED, write_data

STALE = {
    "steps = 10             # enough RL steps that every kill lands before the run ends, even on a quiet box":
        "steps = 4",
    "[rollout]\n": '[rollout]\nstaleness = 1\n',
    "[launcher]\n": '[learner]\nold_logprobs = "generator"\n\n[launcher]\n',
}


@pytest.fixture(scope="module")
def stale_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stale")
    text = CONFIG.format(seed=SEED, data=tmp / "data")
    for a, b in STALE.items():
        assert a in text, a
        text = text.replace(a, b, 1)
    write_data(tmp / "data")
    (tmp / "stale.toml").write_text(text)
    run_dir = tmp / "run"
    out = subprocess.run([sys.executable, "-m", "actors.cli", "run", str(tmp / "stale.toml"), "--run-dir", str(run_dir)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return sqlite3.connect(f"file:{run_dir / 'events.db'}?mode=ro", uri=True), run_dir


def test_next_step_starts_before_the_last_batch_is_trained(stale_run):
    log, _ = stale_run
    trained = dict(log.execute("SELECT step, weights_version FROM train_steps WHERE stage = 'rl1'").fetchall())
    assert len(trained) >= 2, trained
    requested = dict(log.execute(
        "SELECT json_extract(payload, '$.step'), min(json_extract(payload, '$.min_version')) FROM events "
        "WHERE type = 'RolloutRequested' AND json_extract(payload, '$.stage') = 'rl1' GROUP BY 1").fetchall())
    overlapped = 0
    for step, version in trained.items():
        nxt = min((s for s in requested if s > step), default=None)
        if nxt is None:
            continue
        # On-policy, step n+1 would wait for the version step n produced; here it starts before.
        assert requested[nxt] <= version - 1, (step, version, nxt, requested[nxt])
        overlapped += requested[nxt] < version
    assert overlapped >= 1


def test_tokens_are_at_most_one_version_behind_and_batched_once(stale_run):
    log, run_dir = stale_run
    from store import EventLog

    elog = EventLog.open(str(run_dir), readonly=True)
    minv, tokens_by_rollout, batched = {}, {}, []
    for _, env in elog.read(types=["RolloutRequested", "TrajectoryCompleted", "BatchFormed"]):
        ev = env.payload
        if env.type == "RolloutRequested":
            minv[ev.rollout_id] = ev.min_version
        elif env.type == "TrajectoryCompleted":
            tokens_by_rollout[ev.rollout_id] = [int(v) for v in ev.versions if v >= 0]
        elif ev.kind == "rl":
            batched += list(ev.rollout_ids)
    assert batched and len(batched) == len(set(batched))  # each trajectory in one batch
    for rid in batched:
        # Started on min_version or later, and at most one reload (one trained step) behind it.
        assert tokens_by_rollout[rid], rid
        assert min(tokens_by_rollout[rid]) >= minv[rid], rid
        assert max(tokens_by_rollout[rid]) <= minv[rid] + 1, rid
    versions = dict(log.execute("SELECT step, weights_version FROM train_steps").fetchall())
    assert sorted(versions.values()) == list(range(1, len(versions) + 1))  # one new version per trained step
