"""Envelope <-> ``events`` row: what goes into the ``payload`` JSON and what into ``blob``.

``payload`` holds every non-array field as JSON, so SQL can query it. Each array field
(token ids, logprobs, masks) appears there only as a placeholder ``{"array": "int32",
"len": N}``; its data lives in ``blob``. ``blob`` is one msgpack map ``{field: value}``
using the wire codec's array encoding (ext type 1: int32 little-endian, ext type 2:
float32 little-endian), and it also carries, exactly, any field JSON cannot represent
(NaN or infinite floats, strings containing NUL, which PostgreSQL JSONB refuses); the
JSON column then holds a sanitized copy (non-finite -> null, NUL -> U+FFFD). On read,
``blob`` entries override ``payload`` entries, so decoding restores the event exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import msgspec
import numpy as np

from protocol.codec import EXT_F32, EXT_I32, UPCASTERS, DecodeError, build_payload
from protocol.events import REGISTRY, Envelope

_LE_I32 = np.dtype("<i4")
_LE_F32 = np.dtype("<f4")


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in an event payload")


# msgspec: C-speed JSON and msgpack (the append path serializes ~20 KB per trajectory).
# Its JSON encoder writes NaN/inf as null, which is why lossy values are found first.
_json = msgspec.json.Encoder(enc_hook=_enc_hook)
_msgpack = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
#: Field names per event class (dataclasses.fields() is slow on the hot path).
_FIELDS: dict[type, tuple[str, ...]] = {}


def _array_ext(value: np.ndarray) -> msgspec.msgpack.Ext:
    """An array as the wire's ext type (1: int32 little-endian, 2: float32 little-endian)."""
    if value.dtype.kind in "iub":
        code, dtype = EXT_I32, _LE_I32
    elif value.dtype.kind == "f":
        code, dtype = EXT_F32, _LE_F32
    else:
        raise TypeError(f"cannot store an array of dtype {value.dtype}")
    # A byte view of the (usually already int32/float32 little-endian) array: no copy.
    return msgspec.msgpack.Ext(code, memoryview(np.ascontiguousarray(value, dtype=dtype)).cast("B"))


def _unpack_ext(code: int, data: memoryview) -> Any:
    if code not in (EXT_I32, EXT_F32) or len(data) % 4:
        raise DecodeError(f"blob holds a bad array (ext type {code}, {len(data)} bytes)")
    dtype = (_LE_I32, np.int32) if code == EXT_I32 else (_LE_F32, np.float32)
    return np.frombuffer(data, dtype=dtype[0]).astype(dtype[1])  # a writable native-order copy


_unpack = msgspec.msgpack.Decoder(ext_hook=_unpack_ext)


def _is_exact(value: Any) -> bool:
    """True when JSON (and PostgreSQL JSONB) stores ``value`` without loss."""
    if isinstance(value, str):
        return "\x00" not in value
    if isinstance(value, (float, np.floating)):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_is_exact(k) and _is_exact(v) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_is_exact(v) for v in value)
    return True


def _sanitize(value: Any) -> Any:
    """A JSON-safe stand-in for a lossy value (for querying; the exact value is in blob)."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_sanitize(k): _sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_sanitize(v) for v in value]
    return value


def envelope_to_row(env: Envelope) -> dict[str, Any]:
    """The ``events`` row for ``env`` (without ``position``, which the append assigns).

    Raises TypeError/ValueError when the payload holds something not storable (the caller
    turns it into a LogWriteError naming the event).
    """
    event = env.payload
    names = _FIELDS.get(type(event))
    if names is None:
        names = _FIELDS[type(event)] = tuple(f.name for f in dataclasses.fields(event))  # type: ignore[arg-type]
    doc: dict[str, Any] = {}
    exact: dict[str, Any] = {}  # goes to blob
    for name in names:
        value = getattr(event, name)
        if isinstance(value, np.ndarray):
            if value.ndim != 1:
                raise ValueError(f"{env.type}.{name}: arrays must be 1-D, got shape {value.shape}")
            exact[name] = _array_ext(value)
            doc[name] = {"array": "int32" if value.dtype.kind in "iub" else "float32", "len": int(value.shape[0])}
        elif _is_exact(value):
            doc[name] = value
        else:
            exact[name] = value
            doc[name] = _sanitize(value)
    try:
        text = _json.encode(doc).decode()
        blob = _msgpack.encode(exact) if exact else None
    except msgspec.EncodeError as e:
        raise ValueError(str(e)) from e
    return {
        "event_id": env.event_id,
        "run_id": env.run_id,
        "type": env.type,
        "stream_id": env.stream_id,
        "source": env.source,
        "seq": env.seq,
        "ts": env.ts,
        "schema_version": env.schema_version,
        "causation_id": env.causation_id,
        "payload": text,
        "blob": blob,
    }


def row_to_envelope(row: Any) -> Envelope:
    """Decode one ``events`` row (a mapping or Row with the table's columns).

    Old schema versions are upcast with the codec's upcasters. Raises DecodeError (or
    ValueError for bad JSON/msgpack) describing what is wrong; the caller names the row.
    """
    raw = row.payload
    if isinstance(raw, (str, bytes)):  # SQLite returns text; psycopg parses JSONB itself
        raw = msgspec.json.decode(raw)
    if not isinstance(raw, dict):
        raise DecodeError(f"payload is JSON {type(raw).__name__}, expected an object")
    if row.blob is not None:
        extra = _unpack.decode(row.blob)
        if not isinstance(extra, dict):
            raise DecodeError(f"blob is a msgpack {type(extra).__name__}, expected a map")
        raw.update(extra)
    cls = REGISTRY.get(row.type)
    if cls is None:
        raise DecodeError(f"unknown event type {row.type!r}")
    version = row.schema_version
    if version > cls.VERSION:
        raise DecodeError(f"schema_version {version} is newer than this reckon's {cls.VERSION}")
    while version < cls.VERSION:
        up = UPCASTERS.get((cls.TYPE, version))
        if up is None:
            raise DecodeError(f"no upcaster for {cls.TYPE} from schema_version {version}")
        raw = up(raw)
        version += 1
    return Envelope(
        event_id=row.event_id,
        type=cls.TYPE,
        schema_version=cls.VERSION,
        run_id=row.run_id,
        source=row.source,
        seq=row.seq,
        ts=float(row.ts),
        causation_id=row.causation_id,
        payload=build_payload(cls, raw),
    )
