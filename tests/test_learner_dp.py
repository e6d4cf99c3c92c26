"""Data parallel: 2 CPU processes under torchrun train exactly like 1 process.

This file is also the worker the test launches (``__main__`` below).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 300
STEPS = 3


def make_cfg(zero_stage: int):
    from training.learner import LearnerConfig

    # a 40-token budget puts most sequences alone in a micro-batch, so the two ranks get
    # different micro-batch counts and the padding rows are exercised
    return LearnerConfig(zero_stage=zero_stage, lr=2e-3, warmup_steps=1, micro_batch_tokens=40)


def run_steps(learner) -> list[dict]:
    from bench.learner import random_batch

    out = []
    for s in range(STEPS):
        b = random_batch(n_seqs=7, seq_len=40, vocab_size=VOCAB, step=s)
        # ranks > 0 pass None: rank 0's batch is broadcast
        m = learner.train_step(b if learner.rank == 0 else None)
        out.append({k: m[k] for k in ("loss", "actor/grad_norm", "actor/entropy", "perf/micro_batches")})
    return out


@pytest.mark.parametrize("zero_stage", [pytest.param(0, marks=pytest.mark.slow), 2, pytest.param(3, marks=pytest.mark.slow)])
def test_two_processes_match_one(zero_stage, tmp_path):
    from bench.learner import TOKENIZER_CORPUS
    from training.learner import Learner
    from training.tiny import build_tiny_model

    model_dir = build_tiny_model(
        tmp_path / "model", corpus=TOKENIZER_CORPUS, vocab_size=VOCAB, hidden_size=64, layers=2, heads=2, kv_heads=1
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"  # two ranks on a 2-core machine
    env["PYTHONFAULTHANDLER"] = "1"  # a native abort prints the Python stack
    out = tmp_path / "dp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, "--model", str(model_dir), "--zero", str(zero_stage), "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-8000:]
    two = json.loads(out.read_text())

    one = run_steps(Learner(make_cfg(zero_stage), model_dir, tmp_path / "work1"))
    assert max(m["perf/micro_batches"] for m in two) < max(m["perf/micro_batches"] for m in one)
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["actor/grad_norm"] == pytest.approx(a["actor/grad_norm"], abs=1e-5)
        assert b["actor/entropy"] == pytest.approx(a["actor/entropy"], abs=1e-5)


def _worker() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--zero", type=int, required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from training.learner import Learner

    learner = Learner(make_cfg(args.zero), args.model, Path(args.out).parent / f"work-rank{os.environ['RANK']}")
    assert learner.world == 2
    metrics = run_steps(learner)
    if learner.rank == 0:
        Path(args.out).write_text(json.dumps(metrics))
    learner.close()
    # Now and then a native static destructor (torch/gloo threads) aborts the interpreter's
    # finalisation *after* all work is done ("terminate called without an active
    # exception", no Python frame): skip finalisation once the results are on disk.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _worker()
