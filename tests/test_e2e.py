"""End to end: `reckon run` with all six actors as processes, SFT then 2 RL steps; check the log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from store import EventLog

ROOT = Path(__file__).resolve().parents[1]

OVERRIDES = [
    "sft.epochs=0.5", "sft.batch_size=16", "demo.n_sft=960",  # 30 SFT steps: enough to learn the format
    "eval.max_problems=4", "eval.k=2",
    "generator.count=1", "generator.engine.max_model_len=512",
    "model.tiny_pretrain_steps=0",  # the mechanics only: no base-model pretraining
]

STAGE = """
[[stages]]
name = "rl1"
steps = 2
max_tokens = 128
max_turns = 2
prompts_per_step = 4
rollouts_per_prompt = 4
group_size = 2
lr = 2e-4
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("e2e")
    base = (ROOT / "configs" / "demo.toml").read_text()
    cfg = tmp / "e2e.toml"
    cfg.write_text(base.split("[[stages]]")[0] + STAGE + "[rollout]" + base.split("[rollout]")[1])
    run = tmp / "run"
    cmd = [sys.executable, "-m", "actors.cli", "run", str(cfg), "--run-dir", str(run)]
    for o in OVERRIDES:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((run / "logs").glob("*.log")))
        pytest.fail(f"reckon run exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}\n{logs}")
    (run / "stdout.txt").write_text(proc.stdout)
    return run


def count(log: EventLog, sql: str) -> list:
    return log.query(sql)[1]


def test_run_completes_and_logs_the_whole_loop(run_dir):
    log = EventLog.open(str(run_dir), readonly=True)
    types = dict(count(log, "SELECT type, count(*) FROM events GROUP BY type"))
    for t in ["RunStarted", "StageStarted", "RolloutRequested", "TrajectoryCompleted", "RewardAssigned",
              "GroupResampled", "BatchFormed", "TrainStepCompleted", "WeightsPublished", "EvalCompleted",
              "CapacityReported", "ActorStarted", "RunCompleted"]:
        assert types.get(t, 0) > 0, f"no {t} in the log: {types}"
    # Every requested rollout finished and was rewarded exactly once.
    assert types["RolloutRequested"] == types["TrajectoryCompleted"] == types["RewardAssigned"]
    # Tool calls: each request has its completion.
    assert types.get("ToolCallRequested", 0) == types.get("ToolCallCompleted", 0)
    # Both RL steps ran rollouts (2G = 4 per prompt, 4 prompts, one or more rounds).
    rl = count(log, "SELECT step, count(*) FROM trajectories WHERE stage = 'rl1' GROUP BY step ORDER BY step")
    assert len(rl) == 2 and all(n % 16 == 0 and n > 0 for _, n in rl), rl
    # One optimizer step per SFT batch and per RL batch, each publishing weights.
    assert types["BatchFormed"] == types["TrainStepCompleted"] == types["WeightsPublished"]
    sft_steps = count(log, "SELECT count(*) FROM train_steps WHERE kind = 'sft'")[0][0]
    assert sft_steps == 30
    # The generator reloaded every published version: later tokens carry newer versions.
    versions = count(log, "SELECT max(weights_version) FROM train_steps")[0][0]
    assert versions == types["WeightsPublished"]


def test_reckon_sql_counts_trajectories_per_step(run_dir):
    out = subprocess.run(
        [sys.executable, "-m", "actors.cli", "sql", str(run_dir),
         "SELECT step, count(*) AS n FROM trajectories WHERE stage = 'rl1' GROUP BY step ORDER BY step",
         "--format", "json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()] if not out.stdout.lstrip().startswith("[") else json.loads(out.stdout)
    assert len(rows) == 2 and all(r["n"] > 0 for r in rows)


def test_replay_metrics_reproduce_the_printed_lines(run_dir):
    printed = [l for l in (run_dir / "stdout.txt").read_text().splitlines() if l.startswith("step ")]
    out = subprocess.run([sys.executable, "-m", "actors.cli", "replay", "metrics", str(run_dir)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    replayed = [l for l in out.stdout.splitlines() if l.startswith("step ")]
    assert printed and replayed == printed


def test_a_source_checkout_without_package_metadata_still_starts_runs(monkeypatch):
    """Run from a source tree on PYTHONPATH (no ``pip install``, as on a GPU box with its own
    torch): RunStarted's version says so instead of the scheduler dying on the lookup."""
    import importlib.metadata

    from actors import scheduler

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    assert scheduler._reckon_version() == importlib.metadata.version("reckon-rl")
    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert scheduler._reckon_version() == "unknown (source tree)"
