"""Recorder: appends a copy of every event of the run to the SQL event log.

Every actor sends the recorder a copy of each event it emits. The recorder batches them
(at most ``store.batch_max`` per transaction, at most ``store.flush_s`` of waiting),
appends each batch in one transaction, and only then acknowledges the events, so a
sender keeps (and resends) anything not yet durable. Duplicates are no-ops in the log.
"""

from __future__ import annotations

import trio

from actors.runtime import Context
from protocol.events import Envelope, RunStarted
from store import EventLog


async def run(ctx: Context, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    cfg = ctx.config.store
    log = await trio.to_thread.run_sync(EventLog.open, ctx.config.store_url())
    own: list[Envelope] = []  # events this process emits (heartbeats, lifecycle)
    ctx.local_sink = lambda env, frame: own.append(env)
    appended = 0

    async def flush_own() -> None:
        envs = own[:]
        own.clear()
        await trio.to_thread.run_sync(log.append, envs)

    ctx.on_drain = flush_own
    task_status.started()
    while True:
        batch: list[tuple[bytes, Envelope]] = [await ctx.inbox.receive()]
        with trio.move_on_after(cfg.flush_s):
            while len(batch) < cfg.batch_max:
                try:
                    batch.append(ctx.inbox.receive_nowait())
                except trio.WouldBlock:
                    if len(batch) >= cfg.batch_max // 4:
                        break
                    await trio.sleep(cfg.flush_s / 5)
        envs = [env for _, env in batch] + own
        own.clear()
        for env in envs:
            if isinstance(env.payload, RunStarted):
                await trio.to_thread.run_sync(
                    lambda e=env: log.ensure_run(
                        e.run_id, name=ctx.config.run.name, config=e.payload.config, run_dir=e.payload.run_dir
                    )
                )
        appended += await trio.to_thread.run_sync(log.append, envs)
        ctx.inbox.ack_many(batch)
        ctx.state = f"appended {appended}"
