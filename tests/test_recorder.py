"""The recorder path: every emitted event lands in the log once, even across a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import trio

from actors.config import Config, parse_config, socket_dir
from actors.runtime import serve
from protocol.events import CapacityReported
from store import EventLog

ROOT = Path(__file__).resolve().parents[1]


def make_config(tmp_path: Path) -> Config:
    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True)
    cfg = parse_config({"run": {"run_dir": str(run_dir), "run_id": "rec-test", "name": "rec"},
                        "model": {"path": str(tmp_path / "unused-model")},
                        "network": {"resend_after_s": 0.5, "heartbeat_s": 0.2}})
    Path(socket_dir(str(run_dir))).mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    return cfg


def start_recorder(cfg: Config) -> subprocess.Popen:
    run_dir = Path(cfg.run.run_dir)
    log = open(run_dir / "logs" / "recorder.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "actors.main", "recorder", "--config", str(run_dir / "config.json")],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def count_emitted(log: EventLog, run_id: str, source: str) -> list[int]:
    return sorted(env.seq for _, env in log.read(run_id=run_id, types=["CapacityReported"]) if env.source == source)


def test_recorder_sigkill_and_restart_loses_nothing(tmp_path):
    cfg = make_config(tmp_path)
    n = 3000
    recorder = start_recorder(cfg)
    killed = []

    async def emitter(ctx, *, task_status=trio.TASK_STATUS_IGNORED):
        nonlocal recorder
        task_status.started()
        for i in range(n):
            ctx.emit(CapacityReported(kind="generator", free_tokens=i, total_tokens=n, free_slots=1, total_slots=1,
                                      running=0, queued=0))
            if i % 50 == 0:
                await trio.sleep(0.01)
            if i == n // 2:  # kill the recorder mid-stream, restart it a moment later
                recorder.send_signal(signal.SIGKILL)
                recorder.wait()
                killed.append(i)
                await trio.sleep(0.5)
                recorder = start_recorder(cfg)
        # Stay until the recorder has acknowledged everything (the runtime's drain does the same).
        with trio.fail_after(60):
            await ctx.net.links["recorder"].wait_acked()

    try:
        code = trio.run(serve, "verifier-0", cfg, cfg.run.run_id, emitter)
        assert code == 0 and killed
        log = EventLog.open(cfg.store_url())
        seqs = count_emitted(log, cfg.run.run_id, "verifier-0")
        # Every event the actor emitted is in the log exactly once (event_id is unique).
        assert len(seqs) == n and len(set(seqs)) == n
        positions = [pos for pos, _ in log.read(run_id=cfg.run.run_id)]
        assert positions == list(range(positions[0], positions[0] + len(positions)))  # gap-free
    finally:
        recorder.send_signal(signal.SIGTERM)
        try:
            recorder.wait(timeout=20)
        except subprocess.TimeoutExpired:
            recorder.kill()
