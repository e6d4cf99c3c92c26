"""The demo's synthetic data: integer-answer problems where the Python tool matters.

Four problem families, each one a short sentence whose Python solution is almost a
verbatim copy of the numbers in it (so a tiny model can learn to write the code), and
whose answer a tiny model cannot compute in its head (so the tool is what makes it right):

- ``product``  "What is 4821 * 937?"                          -> ``print(4821 * 937)``
- ``modpow``   "What is 37^123 mod 1000?"                     -> ``print(pow(37, 123, 1000))``
- ``comb``     "How many ways can 7 items be chosen from 23?"  -> ``print(math.comb(23, 7))``
- ``rangesum`` "What is the sum of the integers from 137 to 982?" -> ``print(sum(range(137, 982 + 1)))``

:func:`make_problems` draws them from a fixed seed; :func:`demo_splits` gives disjoint
train and held-out eval sets. :func:`make_sft_demos` writes the non-reasoning SFT
conversations (message lists in :mod:`training.chat` roles) that teach the *format* but
not the skill: only some of them call the tool (and some of those calls are buggy: an
error comes back and the model then guesses); the rest answer directly, usually wrongly,
as a model that cannot multiply would. RL then has room to raise both accuracy and tool
use. Everything is deterministic in the seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from training.chat import ANSWER_END, ANSWER_START, SYSTEM_PROMPT, tool_call_text

FAMILIES = ("product", "modpow", "comb", "rangesum", "mulmod", "powmod2")

#: What a demonstration writes before its tool call (kept to a few tokens: the tiny model
#: pays for every token on 2 CPU cores).
TOOL_PREAMBLE = "Use Python.\n"


@dataclass(frozen=True)
class DemoProblem:
    """One synthetic problem: its text, the code that solves it, and the integer answer."""

    id: str
    family: str
    problem: str
    code: str
    answer: int


def _product(rng: random.Random) -> tuple[str, str, int]:
    a, b = rng.randint(100, 999), rng.randint(10, 99)  # short numbers: every digit must be copied right
    return f"What is {a} * {b}?", f"print({a} * {b})", a * b


def _modpow(rng: random.Random) -> tuple[str, str, int]:
    a, e, m = rng.randint(3, 99), rng.randint(20, 999), rng.choice([97, 100, 101, 997, 1000, 1009])
    return f"What is {a}^{e} mod {m}?", f"print(pow({a}, {e}, {m}))", pow(a, e, m)


def _comb(rng: random.Random) -> tuple[str, str, int]:
    n, k = rng.randint(20, 300), rng.randint(2, 3)  # ~560 distinct problems, answers up to 7 digits
    return f"How many ways can {k} items be chosen from {n}?", f"import math\nprint(math.comb({n}, {k}))", math.comb(n, k)


def _rangesum(rng: random.Random) -> tuple[str, str, int]:
    a = rng.randint(10, 99)
    b = rng.randint(a + 50, a + 900)
    return f"What is the sum of the integers from {a} to {b}?", f"print(sum(range({a}, {b} + 1)))", (a + b) * (b - a + 1) // 2


def _mulmod(rng: random.Random) -> tuple[str, str, int]:
    # Two-digit answers: the model must compute with the tool but copies only 2 digits back.
    a, b, m = rng.randint(100, 999), rng.randint(100, 999), rng.choice([83, 89, 97])
    return f"What is {a} * {b} mod {m}?", f"print({a} * {b} % {m})", a * b % m


def _powmod2(rng: random.Random) -> tuple[str, str, int]:
    a, e, m = rng.randint(3, 99), rng.randint(20, 999), rng.choice([83, 89, 97])
    return f"What is {a}^{e} mod {m}?", f"print(pow({a}, {e}, {m}))", pow(a, e, m)


_MAKERS = {"product": _product, "modpow": _modpow, "comb": _comb, "rangesum": _rangesum, "mulmod": _mulmod,
           "powmod2": _powmod2}


def make_problems(n: int, *, seed: int = 0, families: tuple[str, ...] = FAMILIES) -> list[DemoProblem]:
    """``n`` distinct problems, families in rotation, drawn from ``random.Random(seed)``.

    Raises ValueError naming an unknown family.
    """
    unknown = [f for f in families if f not in _MAKERS]
    if unknown:
        raise ValueError(f"unknown problem families {unknown}; choose from {list(FAMILIES)}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[DemoProblem] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 20 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct problems from families {list(families)}; ask for fewer")
        family = families[len(out) % len(families)]
        text, code, answer = _MAKERS[family](rng)
        if text in seen:  # duplicates would leak between train and eval
            continue
        seen.add(text)
        out.append(DemoProblem(f"{family}-{len(out)}", family, text, code, answer))
    return out


def demo_splits(
    n_train: int, n_eval: int, *, seed: int = 0, families: tuple[str, ...] = FAMILIES[:4]
) -> tuple[list[DemoProblem], list[DemoProblem]]:
    """Disjoint (train, held-out eval) problem lists, deterministic in ``seed``."""
    problems = make_problems(n_train + n_eval, seed=seed, families=families)
    return problems[:n_train], problems[n_train:]


# --- what the sandbox shows the model --------------------------------------------------


def render_tool_output(stdout: str, stderr: str = "", duration_s: float = 0.01) -> str:
    """The text a tool response carries, rendered exactly as the live tool executor does.

    Demonstrations must use the same rendering as the tool executor
    (tools_sandbox.format_for_model, the rStar2-Agent release's format), or SFT teaches the
    model to read a format it will never see.
    """
    from tools_sandbox import ExecResult, format_for_model

    failed = bool(stderr)
    result = ExecResult(status="error" if failed else "ok", stdout=stdout, stderr=stderr,
                        exit_code=1 if failed else 0, signal=None, duration_s=duration_s)
    return format_for_model(result)


def _traceback(line: int, kind: str, message: str, source_line: str | None = None) -> str:
    """The stderr CPython prints for an uncaught error in code run as ``python -c``."""
    if kind == "SyntaxError":
        caret = " " * (4 + source_line.index("("))  # CPython points at the unclosed parenthesis
        return f'  File "<string>", line {line}\n    {source_line}\n{caret}^\n{kind}: {message}'
    return f'Traceback (most recent call last):\n  File "<string>", line {line}, in <module>\n{kind}: {message}'


def buggy_variant(p: DemoProblem, rng: random.Random) -> tuple[str, str]:
    """A plausible wrong version of ``p.code`` and the stderr it produces: (code, stderr).

    The bugs are the ones small models really write: a missing import, a misspelt name,
    an unclosed parenthesis.
    """
    kind = rng.choice(["name", "syntax"] if p.family != "comb" else ["import", "name", "syntax"])
    if kind == "import":
        code = p.code.replace("import math\n", "")
        return code, _traceback(1, "NameError", "name 'math' is not defined")
    if kind == "name":
        code = p.code.replace("print(", "prnt(", 1)
        line = code.count("\n", 0, code.index("prnt(")) + 1
        return code, _traceback(line, "NameError", "name 'prnt' is not defined. Did you mean: 'print'?")
    code = p.code[:-1]  # drop the closing parenthesis
    last = code.splitlines()[-1]
    return code, _traceback(len(code.splitlines()), "SyntaxError", "'(' was never closed", last)


# --- SFT demonstrations ---------------------------------------------------------------


class DemoConfig(BaseModel):
    """The demo's synthetic data: how many problems, and what the SFT demonstrations do."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0  # one seed for problems, splits and demonstrations
    n_train: int = 2000  # RL training problems (also the pool the SFT demonstrations are drawn from)
    n_eval: int = 64  # held-out problems for evaluation, disjoint from training
    n_sft: int = 2000  # SFT demonstrations
    tool_fraction: float = Field(0.35, ge=0.0, le=1.0)  # share of demonstrations that call the tool
    buggy_fraction: float = Field(0.3, ge=0.0, le=1.0)  # share of those tool calls whose code fails
    retry_fraction: float = Field(0.0, ge=0.0, le=1.0)  # share of failed calls the model fixes in a second call (else it guesses)
    lucky_guess_fraction: float = Field(0.1, ge=0.0, le=1.0)  # share of direct answers that happen to be right
    families: tuple[str, ...] = FAMILIES[:4]  # problem families (see FAMILIES); mulmod/powmod2 have 2-digit answers


def wrong_guess(answer: int, rng: random.Random) -> int:
    """A confident-looking wrong integer of about the same size as ``answer``."""
    digits = list(str(abs(answer)))
    for _ in range(max(1, len(digits) // 2)):
        i = rng.randrange(len(digits))
        digits[i] = str((int(digits[i]) + rng.randint(1, 9)) % 10)
    if len(digits) > 1 and digits[0] == "0":
        digits[0] = str(rng.randint(1, 9))
    guess = int("".join(digits))
    return guess if guess != answer else answer + 1


def answer_text(value: int | str) -> str:
    """The final-answer turn: ``<answer>\\boxed{value}</answer>``."""
    return f"{ANSWER_START}\\boxed{{{value}}}{ANSWER_END}"


def sft_conversation(p: DemoProblem, mode: str, rng: random.Random, *, system: str = SYSTEM_PROMPT) -> list[dict]:
    """One demonstration for ``p`` as a message list (system, user, assistant, [tool, assistant]).

    ``mode``: ``"tool"`` (correct code, answer copied from stdout), ``"buggy"`` (the code
    fails, the model then guesses), ``"retry"`` (the code fails, the model fixes it in a
    second call and copies the answer: right, but with a tool error on the way, the kind of
    trajectory RoC ranks below a clean one), ``"direct"`` (no tool, a guess, wrong unless lucky).
    """
    if mode not in ("tool", "buggy", "retry", "direct"):
        raise ValueError(f"unknown demonstration mode {mode!r}; use 'tool', 'buggy', 'retry' or 'direct'")
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": p.problem}]
    if mode == "direct":
        return msgs + [{"role": "assistant", "content": answer_text(wrong_guess(p.answer, rng))}]
    preamble = TOOL_PREAMBLE
    if mode in ("buggy", "retry"):
        code, stderr = buggy_variant(p, rng)
        msgs += [
            {"role": "assistant", "content": TOOL_PREAMBLE + tool_call_text(code)},
            {"role": "tool", "content": render_tool_output("", stderr + "\n")},
        ]
        if mode == "buggy":
            return msgs + [{"role": "assistant", "content": answer_text(wrong_guess(p.answer, rng))}]
        preamble = ""  # the fixed call follows the error at once
    return msgs + [
        {"role": "assistant", "content": preamble + tool_call_text(p.code)},
        {"role": "tool", "content": render_tool_output(f"{p.answer}\n")},
        {"role": "assistant", "content": answer_text(p.answer)},
    ]


def make_sft_demos(problems: list[DemoProblem], cfg: DemoConfig) -> list[list[dict]]:
    """``cfg.n_sft`` demonstrations over ``problems`` (cycled), modes mixed as ``cfg`` says.

    A lucky direct guess writes the right answer (``lucky_guess_fraction``), so direct
    answers are "usually", not always, wrong.
    """
    if not problems:
        raise ValueError("make_sft_demos needs at least one problem")
    rng = random.Random(cfg.seed + 1)
    demos = []
    for i in range(cfg.n_sft):
        p = problems[i % len(problems)]
        r = rng.random()
        if r < cfg.tool_fraction:
            mode = "buggy" if rng.random() < cfg.buggy_fraction else "tool"
            if mode == "buggy" and cfg.retry_fraction and rng.random() < cfg.retry_fraction:
                mode = "retry"
            demos.append(sft_conversation(p, mode, rng))
        else:
            conv = sft_conversation(p, "direct", rng)
            if rng.random() < cfg.lucky_guess_fraction:
                conv[-1] = {"role": "assistant", "content": answer_text(p.answer)}
            demos.append(conv)
    return demos


def tokenizer_corpus(seed: int = 0, n: int = 400) -> list[str]:
    """Texts a demo tokenizer is trained on: rendered demonstrations of every kind."""
    from training.chat import ADDED_TOKENS, SPECIAL_TOKENS

    problems = make_problems(n, seed=seed)
    rng = random.Random(seed)
    texts = []
    for i, p in enumerate(problems):
        conv = sft_conversation(p, ("tool", "buggy", "direct")[i % 3], rng)
        text = "\n".join(f"{m['role']}\n{m['content']}" for m in conv)  # role names become tokens too
        for tok in SPECIAL_TOKENS + ADDED_TOKENS:  # these become single tokens; keep them out of merges
            text = text.replace(tok, " ")
        texts.append(text)
    return texts
