"""Rollout dispatch policies: which generator gets which rollout, and when (DESIGN §8).

Pure code, no sockets and no clock: the scheduler actor and the simulator
(:mod:`actors.simulator`) drive the same objects. The caller reports what it knows —
each engine's last :class:`EngineState` (from ``CapacityReported``), the FIFO list of rollouts
waiting to start, the tool executors' queue depth — and :meth:`DispatchPolicy.assign` answers
with ``(rollout_id, engine)`` pairs to send now. The caller tells the policy when a rollout
finishes (:meth:`~DispatchPolicy.on_finished`) and, when it knows, how far one has got
(:meth:`~DispatchPolicy.on_progress`).

Two policies:

* :class:`DynamicPolicy` (the default) sends a rollout only to an engine whose KV cache can
  hold it with room to grow, and tops every engine up to ``kv_target`` while work remains.
  An engine's commitment is the larger of two views:

  - *reported*: KV tokens in use now (``total - free``) plus ``growth_tokens`` for each
    rollout it holds (the next stretch of decoding before the policy can react), plus the
    ledger's mean charge for each rollout sent since the report (held beyond ``running``);
  - *ledger*: for each rollout the policy sent there, ``prompt + max(progress + growth_tokens,
    expected_response)``, capped at ``prompt + max_tokens``. A young rollout is charged its
    expected final length, which keeps a batch started all at once from outgrowing the cache;
    an old one is charged what it holds plus the growth margin.

  The expected response length starts at ``expected_response_tokens`` (default: half the
  rollout's ``max_tokens``) and follows the mean of finished responses when that is larger.
  The reported view catches what the ledger cannot see (progress nobody reported, tool output
  tokens); the ledger covers rollouts sent since the engine's last report. While the tool
  executors report more than ``max_tool_queue`` waiting calls, nothing new starts (sandbox
  backpressure: new rollouts would only add tool calls to the queue).

* :class:`StaticPolicy` is what the public ports do: every pending rollout is split evenly over
  the engines up front, whatever their KV cache holds; an engine that then runs out of KV must
  evict (SGLang evicts half its running sequences and recomputes them later).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field


class DispatchConfig(BaseModel):
    """Settings of the rollout dispatch policy (embedded in the run config)."""

    model_config = ConfigDict(extra="forbid")

    policy: Literal["dynamic", "static"] = "dynamic"  # KV-aware dispatch, or N per engine up front
    kv_target: float = Field(0.95, gt=0.0, le=1.0)  # fraction of each engine's KV cache to commit
    growth_tokens: int = Field(512, ge=0)  # per running rollout: KV kept free for its next tokens
    expected_response_tokens: int | None = Field(None, ge=1)  # prior mean response length; None: max_tokens / 2
    peak_fraction: float = Field(0.7, gt=0.0, le=1.0)  # a young rollout is charged this x expected response
    max_tool_queue: int = Field(256, ge=0)  # start nothing while more tool calls than this wait


@dataclass(frozen=True, slots=True)
class EngineState:
    """One generator engine as it last reported itself (``CapacityReported``)."""

    name: str
    total_tokens: int  # KV-cache capacity in tokens
    free_tokens: int  # KV-cache tokens free now
    total_slots: int  # most sequences the engine runs at once
    free_slots: int
    running: int  # sequences holding KV (decoding or waiting on a tool)


@dataclass(frozen=True, slots=True)
class PendingRollout:
    """A rollout waiting to start."""

    rollout_id: str
    prompt_tokens: int
    max_tokens: int  # response budget (model + tool tokens)


class DispatchPolicy(Protocol):
    """What the scheduler and the simulator call. Implementations keep their own bookkeeping."""

    def assign(
        self, pending: list[PendingRollout], engines: list[EngineState], *, tool_queue: int = 0
    ) -> list[tuple[str, str]]:
        """Rollouts to start now, in ``pending`` order, as ``(rollout_id, engine name)``."""
        ...

    def on_progress(self, rollout_id: str, response_tokens: int) -> None:
        """The rollout now holds ``response_tokens`` response tokens (optional information)."""
        ...

    def on_finished(self, rollout_id: str, response_tokens: int | None = None) -> None:
        """The rollout ended (completed, aborted or lost); its KV is free again."""
        ...


@dataclass(slots=True)
class _Held:
    engine: str
    prompt: int
    max_tokens: int
    progress: int = 0
    reserved: float = 0.0  # this rollout's share of the engine's ledger sum


class DynamicPolicy:
    """KV-aware dispatch: fill every engine up to ``kv_target`` of its cache, never beyond.

    ``assign`` is greedy and FIFO: the head of ``pending`` goes to the engine with the most
    uncommitted KV, and dispatch stops at the first rollout that no engine can take (later
    rollouts would only overtake earlier ones of the same step). Only engines in ``engines``
    receive work (the others have not reported yet, or are gone).

    The ledger is kept as running sums per engine, so ``assign`` costs O(engines + assigned),
    not O(rollouts held); the sums are rebuilt only when the expected response length rises
    by more than 2 %.
    """

    def __init__(self, config: DispatchConfig | None = None) -> None:
        self.config = config or DispatchConfig()
        self._held: dict[str, _Held] = {}
        self._count: dict[str, int] = {}
        self._ledger: dict[str, float] = {}
        self._finished_tokens = 0
        self._finished_count = 0
        self._observed_mean = 0.0  # the finished-response mean the ledger was last built with

    # ---------------------------------------------------------------- bookkeeping

    def expected_response(self, max_tokens: int) -> float:
        """Expected response length of a rollout: the prior, or the observed mean if larger.

        Finished responses are biased short while a step is still running (the long ones are
        still going), so the observed mean can only raise the prior, never lower it.
        """
        prior = self.config.expected_response_tokens or max_tokens / 2
        return min(max(prior, self._observed_mean), max_tokens)

    def _reservation(self, h: _Held) -> float:
        expected_peak = self.config.peak_fraction * self.expected_response(h.max_tokens)
        grow = max(h.progress + self.config.growth_tokens, expected_peak)
        return h.prompt + min(grow, h.max_tokens)

    def _update(self, h: _Held) -> None:
        new = self._reservation(h)
        self._ledger[h.engine] += new - h.reserved
        h.reserved = new

    def held(self, engine: str) -> int:
        """How many rollouts the policy has sent to ``engine`` that have not finished."""
        return self._count.get(engine, 0)

    def committed(self, engine: EngineState) -> float:
        """KV tokens of ``engine`` already spoken for (the larger of the two views)."""
        used = engine.total_tokens - engine.free_tokens
        held = self.held(engine.name)
        ledger = self._ledger.get(engine.name, 0.0)
        # Rollouts sent since the report are not in ``used`` yet: charge them the mean ledger share.
        unreported = max(0, held - engine.running) * (ledger / held if held else 0.0)
        reported = used + unreported + self.config.growth_tokens * engine.running
        return max(ledger, reported)

    # ---------------------------------------------------------------- the policy

    def assign(
        self, pending: list[PendingRollout], engines: list[EngineState], *, tool_queue: int = 0
    ) -> list[tuple[str, str]]:
        if not pending or not engines or tool_queue > self.config.max_tool_queue:
            return []
        # Max-heap on uncommitted KV; slots bound the count independently of tokens.
        heap: list[tuple[float, str]] = []
        slots: dict[str, int] = {}
        for e in engines:
            free_slots = min(e.free_slots, e.total_slots - self.held(e.name))
            room = self.config.kv_target * e.total_tokens - self.committed(e)
            if free_slots > 0 and room > 0:
                heap.append((-room, e.name))
                slots[e.name] = free_slots
        heapq.heapify(heap)
        out: list[tuple[str, str]] = []
        for p in pending:
            if not heap:
                break
            if p.rollout_id in self._held:
                raise ValueError(f"rollout {p.rollout_id!r} is already running on {self._held[p.rollout_id].engine}")
            neg_room, name = heap[0]
            h = _Held(name, p.prompt_tokens, p.max_tokens)
            need = self._reservation(h)
            if need > -neg_room:
                break
            self._held[p.rollout_id] = h
            self._count[name] = self._count.get(name, 0) + 1
            self._ledger.setdefault(name, 0.0)
            self._update(h)
            out.append((p.rollout_id, name))
            slots[name] -= 1
            if slots[name] > 0 and -neg_room - need > 0:
                heapq.heapreplace(heap, (neg_room + need, name))
            else:
                heapq.heappop(heap)
        return out

    def on_progress(self, rollout_id: str, response_tokens: int) -> None:
        if (h := self._held.get(rollout_id)) is not None and response_tokens > h.progress:
            h.progress = response_tokens
            self._update(h)

    def on_finished(self, rollout_id: str, response_tokens: int | None = None) -> None:
        h = self._held.pop(rollout_id, None)
        if h is not None:
            self._count[h.engine] -= 1
            self._ledger[h.engine] -= h.reserved
        if response_tokens is not None:
            self._finished_tokens += response_tokens
            self._finished_count += 1
            mean = self._finished_tokens / self._finished_count
            if mean > 1.02 * self._observed_mean:
                self._observed_mean = mean
                for held in self._held.values():
                    self._update(held)


class StaticPolicy:
    """N rollouts per engine up front: pending work is split evenly by count, KV ignored.

    Each call hands out everything pending, each rollout to the engine holding the fewest
    (ties by name order), so a step's 2G×prompts rollouts land as ⌈n/engines⌉ per engine. The
    engines queue what they cannot run and evict when their KV overflows.
    """

    def __init__(self, config: DispatchConfig | None = None) -> None:
        self.config = config or DispatchConfig(policy="static")
        self._held: dict[str, str] = {}
        self._count: dict[str, int] = {}

    def assign(
        self, pending: list[PendingRollout], engines: list[EngineState], *, tool_queue: int = 0
    ) -> list[tuple[str, str]]:
        if not engines:
            return []
        heap = [(self._count.get(e.name, 0), i, e.name) for i, e in enumerate(engines)]
        heapq.heapify(heap)
        out = []
        for p in pending:
            n, i, name = heap[0]
            self._held[p.rollout_id] = name
            out.append((p.rollout_id, name))
            self._count[name] = n + 1
            heapq.heapreplace(heap, (n + 1, i, name))
        return out

    def on_progress(self, rollout_id: str, response_tokens: int) -> None:
        return None

    def on_finished(self, rollout_id: str, response_tokens: int | None = None) -> None:
        name = self._held.pop(rollout_id, None)
        if name is not None:
            self._count[name] -= 1


def make_policy(config: DispatchConfig) -> DispatchPolicy:
    """The policy named by ``config.policy``."""
    return DynamicPolicy(config) if config.policy == "dynamic" else StaticPolicy(config)


__all__ = ["DispatchConfig", "EngineState", "PendingRollout", "DispatchPolicy", "DynamicPolicy", "StaticPolicy", "make_policy"]
