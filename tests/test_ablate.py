"""``reckon ablate``: the two arms' configs, the comparison at the same step count, the orchestration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import actors.launcher
from actors.ablate import ARMS, AblateError, ablate, ablate_command, arm_configs, compare, format_comparison
from actors.config import load_config, parse_config
from store import EventLog
from tests.test_report import recipe_run

ROOT = Path(__file__).resolve().parents[1]


def test_arm_configs_differ_only_in_roc_mode(tmp_path) -> None:
    cfg = load_config(ROOT / "configs" / "demo.toml")
    arms = arm_configs(cfg, tmp_path)
    assert list(arms) == ["GRPO-RoC", "GRPO"]
    roc, grpo = arms.values()
    assert roc.rollout.roc.mode == "release" and grpo.rollout.roc.mode == "none"
    assert roc.run.run_dir == str(tmp_path / "grpo-roc") and grpo.run.run_dir == str(tmp_path / "grpo")
    strip = lambda c: {**c.model_dump(), "run": None, "rollout": {**c.rollout.model_dump(), "roc": None}}  # noqa: E731
    assert strip(roc) == strip(grpo) == strip(cfg)
    assert roc.run.seed == grpo.run.seed == cfg.run.seed
    # A config that is itself plain GRPO still gets a RoC arm; the paper's sampling variant is kept.
    plain = parse_config({"rollout": {"roc": {"mode": "none"}}})
    assert arm_configs(plain, tmp_path)["GRPO-RoC"].rollout.roc.mode == "release"
    paper = parse_config({"rollout": {"roc": {"mode": "paper"}}})
    assert arm_configs(paper, tmp_path)["GRPO-RoC"].rollout.roc.mode == "paper"


def _write(run_dir: Path, envs) -> None:
    with EventLog.open(run_dir) as log:
        log.append(list(envs))


@pytest.fixture
def arms(tmp_path) -> dict[str, str]:
    """Two logged runs: positives' tool errors fall with RoC, stay at 0.5 without (tests/test_report.py)."""
    _write(tmp_path / "roc", recipe_run("roc", roc=True, seed=1, sft_steps=3, rl_steps=(6, 4)))
    _write(tmp_path / "grpo", recipe_run("grpo", roc=False, seed=1, sft_steps=3, rl_steps=(6, 3)))
    return {"GRPO-RoC": str(tmp_path / "roc"), "GRPO": str(tmp_path / "grpo")}


def test_compare_at_the_same_rl_step_count(arms) -> None:
    cmp = compare(arms)
    assert cmp["rl_steps_compared"] == 9  # the GRPO run stopped after 9 RL steps
    roc, grpo = cmp["arms"]["GRPO-RoC"], cmp["arms"]["GRPO"]
    assert [r["rl_step"] for r in roc["per_step"]] == list(range(1, 10))
    assert [r["step"] for r in roc["per_step"]] == list(range(4, 13))  # after 3 SFT steps
    assert roc["tool_error_rate_pos_pooled"] < grpo["tool_error_rate_pos_pooled"]
    vals = [r["tool_error_rate_pos"] for r in grpo["per_step"] if r["tool_error_rate_pos"] is not None]
    assert grpo["tool_error_rate_pos_mean"] == pytest.approx(sum(vals) / len(vals))
    # Evaluations up to the compared step, placed on the RL-step axis (after SFT = 0).
    assert [(e["rl_step"], e["step"]) for e in roc["evals"]] == [(0.0, 3), (6.0, 9)]
    lines = format_comparison(cmp)
    assert lines[0] == "compared at the same RL step count: 9 RL steps"
    assert sum(line.strip().split(" ")[0].isdigit() for line in lines) == 9  # one table row per RL step
    assert "GRPO-RoC tool-error rate of positive trajectories is lower than GRPO's" in lines[-1]


def test_no_verdict_without_positive_trajectories() -> None:
    arm = {"per_step": [], "tool_error_rate_pos_pooled": None, "tool_error_rate_pos_mean": None,
           "tool_error_rate_pos_second_half": None, "tool_error_rate_mean": 1.0, "reward_mean": 0.0, "evals": []}
    cmp = {"rl_steps_compared": 0, "arms": {"GRPO-RoC": arm, "GRPO": {**arm, "tool_error_rate_pos_pooled": 0.5}}}
    assert format_comparison(cmp)[-1].startswith("=> no comparison: GRPO-RoC had no correct trajectory")


def _fake_launch(calls: list):
    """A stand-in for ``reckon run``: logs a synthetic run whose errors depend on the RoC mode."""

    def launch(cfg, quiet=False):
        calls.append((cfg.run.run_dir, cfg.rollout.roc.mode))
        roc = cfg.rollout.roc.mode != "none"
        Path(cfg.run.run_dir).mkdir(parents=True)  # as prepare_run does
        _write(Path(cfg.run.run_dir), recipe_run(cfg.run.name, roc=roc, seed=3, sft_steps=2, rl_steps=(5,)))
        return 0, cfg

    return launch


def test_ablate_runs_both_arms_then_reports(tmp_path, monkeypatch) -> None:
    calls: list = []
    monkeypatch.setattr(actors.launcher, "launch", _fake_launch(calls))
    cfg = parse_config({"run": {"name": "demo"}, "stages": [dict(
        name="rl1", steps=5, max_tokens=64, max_turns=2, prompts_per_step=2, rollouts_per_prompt=4, group_size=2,
        lr=1e-4)]})  # fmt: skip
    code, cmp, paths = ablate(cfg, tmp_path / "ab")
    assert code == 0 and calls == [(str(tmp_path / "ab" / "grpo-roc"), "release"), (str(tmp_path / "ab" / "grpo"), "none")]
    assert Path(paths["png"]).stat().st_size > 50_000 and "GRPO-RoC vs GRPO" in Path(paths["html"]).read_text()
    assert json.loads((tmp_path / "ab" / "comparison.json").read_text()) == json.loads(json.dumps(cmp))
    assert cmp["rl_steps_compared"] == 5
    # Again: refused without --reuse; with it, completed arms are not run again.
    with pytest.raises(AblateError, match="already holds a run"):
        ablate(cfg, tmp_path / "ab")
    calls.clear()
    code, _, _ = ablate(cfg, tmp_path / "ab", reuse=True)
    assert code == 0 and calls == []


def test_cli(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(actors.launcher, "launch", _fake_launch([]))
    app = typer.Typer()
    app.command("ablate")(ablate_command)
    app.command("other")(lambda: None)
    out = CliRunner().invoke(app, ["ablate", str(ROOT / "configs" / "demo.toml"), "--out", str(tmp_path), "-q"])
    assert out.exit_code == 0, out.output
    assert "compared at the same RL step count: 5 RL steps" in out.stdout
    assert f"png: {tmp_path / 'report' / 'report.png'}" in out.stdout
    assert {p.name for p in tmp_path.iterdir()} >= {sub for _, sub in ARMS} | {"report", "comparison.json"}
    bad = CliRunner().invoke(app, ["ablate", str(tmp_path / "none.toml")])
    assert bad.exit_code == 2 and "none.toml does not exist" in bad.output
    no_rl = tmp_path / "sft_only.toml"
    no_rl.write_text("[run]\nname = 'x'\n")
    bad = CliRunner().invoke(app, ["ablate", str(no_rl)])
    assert bad.exit_code == 2 and "no RL stages" in bad.output


@pytest.mark.slow
def test_real_ablation_of_a_tiny_recipe(tmp_path) -> None:
    """Both arms as real runs (a few SFT steps, 2 RL steps each), then the report."""
    base = (ROOT / "configs" / "demo.toml").read_text()
    stage = ("[[stages]]\nname = \"rl1\"\nsteps = 2\nmax_tokens = 96\nmax_turns = 2\nprompts_per_step = 2\n"
             "rollouts_per_prompt = 4\ngroup_size = 2\nlr = 2e-4\n\n")  # fmt: skip
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(base.split("[[stages]]")[0] + stage + "[rollout]" + base.split("[rollout]")[1])
    sets = ["sft.epochs=0.25", "sft.batch_size=16", "demo.n_sft=320", "eval.max_problems=2", "eval.k=2",
            "generator.count=1", "generator.engine.max_model_len=512", "model.tiny_pretrain_steps=0"]  # fmt: skip
    cmd = [sys.executable, "-m", "actors.cli", "ablate", str(cfg), "--out", str(tmp_path / "ab"), "-q"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "compared at the same RL step count: 2 RL steps" in proc.stdout
    assert (tmp_path / "ab" / "report" / "report.png").stat().st_size > 50_000
