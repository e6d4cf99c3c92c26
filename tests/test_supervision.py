"""Supervision pieces, fast: results taken once, rewards matched to their trajectory, the
newest complete checkpoint and weights found (tests/test_chaos.py kills real actors)."""

from __future__ import annotations

import json
import time

import numpy as np

from actors.dispatch import DispatchConfig, make_policy
from actors.learner import latest_checkpoint
from actors.scheduler import Rollout, Scheduler, Step
from actors.supervision import latest_weights
from protocol.events import Envelope, RewardAssigned, RolloutRequested, TrajectoryCompleted, new_event_id


def envelope(ev, source: str, cause: Envelope | None = None) -> Envelope:
    return Envelope(event_id=new_event_id(), type=ev.TYPE, schema_version=1, run_id="r", source=source, seq=0,
                    ts=time.time(), causation_id=cause.event_id if cause else None, payload=ev)


def request(rid: str) -> RolloutRequested:
    return RolloutRequested(rollout_id=rid, group_id="g", step=1, stage="rl1", problem_id="p", problem="?",
                            answer="1", generator="generator-0", max_tokens=8, max_turns=1, temperature=1.0)


def trajectory(rid: str, n: int) -> TrajectoryCompleted:
    ids = np.arange(n, dtype=np.int32)
    return TrajectoryCompleted(
        rollout_id=rid, group_id="g", step=1, stage="rl1", problem_id="p", answer="1", generator="generator-0",
        prompt_ids=ids[:1], response_ids=ids, logprobs=np.zeros(n, np.float32), loss_mask=np.ones(n, np.int32),
        versions=np.zeros(n, np.int32), response_text="x", turns=1, tool_calls=[], finish_reason="stop", seconds=0.1,
    )


def reward(rid: str, value: float) -> RewardAssigned:
    return RewardAssigned(rollout_id=rid, group_id="g", step=1, stage="rl1", reward=value, correct=value > 0,
                          extracted=None, gold="1", method="exact", seconds=0.0, answer_tags=1, turns=1)


def scheduler_with(rid: str) -> Scheduler:
    s = Scheduler.__new__(Scheduler)  # no config, tokenizer or network: handle() only
    s.policy = make_policy(DispatchConfig())
    s.in_flight, s.pending, s.engines, s.tool_queue, s.train_done = {}, [], {}, {}, {}
    s.current = Step()
    r = Rollout(request(rid), prompt_tokens=1)
    s.current.rollouts[rid] = r
    s.in_flight[rid] = r
    return s


def test_a_rollout_settles_on_the_first_trajectory_with_its_own_reward():
    s = scheduler_with("a")
    first, rerun = envelope(trajectory("a", 3), "generator-0"), envelope(trajectory("a", 5), "generator-0")
    s.handle(first)
    s.handle(rerun)  # the generator died after sending `first` and ran the rollout again
    r = s.current.rollouts["a"]
    assert r.reward is None and not s.current.done.is_set()
    s.handle(envelope(reward("a", 1.0), "verifier-0", cause=rerun))  # the re-run was verified first
    assert r.trajectory is rerun.payload and r.reward.reward == 1.0 and s.current.done.is_set()
    assert "a" not in s.in_flight
    s.handle(envelope(reward("a", 0.0), "verifier-0", cause=first))  # settled: changes nothing
    s.handle(first)
    assert r.trajectory is rerun.payload and r.reward.reward == 1.0


def test_a_reward_counts_only_for_its_own_trajectory_and_may_come_first():
    s = scheduler_with("a")
    t, other = envelope(trajectory("a", 3), "generator-0"), envelope(trajectory("a", 4), "generator-0")
    s.handle(envelope(reward("a", 1.0), "verifier-0", cause=other))  # for a trajectory never received
    s.handle(envelope(reward("a", 0.0), "verifier-0", cause=t))  # before its trajectory
    assert not s.current.done.is_set()
    s.handle(t)
    r = s.current.rollouts["a"]
    assert r.trajectory is t.payload and r.reward.reward == 0.0 and s.current.done.is_set()


def test_an_aborted_trajectory_puts_the_rollout_back_unless_one_finished():
    s = scheduler_with("a")
    aborted = trajectory("a", 2)
    aborted = TrajectoryCompleted(**{**{f: getattr(aborted, f) for f in aborted.__dataclass_fields__},
                                     "finish_reason": "aborted"})
    s.handle(envelope(aborted, "generator-0"))
    assert "a" not in s.in_flight and [r.request.rollout_id for r in s.pending] == ["a"]
    s = scheduler_with("a")
    s.handle(envelope(trajectory("a", 3), "generator-0"))
    s.handle(envelope(aborted, "generator-0"))  # a re-run stopped: the finished one stands
    assert "a" in s.in_flight and not s.pending


def test_newest_complete_checkpoint_and_weights(tmp_path):
    assert latest_checkpoint(tmp_path) is None and latest_weights(tmp_path) is None
    for step in (3, 7):
        d = tmp_path / "checkpoints" / f"step-{step:06d}"
        d.mkdir(parents=True)
        (d / "reckon_step.json").write_text(json.dumps({"step": step, "weights_version": step}))
    (tmp_path / "checkpoints" / "step-000009").mkdir()  # killed before its report was written
    (tmp_path / "checkpoints" / ".tmp-step-000010-1").mkdir()
    path, report = latest_checkpoint(tmp_path)
    assert path.name == "step-000007" and report["step"] == 7
    for v in (1, 2):
        (tmp_path / "weights" / f"v{v:05d}").mkdir(parents=True)
        (tmp_path / "weights" / f"v{v:05d}" / "reckon_weights.json").write_text("{}")
    (tmp_path / "weights" / "v00003").mkdir()  # half written
    version, path = latest_weights(tmp_path)
    assert version == 2 and path.name == "v00002"
