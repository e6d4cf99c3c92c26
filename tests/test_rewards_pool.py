"""VerifierPool (real worker processes driven from trio) and the ``reckon verify`` CLI."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import trio
from typer.testing import CliRunner

from training.rewards import Score, VerifierConfig, VerifierPool, verify_app

FAST = VerifierConfig(workers=2, timeout_s=0.5, kill_grace_s=0.5)


def test_pool_scores_concurrently_and_counts() -> None:
    cases = [(f"<answer>\\boxed{{\\frac{{{i}}}{{2}}}}</answer>", str(i / 2)) for i in range(12)]
    cases += [("\\boxed{7}", "8"), ("no answer", "1")]

    async def main() -> tuple[list[Score | None], int, float]:
        results: list[Score | None] = [None] * len(cases)
        async with VerifierPool(FAST) as pool:
            async with trio.open_nursery() as nursery:
                for i, (response, gold) in enumerate(cases):

                    async def one(i: int = i, response: str = response, gold: str = gold) -> None:
                        results[i] = await pool.score(response, gold)

                    nursery.start_soon(one)
            return results, pool.completed, pool.throughput()

    results, completed, throughput = trio.run(main)
    assert [r.correct for r in results[:12]] == [True] * 12  # type: ignore[union-attr]
    assert results[12].method == "mismatch" and results[13].method == "no_answer"  # type: ignore[union-attr]
    assert results[0].answer_tags == 1  # type: ignore[union-attr]
    assert completed == len(cases) and throughput > 0


def test_pool_pathological_answers_return_and_workers_survive() -> None:
    async def main() -> tuple[list[str], int]:
        async with VerifierPool(FAST) as pool:
            methods = [
                (await pool.score("\\boxed{9^{9^{9^9}}}", "5")).method,
                (await pool.score("\\boxed{(x+1)^{1000}}", "(x+2)^{1000}")).method,  # worker's own timer
                (await pool.score("\\boxed{2}", "2")).method,
            ]
            return methods, pool.restarts

    methods, restarts = trio.run(main)
    assert methods == ["too_large", "timeout", "exact"]
    assert restarts == 0  # a timer-stopped check does not cost the worker


def test_pool_kills_and_replaces_a_hung_worker() -> None:
    """A frozen worker (SIGSTOP: as stuck as a GMP call that never returns) is killed
    after timeout_s + kill_grace_s, its check scores 0 as "timeout", and the pool
    keeps serving with a replacement."""

    async def main() -> tuple[Score, list[Score], VerifierPool]:
        async with VerifierPool(VerifierConfig(workers=1, timeout_s=0.3, kill_grace_s=0.3)) as pool:
            (worker,) = pool._workers
            os.kill(worker.process.pid, signal.SIGSTOP)
            hung = await pool.score("<answer>\\boxed{12}</answer>", "12")
            after = [await pool.score(f"\\boxed{{{i}}}", str(i)) for i in range(3)]
            return hung, after, pool

    hung, after, pool = trio.run(main)
    assert (hung.method, hung.correct, hung.extracted, hung.answer_tags) == ("timeout", False, "12", 1)
    assert all(s.correct for s in after)
    assert (pool.restarts, pool.timeouts, pool.completed) == (1, 1, 4)


def test_pool_reports_a_dead_worker_as_crashed() -> None:
    async def main() -> tuple[Score, Score, int]:
        async with VerifierPool(VerifierConfig(workers=1, timeout_s=2.0)) as pool:
            (worker,) = pool._workers
            worker.process.kill()
            await worker.process.wait()
            crashed = await pool.score("\\boxed{1}", "1")
            again = await pool.score("\\boxed{1}", "1")
            return crashed, again, pool.restarts

    crashed, again, restarts = trio.run(main)
    assert crashed.method == "crashed" and crashed.detail
    assert again.correct and restarts == 1


def test_pool_does_not_block_the_event_loop() -> None:
    """While the only worker grinds through a slow check, other trio tasks run."""
    order: list[str] = []

    async def main() -> None:
        async with VerifierPool(VerifierConfig(workers=1, timeout_s=1.0)) as pool:
            async with trio.open_nursery() as nursery:

                async def slow() -> None:
                    await pool.score("\\boxed{(x+1)^{1000}}", "(x+2)^{1000}")
                    order.append("slow check done")

                async def ticker() -> None:
                    for _ in range(5):
                        await trio.sleep(0.01)
                    order.append("ticks done")

                nursery.start_soon(slow)
                nursery.start_soon(ticker)

    trio.run(main)
    assert order == ["ticks done", "slow check done"]


def test_cancelled_caller_does_not_poison_the_pool() -> None:
    async def main() -> tuple[Score, int]:
        async with VerifierPool(VerifierConfig(workers=1, timeout_s=2.0)) as pool:
            with trio.move_on_after(0.05):
                await pool.score("\\boxed{(x+1)^{1000}}", "(x+2)^{1000}")
            # The abandoned worker's late reply must not answer this request.
            s = await pool.score("\\boxed{5}", "5")
            return s, pool.restarts

    s, restarts = trio.run(main)
    assert s.correct and s.extracted == "5" and restarts == 1


def test_pool_score_outside_context_is_an_error() -> None:
    async def main() -> None:
        await VerifierPool().score("\\boxed{1}", "1")

    try:
        trio.run(main)
    except RuntimeError as e:
        assert "async with" in str(e)
    else:
        raise AssertionError("expected RuntimeError")


# --------------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_single_case() -> None:
    result = runner.invoke(verify_app, ["--response", "so \\boxed{\\dfrac{1}{2}}", "--gold", "0.5"])
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip())
    assert line["correct"] is True and line["extracted"] == "\\dfrac{1}{2}"
    assert set(line) == {"correct", "extracted", "method", "seconds"}


def test_cli_file_reports_bad_lines_by_number(tmp_path: Path) -> None:
    path = tmp_path / "cases.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"response": "\\boxed{4}", "gold": "4"}),
                "{not json",
                json.dumps({"response": "\\boxed{5}", "gold": 4}),
                json.dumps({"gold": "4"}),
                json.dumps({"response": "\\boxed{9^{9^{9^9}}}", "gold": "1"}),
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    result = runner.invoke(verify_app, ["--file", str(path)])
    assert result.exit_code == 1
    lines = [json.loads(x) for x in result.output.strip().splitlines()]
    assert [x["line"] for x in lines] == [1, 2, 3, 4, 5]
    assert lines[0]["correct"] is True
    assert "error" in lines[1] and "JSON" in lines[1]["error"]
    assert lines[2]["correct"] is False and lines[2]["method"] == "mismatch"
    assert "response" in lines[3]["error"]
    assert lines[4]["method"] == "too_large"


def test_cli_file_through_pool(tmp_path: Path) -> None:
    path = tmp_path / "cases.jsonl"
    path.write_text("".join(json.dumps({"response": f"\\boxed{{{i}}}", "gold": str(i)}) + "\n" for i in range(4)))
    result = runner.invoke(verify_app, ["--file", str(path), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert [json.loads(x)["correct"] for x in result.output.strip().splitlines()] == [True] * 4


def test_cli_usage_errors_name_the_fix() -> None:
    result = runner.invoke(verify_app, ["--response", "\\boxed{1}"])
    assert result.exit_code != 0 and "--gold" in result.output
    result = runner.invoke(verify_app, ["--response", "x", "--gold", "1", "--mode", "sideways"])
    assert result.exit_code != 0 and "answer_tag_only" in result.output
