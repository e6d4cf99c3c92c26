"""Process entry point of actors: ``python -m actors.main NAME [NAME ...] --config CONFIG [--set K=V ...]``.

The launcher starts every actor this way, one name per process. ``reckon actor`` does the
same by hand: on a cluster, one command per host names the actors that host runs (see
docs/deploy.md); each then binds its inbox at its own address of ``network`` and
connects to its peers at theirs. With several names, each actor is its own child
process; SIGTERM/SIGINT stops them all, the recorder last.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import trio

from actors.config import Config, ConfigError, actor_environment, load_config, role_of, socket_dir

# vLLM on CPU: the engine in this process (start 2 s instead of 15 s); modest KV cache.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROLES = {
    "recorder": "actors.recorder",
    "scheduler": "actors.scheduler",
    "generator": "actors.generator",
    "tool_executor": "actors.tool_executor",
    "verifier": "actors.verifier",
    "learner": "actors.learner",
}


#: Roles that load the model (the launcher builds the tiny demo model; an actor alone cannot).
MODEL_ROLES = ("scheduler", "generator", "learner")


def check_actor(name: str, config: Config) -> None:
    """Raise ConfigError unless ``name`` can run alone from ``config``."""
    role = role_of(name)
    if role not in ROLES:
        raise ConfigError(f"unknown actor {name!r}; roles are {', '.join(ROLES)} (e.g. generator-0)")
    if name not in config.actor_names():
        raise ConfigError(f"actor {name!r} is not part of this run; its actors are {', '.join(config.actor_names())}")
    if not config.run.run_id:
        raise ConfigError("run.run_id is empty: start actors through `reckon run`, use the run's config.json, "
                          "or set run.run_id (the same on every host)")
    if not config.run.run_dir:
        raise ConfigError("run.run_dir is empty: set it (on a cluster, to a directory every host shares: the "
                          "learner writes the weights there and the generators read them)")
    if role in MODEL_ROLES and not config.model.path:
        raise ConfigError("model.path is empty: `reckon run` builds the tiny demo model, an actor started alone "
                          "does not; build it once with `reckon make-tiny-model DIR` and set model.path = DIR")


def run_actor(name: str, config: Config) -> int:
    """Run actor ``name`` of ``config``'s run in this process until it stops; exit code."""
    from actors.runtime import serve

    check_actor(name, config)
    Path(config.run.run_dir).mkdir(parents=True, exist_ok=True)
    if config.address(name).startswith("ipc://"):
        Path(socket_dir(config.run.run_dir)).mkdir(parents=True, exist_ok=True)
    module = importlib.import_module(ROLES[role_of(name)])
    return trio.run(serve, name, config, config.run.run_id, module.run, getattr(module, "ACK_WHEN_DONE", ()))


def run_actors(names: list[str], config_path: str, overrides: list[str], config: Config) -> int:
    """Run each of ``names`` as its own child process until all have exited; the worst exit code.

    A child that fails is restarted with backoff, up to ``launcher.max_restarts`` times, as
    ``reckon run`` does. SIGTERM/SIGINT is passed on to every child, to the recorder only
    once the others have exited (it must still acknowledge what they send while draining).
    """
    for name in names:
        check_actor(name, config)
    extra = ["--config", config_path] + [a for o in overrides for a in ("--set", o)]
    lcfg = config.launcher
    children: dict[str, subprocess.Popen] = {}
    restarts = dict.fromkeys(names, 0)
    due: dict[str, float] = dict.fromkeys(names, 0.0)  # name -> when to (re)start it
    failed: dict[str, int] = {}
    stopping = False

    def spawn(name: str) -> None:
        env = actor_environment(config, restarts[name], name=name)
        # Own process group: a terminal's Ctrl-C reaches this process only, which orders the stop.
        children[name] = subprocess.Popen([sys.executable, "-m", "actors.main", name, *extra], env=env,
                                          process_group=0)

    def stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        due.clear()
        for name, p in children.items():
            if name != "recorder" and p.poll() is None:
                p.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while due or any(p.poll() is None for p in children.values()):
            now = time.monotonic()
            for name, when in list(due.items()):
                if now >= when:
                    due.pop(name, None)
                    spawn(name)
            for name, p in children.items():
                code = p.poll()
                if code is None or code == 0 or name in due or name in failed:
                    continue
                if stopping or restarts[name] >= lcfg.max_restarts:
                    failed[name] = code
                    if not stopping:
                        print(f"{name} exited with {code} and has no restarts left", file=sys.stderr)
                    continue
                delay = lcfg.restart_backoff_s * 2 ** restarts[name]
                restarts[name] += 1
                due[name] = now + delay
                print(f"{name} exited with {code}; restart {restarts[name]}/{lcfg.max_restarts} in {delay:.1f}s",
                      file=sys.stderr)
            recorder = children.get("recorder")
            others_done = all(p.poll() is not None for n, p in children.items() if n != "recorder")
            if stopping and others_done and recorder is not None and recorder.poll() is None:
                recorder.send_signal(signal.SIGTERM)
            time.sleep(0.2)
    finally:
        signal.signal(signal.SIGTERM, old[signal.SIGTERM])
        signal.signal(signal.SIGINT, old[signal.SIGINT])
    return max((abs(c) for c in failed.values()), default=0)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m actors.main", description="Run actors of a reckon run.")
    parser.add_argument("names", nargs="+", metavar="NAME", help="actor instances, e.g. recorder generator-0")
    parser.add_argument("--config", required=True, help="the run's config.json, or a TOML with run.run_id set")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field (TOML value); repeatable")
    return parser.parse_args(argv)


def start(names: list[str], config_path: str, overrides: list[str] | None = None) -> int:
    """Start ``names`` of the run in ``config_path``: in this process when one, as children when several."""
    overrides = list(overrides or [])
    config = load_config(config_path, overrides)
    if len(set(names)) != len(names):
        raise ConfigError(f"an actor is named twice: {' '.join(names)}")
    if len(names) == 1:
        return run_actor(names[0], config)
    return run_actors(names, config_path, overrides, config)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return start(args.names, args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
