"""Answer equivalence: math-verify, a normalizing fallback, and a size guard.

This module holds the pure checking functions behind :func:`training.rewards.score`.
It never bounds time itself; the caller (``score`` in the main thread of a process,
normally a :class:`training.rewards.VerifierPool` worker) does. What it does bound is
*size*: evaluating ``9^{9^{9^9}}`` or ``(10^{100})!`` is not slow Python code that a
timer can interrupt but a single C call into GMP that never returns, so such answers are
refused before sympy evaluates them (:class:`AnswerTooLarge`).

Two checkers, fused as in the rStar2-Agent release (score 1 if either says equal):

* :func:`math_verify_equal` -- math-verify's ``parse``/``verify`` with their internal
  ``signal.alarm`` timers disabled (they fail off the main thread and would fight the
  caller's own timer).
* :func:`normalized_equal` -- a stricter cousin of the release's ``math_equal``: strips
  units, ``\\text{}``, thousands separators, ``\\dfrac``, trailing periods, degrees,
  dollar signs and ``x =`` prefixes; compares numbers exactly as rationals (so ``5.0``
  equals ``5`` but ``100001`` never equals ``100000``, unlike a 1e-4 relative
  tolerance); compares tuples, intervals, sets and matrices element by element; and
  finally hands the cleaned strings back to math-verify for symbolic equality.
  Unlike the release it does not accept ``x`` for ``100x`` unless a percent sign says so.
"""

from __future__ import annotations

import logging
import math
import re
from fractions import Fraction

import sympy
from math_verify import parse, verify

# math-verify warns once that its timers are off; we bound time ourselves (see module doc).
logging.getLogger("math_verify").setLevel(logging.ERROR)

#: Largest number of decimal digits an intermediate value may have before the answer
#: is refused: GMP computes 10^5-digit powers in microseconds, 10^8 in minutes.
MAX_DIGITS = 100_000
#: Largest exponent allowed on a symbolic base (expanding (x+1)^(10^9) never ends).
MAX_SYMBOLIC_EXPONENT = 1_000
#: Largest argument of factorial/binomial/gamma-like functions.
MAX_FACTORIAL_ARG = 100_000

_LOG10_2 = math.log10(2)


class AnswerTooLarge(Exception):
    """The answer (or gold) would take unbounded time or memory to evaluate."""


# ----------------------------------------------------------------------------- guard

# A power whose exponent itself holds a power: 9^{9^{9}} , 2^{2^{2^2}}.
_TOWER_RE = re.compile(r"\^\s*\{[^{}]*\^")
# factorial / binomial of a long literal or of a power: (10^{100})!, \binom{10^9}{10^6}.
_BIG_COMBINATORIAL_RE = re.compile(
    r"(\d{6,}|\^\s*\{?\s*\d{2,})\s*\}?\s*\)?\s*!|\\(?:binom|dbinom|tbinom|choose)\s*\{[^}]*(\d{6,}|\^)"
)


def guard_text(latex: str) -> None:
    """Refuse answer text whose *parsing* alone could evaluate a huge number.

    math-verify's parser evaluates some expressions eagerly (``\\binom{10^9}{5000}``
    becomes an Integer while parsing), so this runs on the raw string before ``parse``.
    Raises :class:`AnswerTooLarge` naming the construct; returns None otherwise.
    """
    if _BIG_COMBINATORIAL_RE.search(latex):
        raise AnswerTooLarge(f"factorial/binomial of a huge argument in {latex[:80]!r}")


def _int_log10(n: int) -> float:
    """log10(|n|), 0 for 0, without converting a huge int to float."""
    n = abs(n)
    if n == 0:
        return 0.0
    return math.log10(n) if n.bit_length() < 1000 else n.bit_length() * _LOG10_2


def _digits(expr: object) -> float:
    """Upper estimate of log10 |value of expr| (about its decimal digits); inf when
    unbounded.

    Symbols count as 0: they are never evaluated, only manipulated. Raises
    :class:`AnswerTooLarge` for a symbolic base raised to a huge exponent.
    """
    if isinstance(expr, sympy.Integer):
        return _int_log10(int(expr))
    if isinstance(expr, sympy.Rational):
        return max(_int_log10(int(expr.p)), _int_log10(int(expr.q)))
    if isinstance(expr, sympy.Float):
        sign, man, exp, bc = expr._mpf_
        return abs(exp + bc) * _LOG10_2 if man else 0.0
    if isinstance(expr, sympy.MatrixBase):
        return max((_digits(e) for e in expr), default=0.0)
    if not isinstance(expr, sympy.Basic) or not expr.args:
        return 0.0
    if isinstance(expr, sympy.Pow):
        base, exponent = expr.args
        exp_digits = _digits(exponent)
        if exp_digits > 15:  # the exponent itself has more than 15 digits
            return math.inf
        exp_value = 10.0**exp_digits
        if base.free_symbols:
            if exp_value > MAX_SYMBOLIC_EXPONENT:
                raise AnswerTooLarge(f"symbolic power with exponent ~{exp_value:.3g}")
            return _digits(base)
        # Even a base of 0 or 1 counts one digit: sqrt(2)^(10^9) still costs work.
        return exp_value * max(_digits(base), 1.0)
    if isinstance(expr, (sympy.factorial, sympy.gamma, sympy.factorial2, sympy.binomial,
                         sympy.RisingFactorial, sympy.FallingFactorial, sympy.subfactorial)):
        n = 10.0 ** max(_digits(a) for a in expr.args)
        if n > MAX_FACTORIAL_ARG:
            return math.inf
        return n * math.log10(max(n, 2.0))
    children = [_digits(a) for a in expr.args]
    if isinstance(expr, sympy.Mul):
        return sum(children)
    return max(children) + 1.0


def guard_expr(expr: object) -> None:
    """Raise :class:`AnswerTooLarge` if evaluating the parsed ``expr`` could not finish.

    Non-sympy objects (math-verify's fallback strings) pass unchecked.
    """
    if isinstance(expr, (sympy.Basic, sympy.MatrixBase)):
        digits = _digits(expr)
        if digits > MAX_DIGITS:
            raise AnswerTooLarge(f"value with ~{digits:.3g} digits")


# ------------------------------------------------------------------------ math-verify

_PLAIN_WORD_RE = re.compile(r"[A-Za-z][A-Za-z ]*[A-Za-z]")
_PROSE_RE = re.compile(r"[A-Za-z]{3,}\s+[A-Za-z]{2,}")


def _mv_parse(latex: str) -> list:
    """math-verify ``parse`` of one bare answer (no surrounding prose), size-guarded."""
    guard_text(latex)
    text = latex.strip()
    if _PLAIN_WORD_RE.fullmatch(text):
        # A bare word: without \text{} math-verify reads "Monday" as the product
        # d*a*m*n*o*y, which would equal "Dynamo".
        text = rf"\text{{{text}}}"
    parsed = parse(text if text.startswith("$") else f"${text}$", parsing_timeout=None)
    if _PROSE_RE.search(text) and not any(isinstance(p, (sympy.Basic, sympy.MatrixBase)) for p in parsed):
        # "<answer>The answer is 42.</answer>": prose is no formula; let math-verify
        # find the answer in it the way it reads a whole response.
        parsed = parse(text, parsing_timeout=None)
    for item in parsed:
        guard_expr(item)
    return parsed


def math_verify_equal(pred: str, gold: str) -> bool:
    """math-verify's verdict on two bare answers (``"\\frac12"``, ``"x=3"``).

    Its timers are disabled, so call it under the caller's own time bound. Raises
    :class:`AnswerTooLarge` for answers that cannot be evaluated in bounded time.
    """
    gold_parsed = _mv_parse(gold)
    pred_parsed = _mv_parse(pred)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


# ----------------------------------------------------------------- normalizing fallback

_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACING_RE = re.compile(r"\\[,!:;>]|\\quad|\\qquad|\\ |~")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree|\\circ")
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_ASSIGN_RE = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*(?P<rhs>[^=]+)$")
_NUMBER = r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:/\d+)?"
# A number followed by a \text{...} unit: "5\text{ cm}^2". Any word counts as a unit here.
_TEXT_UNIT_RE = re.compile(rf"^(?P<num>{_NUMBER})\s*\\(?:text|mbox|mathrm)\s*\{{\s*[A-Za-z][^{{}}]*\}}(?:\^\s*\{{?[23]\}}?)?$")
# A number followed by a bare unit word. Only known units: "2x" must not become "2".
_UNITS = (
    "mm|cm|km|meters?|metres?|inch|inches|in|ft|feet|foot|yards?|miles?|mph|kg|grams?|"
    "kilograms?|lbs?|pounds?|ounces?|oz|liters?|litres?|ml|sec|seconds?|min|minutes?|"
    "hrs?|hours?|days?|weeks?|months?|years?|dollars?|cents?|euros?|degrees?|units?|"
    "square|sq|cubic|people|students|ways|points?|cm\\^2|m\\^2"
)
_NUMBER_UNIT_RE = re.compile(rf"^(?P<num>{_NUMBER})\s*(?P<unit>(?:(?:{_UNITS})\b\s*)+(?:\^\s*\{{?[23]\}}?)?)$", re.I)
_CHOICE_RE = re.compile(r"^\(?([A-Ea-e])\)?$")
_FRAC_SHORT_RE = re.compile(r"\\frac\s*(\d)\s*(\d)")
_FRAC_RE = re.compile(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,3})?")


def normalize_answer(text: str) -> str:
    """Canonical string form of one bare answer, for string and number comparison.

    Drops math delimiters, spacing commands, ``\\left``/``\\right``, ``\\text{}``-style
    wrappers, units after a number, degrees, dollar signs, thousands separators,
    trailing periods and an ``x =`` prefix; ``\\dfrac``/``\\tfrac`` become ``\\frac``;
    a multiple-choice letter loses its parentheses; words are lower-cased; all
    whitespace is removed. A percent sign is kept (see :func:`_split_percent`).
    """
    s = text.strip()
    for left, right in (("$", "$"), (r"\(", r"\)"), (r"\[", r"\]")):
        while s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left) : len(s) - len(right)].strip()
    s = s.replace(r"\displaystyle", "").replace(r"\left", "").replace(r"\right", "")
    s = s.replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac")
    s = s.replace(r"\{,\}", "").replace("{,}", "")
    s = _SPACING_RE.sub(" ", s)
    s = _DEGREE_RE.sub("", s)
    s = s.replace(r"\$", "").replace("$", "").replace(r"\%", "%")
    match = _TEXT_UNIT_RE.match(s.strip())
    if match:
        s = match.group("num")
    # \text{...} may nest once (\text{\textbf{B}}): unwrap until stable.
    for _ in range(3):
        unwrapped = _TEXT_CMD_RE.sub(r"\1", s)
        if unwrapped == s:
            break
        s = unwrapped
    s = " ".join(s.split()).rstrip(".").strip()
    match = _ASSIGN_RE.match(s)
    if match:
        s = match.group("rhs").strip()
    match = _NUMBER_UNIT_RE.match(s)
    if match:
        s = match.group("num")
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    match = _CHOICE_RE.match(s)
    if match:
        s = match.group(1)
    if re.fullmatch(r"[A-Za-z ]+", s):
        s = s.lower()
    # Spaces only matter between letters ("\\cdot x", "new york").
    return re.sub(r"(?<![A-Za-z])\s+|\s+(?![A-Za-z])", "", s)


def _split_percent(s: str) -> tuple[bool, str]:
    """(had a trailing percent sign, the rest)."""
    if s.endswith("%"):
        return True, s[:-1]
    return False, s


def _to_fraction(s: str) -> Fraction | None:
    """Exact value of a plain number: ``5``, ``-5.0``, ``.5``, ``3/4``, ``\\frac{3}{4}``."""
    s = _FRAC_SHORT_RE.sub(r"\\frac{\1}{\2}", s)
    match = _FRAC_RE.fullmatch(s)
    if match:
        num, den = _to_fraction(match.group(1)), _to_fraction(match.group(2))
        return num / den if num is not None and den else None
    negative = s.startswith("-") and s[1:].startswith(r"\frac")
    if negative:
        inner = _to_fraction(s[1:])
        return -inner if inner is not None else None
    if "/" in s:
        num_text, _, den_text = s.partition("/")
        num, den = _to_fraction(num_text), _to_fraction(den_text)
        return num / den if num is not None and den else None
    if _NUMBER_RE.fullmatch(s):
        return Fraction(s)
    return None


def _split_top_level(s: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside any brackets or braces."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return parts


def _unordered_equal(preds: list[str], golds: list[str], depth: int) -> bool:
    """Multiset equality under :func:`normalized_equal` (greedy matching suffices: the
    relation is an equivalence on these small lists)."""
    if len(preds) != len(golds):
        return False
    remaining = list(golds)
    for p in preds:
        for i, g in enumerate(remaining):
            if _equal(p, g, depth + 1):
                del remaining[i]
                break
        else:
            return False
    return True


_MATRIX_RE = re.compile(r"^\\begin\{([pbvB]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}$", re.S)


def _matrix_cells(s: str) -> list[list[str]] | None:
    match = _MATRIX_RE.match(s)
    if not match:
        return None
    rows = [r for r in match.group(2).split(r"\\") if r.strip()]
    return [r.split("&") for r in rows]


def _equal(pred: str, gold: str, depth: int) -> bool:
    """Structural comparison of two normalized strings; see :func:`normalized_equal`."""
    if depth > 4:  # nested containers deeper than this are not answers we grade
        return False
    if pred == gold:
        return bool(pred)
    pred_pct, pred_body = _split_percent(pred)
    gold_pct, gold_body = _split_percent(gold)
    p_num, g_num = _to_fraction(pred_body), _to_fraction(gold_body)
    if p_num is not None and g_num is not None:
        # A percent sign may stand for /100 ("50%" == "0.5") or be mere decoration
        # ("50%" == "50"); a bare number is never silently scaled.
        if p_num == g_num:
            return True
        return (pred_pct and p_num / 100 == g_num) or (gold_pct and g_num / 100 == p_num)

    p_matrix, g_matrix = _matrix_cells(pred), _matrix_cells(gold)
    if p_matrix is not None or g_matrix is not None:
        if p_matrix is None or g_matrix is None or len(p_matrix) != len(g_matrix):
            return False
        return all(
            len(pr) == len(gr) and all(_equal(p, g, depth + 1) for p, g in zip(pr, gr))
            for pr, gr in zip(p_matrix, g_matrix)
        )

    if pred.startswith(r"\{") and pred.endswith(r"\}") and gold.startswith(r"\{") and gold.endswith(r"\}"):
        return _unordered_equal(_split_top_level(pred[2:-2]), _split_top_level(gold[2:-2]), depth)
    if pred[:1] in "([" and pred[-1:] in ")]" and gold[:1] in "([" and gold[-1:] in ")]":
        # Tuples and intervals: the brackets are part of the meaning ([1,3) != (1,3]).
        if (pred[0], pred[-1]) != (gold[0], gold[-1]):
            return False
        p_parts, g_parts = _split_top_level(pred[1:-1]), _split_top_level(gold[1:-1])
        return len(p_parts) == len(g_parts) and all(
            _equal(p, g, depth + 1) for p, g in zip(p_parts, g_parts)
        )
    p_parts, g_parts = _split_top_level(pred), _split_top_level(gold)
    if len(p_parts) > 1 or len(g_parts) > 1:
        # A bare list of solutions ("2, -3"): order carries no meaning.
        return _unordered_equal(p_parts, g_parts, depth)
    return False


def _squash(s: str) -> str:
    return re.sub(r"(?<![A-Za-z])\s+|\s+(?![A-Za-z])", "", s.strip())


def normalized_equal(pred: str, gold: str) -> bool:
    """The normalizing fallback: True if ``pred`` and ``gold`` agree after cleaning.

    First compares the normalized strings, exact numbers, and containers element by
    element; then gives the cleaned strings to math-verify for symbolic equality
    (``2\\sqrt{2} cm`` vs ``\\sqrt8``). Raises :class:`AnswerTooLarge` like
    :func:`math_verify_equal`.
    """
    pred_n, gold_n = normalize_answer(pred), normalize_answer(gold)
    if not pred_n or not gold_n:
        return False
    if _equal(pred_n, gold_n, depth=0):
        return True
    if (pred_n, gold_n) == (_squash(pred), _squash(gold)):
        return False  # nothing but spacing was cleaned: math-verify has judged these already
    return math_verify_equal(pred_n, gold_n)
