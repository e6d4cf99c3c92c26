"""``reckon ablate``: the same run with GRPO-RoC and with plain GRPO, compared in one report.

Both runs use one config and seed; only ``rollout.roc.mode`` differs:

- **GRPO-RoC**: the config's RoC mode (``release`` if it says ``none``): per prompt 2G
  rollouts, groups with equal rewards dropped, negatives kept at random, positives with
  the fewest tool errors and format faults kept (training/roc.py).
- **GRPO** (the baseline): ``mode = "none"``: the same 2G rollouts, equal-reward groups
  dropped, then G kept *uniformly at random*. A uniform random G of 2G i.i.d. samples is
  distributed as G samples drawn directly, so each prompt trains on G trajectories drawn
  from the policy as in the paper's GRPO baseline (the same batch size and number of
  trained trajectories as RoC, which is what makes the step-for-step comparison fair).
  Keeping all 2G would train on twice the data per step and is not offered.

The runs execute one after the other (each is a whole ``reckon run``), into
``OUT/grpo-roc`` and ``OUT/grpo``; then ``OUT/report`` gets the side-by-side report and
``OUT/comparison.json`` the headline figures, also printed: per RL step and overall (up
to the last RL step both runs reached) the tool-error rate of positive trajectories,
the mean reward, and the held-out avg pass@1.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import typer

from actors.config import Config, ConfigError, load_config

class AblateError(ValueError):
    """The ablation cannot run as asked; the message says why."""


#: (label, run sub-directory) of the two arms, in report order.
ARMS = (("GRPO-RoC", "grpo-roc"), ("GRPO", "grpo"))


def arm_configs(cfg: Config, out: Path) -> dict[str, Config]:
    """The two configs of the ablation: label -> config with its own run directory and RoC mode."""
    roc_mode = cfg.rollout.roc.mode if cfg.rollout.roc.mode != "none" else "release"
    out_cfgs = {}
    for (label, sub), mode in zip(ARMS, (roc_mode, "none")):
        run = cfg.run.model_copy(update={"run_dir": str(out / sub), "run_id": "", "name": f"{cfg.run.name}-{sub}"})
        roc = cfg.rollout.roc.model_copy(update={"mode": mode})
        rollout = cfg.rollout.model_copy(update={"roc": roc})
        out_cfgs[label] = cfg.model_copy(update={"run": run, "rollout": rollout})
    return out_cfgs


def _completed(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that completed with status ok."""
    if not (run_dir / "events.db").is_file():
        return False
    from store import EventLog

    try:
        with EventLog.open(run_dir, readonly=True) as log:
            done = list(log.read(types=["RunCompleted"]))
    except Exception:
        return False
    return bool(done) and done[-1][1].payload.status == "ok"


def compare(sources: dict[str, str]) -> dict:
    """The headline figures of the arms, at the same RL step count.

    For each label: per RL step (1-based, up to the last one every arm reached) the
    tool-error rate of positive trajectories, of all trajectories, and the mean reward;
    their means over those steps and over the second half of them; and the held-out avg
    pass@1 of every evaluation up to there (RL step at which it was made -> pass@1).
    """
    from store.report import _rl_steps, _rl_x, load_runs

    runs = load_runs(list(sources.values()), list(sources))
    n = min((len(_rl_steps(r)) for r in runs), default=0)
    out: dict = {"rl_steps_compared": n, "arms": {}}
    for run in runs:
        rows = _rl_steps(run)[:n]
        last_global = rows[-1].step if rows else 0
        arm: dict = {"run_dir": run.source, "run_id": run.run_id, "status": run.status, "per_step": []}
        for i, r in enumerate(rows, start=1):
            arm["per_step"].append({
                "rl_step": i, "step": r.step, "stage": r.stage, "reward": r.reward, "n_trajectories": r.n_trajectories,
                "n_positive": r.n_positive, "tool_error_rate_pos": r.tool_error_rate_pos,
                "tool_error_rate": r.tool_error_rate, "tool_calls": r.tool_calls,
            })  # fmt: skip
        for attr in ("tool_error_rate_pos", "tool_error_rate", "reward", "tool_calls"):
            vals = [getattr(r, attr) for r in rows]
            arm[f"{attr}_mean"] = _mean(vals)
            arm[f"{attr}_second_half"] = _mean(vals[len(vals) // 2 :])
        arm["tool_error_rate_pos_pooled"] = _pooled_pos_error_rate(run, {r.step for r in rows})
        arm["evals"] = [
            {"dataset": e["dataset"], "rl_step": _rl_x(run, int(e["step"])), "step": int(e["step"]),
             "pass_at_1": e["pass_at_1"], "k": e["k"], "source": e.get("source")}
            for e in run.evals if int(e["step"]) <= last_global or not rows
        ]  # fmt: skip
        out["arms"][run.label] = arm
    return out


def _mean(vals: list) -> float | None:
    v = [x for x in vals if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else None


def _pooled_pos_error_rate(run, steps: set[int]) -> float | None:
    """Failed / all tool calls of every correct training trajectory of ``steps`` together."""
    from store import EventLog

    if not steps:
        return None
    with EventLog.open(run.source, readonly=True) as log:
        placeholder = "%(run)s" if log.dialect == "postgresql" else ":run"
        _, rows = log.query(
            "SELECT step, SUM(n_tool_calls), SUM(n_tool_errors) FROM trajectories "
            f"WHERE run_id = {placeholder} AND correct = 1 AND stage NOT IN ('eval', 'filter') GROUP BY step",
            {"run": run.run_id},
        )
    calls = sum(int(c or 0) for s, c, _ in rows if s in steps)
    errors = sum(int(e or 0) for s, _, e in rows if s in steps)
    return errors / calls if calls else None


def format_comparison(cmp: dict) -> list[str]:
    """Printable lines: a per-step table of tool-error rate (positive), reward, and the summary."""
    arms = cmp["arms"]
    labels = list(arms)
    n = cmp["rl_steps_compared"]

    def num(v, d=3):
        return "   –  " if v is None else f"{v:.{d}f}"

    lines = [f"compared at the same RL step count: {n} RL steps"]
    head = "RL step | " + " | ".join(f"{lab:>10} tool-err+ {lab:>10} reward" for lab in labels)
    lines.append(head)
    for i in range(n):
        cells = []
        for lab in labels:
            r = arms[lab]["per_step"][i]
            cells.append(f"{num(r['tool_error_rate_pos']):>20} {num(r['reward']):>17}")
        lines.append(f"{i + 1:>7} | " + " | ".join(cells))
    for lab in labels:
        a = arms[lab]
        ev = "; ".join(f"{e['dataset']}@RL{e['rl_step']:.0f} {num(e['pass_at_1'])}" for e in a["evals"]) or "none"
        lines.append(
            f"{lab}: tool-error rate of positive trajectories {num(a['tool_error_rate_pos_pooled'])} pooled, "
            f"{num(a['tool_error_rate_pos_mean'])} mean of steps, {num(a['tool_error_rate_pos_second_half'])} "
            f"second half; all trajectories {num(a['tool_error_rate_mean'])}; reward {num(a['reward_mean'])}; "
            f"held-out pass@1: {ev}"
        )
    if len(labels) == 2:
        a, b = (arms[lab]["tool_error_rate_pos_pooled"] for lab in labels)
        if a is not None and b is not None:
            verdict = "lower" if a < b else ("equal" if a == b else "HIGHER")
            lines.append(f"=> {labels[0]} tool-error rate of positive trajectories is {verdict} than {labels[1]}'s "
                         f"({a:.3f} vs {b:.3f}, pooled over the {n} RL steps)")  # fmt: skip
        else:
            lines.append(f"=> no comparison: {' and '.join(lab for lab in labels if arms[lab]['tool_error_rate_pos_pooled'] is None)} "
                         "had no correct trajectory with a tool call in these steps (the policy solves nothing yet)")  # fmt: skip
    return lines


def ablate(cfg: Config, out: Path, *, reuse: bool = False, quiet: bool = False) -> tuple[int, dict, dict]:
    """Run both arms (skipping an arm already completed in ``out`` when ``reuse``), then report and compare.

    Returns (exit code: 0 when both runs completed ok, comparison, report paths).
    """
    from actors.launcher import launch
    from store.report import build_report

    out.mkdir(parents=True, exist_ok=True)
    codes = {}
    for label, arm in arm_configs(cfg, out).items():
        run_dir = Path(arm.run.run_dir)
        if reuse and _completed(run_dir):
            typer.echo(f"== {label}: reusing the completed run in {run_dir}")
            codes[label] = 0
            continue
        if (run_dir / "events.db").exists():
            raise AblateError(f"{run_dir} already holds a run; pass --reuse to keep completed runs, or choose another --out")
        typer.echo(f"== {label}: rollout.roc.mode = {arm.rollout.roc.mode!r}, run dir {run_dir}")
        t0 = time.monotonic()
        codes[label], _ = launch(arm, quiet=quiet)
        typer.echo(f"== {label}: exit {codes[label]} after {time.monotonic() - t0:.0f}s")
    sources = {label: str(out / sub) for label, sub in ARMS}
    paths = build_report(list(sources.values()), str(out / "report"), labels=list(sources))
    cmp = compare(sources)
    (out / "comparison.json").write_text(json.dumps(cmp, indent=1))
    return (0 if all(c == 0 for c in codes.values()) else 1), cmp, paths


def ablate_command(
    config: str = typer.Argument(..., help="TOML config of the run to ablate, e.g. configs/demo.toml"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="output directory (default: runs/ablate-NAME-TIMESTAMP)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override for both runs: section.field=value"),
    reuse: bool = typer.Option(False, "--reuse", help="keep an arm already completed in --out (re-report only)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="do not print each run's progress"),
) -> None:
    """Run CONFIG twice, GRPO-RoC vs plain GRPO (rollout.roc.mode = none), and compare them in one report.

    Prints the tool-error rate of positive trajectories, reward and held-out pass@1 of both at the same
    RL step count; writes OUT/report (PNG, HTML, TensorBoard) and OUT/comparison.json.
    """
    try:
        cfg = load_config(config, list(set_ or []))
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if not cfg.stages:
        typer.echo(f"error: {config} has no RL stages ([[stages]]): there is nothing to ablate", err=True)
        raise typer.Exit(2)
    out_dir = Path(out) if out else Path(cfg.run.runs_dir) / f"ablate-{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    from store.errors import StoreError

    try:
        code, cmp, paths = ablate(cfg, out_dir, reuse=reuse, quiet=quiet)
    except AblateError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except StoreError as e:  # a run that failed before logging anything: no report
        typer.echo(f"error: cannot compare the runs: {e}", err=True)
        raise typer.Exit(1) from None
    for line in format_comparison(cmp):
        typer.echo(line)
    for kind, path in {**paths, "comparison": str(out_dir / "comparison.json")}.items():
        typer.echo(f"{kind}: {path}")
    raise typer.Exit(code)
