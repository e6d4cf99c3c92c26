"""GRPO-RoC down-sampling (Resample-on-Correct), paper §2.2 and the release's ``roc.py``.

Per prompt the scheduler oversamples 2G rollouts; once all are rewarded, :func:`roc_downsample`
keeps G of them for training:

* a group whose rewards are all equal carries no GRPO signal and is dropped whole;
* negatives (reward <= 0) keep ``round(n_neg * G / N)``, chosen uniformly at random;
* positives (reward > 0) keep ``round(n_pos * G / N)``, preferring low ``p_total``
  (:func:`penalty`): ``"release"`` sorts ascending and takes the lowest (what the public
  rStar2-Agent code does; the default), ``"paper"`` samples without replacement with
  probability proportional to ``1 / p_total`` (what the paper's text describes);
* each side keeps at least ``min_per_side`` (2) rollouts when it has them, taking the slack
  from the other side, so the kept group still has both signs.

``"none"`` is plain GRPO on the oversampled group: equal-reward groups are still dropped, and G
rollouts are kept uniformly at random. All randomness comes from the caller's ``rng`` so a run
is reproducible from its seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RocMode = Literal["release", "paper", "none"]


class RocConfig(BaseModel):
    """Settings of the down-sampling step (embedded in the run config)."""

    model_config = ConfigDict(extra="forbid")

    mode: RocMode = "release"  # release: lowest p_total first; paper: sample ∝ 1/p_total; none: plain GRPO
    min_per_side: int = Field(2, ge=0)  # keep at least this many positives and negatives when available


@dataclass(frozen=True, slots=True)
class RolloutStats:
    """What RoC needs to know about one finished, rewarded rollout."""

    rollout_id: str
    reward: float
    n_tool_calls: int  # tool calls the model made
    n_tool_errors: int  # of those, how many failed (status other than ok)
    answer_tags: int  # complete <answer>...</answer> blocks in the response
    turns: int  # assistant turns

    def __post_init__(self) -> None:
        if min(self.n_tool_calls, self.n_tool_errors, self.answer_tags, self.turns) < 0:
            raise ValueError(f"rollout {self.rollout_id!r}: counts must be >= 0, got {self}")
        if self.n_tool_errors > self.n_tool_calls:
            raise ValueError(
                f"rollout {self.rollout_id!r}: n_tool_errors={self.n_tool_errors} exceeds "
                f"n_tool_calls={self.n_tool_calls}"
            )


@dataclass(frozen=True, slots=True)
class Resample:
    """The outcome for one group: which rollouts train, which do not, and why."""

    kept: list[str]  # rollout ids kept for training (empty when the group is dropped)
    dropped: list[str]  # every other rollout id of the group
    penalties: dict[str, float]  # rollout_id -> p_total, for the positives
    reason: str  # "resampled" | "all_equal"


def penalty(s: RolloutStats) -> tuple[float, float, float]:
    """RoC penalties of one rollout: ``(p_err, p_format, p_total)``.

    ``p_err`` is 0.5 when the rollout made no tool call (the release's neutral value), else the
    fraction of its tool calls that failed. ``p_format`` is 1 without an answer tag, else
    ``min(1, (answer_tags - 1) / turns)`` — repeated answers are penalised per turn; a rollout
    with answer tags but no counted turn gets 1 (as the release does). ``p_total`` is their sum.
    """
    p_err = 0.5 if s.n_tool_calls == 0 else s.n_tool_errors / s.n_tool_calls
    if s.answer_tags == 0 or s.turns == 0:
        p_format = 1.0
    else:
        p_format = min(1.0, (s.answer_tags - 1) / s.turns)
    return p_err, p_format, p_err + p_format


def side_counts(n_pos: int, n_neg: int, group_size: int, min_per_side: int = 2) -> tuple[int, int]:
    """How many positives and negatives to keep from a mixed group of ``n_pos + n_neg``.

    Each side keeps ``round(n * G / N)`` (Python's round, as the release). A side below its
    minimum — ``min(min_per_side, its size)`` — is raised to it and the other side takes
    ``G - that``, as the release does. The minimum is capped at ``G // 2`` so both sides can
    have it. Unlike the release (which asserts), an odd G whose two halves round to ``G ± 1``
    is settled on the negative side, so exactly ``min(G, N)`` rollouts are always kept.
    """
    n = n_pos + n_neg
    if n <= group_size:
        return n_pos, n_neg
    floor = min(min_per_side, group_size // 2)
    keep_pos = round(n_pos * group_size / n)
    keep_neg = round(n_neg * group_size / n)
    lo_neg, lo_pos = min(floor, n_neg), min(floor, n_pos)
    if keep_neg <= lo_neg:
        keep_neg = lo_neg
        keep_pos = group_size - keep_neg
    if keep_pos <= lo_pos:
        keep_pos = lo_pos
        keep_neg = group_size - keep_pos
    keep_pos = min(keep_pos, n_pos)
    keep_neg = min(group_size - keep_pos, n_neg)
    if keep_pos + keep_neg < group_size:  # only when the negatives ran short
        keep_pos = min(group_size - keep_neg, n_pos)
    return keep_pos, keep_neg


def _lowest_penalty(ids: list[str], p: dict[str, float], k: int) -> list[str]:
    # A stable sort keeps arrival order among equal penalties, like the release's list.sort.
    return sorted(ids, key=lambda i: p[i])[:k]


def _sample_inverse_penalty(ids: list[str], p: dict[str, float], k: int, rng: random.Random) -> list[str]:
    """k ids without replacement, each draw with probability ∝ 1/p (Efraimidis–Spirakis keys).

    The key ``u ** (1/w)`` with ``w = 1/p`` is ``u ** p``; ranking by ``p * log(u)`` is the same
    order without underflow. ``p = 0`` is an infinite weight: those ids come first, in random
    order (the second key), exactly the limit of the weighted draw.
    """
    keyed = [(p[i] * math.log(1.0 - rng.random()), rng.random(), i) for i in ids]
    keyed.sort(reverse=True)
    return [i for _, _, i in keyed[:k]]


def roc_downsample(
    group: list[RolloutStats],
    group_size: int,
    *,
    mode: RocMode = "release",
    rng: random.Random,
    min_per_side: int = 2,
) -> Resample:
    """Down-sample one completed group of (normally 2G) rollouts to ``group_size`` (G).

    Inputs: the group's rollouts with rewards and tool/format counts; G; the mode; the caller's
    RNG (the only source of randomness). Output: a :class:`Resample` whose ``kept`` and
    ``dropped`` partition the group's ids (kept in group order). A group of at most G rollouts
    is kept whole (nothing to choose). Raises ValueError on an empty group, duplicate ids,
    ``group_size < 1`` or an unknown mode.
    """
    if mode not in ("release", "paper", "none"):
        raise ValueError(f"unknown RoC mode {mode!r}; use 'release', 'paper' or 'none'")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if not group:
        raise ValueError("roc_downsample got an empty group")
    ids = [s.rollout_id for s in group]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate rollout ids in group: {sorted(i for i in set(ids) if ids.count(i) > 1)}")

    positives = [s.rollout_id for s in group if s.reward > 0]
    negatives = [s.rollout_id for s in group if s.reward <= 0]
    p_total = {s.rollout_id: penalty(s)[2] for s in group if s.reward > 0}

    if len({s.reward for s in group}) == 1:
        return Resample(kept=[], dropped=ids, penalties=p_total, reason="all_equal")

    if mode == "none":
        chosen = set(rng.sample(ids, min(group_size, len(ids))))
    else:
        keep_pos, keep_neg = side_counts(len(positives), len(negatives), group_size, min_per_side)
        if mode == "release":
            pos = _lowest_penalty(positives, p_total, keep_pos)
        else:
            pos = _sample_inverse_penalty(positives, p_total, keep_pos, rng)
        chosen = set(pos) | set(rng.sample(negatives, keep_neg))
    return Resample(
        kept=[i for i in ids if i in chosen],
        dropped=[i for i in ids if i not in chosen],
        penalties=p_total,
        reason="resampled",
    )


__all__ = ["RocConfig", "RocMode", "RolloutStats", "Resample", "penalty", "side_counts", "roc_downsample"]
