"""The demo's synthetic problems and SFT demonstrations: deterministic, correct, in the chat format."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from training.chat import SYSTEM_PROMPT, parse_tool_call
from training.demo_tasks import (
    FAMILIES,
    DemoConfig,
    answer_text,
    demo_splits,
    make_problems,
    make_sft_demos,
    render_tool_output,
    tokenizer_corpus,
)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)


def run_batch(codes: list[str]) -> list[tuple[str, str]]:
    """Run many snippets in one interpreter (one subprocess per snippet is slow on 2 cores)."""
    prog = (
        "import json, sys, io, contextlib, traceback\n"
        "out = []\n"
        "for code in json.load(sys.stdin):\n"
        "    buf = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        exec(compile(code, '<string>', 'exec'), {})\n"
        "    out.append(buf.getvalue())\n"
        "print(json.dumps(out))\n"
    )
    r = subprocess.run([sys.executable, "-c", prog], input=json.dumps(codes), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_problems_are_deterministic_and_distinct():
    a = make_problems(200, seed=5)
    assert a == make_problems(200, seed=5)
    assert a != make_problems(200, seed=6)
    assert len({p.problem for p in a}) == 200
    assert {p.family for p in a} == set(FAMILIES)


def test_splits_are_disjoint():
    train, held = demo_splits(300, 40, seed=1)
    assert len(train) == 300 and len(held) == 40
    assert not {p.problem for p in train} & {p.problem for p in held}


def test_reference_code_prints_the_answer():
    problems = make_problems(80, seed=2)
    outputs = run_batch([p.code for p in problems])
    for p, out in zip(problems, outputs):
        assert out == f"{p.answer}\n", p


def test_unknown_family_and_impossible_counts_are_errors():
    with pytest.raises(ValueError, match="unknown problem families"):
        make_problems(3, families=("product", "nope"))
    with pytest.raises(ValueError, match="distinct problems"):
        make_problems(100_000, families=("comb",))


def demos(n=120, **kw):
    cfg = DemoConfig(n_sft=n, **kw)
    train, _ = demo_splits(200, 10, seed=cfg.seed)
    return make_sft_demos(train, cfg), train


def test_demos_are_deterministic_and_in_chat_roles():
    a, _ = demos()
    assert a == demos()[0]
    for conv in a:
        assert conv[0] == {"role": "system", "content": SYSTEM_PROMPT}
        assert conv[1]["role"] == "user"
        roles = [m["role"] for m in conv[2:]]
        assert roles in (["assistant"], ["assistant", "tool", "assistant"])
        assert conv[-1]["content"].startswith("<answer>\\boxed{") and conv[-1]["content"].endswith("}</answer>")


def test_mix_of_tool_buggy_and_direct():
    convs, _ = demos(n=1000, tool_fraction=0.4, buggy_fraction=0.25)
    with_tool = [c for c in convs if len(c) == 5]
    buggy = [c for c in with_tool if "Tool call failure" in c[3]["content"]]
    assert 0.33 < len(with_tool) / len(convs) < 0.47
    assert 0.15 < len(buggy) / len(with_tool) < 0.35


def test_tool_demos_code_really_prints_the_answer_they_give():
    convs, _ = demos(n=300)
    good = [c for c in convs if len(c) == 5 and "Tool call success" in c[3]["content"]]
    assert good
    outputs = run_batch([parse_tool_call(c[2]["content"]) for c in good])
    for conv, out in zip(good, outputs):
        assert conv[3]["content"] == render_tool_output(out)
        assert conv[4]["content"] == answer_text(out.strip())


def test_buggy_demos_show_the_error_python_really_raises():
    convs, _ = demos(n=400, tool_fraction=1.0, buggy_fraction=1.0)
    kinds = set()
    for conv in convs[:40]:  # each is a subprocess: keep it short
        code = parse_tool_call(conv[2]["content"])
        r = run_python(code)
        assert r.returncode != 0
        assert conv[3]["content"] == render_tool_output("", r.stderr), code
        kinds.add(r.stderr.strip().splitlines()[-1].split(":")[0])
    assert kinds == {"NameError", "SyntaxError"}


def test_direct_answers_are_usually_wrong():
    convs, train = demos(n=1000, tool_fraction=0.0, lucky_guess_fraction=0.1)
    by_text = {p.problem: p for p in train}
    right = sum(c[-1]["content"] == answer_text(by_text[c[1]["content"]].answer) for c in convs)
    assert 0.05 < right / len(convs) < 0.15


def test_render_tool_output_matches_the_live_tool_executor():
    from tools_sandbox import ExecResult, format_for_model

    assert render_tool_output("42\n") == "Tool call success\nstdout: 42\n\nexecution time: 0.01s"
    failed = ExecResult(status="error", stdout="", stderr="boom\n", exit_code=1, signal=None, duration_s=0.01)
    assert render_tool_output("", "boom\n") == format_for_model(failed)
    assert render_tool_output("", "boom\n").startswith("Tool call failure\nreason: error (exit code 1)")


def test_tokenizer_corpus_has_no_chat_tokens():
    corpus = tokenizer_corpus(n=30)
    assert len(corpus) == 30
    assert not any("<|im_start|>" in t or "<tool_call>" in t for t in corpus)


def test_retry_demos_fix_the_failed_call_and_copy_the_answer():
    convs, train = demos(n=300, tool_fraction=1.0, buggy_fraction=1.0, retry_fraction=1.0)
    by_text = {p.problem: p for p in train}
    for conv in convs:
        p = by_text[conv[1]["content"]]
        assert [m["role"] for m in conv[2:]] == ["assistant", "tool", "assistant", "tool", "assistant"]
        assert "Tool call failure" in conv[3]["content"]
        assert parse_tool_call(conv[4]["content"]) == p.code  # the second call is the right code
        assert conv[5]["content"] == render_tool_output(f"{p.answer}\n")
        assert conv[6]["content"] == answer_text(p.answer)
    mixed, _ = demos(n=1000, tool_fraction=1.0, buggy_fraction=1.0, retry_fraction=0.5)
    retried = sum(len(c) == 7 for c in mixed) / len(mixed)
    assert 0.4 < retried < 0.6  # the rest fail and guess, as before
