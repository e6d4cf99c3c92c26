"""``reckon sql`` and ``reckon replay``: query and re-run a run from its event log.

Every command here opens the log read-only (SQLite ``mode=ro``; PostgreSQL read-only
sessions), so nothing a user types can modify the log.

RUN is a run directory (its ``events.db``) or an SQLite file; ``--url`` names a
PostgreSQL log instead. ``--run-id`` picks a run when the log holds several (default:
the latest).
"""

from __future__ import annotations

import csv
import difflib
import enum
import json
import re
import sys
from collections.abc import Iterator
from typing import Any, Optional

import typer

from protocol.events import (
    Envelope,
    GroupResampled,
    RewardAssigned,
    RolloutRequested,
    ToolCallCompleted,
    ToolCallRequested,
    TrajectoryCompleted,
)
from store.errors import StoreError
from store.log import EventLog
from store.metrics import format_step, step_metrics

replay_app = typer.Typer(help="Rebuild, re-score, re-execute or re-train from a run's log.", no_args_is_help=True)


class Format(str, enum.Enum):
    table = "table"
    csv = "csv"
    json = "json"


_RUN_HELP = "run directory (uses its events.db) or an SQLite .db file"
_URL_HELP = "database URL instead of RUN, e.g. postgresql+psycopg://user@host/db"
_RUN_ID_HELP = "run id inside the log (default: the latest run)"


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _open(run: str | None, url: str | None) -> EventLog:
    if (run is None) == (url is None):
        raise _fail("give either RUN (a run directory or .db file) or --url, not both", 2)
    try:
        return EventLog.open(url or run, readonly=True)  # type: ignore[arg-type]
    except StoreError as e:
        raise _fail(str(e)) from None


def _cell(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    return value


# --------------------------------------------------------------------------- reckon sql


def sql_command(
    target: str = typer.Argument(..., metavar="RUN_OR_SQL", help=f"{_RUN_HELP}; with --url, the SQL statement"),
    statement: Optional[str] = typer.Argument(None, metavar="SQL", help="one SELECT statement"),
    url: Optional[str] = typer.Option(None, "--url", help=_URL_HELP),
    fmt: Format = typer.Option(Format.table, "--format", "-f", help="output format"),
) -> None:
    """Run one read-only SQL statement over a run's event log.

    Views: trajectories, tool_calls, rewards, train_steps, batches, groups, stages,
    capacity, evals, weights, actor_errors; tables: events, runs (see docs/store.md).
    """
    if url is not None and statement is None:
        run, statement = None, target
    elif statement is None:
        raise _fail('missing SQL statement: reckon sql RUN "SELECT ..."', 2)
    else:
        run = target
        if url is not None:
            raise _fail("give either RUN or --url, not both", 2)
    log = _open(run, url)
    try:
        cols, rows = log.query(statement)
    except StoreError as e:
        raise _fail(str(e)) from None
    finally:
        log.close()
    rows = [tuple(_cell(v) for v in row) for row in rows]
    if fmt is Format.csv:
        w = csv.writer(sys.stdout)
        w.writerow(cols)
        w.writerows(rows)
    elif fmt is Format.json:
        typer.echo(json.dumps([dict(zip(cols, row)) for row in rows], default=str, ensure_ascii=False, indent=1))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(*cols, show_lines=False)
        for row in rows:
            table.add_row(*("NULL" if v is None else str(v) for v in row))
        Console().print(table)
        typer.echo(f"({len(rows)} row{'s' if len(rows) != 1 else ''})", err=True)


#: ``reckon sql`` is one command, so it is exported as the function to register with
#: ``main_app.command("sql")(app)``: mounting a one-command Typer with ``add_typer`` would
#: make it ``reckon sql sql ...``, and a Typer callback with positional arguments
#: mis-parses options placed after them.
app = sql_command


# --------------------------------------------------------------------------- reckon replay


def _run_log(run: str | None, url: str | None, run_id: str | None) -> tuple[EventLog, str]:
    log = _open(run, url)
    try:
        return log, log.resolve_run(run_id)
    except StoreError as e:
        log.close()
        raise _fail(str(e)) from None


@replay_app.command("metrics")
def metrics_command(
    run: Optional[str] = typer.Argument(None, help=_RUN_HELP),
    url: Optional[str] = typer.Option(None, "--url", help=_URL_HELP),
    run_id: Optional[str] = typer.Option(None, "--run-id", help=_RUN_ID_HELP),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per step instead of the printed lines"),
) -> None:
    """Rebuild per-step metrics from the log alone: the same lines the run printed."""
    log, rid = _run_log(run, url, run_id)
    try:
        for m in step_metrics(log, rid):
            typer.echo(json.dumps(m) if as_json else format_step(m))
    except StoreError as e:
        raise _fail(str(e)) from None
    finally:
        log.close()


_TOOL_RESPONSE = re.compile(r"<tool_response>\n?(.*?)\n?</tool_response>", re.S)
_CHAT_MARKERS = re.compile(r"<\|im_(?:start|end)\|>(?:user|assistant)?\n?")


def _model_turns(text: str) -> list[str]:
    """The model's own text per turn: response text split at the tool responses."""
    return [_CHAT_MARKERS.sub("", part).strip() for part in _TOOL_RESPONSE.split(text)[::2]]


@replay_app.command("show")
def show_command(
    trajectory_id: str = typer.Argument(..., help="the rollout id (see: reckon sql RUN 'SELECT rollout_id FROM trajectories')"),
    run: Optional[str] = typer.Argument(None, help=_RUN_HELP),
    url: Optional[str] = typer.Option(None, "--url", help=_URL_HELP),
) -> None:
    """Print one trajectory turn by turn: model text, code, tool output, reward trace."""
    log = _open(run, url)
    try:
        envs = [env for _, env in log.read(stream_id=trajectory_id)]
        groups: list[GroupResampled] = []
        traj = next((e.payload for e in envs if isinstance(e.payload, TrajectoryCompleted)), None)
        if traj is not None:
            groups = [
                e.payload
                for _, e in log.read(run_id=envs[0].run_id, types=[GroupResampled.TYPE], stream_id=traj.group_id)
            ]
    except StoreError as e:
        raise _fail(str(e)) from None
    finally:
        log.close()
    if not envs:
        raise _fail(f"no events for trajectory {trajectory_id!r} in {run or url}")
    typer.echo("\n".join(_render_trajectory(trajectory_id, envs, groups)))


def _render_trajectory(rid: str, envs: list[Envelope], groups: list[GroupResampled]) -> Iterator[str]:
    req = next((e.payload for e in envs if isinstance(e.payload, RolloutRequested)), None)
    traj = next((e.payload for e in envs if isinstance(e.payload, TrajectoryCompleted)), None)
    calls = [e.payload for e in envs if isinstance(e.payload, ToolCallRequested)]
    done = {e.payload.call_id: e.payload for e in envs if isinstance(e.payload, ToolCallCompleted)}
    yield f"trajectory {rid}  (run {envs[0].run_id})"
    if req is not None:
        yield f"problem {req.problem_id}, step {req.step}, stage {req.stage}, generator {req.generator}, gold {req.answer}"
        yield f"--- user ---\n{req.problem}"
    turns = _model_turns(traj.response_text) if traj is not None else []
    for i in range(max(len(turns), len(calls))):
        yield f"--- turn {i + 1}: model ---"
        if i < len(turns):
            yield turns[i]
        if i < len(calls):
            call = calls[i]
            yield f"--- turn {i + 1}: tool call {call.call_id} on {call.executor} ---\n{call.code}"
            res = done.get(call.call_id)
            if res is None:
                yield "(no result logged)"
            else:
                yield f"--- tool result: {res.status} (exit {res.exit_code}, {res.duration_s:.3f}s) ---"
                yield res.stdout + (f"\n[stderr]\n{res.stderr}" if res.stderr else "")
    if traj is not None:
        yield (
            f"--- finished: {traj.finish_reason}, {traj.turns} turns, {traj.prompt_ids.shape[0]} prompt + "
            f"{traj.response_ids.shape[0]} response tokens, {traj.seconds:.2f}s ---"
        )
    else:
        yield "--- not finished in the log ---"
    for e in envs:
        if isinstance(e.payload, RewardAssigned):
            r = e.payload
            yield (
                f"reward {r.reward} (correct={r.correct}) by {e.source}: extracted {r.extracted!r}, gold {r.gold!r}, "
                f"method {r.method}, {r.answer_tags} answer tags, {r.seconds:.3f}s"
            )
    for g in groups:
        fate = "kept" if rid in g.kept else "dropped" if rid in g.dropped else "absent"
        extra = f", advantage {g.advantages[rid]:+.3f}" if rid in g.advantages else ""
        penalty = f", p_total {g.penalties[rid]:.3f}" if rid in g.penalties else ""
        yield f"group {g.group_id}: {fate} ({g.mode}, {g.reason}){penalty}{extra}"


@replay_app.command("rescore")
def rescore_command(
    run: Optional[str] = typer.Argument(None, help=_RUN_HELP),
    url: Optional[str] = typer.Option(None, "--url", help=_URL_HELP),
    run_id: Optional[str] = typer.Option(None, "--run-id", help=_RUN_ID_HELP),
) -> None:
    """Re-verify every trajectory with the current verifier; list disagreements with the log."""
    from training.rewards import score  # lazy: pulls in math-verify

    log, rid = _run_log(run, url, run_id)
    trajs: dict[str, TrajectoryCompleted] = {}
    logged: dict[str, RewardAssigned] = {}
    try:
        for _, env in log.read(run_id=rid, types=[TrajectoryCompleted.TYPE, RewardAssigned.TYPE]):
            if isinstance(env.payload, TrajectoryCompleted):
                trajs[env.payload.rollout_id] = env.payload
            else:
                logged[env.payload.rollout_id] = env.payload  # the latest verdict wins
    except StoreError as e:
        raise _fail(str(e)) from None
    finally:
        log.close()
    disagree = 0
    for rollout_id, traj in trajs.items():
        now = score(traj.response_text, traj.answer)
        old = logged.get(rollout_id)
        if old is None or old.correct != now.correct or old.reward != now.reward:
            disagree += 1
            was = "no reward logged" if old is None else f"{old.reward} ({old.method}, extracted {old.extracted!r})"
            typer.echo(f"{rollout_id}: logged {was} -> now {now.reward} ({now.method}, extracted {now.extracted!r})")
    typer.echo(f"{len(trajs)} trajectories re-scored, {disagree} disagree with the log")


@replay_app.command("tools")
def tools_command(
    run: Optional[str] = typer.Argument(None, help=_RUN_HELP),
    url: Optional[str] = typer.Option(None, "--url", help=_URL_HELP),
    run_id: Optional[str] = typer.Option(None, "--run-id", help=_RUN_ID_HELP),
    limit: Optional[int] = typer.Option(None, "--limit", help="re-execute at most this many calls"),
) -> None:
    """Re-execute logged tool calls in the sandbox and diff status, stdout and stderr."""
    import trio

    from tools_sandbox import SandboxConfig, SandboxPool  # lazy: starts no zygote until used

    log, rid = _run_log(run, url, run_id)
    requests: list[ToolCallRequested] = []
    results: dict[str, ToolCallCompleted] = {}
    try:
        for _, env in log.read(run_id=rid, types=[ToolCallRequested.TYPE, ToolCallCompleted.TYPE]):
            if isinstance(env.payload, ToolCallRequested):
                requests.append(env.payload)
            else:
                results[env.payload.call_id] = env.payload
    except StoreError as e:
        raise _fail(str(e)) from None
    finally:
        log.close()
    requests = requests[:limit] if limit is not None else requests

    async def rerun() -> list[Any]:
        out: list[Any] = [None] * len(requests)
        async with SandboxPool(SandboxConfig()) as pool:

            async def one(i: int, req: ToolCallRequested) -> None:
                out[i] = await pool.execute(req.code, timeout_s=req.timeout_s)

            async with trio.open_nursery() as nursery:
                for i, req in enumerate(requests):
                    nursery.start_soon(one, i, req)
        return out

    fresh = trio.run(rerun)
    differ = 0
    for req, new in zip(requests, fresh):
        old = results.get(req.call_id)
        lines = _diff_call(old, new)
        if lines:
            differ += 1
            typer.echo(f"--- {req.call_id} (rollout {req.rollout_id}, turn {req.turn}) ---")
            typer.echo("\n".join(lines))
    typer.echo(f"{len(requests)} tool calls re-executed, {differ} differ from the log")


def _diff_call(old: ToolCallCompleted | None, new: Any) -> list[str]:
    if old is None:
        return [f"no result logged; now {new.status}"]
    lines = [f"status: {old.status} -> {new.status}"] if old.status != new.status else []
    for name in ("stdout", "stderr"):
        a, b = getattr(old, name), getattr(new, name)
        if a != b:
            lines += list(difflib.unified_diff(a.splitlines(), b.splitlines(), f"logged {name}", f"now {name}", lineterm=""))
    return lines


@replay_app.command("train")
def train_command(
    run: Optional[str] = typer.Argument(None, help=_RUN_HELP),
    url: Optional[str] = typer.Option(None, "--url", help=_URL_HELP),
    run_id: Optional[str] = typer.Option(None, "--run-id", help=_RUN_ID_HELP),
    tol: float = typer.Option(
        1e-5, "--tol", min=0.0, help="largest |logged - replayed| loss (metrics: relative to max(1, |logged|))"
    ),
    from_step: Optional[int] = typer.Option(
        None, "--from-step", help="check steps from this logged step on (chain mode still trains the earlier ones)"
    ),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="check at most this many steps"),
    from_published: bool = typer.Option(
        False, "--from-published",
        help="start each step from the weights the run published before it (steps checked independently)",
    ),
    model: Optional[str] = typer.Option(
        None, "--model", help="the run's initial model directory (default: the logged model.path)"
    ),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per step instead of the table"),
) -> None:
    """Re-run learner steps from logged batches (train-only replay, no generators).

    Rebuilds the learner from the logged config and initial model, trains
    it on each BatchFormed in the order the run did (lr, optimizer reset
    and kind as logged), and compares every step's loss and metrics with
    its TrainStepCompleted; exits 1 if one differs by more than --tol.
    Reads the log only; scratch files go to a temporary directory.
    """
    import tempfile
    from pathlib import Path

    from store import replay_train as rt

    log, rid = _run_log(run, url, run_id)
    local_dir = Path(run) if run is not None and Path(run).is_dir() else None
    try:
        training = rt.load_steps(log, rid, config_file=local_dir / "config.json" if local_dir else None)
    except StoreError as e:
        raise _fail(str(e)) from None
    finally:
        log.close()
    if model is not None:
        model_dir = Path(model)
    else:
        logged = str(training.config.get("model", {}).get("path", ""))
        if not logged:
            raise _fail(f"the logged config of run {rid} names no model.path; pass --model DIR (the initial model)")
        model_dir = rt.relocate(logged, training.logged_run_dir, local_dir)
    if not (model_dir / "config.json").is_file():
        raise _fail(f"initial model {str(model_dir)!r} is not a Hugging Face model directory; pass --model DIR")
    if training.untrained:
        typer.echo(f"note: {len(training.untrained)} logged batch(es) have no TrainStepCompleted and are not replayed "
                   f"(steps {', '.join(str(b.step) for b in training.untrained[:8])})", err=True)

    def resolve(path: str) -> Path:
        return rt.relocate(path, training.logged_run_dir, local_dir)

    failed: list[int] = []
    max_loss = max_metric = 0.0
    n = 0
    with tempfile.TemporaryDirectory(prefix="reckon-replay-") as work:
        if not as_json:
            typer.echo(rt.TABLE_HEADER)
        try:
            for c in rt.replay(training, model_dir=model_dir, work_dir=Path(work), resolve=resolve,
                               from_published=from_published, first_step=from_step, max_steps=steps):
                n += 1
                max_loss, max_metric = max(max_loss, c.loss_diff), max(max_metric, c.worst_diff)
                if not c.ok(tol):
                    failed.append(c.step.done.step)
                typer.echo(json.dumps(rt.comparison_json(c)) if as_json else rt.format_row(c))
        except StoreError as e:
            raise _fail(str(e)) from None
    if n == 0:
        raise _fail(f"no logged step of run {rid} is at or after --from-step {from_step}")
    mode = "from published weights" if from_published else "chained from the initial model"
    verdict = "OK" if not failed else f"FAILED at step(s) {', '.join(map(str, failed[:20]))}"
    typer.echo(f"replayed {n} step(s) of run {rid} ({mode}): max |loss diff| {max_loss:.1e}, "
               f"max metric diff {max_metric:.1e}, tolerance {tol:g}: {verdict}", err=as_json)
    if failed:
        raise typer.Exit(1)


def main() -> None:
    """``python -m store.cli``: both apps under one command (sql, replay ...)."""
    root = typer.Typer(no_args_is_help=True, add_completion=False)
    root.command("sql")(app)
    root.add_typer(replay_app, name="replay")
    root()


if __name__ == "__main__":
    main()
