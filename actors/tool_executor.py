"""Tool executor: runs the model's Python in the isolated sandbox pool.

Consumes ToolCallRequested, runs the code in a fresh sandboxed child (tools_sandbox),
and answers the requesting generator with ToolCallCompleted: the raw result (status,
stdout, stderr, exit code, signal, duration) and the text the model will see. After every
change it reports its free slots and queue depth (CapacityReported) to the generators,
which dispatch by those credits, and to the scheduler, which throttles new rollouts when
tools are the bottleneck.

Supervision: a ToolCallRequested is acknowledged only once its result reached the
generator, so a call held by a killed executor is resent to the restarted one (the code
runs in a fresh sandbox either way, so running it again is safe).
"""

from __future__ import annotations

import trio

from actors.runtime import Context
from actors.supervision import note_reissue, settle
from protocol.events import CapacityReported, Envelope, ToolCallCompleted, ToolCallRequested
from tools_sandbox import SandboxPool, format_for_model

#: Requests acknowledged only once done (actors/supervision.py).
ACK_WHEN_DONE = ("ToolCallRequested",)


async def run(ctx: Context, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    cfg = ctx.config.tools
    peers = ctx.config.generators() + ["scheduler"]
    async with SandboxPool(cfg.sandbox) as pool:
        ctx.log.info("sandbox ready", slots=pool.total_slots, features=pool.features)

        def report() -> None:
            ctx.emit(
                CapacityReported(
                    kind="tool_executor", free_tokens=0, total_tokens=0, free_slots=pool.free_slots,
                    total_slots=pool.total_slots, running=pool.total_slots - pool.free_slots, queued=pool.queued,
                ),
                to=peers,
            )

        async def execute(env: Envelope) -> None:
            req: ToolCallRequested = env.payload
            note_reissue(ctx, env, "tool_call", req.call_id)
            result = await pool.execute(req.code, timeout_s=req.timeout_s)
            out = ctx.emit(
                ToolCallCompleted(
                    call_id=req.call_id, rollout_id=req.rollout_id, status=result.status, stdout=result.stdout,
                    stderr=result.stderr, exit_code=result.exit_code, signal=result.signal,
                    duration_s=result.duration_s, text=format_for_model(result, cfg.max_output_chars),
                ),
                to=[req.reply_to],
                cause=env,
            )
            report()
            await settle(ctx, env, out)

        async def heartbeat_capacity() -> None:
            while True:
                report()
                await trio.sleep(1.0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeat_capacity)
            task_status.started()
            while True:
                env = await ctx.receive()
                if isinstance(env.payload, ToolCallRequested):
                    nursery.start_soon(execute, env)
                    report()
