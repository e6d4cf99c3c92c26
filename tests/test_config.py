"""Config loading: the shipped configs parse; errors name the field and what is allowed."""

from pathlib import Path

import pytest

from actors.config import ConfigError, load_config, role_of

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo.toml", "rstar2_14b.toml"])
def test_shipped_configs_parse(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.stages and cfg.actor_names()[0] == "recorder"


def test_paper_config_has_the_papers_numbers():
    cfg = load_config(ROOT / "configs" / "rstar2_14b.toml")
    assert [s.steps for s in cfg.stages] == [300, 85, 125]
    assert [s.max_tokens for s in cfg.stages] == [8192, 12288, 12288]
    assert {(s.prompts_per_step, s.rollouts_per_prompt, s.group_size, s.lr) for s in cfg.stages} == {(512, 32, 16, 1e-6)}
    assert cfg.stages[2].hard_filter_k == 8 and cfg.stages[2].optimizer_reset
    assert (cfg.learner.clip_low, cfg.learner.clip_high, cfg.rollout.temperature) == (0.2, 0.28, 1.0)
    assert cfg.generator.count == 64


@pytest.mark.parametrize(
    "override, message",
    [
        ('rollout.roc.mode="bogus"', "rollout.roc.mode = 'bogus': Input should be 'release', 'paper' or 'none'"),
        ("learner.zero_stagee=1", "learner.zero_stagee = 1: unknown field"),
        ("learner.zero_stage=7", "learner.zero_stage = 7"),
        ("generator.count=0", "generator.count = 0"),
        ("novalue", "must look like section.field=value"),
    ],
)
def test_config_errors_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(ROOT / "configs" / "demo.toml", [override])


def test_group_size_cannot_exceed_rollouts(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[stages]]\nname="x"\nsteps=1\nmax_tokens=8\nmax_turns=1\nprompts_per_step=1\n'
                   'rollouts_per_prompt=2\ngroup_size=4\nlr=1e-6\n')
    with pytest.raises(ConfigError, match=r"stages.0.*group_size \(4\) must be <= rollouts_per_prompt \(2\)"):
        load_config(bad)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[run\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_role_of():
    assert role_of("generator-12") == "generator" and role_of("tool-0") == "tool_executor"
    assert role_of("recorder") == "recorder"


def test_actor_environment_threads_learner_may_take_more():
    from actors.config import Config, actor_environment

    cfg = Config.model_validate({"launcher": {"cpu_threads": 1, "learner_threads": 2}})
    base = {"PATH": "/bin"}
    assert actor_environment(cfg, base=base, name="generator-0")["OMP_NUM_THREADS"] == "1"
    learner = actor_environment(cfg, 2, base=base, name="learner")
    assert learner["OMP_NUM_THREADS"] == "2" and learner["MKL_NUM_THREADS"] == "2" and learner["RECKON_RESTARTS"] == "2"
    assert actor_environment(cfg, base={"OMP_NUM_THREADS": "4"}, name="learner")["OMP_NUM_THREADS"] == "4"  # the user's wins
    plain = Config.model_validate({"launcher": {"cpu_threads": 1}})
    assert actor_environment(plain, base=base, name="learner")["OMP_NUM_THREADS"] == "1"
