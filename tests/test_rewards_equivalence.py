"""Equivalence table for the fused verifier (math-verify + normalizing fallback).

Each case is (predicted answer, gold answer, expected verdict). The predicted answer is
wrapped in a realistic response (``<answer> ... \\boxed{...} </answer>``) and scored
with :func:`training.rewards.score`, so extraction and both checkers are exercised
together. True and false pairs sit side by side: a checker that says "equal" to
everything fails the false rows, one that says "not equal" fails the true rows.
"""

from __future__ import annotations

import pytest

from training.rewards import score
from training.rewards_equal import normalize_answer, normalized_equal

T, F = True, False

CASES: list[tuple[str, str, bool]] = [
    # integers
    ("42", "42", T),
    ("042", "42", T),
    ("42.0", "42", T),
    ("5.", "5", T),
    ("-7", "-7", T),
    ("+7", "7", T),
    ("43", "42", F),
    ("-42", "42", F),
    ("100001", "100000", F),  # a 1e-4 relative tolerance would wrongly accept this
    ("420", "42", F),
    ("4200", "42", F),  # no silent x100 without a percent sign
    ("0", "1", F),
    # thousands separators
    ("1,000", "1000", T),
    ("1{,}000", "1000", T),
    ("1\\,000", "1000", T),
    ("12,345,678", "12345678", T),
    ("1,001", "1000", F),
    # decimals and integers written as floats
    ("0.5", "\\frac{1}{2}", T),
    ("3.14", "3.14", T),
    ("3.14", "\\pi", F),
    ("0.3333", "\\frac{1}{3}", F),
    ("2.50", "2.5", T),
    ("2.51", "2.5", F),
    # fractions
    ("\\frac{1}{2}", "\\frac12", T),
    ("\\dfrac{3}{4}", "\\frac{3}{4}", T),
    ("\\tfrac{3}{4}", "0.75", T),
    ("3/4", "\\frac{3}{4}", T),
    ("\\frac{6}{8}", "\\frac{3}{4}", T),
    ("-\\frac{1}{2}", "-0.5", T),
    ("\\frac{-1}{2}", "-\\frac{1}{2}", T),
    ("\\frac{2}{3}", "\\frac{3}{2}", F),
    ("\\frac{1}{2}", "-\\frac{1}{2}", F),
    ("\\frac{1}{3}", "0.33", F),
    # radicals
    ("\\sqrt{8}", "2\\sqrt{2}", T),
    ("2\\sqrt{3}", "\\sqrt{12}", T),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", T),
    ("\\sqrt[3]{27}", "3", T),
    ("3\\sqrt{2}", "2\\sqrt{3}", F),
    ("\\sqrt{2}", "1.414", F),
    ("1+\\sqrt{5}", "\\sqrt{5}+1", T),
    ("1-\\sqrt{5}", "1+\\sqrt{5}", F),
    # pi, exponents, expressions
    ("2\\pi", "2 \\pi", T),
    ("\\pi r^2", "r^2\\pi", T),
    ("2^{10}", "1024", T),
    ("2^{10}", "1000", F),
    ("x^2+2x+1", "(x+1)^2", T),
    ("x^2+1", "(x+1)^2", F),
    ("\\frac{x}{2}", "0.5x", T),
    ("e^{\\ln 5}", "5", T),
    ("\\sin^2 x+\\cos^2 x", "1", T),
    ("\\log_2 8", "3", T),
    ("\\binom{5}{2}", "10", T),
    ("5!", "120", T),
    ("5!", "24", F),
    # equations and assignments
    ("x=3", "3", T),
    ("x = 3", "3", T),
    ("k=5", "5", T),
    ("x=4", "3", F),
    ("y=2x+1", "y=2x+1", T),
    ("y=2x+1", "y=2x-1", F),
    # intervals
    ("[1,3)", "[1, 3)", T),
    ("[1,3)", "(1,3]", F),
    ("(-\\infty, 2]", "(-\\infty,2]", T),
    ("(-\\infty, 2)", "(-\\infty,2]", F),
    ("(0,\\frac{1}{2})", "(0,0.5)", T),
    ("[0,1]\\cup[2,3]", "[0,1] \\cup [2,3]", T),
    ("[0,1]\\cup[2,3]", "[0,1]\\cup[2,4]", F),
    # tuples / points
    ("(1,2)", "(1, 2)", T),
    ("(2,1)", "(1,2)", F),
    ("(1,2,3)", "(1,2)", F),
    ("\\left(3, \\frac{1}{2}\\right)", "(3,0.5)", T),
    # sets and lists of solutions
    ("\\{1,2,3\\}", "\\{3,2,1\\}", T),
    ("\\{1,2\\}", "\\{1,2,3\\}", F),
    ("\\{1,2\\}", "\\{1,3\\}", F),
    ("2, -3", "-3, 2", T),
    ("2, 3", "-3, 2", F),
    ("1, 2, 3", "1, 2", F),
    # matrices and vectors
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", T),
    ("\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", T),
    ("\\begin{pmatrix}1&2\\\\3&5\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", F),
    ("\\begin{pmatrix}2&1\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", F),
    ("\\begin{pmatrix}\\frac12\\\\1\\end{pmatrix}", "\\begin{pmatrix}0.5\\\\1\\end{pmatrix}", T),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1&2\\end{pmatrix}", F),
    # units, dollars, degrees, percentages
    ("5\\text{ cm}", "5", T),
    ("5 \\text{cm}^2", "5", T),
    ("12 inches", "12", T),
    ("6\\text{ cm}", "5", F),
    ("\\$5", "5", T),
    ("\\$5.00", "5", T),
    ("\\$1,250", "1250", T),
    ("5 dollars", "5", T),
    ("30^\\circ", "30", T),
    ("30^{\\circ}", "30", T),
    ("30°", "30", T),
    ("31^\\circ", "30", F),
    ("50\\%", "50", T),
    ("50\\%", "0.5", T),
    ("50%", "\\frac{1}{2}", T),
    ("25\\%", "0.5", F),
    ("2x", "2", F),  # a variable is not a unit
    # text and multiple choice
    ("\\text{(B)}", "B", T),
    ("(B)", "B", T),
    ("B", "\\text{B}", T),
    ("\\textbf{C}", "C", T),
    ("(C)", "B", F),
    ("\\text{Monday}", "Monday", T),
    ("monday", "Monday", T),
    ("Dynamo", "Monday", F),  # same letters: a product of symbols must not match
    ("\\text{yes}", "Yes", T),
    ("no", "yes", F),
    ("\\text{odd}", "\\text{even}", F),
    # LaTeX variants
    ("\\displaystyle\\frac{1}{2}", "\\frac{1}{2}", T),
    ("\\left(\\frac{1}{2}\\right)", "\\frac{1}{2}", T),
    ("$\\frac{1}{2}$", "0.5", T),
    ("\\frac{1}{2}.", "\\frac12", T),
    ("\\mathrm{7}", "7", T),
    ("10^{3}", "1000", T),
    ("1.5\\times10^{3}", "1500", T),
    ("1.5\\times10^{3}", "150", F),
    ("\\infty", "\\infty", T),
    ("-\\infty", "\\infty", F),
]


def _response(answer: str) -> str:
    return f"Let me think.\n<answer>The final answer is \\boxed{{{answer}}}.</answer>"


def test_table_is_large_and_balanced() -> None:
    assert len(CASES) >= 100
    assert sum(1 for *_, e in CASES if e) >= 40
    assert sum(1 for *_, e in CASES if not e) >= 40


@pytest.mark.parametrize(("pred", "gold", "expected"), CASES, ids=[f"{p}|{g}" for p, g, _ in CASES])
def test_equivalence(pred: str, gold: str, expected: bool) -> None:
    s = score(_response(pred), gold, timeout_s=5.0)
    assert s.extracted is not None
    assert s.method != "timeout", s  # every case in the table is quick
    assert s.correct is expected, s
    assert s.reward == (1.0 if expected else 0.0)
    assert s.method in (("exact", "math_verify", "normalized") if expected else ("mismatch",))


# What the normalizing fallback catches on its own (math-verify never consulted).
FALLBACK_CASES = [
    ("5\\text{ cm}", "5", T),
    ("1{,}000", "1000", T),
    ("\\$1,250", "1250", T),
    ("12 inches", "12", T),
    ("30°", "30", T),
    ("50\\%", "0.5", T),
    ("50%", "50", T),
    ("(B)", "b", T),
    ("\\text{Monday}", "monday", T),
    ("[1,3)", "(1,3]", F),
    ("\\{1,2,3\\}", "\\{3,2,1\\}", T),
    ("2, -3", "-3, 2", T),
    ("\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", T),
    ("100001", "100000", F),
    ("4200", "42", F),
    ("2x", "2", F),
    ("5.0", "5", T),
]


@pytest.mark.parametrize(("pred", "gold", "expected"), FALLBACK_CASES)
def test_normalized_fallback_alone(pred: str, gold: str, expected: bool) -> None:
    assert normalized_equal(pred, gold) is expected


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("$\\dfrac{1}{2}$", "\\frac{1}{2}"),
        ("\\text{ 5 cm}", "5"),
        ("1,234,567.", "1234567"),
        ("x = \\left( 1, 2 \\right)", "(1,2)"),
        ("\\text{(D)}", "d"),
        ("New York", "new york"),
        ("a \\cdot b", "a\\cdot b"),
    ],
)
def test_normalize_answer(raw: str, normal: str) -> None:
    assert normalize_answer(raw) == normal
