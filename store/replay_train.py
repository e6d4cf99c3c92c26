"""Train-only replay: re-run a run's learner steps from its logged batches, no generators.

The learner's whole input is in the log: each ``BatchFormed`` carries the packed batch
(token ids, loss masks, generator logprobs, advantages, kind, lr, optimizer reset), and
``RunStarted`` carries the learner config and the initial model's path. :func:`load_steps`
pairs every ``TrainStepCompleted`` with the batch it trained on and works out where that
step started from (the initial model after a learner (re)start, else the previous step's
weights; the AdamW step count since the last reset); :func:`replay` builds a
:class:`training.learner.Learner` from the same config and weights and feeds the batches
in training order; :func:`compare` checks each replayed step against the logged one.

Two modes:

- *chain* (default): one learner, every step in order from the initial model, AdamW state
  carried, as the run did. It checks the whole training trajectory: a step whose update
  differed shows up in every later step's loss.
- *from published* (``from_published=True``): each step starts from the weights the run
  published after the step before it (``WeightsPublished``; the initial model for a
  learner's first step). A step's loss and metrics are computed before its optimizer
  update, so they depend only on those weights, the batch and the lr: steps are checked
  independently, and ``first_step`` skips the steps before it instead of re-training them.

Nothing here writes to the log; the caller opens it read-only. The learner's scratch
files go to a work directory the caller provides (``reckon replay train`` uses a
temporary one).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol.events import BatchFormed, RunStarted, TrainStepCompleted, WeightsPublished
from store.errors import StoreError
from store.log import EventLog

if TYPE_CHECKING:
    from training.learner import Learner, LearnerConfig

#: Logged metrics that measure wall-clock time, never reproducible.
TIMING_METRICS = frozenset({"perf/step_s", "perf/tokens_per_s"})


class ReplayError(StoreError):
    """The log cannot be replayed as asked; the message names the event or input and the fix."""


@dataclass
class LoggedStep:
    """One optimizer step as the log records it, and what the learner started it from."""

    batch: BatchFormed
    batch_position: int
    done: TrainStepCompleted
    done_position: int
    #: the learner started afresh from the initial model right before this step
    fresh_start: bool
    #: ``Learner.optimizer_steps`` before this step (AdamW steps since the last reset or start)
    optimizer_steps: int
    #: weights the step started from: a published directory, or None for the initial model
    start_weights: str | None


@dataclass
class RunTraining:
    """Everything a train replay needs from the log of one run."""

    run_id: str
    config: dict  # the resolved run config (RunStarted), as logged
    logged_run_dir: str  # RunStarted.run_dir: where the run wrote its files
    steps: list[LoggedStep]  # in training order
    untrained: list[BatchFormed] = field(default_factory=list)  # batches with no TrainStepCompleted


def load_steps(log: EventLog, run_id: str, *, config_file: str | os.PathLike | None = None) -> RunTraining:
    """Read one run's training from the log: config, and each step paired with its batch.

    A step is a ``TrainStepCompleted``; its batch is the latest ``BatchFormed`` of the same
    step and stage logged before the replay needs it (a resent batch replaces the earlier
    copy). Steps are ordered by the log position of their ``TrainStepCompleted`` (the
    learner trains one batch at a time); a step announced again (same step and weights
    version: a restarted learner re-announcing its checkpointed step) counts once.
    ``weights_version`` tells a learner start from the initial model (version 1) from a
    continuation (the previous version + 1, also after a resume from a checkpoint).

    ``config_file``: a run's ``config.json``, used when the log has no ``RunStarted``.

    Raises:
        ReplayError: no config, no trained batch, a step without its batch, or a version
            sequence the learner cannot have produced.
        StoreError: reading the log failed (MalformedRowError names the row).
    """
    config: dict | None = None
    logged_run_dir = ""
    batches: dict[tuple[int, str], tuple[int, BatchFormed]] = {}
    used: set[int] = set()
    announced: set[tuple[int, str, int]] = set()
    pending: list[tuple[int, TrainStepCompleted, int, BatchFormed]] = []
    published: list[tuple[int, int, str]] = []  # (position, version, path)
    wanted = [RunStarted.TYPE, BatchFormed.TYPE, TrainStepCompleted.TYPE, WeightsPublished.TYPE]
    for pos, env in log.read(run_id=run_id, types=wanted):
        ev = env.payload
        if isinstance(ev, RunStarted):
            if config is None:
                config, logged_run_dir = ev.config, ev.run_dir
        elif isinstance(ev, BatchFormed):
            batches[(ev.step, ev.stage)] = (pos, ev)
        elif isinstance(ev, TrainStepCompleted):
            if (ev.step, ev.stage, ev.weights_version) in announced:
                continue  # a restarted learner announcing a checkpointed step again
            announced.add((ev.step, ev.stage, ev.weights_version))
            if (ev.step, ev.stage) not in batches:
                raise ReplayError(
                    f"TrainStepCompleted of step {ev.step} (stage {ev.stage!r}) at position {pos} has no "
                    f"BatchFormed of that step before it in run {run_id!r}: the log is incomplete"
                )
            bpos, batch = batches[(ev.step, ev.stage)]
            used.add(bpos)
            pending.append((pos, ev, bpos, batch))
        elif isinstance(ev, WeightsPublished):
            published.append((pos, ev.version, ev.path))
    if config is None and config_file is not None and Path(config_file).is_file():
        import json

        try:
            config = json.loads(Path(config_file).read_text())
        except (OSError, ValueError) as e:
            raise ReplayError(f"cannot read the run config {str(config_file)!r}: {e}") from e
        logged_run_dir = str(config.get("run", {}).get("run_dir", ""))
    if config is None:
        where = f" and there is no {str(config_file)!r}" if config_file is not None else ""
        raise ReplayError(f"run {run_id!r} has no RunStarted event (the learner config and model){where}")
    if not pending:
        raise ReplayError(f"run {run_id!r} has no TrainStepCompleted: no learner step to replay")

    steps: list[LoggedStep] = []
    prev_version = 0
    optimizer_steps = 0
    for pos, done, bpos, batch in pending:
        v = done.weights_version
        if v == 1:
            optimizer_steps = 0
        elif v != prev_version + 1:
            raise ReplayError(
                f"TrainStepCompleted of step {done.step} at position {pos} has weights_version {v} after "
                f"version {prev_version}: the learner resumed from state the log does not hold; "
                "replay with --from-published (each step from the weights published before it)"
            )
        start = None
        if v > 1:
            # the weights version v-1 published latest before this step (a restart republishes versions)
            start = next((p for q, ver, p in reversed(published) if ver == v - 1 and q < pos), None)
        steps.append(LoggedStep(batch, bpos, done, pos, v == 1, optimizer_steps, start))
        optimizer_steps = (0 if batch.optimizer_reset else optimizer_steps) + 1
        prev_version = v
    untrained = [b for bpos, b in sorted(batches.values(), key=lambda x: x[0]) if bpos not in used]
    return RunTraining(run_id, config, logged_run_dir, steps, untrained)


def relocate(path: str, logged_run_dir: str, local_run_dir: str | os.PathLike | None) -> Path:
    """``path`` as logged, or, when it is gone and lay under the logged run directory, the
    same file under ``local_run_dir`` (a run directory that was moved or copied)."""
    p = Path(path)
    if p.exists() or local_run_dir is None or not logged_run_dir:
        return p
    try:
        rel = p.relative_to(logged_run_dir)
    except ValueError:
        return p
    moved = Path(local_run_dir) / rel
    return moved if moved.exists() else p


def learner_config(training: RunTraining) -> LearnerConfig:
    """The run's ``[learner]`` section as a LearnerConfig; ReplayError if absent or invalid."""
    from pydantic import ValidationError

    from training.learner import LearnerConfig

    section = training.config.get("learner")
    if not isinstance(section, dict):
        raise ReplayError(f"the logged config of run {training.run_id!r} has no [learner] section")
    try:
        return LearnerConfig.model_validate(section)
    except ValidationError as e:
        raise ReplayError(f"the logged [learner] config of run {training.run_id!r} is invalid: {e}") from e


@dataclass
class Comparison:
    """A replayed step against the logged one."""

    step: LoggedStep
    replayed: dict[str, float]
    loss_diff: float  # |logged loss - replayed loss|
    worst_metric: str | None  # the logged metric farthest from its replayed value
    worst_diff: float  # its |diff| / max(1, |logged|)

    def ok(self, tol: float) -> bool:
        return self.loss_diff <= tol and self.worst_diff <= tol


def _diff(a: float, b: float) -> float:
    if math.isnan(a) and math.isnan(b):
        return 0.0
    if math.isnan(a) or math.isnan(b):
        return math.inf
    if a == b:  # also equal infinities
        return 0.0
    return abs(a - b)


def compare(step: LoggedStep, replayed: dict[str, float]) -> Comparison:
    """Loss: absolute difference. Every other logged metric but timing: difference
    relative to max(1, |logged|) (a gradient norm of 40 is as exact at 4e-5 as a loss at
    1e-6); a logged metric the replay lacks counts as infinitely far."""
    loss_diff = _diff(float(step.done.loss), float(replayed.get("loss", math.nan)))
    worst, worst_diff = None, 0.0
    for key, logged in sorted(step.done.metrics.items()):
        if key in TIMING_METRICS:
            continue
        d = _diff(float(logged), float(replayed.get(key, math.nan)))
        d = d / max(1.0, abs(float(logged))) if math.isfinite(d) else d
        if worst is None or d > worst_diff:
            worst, worst_diff = key, d
    return Comparison(step, replayed, loss_diff, worst, worst_diff)


def _load_weights(learner: Learner, model_dir: Path) -> None:
    """Copy a Hugging Face directory's weights into the learner's model, in place."""
    import torch
    import transformers

    fresh = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = fresh.state_dict()
    module = learner.engine.module
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name not in state:
                raise ReplayError(f"weights in {str(model_dir)!r} have no tensor {name!r}: not this run's model")
            tensor.copy_(state[name].to(tensor.dtype))


def replay(
    training: RunTraining,
    *,
    model_dir: Path,
    work_dir: Path,
    resolve: Callable[[str], Path],
    from_published: bool = False,
    first_step: int | None = None,
    max_steps: int | None = None,
) -> Iterator[Comparison]:
    """Re-run the logged learner steps; yield a :class:`Comparison` per checked step.

    ``model_dir``: the run's initial model. ``resolve`` maps a logged weights path to a
    local one. Steps before ``first_step`` (a logged step number) are not checked: chain
    mode trains them (the later steps need their updates), from-published mode skips
    them. ``max_steps`` stops after that many checked steps.

    Raises:
        ReplayError: a malformed logged batch, missing published weights, or a config
            this mode cannot replay (ZeRO-3 with from-published).
    """
    from training.learner import Learner

    cfg = learner_config(training)
    if from_published and cfg.zero_stage == 3:
        raise ReplayError("--from-published loads weights into the model in place, which ZeRO-3 (partitioned "
                          "parameters) does not allow; replay in chain mode")
    _quiet_libraries()
    learner = Learner(cfg, model_dir, work_dir)
    started = True  # the learner holds the initial model, a fresh optimizer
    checked = 0
    for s in training.steps:
        if max_steps is not None and checked >= max_steps:
            return
        skip = first_step is not None and s.done.step < first_step
        if from_published:
            if skip:
                continue
            start = model_dir if s.start_weights is None else _published(s, resolve)
            _load_weights(learner, start)
            learner.reset_optimizer()  # the step's loss and metrics do not depend on AdamW moments
            learner.optimizer_steps = s.optimizer_steps
        elif s.fresh_start and not started:  # the run's learner restarted from the initial model
            _load_weights(learner, model_dir)
            learner.reset_optimizer()
        started = False
        try:
            metrics = learner.train_step(s.batch)
        except ValueError as e:
            raise ReplayError(f"BatchFormed of step {s.batch.step} at position {s.batch_position} is malformed: {e}") from e
        if not skip:
            checked += 1
            yield compare(s, metrics)


def _published(s: LoggedStep, resolve: Callable[[str], Path]) -> Path:
    v = s.done.weights_version - 1
    if s.start_weights is None:
        raise ReplayError(f"step {s.done.step} started from weights version {v}, which the log never published")
    path = resolve(s.start_weights)
    if not path.is_dir():
        raise ReplayError(
            f"step {s.done.step} started from weights version {v} at {s.start_weights!r}, which no longer exists; "
            "replay in chain mode (without --from-published)"
        )
    return path


def _quiet_libraries() -> None:
    """DeepSpeed logs its setup at INFO on stdout, into the replay's table; transformers
    draws a progress bar per weights load."""
    import logging

    import transformers
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()


def format_row(c: Comparison) -> str:
    s = c.step
    worst = f"{c.worst_metric} {c.worst_diff:.1e}" if c.worst_metric else "-"
    return (
        f"{s.done.step:>5}  {s.done.stage:<8} {s.done.kind:<4} {s.done.loss:>16.10f} "
        f"{c.replayed.get('loss', math.nan):>16.10f} {c.loss_diff:>9.1e}  {worst}"
    )


TABLE_HEADER = f"{'step':>5}  {'stage':<8} {'kind':<4} {'logged loss':>16} {'replayed loss':>16} {'|diff|':>9}  worst metric (rel diff)"


def comparison_json(c: Comparison) -> dict[str, Any]:
    return {
        "step": c.step.done.step, "stage": c.step.done.stage, "kind": c.step.done.kind,
        "logged_loss": c.step.done.loss, "replayed_loss": c.replayed.get("loss"), "loss_diff": c.loss_diff,
        "worst_metric": c.worst_metric, "worst_diff": c.worst_diff,
        "metrics": {k: c.replayed[k] for k in sorted(c.replayed) if k not in TIMING_METRICS},
    }  # fmt: skip
