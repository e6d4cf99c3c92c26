"""Process entry point of one actor: ``python -m actors.main NAME --config CONFIG``.

The launcher starts every actor this way; ``reckon actor NAME --config CONFIG`` does the
same by hand, e.g. on another host (the config's run.run_id and addresses must match the
run's).
"""

from __future__ import annotations

import importlib
import os
import sys

import trio

from actors.config import Config, ConfigError, load_config, role_of

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


def run_actor(name: str, config: Config) -> int:
    """Run actor ``name`` of ``config``'s run in this process until it stops; exit code."""
    from actors.runtime import serve

    role = role_of(name)
    if role not in ROLES:
        raise ConfigError(f"unknown actor {name!r}; roles are {', '.join(ROLES)} (e.g. generator-0)")
    if name not in config.actor_names():
        raise ConfigError(f"actor {name!r} is not part of this run; its actors are {', '.join(config.actor_names())}")
    if not config.run.run_id:
        raise ConfigError("run.run_id is empty: start actors through `reckon run`, or use the run's config.json")
    module = importlib.import_module(ROLES[role])
    return trio.run(serve, name, config, config.run.run_id, module.run)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[1] != "--config":
        print("usage: python -m actors.main NAME --config CONFIG", file=sys.stderr)
        return 2
    try:
        return run_actor(argv[0], load_config(argv[2]))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
