"""Learner: one GRPO-RoC (or SFT) optimizer step per BatchFormed, then new weights.

Consumes BatchFormed from the scheduler, runs the step on DeepSpeed (training/learner.py:
logprobs recomputed, PPO-clip with clip-higher and dual-clip, token-mean), reports
TrainStepCompleted, publishes the weights as a Hugging Face directory and announces them
(WeightsPublished) to the generators, which reload in place. Training runs in a worker
thread so the actor keeps heartbeating and receiving during a step.
"""

from __future__ import annotations

import time
from pathlib import Path

import trio

from actors.runtime import Context
from protocol.events import BatchFormed, Envelope, TrainStepCompleted, WeightsPublished
from training.learner import Learner


async def run(ctx: Context, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    cfg = ctx.config
    run_dir = Path(cfg.run.run_dir)
    learner: Learner = await trio.to_thread.run_sync(
        lambda: Learner(cfg.learner, cfg.model.path, str(run_dir / "learner"))
    )
    version = 0
    task_status.started()
    while True:
        env: Envelope = await ctx.receive()
        batch = env.payload
        if not isinstance(batch, BatchFormed):
            continue
        t0 = time.monotonic()
        ctx.state = f"training step {batch.step}"
        metrics = await trio.to_thread.run_sync(learner.train_step, batch)
        version += 1
        path, sha = await trio.to_thread.run_sync(
            learner.publish, version, str(run_dir / "weights" / f"v{version:05d}")
        )
        ctx.emit(
            TrainStepCompleted(
                step=batch.step, stage=batch.stage, kind=batch.kind, loss=float(metrics["loss"]),
                metrics={k: float(v) for k, v in metrics.items()}, n_sequences=len(batch.rollout_ids),
                n_tokens=int(batch.loss_mask.sum()), seconds=time.monotonic() - t0, weights_version=version,
            ),
            to=["scheduler"],
            cause=env,
        )
        ctx.emit(
            WeightsPublished(version=version, step=batch.step, path=path, sha256=sha),
            to=ctx.config.generators() + ["scheduler"],
            cause=env,
        )
        ctx.state = f"idle after step {batch.step}"
