"""The ``reckon`` command line."""

from __future__ import annotations

import sys
from typing import List, Optional

import typer

from actors.config import ConfigError, load_config

app = typer.Typer(
    help="reckon: agentic RL (rStar2-Agent, GRPO-RoC) as an event-sourced actor system.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


@app.command()
def run(
    config: str = typer.Argument(..., help="TOML config, e.g. configs/demo.toml"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override: section.field=value (TOML value)"),
    run_dir: Optional[str] = typer.Option(None, help="run directory (default: runs/NAME-TIMESTAMP)"),
) -> None:
    """Run a whole training run: every actor as its own process, until the recipe ends."""
    from actors.launcher import launch

    overrides = list(set_ or [])
    if run_dir:
        overrides.append(f'run.run_dir="{run_dir}"')
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        _fail(str(e))
    code, _ = launch(cfg)
    raise typer.Exit(code)


@app.command()
def actor(
    names: List[str] = typer.Argument(
        ..., help="actor instances to run on this host: recorder, scheduler, learner, generator-0, tool-0, verifier-0"
    ),
    config: str = typer.Option(..., "--config", help="the run's config.json, or a TOML with run.run_id set"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override: section.field=value (TOML value)"),
) -> None:
    """Start actors of a run by hand: on a cluster, one command per host (docs/deploy.md).

    One name runs in this process; several run as child processes, restarted when they fail,
    stopped together by Ctrl-C or SIGTERM (the recorder last).
    """
    from actors.main import start

    try:
        code = start(names, config, list(set_ or []))
    except ConfigError as e:
        _fail(str(e))
    raise typer.Exit(code)


def _mount() -> None:
    from store.cli import app as sql_app, replay_app
    from tools_sandbox.cli import app as sandbox_app
    from training.rewards import verify_command
    from actors.simulator import simulate_app
    from store.report import report_command
    from training.tiny import make_tiny_model_command
    from actors.evaluate import eval_command
    from actors.ablate import ablate_command

    app.add_typer(replay_app, name="replay", help="Rebuild, re-score, re-execute or re-train from a run's log.")
    app.add_typer(sandbox_app, name="sandbox", help="The isolated Python sandbox: exec, serve, bench.")
    app.command("verify")(verify_command)
    app.command("report")(report_command)
    app.command("make-tiny-model")(make_tiny_model_command)
    app.command("sql")(sql_app)
    app.command("simulate")(simulate_app)
    app.command("eval")(eval_command)
    app.command("ablate")(ablate_command)


def main() -> None:
    _mount()
    try:
        app()
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
