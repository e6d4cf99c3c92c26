"""Generator throughput: plain engine generation vs multi-turn rollouts with slow tools.

Same model, prompts and concurrency: (a) plain ``engine.generate`` of N requests; (b) N
multi-turn rollouts whose tool calls sleep a configured latency (50 ms, 300 ms). Model
tokens per second of (b) over (a) is the figure (goal >= 0.9: tool waits hidden behind
other sequences' decoding). The model is the tests' tiny Qwen2 trained to write a
tool-use rollout, so rollouts really call the tool.

    python -m bench.generator [--kind vllm|hf] [--n 64] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import trio


async def _pool(n: int, concurrency: int, job) -> None:
    limit = trio.Semaphore(concurrency)

    async def run(i):
        async with limit:
            await job(i)

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(run, i)


async def bench(kind: str, model_dir: str, n: int, concurrency: int, latencies: list[float]) -> None:
    from transformers import AutoTokenizer

    from actors.engines import EngineConfig, SamplingSpec, create_engine
    from actors.rollout import RolloutSpec, run_trajectory
    from tests._tiny import PROBLEM
    from training.chat import prompt_messages

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = tok.encode(tok.apply_chat_template(prompt_messages(PROBLEM), add_generation_prompt=True, tokenize=False), add_special_tokens=False)
    t0 = time.perf_counter()
    async with create_engine(EngineConfig(kind=kind, max_model_len=2048, max_running=concurrency), model_dir) as engine:
        print(f"engine {kind}: start {time.perf_counter() - t0:.1f} s (incl. import), capacity {engine.capacity()}")
        results: dict[str, tuple[float, float]] = {}
        for lat in latencies:
            model_tokens = 0
            tool_calls = 0

            async def call_tool(code: str, turn: int) -> tuple[str, str]:
                nonlocal tool_calls
                tool_calls += 1
                await trio.sleep(lat)
                return "ok", "42"

            async def rollout(i):
                nonlocal model_tokens
                traj = await run_trajectory(engine, tok, RolloutSpec(f"l{lat}-{i}", prompt, 1024, 8, temperature=1.0), call_tool)
                model_tokens += int(traj.loss_mask.sum())

            t = time.perf_counter()
            await _pool(n, concurrency, rollout)
            dt = time.perf_counter() - t
            per_seq = model_tokens / n
            # plain generation: same prompts, same concurrency, same model tokens per sequence, no tool waits
            plain_tokens = 0

            async def plain(i):
                nonlocal plain_tokens
                out = await engine.generate(f"p{lat}-{i}", prompt, SamplingSpec(max_tokens=max(1, round(per_seq))))
                plain_tokens += len(out.token_ids)

            t = time.perf_counter()
            await _pool(n, concurrency, plain)
            pdt = time.perf_counter() - t
            roll_tps, plain_tps = model_tokens / dt, plain_tokens / pdt
            print(
                f"tool latency {lat * 1000:.0f} ms: rollouts {roll_tps:.0f} tok/s ({model_tokens} model tokens, {tool_calls} tool calls, {dt:.2f} s); "
                f"plain {plain_tps:.0f} tok/s ({plain_tokens} tokens, {pdt:.2f} s); ratio {roll_tps / plain_tps:.2f} (goal >= 0.9)"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="auto", choices=["auto", "vllm", "hf"])
    ap.add_argument("--n", type=int, default=64, help="rollouts (and plain requests) per measurement")
    ap.add_argument("--concurrency", type=int, default=32, help="rollouts in flight on the engine")
    ap.add_argument("--latency-ms", type=float, nargs="+", default=[50, 300], help="tool-call latencies to measure")
    ap.add_argument("--model-dir", default=None, help="use this model directory instead of building the tiny tool-use model")
    args = ap.parse_args()
    from tests._tiny import build_tool_use_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or str(build_tool_use_model(tmp))
        trio.run(bench, args.kind, model_dir, args.n, args.concurrency, [x / 1000 for x in args.latency_ms])


if __name__ == "__main__":
    main()
