"""Outcome reward: extract the final answer from a response and check it against gold.

Public API (the verifier actor, replay and ``reckon verify`` call exactly this):

* :func:`extract_answer` / :func:`count_answer_tags` -- what the response answered.
* :func:`score` -- one synchronous, in-process check, bounded by a SIGALRM timer when
  called from a main thread (see its docstring for the bound off the main thread).
* :class:`VerifierPool` -- K worker *processes* driven from trio: never blocks the event
  loop, and a worker stuck in C code (GMP evaluating a tower of powers) is killed and
  replaced, the answer scoring 0 with method ``"timeout"``.
* :class:`VerifierConfig` -- the settings, embeddable in the run config.
* :func:`verify_command` -- the ``reckon verify`` CLI.

Equivalence fuses two checkers as the rStar2-Agent release does (1 if either says
equal): math-verify, then a normalizing fallback (:mod:`training.rewards_equal`).

``Score.method`` says which path decided:

============  ==============================================================
exact         extracted answer and gold are the same string (no parsing)
math_verify   math-verify says equal
normalized    only the normalizing fallback says equal
mismatch      both checkers ran; not equal
no_answer     nothing to extract (no ``\\boxed{}`` / no ``<answer>``)
too_large     the answer or gold cannot be evaluated in bounded time/memory
timeout       the time bound ran out
error         a checker raised (a bug; ``detail`` holds the message)
crashed       a pool worker died while checking (e.g. its memory limit)
============  ==============================================================
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import trio
import typer
from pydantic import BaseModel, ConfigDict, Field

from training.rewards_equal import AnswerTooLarge, math_verify_equal, normalized_equal

log = logging.getLogger(__name__)

Mode = Literal["anywhere", "answer_tag_only"]

#: Default time bound for one check, in seconds (math-verify's own default is 5 s per step).
DEFAULT_TIMEOUT_S = 5.0
#: Default extraction mode (see :func:`extract_answer`).
DEFAULT_MODE: Mode = "anywhere"
#: Default cap on the length of an extracted answer that is parsed at all.
DEFAULT_MAX_ANSWER_CHARS = 1000


class VerifierConfig(BaseModel):
    """Settings of the verifier (the pool, and the defaults of a single check)."""

    model_config = ConfigDict(extra="forbid")

    # number of worker processes in a VerifierPool
    workers: int = Field(default=2, ge=1)
    # seconds one check may take before it scores 0 with method "timeout"
    timeout_s: float = Field(default=DEFAULT_TIMEOUT_S, gt=0)
    # "anywhere": last \boxed{} in the response, preferring the last <answer> block;
    # "answer_tag_only": only what is inside the last <answer>...</answer>
    mode: Mode = DEFAULT_MODE
    # extra seconds past timeout_s before a silent worker is killed (its own timer fires first)
    kill_grace_s: float = Field(default=1.0, ge=0)
    # address-space limit of each worker process, MiB (turns memory bombs into a clean error)
    worker_memory_mb: int = Field(default=4096, ge=256)
    # extracted answers longer than this are not parsed (method "too_large")
    max_answer_chars: int = Field(default=DEFAULT_MAX_ANSWER_CHARS, ge=1)


# --------------------------------------------------------------------------- extraction

_TOOL_SPANS = (("<tool_response>", "</tool_response>"), ("<tool_call>", "</tool_call>"))
_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_BOX_COMMANDS = (r"\boxed", r"\fbox")


def _strip_tool_spans(response: str) -> str:
    """The model's own prose: tool responses (written by the sandbox, so an answer
    there would be the tool's, not the model's) and tool calls (code, not an answer)
    removed. An unterminated span runs to the end of the text."""
    for open_tag, close_tag in _TOOL_SPANS:
        pieces, pos = [], 0
        while (start := response.find(open_tag, pos)) != -1:
            pieces.append(response[pos:start])
            end = response.find(close_tag, start + len(open_tag))
            if end == -1:
                pos = len(response)
                break
            pos = end + len(close_tag)
        pieces.append(response[pos:])
        response = "".join(pieces)
    return response


def count_answer_tags(response: str) -> int:
    """Number of ``<answer>`` opening tags the model wrote (tool output excluded).

    RoC's p_format = min(1, (tags - 1) / turns) is computed by the caller, who knows
    the number of turns.
    """
    return _strip_tool_spans(response).count(_ANSWER_OPEN)


def _last_answer_block(text: str) -> str | None:
    """Content of the last ``<answer>`` block; an unclosed one runs to the end."""
    start = text.rfind(_ANSWER_OPEN)
    if start == -1:
        return None
    body = text[start + len(_ANSWER_OPEN) :]
    end = body.find(_ANSWER_CLOSE)
    return body if end == -1 else body[:end]


def _boxed_argument(text: str, after: int) -> str | None:
    """The argument of a box command whose name ends at ``after``: ``{...}`` with
    nested braces (escaped ``\\{``/``\\}`` do not count), or ``\\boxed 5`` up to the
    next whitespace or ``$``. None if the braces never close (a truncated response)."""
    i = after
    while i < len(text) and text[i] in " \t":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        j = i
        while j < len(text) and not text[j].isspace() and text[j] != "$":
            j += 1
        return text[i:j].rstrip(".,;") or None
    depth, j = 0, i
    while j < len(text):
        ch = text[j]
        if ch == "\\":
            j += 2  # skip the escaped character: \{ and \} are literal braces
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None


def _last_box(text: str) -> tuple[int, str] | None:
    """(position, command) of the last ``\\boxed``/``\\fbox`` in ``text``, if any."""
    return max(
        (
            (pos, cmd)
            for cmd in _BOX_COMMANDS
            for pos in _find_all(text, cmd)
            # \boxed must not match the start of a longer command such as \boxedsymbol.
            if not text[pos + len(cmd) : pos + len(cmd) + 1].isalpha()
        ),
        default=None,
    )


def _last_boxed(text: str, box: tuple[int, str]) -> str | None:
    """Argument of the box at ``box``; None if it is empty or cut off (an earlier box
    is an intermediate result, not the final answer)."""
    pos, cmd = box
    arg = _boxed_argument(text, pos + len(cmd))
    if arg is None:
        return None
    return arg.strip() or None


def _find_all(text: str, needle: str) -> Iterator[int]:
    pos = text.find(needle)
    while pos != -1:
        yield pos
        pos = text.find(needle, pos + 1)


def extract_answer(response: str, *, mode: Mode = DEFAULT_MODE) -> str | None:
    """The final answer written in ``response`` (a full multi-turn assistant text).

    Text inside ``<tool_response>`` and ``<tool_call>`` is never used. In the
    remaining text:

    * ``mode="anywhere"``: the last ``\\boxed{}``/``\\fbox{}`` inside the last
      ``<answer>`` block; else the last box anywhere; else the whole content of the
      last ``<answer>`` block (``<answer>42</answer>``).
    * ``mode="answer_tag_only"``: the last box inside the last ``<answer>`` block, else
      that block's whole content; nothing outside ``<answer>`` counts.

    Returns the answer text (box argument without the braces, stripped) or None.
    A last box that is empty or whose braces never close (truncated output) counts as
    no box, never as an earlier, intermediate one. Raises ValueError for an unknown
    ``mode``.
    """
    if mode not in ("anywhere", "answer_tag_only"):
        raise ValueError(f"mode={mode!r} is not a verifier mode; use 'anywhere' or 'answer_tag_only'")
    text = _strip_tool_spans(response)
    block = _last_answer_block(text)
    if block is not None and (box := _last_box(block)) is not None:
        return _last_boxed(block, box)
    if mode == "anywhere" and (box := _last_box(text)) is not None:
        return _last_boxed(text, box)
    if block is not None:
        return block.strip() or None
    return None


# -------------------------------------------------------------------------------- score


@dataclass(frozen=True, slots=True)
class Score:
    """The verdict on one response. ``reward`` is 1.0 iff ``correct``."""

    correct: bool
    reward: float
    extracted: str | None  # the answer taken from the response
    method: str  # which path decided; see the module docstring
    seconds: float  # wall time spent on this check
    answer_tags: int  # number of <answer> tags the model wrote (RoC p_format)
    detail: str | None = None  # why, for too_large / error / crashed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Score:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class _Deadline(BaseException):
    """Raised by our SIGALRM handler. A BaseException so that the libraries' broad
    ``except Exception`` (math-verify swallows everything into False) cannot turn a
    timeout into a silent "incorrect"."""


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`_Deadline` in this thread after ``seconds`` (main thread only;
    elsewhere signals cannot be delivered and this is a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: object) -> None:
        raise _Deadline()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous)


def _compare(extracted: str, gold: str) -> str:
    """Run the checkers in order; the method that decided (``mismatch`` if none)."""
    if " ".join(extracted.split()) == " ".join(gold.split()):
        return "exact"
    if math_verify_equal(extracted, gold):
        return "math_verify"
    if normalized_equal(extracted, gold):
        return "normalized"
    return "mismatch"


def score(
    response: str,
    gold: str,
    *,
    mode: Mode = DEFAULT_MODE,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
) -> Score:
    """Score one full response against the gold answer, synchronously, in this process.

    ``response`` is the whole assistant text (all turns, tool responses included: they
    are skipped). ``gold`` is the reference answer as a bare string (``"42"``,
    ``"\\frac{1}{2}"``). Never raises for any response text; every failure is a Score
    with reward 0 and a method naming it.

    Time bound: from the main thread a SIGALRM timer interrupts the check after
    ``timeout_s`` (method ``"timeout"``), and answers whose evaluation could not finish
    at all (``9^{9^{9^9}}``) are refused up front (``"too_large"``). From another
    thread no timer can be set; only the size guard applies -- use
    :class:`VerifierPool` there, whose workers are killed when they overrun.
    Raises ValueError for an unknown ``mode``.
    """
    start = time.perf_counter()
    answer_tags = count_answer_tags(response)
    extracted = extract_answer(response, mode=mode)

    def done(method: str, detail: str | None = None) -> Score:
        correct = method in ("exact", "math_verify", "normalized")
        return Score(
            correct=correct,
            reward=1.0 if correct else 0.0,
            extracted=extracted,
            method=method,
            seconds=time.perf_counter() - start,
            answer_tags=answer_tags,
            detail=detail,
        )

    if extracted is None:
        return done("no_answer")
    if len(extracted) > max_answer_chars:
        return done("too_large", f"answer has {len(extracted)} characters (limit {max_answer_chars})")
    try:
        with _time_limit(timeout_s):
            method = _compare(extracted, str(gold))
    except _Deadline:
        return done("timeout", f"check exceeded {timeout_s} s")
    except AnswerTooLarge as e:
        return done("too_large", str(e))
    except RecursionError as e:  # deeply nested LaTeX blows sympy's recursion
        return done("too_large", f"nesting too deep: {e}")
    except Exception as e:  # a checker bug must cost one reward, not the verifier
        log.warning("verifier checker raised on extracted=%r gold=%r", extracted[:200], gold, exc_info=True)
        return done("error", f"{type(e).__name__}: {e}")
    return done(method)


# --------------------------------------------------------------------------------- pool

_REPO_ROOT = Path(__file__).resolve().parents[1]


def _worker_main() -> None:
    """Entry point of one pool worker process: JSON lines in on stdin, out on stdout.

    Request: ``{"response", "gold", "mode", "timeout_s", "max_answer_chars"}``;
    reply: a :meth:`Score.to_dict`. Writes ``{"ready": pid}`` once warmed up. Runs
    every check in its main thread so :func:`score`'s timer works; the parent kills it
    if even that does not bring it back.
    """
    import resource

    memory_mb = int(os.environ.get("RECKON_VERIFIER_MEMORY_MB", "0"))
    if memory_mb:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # The protocol owns the real stdout; anything a library prints goes to stderr.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    score(r"\boxed{\frac{1}{2}}", "0.5")  # warm caches (first math-verify call ~70 ms)
    channel.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        result = score(
            request["response"],
            request["gold"],
            mode=request["mode"],
            timeout_s=request["timeout_s"],
            max_answer_chars=request["max_answer_chars"],
        )
        channel.write(json.dumps(result.to_dict()) + "\n")


class _WorkerDied(Exception):
    pass


class _Worker:
    """One worker process and a line reader over its stdout."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = bytearray()

    async def send(self, obj: dict[str, Any]) -> None:
        await self.process.stdin.send_all(json.dumps(obj).encode() + b"\n")

    async def receive(self) -> dict[str, Any]:
        while (newline := self._buffer.find(b"\n")) == -1:
            chunk = await self.process.stdout.receive_some(65536)
            if not chunk:
                raise _WorkerDied(f"verifier worker {self.process.pid} exited (code {self.process.poll()})")
            self._buffer += chunk
        line = bytes(self._buffer[:newline])
        del self._buffer[: newline + 1]
        return json.loads(line)

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


class VerifierPool:
    """K verifier worker processes behind one trio-native ``score`` call.

    Usage::

        async with VerifierPool(VerifierConfig(workers=2)) as pool:
            s = await pool.score(response, gold)

    Entering starts the workers and returns once all are warm. ``score`` waits for a
    free worker, so any number of tasks may call it concurrently; the event loop never
    blocks. A worker silent for ``timeout_s + kill_grace_s`` is killed, replaced in the
    background, and the call returns a Score with method ``"timeout"``; a worker that
    dies returns ``"crashed"``. If the caller is cancelled mid-check, that worker is
    replaced too (its late reply would answer the next request). Exiting kills all
    workers.
    """

    def __init__(self, config: VerifierConfig | None = None) -> None:
        self.config = config or VerifierConfig()
        self.completed = 0  # checks answered (any method)
        self.timeouts = 0  # checks that hit the bound (worker timer or kill)
        self.restarts = 0  # workers killed or died and replaced
        self._started_at: float | None = None
        self._stopped_at: float | None = None
        self._stack = AsyncExitStack()
        self._nursery: trio.Nursery | None = None
        self._idle_send, self._idle_receive = trio.open_memory_channel[_Worker](math.inf)
        self._workers: set[_Worker] = set()

    async def __aenter__(self) -> VerifierPool:
        self._nursery = await self._stack.enter_async_context(trio.open_nursery())
        self._stack.push_async_callback(self._shutdown)
        try:
            async with trio.open_nursery() as starting:
                for _ in range(self.config.workers):
                    starting.start_soon(self._spawn)
        except BaseException:
            await self._stack.aclose()
            raise
        self._started_at = time.perf_counter()
        return self

    async def __aexit__(self, *exc_info: object) -> bool | None:
        return await self._stack.__aexit__(*exc_info)

    async def _shutdown(self) -> None:
        assert self._nursery is not None
        # Cancel respawns in flight first: a replacement killed while starting up
        # would otherwise report itself as a dead worker.
        self._nursery.cancel_scope.cancel()
        self._stopped_at = time.perf_counter()
        for worker in list(self._workers):
            worker.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            for worker in list(self._workers):
                await worker.process.wait()

    async def _spawn(self) -> None:
        """Start one worker, wait for its ready line, and put it in the idle queue."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
        env["RECKON_VERIFIER_MEMORY_MB"] = str(self.config.worker_memory_mb)
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", "from training.rewards import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        worker = _Worker(process)
        self._workers.add(worker)
        try:
            ready = await worker.receive()
        except BaseException:
            self._discard(worker)
            raise
        if "ready" not in ready:
            self._discard(worker)
            raise RuntimeError(f"verifier worker sent {ready!r} instead of its ready line")
        self._idle_send.send_nowait(worker)

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        self._workers.discard(worker)
        if self._nursery is not None:
            self._nursery.start_soon(worker.process.wait)  # reap it: no zombies

    def _replace(self, worker: _Worker) -> None:
        self._discard(worker)
        self.restarts += 1
        assert self._nursery is not None
        self._nursery.start_soon(self._spawn)

    async def score(self, response: str, gold: str, *, mode: Mode | None = None) -> Score:
        """Score one response in a worker process; see :func:`score` for the verdict.

        Waits for a free worker. Returns method ``"timeout"`` when the worker overran
        ``timeout_s + kill_grace_s`` (it is killed and replaced), ``"crashed"`` when it
        died. Raises RuntimeError if called outside ``async with``, ValueError for an
        unknown ``mode``.
        """
        if self._nursery is None:
            raise RuntimeError("VerifierPool.score called outside 'async with VerifierPool(...)'")
        cfg = self.config
        mode = mode or cfg.mode
        if mode not in ("anywhere", "answer_tag_only"):
            raise ValueError(f"mode={mode!r} is not a verifier mode; use 'anywhere' or 'answer_tag_only'")
        worker = await self._idle_receive.receive()
        start = time.perf_counter()
        request = {
            "response": response,
            "gold": str(gold),
            "mode": mode,
            "timeout_s": cfg.timeout_s,
            "max_answer_chars": cfg.max_answer_chars,
        }
        result: Score | None = None
        try:
            with trio.move_on_after(cfg.timeout_s + cfg.kill_grace_s):
                await worker.send(request)
                result = Score.from_dict(await worker.receive())
        except (_WorkerDied, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            detail = f"verifier worker {worker.process.pid} died (exit code {worker.process.poll()}): {type(e).__name__} {e}"
            self._replace(worker)
            self.completed += 1
            return self._local_verdict(response, mode, "crashed", start, detail.strip())
        except BaseException:  # cancelled mid-check: the worker's state is unknown
            self._replace(worker)
            raise
        if result is None:
            log.warning("verifier worker %d overran %.1f s; killed", worker.process.pid, cfg.timeout_s)
            self._replace(worker)
            self.timeouts += 1
            self.completed += 1
            return self._local_verdict(
                response, mode, "timeout", start, f"worker killed after {cfg.timeout_s + cfg.kill_grace_s} s"
            )
        self._idle_send.send_nowait(worker)
        self.completed += 1
        if result.method == "timeout":
            self.timeouts += 1
        return result

    @staticmethod
    def _local_verdict(response: str, mode: Mode, method: str, start: float, detail: str) -> Score:
        """A zero Score for a check the worker could not finish; extraction is cheap and
        bounded, so it is redone here to keep ``extracted``/``answer_tags`` in the log."""
        return Score(
            correct=False,
            reward=0.0,
            extracted=extract_answer(response, mode=mode),
            method=method,
            seconds=time.perf_counter() - start,
            answer_tags=count_answer_tags(response),
            detail=detail,
        )

    def throughput(self) -> float:
        """Checks answered per second between the pool becoming ready and now (or its
        exit)."""
        if self._started_at is None:
            return 0.0
        end = self._stopped_at if self._stopped_at is not None else time.perf_counter()
        return self.completed / max(end - self._started_at, 1e-9)


# ---------------------------------------------------------------------------------- CLI


def _score_line(s: Score, line: int | None = None) -> str:
    out: dict[str, Any] = {"correct": s.correct, "extracted": s.extracted, "method": s.method, "seconds": round(s.seconds, 6)}
    if line is not None:
        out = {"line": line, **out}
    return json.dumps(out)


def _read_cases(path: Path) -> Iterator[tuple[int, tuple[str, str] | str]]:
    """(line number, (response, gold)) per JSONL line, or (line number, error text)."""
    with path.open(encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                case = json.loads(raw)
            except json.JSONDecodeError as e:
                yield number, f"not valid JSON ({e.msg} at column {e.colno})"
                continue
            if not isinstance(case, dict) or not isinstance(case.get("response"), str):
                yield number, 'expected an object with a string "response" and a "gold" answer'
                continue
            gold = case.get("gold")
            if isinstance(gold, bool) or not isinstance(gold, (str, int, float)):
                yield number, 'expected "gold" to be a string or a number'
                continue
            yield number, (case["response"], str(gold))


def verify_command(
    response: str | None = typer.Option(None, "--response", help="Full response text to score."),
    gold: str | None = typer.Option(None, "--gold", help="Gold answer, e.g. 42 or \\frac{1}{2}."),
    file: Path | None = typer.Option(
        None, "--file", exists=True, dir_okay=False, help='JSONL file with "response" and "gold" per line.'
    ),
    mode: str = typer.Option(DEFAULT_MODE, help="Extraction mode: anywhere | answer_tag_only."),
    timeout_s: float = typer.Option(DEFAULT_TIMEOUT_S, "--timeout-s", help="Time bound per check, seconds."),
    workers: int = typer.Option(0, help="Score through a pool of this many worker processes (0: in-process)."),
) -> None:
    """Score responses against gold answers; print one JSON line per case.

    Each line is {"correct", "extracted", "method", "seconds"} (with "line" for
    --file). A malformed --file line prints {"line", "error"} and the command exits 1
    after the remaining lines.
    """
    if mode not in ("anywhere", "answer_tag_only"):
        raise typer.BadParameter(f"{mode!r}; use 'anywhere' or 'answer_tag_only'", param_hint="--mode")
    if file is None and (response is None or gold is None):
        raise typer.BadParameter("give --response and --gold, or --file JSONL", param_hint="--file")
    if file is not None and (response is not None or gold is not None):
        raise typer.BadParameter("--file cannot be combined with --response/--gold", param_hint="--file")

    if file is None:
        cases: list[tuple[int | None, tuple[str, str] | str]] = [(None, (response, gold))]  # type: ignore[list-item]
    else:
        cases = list(_read_cases(file))
    bad = False
    if workers > 0:
        config = VerifierConfig(workers=workers, timeout_s=timeout_s, mode=mode)  # type: ignore[arg-type]

        async def run_all() -> list[Score | None]:
            results: list[Score | None] = [None] * len(cases)
            async with VerifierPool(config) as pool, trio.open_nursery() as nursery:
                for i, (_, case) in enumerate(cases):
                    if isinstance(case, tuple):

                        async def one(i: int = i, case: tuple[str, str] = case) -> None:
                            results[i] = await pool.score(*case)

                        nursery.start_soon(one)
            return results

        scores = trio.run(run_all)
    else:
        scores = [
            score(case[0], case[1], mode=mode, timeout_s=timeout_s) if isinstance(case, tuple) else None  # type: ignore[arg-type]
            for _, case in cases
        ]
    for (line, case), s in zip(cases, scores):
        if s is None:
            bad = True
            typer.echo(json.dumps({"line": line, "error": case}))
        else:
            typer.echo(_score_line(s, line))
    if bad:
        raise typer.Exit(code=1)


verify_app = typer.Typer(add_completion=False, help="Score responses against gold answers.")
verify_app.command("verify")(verify_command)
