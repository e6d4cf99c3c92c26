"""GRPO-RoC down-sampling: penalties, counts per side, preference for clean positives."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.roc import RolloutStats, penalty, roc_downsample, side_counts


def stats(i: int, reward: float, calls: int = 2, errors: int = 0, tags: int = 1, turns: int = 3) -> RolloutStats:
    return RolloutStats(f"r{i}", reward, calls, errors, tags, turns)


# --------------------------------------------------------------------------- penalty


def test_penalty_no_tool_call_is_half() -> None:
    assert penalty(stats(0, 1.0, calls=0, errors=0)) == (0.5, 0.0, 0.5)


def test_penalty_error_ratio_and_repeated_answers() -> None:
    p_err, p_fmt, p_tot = penalty(stats(0, 1.0, calls=4, errors=1, tags=3, turns=4))
    assert (p_err, p_fmt, p_tot) == (0.25, 0.5, 0.75)


def test_penalty_missing_answer_tag_is_one() -> None:
    assert penalty(stats(0, 1.0, calls=1, errors=1, tags=0, turns=2)) == (1.0, 1.0, 2.0)


def test_penalty_format_caps_at_one() -> None:
    assert penalty(stats(0, 1.0, tags=9, turns=2))[1] == 1.0


def test_stats_reject_more_errors_than_calls() -> None:
    with pytest.raises(ValueError, match="n_tool_errors"):
        stats(0, 1.0, calls=1, errors=2)


# --------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    ("n_pos", "expect"),
    [
        (16, (8, 8)),  # balanced: half of each side
        (20, (10, 6)),
        (8, (4, 12)),
        (1, (1, 15)),  # a lone positive: kept (min(2, 1))
        (2, (2, 14)),
        (3, (2, 14)),  # round(1.5) = 2
        (30, (14, 2)),  # negatives raised to the minimum of 2
        (31, (15, 1)),  # only one negative exists
    ],
)
def test_side_counts_paper_scale(n_pos: int, expect: tuple[int, int]) -> None:
    assert side_counts(n_pos, 32 - n_pos, 16) == expect


def test_side_counts_odd_group_size_keeps_exactly_g() -> None:
    for n_pos in range(1, 10):
        assert sum(side_counts(n_pos, 10 - n_pos, 5)) == 5


# --------------------------------------------------------------------------- down-sampling


def test_all_equal_groups_are_dropped_in_every_mode() -> None:
    for mode in ("release", "paper", "none"):
        for r in (0.0, 1.0):
            group = [stats(i, r) for i in range(8)]
            res = roc_downsample(group, 4, mode=mode, rng=random.Random(0))
            assert res.kept == [] and res.reason == "all_equal"
            assert sorted(res.dropped) == sorted(s.rollout_id for s in group)


def test_release_keeps_lowest_penalty_positives() -> None:
    # 8 positives with distinct penalties (errors 0..7 of 8 calls), 8 negatives; G = 8.
    group = [stats(i, 1.0, calls=8, errors=i) for i in range(8)] + [stats(8 + i, 0.0) for i in range(8)]
    res = roc_downsample(group, 8, mode="release", rng=random.Random(1))
    kept_pos = [i for i in res.kept if int(i[1:]) < 8]
    assert kept_pos == ["r0", "r1", "r2", "r3"]
    assert len(res.kept) == 8 and res.reason == "resampled"
    assert res.penalties["r7"] == pytest.approx(7 / 8)
    assert set(res.penalties) == {f"r{i}" for i in range(8)}  # positives only


def test_paper_mode_prefers_low_penalty_but_samples() -> None:
    # Two clean positives (p_total 0.0) must always be kept; among the rest, the lower
    # penalty must be kept more often than the higher one.
    group = (
        [stats(0, 1.0, calls=2, errors=0), stats(1, 1.0, calls=2, errors=0)]
        + [stats(2 + i, 1.0, calls=10, errors=1 + 2 * i) for i in range(5)]  # p = .1 .3 .5 .7 .9
        + [stats(7 + i, 0.0) for i in range(9)]
    )
    counts: Counter[str] = Counter()
    rng = random.Random(7)
    for _ in range(2000):
        res = roc_downsample(group, 8, mode="paper", rng=rng)
        counts.update(res.kept)
    assert counts["r0"] == counts["r1"] == 2000
    assert counts["r2"] > counts["r4"] > counts["r6"]  # p 0.1 > p 0.5 > p 0.9
    assert 0 < counts["r6"] < 2000  # sampled, not sorted


def test_paper_mode_weights_match_inverse_penalty() -> None:
    # One positive slot among p = 0.25 and p = 0.75: probabilities 3/4 and 1/4.
    group = [stats(0, 1.0, calls=4, errors=1), stats(1, 1.0, calls=4, errors=3)] + [stats(2 + i, 0.0) for i in range(4)]
    rng = random.Random(3)
    wins = 0
    for _ in range(4000):
        res = roc_downsample(group, 3, mode="paper", rng=rng, min_per_side=1)
        assert sum(1 for i in res.kept if i in ("r0", "r1")) == 1
        wins += "r0" in res.kept
    assert abs(wins / 4000 - 0.75) < 0.03


def test_none_mode_keeps_uniform_g() -> None:
    group = [stats(i, float(i % 2)) for i in range(8)]
    res = roc_downsample(group, 4, mode="none", rng=random.Random(0))
    assert len(res.kept) == 4 and len(res.dropped) == 4


def test_small_group_is_kept_whole() -> None:
    group = [stats(0, 1.0), stats(1, 0.0), stats(2, 1.0)]
    res = roc_downsample(group, 4, mode="release", rng=random.Random(0))
    assert res.kept == ["r0", "r1", "r2"] and res.dropped == []


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(ValueError, match="mode"):
        roc_downsample([stats(0, 1.0)], 1, mode="best", rng=random.Random(0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="duplicate"):
        roc_downsample([stats(0, 1.0), stats(0, 0.0)], 1, rng=random.Random(0))
    with pytest.raises(ValueError, match="empty"):
        roc_downsample([], 1, rng=random.Random(0))


# --------------------------------------------------------------------------- property test


rollout = st.tuples(
    st.sampled_from([0.0, 1.0]),
    st.integers(0, 6),  # calls
    st.integers(0, 6),  # errors (clipped to calls below)
    st.integers(0, 3),  # answer tags
    st.integers(0, 6),  # turns
)


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(rollout, min_size=1, max_size=40),
    group_size=st.integers(1, 20),
    mode=st.sampled_from(["release", "paper", "none"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_random_groups(rows: list, group_size: int, mode: str, seed: int) -> None:
    group = [RolloutStats(f"r{i}", r, c, min(e, c), t, n) for i, (r, c, e, t, n) in enumerate(rows)]
    res = roc_downsample(group, group_size, mode=mode, rng=random.Random(seed))  # type: ignore[arg-type]
    ids = [s.rollout_id for s in group]
    assert sorted(res.kept + res.dropped) == sorted(ids)
    assert not set(res.kept) & set(res.dropped)
    rewards = {s.rollout_id: s.reward for s in group}
    if len(set(rewards.values())) == 1:
        assert res.kept == [] and res.reason == "all_equal"
        return
    assert len(res.kept) == min(group_size, len(group))
    if mode == "none" or len(group) <= group_size:
        return
    pos = [i for i in ids if rewards[i] > 0]
    neg = [i for i in ids if rewards[i] <= 0]
    kept_pos = [i for i in res.kept if rewards[i] > 0]
    kept_neg = [i for i in res.kept if rewards[i] <= 0]
    floor = min(2, group_size // 2)
    assert len(kept_pos) >= min(floor, len(pos))
    assert len(kept_neg) >= min(floor, len(neg))
    # Counts within one of the proportional share, unless raised to a side's minimum.
    assert (len(kept_pos), len(kept_neg)) == side_counts(len(pos), len(neg), group_size)
    if mode == "release":  # no dropped positive is cleaner than a kept one
        dropped_pos = [i for i in pos if i not in res.kept]
        if kept_pos and dropped_pos:
            assert max(res.penalties[i] for i in kept_pos) <= min(res.penalties[i] for i in dropped_pos)
    if mode == "paper":  # a zero-penalty positive is never dropped while a penalised one is kept
        dropped_pos = [i for i in pos if i not in res.kept]
        if any(res.penalties[i] == 0 for i in dropped_pos):
            assert all(res.penalties[i] == 0 for i in kept_pos)


def test_side_counts_are_proportional_when_unconstrained() -> None:
    for n_pos in range(4, 29):
        kp, kn = side_counts(n_pos, 32 - n_pos, 16)
        assert abs(kp - n_pos / 2) <= 0.5 and abs(kn - (32 - n_pos) / 2) <= 0.5
