"""The result of one sandboxed call, and the text the model sees for it."""

from __future__ import annotations

import dataclasses
import signal as _signal
from typing import Literal

Status = Literal["ok", "error", "timeout", "memory", "output_limit", "killed"]
STATUSES: tuple[str, ...] = ("ok", "error", "timeout", "memory", "output_limit", "killed")


@dataclasses.dataclass(frozen=True, slots=True)
class ExecResult:
    """Outcome of one call.

    status: ok (exit 0) | error (non-zero exit, e.g. an exception) | timeout (wall clock or
    CPU limit) | memory (MemoryError under the address-space limit) | output_limit (a stream
    exceeded max_output_bytes; the kept prefix is returned) | killed (ended by a signal it
    did not get from the limits, e.g. a segfault, or the sandbox itself failed).
    exit_code is None when the process died from a signal; signal is then its number.
    """

    status: Status
    stdout: str
    stderr: str
    exit_code: int | None
    signal: int | None
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ExecResult":
        """Build from a result dict; extra keys are ignored, missing ones raise KeyError."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


def _reason(result: ExecResult) -> str:
    if result.status == "error":
        return f"error (exit code {result.exit_code})"
    if result.status == "killed" and result.signal is not None:
        try:
            return f"killed by {_signal.Signals(result.signal).name}"
        except ValueError:
            return f"killed by signal {result.signal}"
    return result.status


def truncate_text(text: str, max_chars: int, side: str = "middle") -> str:
    """Shorten ``text`` to ``max_chars`` characters the way verl/rStar2-Agent do.

    side "left" keeps the head, "right" keeps the tail, "middle" keeps both halves; the cut
    is marked with "(truncated)". Raises ValueError for another ``side``.
    """
    if side not in ("left", "right", "middle"):
        raise ValueError(f"truncate side must be 'left', 'right' or 'middle', got {side!r}")
    if len(text) <= max_chars:
        return text
    if side == "left":
        return text[:max_chars] + "...(truncated)"
    if side == "right":
        return "(truncated)..." + text[-max_chars:]
    half = max_chars // 2
    return text[:half] + "...(truncated)..." + (text[-half:] if half else "")


def format_for_model(result: ExecResult, max_chars: int = 2048, side: str = "middle") -> str:
    """The tool response text, following the rStar2-Agent release (code_judge_utils.py).

    Success: "Tool call success", then "stdout: ..." / "stderr: ..." when non-empty, then
    "execution time: 0.12s". Failure: "Tool call failure", "reason: <status detail>", the
    same streams and time. The whole text is then cut to ``max_chars`` as the release's
    agent loop does (verl's max_tool_response_length / tool_response_truncate_side).
    """
    parts = ["Tool call success"] if result.ok else ["Tool call failure", f"reason: {_reason(result)}"]
    if result.stdout:
        parts.append(f"stdout: {result.stdout}")
    if result.stderr:
        parts.append(f"stderr: {result.stderr}")
    parts.append(f"execution time: {result.duration_s:.2f}s")
    return truncate_text("\n".join(parts), max_chars, side)
