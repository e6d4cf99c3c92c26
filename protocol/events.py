"""Typed events: the vocabulary every reckon actor speaks (docs/protocol.md is the spec).

An event is a frozen dataclass. Its class attributes say what it is on the wire:
``TYPE`` (the wire name), ``VERSION`` (schema version of its payload) and ``STREAM``
(the payload field whose value groups related events into one stream in the log:
a trajectory, a group, a step). An :class:`Envelope` carries one event with its
identity, origin and causation.

Large numeric arrays (token ids, logprobs, masks) are numpy arrays annotated as
:data:`I32` or :data:`F32`; the codec sends them as little-endian binary.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

import msgspec
import numpy as np

#: int32 array (token ids, masks, versions); sent as msgpack ext type 1.
I32 = Annotated[np.ndarray, "int32"]
#: float32 array (logprobs, advantages); sent as msgpack ext type 2.
F32 = Annotated[np.ndarray, "float32"]

REGISTRY: dict[str, type[Event]] = {}


class Event:
    """Base of every payload. Subclasses are frozen dataclasses registered by TYPE."""

    TYPE: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    STREAM: ClassVar[str | None] = None

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.TYPE:
            prior = REGISTRY.get(cls.TYPE)
            # dataclass(slots=True) re-creates the class: the same name may register again.
            if prior is not None and prior.__qualname__ != cls.__qualname__:
                raise TypeError(f"event type {cls.TYPE!r} registered twice")
            REGISTRY[cls.TYPE] = cls

    def stream_id(self) -> str | None:
        return None if self.STREAM is None else str(getattr(self, self.STREAM))


_ID_PREFIX = os.urandom(6).hex()
_id_counter = itertools.count()


def _reseed_ids() -> None:  # a forked child must not repeat its parent's ids
    global _ID_PREFIX, _id_counter
    _ID_PREFIX, _id_counter = os.urandom(6).hex(), itertools.count()


os.register_at_fork(after_in_child=_reseed_ids)


def new_event_id() -> str:
    """A time-ordered unique id: 48-bit ms timestamp, 48 random bits fixed per process,
    32-bit counter (hex, 32 chars; UUIDv7-like ordering, no syscall per id)."""
    return f"{time.time_ns() // 1_000_000:012x}{_ID_PREFIX}{next(_id_counter) & 0xFFFFFFFF:08x}"


class Envelope(msgspec.Struct, frozen=True):
    """One event on the wire or in the log, with who sent it and why.

    A msgspec Struct (immutable, C-speed construction); it encodes field for field as the
    frame's envelope map.
    """

    event_id: str
    type: str
    schema_version: int
    run_id: str
    source: str  # actor instance name, e.g. "generator-0"
    seq: int  # per source, gap-free from 0
    ts: float  # unix seconds at emission
    causation_id: str | None  # the event that caused this one
    payload: Event

    @property
    def stream_id(self) -> str | None:
        return self.payload.stream_id()

    def replace(self, **changes: Any) -> Envelope:
        return msgspec.structs.replace(self, **changes)


# --------------------------------------------------------------------------- run control


@dataclass(frozen=True, slots=True)
class RunStarted(Event):
    TYPE = "RunStarted"
    config: dict  # the resolved run config (pydantic model dump)
    run_dir: str
    version: str  # reckon version


@dataclass(frozen=True, slots=True)
class StageStarted(Event):
    TYPE = "StageStarted"
    STREAM = "stage"
    stage: str  # stage name from the config ("sft", "rl1", ...)
    index: int  # 0-based position in the recipe
    kind: str  # "sft" | "rl"
    steps: int
    max_tokens: int  # token budget per trajectory (model + tool tokens)
    max_turns: int
    prompts_per_step: int
    rollouts_per_prompt: int  # 2G: oversampled
    group_size: int  # G: kept after RoC down-sampling
    lr: float
    optimizer_reset: bool
    n_problems: int  # problems available to this stage (after the hard-problem filter)


@dataclass(frozen=True, slots=True)
class RunCompleted(Event):
    TYPE = "RunCompleted"
    steps: int
    seconds: float
    status: str  # "ok" | "interrupted" | "failed"


# --------------------------------------------------------------------------- rollouts


@dataclass(frozen=True, slots=True)
class RolloutRequested(Event):
    """Scheduler -> one generator: produce one trajectory for a problem."""

    TYPE = "RolloutRequested"
    STREAM = "rollout_id"
    rollout_id: str
    group_id: str
    step: int
    stage: str
    problem_id: str
    problem: str  # the user message
    answer: str  # gold answer; carried through for the verifier, never shown to the model
    generator: str  # the generator instance chosen by the dispatch policy
    max_tokens: int
    max_turns: int
    temperature: float
    min_version: int = 0  # staleness bound: oldest weights version allowed to start it


@dataclass(frozen=True, slots=True)
class ToolCallRequested(Event):
    TYPE = "ToolCallRequested"
    STREAM = "rollout_id"
    call_id: str
    rollout_id: str
    turn: int
    code: str
    executor: str  # the tool executor chosen by credit-based dispatch
    reply_to: str  # the generator waiting on it
    timeout_s: float


@dataclass(frozen=True, slots=True)
class ToolCallCompleted(Event):
    TYPE = "ToolCallCompleted"
    STREAM = "rollout_id"
    call_id: str
    rollout_id: str
    status: str  # ok | error | timeout | memory | output_limit | killed | parse_error
    stdout: str
    stderr: str
    exit_code: int | None
    signal: int | None
    duration_s: float
    text: str  # what the model sees (success/failure, stdout, stderr; truncated)


@dataclass(frozen=True, slots=True)
class TrajectoryCompleted(Event):
    """Generator -> verifier and scheduler: one finished multi-turn rollout."""

    TYPE = "TrajectoryCompleted"
    STREAM = "rollout_id"
    rollout_id: str
    group_id: str
    step: int
    stage: str
    problem_id: str
    answer: str  # gold, passed through from RolloutRequested
    generator: str
    prompt_ids: I32  # (P,)
    response_ids: I32  # (R,) model and tool tokens interleaved
    logprobs: F32  # (R,) sampled-token logprob; 0 on tool tokens
    loss_mask: I32  # (R,) 1 on model tokens, 0 on tool-response tokens
    versions: I32  # (R,) weights version that produced each token; -1 on tool tokens
    response_text: str
    turns: int
    tool_calls: list  # [{"call_id", "status"}] in order
    finish_reason: str  # stop | length | turns | aborted
    seconds: float


@dataclass(frozen=True, slots=True)
class RewardAssigned(Event):
    TYPE = "RewardAssigned"
    STREAM = "rollout_id"
    rollout_id: str
    group_id: str
    step: int
    stage: str  # copied from the trajectory ("eval" for evaluation rollouts)
    reward: float  # 1.0 correct, 0.0 otherwise (outcome only)
    correct: bool
    extracted: str | None  # the answer taken from the response
    gold: str
    method: str  # which check decided: exact | math_verify | normalized | mismatch | no_answer | too_large | timeout | error | crashed
    seconds: float
    answer_tags: int  # number of <answer> tags (RoC p_format)
    turns: int


@dataclass(frozen=True, slots=True)
class GroupResampled(Event):
    """Scheduler: a completed group of 2G was down-sampled (RoC) to G, or dropped."""

    TYPE = "GroupResampled"
    STREAM = "group_id"
    group_id: str
    step: int
    mode: str  # roc-paper | roc-release | none
    kept: list  # rollout ids kept for training
    dropped: list  # rollout ids not used
    penalties: dict  # rollout_id -> p_total for positives
    rewards: dict  # rollout_id -> reward
    advantages: dict  # rollout_id -> advantage over the kept group
    reason: str  # "resampled" | "all_equal"


@dataclass(frozen=True, slots=True)
class BatchFormed(Event):
    """Scheduler -> learner: everything one optimizer step needs, packed.

    Sequence i occupies ``input_ids[offsets[i]:offsets[i+1]]``; its first
    ``prompt_lens[i]`` tokens are the prompt. ``loss_mask``/``old_logprobs`` are aligned
    with ``input_ids`` (0 on prompt tokens).
    """

    TYPE = "BatchFormed"
    STREAM = "step"
    step: int
    stage: str
    kind: str  # "rl" | "sft"
    rollout_ids: list  # (B,)
    offsets: I32  # (B+1,)
    prompt_lens: I32  # (B,)
    input_ids: I32  # (N,)
    loss_mask: I32  # (N,)
    old_logprobs: F32  # (N,) generator's logprobs (0 where masked)
    advantages: F32  # (B,)
    lr: float
    optimizer_reset: bool


@dataclass(frozen=True, slots=True)
class TrainStepCompleted(Event):
    TYPE = "TrainStepCompleted"
    STREAM = "step"
    step: int
    stage: str
    kind: str
    loss: float
    metrics: dict  # namespaced: loss/…, perf/…, actor/…
    n_sequences: int
    n_tokens: int
    seconds: float
    weights_version: int


@dataclass(frozen=True, slots=True)
class WeightsPublished(Event):
    TYPE = "WeightsPublished"
    STREAM = "version"
    version: int
    step: int
    path: str  # a Hugging Face model directory
    sha256: str  # of the safetensors weights


@dataclass(frozen=True, slots=True)
class EvalCompleted(Event):
    """avg pass@1 over k samples per problem of one held-out dataset (scheduler, or ``reckon eval``)."""

    TYPE = "EvalCompleted"
    STREAM = "dataset"
    dataset: str
    step: int
    weights_version: int
    k: int
    temperature: float
    pass_at_1: float
    n_problems: int
    mean_response_tokens: float  # model tokens per sample (tool-response tokens excluded)
    mean_tool_calls: float  # per sample
    tool_error_rate: float | None = None  # failed tool calls / tool calls (None: no call, or not measured)
    max_tokens: int = 0  # token budget per sample (0: not recorded)
    max_turns: int = 0  # turn budget per sample (0: not recorded)
    model: str = ""  # the model directory evaluated (reckon eval); empty: the run's current weights


# --------------------------------------------------------------------------- actors


@dataclass(frozen=True, slots=True)
class CapacityReported(Event):
    """Free capacity of a generator (KV tokens, sequences) or tool executor (slots)."""

    TYPE = "CapacityReported"
    kind: str  # "generator" | "tool_executor"
    free_tokens: int  # free KV-cache tokens (0 for tool executors)
    total_tokens: int
    free_slots: int  # sequences (generator) or sandbox slots (tool executor) free
    total_slots: int
    running: int
    queued: int
    busy_s: float = 0.0  # cumulative seconds with running > 0 (utilization)


@dataclass(frozen=True, slots=True)
class Heartbeat(Event):
    TYPE = "Heartbeat"
    uptime_s: float
    state: str


@dataclass(frozen=True, slots=True)
class ActorStarted(Event):
    TYPE = "ActorStarted"
    role: str
    pid: int
    address: str


@dataclass(frozen=True, slots=True)
class ActorStopped(Event):
    TYPE = "ActorStopped"
    role: str
    reason: str


@dataclass(frozen=True, slots=True)
class ActorError(Event):
    TYPE = "ActorError"
    role: str
    error_type: str
    message: str
    traceback: str
    fatal: bool = True


@dataclass(frozen=True, slots=True)
class WorkReissued(Event):
    """Work whose actor died before finishing it, taken up again (supervision)."""

    TYPE = "WorkReissued"
    STREAM = "work_id"
    kind: str  # rollout | tool_call | verification | train_step
    work_id: str  # rollout_id, call_id, rollout_id, or the step number
    request_id: str  # event_id of the request (resent by its requester, or forwarded again)
    holder: str  # the actor instance that takes the work up (a restarted incarnation)
    reason: str  # "restarted" (the request reached the restarted actor) | "deadline" (re-sent by its requester)


def event_fields(cls: type[Event]) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls)  # type: ignore[arg-type]


__all__ = [name for name, obj in list(globals().items()) if isinstance(obj, type) and issubclass(obj, Event)] + [
    "Envelope",
    "I32",
    "F32",
    "REGISTRY",
    "new_event_id",
    "event_fields",
    "field",
]
