"""Answer extraction and the in-process ``score`` (bounds, methods, failure modes)."""

from __future__ import annotations

import threading

import pytest

from training.rewards import Score, VerifierConfig, count_answer_tags, extract_answer, score

# One full multi-turn response in the project's chat format (see training/chat.py).
MULTI_TURN = (
    "I will compute it.<tool_call>\n"
    '{"name": "python", "arguments": {"code": "print(r\'\\\\boxed{7}\')"}}\n'
    "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n"
    "\\boxed{99} <answer>\\boxed{98}</answer>\n"
    "</tool_response><|im_end|>\n<|im_start|>assistant\n"
    "So the sum is 12.<answer>The answer is \\boxed{12}</answer><|im_end|>"
)


# ------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("\\boxed{5}", "5"),
        ("first \\boxed{3} then \\boxed{4}", "4"),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
        ("\\boxed{\\left\\{1, 2\\right\\}}", "\\left\\{1, 2\\right\\}"),  # escaped braces do not count
        ("\\boxed{\\{1,\\{2\\}\\}}", "\\{1,\\{2\\}\\}"),
        ("so $\\boxed 5$.", "5"),
        ("\\boxed 42.", "42"),
        ("\\fbox{7}", "7"),
        ("\\boxed{3} and \\fbox{8}", "8"),
        ("\\boxed  { 6 }", "6"),
        ("no box here", None),
        ("\\boxedsymbol{3}", None),  # another command, not \boxed
        ("\\boxed{3} then truncated \\boxed{\\frac{1}{", None),  # cut-off last box: no answer
        ("\\boxed{}", None),
        ("<answer>\\boxed{3}</answer> afterthought \\boxed{4}", "3"),  # the answer tag wins
        ("<answer>\\boxed{1}</answer><answer>\\boxed{2}</answer>", "2"),  # the last tag
        ("<answer>42</answer>", "42"),  # tag without a box: its content
        ("<answer> \\boxed{9} </answer", "9"),  # malformed close tag: to the end
        ("<answer>\\boxed{9}", "9"),  # unclosed tag (truncated): to the end
        ("\\boxed{5}<answer></answer>", "5"),  # empty tag: the box elsewhere
        (MULTI_TURN, "12"),
        ("<tool_response>\n\\boxed{99}\n</tool_response>", None),  # tool output is never the answer
        ("<tool_response>\n<answer>99</answer>\n</tool_response>", None),
        ("\\boxed{1}<tool_response>\n\\boxed{99}", "1"),  # unterminated tool response
        ('<tool_call>\n{"code": "print(\'\\\\boxed{7}\')"}\n</tool_call>', None),  # code is not an answer
    ],
)
def test_extract_anywhere(response: str, expected: str | None) -> None:
    assert extract_answer(response, mode="anywhere") == expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("\\boxed{5}", None),
        ("<answer>\\boxed{3}</answer> \\boxed{4}", "3"),
        ("\\boxed{4} <answer>the answer is 4</answer>", "the answer is 4"),
        ("<answer>\\boxed{3} or \\boxed{5}</answer>", "5"),
        (MULTI_TURN, "12"),
        ("<tool_response><answer>\\boxed{98}</answer></tool_response>", None),
    ],
)
def test_extract_answer_tag_only(response: str, expected: str | None) -> None:
    assert extract_answer(response, mode="answer_tag_only") == expected


def test_extract_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="answer_tag_only"):
        extract_answer("\\boxed{1}", mode="last_line")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("response", "tags"),
    [
        ("\\boxed{1}", 0),
        ("<answer>\\boxed{1}</answer>", 1),
        ("<answer>1</answer> wait <answer>2</answer>", 2),
        (MULTI_TURN, 1),  # the <answer> printed by the tool does not count
    ],
)
def test_count_answer_tags(response: str, tags: int) -> None:
    assert count_answer_tags(response) == tags
    assert score(response, "1").answer_tags == tags


def test_extraction_is_linear_on_huge_responses() -> None:
    # 200k unclosed braces and 50k boxes: must finish (no regex backtracking).
    assert extract_answer("\\boxed{" + "{" * 200_000) is None
    assert extract_answer("\\boxed{1}" * 50_000) == "1"


# ------------------------------------------------------------------------------ score


def test_score_fields_and_dict() -> None:
    s = score(MULTI_TURN, "12")
    assert (s.correct, s.reward, s.extracted, s.answer_tags) == (True, 1.0, "12", 1)
    assert s.method == "exact" and s.seconds >= 0
    d = s.to_dict()
    assert set(d) >= {"correct", "reward", "extracted", "method", "seconds", "answer_tags"}
    assert Score.from_dict(d) == s


def test_score_wrong_and_missing() -> None:
    wrong = score("<answer>\\boxed{13}</answer>", "12")
    assert (wrong.correct, wrong.reward, wrong.method) == (False, 0.0, "mismatch")
    missing = score("I give up.", "12")
    assert (missing.correct, missing.method, missing.extracted) == (False, "no_answer", None)


def test_score_mode_answer_tag_only() -> None:
    assert score("\\boxed{12}", "12", mode="answer_tag_only").method == "no_answer"
    assert score("\\boxed{12}", "12", mode="anywhere").correct


@pytest.mark.parametrize(
    "answer",
    [
        "9^{9^{9^9}}",
        "9^{9^9}",
        "2^{2^{2^{2^{2^{2}}}}}",
        "10^{-9^{9}}",
        "(10^{100})!",
        "\\binom{10^{9}}{10^{6}}",
        "x^{10^{9}}",
        "\\sqrt{2}^{9^{9}}",
    ],
)
def test_pathological_answers_are_refused(answer: str) -> None:
    s = score(f"\\boxed{{{answer}}}", "5", timeout_s=2.0)
    assert s.method == "too_large" and not s.correct
    assert s.detail


def test_identical_pathological_answer_is_still_correct() -> None:
    # The gold itself may be a tower; the exact path never evaluates it.
    assert score("\\boxed{9^{9^{9^9}}}", "9^{9^{9^9}}").method == "exact"


def test_slow_symbolic_check_times_out(monkeypatch) -> None:
    # A check that never ends (pure-Python work, as sympy's is): the timer stops it. Not a
    # real slow expression: how long one takes depends on the machine (CI once finished
    # comparing two 1000th powers inside 0.3 s).
    import training.rewards as rewards

    def endless(extracted: str, gold: str) -> str:
        while True:
            pass

    with monkeypatch.context() as m:
        m.setattr(rewards, "_compare", endless)
        s = score("\\boxed{(x+1)^{1000}}", "(x+2)^{1000}", timeout_s=0.3)
    assert (s.method, s.correct, s.reward) == ("timeout", False, 0.0)
    assert s.detail == "check exceeded 0.3 s"
    # ... and the timer is disarmed afterwards: a normal check still passes.
    assert score("\\boxed{\\frac12}", "0.5").method == "math_verify"


def test_overlong_answer_is_not_parsed() -> None:
    s = score("\\boxed{" + "1+" * 2000 + "1}", "4001", max_answer_chars=1000)
    assert s.method == "too_large"


def test_score_off_main_thread() -> None:
    # math-verify's own signal timers would raise here; ours are disabled off-thread
    # and the size guard still refuses pathological answers.
    results: list[Score] = []
    thread = threading.Thread(
        target=lambda: results.extend([score("\\boxed{\\dfrac{1}{2}}", "0.5"), score("\\boxed{9^{9^{9^9}}}", "1")])
    )
    thread.start()
    thread.join()
    assert [r.method for r in results] == ["math_verify", "too_large"]


def test_score_never_raises_on_garbage() -> None:
    for junk in ["\\boxed{\\frac{", "\\boxed{}}}}", "\\boxed{\\begin{pmatrix}}", "\\boxed{\x00\udcff}", "\\boxed{" + "(" * 500 + "}"]:
        s = score(junk, "1", timeout_s=2.0)
        assert not s.correct


def test_config_rejects_unknown_fields_and_bad_values() -> None:
    assert VerifierConfig().workers >= 1
    with pytest.raises(ValueError):
        VerifierConfig(worker=3)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        VerifierConfig(mode="everywhere")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        VerifierConfig(timeout_s=0)
