"""The inference-engine interface the generator drives, and the thread bridge both engines share.

An engine serves many concurrent requests. Each backend (vLLM, transformers) is a
synchronous object stepped by ONE dedicated OS thread (the "engine thread"): it admits
requests, runs one batched model step at a time and reports per-request deltas. The trio
side never blocks: commands go to the engine thread through a queue, and each step's
deltas come back in a single ``TrioToken.run_sync_soon`` callback that wakes the waiting
``generate`` calls. One thread per engine, not one per waiting request.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import trio
from pydantic import BaseModel, ConfigDict, Field


class EngineConfig(BaseModel):
    """Settings of one inference engine (embedded in the generator's config)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["vllm", "hf", "auto"] = "auto"  # auto: vLLM when importable, else transformers
    kv_cache_gib: float = Field(1.0, gt=0)  # KV cache size (vLLM: VLLM_CPU_KVCACHE_SPACE on CPU, else GPU share)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)  # vLLM on GPU: fraction of device memory it may take
    max_running: int = Field(64, ge=1)  # most sequences decoded together in one step
    max_model_len: int = Field(4096, ge=16)  # prompt + response tokens per sequence
    dtype: str = "float32"  # model dtype: float32 | bfloat16 | float16 | auto
    seed: int = 0  # engine-level sampling seed (per-request seeds override)
    enforce_eager: bool = True  # vLLM: skip CUDA graphs / torch.compile (fast start; set False on GPU for speed)
    logprobs_mode: Literal["raw", "processed"] = "raw"  # raw: log p under the model; processed: after temperature/top-k/top-p
    device: str = "auto"  # transformers engine: cpu | cuda | auto
    warmup: bool = True  # run one tiny request at start so the first real step is not slow
    # vLLM KV block tokens; 0 = auto: 32 on CPU (the smallest its attention takes; vLLM's own
    # default there is 128), vLLM's default on GPU (16). The prefix cache reuses whole blocks
    # only, so a small block lets the next turn of a rollout reuse all but <32 tokens of its
    # history (docs/generator.md: bench.generator's step 1.30x -> 1.09x plain's).
    block_size: int = Field(0, ge=0)
    prefix_caching: bool = True  # reuse the KV of a finished turn when the next turn's prompt extends it


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    """How to sample one turn. Defaults are the paper's: full distribution at temperature 1."""

    max_tokens: int  # most new tokens in this turn
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k
    stop: tuple[str, ...] = ()  # stop strings; the stop string stays in the output
    seed: int | None = None  # per-request seed for reproducible sampling
    ignore_eos: bool = False  # keep sampling past EOS up to max_tokens (benchmarks: exact token counts)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"SamplingSpec.max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"SamplingSpec.temperature must be > 0 (greedy is not supported), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingSpec.top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop", tuple(self.stop))


FinishReason = Literal["stop", "eos", "length", "abort"]


@dataclass(slots=True)
class TurnOutput:
    """The tokens one ``generate`` call produced.

    ``versions[i]`` is the weights version that produced ``token_ids[i]``; ``version`` is the
    version at the end of the turn. finish_reason: stop (a stop string), eos, length (turn
    max_tokens or the model's max length), abort.
    """

    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: FinishReason
    version: int


@dataclass(frozen=True, slots=True)
class TurnChunk:
    """Tokens of one streamed request since its previous chunk (:meth:`Engine.stream`).

    ``finish_reason`` is set on the last chunk only (its token lists may be empty).
    """

    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: FinishReason | None


class EngineError(RuntimeError):
    """The engine thread failed; every waiting request gets this error."""


@dataclass(slots=True)
class Delta:
    """New tokens for one request from one engine step (engine thread -> trio)."""

    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason | None = None  # set on the request's last delta


@dataclass(slots=True)
class _Pending:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: BaseException | None = None
    done: trio.Event = field(default_factory=trio.Event)
    wake: trio.Event | None = None  # a stream() waiting for this request's next tokens

    def notify(self) -> None:
        if self.wake is not None:
            self.wake.set()


_STOP = object()


def stop_token_ids(tokenizer, stop: tuple[str, ...]) -> list[int] | None:
    """The token ids of ``stop`` when every stop string is one added token of ``tokenizer``, else None.

    Why: an added token (``</tool_call>`` in Qwen's vocabulary and in the tiny test model's) is
    never split by the tokenizer, so "the text contains the stop string" is "the model sampled
    that token". Matching the id needs no detokenization of every sampled token (vLLM's
    incremental detokenizer, the transformers engine's tail decode), which was per-token
    Python work paid only by tool-use turns. A stop string that is not a single added token
    keeps the text match (``None``).
    """
    if not stop:
        return None
    added = tokenizer.get_added_vocab()
    ids = [added.get(s) for s in stop]
    return None if any(i is None for i in ids) else ids


class Backend(ABC):
    """A synchronous engine, used only from the engine thread."""

    @abstractmethod
    def add(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec) -> None: ...

    @abstractmethod
    def abort(self, request_id: str) -> None: ...

    @abstractmethod
    def has_work(self) -> bool: ...

    @abstractmethod
    def step(self) -> list[Delta]:
        """Run one batched model step; return the new tokens of every request that got any."""

    @abstractmethod
    def reload_weights(self, path: str) -> None:
        """Load weights from the HF model directory ``path`` in place; running sequences
        continue, their KV recomputed with the new weights."""

    @abstractmethod
    def capacity(self) -> dict[str, int]:
        """total_tokens, free_tokens, total_slots, free_slots, running, waiting."""

    def close(self) -> None:
        """Release resources (engine thread)."""


class Engine:
    """A trio-native engine: ``async with create_engine(cfg, model_dir) as engine``.

    ``generate`` may be called from many tasks at once; each call is one request in the
    engine's continuous batch. Cancelling a ``generate`` call aborts its request.
    """

    def __init__(self, make_backend: Callable[[], Backend], name: str) -> None:
        self._make_backend = make_backend
        self._name = name
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[str, _Pending] = {}
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._started = trio.Event()
        self._stopped = trio.Event()
        self._start_error: BaseException | None = None
        self._dead: BaseException | None = None
        self._version = 0
        self._capacity: dict[str, int] = {}
        self._steps = 0  # engine-thread counters, see counters()
        self._step_tokens = 0
        self._step_seconds = 0.0
        self.start_seconds = math.nan  # wall time from __aenter__ to ready

    # ---- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        self._token = trio.lowlevel.current_trio_token()
        t0 = trio.current_time()
        self._thread = threading.Thread(target=self._thread_main, name=f"engine-{self._name}", daemon=True)
        self._thread.start()
        await self._started.wait()
        if self._start_error is not None:
            raise EngineError(f"{self._name} engine failed to start: {self._start_error!r}") from self._start_error
        self.start_seconds = trio.current_time() - t0
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._cmds.put(_STOP)
        with trio.CancelScope(shield=True):
            await self._stopped.wait()
        self._fail_all(EngineError("engine closed"))

    # ---- public API --------------------------------------------------------------------

    @property
    def version(self) -> int:
        """The weights version new tokens are produced with."""
        return self._version

    async def generate(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec) -> TurnOutput:
        """Sample up to ``spec.max_tokens`` tokens after ``prompt_ids``.

        Returns when the request finishes (stop string, EOS, length) or is aborted; raises
        EngineError if the engine thread died, ValueError on a duplicate ``request_id``.
        """
        p = self._submit(request_id, prompt_ids, spec)
        try:
            await p.done.wait()
        finally:
            self._abandon(request_id, p)
        if p.error is not None:
            raise p.error
        return TurnOutput(p.token_ids, p.logprobs, p.versions, p.finish_reason or "abort", self._version)

    async def stream(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec) -> AsyncIterator[TurnChunk]:
        """Like :meth:`generate`, but yields the request's tokens as the engine samples them.

        One chunk per engine step that gave the request tokens (several steps' worth when
        the consumer is slower than the engine); the last chunk has ``finish_reason`` set.
        Leaving the loop early aborts the request; wrap the call in
        ``contextlib.aclosing`` so that happens at once rather than when the generator is
        collected. Raises like :meth:`generate`.
        """
        p = self._submit(request_id, prompt_ids, spec)
        sent = 0
        try:
            while True:
                if p.error is not None:
                    raise p.error
                done = p.done.is_set()
                n = len(p.token_ids)
                if n > sent or done:
                    chunk = TurnChunk(p.token_ids[sent:n], p.logprobs[sent:n], p.versions[sent:n],
                                      (p.finish_reason or "abort") if done else None)
                    sent = n
                    yield chunk
                    if done:
                        return
                else:
                    p.wake = trio.Event()
                    await p.wake.wait()
        finally:
            self._abandon(request_id, p)

    async def abort(self, request_id: str) -> None:
        """Stop a running request; its ``generate`` returns the tokens so far with finish "abort".
        Unknown or finished ids are ignored."""
        if self._finish(request_id, "abort"):
            self._cmds.put(lambda b: b.abort(request_id))
        await trio.lowlevel.checkpoint()

    async def reload_weights(self, path: str, version: int) -> None:
        """Load new weights from the model directory ``path`` between two engine steps.

        Tokens produced after this returns (and any produced by steps after the swap) are
        tagged ``version``; running requests continue, their KV recomputed with the new weights.
        """
        await self._call(lambda b: b.reload_weights(str(path)), version=version)

    async def exclusive(self, fn: Callable[[Backend], Any]) -> Any:
        """Run ``fn(backend)`` on the engine thread between two steps and return its result.

        ``fn`` has the backend to itself while it runs: no other request is added, stepped
        or delivered meanwhile (benchmarks drive the backend synchronously this way; see
        bench/generator.py). Raises EngineError wrapping whatever ``fn`` raised.
        """
        return await self._call(fn)

    def capacity(self) -> dict[str, int]:
        """Latest KV/slot snapshot (updated after each engine step): total_tokens, free_tokens,
        total_slots, free_slots, running, waiting."""
        return dict(self._capacity)

    def counters(self) -> dict[str, float]:
        """Since start: steps (batched model steps), tokens (sampled in them) and step_seconds
        (wall time inside steps). tokens / steps is the mean batch occupancy: how full the
        engine's batch was, whatever else the machine was doing."""
        return dict(steps=self._steps, tokens=self._step_tokens, step_seconds=self._step_seconds)

    @property
    def running(self) -> int:
        """Requests submitted and not yet finished."""
        return len(self._pending)

    # ---- trio side internals -----------------------------------------------------------

    def _submit(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec) -> _Pending:
        """Queue a request for the engine thread; its tokens collect in the returned _Pending."""
        self._check_alive()
        if request_id in self._pending:
            raise ValueError(f"request id {request_id!r} is already running on this engine; ids must be unique")
        if not prompt_ids:
            raise ValueError(f"request {request_id!r}: prompt_ids is empty")
        p = self._pending[request_id] = _Pending()
        prompt = list(prompt_ids)
        self._cmds.put(lambda b: b.add(request_id, prompt, spec))
        return p

    def _abandon(self, request_id: str, p: _Pending) -> None:
        """The caller stopped waiting (cancelled, or left a stream): free the request's slot."""
        if not p.done.is_set():
            self._finish(request_id, "abort")
            self._cmds.put(lambda b: b.abort(request_id))

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineError(f"{self._name} engine thread died: {self._dead!r}") from self._dead
        if not self._started.is_set() or self._stopped.is_set():
            raise EngineError(f"{self._name} engine is not running (use `async with create_engine(...)`)")

    async def _call(self, fn: Callable[[Backend], Any], version: int | None = None) -> Any:
        """Run ``fn(backend)`` on the engine thread between steps and return its result."""
        self._check_alive()
        done = trio.Event()
        box: dict[str, Any] = {}

        def reply(ok: bool, value: Any) -> None:
            box["ok"], box["value"] = ok, value
            done.set()

        def cmd(b: Backend) -> None:
            try:
                value = fn(b)
                if version is not None:
                    self._thread_version = version
                self._post(reply, True, value)
            except Exception as e:  # reported to the caller, the engine keeps serving
                self._post(reply, False, e)

        self._cmds.put(cmd)
        with trio.CancelScope(shield=True):  # the command runs anyway; wait for it to stay consistent
            await done.wait()
        if not box["ok"]:
            raise EngineError(f"{self._name} engine command failed: {box['value']!r}") from box["value"]
        if version is not None:
            self._version = version
        return box["value"]

    def _finish(self, request_id: str, reason: FinishReason) -> bool:
        p = self._pending.pop(request_id, None)
        if p is None:
            return False
        p.finish_reason = reason
        p.done.set()
        p.notify()
        return True

    def _deliver(self, deltas: list[Delta], version: int, capacity: dict[str, int]) -> None:
        self._capacity = capacity
        for d in deltas:
            p = self._pending.get(d.request_id)
            if p is None:  # aborted on the trio side already
                continue
            p.token_ids += d.token_ids
            p.logprobs += d.logprobs
            p.versions += [version] * len(d.token_ids)
            if d.finish_reason is not None:
                self._finish(d.request_id, d.finish_reason)
            else:
                p.notify()

    def _fail_all(self, err: BaseException) -> None:
        for p in self._pending.values():
            p.error = err
            p.done.set()
            p.notify()
        self._pending.clear()

    def _on_dead(self, err: BaseException) -> None:
        self._dead = err
        self._fail_all(EngineError(f"{self._name} engine thread died: {err!r}"))

    def _post(self, fn: Callable, *args: Any) -> None:
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass

    # ---- engine thread -----------------------------------------------------------------

    def _thread_main(self) -> None:
        self._thread_version = 0
        try:
            backend = self._make_backend()
            cap = backend.capacity()
        except BaseException as e:
            self._start_error = e
            traceback.print_exc()
            self._post(self._started.set)
            self._post(self._stopped.set)
            return

        def ready() -> None:
            self._capacity = cap
            self._started.set()

        self._post(ready)
        try:
            while True:
                # Block only when idle; otherwise take what is queued and step.
                try:
                    cmd = self._cmds.get(block=not backend.has_work())
                except queue.Empty:
                    cmd = None
                while cmd is not None:
                    if cmd is _STOP:
                        return
                    cmd(backend)
                    try:
                        cmd = self._cmds.get_nowait()
                    except queue.Empty:
                        cmd = None
                if backend.has_work():
                    t = time.perf_counter()
                    deltas = backend.step()
                    self._step_seconds += time.perf_counter() - t
                    self._steps += 1
                    self._step_tokens += sum(len(d.token_ids) for d in deltas)
                    self._post(self._deliver, deltas, self._thread_version, backend.capacity())
                else:
                    self._post(self._deliver, [], self._thread_version, backend.capacity())
        except BaseException as e:
            traceback.print_exc()
            self._post(self._on_dead, e)
        finally:
            try:
                backend.close()
            finally:
                self._post(self._stopped.set)
