"""msgpack codec for :class:`~protocol.events.Envelope`, validating on decode.

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
from typing import Any, Callable

import msgpack
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


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "iub":
            return msgpack.ExtType(EXT_I32, np.ascontiguousarray(obj, dtype=_LE_I32).tobytes())
        if obj.dtype.kind == "f":
            return msgpack.ExtType(EXT_F32, np.ascontiguousarray(obj, dtype=_LE_F32).tobytes())
        raise EncodeError(f"cannot encode array of dtype {obj.dtype}")
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise EncodeError(f"cannot encode {type(obj).__name__}")


_packer_default = _default


def payload_dict(event: Event) -> dict[str, Any]:
    """The payload's fields as a dict (shallow: arrays stay arrays)."""
    return {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}  # type: ignore[arg-type]


def encode(env: Envelope) -> bytes:
    """Envelope -> one msgpack frame."""
    frame = {
        "event_id": env.event_id,
        "type": env.type,
        "schema_version": env.schema_version,
        "run_id": env.run_id,
        "source": env.source,
        "seq": env.seq,
        "ts": env.ts,
        "causation_id": env.causation_id,
        "payload": payload_dict(env.payload),
    }
    try:
        return msgpack.packb(frame, default=_packer_default, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise EncodeError(f"{env.type}: {e}") from e


# --------------------------------------------------------------------------- decode


def _ext_hook(code: int, data: bytes) -> Any:
    if code == EXT_I32:
        if len(data) % 4:
            raise DecodeError("int32 array ext has a length not divisible by 4")
        return np.frombuffer(data, dtype=_LE_I32).astype(np.int32, copy=False)
    if code == EXT_F32:
        if len(data) % 4:
            raise DecodeError("float32 array ext has a length not divisible by 4")
        return np.frombuffer(data, dtype=_LE_F32).astype(np.float32, copy=False)
    raise DecodeError(f"unknown msgpack ext type {code}")


Checker = Callable[[Any], bool]


def _checker_for(tp: Any) -> tuple[Checker, str]:
    """A predicate for one declared field type, and a name for error messages."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(tp)
        if base is np.ndarray:
            dtype = np.int32 if meta[0] == "int32" else np.float32
            return (lambda v, d=dtype: isinstance(v, np.ndarray) and v.dtype == d and v.ndim == 1), f"{meta[0]} array"
        return _checker_for(base)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        parts = [_checker_for(a) for a in typing.get_args(tp)]
        return (lambda v: any(c(v) for c, _ in parts)), " | ".join(n for _, n in parts)
    if tp is type(None):
        return (lambda v: v is None), "None"
    if tp is bool:
        return (lambda v: isinstance(v, bool)), "bool"
    if tp is int:
        return (lambda v: isinstance(v, int) and not isinstance(v, bool)), "int"
    if tp is float:
        return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)), "float"
    if tp is str:
        return (lambda v: isinstance(v, str)), "str"
    if tp is list or origin is list:
        return (lambda v: isinstance(v, list)), "list"
    if tp is dict or origin is dict:
        return (lambda v: isinstance(v, dict)), "dict"
    raise TypeError(f"unsupported event field type {tp!r}")


_SPECS: dict[type, list[tuple[str, Checker, str, bool, bool]]] = {}


def _spec(cls: type[Event]) -> list[tuple[str, Checker, str, bool, bool]]:
    spec = _SPECS.get(cls)
    if spec is None:
        hints = typing.get_type_hints(cls, include_extras=True)
        spec = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            check, name = _checker_for(hints[f.name])
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
            is_float = hints[f.name] is float
            spec.append((f.name, check, name, required, is_float))
        _SPECS[cls] = spec
    return spec


def build_payload(cls: type[Event], raw: Any) -> Event:
    """Validate a raw payload mapping against ``cls`` and construct the event."""
    if not isinstance(raw, dict):
        raise DecodeError(f"{cls.TYPE}: payload is {type(raw).__name__}, expected a map")
    kwargs: dict[str, Any] = {}
    for name, check, tname, required, is_float in _spec(cls):
        if name not in raw:
            if required:
                raise DecodeError(f"{cls.TYPE}: missing field {name!r}")
            continue
        value = raw[name]
        if not check(value):
            raise DecodeError(f"{cls.TYPE}.{name}: expected {tname}, got {type(value).__name__}")
        kwargs[name] = float(value) if is_float else value
    return cls(**kwargs)


_ENVELOPE_KEYS: tuple[tuple[str, Checker, str], ...] = (
    ("event_id", lambda v: isinstance(v, str) and 0 < len(v) <= 128, "non-empty str"),
    ("type", lambda v: isinstance(v, str), "str"),
    ("schema_version", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "int >= 1"),
    ("run_id", lambda v: isinstance(v, str), "str"),
    ("source", lambda v: isinstance(v, str) and len(v) <= 256, "str"),
    ("seq", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "int >= 0"),
    ("ts", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "float"),
    ("causation_id", lambda v: v is None or isinstance(v, str), "str | None"),
)

#: Upcasters: (type, from_version) -> function(raw payload) -> raw payload of from_version+1.
UPCASTERS: dict[tuple[str, int], Callable[[dict], dict]] = {}


def decode(frame: bytes, *, max_bytes: int = MAX_FRAME_BYTES) -> Envelope:
    """One msgpack frame -> a validated Envelope. Raises DecodeError naming the problem."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise DecodeError(f"frame is {type(frame).__name__}, expected bytes")
    if len(frame) > max_bytes:
        raise DecodeError(f"frame of {len(frame)} bytes exceeds the {max_bytes}-byte cap")
    try:
        raw = msgpack.unpackb(
            frame,
            ext_hook=_ext_hook,
            raw=False,
            strict_map_key=True,
        )
    except DecodeError:
        raise
    except Exception as e:  # msgpack raises many types: ExtraData, FormatError, ValueError, ...
        raise DecodeError(f"not a msgpack frame: {type(e).__name__}: {e}") from None
    if not isinstance(raw, dict):
        raise DecodeError(f"frame is a msgpack {type(raw).__name__}, expected a map")
    for key, check, tname in _ENVELOPE_KEYS:
        if key not in raw:
            raise DecodeError(f"envelope: missing {key!r}")
        if not check(raw[key]):
            raise DecodeError(f"envelope.{key}: expected {tname}, got {raw[key]!r:.80}")
    cls = REGISTRY.get(raw["type"])
    if cls is None:
        raise DecodeError(f"unknown event type {raw['type']!r:.80}")
    payload = raw.get("payload")
    version = raw["schema_version"]
    if version > cls.VERSION:
        raise DecodeError(f"{cls.TYPE}: schema_version {version} is newer than this reckon's {cls.VERSION}")
    while version < cls.VERSION:
        up = UPCASTERS.get((cls.TYPE, version))
        if up is None:
            raise DecodeError(f"{cls.TYPE}: no upcaster from schema_version {version}")
        payload = up(payload)
        version += 1
    event = build_payload(cls, payload)
    return Envelope(
        event_id=raw["event_id"],
        type=cls.TYPE,
        schema_version=cls.VERSION,
        run_id=raw["run_id"],
        source=raw["source"],
        seq=raw["seq"],
        ts=float(raw["ts"]),
        causation_id=raw["causation_id"],
        payload=event,
    )


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
