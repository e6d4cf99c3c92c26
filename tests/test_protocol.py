"""Codec round trips, rejection of malformed frames, and the trio ZeroMQ transport."""

from __future__ import annotations

import dataclasses
import random
import re
import types
import typing

import msgpack
import numpy as np
import pytest
import structlog
import trio
import zmq

from protocol.codec import DecodeError, burst, decode, decode_burst, encode
from protocol.events import (
    REGISTRY,
    BatchFormed,
    Envelope,
    Heartbeat,
    TrajectoryCompleted,
    new_event_id,
)
from protocol.transport import Inbox, Link, RejectLog


def _sample(tp, rng: random.Random | None = None):
    """A value of type ``tp`` for an event field: fixed, or drawn from ``rng`` (the fuzz corpus)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, meta = typing.get_args(tp)
        n = rng.randrange(0, 20) if rng else 5
        return np.arange(n, dtype=np.int32 if meta == "int32" else np.float32)
    if origin in (typing.Union, types.UnionType):
        return _sample(typing.get_args(tp)[0], rng)
    if origin in (list, dict):
        return {list: [1, "a"], dict: {"k": 1}}[origin]
    if rng:
        drawn = {int: rng.randrange(1000), float: rng.random(), str: "x" * rng.randrange(0, 30)}
        if tp in drawn:
            return drawn[tp]
    return {int: 7, float: 0.5, str: "x", bool: True, list: [1, "a"], dict: {"k": 1}}.get(tp, tp)


def make_event(cls):
    hints = typing.get_type_hints(cls, include_extras=True)
    return cls(**{f.name: _sample(hints[f.name]) for f in dataclasses.fields(cls)})


def envelope(payload, **kw) -> Envelope:
    base = dict(
        event_id=new_event_id(), type=payload.TYPE, schema_version=payload.VERSION, run_id="run-1",
        source="test-0", seq=0, ts=1.5, causation_id=None, payload=payload,
    )
    base.update(kw)
    return Envelope(**base)


@pytest.mark.parametrize("cls", sorted(REGISTRY.values(), key=lambda c: c.TYPE), ids=lambda c: c.TYPE)
def test_every_event_round_trips(cls):
    env = envelope(make_event(cls))
    back = decode(encode(env))
    assert back.type == env.type and back.event_id == env.event_id and back.run_id == "run-1"
    for f in dataclasses.fields(cls):
        a, b = getattr(env.payload, f.name), getattr(back.payload, f.name)
        if isinstance(a, np.ndarray):
            assert b.dtype == a.dtype and np.array_equal(a, b)
        else:
            assert a == b, f.name


def test_arrays_travel_as_binary_not_lists():
    ids = np.arange(4000, dtype=np.int32)
    ev = make_event(TrajectoryCompleted)
    ev = dataclasses.replace(ev, response_ids=ids)
    frame = encode(envelope(ev))
    assert len(frame) < 4000 * 4 + 1000  # ~4 bytes per token, not a msgpack int list
    assert np.array_equal(decode(frame).payload.response_ids, ids)


def test_extra_payload_fields_are_tolerated():
    env = envelope(Heartbeat(uptime_s=1.0, state="ok"))
    raw = msgpack.unpackb(encode(env))
    raw["payload"]["added_in_a_later_version"] = 3
    raw["also_new_in_envelope"] = True
    assert decode(msgpack.packb(raw)).payload == Heartbeat(uptime_s=1.0, state="ok")


def _frame(**changes):
    raw = msgpack.unpackb(encode(envelope(Heartbeat(uptime_s=1.0, state="ok"))))
    for k, v in changes.items():
        if k.startswith("payload."):
            if v is KeyError:
                del raw["payload"][k[8:]]
            else:
                raw["payload"][k[8:]] = v
        elif v is KeyError:
            del raw[k]
        else:
            raw[k] = v
    return msgpack.packb(raw)


@pytest.mark.parametrize(
    "frame, reason",
    [
        (b"", "not a msgpack frame"),
        (b"\xc1", "not a msgpack frame"),
        (encode(envelope(Heartbeat(uptime_s=1.0, state="ok")))[:-3], "not a msgpack frame"),
        (msgpack.packb([1, 2, 3]), "envelope: Expected `object`, got `array`"),
        (_frame(type="NoSuchEvent"), "unknown event type 'NoSuchEvent'"),
        (_frame(event_id=KeyError), "missing required field `event_id`"),
        (_frame(seq=-1), "at `$.seq`"),
        (_frame(seq="1"), "Expected `int`, got `str` - at `$.seq`"),
        (_frame(ts="now"), "at `$.ts`"),
        (_frame(schema_version=99), "newer than"),
        (_frame(**{"payload.state": KeyError}), "Heartbeat: Object missing required field `state`"),
        (_frame(**{"payload.uptime_s": "1"}), "Heartbeat: Expected `float`, got `str` - at `$.uptime_s`"),
        (_frame(payload=[1]), "Heartbeat: Expected `object`, got `array`"),
        (msgpack.packb({"event_id": "x", "type": "Heartbeat"}, use_bin_type=True), "missing required field `schema_version`"),
        (msgpack.packb(msgpack.ExtType(9, b"abc")), "envelope: Expected `object`, got `ext`"),
    ],
)
def test_malformed_frames_are_rejected_with_a_reason(frame, reason):
    with pytest.raises(DecodeError, match=re.escape(reason)):
        decode(frame)


def test_wrong_array_dtype_is_rejected():
    ev = make_event(BatchFormed)
    raw = msgpack.unpackb(encode(envelope(ev)), ext_hook=lambda c, d: msgpack.ExtType(c, d))
    raw["payload"]["input_ids"] = msgpack.ExtType(2, np.zeros(3, np.float32).tobytes())
    with pytest.raises(DecodeError, match="BatchFormed.input_ids: expected int32 array"):
        decode(msgpack.packb(raw))


def test_oversized_frame_is_refused_before_parsing():
    with pytest.raises(DecodeError, match="exceeds"):
        decode(b"\x00" * 2000, max_bytes=1000)


# --------------------------------------------------------------------------- transport


def _addr(tmp_path, name):
    return f"ipc://{tmp_path}/{name}"


def test_link_delivers_acks_and_dedupes(tmp_path):
    async def main():
        zctx = zmq.Context()
        rejected = []
        inbox = Inbox(zctx, _addr(tmp_path, "in"), run_id="run-1", on_reject=lambda r, f: rejected.append(r))
        link = Link(zctx, "in", _addr(tmp_path, "in"), identity=b"sender")
        async with trio.open_nursery() as n:
            n.start_soon(inbox.pump)
            n.start_soon(link.pump)
            envs = [envelope(Heartbeat(uptime_s=float(i), state="ok"), seq=i) for i in range(2000)]
            for e in envs:
                link.send(e.event_id, encode(e))
            link.send(envs[0].event_id, encode(envs[0]))  # a duplicate
            got = [(await inbox.receive())[1] for _ in range(2000)]
            assert [g.seq for g in got] == list(range(2000))
            with trio.fail_after(5):
                await link.wait_acked()
            assert inbox.duplicates == 1 and not link.unacked
            # A frame of another run and a garbage frame are rejected; the inbox keeps serving.
            other = envelope(Heartbeat(uptime_s=0.0, state="x"), run_id="other")
            link.send(other.event_id, encode(other))
            raw = zctx.socket(zmq.DEALER)
            raw.connect(_addr(tmp_path, "in"))
            raw.send_multipart([b"E", b"\xc1garbage"])
            raw.send_multipart([b"Z"])
            last = envelope(Heartbeat(uptime_s=9.0, state="last"))
            link.send(last.event_id, encode(last))
            with trio.fail_after(5):
                _, env = await inbox.receive()
            assert env.payload.state == "last"
            assert any("run_id 'other'" in r for r in rejected)
            assert any("not a msgpack frame" in r for r in rejected)
            assert any("malformed multipart" in r for r in rejected)
            raw.close(0)
            n.cancel_scope.cancel()
        inbox.close()
        link.close()
        zctx.destroy(0)

    trio.run(main)


def test_unacked_events_are_resent_to_a_restarted_peer(tmp_path):
    """A receiver that dies before acking gets the events again when it comes back."""

    async def main():
        zctx = zmq.Context()
        addr = _addr(tmp_path, "peer")
        link = Link(zctx, "peer", addr, identity=b"sender", resend_after=0.2)
        async with trio.open_nursery() as n:
            n.start_soon(link.pump)
            first = Inbox(zctx, addr, auto_ack=False)
            n.start_soon(first.pump)
            envs = [envelope(Heartbeat(uptime_s=float(i), state="ok"), seq=i) for i in range(10)]
            for e in envs:
                link.send(e.event_id, encode(e))
            for _ in range(10):
                await first.receive()  # received but never acknowledged: "crash"
            first.close()
            assert len(link.unacked) == 10
            second = Inbox(zctx, addr)
            n.start_soon(second.pump)
            seen = set()
            with trio.fail_after(10):
                while len(seen) < 10:
                    link.resend_due()
                    with trio.move_on_after(0.3):
                        while len(seen) < 10:
                            _, env = await second.receive()
                            seen.add(env.seq)
                await link.wait_acked()
            assert seen == set(range(10)) and link.resent >= 10
            second.close()
            n.cancel_scope.cancel()
        link.close()
        zctx.destroy(0)

    trio.run(main)


# --------------------------------------------------------------------------- bursts, acks, rejections


def test_a_bad_frame_in_a_burst_spoils_nothing_around_it():
    good = [envelope(Heartbeat(uptime_s=float(i), state="ok"), seq=i) for i in range(3)]
    frames = [encode(good[0]), _frame(type="NoSuchEvent"), encode(good[1]), msgpack.packb("text"), encode(good[2])]
    envs, bad = decode_burst(burst(frames))
    assert [e.seq for e in envs] == [0, 1, 2]
    assert [r for r, _ in bad] == ["unknown event type 'NoSuchEvent'", "envelope: Expected `object`, got `str`"]
    assert decode_burst(encode(good[0]))[0][0].event_id == good[0].event_id  # a bare frame is a burst of one
    assert decode_burst(b"\x90")[1][0][0].startswith("empty burst")
    assert decode_burst(burst(frames)[:-5])[1][0][0].startswith("burst of")  # truncated: one rejection
    assert decode_burst(b"\xdd\x00\x01\x00\x00")[1][0][0] == "burst of 65536 frames exceeds the 65535-frame limit"
    (reason, size), = decode_burst(burst([encode(good[0])]), max_bytes=20)[1]
    assert "exceeds the 20-byte cap" in reason and size == len(encode(good[0]))


def _ack_ids(inbox) -> list[str]:
    inbox._flush_acks()
    ids = [i for m in inbox._pump._out for i in msgpack.unpackb(m[2])]
    inbox._pump._out.clear()
    return ids


def test_a_duplicate_is_acked_again_unless_its_original_awaits_the_consumer(tmp_path):
    async def main():
        zctx = zmq.Context()
        manual = Inbox(zctx, _addr(tmp_path, "m"), auto_ack=lambda env: env.payload.state != "work")
        work, beat = envelope(Heartbeat(uptime_s=1.0, state="work")), envelope(Heartbeat(uptime_s=1.0, state="ok"))
        msg = [b"peer", b"E", burst([encode(work), encode(beat)])]
        manual._on_message(msg)
        assert _ack_ids(manual) == [beat.event_id]  # the predicate holds "work" back
        manual._on_message(msg)  # both resent
        assert _ack_ids(manual) == [beat.event_id]  # the held one is still not acked
        assert manual.duplicates == 2 and manual.received == 2
        manual.ack(b"peer", work)  # the consumer is done
        manual._on_message(msg)
        assert sorted(_ack_ids(manual)) == sorted([work.event_id, beat.event_id, work.event_id])
        manual.close()
        zctx.destroy(0)

    trio.run(main)


def test_rejections_are_counted_and_logged_without_flooding():
    rejections = RejectLog("frame rejected", burst=3, interval_s=3600)
    with structlog.testing.capture_logs() as logs:
        for i in range(1000):
            rejections(f"run_id 'r{i}' is not this run ('run-1')", size=10)
        rejections("not a msgpack frame: DecodeError: x")
        rejections.flush()
    assert rejections.total == 1001
    assert rejections.kinds == {"run_id … is not this run (…)": 1000, "not a msgpack frame": 1}
    assert [e["event"] for e in logs] == ["frame rejected"] * 3 + [
        "frame rejected: further ones are summarized every 3600 s", "frame rejected (summary)"]
    assert logs[0]["reason"] == "run_id 'r0' is not this run ('run-1')"
    assert logs[-1]["count"] == 998 and logs[-1]["reasons"]["not a msgpack frame"] == 1
