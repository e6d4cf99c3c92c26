"""``reckon eval``: pass@1 accounting through the real sandbox and verifier, weights resolution, logging."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import trio
import typer
from typer.testing import CliRunner

from actors.config import parse_config
from actors.engines import TurnOutput
from actors.evaluate import (
    DatasetResult,
    EvalError,
    Sample,
    Target,
    append_eval_events,
    eval_command,
    evaluate,
    resolve_target,
)
from store import EventLog
from store.report import load_run
from tests._tiny import build_tiny
from training.chat import tool_call_text
from training.data import Problem


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "model")


def _cfg(**extra):
    """A fast config: a sandbox that preloads only math, one verifier worker."""
    return parse_config({"tools": {"sandbox": {"slots": 2, "preload": ["math"], "timeout_s": 5.0}},
                         "verifier": {"pool": {"workers": 1}}, **extra})  # fmt: skip


class ScriptedEngine:
    """An engine that writes what a good policy would, so the outcome is known in advance.

    Turn 1: a tool call that prints the value of the problem's expression, except for odd
    samples, whose code raises. Turn 2: the number the tool printed (stdout) as the
    boxed answer, or no answer when there is none. Only the sandbox running the code and
    the verifier checking the answer make a sample correct.
    """

    def __init__(self, model_dir) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.version = 0
        self.requests: list[str] = []

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    async def generate(self, request_id, prompt_ids, spec) -> TurnOutput:
        self.requests.append(request_id)
        text = self.tok.decode(prompt_ids, skip_special_tokens=False)
        if "<tool_response>" not in text:
            expr = re.findall(r"compute: ([0-9*+ ]+)", text)[-1].strip()
            broken = int(request_id.rsplit("-", 1)[1]) % 2 == 1
            out, finish = tool_call_text("print(1 / 0)" if broken else f"print({expr})"), "stop"
        else:
            response = text.rsplit("<tool_response>", 1)[1]
            numbers = re.findall(r"stdout:\s*(\d+)\s", response)
            out = f"<answer>\\boxed{{{numbers[-1]}}}</answer>" if numbers else "no idea"
            finish = "eos"
        ids = self.tok.encode(out, add_special_tokens=False)
        return TurnOutput(ids, [0.0] * len(ids), [0] * len(ids), finish, 0)


def test_pass_at_1_over_k_samples_through_sandbox_and_verifier(model_dir, monkeypatch) -> None:
    engine = ScriptedEngine(model_dir)
    monkeypatch.setattr("actors.engines.create_engine", lambda cfg, path: engine)
    problems = [Problem("p1", "compute: 6 * 7", "42"), Problem("p2", "compute: 12 + 30 + 1", "43"),
                Problem("p3", "compute: 99 * 3", "297")]  # fmt: skip
    sets = {"toy": problems, "toy2": problems[:1]}
    seen = []
    results = trio.run(lambda: evaluate(model_dir, sets, _cfg(), k=4, temperature=0.6, max_tokens=200, max_turns=3,
                                        on_sample=lambda d, s: seen.append((d, s.problem_id, s.index))))  # fmt: skip
    toy, toy2 = results
    assert (toy.dataset, toy.n_problems, len(toy.samples), toy.k) == ("toy", 3, 12, 4)
    assert len(seen) == 12 + 4 and len(set(seen)) == 16
    # Samples 0 and 2 of each problem compute the answer in the sandbox; 1 and 3 crash there.
    assert toy.pass_at_1 == pytest.approx(0.5) and toy.pass_at_k() == 1.0
    assert [s.correct for s in toy.samples if s.problem_id == "p3"] == [True, False, True, False]
    assert toy.mean_tool_calls == 1.0 and toy.n_tool_calls == 12 and toy.tool_error_rate == pytest.approx(0.5)
    assert all(s.turns == 2 and s.finish_reason == "stop" for s in toy.samples)
    assert {s.extracted for s in toy.samples if s.correct} == {"42", "43", "297"}
    # Response length counts model tokens only: the tool response is not the model's.
    call_tokens = len(engine.tok.encode(tool_call_text("print(6 * 7)"), add_special_tokens=False))
    answer_tokens = len(engine.tok.encode("<answer>\\boxed{42}</answer>", add_special_tokens=False))
    assert [s.response_tokens for s in toy2.samples][0] == call_tokens + answer_tokens
    assert toy2.pass_at_1 == pytest.approx(0.5)
    s = toy.summary()
    assert s["pass_at_1"] == toy.pass_at_1 and s["tool_error_rate"] == toy.tool_error_rate


def test_dataset_result_without_tool_calls_has_no_error_rate() -> None:
    r = DatasetResult("d", k=2, temperature=0.6, max_tokens=10, max_turns=1)
    r.samples = [Sample("a", 0, True, 5, 0, 0, 1, "stop", "1"), Sample("a", 1, False, 7, 0, 0, 1, "length", None)]
    assert r.pass_at_1 == 0.5 and r.tool_error_rate is None and r.mean_response_tokens == 6.0


def _fake_run(tmp_path: Path, model_dir: Path, versions=(1, 3)) -> Path:
    run = tmp_path / "run"
    cfg = _cfg(run={"run_dir": str(run), "run_id": "r-1", "name": "r"}, model={"path": str(model_dir)})
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    for v in versions:  # published weights: copies of the model
        shutil.copytree(model_dir, run / "weights" / f"v{v:05d}")
    (run / "weights" / ".v00004.tmp-abcd").mkdir()  # a half-written publish is not a version
    return run


def test_resolve_target(tmp_path, model_dir) -> None:
    run = _fake_run(tmp_path, model_dir)
    t = resolve_target(str(run))
    assert t.model_dir == run / "weights" / "v00003" and t.weights_version == 3 and t.run_dir == run
    assert t.step == 3  # no log: one version per step
    assert resolve_target(str(run), weights="1").model_dir == run / "weights" / "v00001"
    assert resolve_target(str(run / "weights" / "v00001")).weights_version == 1  # a run's weights dir
    initial = resolve_target(str(run), weights="initial")
    assert initial.model_dir == model_dir and initial.weights_version == 0
    bare = resolve_target(str(model_dir))
    assert bare.run_dir is None and bare.config.eval.k == 4
    with pytest.raises(EvalError, match="has no v00007"):
        resolve_target(str(run), weights="v00007")
    with pytest.raises(EvalError, match="nope: no such run"):
        resolve_target(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="neither a run directory"):
        resolve_target(str(tmp_path / "empty"))


def test_results_are_logged_as_eval_completed_and_reported(tmp_path, model_dir) -> None:
    from protocol.events import RunStarted
    from store.testing import Emitter

    run = _fake_run(tmp_path, model_dir)
    with EventLog.open(run) as log:
        log.append([Emitter("r-1")("scheduler", RunStarted(config={}, run_dir=str(run), version="t"))])
    target = resolve_target(str(run))
    r = DatasetResult("demo-eval", k=4, temperature=0.6, max_tokens=64, max_turns=2)
    r.samples = [Sample("a", i, i == 0, 10, 2, i % 2, 3, "stop", None) for i in range(4)]
    assert append_eval_events(target.config, target, [r]) == "r-1"
    with EventLog.open(run, readonly=True) as log:
        [(_, env)] = list(log.read(types=["EvalCompleted"]))
    ev = env.payload
    assert env.source == "eval" and env.run_id == "r-1"
    assert (ev.dataset, ev.step, ev.weights_version, ev.k, ev.pass_at_1) == ("demo-eval", 3, 3, 4, 0.25)
    assert ev.tool_error_rate == pytest.approx(0.25) and ev.max_tokens == 64 and ev.model.endswith("v00003")
    [e] = load_run(str(run)).evals
    assert e["source"] == "eval" and e["tool_error_rate"] == pytest.approx(0.25)
    with pytest.raises(EvalError, match="cannot log"):
        append_eval_events(target.config, target, [r], log_url=f"{run}#no-such-run")


def test_cli_prints_avg_pass_at_1_and_logs(tmp_path, model_dir, monkeypatch) -> None:
    monkeypatch.setattr("actors.engines.create_engine", lambda cfg, path: ScriptedEngine(model_dir))
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"compute: {i} * 11", "answer": str(11 * i)}) + "\n"
                            for i in range(1, 4)))  # fmt: skip
    run = _fake_run(tmp_path, model_dir)
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("other")(lambda: None)
    out = CliRunner().invoke(app, ["eval", str(run), "--data", str(data), "--k", "4", "--json", str(tmp_path / "r.json")])
    assert out.exit_code == 0, out.output
    assert "toy.jsonl: avg pass@1 0.500 over k=4 samples of 3 problems" in out.stdout
    assert "tool-error rate 0.500 (12 calls)" in out.stdout and "logged 1 EvalCompleted to run r-1" in out.stdout
    assert json.loads((tmp_path / "r.json").read_text())[0]["pass_at_1"] == 0.5
    bad = CliRunner().invoke(app, ["eval", str(run), "--weights", "9"])
    assert bad.exit_code == 2 and "has no v00009" in bad.output
    bad = CliRunner().invoke(app, ["eval", str(run), "--data", str(tmp_path / "missing.jsonl")])
    assert bad.exit_code == 2 and "missing.jsonl" in bad.output


@pytest.mark.slow
def test_real_engine_on_the_tiny_model(tmp_path, model_dir) -> None:
    """The real HF engine end to end (a random tiny model: the numbers are whatever it samples)."""
    target = Target(model_dir=model_dir, config=_cfg())
    problems = [Problem("p1", "compute: 6 * 7", "42"), Problem("p2", "compute: 2 + 2", "4")]
    [r] = trio.run(lambda: evaluate(target.model_dir, {"toy": problems}, target.config, k=4, temperature=0.6,
                                    max_tokens=48, max_turns=2, engine_kind="hf"))  # fmt: skip
    assert len(r.samples) == 8 and 0.0 <= r.pass_at_1 <= 1.0
    assert all(0 < s.response_tokens <= 48 for s in r.samples)
