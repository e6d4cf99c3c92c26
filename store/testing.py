"""Synthetic but complete event streams, for the store's tests and benchmark.

:func:`synthetic_run` produces what a small RL run emits, in a plausible order: per step,
for each rollout a RolloutRequested, tool call requests and completions, a
TrajectoryCompleted with token arrays, and a RewardAssigned; then a GroupResampled per
group, a BatchFormed and a TrainStepCompleted. Deterministic for a given seed.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import numpy as np

from protocol.events import (
    BatchFormed,
    Envelope,
    Event,
    GroupResampled,
    RewardAssigned,
    RolloutRequested,
    RunStarted,
    StageStarted,
    ToolCallCompleted,
    ToolCallRequested,
    TrainStepCompleted,
    TrajectoryCompleted,
    new_event_id,
)


class Emitter:
    """Wraps payloads into envelopes with per-source gap-free ``seq``."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._seq: dict[str, itertools.count] = {}

    def __call__(self, source: str, payload: Event, cause: str | None = None) -> Envelope:
        seq = next(self._seq.setdefault(source, itertools.count()))
        return Envelope(new_event_id(), payload.TYPE, payload.VERSION, self.run_id, source, seq, time.time(), cause, payload)


def trajectory(
    rollout_id: str,
    *,
    group_id: str = "g0",
    step: int = 1,
    stage: str = "rl1",
    n_prompt: int = 50,
    n_response: int = 1000,
    text_chars: int = 2000,
    tool_calls: list | None = None,
    rng: np.random.Generator | None = None,
) -> TrajectoryCompleted:
    """A TrajectoryCompleted with realistic array sizes and ``text_chars`` of response text."""
    rng = rng or np.random.default_rng(0)
    calls = tool_calls if tool_calls is not None else [{"call_id": f"{rollout_id}-c0", "status": "ok"}]
    mask = np.ones(n_response, dtype=np.int32)
    mask[n_response // 2 : n_response // 2 + 20] = 0  # a tool response span
    return TrajectoryCompleted(
        rollout_id=rollout_id,
        group_id=group_id,
        step=step,
        stage=stage,
        problem_id=f"p-{group_id}",
        answer="42",
        generator="generator-0",
        prompt_ids=rng.integers(0, 32000, n_prompt, dtype=np.int32),
        response_ids=rng.integers(0, 32000, n_response, dtype=np.int32),
        logprobs=(-rng.random(n_response, dtype=np.float32) * mask).astype(np.float32),
        loss_mask=mask,
        versions=np.where(mask == 1, step - 1, -1).astype(np.int32),
        response_text=("Let me compute this with Python. " * (text_chars // 33 + 1))[:text_chars],
        turns=len(calls) + 1,
        tool_calls=calls,
        finish_reason="stop",
        seconds=1.25,
    )


def synthetic_run(
    run_id: str,
    *,
    steps: int = 2,
    groups: int = 2,
    group_size: int = 4,
    n_response: int = 64,
    seed: int = 0,
) -> Iterator[Envelope]:
    """Every event of a small RL run of ``steps`` steps, in emission order."""
    rng = np.random.default_rng(seed)
    emit = Emitter(run_id)
    yield emit("launcher", RunStarted(config={"run": {"name": run_id}}, run_dir=f"runs/{run_id}", version="test"))
    stage = StageStarted(
        stage="rl1", index=0, kind="rl", steps=steps, max_tokens=2048, max_turns=4, prompts_per_step=groups,
        rollouts_per_prompt=group_size, group_size=group_size // 2, lr=1e-6, optimizer_reset=False, n_problems=100,
    )  # fmt: skip
    yield emit("scheduler", stage)
    for step in range(1, steps + 1):
        kept_ids: list[str] = []
        for g in range(groups):
            group_id = f"s{step}g{g}"
            rewards = {}
            for k in range(group_size):
                rid = f"{group_id}r{k}"
                req = emit(
                    "scheduler",
                    RolloutRequested(
                        rollout_id=rid, group_id=group_id, step=step, stage="rl1", problem_id=f"p{g}",
                        problem="What is 6*7?", answer="42", generator="generator-0", max_tokens=2048,
                        max_turns=4, temperature=1.0,
                    ),
                )  # fmt: skip
                yield req
                calls = []
                for turn in range(int(rng.integers(0, 3))):
                    cid = f"{rid}c{turn}"
                    status = "ok" if rng.random() < 0.8 else "error"
                    yield emit(
                        "generator-0",
                        ToolCallRequested(
                            call_id=cid, rollout_id=rid, turn=turn, code=f"print(6*{7 + turn})",
                            executor="tool-0", reply_to="generator-0", timeout_s=5.0,
                        ),
                    )  # fmt: skip
                    yield emit(
                        "tool-0",
                        ToolCallCompleted(
                            call_id=cid, rollout_id=rid, status=status,
                            stdout=f"{6 * (7 + turn)}\n" if status == "ok" else "",
                            stderr="" if status == "ok" else "NameError: name 'x' is not defined",
                            exit_code=0 if status == "ok" else 1, signal=None, duration_s=0.002,
                            text=f"{6 * (7 + turn)}",
                        ),
                    )  # fmt: skip
                    calls.append({"call_id": cid, "status": status})
                traj = trajectory(
                    rid, group_id=group_id, step=step, n_response=int(n_response + rng.integers(0, n_response)),
                    text_chars=200, tool_calls=calls, rng=rng,
                )  # fmt: skip
                t_env = emit("generator-0", traj, req.event_id)
                yield t_env
                correct = bool(rng.random() < 0.5)
                rewards[rid] = 1.0 if correct else 0.0
                yield emit(
                    "verifier-0",
                    RewardAssigned(
                        rollout_id=rid, group_id=group_id, step=step, stage="rl1", reward=rewards[rid],
                        correct=correct, extracted="42" if correct else "41", gold="42", method="math_verify",
                        seconds=0.002, answer_tags=1, turns=traj.turns,
                    ),
                    t_env.event_id,
                )  # fmt: skip
            kept = list(rewards)[: group_size // 2]
            kept_ids += kept
            yield emit(
                "scheduler",
                GroupResampled(
                    group_id=group_id, step=step, mode="roc-release", kept=kept, dropped=list(rewards)[group_size // 2 :],
                    penalties={}, rewards=rewards, advantages={r: 0.0 for r in kept}, reason="resampled",
                ),
            )  # fmt: skip
        n = len(kept_ids) * 8
        yield emit(
            "scheduler",
            BatchFormed(
                step=step, stage="rl1", kind="rl", rollout_ids=kept_ids,
                offsets=np.arange(0, n + 1, 8, dtype=np.int32), prompt_lens=np.full(len(kept_ids), 3, dtype=np.int32),
                input_ids=rng.integers(0, 32000, n, dtype=np.int32), loss_mask=np.ones(n, dtype=np.int32),
                old_logprobs=-rng.random(n, dtype=np.float32), advantages=np.zeros(len(kept_ids), dtype=np.float32),
                lr=1e-6, optimizer_reset=False,
            ),
        )  # fmt: skip
        yield emit(
            "learner",
            TrainStepCompleted(
                step=step, stage="rl1", kind="rl", loss=float(rng.normal()) * 0.01,
                metrics={"actor/grad_norm": float(rng.random()), "actor/clip_frac_high": 0.01, "perf/tokens_per_s": 1e3},
                n_sequences=len(kept_ids), n_tokens=n, seconds=float(rng.random() * 3), weights_version=step,
            ),
        )  # fmt: skip
