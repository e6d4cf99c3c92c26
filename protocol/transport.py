"""trio-native ZeroMQ transport with at-least-once delivery.

Every actor binds one :class:`Inbox` (a ROUTER socket) and talks to each peer through a
:class:`Link` (a DEALER socket connected to the peer's inbox). Wire frames:

* link -> inbox: ``[b"E", event_frame, event_frame, ...]`` (codec frames; everything
  queued on a link goes out as one multipart message, so the per-message cost of zmq is
  paid once per burst, not once per event);
* inbox -> link: ``[b"A", event_id, event_id, ...]`` acknowledgements, batched.

A link keeps every frame until the peer acknowledges it and resends what stays
unacknowledged (the peer restarted, or the message was lost with its queue). An inbox
acknowledges a frame once it is decoded and queued (or, with ``auto_ack=False``, when the
consumer calls :meth:`Inbox.ack`, e.g. after a database commit) and drops duplicates by
event id, so consumers see each event once per process lifetime.

The sockets are driven from trio without blocking: ZMQ_FD is edge-triggered, so each
socket has exactly one pump task that drains with NOBLOCK until ``zmq.Again`` and
re-checks ``ZMQ_EVENTS`` before every ``wait_readable``. Sends are queued and the pump is
kicked; no call into zmq ever blocks the loop.
"""

from __future__ import annotations

import collections
import time
from typing import Callable

import structlog
import trio
import zmq

from protocol.codec import MAX_FRAME_BYTES, DecodeError, decode
from protocol.events import Envelope

log = structlog.get_logger("reckon.transport")

KIND_EVENT = b"E"
KIND_ACK = b"A"


class _Pump:
    """Owns one zmq socket: the only task that waits on its FD and touches its queues."""

    def __init__(
        self,
        sock: zmq.Socket,
        on_message: Callable[[list[bytes]], None],
        prepare: Callable[[], None] | None = None,
    ):
        self.sock = sock
        self._on_message = on_message
        self._prepare = prepare  # called before each flush: moves coalesced frames to _out
        self._out: collections.deque[list[bytes]] = collections.deque()
        self._wait_scope: trio.CancelScope | None = None
        self.closed = False

    def send(self, parts: list[bytes]) -> None:
        """Queue a multipart message; never blocks, never raises on a busy socket."""
        self._out.append(parts)
        self.kick()

    def kick(self) -> None:
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    async def run(self) -> None:
        sock = self.sock
        fd = sock.FD
        n = 0
        while not self.closed:
            if self._prepare is not None:
                self._prepare()
            # Flush what is queued while the socket accepts it.
            while self._out:
                try:
                    sock.send_multipart(self._out[0], flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._out.popleft()
                n += 1
                if n % 1000 == 0:
                    await trio.lowlevel.checkpoint()
            # Drain everything readable.
            while True:
                try:
                    parts = sock.recv_multipart(flags=zmq.NOBLOCK, copy=True)
                except zmq.Again:
                    break
                self._on_message(parts)
                n += 1
                if n % 1000 == 0:
                    await trio.lowlevel.checkpoint()
            if self._prepare is not None:
                self._prepare()  # e.g. the acks produced while draining, as one message
            events = sock.EVENTS
            if events & zmq.POLLIN or (self._out and events & zmq.POLLOUT):
                await trio.lowlevel.checkpoint()
                continue
            self._wait_scope = trio.CancelScope()
            with self._wait_scope:
                await trio.lowlevel.wait_readable(fd)
            self._wait_scope = None


class Inbox:
    """The actor's bound ROUTER socket: yields validated envelopes, acks, dedupes."""

    def __init__(
        self,
        ctx: zmq.Context,
        address: str,
        *,
        run_id: str | None = None,
        auto_ack: bool = True,
        dedupe: int = 200_000,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        on_reject: Callable[[str, bytes], None] | None = None,
        curve_server_key: bytes | None = None,
    ):
        self.address = address
        self.run_id = run_id
        self.auto_ack = auto_ack
        self.max_frame_bytes = max_frame_bytes
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes + 1024)
        if curve_server_key is not None:
            self.sock.curve_server = True
            self.sock.curve_secretkey = curve_server_key
        self.sock.bind(address)
        # Received events wait here for the consumer (unbounded: a sender's unacked window
        # bounds it in practice); a deque + Event is several times cheaper than a channel.
        self._queue: collections.deque[tuple[bytes, Envelope]] = collections.deque()
        self._ready = trio.Event()
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._dedupe = dedupe
        self._pending_acks: dict[bytes, list[bytes]] = {}
        self._on_reject = on_reject
        self._pump = _Pump(self.sock, self._on_message, prepare=self._flush_acks)
        self.received = 0
        self.rejected = 0
        self.duplicates = 0

    def _reject(self, reason: str, frame: bytes) -> None:
        self.rejected += 1
        if self._on_reject is not None:
            self._on_reject(reason, frame)
        else:
            log.warning("frame rejected", inbox=self.address, reason=reason, size=len(frame))

    def _on_message(self, parts: list[bytes]) -> None:
        if len(parts) < 3 or parts[1] != KIND_EVENT:
            self._reject(f"malformed multipart message ({len(parts)} parts)", b"".join(parts[1:2]))
            return
        identity = parts[0]
        for frame in parts[2:]:
            self._on_frame(identity, frame)

    def _on_frame(self, identity: bytes, frame: bytes) -> None:
        try:
            env = decode(frame, max_bytes=self.max_frame_bytes)
        except DecodeError as e:
            self._reject(str(e), frame)
            return
        if self.run_id is not None and env.run_id != self.run_id:
            self._reject(f"run_id {env.run_id!r} is not this run ({self.run_id!r})", frame)
            return
        eid = env.event_id
        if eid in self._seen:
            self.duplicates += 1
            self._queue_ack(identity, eid.encode())
            return
        self._seen[eid] = None
        if len(self._seen) > self._dedupe:
            self._seen.popitem(last=False)
        self.received += 1
        self._queue.append((identity, env))
        if not self._ready.is_set():
            self._ready.set()
        if self.auto_ack:
            self._queue_ack(identity, eid.encode())

    def _queue_ack(self, identity: bytes, eid: bytes) -> None:
        self._pending_acks.setdefault(identity, []).append(eid)
        self._pump.kick()

    def _flush_acks(self) -> None:
        # Acks gathered while draining one burst go out as one message per peer.
        if self._pending_acks:
            for identity, ids in self._pending_acks.items():
                self._pump._out.append([identity, KIND_ACK, *ids])
            self._pending_acks = {}

    def ack(self, identity: bytes, env: Envelope) -> None:
        """Acknowledge an event received with ``auto_ack=False`` (after it is durable)."""
        self._queue_ack(identity, env.event_id.encode())

    def ack_many(self, items: list[tuple[bytes, Envelope]]) -> None:
        for identity, env in items:
            self._pending_acks.setdefault(identity, []).append(env.event_id.encode())
        self._pump.kick()

    async def pump(self) -> None:
        await self._pump.run()

    async def _wait_nonempty(self) -> None:
        if self._queue:
            await trio.lowlevel.checkpoint()
            return
        while not self._queue:
            self._ready = trio.Event()
            await self._ready.wait()

    async def receive(self) -> tuple[bytes, Envelope]:
        """The next (sender identity, envelope); identity is needed only for :meth:`ack`."""
        await self._wait_nonempty()
        return self._queue.popleft()

    def receive_nowait(self) -> tuple[bytes, Envelope]:
        """The next queued event; raises trio.WouldBlock when none is queued."""
        if not self._queue:
            raise trio.WouldBlock
        return self._queue.popleft()

    async def receive_batch(self, max_items: int = 1000) -> list[tuple[bytes, Envelope]]:
        """Wait for at least one event, then take whatever else is already queued."""
        await self._wait_nonempty()
        q = self._queue
        n = min(len(q), max_items)
        return [q.popleft() for _ in range(n)]

    def close(self) -> None:
        self._pump.closed = True
        self._pump.kick()
        self.sock.close(linger=0)


class Link:
    """A reliable one-way channel to one peer's inbox (DEALER), resending until acked."""

    def __init__(
        self,
        ctx: zmq.Context,
        peer: str,
        address: str,
        *,
        identity: bytes | None = None,
        resend_after: float = 5.0,
        curve: tuple[bytes, bytes, bytes] | None = None,
    ):
        self.peer = peer
        self.address = address
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if identity is not None:
            self.sock.setsockopt(zmq.IDENTITY, identity)
        if curve is not None:
            server_public, public, secret = curve
            self.sock.curve_serverkey = server_public
            self.sock.curve_publickey = public
            self.sock.curve_secretkey = secret
        self.sock.connect(address)
        self.resend_after = resend_after
        # event_id -> [frame, last_sent_monotonic]; insertion order = send order
        self.unacked: collections.OrderedDict[bytes, list] = collections.OrderedDict()
        self.acked = trio.Event()
        self._batch: list[bytes] = []
        self._pump = _Pump(self.sock, self._on_message, prepare=self._coalesce)
        self.resent = 0

    #: Largest burst sent as one zmq message.
    BATCH_FRAMES = 512
    BATCH_BYTES = 4 * 1024 * 1024

    def _coalesce(self) -> None:
        batch, self._batch = self._batch, []
        part: list[bytes] = [KIND_EVENT]
        size = 0
        for frame in batch:
            if len(part) > self.BATCH_FRAMES or size + len(frame) > self.BATCH_BYTES and len(part) > 1:
                self._pump._out.append(part)
                part, size = [KIND_EVENT], 0
            part.append(frame)
            size += len(frame)
        if len(part) > 1:
            self._pump._out.append(part)

    def _on_message(self, parts: list[bytes]) -> None:
        if parts and parts[0] == KIND_ACK:
            for eid in parts[1:]:
                self.unacked.pop(eid, None)
            if not self.unacked:
                self.acked.set()

    def send(self, event_id: str, frame: bytes) -> None:
        """Queue one encoded event; it is kept until the peer acknowledges it."""
        eid = event_id.encode()
        self.unacked[eid] = [frame, time.monotonic()]
        if self.acked.is_set():
            self.acked = trio.Event()
        self._batch.append(frame)
        self._pump.kick()

    def resend_due(self, now: float | None = None) -> int:
        """Resend frames unacknowledged for longer than ``resend_after``; returns how many."""
        now = time.monotonic() if now is None else now
        n = 0
        for eid, entry in self.unacked.items():
            if now - entry[1] < self.resend_after:
                break  # ordered by send time
            entry[1] = now
            self._batch.append(entry[0])
            n += 1
        if n:
            # keep order by last-sent time: move resent entries to the end
            for _ in range(n):
                eid, entry = self.unacked.popitem(last=False)
                self.unacked[eid] = entry
            self.resent += n
            self._pump.kick()
        return n

    async def pump(self) -> None:
        await self._pump.run()

    async def wait_acked(self) -> None:
        """Wait until every frame sent so far is acknowledged (callers add a deadline)."""
        while self.unacked:
            await self.acked.wait()

    def close(self) -> None:
        self._pump.closed = True
        self._pump.kick()
        self.sock.close(linger=0)


class Network:
    """An actor's links to its peers, created on first use, with one resend loop."""

    def __init__(
        self,
        ctx: zmq.Context,
        nursery: trio.Nursery,
        resolve: Callable[[str], str],
        *,
        identity: str,
        resend_after: float = 5.0,
        curve_for: Callable[[str], tuple[bytes, bytes, bytes] | None] | None = None,
    ):
        self.ctx = ctx
        self.nursery = nursery
        self.resolve = resolve
        self.identity = identity.encode()
        self.resend_after = resend_after
        self.curve_for = curve_for
        self.links: dict[str, Link] = {}

    def link(self, peer: str) -> Link:
        link = self.links.get(peer)
        if link is None:
            curve = self.curve_for(peer) if self.curve_for else None
            link = Link(
                self.ctx,
                peer,
                self.resolve(peer),
                identity=self.identity,
                resend_after=self.resend_after,
                curve=curve,
            )
            self.links[peer] = link
            self.nursery.start_soon(link.pump)
        return link

    def send(self, peers: list[str] | tuple[str, ...] | set[str], env: Envelope, frame: bytes) -> None:
        for peer in peers:
            self.link(peer).send(env.event_id, frame)

    async def resend_loop(self, period: float = 1.0) -> None:
        while True:
            await trio.sleep(period)
            for link in list(self.links.values()):
                link.resend_due()

    def unacked(self) -> int:
        return sum(len(link.unacked) for link in self.links.values())

    async def wait_flushed(self) -> None:
        """Wait until every peer acknowledged everything (callers add a deadline)."""
        for link in list(self.links.values()):
            await link.wait_acked()

    def close(self) -> None:
        for link in self.links.values():
            link.close()
