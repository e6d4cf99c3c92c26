"""``reckon eval``: avg pass@1 of a model over k samples, with the real rollout loop, in one process.

The same pieces a run uses, without the actors: the multi-turn rollout loop
(:mod:`actors.rollout`) on an inference engine (:mod:`actors.engines`), tool calls run in
the sandbox pool (:mod:`tools_sandbox`, output rendered with ``format_for_model`` as the
tool executor does), and every response checked by the verifier pool
(:mod:`training.rewards`). Per dataset it reports:

- avg pass@1 = the mean reward over all ``n_problems x k`` samples (the paper's metric:
  16 samples at temperature 0.6, 30K tokens, 30 turns);
- mean response length = model tokens per sample (tool-response tokens excluded, as the
  scheduler's evaluations count them);
- tool calls per trajectory and tool-error rate (calls whose status is not ``ok``, a
  malformed call included, over all calls).

Given a run directory it evaluates the run's latest published weights
(``RUN_DIR/weights/vNNNNN``) with the run's own data, engine, sandbox and eval settings,
and appends one ``EvalCompleted`` per dataset to the run's event log (source ``eval``),
where ``reckon report`` shows it beside the evaluations the scheduler made.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import trio
import typer

from actors.config import Config, ConfigError, EvalSection, load_config, parse_config
from training.data import DataError, Problem, load_problems, load_train_eval

#: Envelope source of the EvalCompleted events this command appends.
EVAL_SOURCE = "eval"
_WEIGHTS_DIR = re.compile(r"^v(\d+)$")


class EvalError(ValueError):
    """An evaluation cannot run as asked; the message names the input."""


# --------------------------------------------------------------------------- what to evaluate


@dataclass
class Target:
    """What ``reckon eval`` evaluates: model weights, the settings to use, where to log."""

    model_dir: Path  # a Hugging Face model directory
    config: Config  # the run's config (or defaults / --config) for data, engine, sandbox, verifier, eval
    run_dir: Path | None = None  # the run the weights belong to (its log gets the events)
    weights_version: int = 0  # 0: the initial model
    step: int = 0  # optimizer step that produced the weights (0: before training)


def published_weights(run_dir: Path) -> dict[int, Path]:
    """version -> directory of every complete ``RUN_DIR/weights/vNNNNN`` (half-written ones skipped)."""
    out = {}
    for d in (run_dir / "weights").glob("v*"):
        m = _WEIGHTS_DIR.match(d.name)
        if m and d.is_dir() and (d / "config.json").is_file():
            out[int(m.group(1))] = d
    return out


def _is_run_dir(path: Path) -> bool:
    return (path / "events.db").is_file() or ((path / "config.json").is_file() and (path / "weights").is_dir())


def _run_config(run_dir: Path) -> Config:
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise EvalError(f"{run_dir} is a run directory without config.json; pass --config with the run's settings")
    return load_config(cfg_path)


def _step_of_version(cfg: Config, version: int) -> int:
    """The optimizer step whose weights are ``version`` (from the run's log); the version if unknown."""
    if version == 0:
        return 0
    try:
        from store import EventLog

        with EventLog.open(cfg.store_url(), readonly=True) as log:
            for _, env in log.read(run_id=cfg.run.run_id or None, types=["WeightsPublished"]):
                if env.payload.version == version:
                    return int(env.payload.step)
    except Exception:  # a log that cannot be read only costs the step number
        pass
    return version  # the learner publishes one version per step


def resolve_target(path: str, *, weights: str | None = None, config: str | None = None) -> Target:
    """Resolve ``reckon eval PATH``: a run directory, a run's ``weights/vNNNNN``, or a model directory.

    ``weights``: for a run, a version number, ``vNNNNN``, ``initial`` (the run's starting
    model) or a directory; default the latest published. ``config``: a TOML/JSON config
    whose data, engine, sandbox, verifier and eval settings to use (default: the run's,
    else the defaults of actors/config.py).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise EvalError(f"{path}: no such run or model directory")
    run_dir = None
    if _is_run_dir(p):
        run_dir = p
    elif p.parent.name == "weights" and _is_run_dir(p.parent.parent) and _WEIGHTS_DIR.match(p.name):
        run_dir, weights = p.parent.parent, weights or p.name
    elif not (p / "config.json").is_file():
        raise EvalError(f"{path} is neither a run directory (events.db, config.json) nor a model directory (config.json)")
    try:
        if config is not None:
            cfg = load_config(config)
        elif run_dir is not None:
            cfg = _run_config(run_dir)
        else:
            cfg = parse_config({})
    except ConfigError as e:
        raise EvalError(str(e)) from None
    if run_dir is None:
        return Target(model_dir=p, config=cfg)
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"run_dir": str(run_dir)})})
    published = published_weights(run_dir)
    if weights in (None, "latest"):
        version = max(published, default=0)
    elif weights == "initial":
        version = 0
    else:
        m = _WEIGHTS_DIR.match(weights) or re.fullmatch(r"(\d+)", weights)
        if m is None:
            wdir = Path(weights).expanduser()
            if not (wdir / "config.json").is_file():
                raise EvalError(f"--weights {weights!r}: not a version (12, v00012, latest, initial) nor a model directory")
            return Target(model_dir=wdir, config=cfg, run_dir=run_dir)
        version = int(m.group(1))
        if version != 0 and version not in published:
            have = ", ".join(f"v{v:05d}" for v in sorted(published)[-5:]) or "none"
            raise EvalError(f"--weights {weights}: {run_dir}/weights has no v{version:05d} (latest: {have})")
    if version == 0:
        model = Path(cfg.model.path) if cfg.model.path else run_dir / "model"
        if not (model / "config.json").is_file():
            raise EvalError(f"{run_dir}: no published weights and no initial model at {model}")
        return Target(model_dir=model, config=cfg, run_dir=run_dir)
    return Target(model_dir=published[version], config=cfg, run_dir=run_dir, weights_version=version,
                  step=_step_of_version(cfg, version))  # fmt: skip


def dataset_name(spec: str) -> str:
    """A dataset's name in events and reports: as the scheduler names its held-out set."""
    return spec.split(":")[-1].rsplit("/", 1)[-1]


def load_eval_sets(cfg: Config, specs: list[str] | None, max_problems: int) -> dict[str, list[Problem]]:
    """name -> problems: each of ``specs``, or the config's held-out set; the first ``max_problems`` (0 = all)."""
    try:
        if specs:
            sets = {dataset_name(s): load_problems(s, cfg.data, demo=cfg.demo) for s in specs}
        else:
            _, held = load_train_eval(cfg.data, demo=cfg.demo)
            sets = {dataset_name(cfg.data.eval or "held-out"): held}
    except (DataError, ValueError, OSError) as e:
        raise EvalError(f"cannot load the evaluation data: {e}") from None
    return {name: ps[:max_problems] if max_problems else ps for name, ps in sets.items()}


# --------------------------------------------------------------------------- the evaluation


@dataclass
class Sample:
    """One of the k samples of one problem."""

    problem_id: str
    index: int
    correct: bool
    response_tokens: int  # model tokens (loss_mask 1)
    tool_calls: int
    tool_errors: int
    turns: int
    finish_reason: str
    extracted: str | None


@dataclass
class DatasetResult:
    """avg pass@1 and the behaviour of the model on one dataset."""

    dataset: str
    k: int
    temperature: float
    max_tokens: int
    max_turns: int
    samples: list[Sample] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_problems(self) -> int:
        return len({s.problem_id for s in self.samples})

    @property
    def pass_at_1(self) -> float:
        """Mean reward over every sample: avg pass@1 over k samples per problem."""
        return float(np.mean([s.correct for s in self.samples])) if self.samples else math.nan

    @property
    def mean_response_tokens(self) -> float:
        return float(np.mean([s.response_tokens for s in self.samples])) if self.samples else math.nan

    @property
    def mean_tool_calls(self) -> float:
        return float(np.mean([s.tool_calls for s in self.samples])) if self.samples else math.nan

    @property
    def n_tool_calls(self) -> int:
        return sum(s.tool_calls for s in self.samples)

    @property
    def tool_error_rate(self) -> float | None:
        """Failed calls / calls (None when no call was made)."""
        calls = self.n_tool_calls
        return sum(s.tool_errors for s in self.samples) / calls if calls else None

    def pass_at_k(self) -> float:
        """Fraction of problems solved by at least one of their k samples."""
        solved: dict[str, bool] = {}
        for s in self.samples:
            solved[s.problem_id] = solved.get(s.problem_id, False) or s.correct
        return float(np.mean(list(solved.values()))) if solved else math.nan

    def summary(self) -> dict:
        return {
            "dataset": self.dataset, "n_problems": self.n_problems, "k": self.k, "temperature": self.temperature,
            "max_tokens": self.max_tokens, "max_turns": self.max_turns, "pass_at_1": self.pass_at_1,
            "pass_at_k": self.pass_at_k(), "mean_response_tokens": self.mean_response_tokens,
            "mean_tool_calls": self.mean_tool_calls, "tool_error_rate": self.tool_error_rate,
            "n_tool_calls": self.n_tool_calls, "seconds": self.seconds,
        }  # fmt: skip


async def evaluate(
    model_dir: str | Path,
    datasets: dict[str, list[Problem]],
    cfg: Config,
    *,
    k: int,
    temperature: float,
    max_tokens: int,
    max_turns: int,
    engine_kind: str | None = None,
    seed: int = 0,
    on_sample=None,
) -> list[DatasetResult]:
    """Sample every problem of every dataset ``k`` times and score each sample.

    Uses ``cfg``'s engine (``generator.engine``, kind overridden by ``engine_kind``; its
    max_model_len raised to fit the longest prompt plus ``max_tokens``), sandbox
    (``tools.sandbox``, ``tools.max_output_chars``) and verifier (``verifier.pool``)
    settings. Sample j of problem i is seeded ``seed``-derived and reproducible on one
    engine. ``on_sample(dataset, sample)`` is called as samples finish (progress).
    """
    from transformers import AutoTokenizer

    from actors.engines import create_engine
    from actors.rollout import RolloutSpec, run_trajectory
    from tools_sandbox import SandboxPool, format_for_model
    from training.chat import encode_prompt
    from training.rewards import VerifierPool

    if k < 1 or max_tokens < 1 or max_turns < 1 or temperature <= 0:
        raise EvalError(f"need k >= 1, max_tokens >= 1, max_turns >= 1, temperature > 0; got k={k}, "
                        f"max_tokens={max_tokens}, max_turns={max_turns}, temperature={temperature}")  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = {(name, p.id): encode_prompt(tokenizer, p.problem) for name, ps in datasets.items() for p in ps}
    longest = max((len(ids) for ids in prompts.values()), default=0)
    ecfg = cfg.generator.engine
    ecfg = ecfg.model_copy(update={"kind": engine_kind or ecfg.kind,
                                   "max_model_len": max(ecfg.max_model_len, longest + max_tokens + 1)})  # fmt: skip
    results = [DatasetResult(name, k, temperature, max_tokens, max_turns) for name in datasets]
    limit = trio.CapacityLimiter(ecfg.max_running)
    async with (
        create_engine(ecfg, model_dir) as engine,
        SandboxPool(cfg.tools.sandbox) as sandbox,
        VerifierPool(cfg.verifier.pool) as verifier,
    ):

        async def one(result: DatasetResult, p: Problem, j: int, n: int) -> None:
            async def call_tool(code: str, turn: int) -> tuple[str, str]:
                r = await sandbox.execute(code, timeout_s=cfg.tools.sandbox.timeout_s)
                return r.status, format_for_model(r, cfg.tools.max_output_chars)

            spec = RolloutSpec(
                request_id=f"eval-{result.dataset}-{p.id}-{j}", prompt_ids=prompts[(result.dataset, p.id)],
                max_tokens=max_tokens, max_turns=max_turns, temperature=temperature,
                seed=(seed * 1_000_003 + n * 1009) % 2**31,  # turn t uses seed + t: far apart per sample
            )  # fmt: skip
            async with limit:
                traj = await run_trajectory(engine, tokenizer, spec, call_tool)
            score = await verifier.score(traj.response_text, p.answer)
            sample = Sample(
                problem_id=p.id, index=j, correct=bool(score.correct), response_tokens=int(traj.loss_mask.sum()),
                tool_calls=len(traj.tool_calls), tool_errors=sum(c["status"] != "ok" for c in traj.tool_calls),
                turns=traj.turns, finish_reason=traj.finish_reason, extracted=score.extracted,
            )  # fmt: skip
            result.samples.append(sample)
            if on_sample is not None:
                on_sample(result.dataset, sample)

        n = 0
        for result in results:
            t0 = time.monotonic()
            async with trio.open_nursery() as nursery:
                for p in datasets[result.dataset]:
                    for j in range(k):
                        nursery.start_soon(one, result, p, j, n)
                        n += 1
            result.samples.sort(key=lambda s: (s.problem_id, s.index))
            result.seconds = time.monotonic() - t0
    return results


# --------------------------------------------------------------------------- logging the result


def eval_events(run_id: str, target: Target, results: list[DatasetResult]) -> list:
    """One EvalCompleted envelope per dataset result, from source ``eval``."""
    from protocol.events import Envelope, EvalCompleted, new_event_id

    envs = []
    for i, r in enumerate(results):
        ev = EvalCompleted(
            dataset=r.dataset, step=target.step, weights_version=target.weights_version, k=r.k,
            temperature=r.temperature, pass_at_1=r.pass_at_1, n_problems=r.n_problems,
            mean_response_tokens=r.mean_response_tokens, mean_tool_calls=r.mean_tool_calls,
            tool_error_rate=r.tool_error_rate, max_tokens=r.max_tokens, max_turns=r.max_turns,
            model=str(target.model_dir),
        )  # fmt: skip
        envs.append(Envelope(
            event_id=new_event_id(), type=ev.TYPE, schema_version=ev.VERSION, run_id=run_id, source=EVAL_SOURCE,
            seq=time.time_ns() // 1000 + i, ts=time.time(), causation_id=None, payload=ev,
        ))  # fmt: skip
    return envs


def append_eval_events(cfg: Config, target: Target, results: list[DatasetResult], log_url: str | None = None) -> str:
    """Append one EvalCompleted per dataset to the run's log; returns the run id used.

    ``log_url``: another log (run directory, .db file or URL, ``#RUN_ID`` to pick the run;
    default its latest run) instead of the run's own.
    """
    from store import EventLog, StoreError

    url, run_id = cfg.store_url(), cfg.run.run_id or None
    if log_url:
        url, _, picked = log_url.rpartition("#") if "#" in log_url else (log_url, "", "")
        run_id = picked or None
    try:
        with EventLog.open(url) as log:
            if log_url or run_id is None:  # the run's own id needs no events yet
                run_id = log.resolve_run(run_id)
            log.append(eval_events(run_id, target, results))
    except StoreError as e:
        raise EvalError(f"cannot log the evaluation to {url}: {e}") from None
    return run_id


def format_result(r: DatasetResult) -> str:
    err = "–" if r.tool_error_rate is None else f"{r.tool_error_rate:.3f}"
    return (
        f"{r.dataset}: avg pass@1 {r.pass_at_1:.3f} over k={r.k} samples of {r.n_problems} problems "
        f"(pass@{r.k} {r.pass_at_k():.3f}); mean response {r.mean_response_tokens:.1f} tokens; "
        f"tool calls/traj {r.mean_tool_calls:.2f}; tool-error rate {err} ({r.n_tool_calls} calls); "
        f"T={r.temperature:g}, {r.max_tokens} tokens, {r.max_turns} turns; {r.seconds:.1f}s"
    )


def eval_command(
    path: str = typer.Argument(..., metavar="MODEL_OR_RUN", help="a run directory, its weights/vNNNNN, or a HF model directory"),
    data: Optional[list[str]] = typer.Option(
        None, "--data", "-d", help="dataset: a .jsonl/.parquet file or builtin:demo-eval (repeatable; default: the run's held-out set)"
    ),
    k: Optional[int] = typer.Option(None, "--k", "-k", help="samples per problem (default: the config's eval.k; paper: 16)"),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", help="sampling temperature (default: eval.temperature; paper: 0.6)"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="token budget per sample, model + tool tokens (default: eval.max_tokens; paper: 30K)"),
    max_turns: Optional[int] = typer.Option(None, "--max-turns", help="assistant turns per sample (default: eval.max_turns; paper: 30)"),
    max_problems: Optional[int] = typer.Option(None, "--max-problems", help="first N problems per dataset, 0 = all (default: eval.max_problems)"),
    engine: Optional[str] = typer.Option(None, "--engine", help="auto | vllm | hf (default: the config's generator.engine.kind)"),
    weights: Optional[str] = typer.Option(None, "--weights", "-w", help="for a run: latest (default), initial, a version (12 or v00012) or a model directory"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="TOML/JSON config for data, engine, sandbox, verifier and eval settings (default: the run's)"),
    log: Optional[str] = typer.Option(None, "--log", help="event log (run dir, .db or URL) to append EvalCompleted to (default: the run's)"),
    no_log: bool = typer.Option(False, "--no-log", help="do not append EvalCompleted to any log"),
    seed: int = typer.Option(0, "--seed", help="sampling seed"),
    json_out: Optional[str] = typer.Option(None, "--json", help="also write the results (and every sample) as JSON here"),
) -> None:
    """Average pass@1 over k samples per problem, with tool calls in the sandbox and the real verifier.

    Example: reckon eval runs/demo-20260101-120000 --k 4
    """
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the results, not the engine's start-up log
    from actors.engines import EngineError
    from tools_sandbox import SandboxError

    if engine is not None and engine not in ("auto", "vllm", "hf"):
        _fail(f"--engine {engine!r}: choose auto, vllm or hf")
    try:
        target = resolve_target(path, weights=weights, config=config)
        cfg = target.config
        ev: EvalSection = cfg.eval
        settings = dict(
            k=ev.k if k is None else k,
            temperature=ev.temperature if temperature is None else temperature,
            max_tokens=ev.max_tokens if max_tokens is None else max_tokens,
            max_turns=ev.max_turns if max_turns is None else max_turns,
        )
        sets = load_eval_sets(cfg, data, ev.max_problems if max_problems is None else max_problems)
        where = f"run {target.run_dir}, weights v{target.weights_version:05d} (step {target.step})" if target.run_dir else ""
        typer.echo(f"evaluating {target.model_dir}" + (f" ({where})" if where else "") + ": "
                   + ", ".join(f"{n} ({len(ps)} problems)" for n, ps in sets.items())
                   + f"; k={settings['k']}, T={settings['temperature']:g}, {settings['max_tokens']} tokens, "
                   f"{settings['max_turns']} turns")  # fmt: skip
        results = trio.run(lambda: evaluate(target.model_dir, sets, cfg, engine_kind=engine, seed=seed, **settings))
    except (EvalError, ConfigError) as e:
        _fail(str(e))
    except (SandboxError, EngineError, OSError) as e:  # the sandbox, engine or model could not start
        _fail(f"{type(e).__name__}: {e}", 1)
    except BaseExceptionGroup as eg:  # the same, from inside a nursery
        leaf = _first_leaf(eg)
        if not isinstance(leaf, (SandboxError, EngineError, OSError)):
            raise
        _fail(f"{type(leaf).__name__}: {leaf}", 1)
    for r in results:
        typer.echo(format_result(r))
    if json_out:
        Path(json_out).write_text(json.dumps(
            [{**r.summary(), "model": str(target.model_dir), "weights_version": target.weights_version,
              "step": target.step, "samples": [s.__dict__ for s in r.samples]} for r in results], indent=1))  # fmt: skip
    if not no_log and (log or target.run_dir is not None):
        try:
            run_id = append_eval_events(cfg, target, results, log)
        except EvalError as e:
            _fail(str(e), 1)
        typer.echo(f"logged {len(results)} EvalCompleted to run {run_id} ({log or cfg.store_url()})")


def _first_leaf(eg: BaseException) -> BaseException:
    while isinstance(eg, BaseExceptionGroup):
        eg = eg.exceptions[0]
    return eg


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)
