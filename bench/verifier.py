"""Verifications per second: VerifierPool (K worker processes) vs bare math-verify.

Run from the repository root::

    python -m bench.verifier [--cases 600] [--workers 2]

Both sides check the same generated responses (distinct numbers, so math-verify's
parse cache cannot make repeats free). The baseline is what a trainer without this
module would do: ``math_verify.verify(parse(gold), parse(response))`` called in one
process, main thread, with math-verify's own signal timers. The pool does more per
case (extraction with tool-output stripping, the size guard, the normalizing fallback
on mismatches, a JSON round trip to a worker) but runs K checks in parallel and never
blocks its caller. Prints both rates and their ratio; pool start-up is reported apart.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import trio
from math_verify import parse, verify

from training.rewards import VerifierConfig, VerifierPool


def make_cases(n: int) -> list[tuple[str, str]]:
    """``n`` (response, gold) pairs: about 70% correct in varied notation, 30% wrong."""
    templates = [
        (r"\boxed{{{a}}}", "{a}"),
        (r"\boxed{{\frac{{{a}}}{{{b}}}}}", r"\frac{{{a}}}{{{b}}}"),
        (r"\boxed{{\dfrac{{{a2}}}{{{b2}}}}}", r"\frac{{{a}}}{{{b}}}"),
        (r"\boxed{{{a}\sqrt{{2}}}}", r"\sqrt{{{a2sq}}}"),
        (r"\boxed{{[{a}, {c})}}", "[{a},{c})"),
        (r"\boxed{{(\,{a}, {b}\,)}}", "({a},{b})"),
        (r"\boxed{{{a}\text{{ cm}}}}", "{a}"),
        (r"\boxed{{{a}.0}}", "{a}"),
        (r"\boxed{{x^2+{a}x}}", "x({a}+x)"),
        (r"\boxed{{{c}}}", "{a}"),  # wrong
        (r"\boxed{{\frac{{{b}}}{{{a}}}}}", r"\frac{{{a}}}{{{b}}}"),  # wrong unless a == b
        (r"\boxed{{[{a}, {c}]}}", "[{a},{c})"),  # wrong bracket
    ]
    cases = []
    for i in range(n):
        response_t, gold_t = templates[i % len(templates)]
        a, b = 3 + i, 7 + 2 * i
        values = {"a": a, "b": b, "c": a + 5, "a2": 2 * a, "b2": 2 * b, "a2sq": 2 * a * a}
        response = (
            f"Let me compute.<tool_call>\n{{\"name\": \"python\"}}\n</tool_call>"
            f"<tool_response>\n{a}\n</tool_response>So <answer>the answer is ${response_t.format(**values)}$</answer>"
        )
        cases.append((response, gold_t.format(**values)))
    return cases


def bench_bare(cases: list[tuple[str, str]]) -> tuple[float, int]:
    """(seconds, number correct) for bare math-verify calls in this process."""
    parse(r"$\frac{1}{2}$")  # first call pays ~70 ms of imports/compilation: not a rate
    start = time.perf_counter()
    correct = sum(bool(verify(parse(f"${gold}$"), parse(response))) for response, gold in cases)
    return time.perf_counter() - start, correct


async def bench_pool(cases: list[tuple[str, str]], workers: int) -> tuple[float, float, int]:
    """(start-up seconds, checking seconds, number correct) through a VerifierPool."""
    t0 = time.perf_counter()
    async with VerifierPool(VerifierConfig(workers=workers)) as pool:
        t1 = time.perf_counter()
        correct = 0

        async def one(response: str, gold: str) -> None:
            nonlocal correct
            result = await pool.score(response, gold)
            correct += result.correct  # read after the await: tasks interleave

        async with trio.open_nursery() as nursery:
            for response, gold in cases:
                nursery.start_soon(one, response, gold)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=600, help="number of responses to check")
    parser.add_argument("--workers", type=int, default=2, help="verifier worker processes (K)")
    args = parser.parse_args()
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    cases = make_cases(args.cases)
    bare_s, bare_correct = bench_bare(cases)
    startup_s, pool_s, pool_correct = trio.run(bench_pool, cases, args.workers)
    bare_rate, pool_rate = len(cases) / bare_s, len(cases) / pool_s
    print(f"cases: {len(cases)}   cpu cores: {os.cpu_count()}")
    print(f"bare math_verify.verify, 1 process : {bare_rate:8.1f} verifications/s  ({bare_correct} correct)")
    print(
        f"VerifierPool, {args.workers} workers           : {pool_rate:8.1f} verifications/s  "
        f"({pool_correct} correct; start-up {startup_s:.2f} s not counted)"
    )
    print(f"ratio pool / bare                  : {pool_rate / bare_rate:8.2f}x")


if __name__ == "__main__":
    main()
