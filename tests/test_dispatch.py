"""Dispatch policies: KV-peak admission, even placement, slots, backpressure, the length model."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.dispatch import DispatchConfig, DynamicPolicy, EngineState, LengthModel, PendingRollout, StaticPolicy

K = 100_000


def engine(name: str, used: int = 0, running: int = 0, total: int = K, slots: int = 256) -> EngineState:
    return EngineState(name, total, total - used, slots, slots - running, running)


def pending(n: int, prompt: int = 500, max_tokens: int = 8000, start: int = 0) -> list[PendingRollout]:
    return [PendingRollout(f"r{start + i}", prompt, max_tokens) for i in range(n)]


def test_dynamic_fills_to_target_and_no_further() -> None:
    pol = DynamicPolicy(DispatchConfig(kv_target=0.9))
    out = pol.assign(pending(200), [engine("a")])
    assert 0 < len(out) < 200
    assert pol.projected_peak(engine("a")) <= 0.9 * K
    # Prior peak per young rollout ~ 0.52 x (500 + 0.53 x 8000) ~ 2460 tokens: about 30 fit, minus the margin.
    assert 20 <= len(out) <= 36
    assert pol.assign(pending(5, start=200), [engine("a")]) == []  # full until something finishes
    for rid, _ in out[:3]:
        pol.on_finished(rid, 1000)
    assert [e for _, e in pol.assign(pending(1, start=200), [engine("a")])] == ["a"]


def test_dynamic_places_like_static_where_kv_does_not_bind() -> None:
    engines = [engine(f"e{i}", total=10**8) for i in range(5)]
    dyn = DynamicPolicy().assign(pending(23), engines)
    sta = StaticPolicy().assign(pending(23), engines)
    assert dyn == sta


def test_dynamic_skips_engines_without_room() -> None:
    pol = DynamicPolicy()
    out = pol.assign(pending(30), [engine("busy", used=90_000, running=30), engine("idle")])
    assert {e for _, e in out} == {"idle"} and len(out) > 10


def test_dynamic_counts_reported_kv_it_did_not_send() -> None:
    # 40 % of the cache is in use by something the policy never saw (tool output, a restart):
    # fewer rollouts fit than on an empty engine.
    full = len(DynamicPolicy().assign(pending(100), [engine("a")]))
    part = len(DynamicPolicy().assign(pending(100), [engine("a", used=40_000, running=5)]))
    assert 0 < part < full


def test_dynamic_respects_slots() -> None:
    pol = DynamicPolicy()
    out = pol.assign(pending(10, prompt=10, max_tokens=100), [engine("a", slots=4)])
    assert len(out) == 4


def test_dynamic_throttles_on_tool_queue() -> None:
    pol = DynamicPolicy(DispatchConfig(max_tool_queue=8))
    assert pol.assign(pending(3), [engine("a")], tool_queue=9) == []
    assert len(pol.assign(pending(3), [engine("a")], tool_queue=8)) == 3


def test_dynamic_progress_raises_the_projection() -> None:
    pol = DynamicPolicy()
    pol.assign(pending(10), [engine("a")])
    before = pol.projected_peak(engine("a"))
    for i in range(10):
        pol.on_progress(f"r{i}", 6000)  # far along: they hold 6500 tokens each now
    assert pol.projected_peak(engine("a")) > before
    assert pol.projected_peak(engine("a")) >= 10 * 6500


def test_dynamic_rejects_double_dispatch() -> None:
    pol = DynamicPolicy()
    pol.assign(pending(1), [engine("a")])
    with pytest.raises(ValueError, match="already running"):
        pol.assign(pending(1), [engine("a")])


def test_static_splits_evenly_ignoring_kv() -> None:
    pol = StaticPolicy()
    out = pol.assign(pending(100), [engine("a", used=K), engine("b"), engine("c")])
    assert sorted(Counter(e for _, e in out).values()) == [33, 33, 34]
    for rid, _ in out[:10]:
        pol.on_finished(rid)
    more = pol.assign(pending(10, start=100), [engine("a"), engine("b"), engine("c")])
    assert len(more) == 10


def true_survival(lengths: np.ndarray, bins: np.ndarray) -> np.ndarray:
    return np.array([(lengths >= b).mean() for b in bins])


def test_length_model_learns_the_survival_curve() -> None:
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(np.log(3000), 0.8, 20_000), 8192).astype(int)
    m = LengthModel(8192, DispatchConfig(prior_fraction=0.0, prior_weight=1.0))
    for n in lengths:
        m.observe(int(n))
    S = m.survival(np.zeros(m.nb))
    bins = np.arange(m.nb) * m.bin
    assert np.abs(S[: m.nb] - true_survival(lengths, bins)).max() < 0.02
    assert S[-1] == 0.0


def test_length_model_is_not_fooled_by_the_short_ones_finishing_first() -> None:
    # Mid-step: only responses shorter than 1500 have finished; the rest are running at 1500.
    rng = np.random.default_rng(1)
    lengths = np.minimum(rng.lognormal(np.log(3000), 0.8, 20_000), 8192).astype(int)
    m = LengthModel(8192, DispatchConfig())
    for n in lengths[lengths <= 1500]:
        m.observe(int(n))
    running = np.bincount(np.full(int((lengths > 1500).sum()), 1500 // m.bin), minlength=m.nb)
    S = m.survival(running)
    assert abs(S[1024 // m.bin] - true_survival(lengths, np.array([1024]))[0]) < 0.02
    naive = (lengths[lengths <= 1500] >= 1024).mean()  # finished ones only: far too pessimistic
    assert S[1024 // m.bin] > naive + 0.3


@settings(max_examples=60, deadline=None)
@given(
    used=st.lists(st.integers(0, K), min_size=1, max_size=6),
    n=st.integers(0, 200),
    prompt=st.integers(1, 4000),
    max_tokens=st.integers(64, 16000),
    target=st.floats(0.1, 1.0),
)
def test_property_never_overcommits(used: list[int], n: int, prompt: int, max_tokens: int, target: float) -> None:
    pol = DynamicPolicy(DispatchConfig(kv_target=target))
    engines = [engine(f"e{i}", used=u, running=u // 5000) for i, u in enumerate(used)]
    out = pol.assign(pending(n, prompt, max_tokens), engines)
    assert [r for r, _ in out] == [p.rollout_id for p in pending(n)][: len(out)]  # FIFO prefix
    for e in engines:
        sent = sum(1 for _, name in out if name == e.name)
        if sent:
            assert pol.projected_peak(e) <= target * e.total_tokens + 1e-6
            assert sent <= e.free_slots
