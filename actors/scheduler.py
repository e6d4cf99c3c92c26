"""Scheduler: drives the recipe, dispatches rollouts, forms GRPO-RoC batches.

One per run. It walks the recipe stage by stage (SFT, then RL stages, each evaluated at
its end), and for every RL step:

1. picks ``prompts_per_step`` problems and creates 2G rollouts for each (a group);
2. places rollouts on generators with the dispatch policy (actors/dispatch.py), as the
   generators' reported KV capacity allows, and re-places any that come back aborted;
3. collects each trajectory (TrajectoryCompleted) and its reward (RewardAssigned);
4. when a group is complete, down-samples it to G with RoC (training/roc.py), computes
   advantages over the kept group, and records the decision (GroupResampled);
5. packs the kept trajectories into one BatchFormed for the learner, and waits for the
   step's TrainStepCompleted and the new weights (WeightsPublished) before the next step
   (``rollout.staleness`` 0: on-policy, as the paper); with staleness 1 the next step's
   rollouts start at once, while the learner trains, on weights one version behind (every
   token records the version that produced it).

Supervision (actors/supervision.py): work sent to a generator, verifier or the learner is
acknowledged by them only when done, so the links resend it to a restarted actor. Results
are taken idempotently: a rollout settles on the first of its trajectories (a re-run after
a crash adds one) whose own reward has arrived (matched by causation id), later ones are
ignored, and a trajectory left without a reward past a deadline is forwarded to a verifier
again (the same event: a verifier that has it already ignores it).
"""

from __future__ import annotations

import importlib.metadata
import json
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import trio
from transformers import AutoTokenizer

from actors.dispatch import EngineState, PendingRollout, make_policy
from actors.runtime import Context
from protocol.codec import encode
from actors.config import StageSection
from protocol.events import (
    BatchFormed,
    CapacityReported,
    Envelope,
    EvalCompleted,
    GroupResampled,
    RewardAssigned,
    RolloutRequested,
    RunCompleted,
    RunStarted,
    StageStarted,
    TrainStepCompleted,
    TrajectoryCompleted,
    WeightsPublished,
    WorkReissued,
)
from training.algos import group_advantages
from training.chat import encode_messages, encode_prompt
from training.data import Problem, load_train_eval
from training.demo_tasks import demo_splits, make_sft_demos
from training.roc import RolloutStats, roc_downsample


def _reckon_version() -> str:
    """reckon's installed version, for RunStarted; a source checkout run without
    ``pip install`` (PYTHONPATH=.) has no package metadata: "unknown (source tree)"."""
    try:
        return importlib.metadata.version("reckon-rl")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (source tree)"


#: Rounds of fresh prompts an RL step may draw when every group had equal rewards.
MAX_ROUNDS_PER_STEP = 4
#: A trajectory without a reward this long after it arrived is forwarded to a verifier again
#: (the generator that would have resent it may have died too).
VERIFY_DEADLINE_S = 30.0


@dataclass
class Rollout:
    request: RolloutRequested
    prompt_tokens: int
    trajectory: TrajectoryCompleted | None = None
    reward: RewardAssigned | None = None
    attempts: int = 0
    # Supervision: every trajectory received for this rollout (a re-run after a crash adds one)
    # and every reward, by the trajectory event it was assigned to; the first complete pair wins.
    candidates: dict[str, Envelope] = field(default_factory=dict)  # trajectory event id -> envelope
    rewards: dict[str, RewardAssigned] = field(default_factory=dict)  # causation (trajectory) event id -> reward
    trajectory_at: float = 0.0  # monotonic arrival of the first trajectory (or last re-send to a verifier)


@dataclass
class Step:
    """The rollouts of one RL step (or one evaluation probe) and their outcomes."""

    rollouts: dict[str, Rollout] = field(default_factory=dict)
    done: trio.Event = field(default_factory=trio.Event)

    def complete(self) -> bool:
        return all(r.reward is not None and r.trajectory is not None for r in self.rollouts.values())


class Scheduler:
    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.cfg = ctx.config
        self.rng = random.Random(self.cfg.run.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(self.cfg.model.path)
        self.engines: dict[str, EngineState] = {}
        self.tool_queue: dict[str, int] = {}
        self.policy = make_policy(self.cfg.rollout.dispatch)
        self.pending: list[Rollout] = []
        self.in_flight: dict[str, Rollout] = {}
        self.current: Step | None = None
        self.step = 0  # global optimizer step (SFT and RL)
        self.weights_version = 0
        self.train_done: dict[int, TrainStepCompleted] = {}
        self.training: list[int] = []  # steps sent to the learner whose weights are not yet published
        self.changed = trio.Event()
        self._prompt_cache: dict[str, list[int]] = {}

    # ------------------------------------------------------------ inbox

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_until(self, predicate) -> None:
        while not predicate():
            await self.changed.wait()

    async def inbox_loop(self) -> None:
        while True:
            env = await self.ctx.receive()
            self.handle(env)
            self._notify()
            self.dispatch()

    def handle(self, env: Envelope) -> None:
        ev = env.payload
        if isinstance(ev, CapacityReported):
            if ev.kind == "generator":
                self.engines[env.source] = EngineState(
                    name=env.source,
                    total_tokens=ev.total_tokens,
                    free_tokens=ev.free_tokens,
                    total_slots=ev.total_slots,
                    free_slots=ev.free_slots,
                    running=ev.running,
                )
            else:
                self.tool_queue[env.source] = ev.queued
        elif isinstance(ev, TrajectoryCompleted):
            r = self.in_flight.get(ev.rollout_id)
            if r is None or env.event_id in r.candidates:
                return  # a rollout already settled, or of a finished step
            if ev.finish_reason == "aborted":  # e.g. the generator was stopped: place it again
                if not r.candidates:
                    self.policy.on_finished(ev.rollout_id, None)
                    del self.in_flight[ev.rollout_id]
                    self.pending.append(r)
                return
            if not r.candidates:  # the first trajectory frees its KV; a re-run's is already free
                self.policy.on_finished(ev.rollout_id, len(ev.response_ids))
                r.trajectory_at = time.monotonic()
            r.candidates[env.event_id] = env
            self._settle(r)
        elif isinstance(ev, RewardAssigned):
            r = self.in_flight.get(ev.rollout_id)
            if r is None or env.causation_id is None:
                return
            # May arrive before its trajectory: they travel different paths.
            r.rewards.setdefault(env.causation_id, ev)
            self._settle(r)
        elif isinstance(ev, TrainStepCompleted):
            self.train_done[ev.step] = ev
        elif isinstance(ev, WeightsPublished):
            self.weights_version = max(self.weights_version, ev.version)

    def _settle(self, r: Rollout) -> None:
        """Take the first trajectory that has its own reward (matched by causation id)."""
        for eid, env in r.candidates.items():
            if eid in r.rewards:
                r.trajectory, r.reward = env.payload, r.rewards[eid]
                break
        else:
            return
        del self.in_flight[r.request.rollout_id]
        if self.current is not None and self.current.complete():
            self.current.done.set()

    async def verify_watchdog(self) -> None:
        """Forward a trajectory left without a reward past the deadline to a verifier again."""
        verifiers = self.cfg.verifiers()
        while True:
            await trio.sleep(VERIFY_DEADLINE_S / 4)
            now = time.monotonic()
            for rid, r in list(self.in_flight.items()):
                if not r.candidates or r.reward is not None or now - r.trajectory_at < VERIFY_DEADLINE_S:
                    continue
                env = next(iter(r.candidates.values()))
                r.trajectory_at = now
                r.attempts += 1
                verifier = verifiers[r.attempts % len(verifiers)]
                self.ctx.net.send([verifier], env, encode(env))  # the same event: idempotent at the verifier
                self.ctx.emit(WorkReissued(kind="verification", work_id=rid, request_id=env.event_id,
                                           holder=verifier, reason="deadline"))
                self.ctx.log.warning("no reward past the deadline; trajectory sent to a verifier again",
                                     rollout_id=rid, verifier=verifier)

    # ------------------------------------------------------------ dispatch

    def dispatch(self) -> None:
        """Place pending rollouts on generators as the policy allows."""
        if not self.pending or not self.engines:
            return
        by_id = {r.request.rollout_id: r for r in self.pending}
        assigned = self.policy.assign(
            [PendingRollout(rid, r.prompt_tokens, r.request.max_tokens) for rid, r in by_id.items()],
            list(self.engines.values()),
            tool_queue=sum(self.tool_queue.values()),
        )
        placed = set()
        for rid, engine in assigned:
            r = by_id[rid]
            r.attempts += 1
            req = r.request
            r.request = RolloutRequested(**{**_fields(req), "generator": engine})
            self.in_flight[rid] = r
            placed.add(rid)
            self.ctx.emit(r.request, to=[engine])
        if placed:
            self.pending = [r for r in self.pending if r.request.rollout_id not in placed]

    def prompt_ids(self, problem: str) -> list[int]:
        ids = self._prompt_cache.get(problem)
        if ids is None:
            ids = self._prompt_cache[problem] = encode_prompt(self.tokenizer, problem)
        return ids

    async def run_rollouts(self, requests: list[RolloutRequested]) -> Step:
        """Dispatch ``requests`` and wait until every one has a trajectory and a reward."""
        step = Step()
        for req in requests:
            r = Rollout(req, prompt_tokens=len(self.prompt_ids(req.problem)))
            step.rollouts[req.rollout_id] = r
            self.pending.append(r)
        self.current = step
        self.dispatch()
        if step.complete():
            step.done.set()
        await step.done.wait()
        self.current = None
        return step

    def requests_for(
        self, problems: list[Problem], n: int, *, stage: str, max_tokens: int, max_turns: int, temperature: float
    ) -> list[RolloutRequested]:
        reqs = []
        for p in problems:
            gid = f"{stage}-s{self.step}-{p.id}-{self.rng.getrandbits(32):08x}"
            for j in range(n):
                reqs.append(
                    RolloutRequested(
                        rollout_id=f"{gid}-{j}",
                        group_id=gid,
                        step=self.step,
                        stage=stage,
                        problem_id=p.id,
                        problem=p.problem,
                        answer=p.answer,
                        generator="",
                        max_tokens=max_tokens,
                        max_turns=max_turns,
                        temperature=temperature,
                        min_version=self.weights_version,
                    )
                )
        return reqs

    # ------------------------------------------------------------ training

    async def train(self, batch: BatchFormed) -> TrainStepCompleted:
        """Train one batch and wait for the weights it produces (SFT steps; RL steps use submit)."""
        self.submit(batch)
        await self.settle_training(0)
        return self.train_done[batch.step]

    def submit(self, batch: BatchFormed) -> None:
        """Send a batch to the learner without waiting for it."""
        self.ctx.emit(batch, to=["learner"])
        self.training.append(batch.step)

    def _trained(self, step: int) -> bool:
        done = self.train_done.get(step)
        return done is not None and self.weights_version >= done.weights_version

    async def settle_training(self, ahead: int) -> None:
        """Wait until at most ``ahead`` submitted steps are untrained or their weights unpublished.

        ``rollout.staleness`` is the ``ahead`` allowed before an RL step's rollouts start:
        0 = on-policy (the next rollouts use the weights the last batch produced, as the
        paper); 1 = the next step's rollouts start while the learner trains the last
        batch, on weights one version behind.
        """
        await self.wait_until(lambda: sum(not self._trained(s) for s in self.training) <= ahead)
        self.training = [s for s in self.training if not self._trained(s)]

    def pack(self, seqs: list[tuple[str, list[int], list[int], list[int], list[float]]], advantages, **kw) -> BatchFormed:
        """seqs: (rollout_id, prompt_ids, response_ids, response_mask, response_logprobs)."""
        offsets, prompt_lens, ids, mask, lps = [0], [], [], [], []
        for _, p, r, m, lp in seqs:
            ids.extend(p)
            ids.extend(r)
            mask.extend([0] * len(p))
            mask.extend(m)
            lps.extend([0.0] * len(p))
            lps.extend(lp)
            prompt_lens.append(len(p))
            offsets.append(len(ids))
        return BatchFormed(
            rollout_ids=[s[0] for s in seqs],
            offsets=np.asarray(offsets, np.int32),
            prompt_lens=np.asarray(prompt_lens, np.int32),
            input_ids=np.asarray(ids, np.int32),
            loss_mask=np.asarray(mask, np.int32),
            old_logprobs=np.asarray(lps, np.float32),
            advantages=np.asarray(advantages, np.float32),
            **kw,
        )

    async def run_sft(self) -> None:
        sft = self.cfg.sft
        demos = load_demonstrations(self.cfg)
        encoded = [encode_messages(self.tokenizer, d) for d in demos]
        steps = max(1, int(round(sft.epochs * len(encoded) / sft.batch_size)))
        self.ctx.emit(
            StageStarted(
                stage="sft", index=0, kind="sft", steps=steps, max_tokens=max(len(i) for i, _ in encoded),
                max_turns=0, prompts_per_step=sft.batch_size, rollouts_per_prompt=1, group_size=1,
                lr=sft.lr, optimizer_reset=False, n_problems=len(encoded),
            ),
            to=["learner"],
        )
        order: list[int] = []
        warmup = max(1, int(round(sft.warmup_ratio * steps)))
        for k in range(steps):
            if len(order) < sft.batch_size:
                more = list(range(len(encoded)))
                self.rng.shuffle(more)
                order += more
            take, order = order[: sft.batch_size], order[sft.batch_size :]
            self.step += 1
            seqs = []
            for i in take:
                ids, m = encoded[i]
                # The first token has nothing to predict it: it is the "prompt".
                seqs.append((f"sft-{i}", ids[:1], ids[1:], m[1:], [0.0] * (len(ids) - 1)))
            lr = _schedule(sft.lr, k, steps, warmup, sft.schedule)
            batch = self.pack(
                seqs, [0.0] * len(seqs), step=self.step, stage="sft", kind="sft", lr=lr, optimizer_reset=False
            )
            await self.train(batch)

    async def run_rl_stage(self, index: int, stage: StageSection, problems: list[Problem]) -> None:
        if stage.hard_filter_k > 0:
            problems = await self.hard_problems(problems, stage)
        self.ctx.emit(
            StageStarted(
                stage=stage.name, index=index, kind="rl", steps=stage.steps, max_tokens=stage.max_tokens,
                max_turns=stage.max_turns, prompts_per_step=stage.prompts_per_step,
                rollouts_per_prompt=stage.rollouts_per_prompt, group_size=stage.group_size, lr=stage.lr,
                optimizer_reset=stage.optimizer_reset, n_problems=len(problems),
            ),
            to=["learner"],
        )
        order: list[Problem] = []
        for k in range(stage.steps):
            if len(order) < stage.prompts_per_step:
                more = problems[:]
                self.rng.shuffle(more)
                order += more
            chosen, order = order[: stage.prompts_per_step], order[stage.prompts_per_step :]
            await self.settle_training(self.cfg.rollout.staleness)
            self.step += 1
            seqs, advs = [], []
            # Groups whose rewards are all equal carry no signal and are dropped; when a whole
            # round is dropped, draw fresh prompts for the same step (bounded).
            for _ in range(MAX_ROUNDS_PER_STEP):
                reqs = self.requests_for(
                    chosen, stage.rollouts_per_prompt, stage=stage.name, max_tokens=stage.max_tokens,
                    max_turns=stage.max_turns, temperature=self.cfg.rollout.temperature,
                )
                step = await self.run_rollouts(reqs)
                more_seqs, more_advs = self.resample(step, stage)
                seqs += more_seqs
                advs += more_advs
                if seqs:
                    break
                chosen = self.rng.sample(problems, min(len(problems), stage.prompts_per_step))
            if not seqs:
                self.ctx.log.warning("no group with a reward signal; step skipped", step=self.step)
                continue
            batch = self.pack(
                seqs, advs, step=self.step, stage=stage.name, kind="rl", lr=stage.lr,
                optimizer_reset=stage.optimizer_reset and k == 0,
            )
            self.submit(batch)
        await self.settle_training(0)  # the stage's evaluation and the next stage see its last weights

    def resample(self, step: Step, stage: StageSection):
        """RoC down-sample every group of the step; returns the kept sequences and advantages."""
        groups: dict[str, list[Rollout]] = {}
        for r in step.rollouts.values():
            groups.setdefault(r.request.group_id, []).append(r)
        seqs, advs = [], []
        for gid, members in groups.items():
            stats = []
            for r in members:
                t, w = r.trajectory, r.reward
                n_err = sum(1 for c in t.tool_calls if c.get("status") != "ok")
                stats.append(
                    RolloutStats(
                        rollout_id=t.rollout_id, reward=w.reward, n_tool_calls=len(t.tool_calls),
                        n_tool_errors=n_err, answer_tags=w.answer_tags, turns=t.turns,
                    )
                )
            roc = self.cfg.rollout.roc
            res = roc_downsample(stats, stage.group_size, mode=roc.mode, rng=self.rng, min_per_side=roc.min_per_side)
            rewards = {s.rollout_id: s.reward for s in stats}
            kept_adv: dict[str, float] = {}
            if res.kept:
                a = group_advantages(
                    torch.tensor([rewards[k] for k in res.kept], dtype=torch.float32),
                    torch.zeros(len(res.kept), dtype=torch.long),
                )
                kept_adv = {k: float(x) for k, x in zip(res.kept, a.tolist())}
            self.ctx.emit(
                GroupResampled(
                    group_id=gid, step=self.step, mode=f"roc-{roc.mode}" if roc.mode != "none" else "none",
                    kept=res.kept, dropped=res.dropped, penalties=res.penalties, rewards=rewards,
                    advantages=kept_adv, reason=res.reason,
                )
            )
            by_id = {r.request.rollout_id: r for r in members}
            for rid in res.kept:
                t = by_id[rid].trajectory
                seqs.append(
                    (rid, t.prompt_ids.tolist(), t.response_ids.tolist(), t.loss_mask.tolist(), t.logprobs.tolist())
                )
                advs.append(kept_adv[rid])
        return seqs, advs

    # ------------------------------------------------------------ evaluation

    async def probe(self, problems: list[Problem], k: int, *, tag: str, temperature: float,
                    max_tokens: int, max_turns: int) -> Step:
        reqs = self.requests_for(problems, k, stage=tag, max_tokens=max_tokens, max_turns=max_turns,
                                 temperature=temperature)
        return await self.run_rollouts(reqs)

    async def evaluate(self) -> None:
        ev = self.cfg.eval
        for name, problems in self.eval_sets.items():
            step = await self.probe(problems, ev.k, tag="eval", temperature=ev.temperature,
                                    max_tokens=ev.max_tokens, max_turns=ev.max_turns)
            rs = list(step.rollouts.values())
            self.ctx.emit(
                EvalCompleted(
                    dataset=name, step=self.step, weights_version=self.weights_version, k=ev.k,
                    temperature=ev.temperature,
                    pass_at_1=float(np.mean([r.reward.reward for r in rs])),
                    n_problems=len(problems),
                    mean_response_tokens=float(np.mean([int(r.trajectory.loss_mask.sum()) for r in rs])),
                    mean_tool_calls=float(np.mean([len(r.trajectory.tool_calls) for r in rs])),
                )
            )

    async def hard_problems(self, problems: list[Problem], stage: StageSection) -> list[Problem]:
        """Problems the latest policy does not solve k/k (paper stage 3)."""
        k = stage.hard_filter_k
        step = await self.probe(problems, k, tag="filter", temperature=self.cfg.rollout.temperature,
                                max_tokens=stage.max_tokens, max_turns=stage.max_turns)
        solved: dict[str, int] = {}
        for r in step.rollouts.values():
            solved[r.request.problem_id] = solved.get(r.request.problem_id, 0) + int(r.reward.correct)
        hard = [p for p in problems if solved.get(p.id, 0) < k]
        self.ctx.log.info("hard-problem filter", kept=len(hard), of=len(problems), k=k)
        return hard or problems

    # ------------------------------------------------------------ the recipe

    async def run_recipe(self) -> None:
        cfg = self.cfg
        t0 = time.monotonic()
        train, held = load_train_eval(cfg.data, demo=cfg.demo)
        name = (cfg.data.eval or "held-out").split(":")[-1].rsplit("/", 1)[-1]
        self.eval_sets = {name: held[: cfg.eval.max_problems] if cfg.eval.max_problems else held} if held else {}
        # Generators announce themselves with their first capacity report.
        await self.wait_until(lambda: len(self.engines) >= cfg.generator.count)
        self.ctx.emit(RunStarted(config=cfg.model_dump(mode="json"), run_dir=cfg.run.run_dir,
                                 version=_reckon_version()))
        if cfg.sft.enabled:
            await self.run_sft()
        if cfg.eval.at_stage_end and self.eval_sets:
            await self.evaluate()
        for i, stage in enumerate(cfg.stages, start=1):
            await self.run_rl_stage(i, stage, train)
            if cfg.eval.at_stage_end and self.eval_sets:
                await self.evaluate()
        self.ctx.emit(RunCompleted(steps=self.step, seconds=time.monotonic() - t0, status="ok"))


def load_demonstrations(cfg) -> list[list[dict]]:
    """SFT demonstrations: the builtin demo set, or a JSONL file with a "messages" list per line."""
    spec = cfg.sft.data
    if spec == "builtin:demo":
        train, _ = demo_splits(cfg.demo.n_train, cfg.demo.n_eval, seed=cfg.demo.seed, families=cfg.demo.families)
        return make_sft_demos(train, cfg.demo)
    demos = []
    with open(spec) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                msgs = json.loads(line)["messages"]
                if not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in msgs):
                    raise ValueError("every message needs role and content")
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{spec}:{i}: not a demonstration ({e}); expected {{\"messages\": [...]}}") from None
            demos.append(msgs)
    return demos


def _fields(ev) -> dict:
    return {f: getattr(ev, f) for f in ev.__dataclass_fields__}


def _schedule(peak: float, k: int, steps: int, warmup: int, kind: str) -> float:
    """Linear warmup to ``peak`` then constant or cosine decay to 0 (SFT recipe)."""
    if k < warmup:
        return peak * (k + 1) / warmup
    if kind == "constant" or steps <= warmup:
        return peak
    progress = (k - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1 + np.cos(np.pi * progress))


async def run(ctx: Context, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    scheduler = Scheduler(ctx)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scheduler.inbox_loop)
        nursery.start_soon(scheduler.verify_watchdog)
        task_status.started()
        await scheduler.run_recipe()
        nursery.cancel_scope.cancel()
