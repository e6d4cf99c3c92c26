"""Per-step training metrics, rebuilt from events alone (live and in ``reckon replay metrics``).

One :class:`StepMetricsBuilder` serves both paths: the launcher feeds it the events of a
running run and prints :func:`format_step` of every dict it returns; replay feeds it the
log in position order. Fed the same events in the same order, it returns the same
metrics, so replay reproduces the printed lines exactly. For that, the live side should
feed events in log order (e.g. the recorder after each committed batch, or a tail of
``EventLog.read(after=...)``): a step's line is emitted when its TrainStepCompleted is
fed, from the trajectories and rewards of that step fed before it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from protocol.events import Envelope, RewardAssigned, TrainStepCompleted, TrajectoryCompleted

#: Event types the metrics are computed from.
METRIC_TYPES = (TrajectoryCompleted.TYPE, RewardAssigned.TYPE, TrainStepCompleted.TYPE)


@dataclass
class _Rollout:
    response_len: int
    tool_calls: int
    tool_errors: int


@dataclass
class _Step:
    rollouts: dict[str, _Rollout] = field(default_factory=dict)  # rollout_id -> stats
    rewards: dict[str, tuple[float, bool]] = field(default_factory=dict)  # rollout_id -> (reward, correct)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class StepMetricsBuilder:
    """Accumulates trajectories and rewards per step; emits a metrics dict per train step.

    Idempotent under redelivery: a trajectory or reward fed twice (same rollout id)
    counts once, and a step's metrics are emitted once.
    """

    def __init__(self) -> None:
        # Keyed by (stage, step): evaluation rollouts carry stage "eval" and stay out.
        self._steps: dict[tuple[str, int], _Step] = {}
        self._done: set[tuple[str, int]] = set()

    def feed(self, env: Envelope) -> dict[str, Any] | None:
        """Take one event; return the step's metrics when ``env`` is a TrainStepCompleted."""
        p = env.payload
        if isinstance(p, (TrajectoryCompleted, RewardAssigned, TrainStepCompleted)):
            key = (p.stage, p.step)
            if key in self._done:
                return None  # a late or redelivered event of a step already reported
            if isinstance(p, TrajectoryCompleted):
                errors = sum(1 for call in p.tool_calls if call.get("status") != "ok")
                rollout = _Rollout(int(p.response_ids.shape[0]), len(p.tool_calls), errors)
                self._steps.setdefault(key, _Step()).rollouts[p.rollout_id] = rollout
            elif isinstance(p, RewardAssigned):
                self._steps.setdefault(key, _Step()).rewards[p.rollout_id] = (p.reward, p.correct)
            else:
                self._done.add(key)
                return _metrics(p, self._steps.pop(key, _Step()))
        return None


def _metrics(train: TrainStepCompleted, s: _Step) -> dict[str, Any]:
    rollouts = list(s.rollouts.values())
    rewards = list(s.rewards.values())
    n_calls = sum(r.tool_calls for r in rollouts)
    return {
        "step": train.step,
        "stage": train.stage,
        "kind": train.kind,
        "n_trajectories": len(rollouts),
        "reward": _mean([r for r, _ in rewards]),  # mean over every rewarded rollout of the step
        "accuracy": _mean([1.0 if c else 0.0 for _, c in rewards]),
        "tool_calls": _mean([float(r.tool_calls) for r in rollouts]),  # per trajectory
        "tool_errors": sum(r.tool_errors for r in rollouts) / n_calls if n_calls else None,  # per call
        "response_len": _mean([float(r.response_len) for r in rollouts]),  # tokens
        "loss": train.loss,
        "n_kept": train.n_sequences,
        "seconds": train.seconds,
    }


def iter_step_metrics(envelopes: Iterable[Envelope]) -> Iterator[dict[str, Any]]:
    """Metrics of every train step in ``envelopes`` (in the order given)."""
    builder = StepMetricsBuilder()
    for env in envelopes:
        m = builder.feed(env)
        if m is not None:
            yield m


def step_metrics(log: Any, run_id: str) -> list[dict[str, Any]]:
    """Per-step metrics of ``run_id`` rebuilt from ``log`` (an EventLog) alone.

    Each dict: step, stage, kind, n_trajectories, reward, accuracy, tool_calls,
    tool_errors, response_len, loss, n_kept, seconds (None where a step has no rollouts,
    e.g. SFT steps).
    """
    return list(iter_step_metrics(env for _, env in log.read(run_id=run_id, types=METRIC_TYPES)))


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_step(m: dict[str, Any]) -> str:
    """One line for a step's metrics; the launcher prints exactly this."""
    return (
        f"step {m['step']:>4} {m['stage']}/{m['kind']}"
        f"  reward {_f(m['reward'], '.3f')}  acc {_f(m['accuracy'], '.3f')}"
        f"  tools {_f(m['tool_calls'], '.2f')}  tool_err {_f(m['tool_errors'], '.3f')}"
        f"  len {_f(m['response_len'], '.1f')}  loss {_f(m['loss'], '.5f')}"
        f"  kept {m['n_kept']}  {m['seconds']:.2f}s"
    )
