"""``reckon run``: prepare a run directory, start every actor as its own process, watch.

The launcher builds the demo model when the config names none, writes the resolved
config to ``RUN_DIR/config.json`` (what every actor reads), starts the actors (recorder
first), restarts one that crashes (with backoff, up to a limit, recording an ActorError),
prints per-step metrics as they land in the event log, and stops everything when the
scheduler records RunCompleted, on Ctrl-C, or when an actor exhausts its restarts.

A restarted actor gets ``RECKON_RESTARTS`` (how many times it was restarted) in its
environment; what a dead actor left behind in its process group (sandbox or verifier
workers) is killed before the restart. Work the dead actor held is resent to the new one
by its requesters (actors/supervision.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from rich.console import Console

from actors.config import Config, actor_environment
from protocol.events import ActorError, Envelope, new_event_id

console = Console(highlight=False, soft_wrap=True)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    log_path: Path | None = None
    exit_codes: list[int] = field(default_factory=list)


def prepare_run(cfg: Config) -> Config:
    """Fill run_dir/run_id, build the tiny model if needed, write config.json."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.run_dir or Path(cfg.run.runs_dir, f"{cfg.run.name}-{stamp}")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    updates = {"run_dir": str(run_dir), "run_id": cfg.run.run_id or f"{run_dir.name}-{os.urandom(3).hex()}"}
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update=updates)})
    if not cfg.model.path:
        from training.demo_tasks import tokenizer_corpus
        from training.tiny import build_tiny_model

        model_dir = run_dir / "model"
        if not (model_dir / "config.json").exists():
            m = cfg.model
            build_tiny_model(
                str(model_dir), corpus=tokenizer_corpus(seed=cfg.run.seed), vocab_size=m.tiny_vocab,
                hidden_size=m.tiny_hidden, layers=m.tiny_layers, heads=m.tiny_heads, kv_heads=m.tiny_kv_heads,
                seed=cfg.run.seed, pretrain_steps=m.tiny_pretrain_steps,
            )
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": str(model_dir)})})
    from actors.config import socket_dir

    if cfg.network.transport == "ipc":
        Path(socket_dir(str(run_dir))).mkdir(parents=True, exist_ok=True)
    if cfg.network.curve:  # CurveZMQ: one key pair per actor in RUN_DIR/keys (kept across restarts)
        from protocol.curve import generate_keys

        generate_keys(run_dir, cfg.actor_names())
    (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return cfg


class Launcher:
    def __init__(self, cfg: Config, *, quiet: bool = False):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.run_dir)
        self.procs = {name: Proc(name) for name in cfg.actor_names()}
        self.quiet = quiet
        self.log = None
        self.printed_steps: set[int] = set()
        self.printed_evals: set[int] = set()
        self.seen_position = 0
        self.status = "running"

    def say(self, text: str) -> None:
        if not self.quiet:
            console.print(text)

    # ------------------------------------------------------------ processes

    def start(self, p: Proc) -> None:
        p.log_path = self.run_dir / "logs" / f"{p.name}.log"
        out = open(p.log_path, "ab")
        cmd = [sys.executable, "-m", "actors.main", p.name, "--config", str(self.run_dir / "config.json")]
        env = actor_environment(self.cfg, p.restarts, name=p.name)
        p.popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        out.close()

    def record(self, event, source: str = "launcher") -> None:
        """Append an event of the launcher's own straight to the log."""
        if self.log is None:
            return
        env = Envelope(
            event_id=new_event_id(), type=event.TYPE, schema_version=event.VERSION, run_id=self.cfg.run.run_id,
            source=source, seq=int(time.time() * 1e6), ts=time.time(), causation_id=None, payload=event,
        )
        try:
            self.log.append([env])
        except Exception:  # the log is best-effort here; the actor's own log file has the story
            traceback.print_exc()

    def supervise(self) -> None:
        lcfg = self.cfg.launcher
        now = time.monotonic()
        for p in self.procs.values():
            if p.popen is None:
                if now >= p.next_start:
                    self.start(p)
                continue
            code = p.popen.poll()
            if code is None:
                continue
            p.exit_codes.append(code)
            try:  # its own session: kill what it left behind (workers that outlived it)
                os.killpg(p.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.popen = None
            if self.status != "running":
                continue
            if p.restarts >= lcfg.max_restarts:
                self.say(f"[red]{p.name} exited with {code} and has no restarts left; stopping the run[/]")
                self.status = "failed"
                continue
            delay = lcfg.restart_backoff_s * (2**p.restarts)
            p.restarts += 1
            p.next_start = now + delay
            self.say(f"[yellow]{p.name} exited with {code}; restart {p.restarts}/{lcfg.max_restarts} in {delay:.1f}s "
                     f"(log: {p.log_path})[/]")
            self.record(ActorError(role=p.name, error_type="ProcessExited", message=f"exit code {code}; restarting",
                                   traceback="", fatal=False))

    def stop_all(self) -> None:
        order = [n for n in self.procs if n != "recorder"] + ["recorder"]
        for group in (order[:-1], order[-1:]):
            for n in group:
                p = self.procs[n]
                if p.popen is not None and p.popen.poll() is None:
                    p.popen.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 20
            for n in group:
                p = self.procs[n]
                if p.popen is None:
                    continue
                try:
                    p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(p.popen.pid, signal.SIGKILL)
                    p.popen.wait()

    # ------------------------------------------------------------ progress

    def open_log(self):
        if self.log is None:
            from store import EventLog

            try:
                self.log = EventLog.open(self.cfg.store_url())
            except Exception:
                return None
        return self.log

    def progress(self) -> bool:
        """Print what is new in the log; True once the run has completed."""
        from store.metrics import format_step, step_metrics

        log = self.open_log()
        if log is None:
            return False
        run_id = self.cfg.run.run_id
        done = False
        for pos, env in log.read(run_id=run_id, types=["EvalCompleted", "RunCompleted", "StageStarted", "ActorError"],
                                 after=self.seen_position):
            self.seen_position = pos
            ev = env.payload
            if env.type == "StageStarted":
                self.say(f"[bold]stage {ev.stage}[/] ({ev.kind}): {ev.steps} steps, max {ev.max_tokens} tokens, "
                         f"{ev.max_turns} turns, {ev.prompts_per_step}x{ev.rollouts_per_prompt}->{ev.group_size}, "
                         f"lr {ev.lr:g}")
            elif env.type == "EvalCompleted":
                self.say(f"[bold cyan]eval {ev.dataset} @ step {ev.step}: avg pass@1 {ev.pass_at_1:.3f}[/] "
                         f"(k={ev.k}, T={ev.temperature}, {ev.n_problems} problems, "
                         f"{ev.mean_tool_calls:.2f} tool calls, {ev.mean_response_tokens:.0f} tokens)")
            elif env.type == "ActorError" and env.source != "launcher":
                self.say(f"[red]{env.source}: {ev.error_type}: {ev.message}[/]")
            elif env.type == "RunCompleted":
                done = True
        for m in step_metrics(log, run_id):
            if m["step"] not in self.printed_steps and m.get("loss") is not None:
                self.printed_steps.add(m["step"])
                self.say(format_step(m))
        return done

    # ------------------------------------------------------------ main loop

    def run(self) -> int:
        self.say(f"[bold]reckon run[/] {self.cfg.run.run_id}  dir {self.run_dir}")
        self.say(f"actors: {', '.join(self.procs)}  (logs in {self.run_dir / 'logs'})")
        t0 = time.monotonic()
        last_progress = 0.0

        def on_term(signum, frame):  # SIGTERM stops the run like Ctrl-C: actors drain, none is orphaned
            raise KeyboardInterrupt

        try:
            previous = signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread
            previous = None
        try:
            while self.status == "running":
                self.supervise()
                if time.monotonic() - last_progress > 1.0:
                    last_progress = time.monotonic()
                    if self.progress():
                        self.status = "ok"
                time.sleep(0.2)
        except KeyboardInterrupt:
            self.status = "interrupted"
            self.say("[yellow]interrupted: stopping all actors[/]")
        finally:
            if previous is not None:  # stop_all runs to its end: a second Ctrl-C must not orphan the recorder
                previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self.stop_all()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
                signal.signal(signal.SIGINT, previous_int)
        if self.status == "ok":
            self.progress()
        self.say(f"run {self.status} in {time.monotonic() - t0:.0f}s; event log: {self.cfg.store_url()}")
        self.say(f"inspect: reckon sql {self.run_dir} \"SELECT step, count(*) FROM trajectories GROUP BY step\"")
        return {"ok": 0, "interrupted": 130}.get(self.status, 1)


def launch(cfg: Config, *, quiet: bool = False) -> tuple[int, Config]:
    cfg = prepare_run(cfg)
    return Launcher(cfg, quiet=quiet).run(), cfg
