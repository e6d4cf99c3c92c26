"""The simulator: cost model pieces, bounds, and both policies on small seeded workloads."""

from __future__ import annotations

import numpy as np
import pytest

import math

from actors.simulator import (
    SimConfig,
    compare,
    lower_bound,
    make_workload,
    no_migration_bound,
    nonclairvoyant_bound,
    occupancy_ceiling,
    per_rollout_costs,
    pipeline_bound,
    simulate,
    steady_window,
    train_seconds,
)


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
        assert r.makespan >= r.placement_floor * 0.99  # the busiest engine's weight reads + engine seconds
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
    on = simulate(small(steps=3, staleness=0, learner_gpus=0), "dynamic")
    off = simulate(small(steps=3, staleness=1, learner_gpus=0), "dynamic")
    assert off.makespan < on.makespan
    assert off.kv_occupancy > on.kv_occupancy
    assert all(np.diff(on.step_end) > 0)


def test_bad_config_names_the_field() -> None:
    with pytest.raises(ValueError, match="staleness"):
        SimConfig(staleness=3)
    with pytest.raises(ValueError, match="weights"):
        _ = SimConfig(weight_bytes=1e12).kv_capacity


def test_learner_time_gates_the_next_steps() -> None:
    # A slow learner (0.01 GPU-equivalents): each step's training takes seconds, and step k may
    # start only once the weights trained on step k-1-staleness are out.
    for st in (0, 1):
        cfg = small(steps=4, staleness=st, learner_gpus=1, flops=0.65e15 / 50)
        w = make_workload(cfg)
        train = train_seconds(cfg, w)
        assert (train > 1.0).all()
        r = simulate(cfg, "dynamic", w)
        for k in range(cfg.steps):
            assert r.train_end[k] >= r.step_end[k] + train[k] - 1e-9
            if k:
                assert r.train_end[k] >= r.train_end[k - 1] + train[k] - 1e-9  # one step at a time
            need = k - 1 - st
            if need >= 0:
                assert r.step_release[k] >= r.train_end[need]
        free = simulate(cfg.model_copy(update={"learner_gpus": 0}), "dynamic", w)
        assert r.makespan > free.makespan


def test_pipeline_bound_chains_steps_through_the_learner() -> None:
    cfg0 = small(steps=4, staleness=0)
    cfg1 = small(steps=4, staleness=1)
    lb, train = [10.0, 10.0, 10.0, 10.0], np.array([3.0, 3.0, 3.0, 3.0])
    assert pipeline_bound(cfg0, lb, train) == 40 + 3 * 3  # in series, training between steps
    # staleness 1: 0 and 1 start at 0; 2 after train(0) = 13; 3 after train(1), which waits for train(0): 16
    assert pipeline_bound(cfg1, lb, train) == 26
    assert pipeline_bound(cfg0, lb, np.zeros(4)) == 40


def test_steady_window_spans_whole_periods() -> None:
    rel = [0.0, 0.0, 5.0, 7.0, 11.0, 13.0, 17.0]
    assert steady_window(small(steps=7, staleness=1), rel, 20.0) == (5.0, 17.0)  # releases 2 .. 6
    assert steady_window(small(steps=7, staleness=0), rel, 20.0) == (0.0, 17.0)  # releases 1 .. 6
    assert steady_window(small(steps=1), [0.0], 20.0) == (0.0, 20.0)


def test_occupancy_ceiling_is_the_steps_kv_over_the_period() -> None:
    cfg = small(steps=2, staleness=1, prompts=8)
    w = make_workload(cfg)
    ceiling, mean = occupancy_ceiling(cfg, w)
    # The step mean: every token's context, summed, over (longest rollout x gpus x K).
    tokens = sum(float(np.sum(w.prompt[i] + np.arange(w.model_tokens[i])))
                 + float(np.sum(w.tool_out[i] * (w.model_tokens[i] - w.tool_pos[i]))) for i in range(w.n))
    assert math.isclose(mean, tokens / (w.model_tokens.max() * cfg.gpus * cfg.kv_capacity), rel_tol=1e-9)
    assert mean <= ceiling <= 1.0  # time-weighting favours the fuller steps
    tiny = small(steps=2, staleness=1, hbm_bytes=28e9 / 0.9 + 5_000 * 160 * 1024 / 0.9)
    assert math.isnan(occupancy_ceiling(tiny, make_workload(tiny))[0])  # the cache binds: dispatch decides


def test_nonclairvoyant_bound_sits_between_the_mean_and_an_oblivious_placement() -> None:
    cfg = small(prompts=32)
    w = make_workload(cfg)
    idx = np.arange(w.n)
    m, _, e, _ = per_rollout_costs(cfg, w, idx)
    t_w = cfg.weight_bytes / cfg.bandwidth
    nc = nonclairvoyant_bound(cfg, w, idx)
    gpu = idx % cfg.gpus  # a placement made without looking at lengths
    floor = max(m[gpu == g].max() * t_w + e[gpu == g].sum() for g in range(cfg.gpus))
    assert e.sum() / cfg.gpus < nc <= floor
