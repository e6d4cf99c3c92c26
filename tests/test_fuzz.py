"""Fuzzing every actor's inbox: random and mutated frames never crash it, each is rejected
with a logged reason (rate-limited), and the valid frames interleaved with them get through.

The bulk test drives each actor's real inbox (built by the runtime's Context) through its
receive path (``_on_message``: the multipart message as zmq hands it over) with 100 000
frames per inbox; a smaller test sends the same kind of traffic over a real socket.
"""

from __future__ import annotations

import dataclasses
import random
import typing

import msgpack
import numpy as np
import pytest
import structlog
import trio
import zmq

from actors.config import Config
from actors.runtime import Context
from protocol.codec import MAX_FRAME_BYTES, burst, encode
from protocol.events import REGISTRY, Envelope, Heartbeat, new_event_id
from protocol.transport import Link
from tests.test_protocol import _sample, envelope

RUN = "run-fuzz"
FRAMES_PER_INBOX = 100_000
_ARRAY_MARKERS = set(range(0x90, 0xA0)) | {0xDC, 0xDD}


def _payloads(rng: random.Random) -> list:
    out = []
    for cls in sorted(REGISTRY.values(), key=lambda c: c.TYPE):
        hints = typing.get_type_hints(cls, include_extras=True)
        for _ in range(3):
            out.append(cls(**{f.name: _sample(hints[f.name], rng) for f in dataclasses.fields(cls)}))
    return out


def _envelope(payload, run_id: str = RUN) -> Envelope:
    return envelope(payload, run_id=run_id, source="fuzzer-0", ts=1.0)


class Corpus:
    """A seeded stream of zmq messages (``[b"E", part]``) mixing valid and invalid frames.

    ``items`` counts the frames the inbox must account for one by one (each is received,
    dropped as a duplicate, or rejected); ``valid`` holds the event ids of intact frames.
    """

    def __init__(self, n_frames: int, seed: int = 0):
        rng = self.rng = random.Random(seed)
        self.payloads = _payloads(rng)
        self.templates = [encode(_envelope(p)) for p in self.payloads]
        self.maps = [msgpack.unpackb(f, ext_hook=msgpack.ExtType) for f in self.templates]
        self.messages: list[list[bytes]] = []
        self.counts: list[int] = []  # frames in each message
        self.valid: set[str] = set()
        self.items = 0
        self.by_kind: dict[str, int] = {}
        while self.items < n_frames:
            if rng.random() < 0.25:
                k = rng.randrange(2, 33)
                frames = [self._complete_item() for _ in range(k)]
                self.messages.append([b"E", burst(frames)])
                self.counts.append(k)
                self.items += k
            else:
                self.messages.append([b"E", self._single_item()])
                self.counts.append(1)
                self.items += 1

    def _count(self, kind: str) -> None:
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1

    def _valid(self) -> bytes:
        env = _envelope(self.rng.choice(self.payloads))
        self.valid.add(env.event_id)
        self._count("valid")
        return encode(env)

    def _complete_item(self) -> bytes:
        """A complete msgpack object (so it can sit inside a burst): valid or structurally bad."""
        return self._valid() if self.rng.random() < 0.4 else self._structural()

    def _single_item(self) -> bytes:
        """One frame as a message part of its own (one that looks like an array, i.e. a
        burst, is sent as a burst of one)."""
        frame = self._single_frame()
        return burst([frame]) if frame and frame[0] in _ARRAY_MARKERS else frame

    def _single_frame(self) -> bytes:
        r = self.rng.random()
        if r < 0.3:
            return self._valid()
        if r < 0.55:
            frame = self._byte_mutation()
        elif r < 0.65:
            self._count("random bytes")
            frame = self.rng.randbytes(self.rng.randrange(0, 300))
        elif r < 0.72:
            self._count("huge length")
            frame = self._huge_length()
        else:
            frame = self._structural()
        return frame

    def _byte_mutation(self) -> bytes:
        rng = self.rng
        f = bytearray(rng.choice(self.templates))
        op = rng.randrange(5)
        self._count(("truncated", "flipped", "inserted", "deleted", "appended")[op])
        if op == 0:
            return bytes(f[: rng.randrange(0, len(f))])
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(f))
            if op == 1:
                f[i] = rng.randrange(256)
            elif op == 2:
                f[i:i] = rng.randbytes(rng.randrange(1, 9))
            elif op == 3:
                del f[i : i + rng.randrange(1, 9)]
            else:
                f += rng.randbytes(rng.randrange(1, 9))
            if not f:
                break
        return bytes(f)

    def _huge_length(self) -> bytes:
        # A header that claims far more bytes or items than the frame holds.
        head = self.rng.choice([b"\xdb", b"\xc6", b"\xdd", b"\xdf"]) + b"\xff\xff\xff\xff"
        return self.rng.choice([head, b"\x89\xa8event_id" + head, b"\x81\xa7payload" + head + b"xyz"])

    def _structural(self) -> bytes:
        """A well-formed msgpack object that is not a valid event of this run."""
        rng = self.rng
        m = dict(rng.choice(self.maps))
        m["event_id"] = new_event_id()
        op = rng.randrange(12)
        kind = ("wrong run_id", "unknown type", "wrong field type", "missing field", "payload not a map",
                "payload field type", "newer schema", "bad schema", "long string", "wrong ext", "not a map",
                "bad array ext")[op]
        self._count(kind)
        if op == 0:
            m["run_id"] = rng.choice(["other-run", "", RUN + "x"])
        elif op == 1:
            m["type"] = rng.choice(["NoSuchEvent", "", "heartbeat", "A" * 100])
        elif op == 2:
            key = rng.choice(["event_id", "type", "schema_version", "run_id", "source", "seq", "ts"])
            m[key] = rng.choice([None, [1], {"a": 1}, 1.5 if key != "ts" else "now", -1 if key != "ts" else None])
        elif op == 3:
            del m[rng.choice(["event_id", "type", "schema_version", "run_id", "source", "seq", "ts", "payload"])]
        elif op == 4:
            m["payload"] = rng.choice([[1, 2], "x", 3, None])
        elif op == 5:
            p = dict(m["payload"])
            if p:
                p[rng.choice(sorted(p))] = rng.choice([b"\x00bin", {"deep": [[[{}]]]}, msgpack.ExtType(7, b"x")])
                m["payload"] = p
            else:
                m["payload"] = [1]
        elif op == 6:
            m["schema_version"] = 99
        elif op == 7:
            m["schema_version"] = rng.choice([0, -5])
        elif op == 8:
            m[rng.choice(["event_id", "type", "source"])] = "x" * 5000
        elif op == 9:
            m["payload"] = msgpack.ExtType(rng.choice([1, 2, 9]), b"abc")
        elif op == 10:
            return msgpack.packb(rng.choice([[1, 2, 3], "frame", 42, None, msgpack.ExtType(3, b"")]))
        else:
            p = dict(m["payload"])
            arrays = [k for k, v in p.items() if isinstance(v, msgpack.ExtType)]
            if not arrays:
                p["x"] = 1
                m["seq"] = -1
            else:
                p[rng.choice(arrays)] = msgpack.ExtType(rng.choice([1, 2]), b"abcde")  # not a multiple of 4
            m["payload"] = p
        return msgpack.packb(m, use_bin_type=True)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus(FRAMES_PER_INBOX)


def _config(tmp_path) -> Config:
    cfg = Config.model_validate({"run": {"run_dir": str(tmp_path), "run_id": RUN}})
    (tmp_path / "sock").mkdir(exist_ok=True)
    return cfg


# One inbox per actor kind (the recorder acks after commit, the others on receipt).
ACTORS = ["recorder", "scheduler", "learner", "verifier-0", "tool-0", "generator-0"]


@pytest.mark.parametrize("actor", ACTORS)
def test_every_inbox_survives_100k_fuzzed_frames(actor, corpus, tmp_path):
    assert corpus.items >= FRAMES_PER_INBOX
    assert {"valid", "wrong run_id", "unknown type", "truncated", "huge length"} <= set(corpus.by_kind)
    oversized = b"\x89" + b"\x00" * (MAX_FRAME_BYTES + 16)  # over the cap: refused before parsing

    async def main():
        zctx = zmq.Context()
        async with trio.open_nursery() as nursery:
            ctx = Context(actor, _config(tmp_path), RUN, zctx, nursery)
            inbox = ctx.inbox
            delivered: set[str] = set()
            sender = b"fuzzer:1"
            with structlog.testing.capture_logs() as logs:
                for i, msg in enumerate(corpus.messages):
                    inbox._on_message([sender, *msg])
                    if i % 500 == 0:
                        inbox._on_message([sender, b"E", oversized])
                    while True:
                        try:
                            _, env = inbox.receive_nowait()
                        except trio.WouldBlock:
                            break
                        delivered.add(env.event_id)
                    if i % 1000 == 0:  # acks would go out with the pump; drop them here
                        inbox._flush_acks()
                        inbox._pump._out.clear()
            n_oversized = (len(corpus.messages) + 499) // 500
            # Every frame is accounted for: delivered, a duplicate, or rejected with a reason.
            assert inbox.received + inbox.duplicates + inbox.rejected == corpus.items + n_oversized
            assert corpus.valid <= delivered  # every intact frame got through, once
            assert inbox.received == len(delivered)
            reasons = inbox.reject_reasons
            assert reasons["run_id … is not this run (…)"] >= corpus.by_kind["wrong run_id"]
            assert reasons["unknown event type …"] >= corpus.by_kind["unknown type"]
            assert reasons["frame of N bytes exceeds the N-byte cap"] == n_oversized
            assert reasons["not a msgpack frame"] > 0 and reasons["envelope"] > 0
            assert sum(reasons.values()) == inbox.rejected
            assert ctx.rejected and all(ctx.rejected)  # the actor sees the latest reasons
            # Logged, but rate-limited: a few individual lines, then periodic summaries.
            lines = [e for e in logs if e["event"].startswith("frame rejected")]
            individual = [e for e in lines if e["event"] == "frame rejected"]
            assert individual and all(e["reason"] for e in individual)
            assert len(individual) <= 20 and len(lines) < 100
            nursery.cancel_scope.cancel()
        zctx.destroy(0)

    trio.run(main)


def _corrupt_bursts(rng: random.Random, templates: list[bytes], n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        frames = [rng.choice(templates) for _ in range(rng.randrange(1, 6))]
        good = burst(frames)
        out.append(rng.choice([
            good[: rng.randrange(1, len(good))],  # truncated
            b"\xdd\xff\xff\xff\xff" + b"".join(frames),  # claims 4G frames
            b"\x90",  # no frames
            bytes([0x90 | rng.randrange(1, 16)]) + rng.randbytes(rng.randrange(0, 200)),  # junk items
            b"\x91" * 100_000 + b"\xc0",  # nested past the recursion limit
        ]))
    return out


def test_corrupt_bursts_and_malformed_messages_are_rejected(corpus, tmp_path):
    rng = random.Random(1)
    bad_parts = _corrupt_bursts(rng, corpus.templates, 2000)
    malformed = [[], [b"E"], [b"A", b"x"], [b"", b"x"], [b"EE", corpus.templates[0]]]

    async def main():
        zctx = zmq.Context()
        async with trio.open_nursery() as nursery:
            ctx = Context("scheduler", _config(tmp_path), RUN, zctx, nursery)
            inbox = ctx.inbox
            valid = []
            for i, part in enumerate(bad_parts):
                inbox._on_message([b"fuzzer:2", b"E", part])
                inbox._on_message([b"fuzzer:2", *malformed[i % len(malformed)]])
                env = _envelope(Heartbeat(uptime_s=float(i), state="ok"))
                valid.append(env.event_id)
                inbox._on_message([b"good:1", b"E", burst([encode(env)])])
            got = []
            while True:
                try:
                    got.append(inbox.receive_nowait()[1].event_id)
                except trio.WouldBlock:
                    break
            assert got == valid
            assert inbox.rejected >= 2 * len(bad_parts)
            kinds = inbox.reject_reasons
            assert kinds["malformed multipart message (N parts)"] == len(bad_parts)
            assert kinds["burst of N bytes is not a msgpack array of frames"] > 0
            assert kinds["empty burst (an array of no frames)"] > 0
            nursery.cancel_scope.cancel()
        zctx.destroy(0)

    trio.run(main)


def test_fuzzed_socket_traffic_leaves_the_inbox_serving(corpus, tmp_path):
    """The same traffic over a real socket, with a reliable link interleaving valid events."""
    messages = corpus.messages[:3000]

    async def main():
        zctx = zmq.Context()
        cfg = _config(tmp_path)
        async with trio.open_nursery() as nursery:
            ctx = Context("generator-0", cfg, RUN, zctx, nursery)
            nursery.start_soon(ctx.inbox.pump)
            raw = zctx.socket(zmq.DEALER)
            raw.setsockopt(zmq.SNDHWM, 0)
            raw.connect(cfg.address("generator-0"))
            link = Link(zctx, "generator-0", cfg.address("generator-0"), identity=b"good")
            nursery.start_soon(link.pump)
            sent = set()
            for i, msg in enumerate(messages):
                raw.send_multipart(msg)
                if i % 10 == 0:
                    env = _envelope(Heartbeat(uptime_s=float(i), state="ok"))
                    sent.add(env.event_id)
                    link.send(env.event_id, encode(env))
                    await trio.lowlevel.checkpoint()
            got = set()
            with trio.fail_after(60):
                while not sent <= got:
                    _, env = await ctx.inbox.receive()
                    got.add(env.event_id)
                await link.wait_acked()
                # every fuzzed frame was handled too (none crashed the pump, none got stuck)
                expected = len(sent) + sum(corpus.counts[: len(messages)])
                while ctx.inbox.received + ctx.inbox.duplicates + ctx.inbox.rejected < expected:
                    await trio.sleep(0.05)
            inbox = ctx.inbox
            assert inbox.received + inbox.duplicates + inbox.rejected == expected
            assert inbox.rejected > 0
            raw.close(0)
            link.close()
            nursery.cancel_scope.cancel()
        zctx.destroy(0)

    trio.run(main)
