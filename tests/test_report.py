"""``reckon report``: PNG, HTML and TensorBoard output from synthetic event logs; bad inputs."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from protocol.events import (
    Envelope,
    EvalCompleted,
    RewardAssigned,
    RunCompleted,
    RunStarted,
    StageStarted,
    TrainStepCompleted,
)
from store import EventLog
from store.report import (
    PNG_NAME,
    ReportError,
    build_report,
    common_last_step,
    load_run,
    report_command,
    rl_positions,
    summarize,
)
from store.testing import Emitter, synthetic_run, trajectory


def recipe_run(
    run_id: str, *, roc: bool = True, sft_steps: int = 4, rl_steps: tuple[int, ...] = (6, 3), seed: int = 0
) -> Iterator[Envelope]:
    """Events of a small multi-stage recipe: SFT, then RL stages, evaluations at stage ends.

    Training rewards and tool use rise over RL steps; positives' tool-error rate falls
    faster with ``roc``. Each evaluation also logs probe trajectories (stage "eval",
    reward 1, 9 tool calls) that a report must keep out of the training curves.
    """
    rng = np.random.default_rng(seed)
    emit = Emitter(run_id)
    config = {"run": {"name": run_id, "seed": seed}, "rollout": {"roc": {"mode": "release" if roc else "none"}}}
    yield emit("scheduler", RunStarted(config=config, run_dir=f"runs/{run_id}", version="test"))
    step, total = 0, sum(rl_steps)

    def stage(name: str, index: int, kind: str, steps: int) -> Envelope:
        return emit("scheduler", StageStarted(
            stage=name, index=index, kind=kind, steps=steps, max_tokens=256, max_turns=4, prompts_per_step=2,
            rollouts_per_prompt=4, group_size=2, lr=1e-6, optimizer_reset=index == 3, n_problems=50,
        ))  # fmt: skip

    def evaluate(acc: float) -> Iterator[Envelope]:
        for k in range(2):
            rid = f"eval-s{step}-{k}"
            calls = [{"call_id": f"{rid}c{i}", "status": "ok"} for i in range(9)]
            yield emit("generator-0", trajectory(rid, group_id=f"eval-s{step}", step=step, stage="eval",
                                                 n_response=32, tool_calls=calls, rng=rng))  # fmt: skip
            yield emit("verifier-0", RewardAssigned(
                rollout_id=rid, group_id=f"eval-s{step}", step=step, stage="eval", reward=1.0, correct=True,
                extracted="42", gold="42", method="exact", seconds=0.0, answer_tags=1, turns=10,
            ))  # fmt: skip
        yield emit("scheduler", EvalCompleted(
            dataset="demo-eval", step=step, weights_version=step, k=4, temperature=0.6, pass_at_1=acc,
            n_problems=20, mean_response_tokens=100.0, mean_tool_calls=1.0,
        ))  # fmt: skip

    if sft_steps:
        yield stage("sft", 0, "sft", sft_steps)
        for k in range(sft_steps):
            step += 1
            yield emit("learner", TrainStepCompleted(
                step=step, stage="sft", kind="sft", loss=3.0 / (k + 1), metrics={"loss/sft": 3.0 / (k + 1)},
                n_sequences=8, n_tokens=800, seconds=0.5, weights_version=step,
            ))  # fmt: skip
        yield from evaluate(0.1)
    done = 0
    for s, n in enumerate(rl_steps, start=1):
        yield stage(f"rl{s}", s, "rl", n)
        for _ in range(n):
            step += 1
            done += 1
            progress = done / total
            for g in range(2):
                for r in range(4):
                    rid = f"s{step}g{g}r{r}"
                    correct = bool(rng.random() < 0.2 + 0.6 * progress)
                    n_calls = int(rng.integers(0, 2) + round(2 * progress))
                    err_p = (0.5 - 0.4 * progress) if roc else 0.5
                    calls = [
                        {"call_id": f"{rid}c{i}", "status": "error" if rng.random() < err_p else "ok"}
                        for i in range(n_calls)
                    ]
                    traj = trajectory(rid, group_id=f"s{step}g{g}", step=step, stage=f"rl{s}",
                                      n_response=int(60 + 40 * progress + rng.integers(0, 20)), tool_calls=calls,
                                      rng=rng)  # fmt: skip
                    yield emit("generator-0", traj)
                    yield emit("verifier-0", RewardAssigned(
                        rollout_id=rid, group_id=f"s{step}g{g}", step=step, stage=f"rl{s}", reward=float(correct),
                        correct=correct, extracted="42", gold="42", method="exact", seconds=0.0, answer_tags=1,
                        turns=n_calls + 1,
                    ))  # fmt: skip
            loss = float(rng.normal()) * 0.02
            yield emit("learner", TrainStepCompleted(
                step=step, stage=f"rl{s}", kind="rl", loss=loss,
                metrics={"loss/pg": loss, "actor/clip_frac_low": 0.002 + 0.001 * rng.random(),
                         "actor/clip_frac_high": 0.01 + 0.005 * rng.random(),
                         "actor/clip_frac_dual": 0.0005 * rng.random(), "actor/grad_norm": float(rng.random()),
                         "actor/lr": 1e-6, "perf/tokens_per_s": 1e3},
                n_sequences=4, n_tokens=400, seconds=1.0, weights_version=step,
            ))  # fmt: skip
        yield from evaluate(0.1 + 0.6 * done / total)
    yield emit("scheduler", RunCompleted(steps=step, seconds=60.0, status="ok"))


def _write(run_dir: Path, envs) -> Path:
    with EventLog.open(run_dir) as log:
        log.append(list(envs))
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("runs")
    roc = _write(base / "roc", recipe_run("roc-run", roc=True, seed=1))
    grpo = _write(base / "grpo", recipe_run("grpo-run", roc=False, seed=2))
    return roc, grpo


def _fingerprint(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.glob("events.db*"))}


def test_load_run_matches_the_logged_events(runs) -> None:
    roc, _ = runs
    run = load_run(str(roc))
    assert run.run_id == "roc-run" and run.name == "roc-run" and run.status == "ok"
    assert [s.name for s in run.stages] == ["sft", "rl1", "rl2"]
    assert [s.start_step for s in run.stages] == [1, 5, 11]
    assert [r.kind for r in run.steps] == ["sft"] * 4 + ["rl"] * 9
    sft, rl = run.steps[0], run.steps[4]
    assert sft.reward is None and sft.n_trajectories == 0 and sft.loss == pytest.approx(3.0)
    # The eval probes (reward 1, 9 tool calls, logged at SFT's last step) stay out.
    assert rl.n_trajectories == 8 and run.steps[3].n_trajectories == 0
    assert max(r.tool_calls or 0 for r in run.steps) < 9
    assert rl.clip_frac_high == pytest.approx(rl.metrics["actor/clip_frac_high"])
    assert [e["step"] for e in run.evals] == [4, 10, 13]
    assert run.evals[0]["pass_at_1"] == pytest.approx(0.1)


def test_tool_error_rates_count_failed_calls_over_calls(tmp_path) -> None:
    envs = list(synthetic_run("tiny", steps=1, groups=1, group_size=6, seed=3))
    _write(tmp_path, envs)
    row = load_run(str(tmp_path)).steps[0]
    calls = {}  # rollout -> (calls, failed)
    correct = {}
    for env in envs:
        p = env.payload
        if env.type == "TrajectoryCompleted":
            calls[p.rollout_id] = (len(p.tool_calls), sum(c["status"] != "ok" for c in p.tool_calls))
        elif env.type == "RewardAssigned":
            correct[p.rollout_id] = p.correct
    n, f = map(sum, zip(*calls.values()))
    pos = [calls[r] for r in calls if correct[r]]
    pn, pf = (sum(c for c, _ in pos), sum(e for _, e in pos))
    assert row.tool_error_rate == (pytest.approx(f / n) if n else None)
    assert row.tool_error_rate_pos == (pytest.approx(pf / pn) if pn else None)
    assert row.tool_calls == pytest.approx(n / len(calls))
    assert row.reward == pytest.approx(sum(correct.values()) / len(correct))


def test_single_run_report(runs, tmp_path) -> None:
    roc, _ = runs
    before = _fingerprint(roc)
    paths = build_report([str(roc)], str(tmp_path / "out"))
    assert _fingerprint(roc) == before  # read-only
    png = Path(paths["png"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000
    html = Path(paths["html"]).read_text()
    assert "data:image/png;base64," in html
    # the per-step table: one row per step, SFT rows marked
    steps_table = html[html.index('<table class="steps">') :]
    assert len(re.findall(r"<tr( class=\"sft\")?><td>\d+</td>", steps_table)) == 13
    assert steps_table.count('<tr class="sft">') == 4
    assert "demo-eval" in html and "rollout.roc.mode" in html and "release" in html
    tb = list(Path(paths["tensorboard"]).glob("roc-run/events.out.tfevents.*"))
    assert len(tb) == 1 and tb[0].stat().st_size > 0


def test_tensorboard_scalars(runs, tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    roc, _ = runs
    paths = build_report([str(roc)], str(tmp_path))
    build_report([str(roc)], str(tmp_path))  # rebuilding must not duplicate points
    acc = EventAccumulator(str(Path(paths["tensorboard"]) / "roc-run"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"rollout/reward", "rollout/tool_calls", "rollout/tool_error_rate_pos", "eval/demo-eval/pass_at_1",
                "loss/pg", "loss/sft", "actor/clip_frac_low", "actor/clip_frac_high", "actor/clip_frac_dual"}  # fmt: skip
    assert expected <= tags
    assert [e.step for e in acc.Scalars("eval/demo-eval/pass_at_1")] == [4, 10, 13]
    assert [e.step for e in acc.Scalars("rollout/reward")] == list(range(5, 14))


def test_comparison_of_two_runs(runs, tmp_path) -> None:
    roc, grpo = runs
    paths = build_report([str(roc), str(grpo)], str(tmp_path), labels=["GRPO-RoC", "GRPO"])
    html = Path(paths["html"]).read_text()
    assert "GRPO-RoC vs GRPO" in html
    assert {p.name for p in Path(paths["tensorboard"]).iterdir()} == {"GRPO-RoC", "GRPO"}
    single = build_report([str(roc)], str(tmp_path / "single"))
    assert Path(paths["png"]).read_bytes() != Path(single["png"]).read_bytes()


def test_summary_compares_runs_at_the_same_step_count(runs, tmp_path) -> None:
    roc, _ = runs
    long = load_run(str(roc))  # SFT steps 1-4, RL steps 5-13, evals at 4, 10, 13
    short = load_run(str(_write(tmp_path, recipe_run("short", rl_steps=(3,)))))  # RL steps 5-7
    assert common_last_step([long]) is None and common_last_step([long, short]) == 7
    s = summarize(long, max_step=7)
    assert s["rl_steps"] == 3 and s["eval/demo-eval/last"] == pytest.approx(0.1)
    first = [r.reward for r in long.steps if r.step == 5][0]
    assert s["reward_first"] == pytest.approx(first)
    full = summarize(long)
    assert full["rl_steps"] == 9 and full["eval/demo-eval/last"] == pytest.approx(0.7)
    last = [r.tool_error_rate_pos for r in long.steps[-2:] if r.tool_error_rate_pos is not None]
    assert full["tool_error_rate_pos_last"] == pytest.approx(sum(last) / len(last))


def test_url_with_run_id_picks_the_run(tmp_path) -> None:
    db = tmp_path / "shared.db"
    _write(db, recipe_run("first", sft_steps=2, rl_steps=(2,)))
    _write(db, synthetic_run("second", steps=3))
    assert load_run(str(db)).run_id == "second"  # default: the latest
    run = load_run(f"sqlite:///{db}#first")
    assert run.run_id == "first" and len(run.steps) == 4
    with pytest.raises(ReportError, match="'nope'"):
        load_run(f"{db}#nope")


def test_bad_inputs_name_the_input(tmp_path) -> None:
    with pytest.raises(ReportError, match=re.escape(str(tmp_path / "missing"))):
        build_report([str(tmp_path / "missing")], str(tmp_path / "out"))
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(ReportError, match="not_a_run is not a run directory"):
        build_report([str(tmp_path / "not_a_run")], str(tmp_path / "out"))
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ReportError, match="junk.db"):
        build_report([str(junk)], str(tmp_path / "out"))
    empty = tmp_path / "empty"
    EventLog.open(empty).close()  # a log with no events
    with pytest.raises(ReportError, match="no events"):
        build_report([str(empty)], str(tmp_path / "out"))
    started = tmp_path / "started"
    _write(started, list(recipe_run("only-start", sft_steps=0, rl_steps=()))[:1])
    with pytest.raises(ReportError, match="only-start has no training steps"):
        build_report([str(started)], str(tmp_path / "out"))
    with pytest.raises(ReportError, match="one --label per RUN"):
        build_report([str(tmp_path / "missing")], str(tmp_path / "out"), labels=["a", "b"])
    assert not (tmp_path / "out").exists()


def test_cli(runs, tmp_path) -> None:
    roc, grpo = runs
    app = typer.Typer()
    app.command("report")(report_command)
    app.command("other")(lambda: None)  # two commands: typer keeps the command name
    out = CliRunner().invoke(app, ["report", str(roc), str(grpo), "--out", str(tmp_path), "-l", "RoC", "-l", "GRPO"])
    assert out.exit_code == 0, out.output
    assert "RoC: 9 RL steps up to step 13;" in out.stdout and f"png: {tmp_path / PNG_NAME}" in out.stdout
    out = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert out.exit_code == 1 and "nope: no such run directory" in out.output


def test_rl_step_axis_and_steps_without_an_update(tmp_path) -> None:
    """RL panels count RL steps; a stage whose first step trained nothing still starts there."""
    envs = [e for e in recipe_run("gap", sft_steps=4, rl_steps=(3, 2))
            if not (e.type == "TrainStepCompleted" and e.payload.step in (5, 8))]  # fmt: skip
    run = load_run(str(_write(tmp_path / "gap", envs)))
    assert rl_positions(run) == {5: 1, 6: 2, 7: 3, 8: 4, 9: 5}
    assert [(s.name, s.start_step) for s in run.stages] == [("sft", 1), ("rl1", 5), ("rl2", 8)]
    no_update = [r for r in run.steps if r.step in (5, 8)]
    assert [(r.kind, r.stage, r.n_trajectories) for r in no_update] == [(None, "rl1", 8), (None, "rl2", 8)]
    s = summarize(run)
    assert s["rl_steps"] == 5
    paths = build_report([str(tmp_path / "gap")], str(tmp_path / "out"))
    assert Path(paths["png"]).stat().st_size > 50_000


def test_standalone_evaluations_are_reported(runs, tmp_path) -> None:
    """EvalCompleted from ``reckon eval`` (source "eval", with its tool-error rate) joins the scheduler's."""
    from store.testing import Emitter

    roc, _ = runs
    db = tmp_path / "with_eval.db"
    with EventLog.open(roc, readonly=True) as src, EventLog.open(db) as dst:
        dst.append([env for _, env in src.read()])
        dst.append([Emitter("roc-run")("eval", EvalCompleted(
            dataset="demo-eval", step=7, weights_version=7, k=16, temperature=0.6, pass_at_1=0.375, n_problems=8,
            mean_response_tokens=80.0, mean_tool_calls=1.5, tool_error_rate=0.125, max_tokens=224, max_turns=3,
            model="runs/x/weights/v00007"))])  # fmt: skip
    run = load_run(str(db))
    assert [(e["step"], e["source"]) for e in run.evals] == [(4, "scheduler"), (7, "eval"), (10, "scheduler"),
                                                              (13, "scheduler")]  # fmt: skip
    assert run.evals[1]["tool_error_rate"] == 0.125
    # The scheduler's events carry none: counted from its probe trajectories (9 ok calls each).
    assert run.evals[0]["tool_error_rate"] == 0.0
    html = Path(build_report([str(db)], str(tmp_path / "out"))["html"]).read_text()
    assert "reckon eval" in html and "224 / 3" in html and "0.125" in html


@pytest.mark.postgres
def test_postgresql_log_reports_the_same_numbers_as_sqlite(runs, tmp_path) -> None:
    import uuid

    import sqlalchemy as sa

    from tests.test_store import _pg_admin_url

    admin = _pg_admin_url()
    if admin is None:
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (database 'test', user root or postgres)")
    schema = f"reckon_report_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(admin)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    try:
        url = f"{admin}?options=-csearch_path%3D{schema}"
        roc, _ = runs
        with EventLog.open(roc, readonly=True) as src, EventLog.open(url) as dst:
            dst.append([env for _, env in src.read()])
        expected = load_run(str(roc))
        got = load_run(f"{url}#roc-run")
        assert got.steps == expected.steps and got.stages == expected.stages
        assert [e["pass_at_1"] for e in got.evals] == pytest.approx([e["pass_at_1"] for e in expected.evals])
        paths = build_report([f"{url}#roc-run"], str(tmp_path))
        assert Path(paths["png"]).stat().st_size > 50_000
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()
