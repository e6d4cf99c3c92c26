"""The simulator: cost model pieces, bounds, and both policies on small seeded workloads."""

from __future__ import annotations

import numpy as np
import pytest

from actors.simulator import SimConfig, compare, lower_bound, make_workload, no_migration_bound, simulate


def small(**kw) -> SimConfig:
    base = dict(gpus=2, prompts=16, rollouts=8, max_tokens=2048, response_median=600, tool_every=200, seed=3)
    base.update(kw)
    return SimConfig(**base)


def test_kv_capacity_matches_the_cost_model() -> None:
    cfg = SimConfig()
    assert cfg.kv_bytes_per_token == 160 * 1024  # Qwen3-14B: 160 KiB per token
    assert cfg.kv_capacity == int((192e9 * 0.9 - 28e9) // (160 * 1024))


def test_workload_is_seeded_and_within_budget() -> None:
    a, b = make_workload(small()), make_workload(small())
    assert np.array_equal(a.model_tokens, b.model_tokens)
    assert (a.response <= 2048).all() and (a.response >= 64).all()
    assert all(len(p) < 10 for p in a.tool_pos)
    assert all((np.diff(p) >= 0).all() and (p < m).all() for p, m in zip(a.tool_pos, a.model_tokens))


def test_both_policies_finish_everything_above_the_bound() -> None:
    cfg = small()
    w = make_workload(cfg)
    lb, _, crit = lower_bound(cfg, w, np.arange(w.n))
    nm = no_migration_bound(cfg, w, np.arange(w.n))
    assert nm >= w.model_tokens.max() * cfg.weight_bytes / cfg.bandwidth  # the longest one's weight reads
    for name in ("dynamic", "static"):
        r = simulate(cfg, name, w)
        assert r.makespan >= max(lb, nm) * 0.99  # tick rounding only
        assert 0 < r.kv_occupancy <= 1 and 0 < r.kv_fill <= 1
        assert r.trace_kv.shape[1] == 2


def test_dynamic_matches_static_where_kv_does_not_bind() -> None:
    # 64 rollouts of <= 2048 tokens on two 880K-token engines: both start everything at once,
    # on the same engines, so the runs are identical.
    c = compare(small(prompts=8))
    assert c.dynamic.makespan == c.static.makespan and c.dynamic.evictions == c.static.evictions == 0


def test_static_overflows_where_dynamic_does_not() -> None:
    # A tiny KV cache (mem_fraction) and many rollouts per engine: static must evict.
    cfg = small(hbm_bytes=28e9 / 0.9 + 60_000 * 160 * 1024 / 0.9, prompts=48, max_tokens=4096, response_median=1500)
    assert 50_000 < cfg.kv_capacity < 70_000
    c = compare(cfg)
    assert c.static.evictions > 0 and c.static.recomputed_tokens > 0
    assert c.dynamic.evictions == 0
    assert c.dynamic.makespan < c.static.makespan
    assert c.dynamic.trace_kv.max() <= 1.0


def test_staleness_one_overlaps_steps() -> None:
    on = simulate(small(steps=3, staleness=0), "dynamic")
    off = simulate(small(steps=3, staleness=1), "dynamic")
    assert off.makespan < on.makespan
    assert off.kv_occupancy > on.kv_occupancy
    assert all(np.diff(on.step_end) > 0)


def test_bad_config_names_the_field() -> None:
    with pytest.raises(ValueError, match="staleness"):
        SimConfig(staleness=2)
    with pytest.raises(ValueError, match="weights"):
        _ = SimConfig(weight_bytes=1e12).kv_capacity
