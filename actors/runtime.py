"""The actor runtime: what every reckon actor process shares.

An actor module defines one entry point::

    async def run(ctx: Context, *, task_status=trio.TASK_STATUS_IGNORED) -> None

The runtime binds the actor's inbox, opens links to peers on demand, sends a copy of
every emitted event to the recorder, heartbeats, turns SIGTERM/SIGINT into a clean drain
(``ActorStopped``, unacknowledged events flushed) and an unhandled error into an
``ActorError`` event (type, message, traceback) followed by a non-zero exit so the
launcher can restart the actor.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import time
import traceback
from typing import Awaitable, Callable, Iterable

import structlog
import trio
import zmq

from actors.config import Config, role_of
from protocol.codec import encode
from protocol.events import (
    ActorError,
    ActorStarted,
    ActorStopped,
    Envelope,
    Event,
    Heartbeat,
    new_event_id,
)
from protocol.curve import KeyPair, ZapAuthenticator, load_keypair, load_public_key, load_public_keys
from protocol.transport import Inbox, Network

RECORDER = "recorder"
DRAIN_DEADLINE_S = 10.0

ActorBody = Callable[..., Awaitable[None]]


def configure_logging(level: str = "info", name: str = "") -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            {"debug": 10, "info": 20, "warning": 30, "error": 40}.get(level, 20)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    if name:
        structlog.contextvars.bind_contextvars(actor=name)


class Context:
    """One actor's handle on the system: its config, inbox, and ``emit``."""

    def __init__(self, name: str, config: Config, run_id: str, zctx: zmq.Context, nursery: trio.Nursery,
                 ack_when_done: Iterable[str] = ()):
        self.name = name
        self.role = role_of(name)
        self.config = config
        self.run_id = run_id
        self.log = structlog.get_logger(f"reckon.{self.role}").bind(actor=name)
        self.started_monotonic = time.monotonic()
        self.state = "starting"
        #: Wall-clock start of this process, and how many times the launcher restarted this actor
        #: before it (a request older than the start that reaches a restarted actor was
        #: outstanding at its predecessor: re-issued work).
        self.started_wall = time.time()
        self.restarts = int(os.environ.get("RECKON_RESTARTS", "0") or 0)
        #: Event types acknowledged only when the actor calls :meth:`ack` (its work is done), so
        #: the sender resends them to a restarted actor; everything else is acked on receipt.
        self.ack_when_done = frozenset(ack_when_done)
        self._held: dict[str, bytes] = {}  # event_id -> sender identity, for deferred acks
        self._seq = itertools.count()
        self._zctx = zctx
        self._nursery = nursery
        # CurveZMQ (network.curve): keys from RUN_DIR/keys; the ZAP authenticator must exist
        # before the inbox binds (serve() runs its task).
        self.zap: ZapAuthenticator | None = None
        keys: KeyPair | None = None
        if config.network.curve:
            keys = load_keypair(config.run.run_dir, name)
            self.zap = ZapAuthenticator(zctx, load_public_keys(config.run.run_dir))
        self.inbox = Inbox(
            zctx,
            config.bind_address(name),
            run_id=run_id,
            auto_ack=(lambda env: env.type not in self.ack_when_done) if name != RECORDER else False,
            on_reject=self._on_reject,
            curve_server_key=keys.secret if keys else None,
        )
        self.net = Network(
            zctx,
            nursery,
            config.address,
            identity=f"{name}:{os.getpid()}",
            resend_after=config.network.resend_after_s,
            curve_for=(lambda peer: (load_public_key(config.run.run_dir, peer), keys.public, keys.secret))
            if keys
            else None,
        )
        #: Called for each emitted envelope before it is sent (the recorder hooks itself here).
        self.local_sink: Callable[[Envelope, bytes], None] | None = None
        self.rejected: list[str] = []
        #: Awaited once while draining, after ActorStopped is emitted (shielded, with a deadline).
        self.on_drain: Callable[[], Awaitable[None]] | None = None

    def _on_reject(self, reason: str, sender: bytes) -> None:
        # The inbox counts and logs rejections (rate-limited); keep the latest reasons here.
        self.rejected.append(reason)
        del self.rejected[:-100]

    def emit(self, event: Event, to: Iterable[str] = (), cause: Envelope | str | None = None) -> Envelope:
        """Send ``event`` to the named peers and to the recorder. Never blocks."""
        env = Envelope(
            event_id=new_event_id(),
            type=event.TYPE,
            schema_version=event.VERSION,
            run_id=self.run_id,
            source=self.name,
            seq=next(self._seq),
            ts=time.time(),
            causation_id=cause.event_id if isinstance(cause, Envelope) else cause,
            payload=event,
        )
        frame = encode(env)
        peers = set(to)
        if self.local_sink is not None:
            self.local_sink(env, frame)
            peers.discard(self.name)
        else:
            peers.add(RECORDER)
        self.net.send(peers, env, frame)
        return env

    async def receive(self) -> Envelope:
        """The next event addressed to this actor."""
        identity, env = await self.inbox.receive()
        if env.type in self.ack_when_done and self.name != RECORDER:
            self._held[env.event_id] = identity
        return env

    def ack(self, env: Envelope) -> None:
        """Acknowledge a received event of an ``ack_when_done`` type: its work is done."""
        identity = self._held.pop(env.event_id, None)
        if identity is not None:
            self.inbox.ack(identity, env)

    def uptime(self) -> float:
        return time.monotonic() - self.started_monotonic


async def _heartbeat(ctx: Context) -> None:
    while True:
        await trio.sleep(ctx.config.network.heartbeat_s)
        ctx.emit(Heartbeat(uptime_s=ctx.uptime(), state=ctx.state))


async def serve(name: str, config: Config, run_id: str, body: ActorBody, ack_when_done: Iterable[str] = ()) -> int:
    """Run one actor until it finishes, is signalled, or fails. Returns the exit code.

    ``ack_when_done``: event types (work requests) this actor acknowledges only once it has
    done the work (:meth:`Context.ack`), so a request held by a crashed actor is resent to
    its restarted incarnation.
    """
    configure_logging(config.run.log_level, name)
    zctx = zmq.Context()
    code = 0
    try:
        async with trio.open_nursery() as infra:
            ctx = Context(name, config, run_id, zctx, infra, ack_when_done)
            if ctx.zap is not None:
                infra.start_soon(ctx.zap.run)
            infra.start_soon(ctx.inbox.pump)
            infra.start_soon(ctx.net.resend_loop)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                reason = "finished"
                async with trio.open_nursery() as work:

                    async def watch_signals() -> None:
                        nonlocal reason
                        async for sig in signals:
                            reason = f"signal {signal.Signals(sig).name}"
                            ctx.log.info("stopping", reason=reason)
                            work.cancel_scope.cancel()
                            return

                    work.start_soon(watch_signals)

                    async def run_body(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
                        nonlocal reason, code
                        try:
                            await body(ctx, task_status=task_status)
                        except Exception as e:  # the actor boundary: any error becomes an event
                            reason = f"error: {type(e).__name__}"
                            code = 1
                            ctx.log.error("actor failed", error=repr(e))
                            traceback.print_exc()
                            ctx.emit(
                                ActorError(
                                    role=ctx.role,
                                    error_type=type(e).__name__,
                                    message=str(e),
                                    traceback=traceback.format_exc(),
                                    fatal=True,
                                )
                            )
                        work.cancel_scope.cancel()  # the body returning ends the actor

                    async def main() -> None:
                        try:
                            await work.start(run_body)
                        except RuntimeError:
                            return  # failed before it was ready; already reported
                        ctx.state = "running"
                        ctx.emit(ActorStarted(role=ctx.role, pid=os.getpid(), address=config.address(name)))
                        ctx.log.info("started", address=config.address(name))
                        work.start_soon(_heartbeat, ctx)

                    work.start_soon(main)
            ctx.state = "stopping"
            ctx.emit(ActorStopped(role=ctx.role, reason=reason))
            # Drain: give peers (above all the recorder) time to acknowledge what we sent.
            # Peers that already stopped never ack; only the log's copy must be durable.
            with trio.move_on_after(DRAIN_DEADLINE_S) as scope:
                scope.shield = True
                if ctx.on_drain is not None:
                    await ctx.on_drain()
                if RECORDER in ctx.net.links:
                    await ctx.net.links[RECORDER].wait_acked()
            if scope.cancelled_caught:
                ctx.log.warning("drain deadline passed", unacked=ctx.net.unacked())
            infra.cancel_scope.cancel()
    finally:
        zctx.destroy(linger=0)
    return code
