"""Chaos: SIGKILL the learner, a generator, the tool executor, the verifier and the recorder
at seeded random moments of a small `reckon run`; the run still completes every step, and
the event log proves that every trajectory landed in exactly one batch (or was dropped by
RoC, on the record), none twice, none lost, no step trained twice.

The kill moments are chosen so that each victim holds work when it dies: the learner
during an SFT step; then, in the first RL steps, the verifier and the recorder while
trajectories flow, the tool executor with a call pending, and the generator mid-rollouts.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from store import EventLog

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("RECKON_CHAOS_SEED", "0"))

CONFIG = """
[run]
name = "chaos"
seed = {seed}

[model]
tiny_layers = 2
tiny_hidden = 64
tiny_heads = 2
tiny_kv_heads = 1

[data]
train = "{data}/train.jsonl"
eval = "{data}/eval.jsonl"

[sft]                  # 32 steps: the format is learnt (loss ~0.2)
data = "{data}/sft.jsonl"
epochs = 8.0
batch_size = 16
lr = 5e-3
warmup_ratio = 0.0
schedule = "constant"

[[stages]]
name = "rl1"
steps = 10             # enough RL steps that every kill lands before the run ends, even on a quiet box
max_tokens = 128
max_turns = 2
prompts_per_step = 4
rollouts_per_prompt = 4
group_size = 2
lr = 2e-4

[rollout]
temperature = 0.5      # the tiny model's tool-call format holds at 0.5; the 1-or-2 answer stays a coin toss
roc = {{ mode = "release" }}

[generator]
count = 1
engine = {{ kind = "hf", max_running = 16, max_model_len = 512, warmup = false }}

[tools]
count = 1
sandbox = {{ slots = 2, timeout_s = 5.0 }}

[verifier]
count = 1
pool = {{ workers = 1 }}

[eval]
at_stage_end = false

[network]
heartbeat_s = 1.0
resend_after_s = 1.0

[launcher]
max_restarts = 3
restart_backoff_s = 0.2
"""


def write_data(out: Path) -> None:
    """A coin-toss task learnt in a few SFT steps: every demonstration calls the tool, then
    answers 1 or 2 at random; the gold answer is 1, so about half the rollouts of a group
    are right and RoC keeps the group (a reward signal without a long training)."""
    from training.chat import SYSTEM_PROMPT, tool_call_text
    from training.demo_tasks import TOOL_PREAMBLE, answer_text, render_tool_output

    rng = random.Random(0)
    code = "print(1)"
    out.mkdir(parents=True, exist_ok=True)
    problems = [f"Coin {i}: 1 or 2?" for i in range(80)]
    with open(out / "train.jsonl", "w") as f:
        for p in problems[:64]:
            f.write(json.dumps({"problem": p, "answer": "1"}) + "\n")
    with open(out / "eval.jsonl", "w") as f:
        for p in problems[64:]:
            f.write(json.dumps({"problem": p, "answer": "1"}) + "\n")
    with open(out / "sft.jsonl", "w") as f:
        for p in problems[:64]:
            side = rng.choice([1, 2])
            f.write(json.dumps({"messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": p},
                {"role": "assistant", "content": TOOL_PREAMBLE + tool_call_text(code)},
                {"role": "tool", "content": render_tool_output("1\n")},
                {"role": "assistant", "content": answer_text(side)},
            ]}) + "\n")


class Chaos:
    """Watches the run's log and SIGKILLs actors at the chosen moments."""

    def __init__(self, run_dir: Path, proc: subprocess.Popen, rng: random.Random):
        self.run_dir = run_dir
        self.proc = proc
        self.rng = rng
        self.log: EventLog | None = None
        self.killed: dict[str, int] = {}  # actor -> pid killed

    def q(self, sql: str, params=()) -> list[tuple]:
        try:
            if self.log is None:
                if not (self.run_dir / "events.db").is_file():
                    return []
                self.log = EventLog.open(str(self.run_dir), readonly=True)
            return self.log.query(sql, params)[1]
        except Exception:  # the database is being created
            return []

    def one(self, sql: str, params=()):
        rows = self.q(sql, params)
        return rows[0][0] if rows else None

    def pid(self, actor: str) -> int | None:
        """The live pid of ``actor`` in this run (from its latest ActorStarted), checked in /proc."""
        pid = self.one("SELECT CAST(json_extract(payload, '$.pid') AS INTEGER) FROM events WHERE type = 'ActorStarted' "
                       "AND source = ? ORDER BY position DESC LIMIT 1", (actor,))
        if pid is None:
            return None
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        # Only ever this run's actor process: never a reused pid.
        if b"actors.main" in cmd and actor.encode() in cmd and str(self.run_dir).encode() in b" ".join(cmd):
            return pid
        return None

    def wait(self, cond, timeout: float = 240.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if cond():
                return True
            time.sleep(0.1)
        return False

    def kill(self, actor: str, delay: tuple[float, float], *, back: bool = False) -> None:
        """SIGKILL ``actor`` after a random delay; with ``back``, wait until it has restarted."""
        time.sleep(self.rng.uniform(*delay))
        if not self.wait(lambda: self.pid(actor) is not None, 120):
            return
        pid = self.pid(actor)
        os.kill(pid, signal.SIGKILL)
        self.killed[actor] = pid
        if back:  # a new incarnation reported ActorStarted
            self.wait(lambda: (self.pid(actor) or pid) != pid, 180)

    def run(self) -> None:
        rng = self.rng
        # Learner: while it trains SFT step 2 or 3 (step 1 is checkpointed).
        step = rng.choice([2, 3])
        if self.wait(lambda: (self.one("SELECT count(*) FROM batches WHERE step = ?", (step,)) or 0) > 0):
            self.kill("learner", (0.0, 0.4))
        # Then, in the first RL steps, while trajectories flow: the verifier and the recorder
        # (seeded order), the tool executor with a call in flight, and last the generator
        # mid-rollouts (the run waits for it, with the others alive to resend what they held).
        if not self.wait(lambda: (self.one("SELECT count(*) FROM events WHERE type = 'RolloutRequested'") or 0) > 0):
            return
        for actor in rng.sample(["verifier-0", "recorder"], 2):
            self.kill(actor, (0.1, 0.6))
        self.wait(lambda: (self.one("SELECT count(*) FROM tool_calls WHERE status IS NULL") or 0) > 0, 20)
        self.kill("tool-0", (0.0, 0.1))
        self.kill("generator-0", (0.1, 0.8), back=True)


def sql(log: sqlite3.Connection, text: str) -> list[tuple]:
    return log.execute(text).fetchall()


def open_log(run_dir: Path) -> sqlite3.Connection:
    """The run's event log, read-only. A plain connection: `reckon sql`'s guard refuses the
    json_each table function (SQLite creates it on first use, which counts as a write)."""
    EventLog.open(str(run_dir), readonly=True)  # a reckon event log of this schema
    return sqlite3.connect(f"file:{run_dir / 'events.db'}?mode=ro", uri=True)


# The invariant, as SQL on the event log. RL rollout ids requested, batched, resampled:
REQUESTED = "SELECT DISTINCT json_extract(payload, '$.rollout_id') AS rid FROM events WHERE type = 'RolloutRequested'"
BATCHED = ("SELECT j.value AS rid FROM events e, json_each(e.payload, '$.rollout_ids') j "
           "WHERE e.type = 'BatchFormed' AND json_extract(e.payload, '$.kind') = 'rl'")
KEPT = ("SELECT j.value AS rid FROM events e, json_each(e.payload, '$.kept') j WHERE e.type = 'GroupResampled'")
DROPPED = ("SELECT j.value AS rid FROM events e, json_each(e.payload, '$.dropped') j WHERE e.type = 'GroupResampled'")
SUMMARY = f"""
SELECT
  (SELECT count(*) FROM actor_errors WHERE source = 'launcher') AS restarts,
  (SELECT count(*) FROM events WHERE type = 'WorkReissued') AS reissued,
  (SELECT count(*) FROM events WHERE type = 'WorkReissued' AND json_extract(payload, '$.kind') = 'rollout') AS rollouts_reissued,
  (SELECT count(*) FROM ({REQUESTED})) AS requested,
  (SELECT count(*) FROM (SELECT rid FROM ({BATCHED}) GROUP BY rid HAVING count(*) > 1)) AS batched_twice,
  (SELECT count(*) FROM (SELECT rid FROM ({KEPT} UNION ALL {DROPPED}) GROUP BY rid HAVING count(*) > 1)) AS resampled_twice,
  (SELECT count(*) FROM ({REQUESTED}) r WHERE r.rid NOT IN (SELECT rid FROM ({KEPT} UNION ALL {DROPPED}))) AS lost,
  (SELECT count(*) FROM ({KEPT}) k WHERE k.rid NOT IN (SELECT rid FROM ({BATCHED}))) AS kept_not_batched,
  (SELECT count(*) FROM ({BATCHED}) b WHERE b.rid NOT IN (SELECT rid FROM ({KEPT}))) AS batched_not_kept
"""


@pytest.fixture(scope="module")
def chaos_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chaos")
    cfg = tmp / "chaos.toml"
    write_data(tmp / "data")
    cfg.write_text(CONFIG.format(seed=SEED, data=tmp / "data"))
    run_dir = tmp / "run"
    out = open(tmp / "launcher.txt", "w")
    # One thread per actor: torch's default (all cores) oversubscribes a small shared box and
    # made an SFT step 7x slower there.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "actors.cli", "run", str(cfg), "--run-dir", str(run_dir)],
                            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    chaos = Chaos(run_dir, proc, random.Random(SEED))
    try:
        chaos.run()
        code = proc.wait(timeout=600)
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        raise
    finally:
        out.close()
    if code != 0:
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted((run_dir / "logs").glob("*.log")))
        pytest.fail(f"reckon run exited {code}\n{(tmp / 'launcher.txt').read_text()[-3000:]}\n{logs}")
    return run_dir, chaos.killed


def test_every_actor_was_killed_and_the_run_completed(chaos_run):
    run_dir, killed = chaos_run
    assert set(killed) == {"learner", "generator-0", "tool-0", "verifier-0", "recorder"}, killed
    log = open_log(run_dir)
    assert sql(log, "SELECT count(*) FROM events WHERE type = 'RunCompleted'")[0][0] == 1
    # Each kill was seen and answered with a restart (ActorError from the launcher, exit -9).
    restarted = {r for r, in sql(log, "SELECT role FROM actor_errors WHERE source = 'launcher' AND message LIKE 'exit code -9%'")}
    assert restarted == set(killed), restarted


def test_every_step_trained_exactly_once(chaos_run):
    run_dir, _ = chaos_run
    log = open_log(run_dir)
    steps = sql(log, "SELECT json_extract(payload, '$.steps') FROM events WHERE type = 'RunCompleted'")[0][0]
    batches = dict(sql(log, "SELECT step, count(*) FROM batches GROUP BY step"))
    assert all(n == 1 for n in batches.values()), batches
    # A step without a batch is an RL step none of whose groups carried a reward signal
    # (all dropped by RoC as equal-reward, on the record), never one lost to a crash.
    for step in set(range(1, steps + 1)) - set(batches):
        reasons = {r for r, in sql(log, f"SELECT reason FROM groups WHERE step = {step}")}
        assert reasons == {"all_equal"}, (step, reasons)
    assert len(batches) >= steps - 2, batches
    # One optimizer step per batch: every report of a step names the same weights version
    # (a step announced again after a learner restart is not trained again), versions 1..n.
    versions = sql(log, "SELECT step, count(DISTINCT weights_version), min(weights_version) FROM train_steps "
                        "GROUP BY step ORDER BY step")
    assert [s for s, _, _ in versions] == sorted(batches), versions
    assert [(n, v) for _, n, v in versions] == [(1, i) for i in range(1, len(batches) + 1)], versions


def test_every_trajectory_in_exactly_one_batch_none_lost(chaos_run):
    run_dir, _ = chaos_run
    log = open_log(run_dir)
    cur = log.execute(SUMMARY)
    summary = dict(zip([d[0] for d in cur.description], cur.fetchone()))
    print("chaos summary:", summary)
    (run_dir.parent / "summary.txt").write_text(repr(summary))
    assert summary["requested"] > 0
    assert summary["batched_twice"] == 0 and summary["resampled_twice"] == 0, summary
    assert summary["lost"] == 0 and summary["kept_not_batched"] == 0 and summary["batched_not_kept"] == 0, summary
    assert summary["restarts"] >= 5
    # Work held by the dead was taken up again: at least the generator's rollouts and the
    # learner's step (the tool call and verification counts depend on the moment).
    kinds = dict(sql(log, "SELECT json_extract(payload, '$.kind'), count(*) FROM events WHERE type = 'WorkReissued' "
                          "GROUP BY 1"))
    print("re-issued by kind:", kinds)
    assert kinds.get("rollout", 0) > 0 and kinds.get("train_step", 0) > 0, kinds
    # Every batched trajectory is in the log with the reward the scheduler used.
    missing = sql(log, f"SELECT count(*) FROM ({BATCHED}) b WHERE b.rid NOT IN "
                       "(SELECT json_extract(payload, '$.rollout_id') FROM events WHERE type = 'RewardAssigned')")
    assert missing[0][0] == 0
