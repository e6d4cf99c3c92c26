"""One multi-turn tool-use rollout on an engine: the generator's inner loop, free of sockets.

The model writes until ``</tool_call>`` (or EOS); the call is parsed and handed to
``call_tool`` (the generator actor sends ToolCallRequested and awaits the completion); the
tool response is appended as token ids of :func:`training.chat.tool_response_suffix`,
loss-masked, and generation continues from the token ids. History is never re-tokenized:
each turn's prompt is the previous prompt ids plus the new ids. While one rollout awaits
its tool, the engine keeps decoding every other rollout; run many of these concurrently
on one engine (e.g. one trio task each).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from actors.engines import Engine, SamplingSpec
from training.chat import TOOL_CALL_END, ToolCallParseError, encode_text, parse_tool_call, tool_response_suffix

#: call_tool(code, turn) -> (status, text): status as the sandbox reports it (ok, error,
#: timeout, ...), text what the model sees inside <tool_response>.
CallTool = Callable[[str, int], Awaitable[tuple[str, str]]]


@dataclass(frozen=True, slots=True)
class RolloutSpec:
    """One rollout request. ``max_tokens`` is ONE budget for model and tool-response tokens."""

    request_id: str  # also the engine request id of every turn (turns run one after another)
    prompt_ids: list[int]
    max_tokens: int
    max_turns: int  # most assistant turns (generate calls)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None  # turn t samples with seed + t

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.max_turns < 1:
            raise ValueError(f"rollout {self.request_id!r}: max_tokens and max_turns must be >= 1, got {self.max_tokens}, {self.max_turns}")


@dataclass(slots=True)
class Trajectory:
    """A finished rollout. Arrays are aligned with ``response_ids`` (R,).

    loss_mask 1 / logprob of the sampled token / version of the weights on model tokens;
    0 / 0.0 / -1 on tool-response tokens. finish_reason: stop (EOS), length (budget or
    model length), turns (turn limit reached with a tool call pending), aborted.
    """

    request_id: str
    prompt_ids: np.ndarray  # (P,) int32
    response_ids: np.ndarray  # (R,) int32
    logprobs: np.ndarray  # (R,) float32
    loss_mask: np.ndarray  # (R,) int32
    versions: np.ndarray  # (R,) int32
    response_text: str
    turns: int
    tool_calls: list[dict] = field(default_factory=list)  # [{"call_id", "status"}] in order
    finish_reason: str = "stop"
    seconds: float = 0.0

    @classmethod
    def empty(cls, request_id: str, prompt_ids: list[int], finish_reason: str) -> Trajectory:
        """A rollout that ended before its first token (e.g. aborted for new weights)."""
        none = np.zeros(0, np.int32)
        return cls(request_id, np.asarray(prompt_ids, np.int32), none, np.zeros(0, np.float32), none, none,
                   response_text="", turns=0, finish_reason=finish_reason)


def tool_call_id(request_id: str, turn: int) -> str:
    """The id of the tool call made at the end of ``turn`` (1-based) of ``request_id``."""
    return f"{request_id}/call{turn}"


async def run_trajectory(engine: Engine, tokenizer, spec: RolloutSpec, call_tool: CallTool) -> Trajectory:
    """Generate one multi-turn rollout for ``spec`` on ``engine``.

    ``tokenizer`` turns tool responses into ids (:func:`training.chat.encode_text`) and model turns into text
    (``decode``). A malformed tool call is answered with a tool response naming the parse
    error (status ``parse_error``) and the rollout continues. Errors from ``call_tool`` or
    the engine propagate; cancelling the calling task aborts the turn in flight.
    """
    t0 = time.monotonic()
    ids: list[int] = []
    lps: list[float] = []
    mask: list[int] = []
    vers: list[int] = []
    text: list[str] = []
    calls: list[dict] = []
    turns = 0
    finish = "length"
    while True:
        budget = spec.max_tokens - len(ids)
        if budget <= 0:
            finish = "length"
            break
        out = await engine.generate(
            spec.request_id,
            [*spec.prompt_ids, *ids],
            SamplingSpec(
                max_tokens=budget,
                temperature=spec.temperature,
                top_p=spec.top_p,
                top_k=spec.top_k,
                stop=(TOOL_CALL_END,),
                seed=None if spec.seed is None else spec.seed + turns,
            ),
        )
        turns += 1
        ids += out.token_ids
        lps += out.logprobs
        mask += [1] * len(out.token_ids)
        vers += out.versions
        turn_text = tokenizer.decode(out.token_ids, skip_special_tokens=False)
        text.append(turn_text)
        if out.finish_reason != "stop":  # eos, length, abort: the rollout ends here
            finish = {"eos": "stop", "length": "length", "abort": "aborted"}[out.finish_reason]
            break
        if turns >= spec.max_turns:
            finish = "turns"
            break
        call_id = tool_call_id(spec.request_id, turns)
        try:
            code = parse_tool_call(turn_text)
        except ToolCallParseError as e:
            status, reply = "parse_error", f"Error: {e}"
        else:
            status, reply = await call_tool(code, turns)
        calls.append({"call_id": call_id, "status": status})
        suffix = tool_response_suffix(reply)
        suffix_ids = encode_text(tokenizer, suffix)
        room = spec.max_tokens - len(ids)
        if len(suffix_ids) > room:  # the shared budget ends inside the tool response
            suffix_ids = suffix_ids[:room]
            suffix = tokenizer.decode(suffix_ids, skip_special_tokens=False)
        ids += suffix_ids
        lps += [0.0] * len(suffix_ids)
        mask += [0] * len(suffix_ids)
        vers += [-1] * len(suffix_ids)
        text.append(suffix)
    return Trajectory(
        request_id=spec.request_id,
        prompt_ids=np.asarray(spec.prompt_ids, dtype=np.int32),
        response_ids=np.asarray(ids, dtype=np.int32),
        logprobs=np.asarray(lps, dtype=np.float32),
        loss_mask=np.asarray(mask, dtype=np.int32),
        versions=np.asarray(vers, dtype=np.int32),
        response_text="".join(text),
        turns=turns,
        tool_calls=calls,
        finish_reason=finish,
        seconds=time.monotonic() - t0,
    )
