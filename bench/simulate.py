"""Rollout dispatch at cluster scale: dynamic (KV-aware) vs static, in the simulator.

Run: ``python -m bench.simulate [--quick] [--plot-dir DIR]``. Prints one table: for each
scenario, both policies on the same seeded workload, the makespan lower bound, makespan/LB,
time-averaged and peak KV occupancy, evictions, and dynamic's speedup over static (the
baseline measured in the same run). Cost model and reading guide: docs/scheduling.md.
"""

from __future__ import annotations

import argparse
import os

import math

from actors.simulator import SimConfig, compare, format_rows, make_workload, occupancy_ceiling, plot_kv


def scenarios(quick: bool) -> list[tuple[str, SimConfig]]:
    out = [
        ("8 GPUs, on-policy", SimConfig(gpus=8)),
        ("64 GPUs, on-policy", SimConfig(gpus=64)),
        ("256 GPUs, on-policy", SimConfig(gpus=256)),
        # Stage 2/3 budget (12K) with longer answers: static's 256 rollouts per GPU outgrow the KV cache.
        ("64 GPUs, 12K, long responses (static overflows)",
         SimConfig(gpus=64, max_tokens=12288, response_median=6000, response_sigma=0.6)),
    ]
    steps = 3 if quick else 10
    # Multi-step rows: the learner (64 GPUs of its own) trains each step after it finishes (~68 s at 8K).
    out += [
        (f"64 GPUs, {steps} steps, on-policy", SimConfig(gpus=64, steps=steps, staleness=0)),
        (f"64 GPUs, {steps} steps, staleness 1", SimConfig(gpus=64, steps=steps, staleness=1)),
        # The same with training taking no time: the most staleness 1 can give here.
        (f"64 GPUs, {steps} steps, staleness 1, no learner time",
         SimConfig(gpus=64, steps=steps, staleness=1, learner_gpus=0)),
        # Two steps in flight overfill the cache here: the regime where filling it is dispatch's job.
        (f"64 GPUs, 12K, long responses, {steps // 2} steps, staleness 1",
         SimConfig(gpus=64, max_tokens=12288, response_median=6000, response_sigma=0.6, steps=steps // 2, staleness=1)),
    ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="3 steps instead of 10 (1 instead of 5) in the multi-step rows")
    ap.add_argument("--plot-dir", default=None, help="write one KV-occupancy PNG per scenario here")
    args = ap.parse_args()
    rows = []
    for title, cfg in scenarios(args.quick):
        c = compare(cfg)
        rows.append(c)
        d = c.dynamic
        extra = ""
        if cfg.steps > 1 and cfg.staleness > 0:
            ceiling, mean = occupancy_ceiling(cfg, make_workload(cfg))
            extra = (f"; steady-state KV {d.kv_steady:.1%} (static {c.static.kv_steady:.1%}); pipeline ceiling "
                     + (f"{ceiling:.1%}" if not math.isnan(ceiling) else "none (the cache binds)")
                     + f", KV per decode step of the steps in flight {mean:.1%} of the cache")
        print(f"# {title}: LB = max(work {c.lb_work:.1f} s, critical path {c.lb_critical:.1f} s), no-migration "
              f"bound {c.lb_no_migration:.1f} s, non-clairvoyant bound {c.lb_nonclairvoyant:.1f} s; dynamic "
              f"{d.makespan:.1f} s (its placement's per-GPU floor {d.placement_floor:.1f} s) vs static "
              f"{c.static.makespan:.1f} s -> speedup {c.speedup:.2f}x; dynamic KV while rollouts wait "
              f"{d.kv_pending:.1%}, next step held back by the release rule {d.stale_wait:.0%} of the time{extra} "
              f"(simulated in {d.wall_s + c.static.wall_s:.0f} s)", flush=True)
        if args.plot_dir:
            os.makedirs(args.plot_dir, exist_ok=True)
            name = title.split(" (")[0].replace(",", "").replace(" ", "_").lower()
            plot_kv(c, os.path.join(args.plot_dir, f"kv_occupancy_{name}.png"))
    print()
    print(format_rows(rows))


if __name__ == "__main__":
    main()
