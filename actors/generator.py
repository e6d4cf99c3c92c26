"""Generator: runs multi-turn tool rollouts on an inference engine.

For each RolloutRequested it renders the prompt, then loops (actors/rollout.py): the
engine generates until ``</tool_call>``; the call goes out at once as ToolCallRequested
to the tool executor with free slots (credit-based: an executor never gets more calls
than it reported free slots); the sequence waits for ToolCallCompleted while every other
sequence on the engine keeps decoding; the tool output is appended as token ids and
generation continues. The finished trajectory (TrajectoryCompleted) goes to a verifier
and to the scheduler. Free KV capacity is reported to the scheduler at a steady cadence
(CapacityReported). WeightsPublished reloads the engine in place; what the rollouts in
flight do meanwhile is ``generator.on_weights`` (:class:`WeightsSwitch`).

Supervision: a RolloutRequested is acknowledged only once its trajectory has reached the
scheduler and the verifier, so a generator killed mid-rollout gets its rollouts resent
when it restarts (it starts on the run's latest published weights). Tool-call ids are
unique per process, so a late answer to a call of a dead predecessor is never taken for
one of ours.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

import numpy as np
import trio
from transformers import AutoTokenizer

from actors.engines import Engine, create_engine
from actors.rollout import RolloutSpec, Trajectory, run_trajectory
from actors.runtime import Context
from actors.supervision import latest_weights, note_reissue, settle
from protocol.events import (
    CapacityReported,
    Envelope,
    RolloutRequested,
    ToolCallCompleted,
    ToolCallRequested,
    TrajectoryCompleted,
    WeightsPublished,
)
from training.chat import encode_prompt

T = TypeVar("T")

#: Requests acknowledged only once done (actors/supervision.py).
ACK_WHEN_DONE = ("RolloutRequested",)

OnWeights = Literal["continue", "finish", "abort"]


class WeightsSwitch:
    """The rollouts running on one engine, and the weight reloads between them.

    Every rollout runs through :meth:`run`. New weights arrive in two calls: :meth:`hold`
    at once when WeightsPublished is received, so no rollout received after it starts on
    the old weights, and :meth:`swap`, which reloads per ``policy``:

    * ``continue``: reload between two engine steps; rollouts in flight go on, their later
      tokens sampled (and tagged) with the new version.
    * ``finish``: wait until every rollout in flight has ended (tool calls included), then
      reload: each rollout is sampled by exactly one version.
    * ``abort``: cancel every rollout in flight (its :meth:`run` returns None), then reload.

    Rollouts that arrive while a reload is pending wait and then start on the new weights.
    """

    def __init__(self, engine: Engine, policy: OnWeights) -> None:
        self.engine = engine
        self.policy = policy
        self.active: dict[str, trio.CancelScope] = {}  # rollout id -> its cancel scope
        self._pending = 0  # reloads held and not yet done
        self._open = trio.Event()
        self._open.set()
        self._idle: trio.Event | None = None  # set when the last rollout in flight ends
        self._lock = trio.Lock()

    async def run(self, rollout_id: str, fn: Callable[[], Awaitable[T]]) -> T | None:
        """Run ``fn()`` as rollout ``rollout_id`` once no reload is pending; None if aborted."""
        while not self._open.is_set():
            await self._open.wait()
        scope = self.active[rollout_id] = trio.CancelScope()
        try:
            with scope:
                return await fn()
            return None  # cancelled by an abort swap
        finally:
            del self.active[rollout_id]
            if not self.active and self._idle is not None:
                self._idle.set()

    def hold(self) -> None:
        """A reload is coming: rollouts that arrive from now on wait for it."""
        self._pending += 1
        if self._open.is_set():
            self._open = trio.Event()

    async def swap(self, path: str, version: int) -> bool:
        """Reload to ``version`` per the policy (after :meth:`hold`); False if the engine
        already had that version or a newer one."""
        try:
            async with self._lock:
                if version <= self.engine.version:
                    return False
                if self.policy == "abort":
                    for scope in self.active.values():
                        scope.cancel()
                if self.policy != "continue" and self.active:
                    self._idle = trio.Event()
                    await self._idle.wait()
                    self._idle = None
                await self.engine.reload_weights(path, version)
                return True
        finally:
            self._pending -= 1
            if not self._pending:
                self._open.set()


class ToolDispatcher:
    """Credit-based dispatch of tool calls to executors, and the wait for their results.

    At most ``generator.max_tool_calls_in_flight`` calls of this generator are out at once;
    further calls wait for one to end (the executors' credits bound them too).
    """

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.in_flight = trio.Semaphore(ctx.config.generator.max_tool_calls_in_flight)
        self.credits: dict[str, int] = {}  # executor -> free slots it last reported, minus ours since
        self.waiting: dict[str, trio.MemorySendChannel] = {}
        self.sent_to: dict[str, str] = {}
        self.credit_free = trio.Event()
        self._ids = itertools.count()
        self._incarnation = os.urandom(3).hex()  # call ids never repeat across restarts

    def on_capacity(self, executor: str, free_slots: int) -> None:
        # The report is the executor's own count of free slots; calls in flight on the wire
        # that it has not yet counted may briefly overbook it, and its pool queues those.
        self.credits[executor] = free_slots
        if free_slots > 0:
            self.credit_free.set()

    def on_completed(self, ev: ToolCallCompleted) -> None:
        send = self.waiting.pop(ev.call_id, None)
        executor = self.sent_to.pop(ev.call_id, None)
        if executor is not None:
            self.credits[executor] = self.credits.get(executor, 0) + 1
            self.credit_free.set()
        if send is not None:
            send.send_nowait(ev)

    async def _acquire(self) -> str:
        while True:
            best = max(self.credits.items(), key=lambda kv: kv[1], default=(None, 0))
            if best[0] is not None and best[1] > 0:
                self.credits[best[0]] -= 1
                return best[0]
            self.credit_free = trio.Event()
            with trio.move_on_after(1.0):
                await self.credit_free.wait()
            if not self.credits:  # no executor has reported yet: assume one slot each
                for name in self.ctx.config.tool_executors():
                    self.credits.setdefault(name, 1)

    async def call(self, rollout_id: str, turn: int, code: str) -> tuple[str, str]:
        async with self.in_flight:
            return await self._call(rollout_id, turn, code)

    async def _call(self, rollout_id: str, turn: int, code: str) -> tuple[str, str]:
        cfg = self.ctx.config.tools
        timeout = cfg.sandbox.timeout_s
        call_id = f"{rollout_id}-t{turn}-{self._incarnation}{next(self._ids)}"
        for attempt in range(3):
            executor = await self._acquire()
            send, recv = trio.open_memory_channel(1)
            self.waiting[call_id] = send
            self.sent_to[call_id] = executor
            self.ctx.emit(
                ToolCallRequested(
                    call_id=call_id, rollout_id=rollout_id, turn=turn, code=code, executor=executor,
                    reply_to=self.ctx.name, timeout_s=timeout,
                ),
                to=[executor],
            )
            # An executor that died with the call is retried elsewhere after a generous deadline.
            with trio.move_on_after(4 * timeout + 30):
                result: ToolCallCompleted = await recv.receive()
                return result.status, result.text
            self.waiting.pop(call_id, None)
            self.sent_to.pop(call_id, None)
            self.ctx.log.warning("tool call timed out at the executor; retrying", call_id=call_id, executor=executor)
        return "killed", "Tool call failed: no executor answered."


async def run(ctx: Context, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    cfg = ctx.config
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    tools = ToolDispatcher(ctx)
    busy_s = 0.0
    async with create_engine(cfg.generator.engine, cfg.model.path) as engine:
        switch = WeightsSwitch(engine, cfg.generator.on_weights)
        # A restarted generator missed the WeightsPublished its predecessor saw: start on the
        # newest weights of the run.
        latest = latest_weights(cfg.run.run_dir) if cfg.run.run_dir else None
        if latest is not None and latest[0] > engine.version:
            await engine.reload_weights(str(latest[1]), latest[0])
            ctx.log.info("resumed on published weights", version=latest[0])

        def report() -> None:
            cap = engine.capacity()
            ctx.emit(
                CapacityReported(
                    kind="generator",
                    free_tokens=int(cap["free_tokens"]),
                    total_tokens=int(cap["total_tokens"]),
                    free_slots=int(cap["free_slots"]),
                    total_slots=int(cap["total_slots"]),
                    running=int(cap["running"]),
                    queued=int(cap["waiting"]),
                    busy_s=busy_s,
                ),
                to=["scheduler"],
            )

        async def capacity_loop() -> None:
            nonlocal busy_s
            last = time.monotonic()
            while True:
                await trio.sleep(cfg.generator.capacity_interval_s)
                now = time.monotonic()
                if engine.capacity()["running"] > 0 or switch.active:
                    busy_s += now - last
                last = now
                report()

        async def rollout(env: Envelope) -> None:
            req: RolloutRequested = env.payload
            note_reissue(ctx, env, "rollout", req.rollout_id)
            t0 = time.monotonic()
            prompt_ids = encode_prompt(tokenizer, req.problem)
            spec = RolloutSpec(
                request_id=req.rollout_id,
                prompt_ids=prompt_ids,
                max_tokens=req.max_tokens,
                max_turns=req.max_turns,
                temperature=req.temperature,
            )

            async def call_tool(code: str, turn: int) -> tuple[str, str]:
                return await tools.call(req.rollout_id, turn, code)

            traj = await switch.run(req.rollout_id, lambda: run_trajectory(engine, tokenizer, spec, call_tool))
            if traj is None:  # aborted for new weights (generator.on_weights = "abort"): placed again
                traj = Trajectory.empty(req.rollout_id, prompt_ids, "aborted")
            done = TrajectoryCompleted(
                rollout_id=req.rollout_id,
                group_id=req.group_id,
                step=req.step,
                stage=req.stage,
                problem_id=req.problem_id,
                answer=req.answer,
                generator=ctx.name,
                prompt_ids=np.asarray(prompt_ids, np.int32),
                response_ids=np.asarray(traj.response_ids, np.int32),
                logprobs=np.asarray(traj.logprobs, np.float32),
                loss_mask=np.asarray(traj.loss_mask, np.int32),
                versions=np.asarray(traj.versions, np.int32),
                response_text=traj.response_text,
                turns=traj.turns,
                tool_calls=list(traj.tool_calls),
                finish_reason=traj.finish_reason,
                seconds=time.monotonic() - t0,
            )
            verifiers = cfg.verifiers()
            to = ["scheduler"]
            if traj.finish_reason != "aborted":
                to.append(verifiers[hash(req.rollout_id) % len(verifiers)])
            out = ctx.emit(done, to=to, cause=env)
            report()
            await settle(ctx, env, out)

        async def reload(ev: WeightsPublished) -> None:
            t = time.monotonic()
            in_flight = len(switch.active)
            if await switch.swap(ev.path, ev.version):
                ctx.log.info("weights reloaded", version=ev.version, policy=switch.policy, in_flight=in_flight,
                             seconds=round(time.monotonic() - t, 3))
                report()

        async with trio.open_nursery() as nursery:
            report()
            nursery.start_soon(capacity_loop)
            task_status.started()
            while True:
                env = await ctx.receive()
                ev = env.payload
                if isinstance(ev, RolloutRequested):
                    nursery.start_soon(rollout, env)
                elif isinstance(ev, ToolCallCompleted):
                    tools.on_completed(ev)
                elif isinstance(ev, WeightsPublished):
                    if ev.version > engine.version:
                        switch.hold()  # rollouts received from now on start on the new weights
                        nursery.start_soon(reload, ev)
                elif env.type == "CapacityReported" and ev.kind == "tool_executor":
                    tools.on_capacity(env.source, ev.free_slots)
