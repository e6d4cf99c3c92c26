"""Verifier: turns a finished trajectory into its outcome reward.

Consumes TrajectoryCompleted, extracts the final answer and checks it against the gold
answer in a pool of worker processes (training/rewards.py: math-verify, then a
normalizing fallback, each check bounded in time), and sends RewardAssigned to the
scheduler with the trace of the decision (extracted answer, checker, seconds).
"""

from __future__ import annotations

import trio

from actors.runtime import Context
from protocol.events import Envelope, RewardAssigned, TrajectoryCompleted
from training.rewards import VerifierPool


async def run(ctx: Context, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with VerifierPool(ctx.config.verifier.pool) as pool:

        async def verify(env: Envelope) -> None:
            t: TrajectoryCompleted = env.payload
            s = await pool.score(t.response_text, t.answer)
            ctx.emit(
                RewardAssigned(
                    rollout_id=t.rollout_id, group_id=t.group_id, step=t.step, stage=t.stage, reward=s.reward,
                    correct=s.correct, extracted=s.extracted, gold=t.answer, method=s.method, seconds=s.seconds,
                    answer_tags=s.answer_tags, turns=t.turns,
                ),
                to=["scheduler"],
                cause=env,
            )
            ctx.state = f"verified {pool.completed}"

        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                env = await ctx.receive()
                if isinstance(env.payload, TrajectoryCompleted):
                    nursery.start_soon(verify, env)
