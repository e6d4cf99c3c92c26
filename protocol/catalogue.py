"""Render the event catalogue (docs/events.md) from protocol/events.py.

    python -m protocol.catalogue > docs/events.md

The field comments in events.py are the documentation; a test keeps docs/events.md equal
to this output, so the catalogue never drifts from the code.
"""

from __future__ import annotations

import inspect
import re
import typing

from protocol.events import REGISTRY

_FIELD = re.compile(r"^\s+(\w+): ([^=#]+?)(?:\s*=\s*[^#]+?)?\s*(?:#\s*(.*))?$")


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Annotated:
        return f"{typing.get_args(tp)[1]}[]"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "nil").replace("typing.", "")


def render() -> str:
    out = [
        "# Event catalogue",
        "",
        "Generated from `protocol/events.py` by `python -m protocol.catalogue`; the envelope and",
        "encoding are in [protocol.md](protocol.md). `int32[]`/`float32[]` are binary arrays",
        "(ext types 1 and 2). **stream** is the payload field the log files the event under",
        "(`events.stream_id`).",
        "",
    ]
    for name, cls in sorted(REGISTRY.items(), key=lambda kv: inspect.getsourcelines(kv[1])[1]):
        doc = inspect.getdoc(cls) or ""
        hints = typing.get_type_hints(cls, include_extras=True)
        comments = {}
        for line in inspect.getsource(cls).splitlines():
            m = _FIELD.match(line)
            if m and m.group(1) in hints:
                comments[m.group(1)] = (m.group(3) or "").strip()
        out.append(f"## {name} (v{cls.VERSION})")
        out.append("")
        if doc and not doc.startswith(f"{name}("):
            out += [doc, ""]
        if cls.STREAM:
            out += [f"stream: `{cls.STREAM}`", ""]
        out += ["| field | type | meaning |", "|---|---|---|"]
        for f in cls.__dataclass_fields__.values():
            t = _type_name(hints[f.name])
            if typing.get_origin(hints[f.name]) in (typing.Union, getattr(__import__("types"), "UnionType")):
                t = " or ".join(_type_name(a) for a in typing.get_args(hints[f.name]))
            meaning = comments.get(f.name, "").replace("|", r"\|")
            out.append(f"| `{f.name}` | {t} | {meaning} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
