"""msgpack codec (msgspec: C-speed encoding and typed validation) for :class:`~protocol.events.Envelope`, validating on decode.

A frame is one msgpack map::

    {"event_id": str, "type": str, "schema_version": int, "run_id": str,
     "source": str, "seq": int, "ts": float, "causation_id": str | None,
     "payload": {field: value, ...}}

numpy arrays travel as msgpack ext types (1: int32 little-endian, 2: float32
little-endian). Decoding checks every envelope key and every payload field against
the event's declared type; unknown payload keys are ignored (forward compatible),
unknown event types, missing or ill-typed fields raise :class:`DecodeError` naming
what was wrong.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any, Callable

import msgspec
import numpy as np

from protocol.events import REGISTRY, Envelope, Event

EXT_I32 = 1
EXT_F32 = 2
#: Frames larger than this are refused before parsing (DoS guard).
MAX_FRAME_BYTES = 64 * 1024 * 1024

_LE_I32 = np.dtype("<i4")
_LE_F32 = np.dtype("<f4")


class ProtocolError(Exception):
    """Base of reckon's wire errors."""


class DecodeError(ProtocolError):
    """A frame that is not a valid reckon event; the message says why."""


class EncodeError(ProtocolError):
    """An event that cannot be put on the wire (wrong field type, bad array)."""


# --------------------------------------------------------------------------- encode


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "iub":
            return msgspec.msgpack.Ext(EXT_I32, np.ascontiguousarray(obj, dtype=_LE_I32).tobytes())
        if obj.dtype.kind == "f":
            return msgspec.msgpack.Ext(EXT_F32, np.ascontiguousarray(obj, dtype=_LE_F32).tobytes())
        raise EncodeError(f"cannot encode array of dtype {obj.dtype}")
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    raise EncodeError(f"cannot encode {type(obj).__name__}")


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)


def payload_dict(event: Event) -> dict[str, Any]:
    """The payload's fields as a dict (shallow: arrays stay arrays)."""
    return {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}  # type: ignore[arg-type]


def encode(env: Envelope) -> bytes:
    """Envelope -> one msgpack frame (the Envelope dataclass maps field for field)."""
    try:
        return _encoder.encode(env)
    except EncodeError as e:
        raise EncodeError(f"{env.type}: {e}") from None
    except (TypeError, ValueError, OverflowError) as e:
        raise EncodeError(f"{env.type}: {e}") from e


# --------------------------------------------------------------------------- decode


def _ext_hook(code: int, data: memoryview) -> Any:
    if code == EXT_I32:
        if len(data) % 4:
            raise DecodeError("int32 array ext has a length not divisible by 4")
        return np.frombuffer(data, dtype=_LE_I32).astype(np.int32, copy=True)
    if code == EXT_F32:
        if len(data) % 4:
            raise DecodeError("float32 array ext has a length not divisible by 4")
        return np.frombuffer(data, dtype=_LE_F32).astype(np.float32, copy=True)
    raise DecodeError(f"unknown msgpack ext type {code}")


def _dec_hook(tp: Any, obj: Any) -> Any:
    if tp is np.ndarray and isinstance(obj, np.ndarray):
        return obj
    raise NotImplementedError


class _WireEnvelope(msgspec.Struct):
    """The envelope as decoded first; the payload stays raw until its type is known."""

    event_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    type: Annotated[str, msgspec.Meta(max_length=128)]
    schema_version: Annotated[int, msgspec.Meta(ge=1)]
    run_id: str
    source: Annotated[str, msgspec.Meta(max_length=256)]
    seq: Annotated[int, msgspec.Meta(ge=0)]
    ts: float
    causation_id: str | None
    payload: msgspec.Raw


_envelope_decoder = msgspec.msgpack.Decoder(_WireEnvelope)
_burst_decoder = msgspec.msgpack.Decoder(list[_WireEnvelope])
_raw_list_decoder = msgspec.msgpack.Decoder(list[msgspec.Raw])
_raw_decoder = msgspec.msgpack.Decoder(ext_hook=_ext_hook)


class _PayloadType:
    """Decoder for one event type, plus the dtype checks msgspec cannot express."""

    def __init__(self, cls: type[Event]):
        self.cls = cls
        self.decoder = msgspec.msgpack.Decoder(cls, ext_hook=_ext_hook, dec_hook=_dec_hook)
        hints = typing.get_type_hints(cls, include_extras=True)
        self.arrays = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            tp = hints[f.name]
            if typing.get_origin(tp) is typing.Annotated and typing.get_args(tp)[0] is np.ndarray:
                meta = typing.get_args(tp)[1]
                self.arrays.append((f.name, np.dtype(np.int32 if meta == "int32" else np.float32), meta))

    def check_arrays(self, event: Event) -> Event:
        for name, dtype, meta in self.arrays:
            value = getattr(event, name)
            if value.dtype != dtype or value.ndim != 1:
                raise DecodeError(f"{self.cls.TYPE}.{name}: expected {meta} array, got {value.dtype} array")
        return event


_PAYLOADS: dict[str, _PayloadType] = {}


def _payload_type(name: str) -> _PayloadType | None:
    pt = _PAYLOADS.get(name)
    if pt is None:
        cls = REGISTRY.get(name)
        if cls is None:
            return None
        pt = _PAYLOADS[name] = _PayloadType(cls)
    return pt


def build_payload(cls: type[Event], raw: Any) -> Event:
    """Validate a payload mapping (e.g. read back from the log) and construct the event."""
    pt = _payload_type(cls.TYPE)
    if not isinstance(raw, dict):
        raise DecodeError(f"{cls.TYPE}: payload is {type(raw).__name__}, expected a map")
    try:
        event = msgspec.convert(raw, cls, dec_hook=_dec_hook, strict=False)
    except msgspec.ValidationError as e:
        raise DecodeError(f"{cls.TYPE}: {e}") from None
    return pt.check_arrays(event)


#: Upcasters: (type, from_version) -> function(raw payload) -> raw payload of from_version+1.
UPCASTERS: dict[tuple[str, int], Callable[[dict], dict]] = {}


def decode(frame: bytes, *, max_bytes: int = MAX_FRAME_BYTES) -> Envelope:
    """One msgpack frame -> a validated Envelope. Raises DecodeError naming the problem."""
    if not isinstance(frame, (bytes, bytearray, memoryview, msgspec.Raw)):
        raise DecodeError(f"frame is {type(frame).__name__}, expected bytes")
    if len(frame) > max_bytes:
        raise DecodeError(f"frame of {len(frame)} bytes exceeds the {max_bytes}-byte cap")
    try:
        wire = _envelope_decoder.decode(frame)
    except msgspec.ValidationError as e:
        raise DecodeError(f"envelope: {e}") from None
    except Exception as e:  # truncated, not msgpack, trailing bytes, ...
        raise DecodeError(f"not a msgpack frame: {type(e).__name__}: {e}") from None
    return _from_wire(wire)


def _from_wire(wire: _WireEnvelope) -> Envelope:
    """Validate the payload of a decoded envelope against its event type."""
    pt = _PAYLOADS.get(wire.type) or _payload_type(wire.type)
    if pt is None:
        raise DecodeError(f"unknown event type {wire.type[:80]!r}")
    cls = pt.cls
    version = wire.schema_version
    try:
        if version == cls.VERSION:
            event = pt.decoder.decode(wire.payload)
        elif version > cls.VERSION:
            raise DecodeError(f"{cls.TYPE}: schema_version {version} is newer than this reckon's {cls.VERSION}")
        else:
            payload = _raw_decoder.decode(wire.payload)
            while version < cls.VERSION:
                up = UPCASTERS.get((cls.TYPE, version))
                if up is None:
                    raise DecodeError(f"{cls.TYPE}: no upcaster from schema_version {version}")
                payload = up(payload)
                version += 1
            return _envelope(wire, build_payload(cls, payload))
    except msgspec.ValidationError as e:
        raise DecodeError(f"{cls.TYPE}: {e}") from None
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError(f"{cls.TYPE}: payload is not valid msgpack: {type(e).__name__}: {e}") from None
    if pt.arrays:
        pt.check_arrays(event)
    return Envelope(
        wire.event_id, wire.type, cls.VERSION, wire.run_id, wire.source, wire.seq, wire.ts, wire.causation_id, event
    )


def _envelope(wire: _WireEnvelope, event: Event) -> Envelope:
    return Envelope(
        event_id=wire.event_id,
        type=wire.type,
        schema_version=event.VERSION,
        run_id=wire.run_id,
        source=wire.source,
        seq=wire.seq,
        ts=wire.ts,
        causation_id=wire.causation_id,
        payload=event,
    )


# --------------------------------------------------------------------------- bursts
#
# A link sends what it has queued as one *burst*: a msgpack array whose items are the
# event frames (each the msgpack map above), i.e. ``array header + frame + frame + ...``.
# One zmq frame per burst and one msgspec call to decode it keep the per-event cost low.

_ARRAY_MARKERS = frozenset(range(0x90, 0xA0)) | {0xDC, 0xDD}
#: Most frames in one burst (links send at most 512); a larger array is refused unread.
MAX_BURST_FRAMES = 0xFFFF


def burst(frames: list[bytes]) -> bytes:
    """Encoded frames -> one burst (a msgpack array of them; no re-encoding)."""
    n = len(frames)
    if n > MAX_BURST_FRAMES:
        raise EncodeError(f"a burst holds at most {MAX_BURST_FRAMES} frames, not {n}")
    if n < 16:
        head = bytes((0x90 | n,))
    else:
        head = b"\xdc" + n.to_bytes(2, "big")
    return head + b"".join(frames)


def decode_burst(data: bytes, *, max_bytes: int = MAX_FRAME_BYTES) -> tuple[list[Envelope], list[tuple[str, int]]]:
    """One burst -> (its valid envelopes in order, ``(reason, size)`` of each rejected frame).

    Data that is not a msgpack array is taken as a single frame (a burst of one). Invalid frames
    never spoil the valid ones around them; a burst that is not an array of frames at all
    is one rejection.
    """
    if not data:
        return [], [("empty burst", 0)]
    if data[0] not in _ARRAY_MARKERS:
        try:
            return [decode(data, max_bytes=max_bytes)], []
        except DecodeError as e:
            return [], [(str(e), len(data))]
    if data[0] == 0xDD:
        n = int.from_bytes(data[1:5], "big")
        return [], [(f"burst of {n} frames exceeds the {MAX_BURST_FRAMES}-frame limit", len(data))]
    if len(data) <= max_bytes:  # every frame in it is under the cap: decode it in one call
        try:
            good = [_from_wire(w) for w in _burst_decoder.decode(data)]
        except Exception:
            pass  # some frame is bad: find which, frame by frame
        else:
            if good:
                return good, []
    try:
        raws = _raw_list_decoder.decode(data)
    except Exception as e:
        return [], [(f"burst of {len(data)} bytes is not a msgpack array of frames: {type(e).__name__}: {e}", len(data))]
    if not raws:
        return [], [("empty burst (an array of no frames)", len(data))]
    good: list[Envelope] = []
    bad: list[tuple[str, int]] = []
    for raw in raws:
        try:
            good.append(decode(raw, max_bytes=max_bytes))
        except DecodeError as e:
            bad.append((str(e), len(raw)))
    return good, bad


def to_jsonable(value: Any) -> Any:
    """Arrays -> lists, recursively: for JSON columns, CLI output and logs."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
