"""Verifier: turns a finished trajectory into its outcome reward.

Consumes TrajectoryCompleted, extracts the final answer and checks it against the gold
answer in a pool of worker processes (training/rewards.py: math-verify, then a
normalizing fallback, each check bounded in time), and sends RewardAssigned to the
scheduler with the trace of the decision (extracted answer, checker, seconds).

Supervision: a trajectory is acknowledged only once its reward reached the scheduler, so
a verification held by a killed verifier is resent (by the generator, or by the
scheduler after a deadline) to the restarted one.
"""

from __future__ import annotations

import trio

from actors.runtime import Context
from actors.supervision import note_reissue, settle
from protocol.events import Envelope, RewardAssigned, TrajectoryCompleted
from training.rewards import VerifierPool

#: Requests acknowledged only once done (actors/supervision.py).
ACK_WHEN_DONE = ("TrajectoryCompleted",)


async def run(ctx: Context, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with VerifierPool(ctx.config.verifier.pool) as pool:

        async def verify(env: Envelope) -> None:
            t: TrajectoryCompleted = env.payload
            note_reissue(ctx, env, "verification", t.rollout_id)
            s = await pool.score(t.response_text, t.answer)
            out = ctx.emit(
                RewardAssigned(
                    rollout_id=t.rollout_id, group_id=t.group_id, step=t.step, stage=t.stage, reward=s.reward,
                    correct=s.correct, extracted=s.extracted, gold=t.answer, method=s.method, seconds=s.seconds,
                    answer_tags=s.answer_tags, turns=t.turns,
                ),
                to=["scheduler"],
                cause=env,
            )
            ctx.state = f"verified {pool.completed}"
            await settle(ctx, env, out)

        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                env = await ctx.receive()
                if isinstance(env.payload, TrajectoryCompleted):
                    nursery.start_soon(verify, env)
