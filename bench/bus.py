"""Event bus throughput: reckon's codec + trio transport vs raw pyzmq, two processes.

    python -m bench.bus [--events N] [--payload small|trajectory]

reckon: the sender wraps typed events in envelopes (fresh event id, seq, ts), encodes
them (codec.encode) and sends them through a Link (DEALER; each event kept until
acknowledged, what is queued goes out as one burst: one msgpack array, one zmq message);
the receiver's Inbox (ROUTER) decodes and validates every frame (envelope and payload
types, run_id), dedupes, queues it and acknowledges in batches; a trio task consumes them.
raw: the same encoded bytes through a blocking DEALER -> ROUTER pair, one zmq message per
frame, no decode, no ack.
Both are timed from the receiver's first to its last message. Ratio = reckon / raw. The CPU
time each process spent per event is printed too: on a loaded machine it is steadier than
the rates.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time

import numpy as np
import trio
import zmq

from protocol.codec import encode
from protocol.events import CapacityReported, Envelope, TrajectoryCompleted, new_event_id


def make_event(kind: str, i: int):
    if kind == "small":
        return CapacityReported(kind="generator", free_tokens=100_000 - i, total_tokens=262_144, free_slots=7,
                                total_slots=64, running=57, queued=0, busy_s=12.5)
    return TrajectoryCompleted(
        rollout_id=f"r{i}", group_id="g", step=1, stage="rl1", problem_id="p", answer="42", generator="generator-0",
        prompt_ids=np.arange(64, dtype=np.int32), response_ids=np.arange(400, dtype=np.int32),
        logprobs=np.zeros(400, np.float32), loss_mask=np.ones(400, np.int32), versions=np.ones(400, np.int32),
        response_text="x" * 1500, turns=2, tool_calls=[{"call_id": "c", "status": "ok"}], finish_reason="stop",
        seconds=1.0,
    )


def envelope(ev, i: int) -> Envelope:
    return Envelope(event_id=new_event_id(), type=ev.TYPE, schema_version=1, run_id="bench", source="bench-0",
                    seq=i, ts=time.time(), causation_id=None, payload=ev)


# ----------------------------------------------------------------------------- reckon


def reckon_receiver(addr: str, n: int, out: mp.Queue) -> None:
    from protocol.transport import Inbox

    async def main():
        zctx = zmq.Context()
        inbox = Inbox(zctx, addr, run_id="bench")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(inbox.pump)
            out.put("ready")
            got = len(await inbox.receive_batch())
            t0, c0 = time.perf_counter(), time.process_time()
            while got < n:
                got += len(await inbox.receive_batch())
            out.put((time.perf_counter() - t0, time.process_time() - c0))
            await trio.sleep(0.5)  # let the last acks go out
            nursery.cancel_scope.cancel()
        inbox.close()
        zctx.destroy(0)

    trio.run(main)


def reckon_sender(addr: str, n: int, kind: str, out: mp.Queue) -> None:
    from protocol.transport import Link

    async def main():
        zctx = zmq.Context()
        link = Link(zctx, "bench", addr, identity=b"sender")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.pump)
            payloads = [make_event(kind, i) for i in range(1000)]  # the application's work, not the bus's
            c0 = time.process_time()
            for i in range(n):
                env = envelope(payloads[i % 1000], i)
                link.send(env.event_id, encode(env))
                if i % 256 == 0:
                    await trio.lowlevel.checkpoint()
                    # keep memory bounded like a real actor: wait for acks when far ahead
                    while len(link.unacked) > 50_000:
                        await trio.sleep(0.001)
            with trio.move_on_after(30):
                await link.wait_acked()
            out.put(time.process_time() - c0)
            nursery.cancel_scope.cancel()
        link.close()
        zctx.destroy(0)

    trio.run(main)


# ----------------------------------------------------------------------------- raw pyzmq


def raw_receiver(addr: str, n: int, out: mp.Queue) -> None:
    zctx = zmq.Context()
    s = zctx.socket(zmq.ROUTER)
    s.setsockopt(zmq.RCVHWM, 0)
    s.bind(addr)
    out.put("ready")
    s.recv_multipart()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n - 1):
        s.recv_multipart()
    out.put((time.perf_counter() - t0, time.process_time() - c0))
    s.close(0)
    zctx.destroy(0)


def raw_sender(addr: str, n: int, kind: str, out: mp.Queue) -> None:
    frames = [encode(envelope(make_event(kind, i), i)) for i in range(min(n, 1000))]
    zctx = zmq.Context()
    s = zctx.socket(zmq.DEALER)
    s.setsockopt(zmq.SNDHWM, 0)
    s.connect(addr)
    c0 = time.process_time()
    for i in range(n):
        s.send_multipart([b"E", frames[i % len(frames)]])
    out.put(time.process_time() - c0)
    time.sleep(1.0)
    s.close(0)
    zctx.destroy(0)


def measure(recv_fn, send_fn, n: int, kind: str) -> tuple[float, float, float]:
    """(events/s at the receiver, receiver CPU us/event, sender CPU us/event)."""
    d = tempfile.mkdtemp(prefix="reckon-bus-")
    addr = f"ipc://{d}/bus"
    q: mp.Queue = mp.Queue()
    r = mp.Process(target=recv_fn, args=(addr, n, q))
    r.start()
    assert q.get(timeout=30) == "ready"
    sq: mp.Queue = mp.Queue()
    s = mp.Process(target=send_fn, args=(addr, n, kind, sq))
    s.start()
    elapsed, recv_cpu = q.get(timeout=600)
    send_cpu = sq.get(timeout=120)
    s.join(60)
    r.join(60)
    return (n - 1) / elapsed, recv_cpu / (n - 1) * 1e6, send_cpu / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--payload", choices=["small", "trajectory"], default="small")
    a = ap.parse_args()
    n = a.events if a.payload == "small" else min(a.events, 50_000)
    size = len(encode(envelope(make_event(a.payload, 0), 0)))
    print(f"bench/bus: {n} events of {size} bytes ({a.payload}), 2 processes, ipc, cpu count {os.cpu_count()}")
    raw, raw_rc, raw_sc = measure(raw_receiver, raw_sender, n, a.payload)
    print(f"  raw pyzmq DEALER->ROUTER (no decode, no ack):      {raw:12,.0f} msg/s"
          f"   cpu/msg: receiver {raw_rc:.2f} us, sender {raw_sc:.2f} us")
    rk, rk_rc, rk_sc = measure(reckon_receiver, reckon_sender, n, a.payload)
    print(f"  reckon codec + trio transport (decode, ack, dedupe): {rk:10,.0f} events/s"
          f" cpu/event: receiver {rk_rc:.2f} us, sender {rk_sc:.2f} us")
    print(f"  ratio reckon/raw = {rk / raw:.2f}  (goal >= 0.5)")


if __name__ == "__main__":
    main()
