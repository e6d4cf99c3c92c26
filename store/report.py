"""``reckon report``: training curves of one run, or of several side by side, from the log alone.

A report is three things written under one output directory:

- ``report.png`` — a grid of panels: mean reward of the training rollouts, held-out
  accuracy (avg pass@1 per dataset, where measured; ``reckon eval`` results as hollow
  markers), tool-error rate of the positive (correct) trajectories and of all
  trajectories, tool calls per trajectory, response length, PPO clip fractions and the
  policy loss, all over **RL steps** (1 = the first RL step, so a long SFT stage does not
  squeeze them and runs with different SFT lengths compare step for step); RL stage
  starts are dashed lines labelled with the stage name, the SFT stage is the shaded band
  before RL step 1 (an evaluation after SFT sits there, at 0); RL steps with no
  optimizer step (every group had equal rewards) are circled. The SFT loss has its own
  panel over SFT steps. Several runs share the axes, one colour per run (the ablation:
  GRPO-RoC vs plain GRPO).
- ``report.html`` — one self-contained page: the PNG (base64), a summary per run, the
  run configuration and its stages, every evaluation, and the per-step numbers.
- ``tensorboard/<label>/`` — the same numbers as TensorBoard scalars
  (``rollout/reward``, ``rollout/tool_calls``, ``eval/<dataset>/pass_at_1``,
  ``loss/pg``, ``actor/clip_frac_high``, ...), one directory per run.

Everything is read through the SQL views (``trajectories``, ``train_steps``, ``stages``;
docs/store.md) and the EvalCompleted events themselves, with the log opened read-only, so a report works on SQLite
and PostgreSQL logs alike, while the run is still writing, and never modifies the log.

Rollout curves count every rollout the scheduler sampled for training at that step
(all 2G before RoC down-sampling, like the printed step line of ``store.metrics``), so
they show the policy's behaviour, not the selection; evaluation and hard-problem filter
probes (stage names in :data:`PROBE_STAGES`) are left out of them.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

from store.errors import StoreError
from store.log import DB_FILENAME, EventLog

#: Stage tags of rollouts that are not training rollouts (scheduler probes).
PROBE_STAGES = ("eval", "filter")
#: File names inside the output directory.
PNG_NAME, HTML_NAME, TB_DIR = "report.png", "report.html", "tensorboard"
#: Above this many points a curve is drawn raw (faint) plus a centred moving average.
SMOOTH_ABOVE = 40
#: Config entries shown in the run summary (dotted paths into the RunStarted config).
CONFIG_SUMMARY_KEYS = (
    "model.path",
    "data.train",
    "data.eval",
    "run.seed",
    "rollout.temperature",
    "rollout.roc.mode",
    "rollout.staleness",
    "sft.enabled",
    "sft.epochs",
    "sft.lr",
    "eval.k",
    "eval.temperature",
    "eval.max_tokens",
    "eval.max_turns",
)


#: EvalCompleted fields a report keeps.
_EVAL_FIELDS = ("dataset", "step", "weights_version", "k", "temperature", "pass_at_1", "n_problems",
                "mean_response_tokens", "mean_tool_calls", "tool_error_rate", "max_tokens", "max_turns", "model")


class ReportError(StoreError):
    """A report cannot be built from the given input; the message names the input."""


# --------------------------------------------------------------------------- data


@dataclass
class StepRow:
    """Everything known about one optimizer step of a run (None: not measured)."""

    step: int
    stage: str | None = None
    kind: str | None = None  # "rl" | "sft"; None for rollouts whose step has no train step yet
    n_trajectories: int = 0
    reward: float | None = None  # mean over the step's training rollouts
    response_len: float | None = None  # mean response tokens (model + tool tokens)
    tool_calls: float | None = None  # mean per trajectory
    tool_error_rate: float | None = None  # failed calls / calls, all trajectories
    tool_error_rate_pos: float | None = None  # failed calls / calls, correct trajectories
    n_positive: int = 0
    loss: float | None = None
    clip_frac_low: float | None = None
    clip_frac_high: float | None = None
    clip_frac_dual: float | None = None
    grad_norm: float | None = None
    entropy: float | None = None
    lr: float | None = None
    n_sequences: int | None = None  # sequences trained on (after RoC)
    seconds: float | None = None
    ts: float | None = None  # unix time the step was logged
    metrics: dict[str, Any] = field(default_factory=dict)  # every learner metric of the step


@dataclass
class StageInfo:
    """One StageStarted of a run and the step it starts at."""

    name: str
    index: int
    kind: str
    steps: int
    max_tokens: int
    max_turns: int
    prompts_per_step: int
    rollouts_per_prompt: int
    group_size: int
    lr: float
    optimizer_reset: bool
    n_problems: int
    start_step: int  # first optimizer step after the stage started


@dataclass
class RunData:
    """What a report shows of one run, read from its event log."""

    source: str  # the input as given
    label: str  # legend name
    run_id: str
    name: str
    status: str  # from the runs table or RunCompleted; "unknown" when neither says
    config: dict[str, Any]
    steps: list[StepRow]
    evals: list[dict[str, Any]]  # EvalCompleted fields + position, ts, source; by step, then log order
    stages: list[StageInfo]

    def series(self, attr: str, kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one StepRow attribute, NaN where unmeasured; ``kind`` filters."""
        rows = [r for r in self.steps if kind is None or r.kind == kind]
        y = np.array([np.nan if getattr(r, attr) is None else float(getattr(r, attr)) for r in rows], dtype=float)
        return np.array([r.step for r in rows], dtype=float), y


def _split_source(source: str) -> tuple[str, str | None]:
    """``"target#run_id"`` -> (target, run_id); a path that exists with its '#' stays whole."""
    if "#" in source and not Path(source).exists():
        target, _, run_id = source.rpartition("#")
        return target, run_id or None
    return source, None


def _open_source(source: str) -> tuple[EventLog, str]:
    """Open the log behind ``source`` read-only and resolve its run id (ReportError if not)."""
    target, run_id = _split_source(source)
    if "://" not in target:
        path = Path(target).expanduser()
        if not path.exists():
            raise ReportError(f"{source}: no such run directory or event log file")
        if path.is_dir() and not (path / DB_FILENAME).is_file():
            raise ReportError(f"{source} is not a run directory: it has no {DB_FILENAME}")
    try:
        log = EventLog.open(target, readonly=True)
    except StoreError as e:
        raise ReportError(f"{source}: {e}") from e
    try:
        return log, log.resolve_run(run_id)
    except StoreError as e:
        log.close()
        raise ReportError(f"{source}: {e}") from e


def _f(value: Any) -> float | None:
    """A database number (float, int, Decimal from PostgreSQL AVG) as float; None stays None."""
    if value is None:
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _select(log: EventLog, sql: str, run_id: str) -> list[dict[str, Any]]:
    """Rows of ``sql`` (with ``{run}`` standing for the run id parameter) as dicts."""
    placeholder = "%(run)s" if log.dialect == "postgresql" else ":run"
    cols, rows = log.query(sql.format(run=placeholder), {"run": run_id})
    return [dict(zip(cols, row)) for row in rows]


def load_run(source: str, label: str | None = None) -> RunData:
    """Read one run's report data from ``source``.

    ``source``: a run directory (its events.db), an SQLite file or a database URL,
    optionally ``#run_id`` to pick a run in a log holding several (default: the latest).
    ``label``: legend name (default: the run's name). Opens the log read-only. Raises
    ReportError naming ``source`` when it does not exist, is not an event log, has no
    such run, or the run has no training steps, rollouts or evaluations yet.
    """
    log, run_id = _open_source(source)
    try:
        return _load(log, source, run_id, label)
    except ReportError:
        raise
    except StoreError as e:
        raise ReportError(f"{source}: reading run {run_id} failed: {e}") from e
    finally:
        log.close()


def _load(log: EventLog, source: str, run_id: str, label: str | None) -> RunData:
    probes = ", ".join(f"'{s}'" for s in PROBE_STAGES)
    rollouts = _select(
        log,
        "SELECT step, COUNT(*) AS n, AVG(reward) AS reward, AVG(n_response_tokens) AS response_len, "
        "AVG(n_tool_calls) AS tool_calls, SUM(n_tool_calls) AS calls, SUM(n_tool_errors) AS errors, "
        "SUM(CASE WHEN correct = 1 THEN 1 ELSE 0 END) AS n_pos, "
        "SUM(CASE WHEN correct = 1 THEN n_tool_calls ELSE 0 END) AS pos_calls, "
        "SUM(CASE WHEN correct = 1 THEN n_tool_errors ELSE 0 END) AS pos_errors, MAX(ts) AS ts, "
        "MIN(stage) AS stage, MIN(position) AS position "
        f"FROM trajectories WHERE run_id = {{run}} AND stage NOT IN ({probes}) GROUP BY step ORDER BY step",
        run_id,
    )
    train = _select(
        log,
        "SELECT position, ts, step, stage, kind, loss, clip_frac_low, clip_frac_high, clip_frac_dual, grad_norm, "
        "entropy, lr, n_sequences, seconds, metrics FROM train_steps WHERE run_id = {run} ORDER BY position",
        run_id,
    )
    # EvalCompleted payloads in full (fields added after the evals view was defined, e.g.
    # tool_error_rate, come with their defaults from older logs), and who evaluated.
    evals = [
        {"position": pos, "ts": env.ts, "source": env.source, **{f: getattr(env.payload, f) for f in _EVAL_FIELDS}}
        for pos, env in log.read(run_id=run_id, types=["EvalCompleted"])
    ]
    evals.sort(key=lambda e: (int(e["step"]), e["position"]))
    # The scheduler's evaluations before tool_error_rate was logged: count it from their probe
    # trajectories (stage "eval" at that step), when one dataset was evaluated there.
    missing = [e for e in evals if e["tool_error_rate"] is None and e["source"] != "eval"]
    if missing:
        probe = {int(r["step"]): r for r in _select(
            log, "SELECT step, SUM(n_tool_calls) AS calls, SUM(n_tool_errors) AS errors FROM trajectories "
            "WHERE run_id = {run} AND stage = 'eval' GROUP BY step", run_id)}  # fmt: skip
        per_step: dict[int, int] = {}
        for e in evals:
            if e["source"] != "eval":
                per_step[int(e["step"])] = per_step.get(int(e["step"]), 0) + 1
        for e in missing:
            r = probe.get(int(e["step"]))
            if r is not None and per_step[int(e["step"])] == 1 and (_f(r["calls"]) or 0) > 0:
                e["tool_error_rate"] = (_f(r["errors"]) or 0.0) / _f(r["calls"])
    stages = _select(log, "SELECT * FROM stages WHERE run_id = {run} ORDER BY position", run_id)
    if not rollouts and not train and not evals:
        raise ReportError(
            f"{source}: run {run_id} has no training steps, rollouts or evaluations to report yet "
            "(is it still starting, or did it fail early? see: reckon sql RUN 'SELECT * FROM actor_errors')"
        )

    steps: dict[int, StepRow] = {}
    for t in train:  # in log order: a re-logged step keeps its latest numbers
        metrics = json.loads(t["metrics"]) if isinstance(t["metrics"], str) else (t["metrics"] or {})
        steps[int(t["step"])] = StepRow(
            step=int(t["step"]), stage=t["stage"], kind=t["kind"], loss=_f(t["loss"]),
            clip_frac_low=_f(t["clip_frac_low"]), clip_frac_high=_f(t["clip_frac_high"]),
            clip_frac_dual=_f(t["clip_frac_dual"]), grad_norm=_f(t["grad_norm"]), entropy=_f(t["entropy"]),
            lr=_f(t["lr"]), n_sequences=t["n_sequences"], seconds=_f(t["seconds"]), ts=_f(t["ts"]),
            metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},  # null: NaN at log time
        )  # fmt: skip
    for r in rollouts:
        row = steps.setdefault(int(r["step"]), StepRow(step=int(r["step"]), ts=_f(r["ts"])))
        row.stage = row.stage or r["stage"]  # a step without a train step (every group had equal rewards)
        calls, pos_calls = _f(r["calls"]) or 0.0, _f(r["pos_calls"]) or 0.0
        row.n_trajectories = int(r["n"])
        row.n_positive = int(r["n_pos"] or 0)
        row.reward = _f(r["reward"])
        row.response_len = _f(r["response_len"])
        row.tool_calls = _f(r["tool_calls"])
        row.tool_error_rate = (_f(r["errors"]) or 0.0) / calls if calls else None
        row.tool_error_rate_pos = (_f(r["pos_errors"]) or 0.0) / pos_calls if pos_calls else None
    ordered = [steps[s] for s in sorted(steps)]

    # A StageStarted precedes its stage's first training rollout and first TrainStepCompleted
    # in the log (an RL step whose groups all had equal rewards has rollouts but no train step).
    stage_infos = []
    for s in stages:
        firsts = [int(t["step"]) for t in train if t["position"] > s["position"]][:1]  # train is in log order
        firsts += [int(r["step"]) for r in rollouts if r["position"] > s["position"] and r["stage"] == s["stage"]][:1]
        start = min(firsts) if firsts else (ordered[-1].step + 1 if ordered else 1)
        stage_infos.append(
            StageInfo(
                name=s["stage"], index=int(s["stage_index"]), kind=s["kind"], steps=int(s["steps"]),
                max_tokens=int(s["max_tokens"]), max_turns=int(s["max_turns"]),
                prompts_per_step=int(s["prompts_per_step"]), rollouts_per_prompt=int(s["rollouts_per_prompt"]),
                group_size=int(s["group_size"]), lr=float(s["lr"]), optimizer_reset=bool(s["optimizer_reset"]),
                n_problems=int(s["n_problems"]), start_step=start,
            )
        )  # fmt: skip

    info = next((r for r in log.runs() if r["run_id"] == run_id), None)
    started = next(iter(log.read(run_id=run_id, types=["RunStarted"], limit=1)), None)
    completed = list(log.read(run_id=run_id, types=["RunCompleted"]))
    config = started[1].payload.config if started is not None else (info or {}).get("config") or {}
    name = (info or {}).get("name") or _dig(config, "run.name") or run_id
    status = completed[-1][1].payload.status if completed else (info or {}).get("status", "unknown")
    return RunData(
        source=source, label=label or name, run_id=run_id, name=name, status=status, config=config,
        steps=ordered, evals=evals, stages=stage_infos,
    )  # fmt: skip


def _dig(config: dict, dotted: str) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _rl_steps(run: RunData) -> list[StepRow]:
    return [r for r in run.steps if r.kind == "rl" or (r.kind is None and r.n_trajectories)]


def common_last_step(runs: list[RunData]) -> int | None:
    """The last RL step every one of several runs reached (compare them up to there); None for one run."""
    ends = [rl[-1].step for rl in map(_rl_steps, runs) if rl]
    return min(ends) if len(runs) > 1 and ends else None


def summarize(run: RunData, max_step: int | None = None) -> dict[str, Any]:
    """Headline figures of a run (shown in the report and printed by ``reckon report``).

    rl_steps; reward/tool_calls/tool_error_rate/tool_error_rate_pos averaged over the first
    and the last quarter of its RL steps up to ``max_step`` (``*_first`` / ``*_last``; pass
    :func:`common_last_step` to compare runs at the same step count); per eval dataset the
    first and last pass@1 (``eval/<dataset>/first``, ``.../last``), also up to ``max_step``.
    None where unmeasured.
    """
    rl = [r for r in _rl_steps(run) if max_step is None or r.step <= max_step]
    q = max(1, len(rl) // 4)
    out: dict[str, Any] = {"rl_steps": len(rl)}
    for attr in ("reward", "tool_calls", "tool_error_rate", "tool_error_rate_pos"):
        for part, rows in (("first", rl[:q]), ("last", rl[-q:])):
            vals = [getattr(r, attr) for r in rows if getattr(r, attr) is not None]
            out[f"{attr}_{part}"] = sum(vals) / len(vals) if vals else None
    evals = [e for e in run.evals if max_step is None or e["step"] <= max_step]
    for dataset in dict.fromkeys(e["dataset"] for e in evals):
        points = [e for e in evals if e["dataset"] == dataset]
        out[f"eval/{dataset}/first"] = _f(points[0]["pass_at_1"])
        out[f"eval/{dataset}/last"] = _f(points[-1]["pass_at_1"])
    return out


# --------------------------------------------------------------------------- figure
#
# A long SFT stage (the demo: 150 steps) would squeeze a short RL stage into a sliver of a
# shared step axis, so the RL panels count RL steps only (1 = the first RL step of the run,
# whatever the SFT length; runs with different SFT lengths line up at the same RL step
# count) and SFT gets its own panel over SFT steps. An evaluation is placed after the RL
# steps done before it: the one after SFT sits at RL step 0, in the shaded SFT band.

#: (title, y label, StepRow attribute, y range hint) of the simple RL panels, in grid order.
_RL_PANELS = {
    "reward": ("Mean reward (training rollouts)", "reward", (-0.02, 1.02)),
    "tool_error_rate_pos": ("Tool-error rate, positive trajectories", "failed calls / calls", (0.0, None)),
    "tool_error_rate": ("Tool-error rate, all trajectories", "failed calls / calls", (0.0, None)),
    "tool_calls": ("Tool calls per trajectory", "calls", (0.0, None)),
    "response_len": ("Response length", "tokens (model + tool)", (0.0, None)),
    "loss": ("Policy loss", "loss", None),
}
#: What an empty RL panel means.
_EMPTY = {"tool_error_rate_pos": "no correct trajectory made a tool call", "loss": "no RL optimizer step yet"}
#: Grid order: the ablation's figures first.
_GRID = ["reward", "eval", "tool_error_rate_pos", "tool_error_rate", "tool_calls", "response_len", "clip", "loss", "sft"]
_CLIP_STYLES = {"clip_frac_low": "-", "clip_frac_high": "--", "clip_frac_dual": ":"}
_DATASET_MARKERS = "osD^vP*X"
_SFT_COLOR = "#f2e6c9"


def rl_positions(run: RunData) -> dict[int, int]:
    """Global step -> RL step (1-based) of every RL step of ``run`` (rollouts of an unfinished step count)."""
    return {r.step: i for i, r in enumerate(_rl_steps(run), start=1)}


def _rl_x(run: RunData, step: int) -> float:
    """Where global ``step`` falls on the RL-step axis: the number of RL steps done by then."""
    return float(sum(1 for s in rl_positions(run) if s <= step))


def _rl_series(run: RunData, attr: str) -> tuple[np.ndarray, np.ndarray]:
    rows = _rl_steps(run)
    y = np.array([np.nan if getattr(r, attr) is None else float(getattr(r, attr)) for r in rows], dtype=float)
    return np.arange(1, len(rows) + 1, dtype=float), y


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average that skips NaNs (NaN where the window has no values)."""
    ok = np.isfinite(y)
    kernel = np.ones(window)
    num = np.convolve(np.where(ok, y, 0.0), kernel, mode="same")
    den = np.convolve(ok.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _curve(ax: Any, x: np.ndarray, y: np.ndarray, color: Any, **kw: Any) -> bool:
    """Plot one run's curve; faint raw + smoothed when long. False if it has no values."""
    ok = np.isfinite(y)
    if not ok.any():
        return False
    x, y = x[ok], y[ok]  # connect across unmeasured steps (e.g. a step without a correct trajectory)
    if len(x) > SMOOTH_ABOVE:
        ax.plot(x, y, color=color, lw=0.7, alpha=0.3, **kw)
        ax.plot(x, _smooth(y, max(3, len(x) // 25)), color=color, lw=1.8, alpha=0.95, **kw)
    else:
        ax.plot(x, y, color=color, lw=1.6, marker="o", ms=3.5, alpha=0.9, **kw)
    return True


def _no_data(ax: Any, what: str = "not logged") -> None:
    ax.text(0.5, 0.5, what, transform=ax.transAxes, ha="center", va="center", color="0.45", fontsize=9, zorder=4,
            bbox={"boxstyle": "round,pad=0.3", "fc": "white", "ec": "0.85"})  # fmt: skip


def _decorate_rl(ax: Any, runs: list[RunData], colors: list[Any], x_lo: float) -> None:
    """The SFT band left of RL step 1 and the RL stage starts (grey when every run agrees, else in run colours)."""
    from matplotlib.transforms import blended_transform_factory

    if any(r.kind == "sft" for run in runs for r in run.steps):
        ax.axvspan(x_lo, 0.5, color=_SFT_COLOR, alpha=0.6, lw=0, zorder=0)
    per_run = [{(_rl_x(run, s.start_step - 1) + 0.5, s.name) for s in run.stages if s.kind == "rl"} for run in runs]
    shared = set.intersection(*per_run) if per_run else set()
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    drawn: set[tuple[float, str]] = set()
    for color, marks in zip(colors, per_run):
        for x, name in sorted(marks):
            if (x, name) in drawn:
                continue
            drawn.add((x, name))
            c = "0.45" if (x, name) in shared else color
            ax.axvline(x, color=c, ls="--", lw=0.9, zorder=1)
            ax.text(x, 0.985, f" {name}", transform=trans, ha="left", va="top", fontsize=8,
                    color=c, zorder=3, clip_on=True,
                    bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7})  # fmt: skip


def _eval_panel(ax: Any, runs: list[RunData], colors: list[Any]) -> bool:
    """Held-out avg pass@1 on the RL-step axis; ``reckon eval`` results as hollow markers. False if none."""
    datasets = list(dict.fromkeys(e["dataset"] for run in runs for e in run.evals))
    if not datasets:
        _no_data(ax, "no evaluations logged")
        return False
    standalone = False
    for run, color in zip(runs, colors):
        for d, dataset in enumerate(datasets):
            marker = _DATASET_MARKERS[d % len(_DATASET_MARKERS)]
            pts = [e for e in run.evals if e["dataset"] == dataset and _f(e["pass_at_1"]) is not None]
            sched = [e for e in pts if e.get("source") != "eval"]
            mine = [e for e in pts if e.get("source") == "eval"]
            if sched:
                ax.plot([_rl_x(run, int(e["step"])) for e in sched], [_f(e["pass_at_1"]) for e in sched], color=color,
                        lw=1.6, alpha=0.9, marker=marker, ms=5)  # fmt: skip
            if mine:
                standalone = True
                ax.plot([_rl_x(run, int(e["step"])) for e in mine], [_f(e["pass_at_1"]) for e in mine], ls="none",
                        marker=marker, ms=8, mfc="none", mec=color, mew=1.5)  # fmt: skip
    ax.set_ylim(-0.02, 1.02)
    from matplotlib.lines import Line2D

    handles, labels = [], []
    if len(datasets) > 1:
        handles += [Line2D([], [], color="0.3", marker=_DATASET_MARKERS[d % len(_DATASET_MARKERS)], ls="none")
                    for d in range(len(datasets))]  # fmt: skip
        labels += datasets
    if standalone:
        handles.append(Line2D([], [], color="0.3", marker="o", mfc="none", ms=7, ls="none"))
        labels.append("reckon eval")
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="best", framealpha=0.8)
    if len(datasets) == 1:
        ax.set_title(f"Held-out accuracy: avg pass@1 on {datasets[0]}", fontsize=10.5)
    return True


def _clip_panel(ax: Any, runs: list[RunData], colors: list[Any]) -> bool:
    from matplotlib.lines import Line2D

    shown = []
    for attr, style in _CLIP_STYLES.items():
        drew = False
        for run, color in zip(runs, colors):
            drew |= _curve(ax, *_rl_series(run, attr), color, ls=style)
        if drew:
            shown.append(attr)
    if not shown:
        _no_data(ax, "no RL optimizer step yet")
        return False
    ax.set_ylim(bottom=0)
    handles = [Line2D([], [], color="0.3", ls=_CLIP_STYLES[a]) for a in shown]
    ax.legend(handles, [a.removeprefix("clip_frac_") for a in shown], fontsize=7, loc="best", framealpha=0.8)
    return True


def run_colors(n: int) -> list[tuple[float, float, float, float]]:
    """The colour of each of ``n`` runs (tab10, cycling), the same in the PNG and the HTML."""
    from matplotlib import colormaps

    return [colormaps["tab10"](i % 10) for i in range(n)]


def render_png(runs: list[RunData], path: Path) -> None:
    """Draw the panel grid of ``runs`` (one colour each, same axes) to ``path``.

    RL panels share an RL-step axis (see the section comment); the SFT loss has its own
    panel over SFT steps.
    """
    # A bare Figure (no pyplot): no global backend or figure registry; savefig renders with Agg.
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    colors = run_colors(len(runs))
    n_sft = [sum(1 for r in run.steps if r.kind == "sft") for run in runs]
    has_sft = any(n_sft)
    n_rl = max((len(_rl_steps(run)) for run in runs), default=0)
    grid = [g for g in _GRID if g != "sft" or has_sft]
    ncols = 3
    nrows = math.ceil(len(grid) / ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.3 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    flat = axes.ravel()
    eval_x = [_rl_x(run, int(e["step"])) for run in runs for e in run.evals]
    x_lo = min([0.5, *eval_x]) - 0.6  # room for the SFT band (and an evaluation at RL step 0)
    x_hi = max([1.0, float(n_rl), *eval_x]) + 0.5
    no_update = False
    sft_word = f"{n_sft[0]} SFT steps" if len(set(n_sft)) == 1 else "SFT"
    for ax, what in zip(flat, grid):
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.25, lw=0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if what == "sft":
            ax.set_title("SFT loss (SFT steps)", fontsize=10.5)
            ax.set_xlabel("SFT step", fontsize=8.5)
            ax.set_ylabel("loss", fontsize=8.5)
            drew = [_curve(ax, *run.series("loss", "sft"), c) for run, c in zip(runs, colors)]
            sft_steps = [r.step for run in runs for r in run.steps if r.kind == "sft"]
            ax.set_xlim(min(sft_steps) - 0.5, max(sft_steps) + 0.5)
            if not any(drew):
                _no_data(ax)
            continue
        ax.set_xlabel("RL step" + (f" (after {sft_word}, shaded)" if has_sft else ""), fontsize=8.5)
        _decorate_rl(ax, runs, colors, x_lo)
        ax.set_xlim(x_lo, x_hi)
        if what == "eval":
            ax.set_title("Held-out accuracy (avg pass@1)", fontsize=10.5)
            ax.set_ylabel("avg pass@1", fontsize=8.5)
            _eval_panel(ax, runs, colors)
            continue
        if not n_rl:
            ax.set_title(_RL_PANELS.get(what, ("PPO clip fractions",))[0], fontsize=10.5)
            _no_data(ax, "no RL steps yet")
            continue
        if what == "clip":
            ax.set_title("PPO clip fractions", fontsize=10.5)
            ax.set_ylabel("fraction of tokens", fontsize=8.5)
            _clip_panel(ax, runs, colors)
            continue
        title, ylabel, yrange = _RL_PANELS[what]
        ax.set_title(title, fontsize=10.5, fontweight="bold" if what == "tool_error_rate_pos" and len(runs) > 1 else None)
        ax.set_ylabel(ylabel, fontsize=8.5)
        drew = [_curve(ax, *_rl_series(run, what), color) for run, color in zip(runs, colors)]
        if what == "reward":  # RL steps without an optimizer step: every group had equal rewards (or still running)
            for run, color in zip(runs, colors):
                skipped = [(i, r.reward) for i, r in enumerate(_rl_steps(run), 1) if r.kind is None and r.reward is not None]
                if skipped:
                    no_update = True
                    ax.plot(*zip(*skipped), ls="none", marker="o", ms=9, mfc="none", mec=color, mew=1.3)
        if not any(drew):
            _no_data(ax, _EMPTY.get(what, "not logged"))
        elif yrange is not None:
            ax.set_ylim(*yrange) if yrange[1] is not None else ax.set_ylim(bottom=yrange[0])
    for ax in flat[len(grid) :]:
        ax.set_visible(False)

    handles: list[Any] = [Line2D([], [], color=c, lw=2.5) for c in colors]
    labels = [run.label for run in runs]
    if has_sft:
        handles.append(Patch(color=_SFT_COLOR))
        labels.append("SFT (before RL step 1)")
    if any(s.kind == "rl" for run in runs for s in run.stages):
        handles.append(Line2D([], [], color="0.45", ls="--", lw=0.9))
        labels.append("RL stage start")
    if no_update:
        handles.append(Line2D([], [], ls="none", marker="o", ms=8, mfc="none", mec="0.3"))
        labels.append("no update: all groups equal")
    title = runs[0].label if len(runs) == 1 else " vs ".join(run.label for run in runs)
    # The figure title is the legend's title: constrained layout reserves room for an
    # "outside" legend but not for a suptitle above it, which would overlap.
    fig.legend(handles, labels, loc="outside upper center", ncol=min(len(handles), 6), fontsize=10, frameon=False,
               title=f"reckon report: {title}", title_fontsize=14)  # fmt: skip
    fig.get_layout_engine().set(h_pad=0.06, w_pad=0.08, hspace=0.05, wspace=0.04)
    fig.savefig(path, dpi=110, format="png")


# --------------------------------------------------------------------------- tensorboard


def _tb_tag(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_./-]", "_", name)


def write_tensorboard(run: RunData, log_dir: Path) -> None:
    """Write ``run``'s per-step numbers as TensorBoard scalars into ``log_dir``.

    Tags: rollout/{reward,response_len,tool_calls,tool_error_rate,tool_error_rate_pos,
    n_trajectories}, eval/<dataset>/{pass_at_1,response_len,tool_calls}, loss/total and
    every learner metric under its own name (loss/pg, loss/sft, actor/clip_frac_high, ...).
    Earlier event files in ``log_dir`` are removed first so a rebuilt report holds no
    duplicate points.
    """
    from torch.utils.tensorboard import SummaryWriter  # lazy: imports torch

    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.glob("events.out.tfevents.*"):
        old.unlink()
    rollout = {
        "reward": "reward",
        "response_len": "response_len",
        "tool_calls": "tool_calls",
        "tool_error_rate": "tool_error_rate",
        "tool_error_rate_pos": "tool_error_rate_pos",
    }
    with SummaryWriter(log_dir=str(log_dir)) as w:
        for r in run.steps:
            for tag, attr in rollout.items():
                if (v := getattr(r, attr)) is not None:
                    w.add_scalar(f"rollout/{tag}", v, r.step, walltime=r.ts)
            if r.n_trajectories:
                w.add_scalar("rollout/n_trajectories", r.n_trajectories, r.step, walltime=r.ts)
            if r.loss is not None:
                w.add_scalar("loss/total", r.loss, r.step, walltime=r.ts)
            for name, v in r.metrics.items():
                if math.isfinite(v):
                    w.add_scalar(_tb_tag(name), v, r.step, walltime=r.ts)
        for e in run.evals:
            d = _tb_tag(e["dataset"])
            for tag, col in (("pass_at_1", "pass_at_1"), ("response_len", "mean_response_tokens"),
                             ("tool_calls", "mean_tool_calls")):  # fmt: skip
                if (v := _f(e[col])) is not None:
                    w.add_scalar(f"eval/{d}/{tag}", v, int(e["step"]), walltime=_f(e["ts"]))


# --------------------------------------------------------------------------- html

_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>reckon report: {{ title }}</title>
<style>
 body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1500px;
        padding: 0 1em; color: #222; }
 h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
 table { border-collapse: collapse; font-size: 12.5px; margin: .5em 0; }
 th, td { border: 1px solid #ddd; padding: 2px 7px; text-align: right; }
 th { background: #f4f4f4; position: sticky; top: 0; } td.l, th.l { text-align: left; }
 tr.sft td { background: #fbf5e6; } img { max-width: 100%; border: 1px solid #eee; }
 .swatch { display: inline-block; width: .9em; height: .9em; vertical-align: -1px; margin-right: .3em; }
 details { margin: .4em 0; } pre { background: #f8f8f8; padding: .6em; overflow-x: auto; font-size: 12px; }
 .muted { color: #777; }
</style></head><body>
<h1>reckon report: {{ title }}</h1>
<p class="muted">Generated {{ generated }} by <code>reckon report</code>. Rollout numbers count every training
rollout sampled at a step (before RoC down-sampling); evaluation and filter probes are excluded. Tool-error rate =
tool calls whose status is not <code>ok</code> / tool calls.</p>
<img src="data:image/png;base64,{{ png }}" alt="training curves">

<h2>Runs</h2>
{% if common is not none %}<p class="muted">Compared at the same step count: the summary covers RL steps up to
step {{ common }}, the last one every run reached (the curves and tables show everything).</p>{% endif %}
<table><tr><th class="l">run</th><th class="l">run id</th><th class="l">source</th><th class="l">status</th>
<th>steps</th><th>RL steps</th>
<th>reward first&rarr;last &frac14;</th><th>tool calls first&rarr;last &frac14;</th>
<th>tool-err (pos) first&rarr;last &frac14;</th><th>tool-err (all) first&rarr;last &frac14;</th>
<th class="l">held-out pass@1 first&rarr;last</th></tr>
{% for run, s, color in summary %}<tr>
<td class="l"><span class="swatch" style="background: {{ color }}"></span>{{ run.label }}</td>
<td class="l">{{ run.run_id }}</td><td class="l">{{ run.source }}</td><td class="l">{{ run.status }}</td>
<td>{{ run.steps | length }}</td><td>{{ s.rl_steps }}</td>
{% for a in ("reward", "tool_calls", "tool_error_rate_pos", "tool_error_rate") %}
<td>{{ s[a ~ "_first"] | num }} &rarr; {{ s[a ~ "_last"] | num }}</td>{% endfor %}
<td class="l">{% for d in run.evals | map(attribute="dataset") | unique %}{{ d }}: {{ s["eval/" ~ d ~ "/first"] | num }}
&rarr; {{ s["eval/" ~ d ~ "/last"] | num }}{% if not loop.last %}<br>{% endif %}{% endfor %}</td>
</tr>{% endfor %}</table>

<h2>Configuration</h2>
{% for run, _, _ in summary %}<h3>{{ run.label }}</h3>
<table>{% for key, value in config_rows[loop.index0] %}<tr><th class="l">{{ key }}</th><td class="l">{{ value }}</td></tr>
{% endfor %}</table>
{% if run.stages %}<table><tr><th class="l">stage</th><th class="l">kind</th><th>starts at step</th><th>steps</th>
<th>max tokens</th><th>max turns</th><th>prompts &times; rollouts &rarr; kept</th><th>lr</th><th>optimizer reset</th>
<th>problems</th></tr>
{% for st in run.stages %}<tr><td class="l">{{ st.name }}</td><td class="l">{{ st.kind }}</td><td>{{ st.start_step }}</td>
<td>{{ st.steps }}</td><td>{{ st.max_tokens }}</td><td>{{ st.max_turns }}</td>
<td>{{ st.prompts_per_step }} &times; {{ st.rollouts_per_prompt }} &rarr; {{ st.group_size }}</td>
<td>{{ "%.3g" | format(st.lr) }}</td><td>{{ "yes" if st.optimizer_reset else "no" }}</td><td>{{ st.n_problems }}</td></tr>
{% endfor %}</table>{% endif %}
<details><summary>full configuration (JSON)</summary><pre>{{ run.config | tojson(indent=1) }}</pre></details>
{% endfor %}

<h2>Held-out evaluations</h2>
{% if evals %}<table><tr><th class="l">run</th><th class="l">dataset</th><th class="l">by</th><th>step</th>
<th>RL step</th><th>weights</th><th>k</th><th>temperature</th><th>max tokens / turns</th><th>problems</th>
<th>avg pass@1</th><th>mean response tokens</th><th>tool calls / traj</th><th>tool-err (all)</th></tr>
{% for label, e, rl_x in evals %}<tr><td class="l">{{ label }}</td><td class="l">{{ e.dataset }}</td>
<td class="l">{{ "reckon eval" if e.source == "eval" else e.source }}</td><td>{{ e.step }}</td><td>{{ rl_x | int }}</td>
<td>{{ e.weights_version }}</td><td>{{ e.k }}</td><td>{{ e.temperature | num(2) }}</td>
<td>{% if e.max_tokens %}{{ e.max_tokens }} / {{ e.max_turns }}{% else %}–{% endif %}</td><td>{{ e.n_problems }}</td>
<td><b>{{ e.pass_at_1 | num }}</b></td><td>{{ e.mean_response_tokens | num(1) }}</td><td>{{ e.mean_tool_calls | num(2) }}</td>
<td>{{ e.tool_error_rate | num }}</td></tr>
{% endfor %}</table>{% else %}<p class="muted">No EvalCompleted events in these runs.</p>{% endif %}

<h2>Per-step numbers</h2>
{% for run, _, _ in summary %}<h3>{{ run.label }}</h3>
<table class="steps"><tr><th>step</th><th class="l">stage</th><th class="l">kind</th><th>rollouts</th><th>reward</th>
<th>response tokens</th><th>tool calls / traj</th><th>tool-err (pos)</th><th>tool-err (all)</th><th>loss</th>
<th>clip low</th><th>clip high</th><th>clip dual</th><th>grad norm</th><th>entropy</th><th>lr</th><th>trained seqs</th>
<th>seconds</th></tr>
{% for r in run.steps %}<tr{% if r.kind == "sft" %} class="sft"{% endif %}><td>{{ r.step }}</td>
<td class="l">{{ r.stage or "" }}</td><td class="l">{{ r.kind or "" }}</td><td>{{ r.n_trajectories }}</td>
<td>{{ r.reward | num }}</td><td>{{ r.response_len | num(1) }}</td><td>{{ r.tool_calls | num(2) }}</td>
<td>{{ r.tool_error_rate_pos | num }}</td><td>{{ r.tool_error_rate | num }}</td><td>{{ r.loss | num(5) }}</td>
<td>{{ r.clip_frac_low | num(4) }}</td><td>{{ r.clip_frac_high | num(4) }}</td><td>{{ r.clip_frac_dual | num(4) }}</td>
<td>{{ r.grad_norm | num }}</td><td>{{ r.entropy | num }}</td><td>{{ r.lr | sci }}</td><td>{{ r.n_sequences if r.n_sequences is not none else "" }}</td>
<td>{{ r.seconds | num(2) }}</td></tr>
{% endfor %}</table>
{% endfor %}
</body></html>
"""


def _num(value: Any, digits: int = 3) -> str:
    v = _f(value)
    return "–" if v is None else f"{v:.{digits}f}"


def _sci(value: Any) -> str:
    v = _f(value)
    return "–" if v is None else f"{v:.3g}"


def render_html(runs: list[RunData], png: bytes, path: Path) -> None:
    """Write the self-contained HTML page for ``runs`` (``png``: the figure's bytes)."""
    import jinja2  # a torch dependency, always installed with reckon
    from matplotlib.colors import to_hex

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["num"] = _num
    env.filters["sci"] = _sci
    colors = [to_hex(c) for c in run_colors(len(runs))]
    common = common_last_step(runs)
    config_rows = []
    for run in runs:
        rows = [(k, _dig(run.config, k)) for k in CONFIG_SUMMARY_KEYS]
        config_rows.append([(k, json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in rows if v is not None])
    html = env.from_string(_HTML).render(
        title=runs[0].label if len(runs) == 1 else " vs ".join(r.label for r in runs),
        generated=time.strftime("%Y-%m-%d %H:%M:%S"),
        png=base64.b64encode(png).decode("ascii"),
        summary=[(run, summarize(run, common), c) for run, c in zip(runs, colors)],
        common=common,
        config_rows=config_rows,
        evals=[(run.label, e, _rl_x(run, int(e["step"]))) for run in runs for e in run.evals],
    )
    path.write_text(html, encoding="utf-8")


# --------------------------------------------------------------------------- entry points


def _dir_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "run"


def build_report(sources: list[str], out_dir: str, *, labels: list[str] | None = None) -> dict[str, str]:
    """Build the PNG, HTML page and TensorBoard scalars of ``sources`` under ``out_dir``.

    ``sources``: run directories (containing events.db), SQLite files or database URLs,
    each optionally suffixed ``#run_id``; several are compared side by side on the same
    axes. ``labels``: legend names, one per source (default: run names). Returns
    ``{"png": path, "html": path, "tensorboard": dir}``; the TensorBoard directory holds
    one sub-directory per run, named after its label. Logs are only read. Raises
    ReportError naming the bad input (missing directory, not an event log, unknown or
    empty run, wrong number of labels).
    """
    return write_report(load_runs(sources, labels), out_dir)


def load_runs(sources: list[str], labels: list[str] | None = None) -> list[RunData]:
    """:func:`load_run` of every source, labelled (given labels, else unique run names)."""
    if not sources:
        raise ReportError("no run given: pass at least one run directory or database URL")
    if labels is not None and len(labels) != len(sources):
        raise ReportError(f"got {len(labels)} labels for {len(sources)} runs: give one --label per RUN, in order")
    if labels is not None and len(set(labels)) != len(labels):
        raise ReportError(f"labels must differ from each other, got {labels}")
    runs = [load_run(s) for s in sources]
    if labels is not None:
        names = list(labels)
    elif len({r.name for r in runs}) == len(runs):
        names = [r.name for r in runs]
    else:  # e.g. two runs of the same config: tell them apart by run id
        names = [f"{r.name} ({r.run_id})" for r in runs]
    for run, name in zip(runs, names):
        run.label = name
    return runs


def write_report(runs: list[RunData], out_dir: str) -> dict[str, str]:
    """Write report.png, report.html and tensorboard/<label>/ for loaded ``runs``."""
    dirs = [_dir_name(run.label) for run in runs]
    if len(set(dirs)) != len(dirs):  # labels that differ only in punctuation
        dirs = [f"{i}_{d}" for i, d in enumerate(dirs)]
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    png, html, tb = out / PNG_NAME, out / HTML_NAME, out / TB_DIR
    render_png(runs, png)
    render_html(runs, png.read_bytes(), html)
    for run, d in zip(runs, dirs):
        write_tensorboard(run, tb / d)
    return {"png": str(png), "html": str(html), "tensorboard": str(tb)}


def _summary_line(run: RunData, max_step: int | None) -> str:
    s = summarize(run, max_step)
    evals = ", ".join(
        f"{k.split('/')[1]} {_num(s[k])}->{_num(s[k.removesuffix('/first') + '/last'])}"
        for k in s
        if k.startswith("eval/") and k.endswith("/first")
    )
    return (
        f"{run.label}: {s['rl_steps']} RL steps{f' up to step {max_step}' if max_step else ''}; "
        "first->last quarter of them: reward "
        f"{_num(s['reward_first'])}->{_num(s['reward_last'])}, tool calls/traj {_num(s['tool_calls_first'], 2)}->"
        f"{_num(s['tool_calls_last'], 2)}, tool-err pos {_num(s['tool_error_rate_pos_first'])}->"
        f"{_num(s['tool_error_rate_pos_last'])}" + (f"; held-out pass@1 {evals}" if evals else "")
    )


def report_command(
    runs: list[str] = typer.Argument(
        ..., metavar="RUN", help="run directory, SQLite .db file or database URL; append #RUN_ID to pick a run"
    ),
    out: Optional[str] = typer.Option(
        None, "--out", "-o", help="output directory (default: RUN/report for one run directory, else ./report)"
    ),
    label: Optional[list[str]] = typer.Option(
        None, "--label", "-l", help="legend name of each RUN, once per RUN in order (default: the run names)"
    ),
) -> None:
    """Plot training curves of a run (or compare several) as PNG, HTML and TensorBoard scalars.

    Curves over steps: reward, held-out pass@1, response length, tool calls, tool-error rates, clip fractions, losses.

    Example: reckon report runs/roc runs/grpo --label GRPO-RoC --label GRPO
    """
    if out is None:
        first = Path(_split_source(runs[0])[0])
        out = str(first / "report") if len(runs) == 1 and first.is_dir() else "report"
    try:
        loaded = load_runs(runs, label)
        paths = write_report(loaded, out)
    except StoreError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    common = common_last_step(loaded)
    for run in loaded:
        typer.echo(_summary_line(run, common))
    for kind, path in paths.items():
        typer.echo(f"{kind}: {path}")
