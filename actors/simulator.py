"""Discrete-time simulation of rollout generation at cluster scale (DESIGN §8, docs/scheduling.md).

The same :mod:`actors.dispatch` policy objects the scheduler uses decide where rollouts go;
the engines, tools and workload are simulated under the cost model below. Everything random
comes from one seed, so dynamic and static see the identical workload.

Cost model (per GPU = one engine; defaults in :class:`SimConfig`):

* KV capacity ``K = (hbm * mem_fraction - weights) / kv_bytes_per_token`` tokens.
* A decode step of ``B`` sequences whose contexts hold ``U`` tokens takes
  ``max((weights + U * kv_bytes_per_token) / bandwidth, B * 2 * params / flops)``: the
  bandwidth roofline (every step reads the weights and the batch's KV), or compute if larger.
* Prefill of new prompts and of contexts recomputed after eviction costs
  ``tokens * 2 * params / flops`` of the engine's time. Tool outputs (20-200 tokens) join the
  context without a charge: a chunked-prefill engine folds them into the next decode step,
  which is bandwidth-bound with compute to spare.
* A sequence waiting on a tool leaves the batch but keeps its KV.
* Engine admission (identical for both policies): FIFO from the engine's queue while a slot
  is free and ``used + context <= admit_fraction * K``. When decoding would overflow ``K``, the
  engine evicts the most recently admitted half of its decoding sequences (SGLang's
  behaviour as the paper describes it); they re-queue at the front and recompute their whole
  context when readmitted.

Steps: step k's rollouts are released once the learner has published the weights trained on
step ``k - 1 - staleness`` (and, with staleness >= 1, step k-1 is fully dispatched). The learner
is a pool of ``learner_gpus`` of its own that trains the steps in order, each once all its
rollouts have finished, at ``train_flops_per_token * params`` FLOPs per trained token.

Time advances in ticks of ``dt`` seconds; within a tick each engine runs as many decode steps
as fit (fractional steps carry over), sequences stop exactly at tool calls and at their end,
and tool results return mid-tick at their exact time.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from actors.dispatch import DispatchConfig, DynamicPolicy, EngineState, PendingRollout, StaticPolicy

GiB = 1024**3


class SimConfig(BaseModel):
    """Hardware, model, workload and simulation settings."""

    model_config = ConfigDict(extra="forbid")

    gpus: int = Field(64, ge=1)  # engines, one per GPU
    hbm_bytes: float = 192e9  # MI300X HBM3
    mem_fraction: float = 0.9  # of HBM the engine may use (weights + KV)
    bandwidth: float = 5.3e12  # bytes/s, MI300X peak HBM bandwidth
    flops: float = 1.3e15 * 0.5  # dense bf16 FLOP/s achieved (peak 1.3 PF at 50 %)
    params: float = 14e9  # model parameters
    weight_bytes: float = 28e9  # bf16 weights
    kv_bytes_per_token: float = 40 * 8 * 128 * 2 * 2  # Qwen3-14B: layers x KV heads x dim x (K,V) x bf16
    slots: int = Field(1024, ge=1)  # max running sequences per engine
    admit_fraction: float = Field(0.95, gt=0, le=1)  # engine admits while used + context <= this x K
    prompts: int = Field(512, ge=1)  # prompts per step
    rollouts: int = Field(32, ge=1)  # rollouts per prompt (2G)
    max_tokens: int = Field(8192, ge=64)  # response budget (model + tool tokens): 8K stage 1, 12K stages 2-3
    max_turns: int = Field(10, ge=1)  # tool calls per rollout < max_turns
    prompt_tokens: tuple[int, int] = (150, 700)  # uniform range of prompt lengths
    response_median: float = 3000.0  # lognormal median of response length (tokens)
    response_sigma: float = 0.8  # lognormal sigma; lengths are clipped to max_tokens (truncation)
    tool_every: float = 400.0  # mean model tokens between tool calls
    tool_latency_mean: float = 0.3  # seconds (paper: 0.3 s average)
    tool_latency_sigma: float = 1.0  # lognormal sigma of tool latency
    tool_output_tokens: tuple[int, int] = (20, 200)  # uniform range of tool-response tokens
    steps: int = Field(1, ge=1)  # training steps to simulate
    staleness: int = Field(0, ge=0, le=2)  # weight versions generation may run ahead (0: on-policy)
    # The learner (a pool of its own, as reckon's actors run it) trains on step k while later rollouts
    # run: train_keep of the step's rollouts (G of 2G), train_flops_per_token x params FLOPs per token
    # (forward + backward; the old log-probs come with the rollouts), at `flops` per learner GPU.
    # learner_gpus = 0: training takes no time.
    learner_gpus: int = Field(64, ge=0)
    train_flops_per_token: float = Field(6.0, ge=0)  # x params
    train_keep: float = Field(0.5, gt=0, le=1)
    dt: float = Field(0.05, gt=0)  # simulation tick (s)
    seed: int = 0
    trace_every: float = 1.0  # seconds between samples of per-GPU KV occupancy
    progress_every: float = Field(2.0, gt=0)  # seconds between progress reports of every running rollout

    @property
    def kv_capacity(self) -> int:
        """KV-cache tokens per engine."""
        free = self.hbm_bytes * self.mem_fraction - self.weight_bytes
        if free <= 0:
            raise ValueError(f"weights ({self.weight_bytes:.3g} B) do not fit in {self.mem_fraction} x HBM")
        return int(free // self.kv_bytes_per_token)


# ----------------------------------------------------------------------------- workload


@dataclass
class Workload:
    """Every rollout of the run, as flat arrays (index = rollout number)."""

    step: np.ndarray  # (N,) training step
    prompt: np.ndarray  # (N,) prompt tokens
    model_tokens: np.ndarray  # (N,) model-generated tokens
    tool_pos: list  # per rollout: model-token positions of tool calls, ascending
    tool_lat: list  # per rollout: latency of each call (s)
    tool_out: list  # per rollout: tokens each tool response adds
    n: int = 0

    @property
    def response(self) -> np.ndarray:
        return self.model_tokens + np.array([o.sum() for o in self.tool_out])


def make_workload(cfg: SimConfig) -> Workload:
    """The seeded workload: long-tailed lengths clipped at max_tokens, tool calls along the way."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.steps * cfg.prompts * cfg.rollouts
    step = np.repeat(np.arange(cfg.steps), cfg.prompts * cfg.rollouts)
    # Rollouts of one prompt share its prompt length.
    prompt = np.repeat(rng.integers(cfg.prompt_tokens[0], cfg.prompt_tokens[1] + 1, cfg.steps * cfg.prompts), cfg.rollouts)
    total = np.minimum(rng.lognormal(math.log(cfg.response_median), cfg.response_sigma, n), cfg.max_tokens)
    total = np.maximum(total, 64).astype(np.int64)
    n_calls = np.minimum(rng.poisson(total / cfg.tool_every), cfg.max_turns - 1)
    tool_pos, tool_lat, tool_out = [], [], []
    mu = math.log(cfg.tool_latency_mean) - cfg.tool_latency_sigma**2 / 2  # lognormal with that mean
    model = np.empty(n, np.int64)
    for i in range(n):
        k = int(n_calls[i])
        out = rng.integers(cfg.tool_output_tokens[0], cfg.tool_output_tokens[1] + 1, k)
        m = int(total[i] - out.sum())
        if m < 32:  # tool output would crowd out the model's own tokens: fewer calls
            k, out, m = 0, out[:0], int(total[i])
        model[i] = m
        tool_pos.append(np.sort(rng.integers(1, m, k)) if k else np.zeros(0, np.int64))
        tool_lat.append(rng.lognormal(mu, cfg.tool_latency_sigma, k))
        tool_out.append(out)
    return Workload(step, prompt, model, tool_pos, tool_lat, tool_out, n)


def train_seconds(cfg: SimConfig, w: Workload) -> np.ndarray:
    """(steps,) seconds the learner takes to train on each step's batch (0 without a learner pool)."""
    if cfg.learner_gpus == 0:
        return np.zeros(cfg.steps)
    tokens = np.bincount(w.step, weights=w.prompt + w.response, minlength=cfg.steps) * cfg.train_keep
    return tokens * cfg.train_flops_per_token * cfg.params / (cfg.learner_gpus * cfg.flops)


# ----------------------------------------------------------------------------- bounds


def per_rollout_costs(cfg: SimConfig, w: Workload, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(decode steps, KV-read seconds, engine seconds, time alone) of each rollout in idx; three (len(idx),) arrays.

    A token decoded with context ``l`` must read ``l * kv_bytes`` (its share of the step), and
    its prompt must be prefilled: the *engine seconds* a rollout costs wherever
    it runs, however it is batched. Alone, it also pays the whole weights read on each of its
    decode steps, and waits for its tools.
    """
    c = cfg.kv_bytes_per_token / cfg.bandwidth
    t_w = cfg.weight_bytes / cfg.bandwidth
    pf = 2 * cfg.params / cfg.flops
    m = w.model_tokens[idx].astype(float)
    p = w.prompt[idx].astype(float)
    tool_ctx = np.array([float(np.sum(w.tool_out[i] * (w.model_tokens[i] - w.tool_pos[i]))) for i in idx])
    tool_wait = np.array([float(w.tool_lat[i].sum()) for i in idx])
    kv_s = c * (m * p + m * (m + 1) / 2 + tool_ctx)
    engine_s = kv_s + p * pf  # tool outputs join the context without a prefill charge (see the module doc)
    return m, kv_s, engine_s, m * t_w + engine_s + tool_wait


def lower_bound(cfg: SimConfig, w: Workload, idx: np.ndarray) -> tuple[float, float, float]:
    """(LB, work bound, critical path) for rollouts idx on cfg.gpus engines: the issue's bound.

    A step reading weights plus ``U <= K`` KV tokens spends at most the fraction
    ``c*K / (t_w + c*K)`` of its time on KV reads, so Σ KV-read seconds / (gpus * that fraction)
    is a lower bound on the makespan; so is the longest rollout decoding alone.
    """
    _, kv_s, _, alone = per_rollout_costs(cfg, w, idx)
    c = cfg.kv_bytes_per_token / cfg.bandwidth
    t_w = cfg.weight_bytes / cfg.bandwidth
    ck = c * cfg.kv_capacity
    work = float(kv_s.sum()) / (cfg.gpus * ck / (t_w + ck))
    longest = float(alone.max())
    return max(work, longest), work, longest


def no_migration_bound(cfg: SimConfig, w: Workload, idx: np.ndarray, grid: int = 200) -> float:
    """A makespan bound for any policy that keeps each rollout on one engine, even one that knows
    every length in advance (tighter than :func:`lower_bound` when the KV cache does not bind).

    An engine runs at least as many decode steps as its longest rollout has tokens, each reading
    the weights (``t_w``), on top of the engine seconds of its rollouts. Take the rollouts of at
    least L tokens (set A) and the k engines that hold them: one of those engines is busy at
    least ``L * t_w + E(A) / k``, and all engines together at least ``k * L * t_w + E(all)``,
    so ``T >= min_k max(L t_w + E(A)/k, (k L t_w + E(all)) / gpus)`` for every L.
    """
    m, _, engine_s, _ = per_rollout_costs(cfg, w, idx)
    t_w = cfg.weight_bytes / cfg.bandwidth
    order = np.argsort(-m)
    cum = np.cumsum(engine_s[order])
    total = float(cum[-1])
    best = 0.0
    for L in np.unique(np.quantile(m, np.linspace(0.0, 1.0, grid))):
        n_a = int(np.searchsorted(-m[order], -L, side="right"))  # rollouts with m >= L
        k = np.arange(1, min(cfg.gpus, n_a) + 1)
        best = max(best, float(np.min(np.maximum(L * t_w + cum[n_a - 1] / k, (k * L * t_w + total) / cfg.gpus))))
    return best


def occupancy_ceiling(cfg: SimConfig, w: Workload, phases: int = 48) -> tuple[float, float]:
    """(ceiling, step mean): time-averaged KV occupancy of an idealized pipeline of steps 0..staleness.

    The release rule keeps at most ``staleness + 1`` steps in flight, and step k + staleness + 1
    cannot start before step k's longest rollout has finished, so a period of the pipeline lasts
    at least ``P`` decode steps (the longest rollout). Idealized: every step's rollouts spread
    evenly over the GPUs and all start at their step's release (starting one later lengthens the
    period: any rollout may be the longest), the steps in flight at the best common phase whose
    peak fits the cache, no tool waits, no learner time, no GPU idle at the period's end. The
    occupancy of a GPU is its KV time-averaged over the period (a decode step lasts
    ``t_w + c U``); ``step mean`` is the plain average over decode steps, which no dispatch can
    change: it is the steps' KV-token-steps divided by ``P × K``. Where no phase fits (step mean
    near or above 1: the cache binds and dispatch decides) the ceiling is NaN.
    """
    K = cfg.kv_capacity
    c = cfg.kv_bytes_per_token / cfg.bandwidth
    t_w = cfg.weight_bytes / cfg.bandwidth
    n = min(cfg.staleness + 1, cfg.steps)
    members = [np.flatnonzero(w.step == s) for s in range(n)]
    P = int(max(w.model_tokens[idx].max() for idx in members))
    prof = np.zeros((n, cfg.gpus, P))  # KV held by each GPU at each decode step of the step's life
    for j, idx in enumerate(members):
        for r, i in enumerate(idx):
            m = int(w.model_tokens[i])
            ctx = w.prompt[i] + np.arange(m, dtype=float)
            for pos, out in zip(w.tool_pos[i], w.tool_out[i]):
                ctx[pos:] += out
            prof[j, r % cfg.gpus, :m] += ctx
    best, mean = math.nan, float(prof.sum() / (cfg.gpus * P * K))
    for phi in range(0, P, max(1, P // phases)) if n > 1 else [0]:
        U = sum(np.roll(prof[j], j * phi, axis=1) for j in range(n))
        if U.max() > K:
            continue
        st = t_w + c * U
        occ = float(np.mean((U * st).sum(axis=1) / (K * st.sum(axis=1))))
        best = occ if math.isnan(best) else max(best, occ)
    return best, mean


def nonclairvoyant_bound(cfg: SimConfig, w: Workload, idx: np.ndarray, eps: float = 1e-9, grid: int = 40) -> float:
    """A makespan T that no policy beats with probability above ``eps`` if it places each rollout on
    one engine before knowing its length (lengths i.i.d.: the policy may know their distribution).

    An engine runs at least as many decode steps as its longest rollout has tokens, each reading
    the weights, on top of its rollouts' engine seconds E_g: busy >= L_g t_w + E_g. For a
    threshold L (a fraction q of the rollouts are at least that long), finishing by T requires
    every GPU holding a long rollout to have E_g <= T - L t_w, so at least a GPUs hold none and
    carry the rest of the work, n or more rollouts, all short. Whatever the policy does, each
    rollout it places is long with probability q independently of where it goes, so this has
    probability at most Σ_{k >= a} C(gpus, k) (1 - q)^n(k). The bound is the smallest T where
    that exceeds eps, maximized over L.
    """
    m, _, E, _ = per_rollout_costs(cfg, w, idx)
    t_w = cfg.weight_bytes / cfg.bandwidth
    G, total = cfg.gpus, float(E.sum())
    best = total / G
    for L in np.unique(np.quantile(m, np.linspace(0.5, 1.0, grid))):
        long = m >= L
        q = float(long.mean())
        if q == 0.0 or q == 1.0:
            continue
        e_short = float(E[~long].max())

        def likely(T: float) -> bool:  # can the placement finish by T with probability above eps?
            h = T - L * t_w  # most engine seconds a GPU holding a long rollout can carry
            if h < 0:
                return False
            a = max(0, math.ceil((total - G * h) / (L * t_w) - 1e-12))
            if a == 0:
                return True
            if a > G:
                return False
            # Sum over the number k >= a of long-free GPUs: choose them, and their >= n(k) rollouts all short.
            p = 0.0
            for k in range(a, G + 1):
                n = math.ceil((total - (G - k) * h) / e_short)
                p += math.exp(math.lgamma(G + 1) - math.lgamma(k + 1) - math.lgamma(G - k + 1) + n * math.log1p(-q))
            return p > eps

        lo, hi = total / G, total / G + L * t_w
        if likely(lo):
            continue
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if likely(mid) else (mid, hi)
        best = max(best, hi)
    return best


# ----------------------------------------------------------------------------- the simulation

PENDING_WINDOW = 4096  # rollouts shown to the policy per call (it stops at the first misfit)

S_WAIT, S_PENDING, S_QUEUED, S_DECODE, S_TOOL, S_DONE = range(6)


def steady_window(cfg: SimConfig, step_release: list, makespan: float) -> tuple[float, float]:
    """(start, end) s of the steady state: whole pipeline periods between step releases.

    With staleness s the pipeline holds s + 1 steps and its period spans s + 1 releases; the
    first s + 1 steps start together (warm-up) and after the last release it only drains. So the
    window runs from the release of step s + 1 to the latest release a whole number of periods
    later. Too few steps for one period: the whole run.
    """
    a = cfg.staleness + 1
    b = a + (cfg.steps - 1 - a) // a * a
    if cfg.steps == 1 or b <= a:
        return 0.0, makespan
    return float(step_release[a]), float(step_release[b])


@dataclass
class SimResult:
    policy: str
    makespan: float  # s, first dispatch to last completion
    step_end: list  # s, completion time of each step
    step_release: list  # s, when each step's rollouts were released (the staleness bound and the learner allow)
    train_end: list  # s, when the learner published the weights trained on each step
    kv_occupancy: float  # time-averaged mean over GPUs of used KV / capacity, until the last completion
    kv_fill: float  # the same, until the run's last rollout has started (while there is work to fill with)
    kv_pending: float  # the same, over the ticks when released rollouts wait to start (what dispatch controls)
    stale_wait: float  # fraction of the time until the last start with no rollout released and waiting
    kv_steady: float  # the same, over whole pipeline periods in steady state (see steady_window)
    placement_floor: float  # max over GPUs of (longest rollout x t_w + engine seconds) for where rollouts ran
    evictions: int  # sequences evicted (each recomputes its context later)
    eviction_events: int  # times an engine overflowed
    recomputed_tokens: int  # context tokens prefilled again after eviction
    trace_t: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))  # (T,)
    trace_kv: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0)))  # (T, gpus) used/capacity
    wall_s: float = 0.0


def simulate(cfg: SimConfig, policy_name: Literal["dynamic", "static"], workload: Workload | None = None,
             dispatch: DispatchConfig | None = None) -> SimResult:
    """Run one policy over the (seeded) workload and measure it."""
    t0 = time.perf_counter()
    w = workload or make_workload(cfg)
    dcfg = dispatch or DispatchConfig(policy=policy_name)
    policy = DynamicPolicy(dcfg) if policy_name == "dynamic" else StaticPolicy(dcfg)
    G, K, N = cfg.gpus, cfg.kv_capacity, w.n
    names = [f"gpu{e}" for e in range(G)]
    name_idx = {nm: e for e, nm in enumerate(names)}
    ids = [f"r{i}" for i in range(N)]
    c = cfg.kv_bytes_per_token / cfg.bandwidth
    t_w = cfg.weight_bytes / cfg.bandwidth
    tok_flop_s = 2 * cfg.params / cfg.flops

    state = np.full(N, S_WAIT, np.int8)
    engine = np.full(N, -1, np.int64)
    gen = np.zeros(N)  # model tokens generated (fractional within a step)
    kv = np.zeros(N)  # resident KV tokens (0 when not resident)
    tool_tok = np.zeros(N)  # tool-response tokens appended so far
    next_tool = np.zeros(N, np.int64)  # index of the next tool call
    boundary = np.array([p[0] if len(p) else m for p, m in zip(w.tool_pos, w.model_tokens)], float)
    ret = np.full(N, np.inf)  # tool return time
    admitted_at = np.zeros(N, np.int64)  # admission counter (eviction picks the newest)
    evicted = np.zeros(N, bool)
    finish = np.full(N, np.nan)
    queues = [deque() for _ in range(G)]
    pending: deque[int] = deque()
    debt = np.zeros(G)  # engine seconds owed (prefill longer than a tick)
    step_left = np.bincount(w.step, minlength=cfg.steps)
    step_end = [math.nan] * cfg.steps
    step_release = [math.nan] * cfg.steps
    train_s = train_seconds(cfg, w)
    train_end = [math.nan] * cfg.steps  # weights trained on step s published (the learner trains steps in order)
    released = 0  # steps whose rollouts have been released to the pending queue
    pend_objs = [PendingRollout(ids[i], int(w.prompt[i]), cfg.max_tokens) for i in range(N)]
    evictions = events = recomputed = 0
    admit_counter = 0
    occ_integral = 0.0
    fill_integral, fill_end = 0.0, math.nan  # occupancy while rollouts still wait to start
    pend_integral, pend_time, stale_time = 0.0, 0.0, 0.0
    trace_t, trace_kv = [], []
    occ_ticks: list[float] = []  # mean occupancy of every tick (for the steady-state window)
    next_trace = 0.0
    next_progress = 0.0
    t = 0.0
    resident = np.zeros(N, bool)

    def release(s: int) -> None:
        step_release[s] = t
        idx = np.flatnonzero(w.step == s)
        state[idx] = S_PENDING
        pending.extend(idx.tolist())

    release(0)
    released = 1
    done_total = 0
    while done_total < N:
        # --- release the next step when the staleness bound allows
        if released < cfg.steps:
            # Step k may use weights trained on step k-1-staleness (published at train_end); with
            # staleness 1 the previous step must also be fully dispatched (oldest step first).
            need = released - 1 - cfg.staleness
            ok = need < 0 or t >= train_end[need]
            if cfg.staleness > 0:
                ok = ok and not pending
            if ok:
                release(released)
                released += 1
        # --- tool results returning this tick rejoin the batch (from their return time)
        frac = np.zeros(0)
        back = np.flatnonzero((state == S_TOOL) & (ret < t + cfg.dt))
        if back.size:
            state[back] = S_DECODE
            j = next_tool[back] - 1
            add = np.array([w.tool_out[i][k] for i, k in zip(back, j)], float)
            tool_tok[back] += add
            kv[back] += add
        # --- engine reports -> policy -> engine queues
        res_idx = np.flatnonzero(resident)
        used = np.bincount(engine[res_idx], weights=kv[res_idx], minlength=G)
        running = np.bincount(engine[res_idx], minlength=G)
        if pending:
            reports = [EngineState(names[e], K, int(K - used[e]), cfg.slots, int(cfg.slots - running[e]), int(running[e]))
                       for e in range(G)]
            window = [pend_objs[pending[k]] for k in range(min(len(pending), PENDING_WINDOW if policy_name == "dynamic" else len(pending)))]
            for rid, ename in policy.assign(window, reports, tool_queue=0):
                i = int(rid[1:])
                e = name_idx[ename]
                state[i] = S_QUEUED
                engine[i] = e
                queues[e].append(i)
            while pending and state[pending[0]] != S_PENDING:
                pending.popleft()
        # --- engine admission (same rule for both policies)
        prefill = np.zeros(G)
        for e in range(G):
            q = queues[e]
            while q and running[e] < cfg.slots:
                i = q[0]
                ctx = w.prompt[i] + gen[i] + tool_tok[i]
                if used[e] + ctx > cfg.admit_fraction * K and running[e] > 0:
                    break
                q.popleft()
                state[i] = S_DECODE if ret[i] == np.inf or ret[i] < t else S_TOOL
                resident[i] = True
                kv[i] = ctx
                used[e] += ctx
                running[e] += 1
                prefill[e] += ctx
                if evicted[i]:
                    recomputed += int(ctx)
                admit_counter += 1
                admitted_at[i] = admit_counter
        # --- decode
        dec = np.flatnonzero(state == S_DECODE)
        de = engine[dec]
        B = np.bincount(de, minlength=G)
        U = np.bincount(de, weights=kv[dec], minlength=G)
        step_t = np.maximum((cfg.weight_bytes + U * cfg.kv_bytes_per_token) / cfg.bandwidth, B * tok_flop_s)
        step_t = np.maximum(step_t, t_w)
        busy = prefill * tok_flop_s + debt  # seconds of this tick lost to prefill
        avail = np.maximum(cfg.dt - busy, 0.0)
        debt = np.maximum(busy - cfg.dt, 0.0)
        steps = avail / step_t  # decode steps each engine runs this tick
        if dec.size:
            # Sequences back from a tool mid-tick only decode for the rest of the tick.
            start = np.clip(ret[dec] - t, 0.0, cfg.dt)
            start = np.where(np.isfinite(ret[dec]), start, 0.0)
            start = np.maximum(start, cfg.dt - avail[de])
            adv = np.maximum(cfg.dt - start, 0.0) / step_t[de]
            ret[dec] = np.inf
            g0 = gen[dec]
            reach = g0 + adv >= boundary[dec]
            new = np.where(reach, boundary[dec], g0 + adv)
            gen[dec] = new
            kv[dec] += new - g0
            hit = dec[reach]
            if hit.size:
                when = t + start[reach] + (boundary[hit] - g0[reach]) * step_t[engine[hit]]
                for i, tm in zip(hit.tolist(), when.tolist()):
                    k = next_tool[i]
                    if k < len(w.tool_pos[i]) and boundary[i] == w.tool_pos[i][k]:
                        # The scheduler learns of a tool call (ToolCallRequested): report progress.
                        policy.on_progress(ids[i], int(boundary[i] + tool_tok[i]))
                        state[i] = S_TOOL
                        ret[i] = tm + w.tool_lat[i][k]
                        next_tool[i] = k + 1
                        boundary[i] = w.tool_pos[i][k + 1] if k + 1 < len(w.tool_pos[i]) else w.model_tokens[i]
                    else:
                        state[i] = S_DONE
                        finish[i] = tm
                        resident[i] = False
                        kv[i] = 0.0
                        s = w.step[i]
                        step_left[s] -= 1
                        done_total += 1
                        if step_left[s] == 0:
                            step_end[s] = float(np.nanmax(finish[w.step == s]))
                            # The learner trains the steps in order, each once it has finished.
                            for k in range(cfg.steps):
                                if math.isnan(train_end[k]) and not math.isnan(step_end[k]):
                                    prev = train_end[k - 1] if k else 0.0
                                    if math.isnan(prev):
                                        break
                                    train_end[k] = max(step_end[k], prev) + float(train_s[k])
                        policy.on_finished(ids[i], int(w.model_tokens[i] + tool_tok[i]))
        # --- overflow: evict the newest half of the decoding sequences
        res_idx = np.flatnonzero(resident)
        used = np.bincount(engine[res_idx], weights=kv[res_idx], minlength=G)
        for e in np.flatnonzero(used > K):
            mine = dec[(engine[dec] == e) & (state[dec] == S_DECODE)]
            if mine.size == 0:
                continue
            victims = mine[np.argsort(-admitted_at[mine])][: max(1, mine.size // 2)]
            events += 1
            evictions += victims.size
            for i in victims[::-1].tolist():  # oldest of the victims first in the queue
                resident[i] = False
                kv[i] = 0.0
                state[i] = S_QUEUED
                evicted[i] = True
                queues[e].appendleft(i)
            used[e] = kv[res_idx][engine[res_idx] == e].sum()
        if t >= next_progress:  # generators report each sequence's length with their capacity
            next_progress += cfg.progress_every
            for i in np.flatnonzero(resident).tolist():
                policy.on_progress(ids[i], int(gen[i] + tool_tok[i]))
        occ = float(np.minimum(used, K).sum()) / (G * K) * cfg.dt
        occ_integral += occ
        occ_ticks.append(occ / cfg.dt)
        if pending:
            pend_integral += occ
            pend_time += cfg.dt
        if math.isnan(fill_end):
            fill_integral += occ
            if not pending and released < cfg.steps:
                stale_time += cfg.dt  # the staleness bound holds the next step back
            if released == cfg.steps and not pending and not any(queues):
                fill_end = t + cfg.dt
        if t >= next_trace:
            trace_t.append(t)
            trace_kv.append(used / K)
            next_trace += cfg.trace_every
        t += cfg.dt
    makespan = float(np.nanmax(finish))
    m_all, _, e_all, _ = per_rollout_costs(cfg, w, np.arange(N))
    longest = np.zeros(G)
    np.maximum.at(longest, engine, m_all)
    floor = float(np.max(longest * t_w + np.bincount(engine, weights=e_all, minlength=G)))
    lo, hi = steady_window(cfg, step_release, makespan)
    occ_arr = np.array(occ_ticks)
    i0, i1 = int(round(lo / cfg.dt)), int(round(hi / cfg.dt))
    return SimResult(
        policy=policy_name,
        makespan=makespan,
        step_end=step_end,
        step_release=step_release,
        train_end=train_end,
        kv_steady=float(occ_arr[i0:i1].mean()) if i1 > i0 else math.nan,
        placement_floor=floor,
        kv_occupancy=occ_integral / max(t, 1e-9),
        kv_fill=fill_integral / max(fill_end if not math.isnan(fill_end) else t, 1e-9),
        kv_pending=pend_integral / max(pend_time, 1e-9),
        stale_wait=stale_time / max(fill_end if not math.isnan(fill_end) else t, 1e-9),
        evictions=evictions,
        eviction_events=events,
        recomputed_tokens=recomputed,
        trace_t=np.array(trace_t),
        trace_kv=np.array(trace_kv),
        wall_s=time.perf_counter() - t0,
    )


# ----------------------------------------------------------------------------- report and CLI


@dataclass
class Comparison:
    """Dynamic vs static on one seeded workload."""

    cfg: SimConfig
    lb: float  # makespan lower bound (s)
    lb_work: float
    lb_critical: float
    lb_no_migration: float  # bound for any policy that keeps a rollout on one engine, even knowing lengths
    lb_nonclairvoyant: float  # ... and that does not know a rollout's length when it places it (w.p. 1 - 1e-9)
    dynamic: SimResult
    static: SimResult

    @property
    def speedup(self) -> float:
        return self.static.makespan / self.dynamic.makespan


def pipeline_bound(cfg: SimConfig, step_lb: list[float], train_s: np.ndarray) -> float:
    """Earliest the last step can finish given each step's own bound and the release rule.

    Step k is released once the weights trained on step k-1-staleness are published; it then
    takes at least ``step_lb[k]`` (its rollouts alone on every GPU); the learner trains the
    steps in order, each after it has finished.
    """
    fin, learned = [], []
    for k in range(cfg.steps):
        need = k - 1 - cfg.staleness
        start = learned[need] if need >= 0 else 0.0
        fin.append(start + step_lb[k])
        learned.append(max(fin[k], learned[k - 1] if k else 0.0) + float(train_s[k]))
    return max(fin)


def compare(cfg: SimConfig, dispatch: DispatchConfig | None = None) -> Comparison:
    """Simulate both policies on the same workload and compute the lower bounds.

    LB is the largest of the issue's bound (work and critical path) over all rollouts and the
    pipeline bound built from each step's own bound, the release rule and the learner's time
    (:func:`pipeline_bound`; with staleness 0 and no learner time, the sum of per-step bounds).
    """
    w = make_workload(cfg)
    steps = [np.flatnonzero(w.step == s) for s in range(cfg.steps)]
    train_s = train_seconds(cfg, w)
    every = np.arange(w.n)
    lb_all, work, crit = lower_bound(cfg, w, every)
    per = [lower_bound(cfg, w, idx) for idx in steps]
    lb = max(lb_all, pipeline_bound(cfg, [p[0] for p in per], train_s))
    nm_steps = [max(no_migration_bound(cfg, w, idx), p[0]) for idx, p in zip(steps, per)]
    nm = max(lb, pipeline_bound(cfg, nm_steps, train_s), no_migration_bound(cfg, w, every) if cfg.steps > 1 else 0.0)
    nc_steps = [max(nonclairvoyant_bound(cfg, w, idx, grid=20), b) for idx, b in zip(steps, nm_steps)]
    nc = max(nm, pipeline_bound(cfg, nc_steps, train_s))
    if cfg.staleness == 0:  # steps run one after another: report the per-step sums of each term
        work, crit = sum(p[1] for p in per), sum(p[2] for p in per)
    dyn = simulate(cfg, "dynamic", w, dispatch)
    sta = simulate(cfg, "static", w, None)
    return Comparison(cfg, lb, work, crit, nm, nc, dyn, sta)


def format_rows(rows: list[Comparison]) -> str:
    """A plain-text table: one line per (scenario, policy)."""
    head = (f"{'gpus':>5} {'steps':>5} {'stale':>5} {'learner':>7} {'max_tok':>7} {'policy':>8} {'makespan_s':>10} {'LB_s':>8} "
            f"{'mk/LB':>6} {'LBnm_s':>7} {'mk/LBnm':>7} {'LBnc_s':>7} {'mk/LBnc':>7} {'kv_occ':>6} {'kv_fill':>7} {'kv_peak':>7} {'evicted':>8} "
            f"{'overflows':>9} {'kv_steady':>9} {'speedup':>7}")
    lines = [head]
    for c in rows:
        for r in (c.dynamic, c.static):
            sp = f"{c.speedup:7.2f}" if r is c.dynamic else f"{'1.00':>7}"
            peak = float(r.trace_kv.max()) if r.trace_kv.size else 0.0
            lines.append(
                f"{c.cfg.gpus:>5} {c.cfg.steps:>5} {c.cfg.staleness:>5} {c.cfg.learner_gpus:>7} {c.cfg.max_tokens:>7} {r.policy:>8} "
                f"{r.makespan:>10.1f} {c.lb:>8.1f} {r.makespan / c.lb:>6.2f} {c.lb_no_migration:>7.1f} "
                f"{r.makespan / c.lb_no_migration:>7.2f} {c.lb_nonclairvoyant:>7.1f} {r.makespan / c.lb_nonclairvoyant:>7.2f} "
                f"{r.kv_occupancy:>6.1%} {r.kv_fill:>7.1%} {peak:>7.1%} "
                f"{r.evictions:>8} {r.eviction_events:>9} {r.kv_steady:>9.1%} {sp}"
            )
    return "\n".join(lines)


def plot_kv(c: Comparison, path: str) -> None:
    """PNG of per-GPU KV occupancy over time: one heat map per policy, plus the GPU mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 3, 2]})
    t_end = max(c.dynamic.makespan, c.static.makespan)
    for ax, r in zip(axes[:2], (c.dynamic, c.static)):
        im = ax.imshow(r.trace_kv.T, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis",
                       extent=(0, r.trace_t[-1] if r.trace_t.size else 1, 0, c.cfg.gpus), interpolation="nearest")
        ax.set_ylabel("GPU")
        ax.set_title(f"{r.policy}: makespan {r.makespan:.0f} s, mean KV occupancy {r.kv_occupancy:.0%}, "
                     f"{r.evictions} sequences evicted")
        fig.colorbar(im, ax=ax, label="KV used / capacity")
    for r, col in ((c.dynamic, "tab:blue"), (c.static, "tab:red")):
        axes[2].plot(r.trace_t, r.trace_kv.mean(axis=1), color=col, label=r.policy)
    axes[2].axvline(c.lb, color="k", ls="--", lw=1, label="lower bound")
    axes[2].set_ylim(0, 1.05)
    axes[2].set_xlim(0, t_end)
    axes[2].set_xlabel("time (s)")
    axes[2].set_ylabel("mean KV occupancy")
    axes[2].legend(loc="upper right")
    fig.suptitle(f"{c.cfg.gpus} GPUs, {c.cfg.prompts}x{c.cfg.rollouts} rollouts/step, {c.cfg.steps} step(s), "
                 f"staleness {c.cfg.staleness}, max {c.cfg.max_tokens} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=72)  # small enough to commit (< 200 KB)
    plt.close(fig)


def simulate_app(
    gpus: int = 64,
    prompts: int = 512,
    rollouts: int = 32,
    max_tokens: int = 8192,
    staleness: int = 0,
    steps: int = 1,
    learner_gpus: int = 64,
    seed: int = 0,
    plot: str | None = None,
) -> None:
    """Simulate one rollout phase at cluster scale: dynamic vs static dispatch (docs/scheduling.md)."""
    import typer

    try:
        cfg = SimConfig(gpus=gpus, prompts=prompts, rollouts=rollouts, max_tokens=max_tokens,
                        staleness=staleness, steps=steps, learner_gpus=learner_gpus, seed=seed)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    c = compare(cfg)
    typer.echo(format_rows([c]))
    typer.echo(f"dynamic speedup over static: {c.speedup:.2f}x; LB = max(work {c.lb_work:.1f} s, "
               f"critical path {c.lb_critical:.1f} s); steady-state KV occupancy {c.dynamic.kv_steady:.1%} (dynamic), "
               f"{c.static.kv_steady:.1%} (static); simulated in {c.dynamic.wall_s + c.static.wall_s:.1f} s")
    if plot:
        plot_kv(c, plot)
        typer.echo(f"KV occupancy plot: {plot}")


__all__ = ["SimConfig", "Workload", "make_workload", "train_seconds", "per_rollout_costs", "lower_bound", "no_migration_bound",
           "pipeline_bound", "steady_window", "occupancy_ceiling", "nonclairvoyant_bound", "simulate", "SimResult", "Comparison",
           "compare", "format_rows", "plot_kv", "simulate_app"]
