"""Rollout dispatch policies: which generator gets which rollout, and when (DESIGN §8).

Pure code, no sockets and no clock: the scheduler actor and the simulator
(:mod:`actors.simulator`) drive the same objects. The caller reports what it knows —
each engine's last :class:`EngineState` (from ``CapacityReported``), the FIFO list of rollouts
waiting to start, the tool executors' queue depth — and :meth:`DispatchPolicy.assign` answers
with ``(rollout_id, engine)`` pairs to send now. The caller tells the policy when a rollout
finishes (:meth:`~DispatchPolicy.on_finished`, with its response length when known) and,
when it knows, how far one has got (:meth:`~DispatchPolicy.on_progress`, e.g. at each tool
call).

Two policies:

* :class:`DynamicPolicy` (the default) admits a rollout to an engine only while the engine's
  *projected KV peak* stays under ``kv_target`` of its cache. The projection is the expected
  KV the engine's rollouts will hold at every future point (each rollout's context grows by
  one token per decoded token and vanishes when it ends), plus ``safety_sigmas`` standard
  deviations. Survival odds come from a :class:`LengthModel` learned online (Kaplan–Meier over
  finished responses and the progress of running ones, started from a uniform prior). Among
  the engines that can take a rollout it picks the one holding the fewest, in engine order —
  with unknown, identically distributed lengths an even split is the best placement there is,
  so where the KV cache does not bind the dynamic policy places exactly as the static one does.
* :class:`StaticPolicy` is what the public ports do: every pending rollout is split evenly over
  the engines up front, whatever their KV cache holds; an engine that then runs out of KV must
  evict (SGLang evicts half its running sequences and recomputes them later).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class DispatchConfig(BaseModel):
    """Settings of the rollout dispatch policy (embedded in the run config)."""

    model_config = ConfigDict(extra="forbid")

    policy: Literal["dynamic", "static"] = "dynamic"  # KV-aware dispatch, or N per engine up front
    kv_target: float = Field(0.95, gt=0.0, le=1.0)  # the projected KV peak may reach this fraction of the cache
    safety_sigmas: float = Field(3.0, ge=0.0)  # margin over the expected peak, in standard deviations
    prior_weight: float = Field(64.0, gt=0.0)  # pseudo-rollouts of the length prior (at least)
    prior_fraction: float = Field(0.05, ge=0.0)  # ... and at least this fraction of the rollouts seen
    prior_truncated: float = Field(0.1, ge=0.0, lt=1.0)  # the prior's share of responses cut at max_tokens
    history: int = Field(50_000, ge=100)  # finished responses the length model remembers (older ones fade)
    bin_tokens: int = Field(256, ge=16)  # resolution (tokens) of the length model and the KV projection
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
        """Rollouts to start now, a FIFO prefix of ``pending``, as ``(rollout_id, engine name)``."""
        ...

    def on_progress(self, rollout_id: str, response_tokens: int) -> None:
        """The rollout now holds ``response_tokens`` response tokens (optional information)."""
        ...

    def on_finished(self, rollout_id: str, response_tokens: int | None = None) -> None:
        """The rollout ended (completed, aborted or lost); its KV is free again.

        ``response_tokens``: its final length, or None when it did not complete (aborted, lost):
        then it only frees its place and teaches the length model nothing.
        """
        ...


# ----------------------------------------------------------------------------- length model


class LengthModel:
    """Survival curve of response lengths, learned online, on a grid of ``bin_tokens``.

    ``config``: the :class:`DispatchConfig` whose ``bin_tokens``, ``prior_*`` and ``history`` apply.

    Kaplan–Meier: the hazard of ending in bin b is (ends in b) / (at risk in b), where finished
    responses are events and running rollouts are censored at their progress — so the estimate
    is unbiased while a step's long rollouts are still running (the finished ones alone are the
    short ones). Pseudo-rollouts of a prior (uniform on [0, max_tokens), ``prior_truncated`` of
    them cut at max_tokens) are added to both counts, so the first step, with no data, is
    dispatched under that prior (it overstates the KV peak of the long-tailed lengths seen in
    practice, which errs safe), and the data takes over as it comes.
    """

    def __init__(self, max_tokens: int, config: DispatchConfig) -> None:
        self.bin = config.bin_tokens
        self.max_tokens = max_tokens
        self.nb = max_tokens // self.bin + 1  # the last bin holds max_tokens (truncated responses)
        self.config = config
        self.ended = np.zeros(self.nb)  # finished responses by length bin (faded)
        # Prior: uniform on [0, max_tokens) for (1 - q), the rest cut at max_tokens.
        q = config.prior_truncated
        starts = np.arange(self.nb) * self.bin
        self._prior_ended = (1 - q) * np.minimum(self.bin, np.maximum(max_tokens - starts, 0)) / max_tokens
        self._prior_at_risk = (1 - q) * np.maximum(max_tokens - starts, 0) / max_tokens + q
        self._prior_ended[-1] = self._prior_at_risk[-1] = q + (1 - q) * max(max_tokens - starts[-1], 0) / max_tokens

    def bin_of(self, tokens: float) -> int:
        return min(int(tokens) // self.bin, self.nb - 1)

    def observe(self, response_tokens: int) -> None:
        """A response ended at ``response_tokens``."""
        self.ended[self.bin_of(response_tokens)] += 1.0
        if self.ended.sum() > self.config.history:  # lengths drift as the policy trains: forget the old half
            self.ended *= 0.5

    def survival(self, running_by_bin: np.ndarray) -> np.ndarray:
        """S[b]: probability a response is still going at the start of bin b; (nb + 1,), S[nb] = 0.

        ``running_by_bin``: (nb,) rollouts still running, by the bin of their progress (censored).
        """
        # Rollouts still in the first bin say next to nothing yet, and leaving them out keeps the
        # curve unchanged by assign() itself (what it admits is judged by the curve it admits under).
        running_by_bin = np.concatenate([[0.0], running_by_bin[1:]])
        ended_at_or_after = np.cumsum(self.ended[::-1])[::-1]
        # A running rollout counts as at risk through its own bin: cohorts started together sit
        # in the same bin, and leaving them out there would make that bin's few ends look like
        # a hazard near 1. Counting them errs towards longer lengths, i.e. safe.
        running_at_or_after = np.cumsum(running_by_bin[::-1])[::-1]
        # The prior keeps a weight proportional to the data: at a step's frontier the few rollouts
        # that got furthest are a biased sample (fewer tool calls, so faster and shorter), and
        # there the prior must outweigh them; where many have been seen, the data rules.
        seen = self.ended.sum() + running_by_bin.sum()
        w0 = max(self.config.prior_weight, self.config.prior_fraction * seen)
        at_risk = ended_at_or_after + running_at_or_after + w0 * self._prior_at_risk
        hazard = (self.ended + w0 * self._prior_ended) / at_risk
        hazard[-1] = 1.0  # nothing runs past the budget
        return np.concatenate([[1.0], np.cumprod(1.0 - np.clip(hazard, 0.0, 1.0))])


# ----------------------------------------------------------------------------- the dynamic policy


@dataclass(slots=True)
class _Held:
    engine: int  # row in the per-engine arrays
    prompt: int
    bin: int = 0  # progress bin
    ctx: float = 0.0  # prompt + response tokens known to the policy


class DynamicPolicy:
    """KV-aware dispatch: keep every engine's projected KV peak at ``kv_target``, never beyond.

    ``assign`` is greedy and FIFO: the head of ``pending`` goes to the engine holding the fewest
    rollouts among those whose projected peak stays under the target with it, and dispatch stops
    at the first rollout no engine can take (later rollouts would only overtake earlier ones of
    the same step). Only engines in ``engines`` receive work.

    The projection for engine e at horizon h bins ahead sums, over the rollouts it holds, the
    probability the rollout is still running (``S[b + h] / S[b]`` for progress bin b) times its
    context then (``ctx + h * bin_tokens``), with the Bernoulli variance of the same; KV the
    engine reports beyond what the policy knows of (tool output, progress nobody reported) is
    added at every horizon. Per-engine counts and context sums by progress bin are kept as
    arrays, so a call costs one small matrix product plus O(horizon) per rollout assigned.
    """

    def __init__(self, config: DispatchConfig | None = None) -> None:
        self.config = config or DispatchConfig()
        self._held: dict[str, _Held] = {}
        self._rows: dict[str, int] = {}
        self._model: LengthModel | None = None
        self._cnt = np.zeros((0, 1))  # (E, nb) rollouts held, by progress bin
        self._ctx = np.zeros((0, 1))  # (E, nb) Σ ctx
        self._ctx2 = np.zeros((0, 1))  # (E, nb) Σ ctx²

    # ---------------------------------------------------------------- bookkeeping

    def _ensure_model(self, max_tokens: int) -> LengthModel:
        m = self._model
        if m is None or max_tokens > m.max_tokens:
            # A larger budget is a new stage: its lengths differ, start again from the prior.
            self._model = LengthModel(max_tokens, self.config)
            extra = self._model.nb - self._cnt.shape[1]
            if extra > 0:
                pad = ((0, 0), (0, extra))
                self._cnt, self._ctx, self._ctx2 = (np.pad(a, pad) for a in (self._cnt, self._ctx, self._ctx2))
        return self._model

    def _row(self, name: str) -> int:
        row = self._rows.get(name)
        if row is None:
            row = self._rows[name] = len(self._rows)
            grow = lambda a: np.vstack([a, np.zeros((1, a.shape[1]))])  # noqa: E731
            self._cnt, self._ctx, self._ctx2 = grow(self._cnt), grow(self._ctx), grow(self._ctx2)
        return row

    def _add(self, h: _Held, sign: float) -> None:
        self._cnt[h.engine, h.bin] += sign
        self._ctx[h.engine, h.bin] += sign * h.ctx
        self._ctx2[h.engine, h.bin] += sign * h.ctx * h.ctx

    def held(self, engine: str) -> int:
        """How many rollouts the policy has sent to ``engine`` that have not finished."""
        row = self._rows.get(engine)
        return 0 if row is None else int(round(self._cnt[row].sum()))

    def _projection(self, rows: list[int], offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, variance) of KV held by each engine in ``rows`` at horizons 0..nb-1, and S."""
        m = self._model
        assert m is not None
        nb, w = m.nb, m.bin
        S = m.survival(self._cnt.sum(axis=0)[:nb])  # (nb + 1,)
        b = np.arange(nb)[:, None]
        k = np.arange(nb)[None, :]
        ahead = np.minimum(b + k, nb)  # (nb, nb)
        Q = np.where(S[b] > 0, S[ahead] / np.maximum(S[b], 1e-300), 0.0)  # P(alive h bins on | alive now)
        V = Q * (1.0 - Q)
        tau = np.arange(nb) * float(w)  # (nb,) tokens ahead
        cnt, ctx, ctx2 = self._cnt[rows, :nb], self._ctx[rows, :nb], self._ctx2[rows, :nb]
        mean = ctx @ Q + (cnt @ Q) * tau + offsets[:, None]
        var = ctx2 @ V + 2 * tau * (ctx @ V) + tau**2 * (cnt @ V)
        return mean, var, S

    def projected_peak(self, engine: EngineState) -> float:
        """The KV peak (tokens, expectation + safety margin) ``engine``'s rollouts are heading for."""
        if self._model is None:
            return float(engine.total_tokens - engine.free_tokens)
        row = self._row(engine.name)
        mean, var, _ = self._projection([row], self._offsets([engine], [row]))
        return float(np.max(mean[0] + self.config.safety_sigmas * np.sqrt(var[0])))

    def _offsets(self, engines: list[EngineState], rows: list[int]) -> np.ndarray:
        """KV each engine reports beyond the contexts the policy knows of (at least 0)."""
        used = np.array([e.total_tokens - e.free_tokens for e in engines], float)
        return np.maximum(used - self._ctx[rows].sum(axis=1), 0.0)

    # ---------------------------------------------------------------- the policy

    def assign(
        self, pending: list[PendingRollout], engines: list[EngineState], *, tool_queue: int = 0
    ) -> list[tuple[str, str]]:
        if not pending or not engines or tool_queue > self.config.max_tool_queue:
            return []
        model = self._ensure_model(max(p.max_tokens for p in pending[:64]))
        rows = [self._row(e.name) for e in engines]
        mean, var, S = self._projection(rows, self._offsets(engines, rows))
        nb, w, z = model.nb, model.bin, self.config.safety_sigmas
        tau = np.arange(nb) * float(w)
        alive, spread = S[:nb], S[:nb] * (1.0 - S[:nb])
        limit = [self.config.kv_target * e.total_tokens for e in engines]
        # Min-heap on (rollouts held, engine order): the even split, among engines with room.
        heap, slots = [], {}
        for i, e in enumerate(engines):
            n = self.held(e.name)
            free_slots = min(e.free_slots, e.total_slots - n)
            if free_slots > 0:
                heap.append((n, i))
                slots[i] = free_slots
        heapq.heapify(heap)
        out: list[tuple[str, str]] = []
        for p in pending:
            if p.rollout_id in self._held:
                raise ValueError(f"rollout {p.rollout_id!r} is already running; call on_finished before resending it")
            y = alive * (p.prompt_tokens + tau)  # (nb,) this rollout's expected KV ahead
            vy = spread * (p.prompt_tokens + tau) ** 2
            while heap:
                n, i = heap[0]
                if np.max(mean[i] + y + z * np.sqrt(var[i] + vy)) <= limit[i]:
                    break
                heapq.heappop(heap)  # full for this call (a later, shorter prompt might fit: FIFO forbids it)
            if not heap:
                break
            mean[i] += y
            var[i] += vy
            h = _Held(rows[i], p.prompt_tokens, 0, float(p.prompt_tokens))
            self._held[p.rollout_id] = h
            self._add(h, 1.0)
            out.append((p.rollout_id, engines[i].name))
            slots[i] -= 1
            if slots[i] > 0:
                heapq.heapreplace(heap, (n + 1, i))
            else:
                heapq.heappop(heap)
        return out

    def on_progress(self, rollout_id: str, response_tokens: int) -> None:
        h = self._held.get(rollout_id)
        if h is None or self._model is None:
            return
        new_ctx = float(h.prompt + response_tokens)
        if new_ctx <= h.ctx:
            return
        self._add(h, -1.0)
        h.ctx, h.bin = new_ctx, self._model.bin_of(response_tokens)
        self._add(h, 1.0)

    def on_finished(self, rollout_id: str, response_tokens: int | None = None) -> None:
        h = self._held.pop(rollout_id, None)
        if h is not None:
            self._add(h, -1.0)
        if response_tokens is not None and self._model is not None:
            self._model.observe(response_tokens)


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


__all__ = [
    "DispatchConfig", "EngineState", "PendingRollout", "DispatchPolicy", "LengthModel", "DynamicPolicy",
    "StaticPolicy", "make_policy",
]
