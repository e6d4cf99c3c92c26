"""trio-native ZeroMQ transport with at-least-once delivery.

Every actor binds one :class:`Inbox` (a ROUTER socket) and talks to each peer through a
:class:`Link` (a DEALER socket connected to the peer's inbox). Wire frames:

* link -> inbox: ``[b"E", burst]``: everything queued on a link goes out as one *burst*,
  a msgpack array of codec frames (:func:`protocol.codec.burst`), so zmq's per-message
  cost is paid once per burst and the inbox decodes a burst in one msgspec call. (Further
  parts after the first burst are bursts too; a part that is a single frame, a msgpack
  map, is a burst of one.)
* inbox -> link: ``[b"A", ids]`` acknowledgements, batched: ``ids`` is a msgpack array of
  event id strings.

A link keeps every frame until the peer acknowledges it and resends what stays
unacknowledged (the peer restarted, or the message was lost with its queue). An inbox
acknowledges a frame once it is decoded and queued (or, with ``auto_ack=False`` or a
predicate saying no for the event, when the consumer calls :meth:`Inbox.ack`, e.g. after a
database commit) and drops duplicates by event id, so consumers see each event once per
process lifetime; a duplicate is acknowledged again unless its original still waits for
the consumer's ack. Invalid frames (bad
msgpack, wrong types, unknown event types, another run's ``run_id``, over the size cap)
are rejected one by one with a reason; the valid frames around them are delivered.
Rejections are counted (:attr:`Inbox.reject_reasons`) and logged, rate-limited.

The sockets are driven from trio without blocking: ZMQ_FD is edge-triggered, so each
socket has exactly one pump task that drains with NOBLOCK until ``zmq.Again`` and
re-checks ``ZMQ_EVENTS`` before every ``wait_readable``. Sends are queued and the pump is
kicked; no call into zmq ever blocks the loop.

CurveZMQ (``network.curve``): an inbox given ``curve_server_key`` encrypts and requires
every peer to authenticate with a key admitted by the :class:`~protocol.curve.ZapAuthenticator`
running on the same zmq context; links given ``curve`` keys authenticate with them.
"""

from __future__ import annotations

import collections
import errno
import re
import time
from typing import Callable

import msgspec
import structlog
import trio
import zmq
import zmq.utils.monitor

from protocol.codec import MAX_FRAME_BYTES, burst, decode_burst
from protocol.events import Envelope

log = structlog.get_logger("reckon.transport")

KIND_EVENT = b"E"
KIND_ACK = b"A"

_ack_encoder = msgspec.msgpack.Encoder()
_ack_decoder = msgspec.msgpack.Decoder(list[str])

_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_PROTOCOL_ERRORS = {
    int(zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH): "security mechanism mismatch (a plain-text peer?)",
    int(zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC): "cryptographic error (a forged or wrong key?)",
    int(zmq.PROTOCOL_ERROR_ZMTP_KEY_EXCHANGE): "key exchange failed",
}

_DETAIL = re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`|\d+")

#: Messages handled per pump pass before yielding to other tasks (a burst is up to
#: ``Link.BATCH_FRAMES`` events).
_MESSAGES_PER_CHECKPOINT = 16


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
        # Wakes the pump if it waits; a pump that is awake re-checks its queues before it
        # waits again, so one cancel per wake-up is enough.
        scope = self._wait_scope
        if scope is not None:
            self._wait_scope = None
            scope.cancel()

    async def run(self) -> None:
        sock = self.sock
        fd = sock.FD
        out = self._out
        prepare = self._prepare
        on_message = self._on_message
        n = 0
        while not self.closed:
            if prepare is not None:
                prepare()
            # Flush what is queued while the socket accepts it.
            while out:
                try:
                    sock.send_multipart(out[0], flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                out.popleft()
                n += 1
                if n % _MESSAGES_PER_CHECKPOINT == 0:
                    await trio.lowlevel.checkpoint()
            # Drain everything readable.
            while True:
                try:
                    parts = sock.recv_multipart(flags=zmq.NOBLOCK, copy=True)
                except zmq.Again:
                    break
                on_message(parts)
                n += 1
                if n % _MESSAGES_PER_CHECKPOINT == 0:
                    await trio.lowlevel.checkpoint()
            if prepare is not None:
                prepare()  # e.g. the acks produced while draining, as one message
            events = sock.EVENTS
            if events & zmq.POLLIN or (out and events & zmq.POLLOUT):
                await trio.lowlevel.checkpoint()
                continue
            scope = self._wait_scope = trio.CancelScope()
            with scope:
                await trio.lowlevel.wait_readable(fd)
            self._wait_scope = None


class RejectLog:
    """Counts rejections by kind and logs them without flooding: the first ``burst``
    individually, then one summary per ``interval_s`` while rejections continue."""

    def __init__(self, what: str, *, burst: int = 20, interval_s: float = 10.0, **context: object):
        self.what = what
        self.burst = burst
        self.interval_s = interval_s
        self.context = context
        self.total = 0
        self.kinds: collections.Counter[str] = collections.Counter()
        self.recent: collections.deque[str] = collections.deque(maxlen=50)  # latest full reasons
        self._budget = burst
        self._window_start = time.monotonic()
        self._suppressed: collections.Counter[str] = collections.Counter()

    @staticmethod
    def kind(reason: str) -> str:
        """A short, bounded key for a reason: its text before the first ``": "``, with
        quoted values and numbers blanked (``"run_id '…' is not this run ('…')"``)."""
        head = reason.split(": ", 1)[0][:120]
        return _DETAIL.sub(lambda m: "N" if m.group(0)[0].isdigit() else "…", head)[:80]

    def __call__(self, reason: str, **fields: object) -> None:
        self.total += 1
        self.recent.append(reason)
        kind = self.kind(reason)
        if kind in self.kinds or len(self.kinds) < 200:
            self.kinds[kind] += 1
        else:
            self.kinds["other"] += 1
        now = time.monotonic()
        if now - self._window_start >= self.interval_s:
            self.flush(now)
        if self._budget > 0:
            self._budget -= 1
            log.warning(self.what, reason=reason[:500], **self.context, **fields)
            if self._budget == 0:
                log.warning(f"{self.what}: further ones are summarized every {self.interval_s:g} s", **self.context)
        else:
            self._suppressed[kind] += 1

    def flush(self, now: float | None = None) -> None:
        """Log the summary of suppressed rejections now (if any) and open a new window."""
        if self._suppressed:
            log.warning(
                f"{self.what} (summary)",
                count=sum(self._suppressed.values()),
                seconds=round((now or time.monotonic()) - self._window_start, 1),
                reasons=dict(self._suppressed.most_common(5)),
                total=self.total,
                **self.context,
            )
            self._suppressed.clear()
        self._window_start = now or time.monotonic()
        self._budget = self.burst


class Inbox:
    """The actor's bound ROUTER socket: yields validated envelopes, acks, dedupes."""

    def __init__(
        self,
        ctx: zmq.Context,
        address: str,
        *,
        run_id: str | None = None,
        auto_ack: bool | Callable[[Envelope], bool] = True,
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
        # A burst holds up to Link.BATCH_BYTES of frames, or one frame up to the cap.
        self.sock.setsockopt(zmq.MAXMSGSIZE, max(max_frame_bytes, Link.BATCH_BYTES) + 64 * 1024)
        if curve_server_key is not None:
            from protocol.curve import ZAP_DOMAIN, require_authenticator

            require_authenticator(ctx)  # without one, libzmq admits any client key
            self.sock.curve_server = True
            self.sock.curve_secretkey = curve_server_key
            self.sock.zap_domain = ZAP_DOMAIN
        self.curve = curve_server_key is not None
        # With CURVE, failed handshakes (plain text, forged keys, refused keys) are logged.
        self.refusals = RejectLog("connection refused", inbox=address)
        self._monitor: _Pump | None = None
        if self.curve:
            mon = self.sock.get_monitor_socket(_HANDSHAKE_FAILED)
            mon.setsockopt(zmq.LINGER, 0)  # else a context dropped without close() blocks forever in term()
            self._monitor = _Pump(mon, self._on_monitor)
        self.sock.bind(address)
        # Received events wait here for the consumer (unbounded: a sender's unacked window
        # bounds it in practice); a deque + Event is several times cheaper than a channel.
        self._queue: collections.deque[tuple[bytes, Envelope]] = collections.deque()
        self._ready = trio.Event()
        # Dedupe window: the last ``dedupe`` event ids (set for lookup, deque for age).
        self._seen: set[str] = set()
        self._seen_order: collections.deque[str] = collections.deque()
        self._dedupe = dedupe
        self._pending_acks: dict[bytes, list[str]] = {}
        self._held: set[str] = set()  # queued, not auto-acked, not yet acked by the consumer
        self._on_reject = on_reject
        self.rejections = RejectLog("frame rejected", inbox=address)
        self._pump = _Pump(self.sock, self._on_message, prepare=self._flush_acks)
        self.received = 0
        self.duplicates = 0

    @property
    def refused_connections(self) -> int:
        """CURVE handshakes that failed (no key of the run, forged key, plain text)."""
        return self.refusals.total

    def _on_monitor(self, parts: list[bytes]) -> None:
        try:
            ev = zmq.utils.monitor.parse_monitor_message(parts)
        except Exception:
            return
        event, value = int(ev["event"]), ev["value"]
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            reason = f"authentication refused (ZAP status {value})"
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            reason = f"handshake failed ({_PROTOCOL_ERRORS.get(value, value)})"
        elif value in (errno.EPIPE, errno.ECONNRESET):
            # Which side sees a mechanism mismatch first is a race: when it is the peer
            # (e.g. a plain-text one), it hangs up and this side only sees the broken pipe.
            reason = f"handshake failed (the peer hung up mid-handshake: {zmq.strerror(value)})"
        else:
            reason = f"handshake failed ({zmq.strerror(value) if value else 'no detail'})"
        self.refusals(reason)

    @property
    def rejected(self) -> int:
        """Frames rejected so far."""
        return self.rejections.total

    @property
    def reject_reasons(self) -> collections.Counter[str]:
        """Rejections so far by kind of reason (e.g. ``"unknown event type"``, ``"run_id"``)."""
        return self.rejections.kinds

    def _reject(self, reason: str, size: int, identity: bytes) -> None:
        self.rejections(reason, size=size, sender=identity[:64].decode("utf-8", "replace"))
        if self._on_reject is not None:
            self._on_reject(reason, identity)

    def _on_message(self, parts: list[bytes]) -> None:
        if len(parts) < 3 or parts[1] != KIND_EVENT:
            size = sum(len(p) for p in parts[1:])
            self._reject(f"malformed multipart message ({len(parts) - 1} parts)", size, parts[0] if parts else b"")
            return
        identity = parts[0]
        for part in parts[2:]:
            envs, bad = decode_burst(part, max_bytes=self.max_frame_bytes)
            for reason, size in bad:
                self._reject(reason, size, identity)
            if envs:
                self._accept(identity, envs)

    def _accept(self, identity: bytes, envs: list[Envelope]) -> None:
        run_id = self.run_id
        seen = self._seen
        order = self._seen_order
        queue = self._queue
        acks = self._pending_acks.get(identity)
        if acks is None:
            acks = self._pending_acks[identity] = []
        held = self._held
        auto_ack = self.auto_ack
        ack_if = auto_ack if callable(auto_ack) else None
        n = 0
        for env in envs:
            if run_id is not None and env.run_id != run_id:
                self._reject(f"run_id {env.run_id[:80]!r} is not this run ({run_id!r})", 0, identity)
                continue
            eid = env.event_id
            if eid in seen:
                # Acknowledge a duplicate again (the first ack may be lost), unless the
                # original still waits for the consumer's ack: that one will come.
                self.duplicates += 1
                if eid not in held:
                    acks.append(eid)
                continue
            seen.add(eid)
            order.append(eid)
            queue.append((identity, env))
            n += 1
            if ack_if is None:
                if auto_ack:
                    acks.append(eid)
                else:
                    held.add(eid)
            elif ack_if(env):
                acks.append(eid)
            else:
                held.add(eid)
        if len(order) > self._dedupe:
            for _ in range(len(order) - self._dedupe):
                seen.discard(order.popleft())
        if n:
            self.received += n
            if not self._ready.is_set():
                self._ready.set()
        if acks:
            self._pump.kick()
        else:
            del self._pending_acks[identity]

    def _flush_acks(self) -> None:
        # Acks gathered while draining one burst go out as one message per peer.
        if self._pending_acks:
            out = self._pump._out
            for identity, ids in self._pending_acks.items():
                out.append([identity, KIND_ACK, _ack_encoder.encode(ids)])
            self._pending_acks = {}

    def ack(self, identity: bytes, env: Envelope) -> None:
        """Acknowledge an event received with ``auto_ack=False`` (after it is durable)."""
        self._held.discard(env.event_id)
        self._pending_acks.setdefault(identity, []).append(env.event_id)
        self._pump.kick()

    def ack_many(self, items: list[tuple[bytes, Envelope]]) -> None:
        pending = self._pending_acks
        held = self._held
        for identity, env in items:
            held.discard(env.event_id)
            acks = pending.get(identity)
            if acks is None:
                acks = pending[identity] = []
            acks.append(env.event_id)
        self._pump.kick()

    async def pump(self) -> None:
        try:
            if self._monitor is None:
                await self._pump.run()
            else:
                async with trio.open_nursery() as n:
                    n.start_soon(self._monitor.run)
                    await self._pump.run()
                    n.cancel_scope.cancel()
        finally:
            self.rejections.flush()
            self.refusals.flush()

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
        if len(q) <= max_items:
            items = list(q)
            q.clear()
            return items
        return [q.popleft() for _ in range(max_items)]

    def close(self) -> None:
        self._pump.closed = True
        self._pump.kick()
        if self._monitor is not None:
            self._monitor.closed = True
            self._monitor.kick()
            self.sock.disable_monitor()
            self._monitor.sock.close(linger=0)
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
        #: event_id (ASCII bytes) -> frame, for every event not acknowledged yet.
        self.unacked: dict[bytes, bytes] = {}
        self._acked_waiter: trio.Event | None = None
        self._batch: list[bytes] = []  # frames queued since the last burst went out
        self._batch_ids: list[bytes] = []
        # (monotonic time sent, event ids) per burst, oldest first: what resend_due checks.
        self._sent: collections.deque[tuple[float, list[bytes]]] = collections.deque()
        self._pump = _Pump(self.sock, self._on_message, prepare=self._coalesce)
        self.resent = 0
        self.bad_acks = 0

    #: Largest burst sent as one zmq message.
    BATCH_FRAMES = 512
    BATCH_BYTES = 4 * 1024 * 1024

    def _coalesce(self) -> None:
        batch = self._batch
        if not batch:
            return
        self._sent.append((time.monotonic(), self._batch_ids))
        self._batch = []
        self._batch_ids = []
        out = self._pump._out
        if len(batch) <= self.BATCH_FRAMES and sum(map(len, batch)) <= self.BATCH_BYTES:
            out.append([KIND_EVENT, burst(batch)])
            return
        part: list[bytes] = []
        size = 0
        for frame in batch:
            if part and (len(part) >= self.BATCH_FRAMES or size + len(frame) > self.BATCH_BYTES):
                out.append([KIND_EVENT, burst(part)])
                part, size = [], 0
            part.append(frame)
            size += len(frame)
        if part:
            out.append([KIND_EVENT, burst(part)])

    def _on_message(self, parts: list[bytes]) -> None:
        if len(parts) == 2 and parts[0] == KIND_ACK:
            try:
                ids = _ack_decoder.decode(parts[1])
            except Exception:
                ids = None
            if ids is not None:
                pop = self.unacked.pop
                for eid in ids:
                    pop(eid.encode(), None)
                if not self.unacked:
                    self._sent.clear()  # nothing left to resend
                    if self._acked_waiter is not None:
                        self._acked_waiter.set()
                        self._acked_waiter = None
                return
        self.bad_acks += 1
        if self.bad_acks <= 10:
            log.warning("bad acknowledgement ignored", peer=self.peer, parts=len(parts))

    def send(self, event_id: str, frame: bytes) -> None:
        """Queue one encoded event; it is kept until the peer acknowledges it."""
        eid = event_id.encode()
        self.unacked[eid] = frame
        self._batch.append(frame)
        self._batch_ids.append(eid)
        if self._pump._wait_scope is not None:
            self._pump.kick()

    def resend_due(self, now: float | None = None) -> int:
        """Resend frames unacknowledged for longer than ``resend_after``; returns how many."""
        now = time.monotonic() if now is None else now
        sent, unacked = self._sent, self.unacked
        if not unacked:
            sent.clear()
            return 0
        n = 0
        again: set[bytes] = set()
        while sent and now - sent[0][0] >= self.resend_after:
            for eid in sent.popleft()[1]:
                frame = unacked.get(eid)
                if frame is not None and eid not in again:
                    again.add(eid)
                    self._batch.append(frame)
                    self._batch_ids.append(eid)
                    n += 1
        if n:
            self.resent += n
            self._pump.kick()
        return n

    async def pump(self) -> None:
        await self._pump.run()

    async def wait_acked(self) -> None:
        """Wait until every frame sent so far is acknowledged (callers add a deadline)."""
        while self.unacked:
            if self._acked_waiter is None:
                self._acked_waiter = trio.Event()
            await self._acked_waiter.wait()

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
