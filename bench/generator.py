"""Generator throughput: plain engine generation vs multi-turn rollouts whose tool calls are slow.

What is compared (same engine, same settings, same model, same prompt, equal work):

* **rollouts**: N multi-turn tool-use rollouts (``actors.rollout.run_trajectory``) whose every
  tool call sleeps the configured latency (0, 50, 300 ms). Counted: model tokens (loss-mask
  1); the tool-response tokens are not generated and not counted.
* **plain**: N single ``engine.generate`` requests on the same prompt, request i generating
  exactly as many tokens as rollout i's model tokens (``ignore_eos``), so both sides
  produce the same number of tokens with the same per-sequence lengths.
* **admission** (both sides): a new rollout / request starts whenever fewer than
  ``max_running`` sequences are generating on the engine. A rollout parked on a tool call
  does not hold an engine slot, so its wait is covered by admitting another one: what the
  scheduler does (it admits by free KV, not by rollouts in flight; see docs/scheduling.md).
  With rollouts capped at ``max_running`` in flight instead, each tool wait leaves a hole
  in the batch (``--cap-in-flight`` shows that case).
* **timing**: from the first admission to the last completion (ramp-up and drain included
  on both sides); one unmeasured warm-up round of each kind runs first; ``--rounds``
  alternate rollouts and plain, and the ratio is over their summed tokens and seconds.

Also printed: batch occupancy, the tokens sampled per engine step on each side (engine
counters). It does not depend on what else the machine runs, unlike wall-clock tok/s on a
shared CPU, and its ratio is the share of the batch the rollouts kept full.

ratio = rollout tokens/s over plain tokens/s; goal >= 0.9 (tool waits hidden behind other
sequences' decoding). Also printed: the ratio over the first-full-batch-to-last-admission
window (steady state, no ramp-up or drain), and each latency's ratio over the 0 ms one:
0 ms rollouts do the same multi-turn work with nothing to wait for, so that quotient is
the share of the tool wait that was hidden. N must be large against one rollout's own
length (its turns plus its tool waits), or the last rollouts' tool waits, which nothing can
hide, dominate.
The model is the tests' tiny Qwen2 trained to write a tool-use rollout, so rollouts
really call the tool.

Last, the **engine-bound ceiling**: the last round's rollouts replayed turn for turn on the
engine thread itself (``Engine.exclusive``), each continuation added the moment its turn
ends, against their plain counterparts replayed the same way. No tool, no trio, no
admission: only the engine's own cost of the turns (each continuation's prefill of the
tool response and the unfinished KV block). Rollouts through the generator can at best
match this ratio on this engine and machine (up to the machine's round-to-round noise).

    python -m bench.generator [--kind vllm|hf] [--n 512] [--max-running 32] [--latency-ms 0 50 300]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Awaitable, Callable

import trio


class Admission:
    """Starts jobs while fewer than ``slots`` of them are generating on the engine.

    A job calls :meth:`park` when it leaves the engine (a tool call) and :meth:`unpark`
    when it goes back; a job that has finished frees its slot.

    ``window``: the steady state, from the admission that first filled the slots to the
    last admission (jobs were always waiting to start in between), as (seconds, tokens
    sampled by the engine in them) read from ``tokens()``.
    """

    def __init__(self, slots: int, cap_in_flight: bool, tokens: Callable[[], float]) -> None:
        self.slots = slots
        self.cap_in_flight = cap_in_flight  # count parked jobs against the slots too
        self.generating = 0
        self.in_flight = 0
        self._changed = trio.Event()
        self._tokens = tokens
        self.window = (0.0, 0.0)

    def _busy(self) -> int:
        return self.in_flight if self.cap_in_flight else self.generating

    def park(self) -> None:
        self.generating -= 1
        self._wake()

    def unpark(self) -> None:
        self.generating += 1

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def run(self, n: int, job: Callable[[int], Awaitable[None]]) -> None:
        async def one(i: int) -> None:
            try:
                await job(i)
            finally:
                self.generating -= 1
                self.in_flight -= 1
                self._wake()

        start = (time.perf_counter(), self._tokens())
        async with trio.open_nursery() as nursery:
            i = 0
            while i < n:
                while i < n and self._busy() < self.slots:
                    self.generating += 1
                    self.in_flight += 1
                    nursery.start_soon(one, i)
                    i += 1
                    if i == self.slots:
                        start = (time.perf_counter(), self._tokens())
                    if i == n:
                        self.window = (time.perf_counter() - start[0], self._tokens() - start[1])
                await self._changed.wait()


#: One job of the engine-bound replay: its turns, each (tool-response ids fed before the
#: turn, model tokens sampled in it); a plain request is one turn with nothing fed.
Job = list[tuple[list[int], int]]


def turn_shapes(response_ids, loss_mask) -> Job:
    """Split a trajectory's response into its turns: runs of model tokens (loss mask 1), each
    with the tool-response ids (mask 0) that came before it. Trailing tool ids (the budget
    ended in a response) start no turn."""
    turns: Job = []
    fed: list[int] = []
    for tid, m in zip(response_ids.tolist(), loss_mask.tolist()):
        if m:
            if fed or not turns:
                turns.append((fed, 0))
                fed = []
            turns[-1] = (turns[-1][0], turns[-1][1] + 1)
        else:
            fed.append(tid)
    return turns


def replay(backend, tag: str, prompt: list[int], jobs: list[Job], slots: int, temperature: float) -> tuple[int, float]:
    """Run ``jobs`` on ``backend`` synchronously (call it on the engine thread, through
    ``Engine.exclusive``, while no other request runs on the engine): at most ``slots`` jobs
    at a time, a job's next turn added as soon as its last one ends, each turn sampling
    exactly its token count. Returns (tokens sampled, seconds)."""
    from actors.engines import SamplingSpec

    t0 = time.perf_counter()
    state: dict[str, tuple[int, int, list[int]]] = {}  # request id -> (job, turn, history)

    def add(rid: str, i: int, t: int, history: list[int]) -> None:
        fed, n = jobs[i][t]
        history = history + fed
        state[rid] = (i, t, history)
        backend.add(rid, prompt + history, SamplingSpec(max_tokens=n, temperature=temperature, ignore_eos=True))

    started = made = 0
    while started < min(slots, len(jobs)):
        add(f"{tag}-e{started}", started, 0, [])
        started += 1
    while backend.has_work():
        for d in backend.step():
            made += len(d.token_ids)
            i, t, history = state[d.request_id]
            history += d.token_ids
            if d.finish_reason is None:
                continue
            if t + 1 < len(jobs[i]):
                add(d.request_id, i, t + 1, history)
            else:
                del state[d.request_id]
                if started < len(jobs):
                    add(f"{tag}-e{started}", started, 0, [])
                    started += 1
    return made, time.perf_counter() - t0


async def bench(args: argparse.Namespace, model_dir: str) -> list[tuple[float, float]]:
    from transformers import AutoTokenizer

    from actors.engines import EngineConfig, SamplingSpec, create_engine
    from actors.rollout import RolloutSpec, run_trajectory
    from tests._tiny import PROBLEM
    from training.chat import encode_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = encode_prompt(tok, PROBLEM)
    cfg = EngineConfig(kind=args.kind, max_model_len=2048, max_running=args.max_running, block_size=args.block_size)
    print(
        f"equal work: N={args.n} rollouts (temperature {args.temperature}, <= {args.max_tokens} tokens, <= {args.max_turns} turns) "
        f"vs N plain requests generating the same token counts; admission keeps {args.max_running} sequences generating"
        f"{' (capped: parked rollouts hold their slot)' if args.cap_in_flight else ' (parked rollouts free their slot)'}"
    )
    t0 = time.perf_counter()
    results = []
    async with create_engine(cfg, model_dir) as engine:
        print(f"engine {engine._name}: start {time.perf_counter() - t0:.1f} s (incl. import), {cfg.model_dump(include={'max_running', 'prefix_caching', 'dtype', 'block_size'})}")

        async def rollouts(tag: str, n: int, lat: float) -> tuple[list[int], int, float]:
            adm = Admission(args.max_running, args.cap_in_flight, lambda: engine.counters()["tokens"])
            lengths = [0] * n
            shapes[:] = [[] for _ in range(n)]
            calls = 0

            async def job(i: int) -> None:
                nonlocal calls

                async def call_tool(code: str, turn: int) -> tuple[str, str]:
                    nonlocal calls
                    calls += 1
                    adm.park()
                    try:
                        await trio.sleep(lat)
                    finally:
                        adm.unpark()
                    return "ok", "42"

                spec = RolloutSpec(f"{tag}-r{i}", prompt, args.max_tokens, args.max_turns, temperature=args.temperature)
                traj = await run_trajectory(engine, tok, spec, call_tool)
                lengths[i] = int(traj.loss_mask.sum())
                shapes[i] = turn_shapes(traj.response_ids, traj.loss_mask)

            t = time.perf_counter()
            c0 = engine.counters()
            await adm.run(n, job)
            c1 = engine.counters()
            occupancy[0] += c1["tokens"] - c0["tokens"]
            occupancy[1] += c1["steps"] - c0["steps"]
            occupancy[4] += c1["step_seconds"] - c0["step_seconds"]
            steady[0] += adm.window[0]
            steady[1] += adm.window[1]
            return lengths, calls, time.perf_counter() - t

        async def plain(tag: str, lengths: list[int]) -> tuple[int, float]:
            adm = Admission(args.max_running, False, lambda: engine.counters()["tokens"])
            made = 0

            async def job(i: int) -> None:
                nonlocal made
                spec = SamplingSpec(max_tokens=max(1, lengths[i]), temperature=args.temperature, ignore_eos=True)
                out = await engine.generate(f"{tag}-p{i}", prompt, spec)
                made += len(out.token_ids)

            t = time.perf_counter()
            c0 = engine.counters()
            await adm.run(len(lengths), job)
            c1 = engine.counters()
            occupancy[2] += c1["tokens"] - c0["tokens"]
            occupancy[3] += c1["steps"] - c0["steps"]
            occupancy[5] += c1["step_seconds"] - c0["step_seconds"]
            steady[2] += adm.window[0]
            steady[3] += adm.window[1]
            return made, time.perf_counter() - t

        shapes: list[Job] = []  # the last rollouts round's turns, for the engine-bound replay
        occupancy = [0, 0, 0, 0, 0.0, 0.0]  # rollout tokens, steps, plain tokens, steps, rollout / plain seconds in steps
        steady = [0.0, 0.0, 0.0, 0.0]  # steady-state window: rollout seconds, tokens, plain seconds, tokens

        # warm-up, not measured: both kinds, a full batch each
        lengths, _, _ = await rollouts("warm", args.max_running, 0.0)
        await plain("warm", lengths)
        for lat in args.latency_ms:
            # rounds alternate rollouts and plain, so a load change on a shared machine hits both sides
            rt = rdt = pt = pdt = 0.0
            occupancy[:] = [0, 0, 0, 0, 0.0, 0.0]
            steady[:] = [0.0, 0.0, 0.0, 0.0]
            for rnd in range(args.rounds):
                tag = f"l{lat:g}-{rnd}"
                lengths, calls, dt = await rollouts(tag, args.n, lat / 1000)
                made, p_dt = await plain(tag, lengths)
                tokens = sum(lengths)
                rt, rdt, pt, pdt = rt + tokens, rdt + dt, pt + made, pdt + p_dt
                print(
                    f"  round {rnd + 1}: rollouts {tokens / dt:.0f} tok/s ({tokens} model tokens, {calls / args.n:.1f} tool calls/rollout, {dt:.2f} s); "
                    f"plain {made / p_dt:.0f} tok/s ({made} tokens, {p_dt:.2f} s); ratio {tokens / dt / (made / p_dt):.2f}",
                    flush=True,
                )
            ratio = (rt / rdt) / (pt / pdt)
            occ_r, occ_p = occupancy[0] / max(1, occupancy[1]), occupancy[2] / max(1, occupancy[3])
            steady_r, steady_p = steady[1] / max(1e-9, steady[0]), steady[3] / max(1e-9, steady[2])
            print(
                f"tool latency {lat:g} ms: rollouts {rt / rdt:.0f} tok/s, plain {pt / pdt:.0f} tok/s over {args.rounds} rounds; ratio {ratio:.2f} (goal >= 0.9); "
                f"steady state (first full batch to last admission, {steady[0]:.1f} s / {steady[2]:.1f} s) rollouts {steady_r:.0f} tok/s, "
                f"plain {steady_p:.0f} tok/s: ratio {steady_r / max(1e-9, steady_p):.2f}; "
                f"batch occupancy (tokens per engine step) rollouts {occ_r:.1f}, plain {occ_p:.1f}: ratio {occ_r / occ_p:.2f}; "
                f"mean step rollouts {1000 * occupancy[4] / max(1, occupancy[1]):.2f} ms, plain {1000 * occupancy[5] / max(1, occupancy[3]):.2f} ms; "
                f"time in steps rollouts {occupancy[4] / rdt:.0%}, plain {occupancy[5] / pdt:.0%}",
                flush=True,
            )
            results.append((lat, ratio))
        # The same turns with nothing between them but the engine: the ceiling of the ratio.
        plain_jobs = [[([], sum(n for _, n in job))] for job in shapes]
        et = edt = ept = epdt = 0.0
        for rnd in range(args.rounds):
            made, dt = await engine.exclusive(lambda b: replay(b, f"eb{rnd}", prompt, shapes, args.max_running, args.temperature))
            p_made, p_dt = await engine.exclusive(lambda b: replay(b, f"ep{rnd}", prompt, plain_jobs, args.max_running, args.temperature))
            et, edt, ept, epdt = et + made, edt + dt, ept + p_made, epdt + p_dt
            print(f"  round {rnd + 1}: replayed rollouts {made / dt:.0f} tok/s, plain {p_made / p_dt:.0f} tok/s; ratio {made / dt / (p_made / p_dt):.2f}", flush=True)
        print(
            f"engine-bound ceiling (the last {len(shapes)} rollouts' turns replayed on the engine thread, no tool, no trio, "
            f"{args.rounds} rounds): rollouts {et / edt:.0f} tok/s, plain {ept / epdt:.0f} tok/s; ratio {et / edt / (ept / epdt):.2f}",
            flush=True,
        )
    base = dict(results).get(0.0)
    if base and len(results) > 1:
        # The 0 ms rollouts do all the multi-turn work (a prefill per turn, the turn's
        # bookkeeping) with nothing to wait for: what a slow tool costs beyond that is
        # the part of the gap that waits left unhidden.
        print("tool waits hidden (ratio at L ms / ratio at 0 ms): "
              + ", ".join(f"{lat:g} ms {r / base:.2f}" for lat, r in results if lat), flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="auto", choices=["auto", "vllm", "hf"])
    ap.add_argument("--n", type=int, default=512, help="rollouts (and plain requests) per measurement")
    ap.add_argument("--max-running", type=int, default=32, help="engine slots (sequences decoded together)")
    ap.add_argument("--latency-ms", type=float, nargs="+", default=[0, 50, 300],
                    help="tool-call latencies to measure (0: the multi-turn work alone, nothing to hide)")
    ap.add_argument("--block-size", type=int, default=0, help="EngineConfig.block_size (vLLM KV block; 0 = auto: 32 on CPU, vLLM's default on GPU)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rollout/plain rounds per latency")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=1024, help="rollout budget (model + tool tokens)")
    ap.add_argument("--max-turns", type=int, default=8)
    ap.add_argument("--cap-in-flight", action="store_true", help="count parked rollouts against the engine slots (the old, starved admission)")
    ap.add_argument("--model-dir", default=None, help="use this model directory instead of building the tiny tool-use model")
    args = ap.parse_args()
    if args.n < 1 or args.max_running < 1:
        ap.error(f"--n and --max-running must be >= 1, got {args.n}, {args.max_running}")
    from tests._tiny import build_tool_use_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or str(build_tool_use_model(tmp))
        trio.run(bench, args, model_dir)


if __name__ == "__main__":
    main()
