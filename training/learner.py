"""The learner backend: one optimizer step per BatchFormed, on DeepSpeed (DESIGN §6, §7).

A :class:`Learner` owns a Hugging Face causal LM wrapped by ``deepspeed.initialize``
(ZeRO 0-3, fp32 or bf16, gloo on CPU, NCCL on GPU) and does three things:

- :meth:`Learner.train_step` — one AdamW step over a whole packed batch: its sequences
  are split over the data-parallel ranks, packed into micro-batches of at most
  ``micro_batch_tokens`` tokens (one row, attention kept inside each sequence through
  ``position_ids``), and the gradients accumulated; the loss is the GRPO-RoC policy loss
  (``kind == "rl"``) or the SFT loss (``kind == "sft"``), a token-mean over all trained
  tokens of the batch on all ranks.
- :meth:`Learner.publish` — writes the weights as a Hugging Face directory.
- :meth:`Learner.save_checkpoint` / :meth:`Learner.load_checkpoint` /
  :meth:`Learner.resume` — everything needed to continue bit-for-bit.

Data parallel: start N processes with ``deepspeed`` or ``torchrun``; every rank builds a
Learner and calls the same methods in the same order (they are collective). Ranks > 0
may pass ``batch=None`` to :meth:`train_step`: rank 0's batch is broadcast.

Logprob alignment: in sequence i, the token at position t (t >= prompt_lens[i]) is
predicted by the logits at position t-1; ``BatchFormed.old_logprobs`` and ``loss_mask``
are aligned with ``input_ids``. The first ``prompt_lens[i]`` tokens are never trained
on, whatever ``loss_mask`` says.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.events import BatchFormed
from training.algos import policy_loss, sft_loss, token_logprobs

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")
_CKPT_TAG = "state"  # one DeepSpeed tag per checkpoint directory
_MODEL_SUBDIR = "model"  # config + tokenizer kept in a checkpoint so it resumes alone


class LearnerConfig(BaseModel):
    """Settings of the learner (embedded in the run config)."""

    model_config = ConfigDict(extra="forbid")

    zero_stage: int = Field(0, ge=0, le=3)  # DeepSpeed ZeRO stage (0 = plain data parallel)
    dtype: Literal["fp32", "bf16"] = "fp32"  # compute dtype; bf16 keeps fp32 master weights
    micro_batch_tokens: int = Field(8192, ge=1)  # packing budget: tokens per micro-batch per rank
    lr: float = Field(1e-6, ge=0)  # peak lr, used when BatchFormed.lr <= 0
    warmup_steps: int = Field(0, ge=0)  # linear warmup from lr/warmup_steps to the peak
    schedule: Literal["constant", "cosine"] = "constant"  # lr after warmup
    total_steps: int | None = Field(None, ge=1)  # cosine horizon in optimizer steps (cosine only)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine floor as a fraction of the peak
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    adam_eps: float = Field(1e-8, gt=0)  # AdamW epsilon
    weight_decay: float = Field(0.0, ge=0)  # AdamW decoupled weight decay
    grad_clip: float = Field(1.0, ge=0)  # max global grad norm; 0 disables clipping
    clip_low: float = Field(0.2, ge=0)  # PPO ratio lower clip epsilon
    clip_high: float = Field(0.28, ge=0)  # PPO ratio upper clip epsilon (clip-higher)
    clip_c: float = Field(3.0, gt=1)  # dual-clip bound on negative-advantage tokens
    old_logprobs: Literal["recompute", "generator"] = "recompute"  # source of the PPO ratio's denominator
    log_entropy: bool = True  # report actor/entropy (one extra softmax over the logits, no grad)
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    attn_implementation: str = "sdpa"  # HF attention kernel; must honour packed position_ids
    seed: int = 0  # seeds python, numpy and torch on every rank
    torch_adam: bool = True  # torch's AdamW instead of DeepSpeed's JIT-built CPU/fused Adam

    @model_validator(mode="after")
    def _check(self) -> LearnerConfig:
        if self.schedule == "cosine" and self.total_steps is None:
            raise ValueError("total_steps is required when schedule='cosine' (the cosine horizon)")
        if self.total_steps is not None and self.total_steps <= self.warmup_steps and self.schedule == "cosine":
            raise ValueError(f"total_steps ({self.total_steps}) must exceed warmup_steps ({self.warmup_steps})")
        return self


def lr_at(cfg: LearnerConfig, step: int, peak: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based, counted since the last reset).

    Linear warmup ``peak * (step + 1) / warmup_steps`` (so step 0 already moves), then
    constant, or cosine from ``peak`` to ``min_lr_ratio * peak`` at ``total_steps``.
    """
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.schedule == "constant":
        return peak * warm
    assert cfg.total_steps is not None  # enforced by LearnerConfig
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / (cfg.total_steps - cfg.warmup_steps)))
    decay = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return peak * warm * decay


# --------------------------------------------------------------------------- batch layout


def validate_batch(batch: BatchFormed) -> None:
    """Check a BatchFormed's packed layout; raise ValueError naming the bad field."""
    if batch.kind not in ("rl", "sft"):
        raise ValueError(f"BatchFormed.kind must be 'rl' or 'sft', got {batch.kind!r}")
    offsets = np.asarray(batch.offsets)
    n_seq = len(offsets) - 1
    n_tok = len(batch.input_ids)
    if n_seq < 1 or offsets[0] != 0 or offsets[-1] != n_tok or np.any(np.diff(offsets) < 1):
        raise ValueError(
            f"BatchFormed.offsets must rise strictly from 0 to len(input_ids)={n_tok}, got {offsets.tolist()[:8]}..."
        )
    for name in ("loss_mask", "old_logprobs"):
        if len(getattr(batch, name)) != n_tok:
            raise ValueError(f"BatchFormed.{name} has {len(getattr(batch, name))} entries, input_ids has {n_tok}")
    for name in ("prompt_lens", "advantages"):
        if len(getattr(batch, name)) != n_seq:
            raise ValueError(f"BatchFormed.{name} has {len(getattr(batch, name))} entries, offsets give {n_seq} sequences")
    lens = np.diff(offsets)
    bad = np.flatnonzero((batch.prompt_lens < 1) | (batch.prompt_lens > lens))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"BatchFormed.prompt_lens[{i}]={int(batch.prompt_lens[i])} must be in [1, {int(lens[i])}] "
            "(the first token has no logits to predict it)"
        )


def shard_sequences(lengths: list[int], world: int) -> list[list[int]]:
    """Split sequence indices over ``world`` ranks, balancing tokens (longest first)."""
    shards: list[list[int]] = [[] for _ in range(world)]
    load = [0] * world
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        shards[r].append(i)
        load[r] += lengths[i]
    return [sorted(s) for s in shards]


def pack_micro_batches(indices: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit-decreasing packing of sequences into micro-batches of <= ``budget`` tokens.

    A sequence longer than the budget gets a micro-batch of its own (it is never split:
    its tokens attend to each other).
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return [sorted(b) for b in bins]


@dataclass
class _Row:
    """One packed micro-batch: a single row of several sequences."""

    input_ids: torch.Tensor  # (1, L) int64
    position_ids: torch.Tensor  # (1, L) restarts at 0 for each sequence
    mask: torch.Tensor  # (1, L-1) float: 1 where token t+1 is trained on
    old_logprobs: torch.Tensor  # (1, L-1) generator logprob of token t+1
    advantages: torch.Tensor  # (1, L-1) advantage of the sequence token t+1 belongs to


def _pack_row(batch: BatchFormed, seqs: list[int], device: torch.device) -> _Row:
    ids, pos, mask, old, adv = [], [], [], [], []
    for i in seqs:
        a, b = int(batch.offsets[i]), int(batch.offsets[i + 1])
        n, p = b - a, int(batch.prompt_lens[i])
        ids.append(np.asarray(batch.input_ids[a:b], dtype=np.int64))
        pos.append(np.arange(n, dtype=np.int64))
        m = np.asarray(batch.loss_mask[a:b], dtype=np.float32).copy()
        m[:p] = 0.0  # prompt tokens are never trained on
        mask.append(m)
        old.append(np.asarray(batch.old_logprobs[a:b], dtype=np.float32))
        adv.append(np.full(n, float(batch.advantages[i]), dtype=np.float32))

    def t(parts: list[np.ndarray], shift: bool) -> torch.Tensor:
        x = torch.from_numpy(np.concatenate(parts))[None]
        # targets are tokens 1..L-1 of the row; a sequence's first token is a prompt token
        # (mask 0), so predictions across a sequence boundary never count
        return (x[:, 1:] if shift else x).to(device)

    return _Row(t(ids, False), t(pos, False), t(mask, True), t(old, True), t(adv, True))


def _dummy_row(device: torch.device) -> _Row:
    """A one-token row with nothing to train on: keeps ranks' collective counts equal."""
    z = torch.zeros((1, 1), dtype=torch.int64, device=device)
    e = torch.zeros((1, 0), dtype=torch.float32, device=device)
    return _Row(z, z, e, e, e)


# --------------------------------------------------------------------------- the learner


#: A JIT build (deepspeed_shm_comm ~25 s, CPU Adam ~40 s) holding its lock longer than this
#: was killed mid-build; torch would wait on its lock file forever.
STALE_BUILD_LOCK_S = 600


def _clear_stale_build_locks(ext_dir: Path) -> None:
    """Remove torch extension build locks left by a process killed while compiling."""
    import time

    for lock in ext_dir.glob("*/lock"):
        try:
            if time.time() - lock.stat().st_mtime > STALE_BUILD_LOCK_S:
                lock.unlink()
        except OSError:
            pass


def _setup_process_env() -> None:
    """Single-process defaults for torch.distributed, and a stable JIT-extension cache."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "reckon" / "torch_extensions"))
    _clear_stale_build_locks(Path(os.environ["TORCH_EXTENSIONS_DIR"]))
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _copy_aux_files(src: Path, dst: Path) -> None:
    """Copy a model directory's non-weight files (config, tokenizer, templates)."""
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and not f.name.endswith(".index.json"):
            shutil.copy2(f, dst / f.name)


def weights_sha256(model_dir: str | os.PathLike) -> str:
    """sha256 over a directory's ``*.safetensors`` files, read in sorted name order."""
    h = hashlib.sha256()
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


class Learner:
    """A DeepSpeed-wrapped causal LM that trains on BatchFormed events.

    Args:
        cfg: the learner settings.
        model_dir: a local Hugging Face model directory (config, weights, tokenizer).
        work_dir: scratch directory of this learner (its DeepSpeed config is written there).

    Raises:
        FileNotFoundError: ``model_dir`` does not exist.
        ValueError: from transformers, when ``model_dir`` is not a causal LM.
    """

    def __init__(self, cfg: LearnerConfig, model_dir: str | os.PathLike, work_dir: str | os.PathLike, *,
                 _load_weights: bool = True) -> None:
        import deepspeed
        import transformers
        from deepspeed.accelerator import get_accelerator

        self.cfg = cfg
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"model_dir {str(model_dir)!r} is not a directory (a Hugging Face model dir)")
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)

        _setup_process_env()
        on_gpu = torch.cuda.is_available()
        if on_gpu:
            get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()
        transformers.set_seed(cfg.seed)

        kwargs = dict(dtype=torch.float32, attn_implementation=cfg.attn_implementation)
        if _load_weights:
            model = transformers.AutoModelForCausalLM.from_pretrained(self.model_dir, **kwargs)
        else:  # resume: the weights come from the DeepSpeed checkpoint
            config = transformers.AutoConfig.from_pretrained(self.model_dir)
            model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()

        ds_config = {
            "train_micro_batch_size_per_gpu": 1,  # sizes are ours: token-budget packing
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,  # a variable number of micro-batches per step
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage},
            "bf16": {"enabled": cfg.dtype == "bf16"},
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": cfg.lr,
                    "betas": list(cfg.betas),
                    "eps": cfg.adam_eps,
                    "weight_decay": cfg.weight_decay,
                    "torch_adam": cfg.torch_adam,
                },
            },
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        (self.work_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        self.engine.train()  # from_pretrained returns eval mode; gradient checkpointing needs train
        self.device = self.engine.device
        self.optimizer_steps = 0  # steps since the last optimizer reset: drives the lr schedule
        self._grad_norm: float | None = None
        if cfg.zero_stage == 0 and cfg.dtype == "fp32":
            self._capture_fp32_grad_norm()

    # ------------------------------------------------------------------ training

    def train_step(self, batch: BatchFormed | None) -> dict[str, float]:
        """One optimizer step over the whole batch (collective over ranks).

        ``batch.lr > 0`` is the peak lr for this step (the stage's lr); the warmup/cosine
        multiplier of :func:`lr_at` applies on top; ``batch.lr <= 0`` uses ``cfg.lr``.
        ``batch.optimizer_reset`` calls :meth:`reset_optimizer` first.

        Returns metrics (identical on every rank): ``loss``, ``loss/pg`` or ``loss/sft``,
        ``actor/clip_frac_low|high|dual``, ``actor/approx_kl`` and ``actor/logprob_mismatch``
        (mean |learner - generator| logprob over trained tokens) for RL, ``actor/entropy``
        (if ``log_entropy``), ``actor/grad_norm`` (before clipping; NaN if unavailable), ``actor/lr``,
        ``perf/step_s``, ``perf/tokens``, ``perf/loss_tokens``, ``perf/micro_batches``,
        ``perf/tokens_per_s``.

        Raises:
            ValueError: a malformed batch (see :func:`validate_batch`).
        """
        t0 = time.perf_counter()
        if self.world > 1:
            box = [batch]
            torch.distributed.broadcast_object_list(box, src=0)
            batch = box[0]
        if batch is None:
            raise ValueError("train_step(batch=None) is only allowed on ranks > 0; rank 0 must pass the BatchFormed")
        validate_batch(batch)
        if batch.optimizer_reset:
            self.reset_optimizer()

        lengths = np.diff(batch.offsets).astype(int).tolist()
        mine = shard_sequences(lengths, self.world)[self.rank]
        micro = [_pack_row(batch, mb, self.device) for mb in pack_micro_batches(mine, lengths, self.cfg.micro_batch_tokens)]
        n_micro = self._all_reduce_max(len(micro))
        micro += [_dummy_row(self.device) for _ in range(n_micro - len(micro))]
        # the token-mean's denominator: trained tokens of the whole batch, on all ranks
        prompt_mask = np.arange(len(batch.input_ids)) >= np.repeat(batch.offsets[:-1] + batch.prompt_lens, lengths)
        loss_tokens = float(np.sum((np.asarray(batch.loss_mask) != 0) & prompt_mask))

        sums: dict[str, float] = {}
        for row in micro:
            loss, metrics = self._micro_step(batch.kind, row, loss_tokens)
            # DeepSpeed averages gradients over ranks; the loss is a sum over ranks
            self.engine.backward(loss * self.world)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v

        peak = batch.lr if batch.lr > 0 else self.cfg.lr
        lr = lr_at(self.cfg, self.optimizer_steps, peak)
        for group in self._base_optimizer().param_groups:
            group["lr"] = lr
        self._grad_norm = None
        self.engine.step()
        self.optimizer_steps += 1

        out = self._all_reduce_sum(sums)
        grad_norm = self._grad_norm if self._grad_norm is not None else self.engine.get_global_grad_norm()
        step_s = time.perf_counter() - t0
        out.update({
            "loss": out.get("loss/pg", out.get("loss/sft", 0.0)),
            "actor/grad_norm": float("nan") if grad_norm is None else float(grad_norm),
            "actor/lr": lr,
            "perf/step_s": step_s,
            "perf/tokens": float(len(batch.input_ids)),
            "perf/loss_tokens": loss_tokens,
            "perf/micro_batches": float(n_micro),
            "perf/tokens_per_s": len(batch.input_ids) / step_s,
        })
        return out

    def _micro_step(self, kind: str, row: _Row, loss_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward one packed row; its share of the batch loss and of the metric sums."""
        logits = self.engine(input_ids=row.input_ids, position_ids=row.position_ids, use_cache=False).logits
        if logits.shape[1] == 1:  # a padding row: a zero loss that still reaches every parameter
            return logits.sum() * 0.0, {}
        logits = logits[:, :-1]  # (1, L-1, V): position t predicts token t+1
        logprobs, entropy = token_logprobs(logits, row.input_ids[:, 1:], with_entropy=self.cfg.log_entropy)  # (1, L-1)
        if kind == "sft":
            return sft_loss(logprobs, row.mask, entropy=entropy, token_count=loss_tokens)
        # One optimizer step per batch: the weights do not change between micro-batches, so
        # a separate no-grad pass "before the update" would give exactly these values (the
        # model runs without dropout: Qwen-style configs have attention_dropout 0).
        old = logprobs.detach() if self.cfg.old_logprobs == "recompute" else row.old_logprobs
        loss, metrics = policy_loss(
            logprobs, old, row.advantages, row.mask,
            clip_low=self.cfg.clip_low, clip_high=self.cfg.clip_high, clip_c=self.cfg.clip_c,
            entropy=entropy, token_count=loss_tokens,
        )  # fmt: skip
        with torch.no_grad():
            mismatch = ((logprobs.detach() - row.old_logprobs).abs() * row.mask).sum() / max(loss_tokens, 1.0)
        metrics["actor/logprob_mismatch"] = float(mismatch)
        return loss, metrics

    def reset_optimizer(self) -> None:
        """Forget AdamW's moments and step counts and restart the lr schedule (warmup)."""
        self._base_optimizer().state.clear()  # torch's AdamW re-initialises empty state lazily
        self.optimizer_steps = 0

    # ------------------------------------------------------------------ weights out

    def publish(self, version: int, out_dir: str | os.PathLike) -> tuple[str, str]:
        """Write the current weights as a Hugging Face model directory (collective).

        ``out_dir`` becomes a directory with ``*.safetensors`` (in the training dtype),
        ``config.json`` and the tokenizer files of ``model_dir``, loadable by
        ``AutoModelForCausalLM.from_pretrained`` and by vLLM ``reload_weights``. It is
        written beside ``out_dir`` and renamed into place, so readers never see a half
        directory; an existing ``out_dir`` is replaced.

        Returns:
            ``(path, sha256)``: the absolute directory and :func:`weights_sha256` of it.
        """
        out = Path(out_dir).absolute()
        # ZeRO-3 partitions the parameters: gather them (collective; full on rank 0 only)
        state = self.engine._zero3_consolidated_16bit_state_dict() if self.cfg.zero_stage == 3 else None
        result = [None, None]
        if self.rank == 0:
            if state is None:
                state = self.engine.module.state_dict()
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            _copy_aux_files(self.model_dir, tmp)
            self.engine.module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            sha = weights_sha256(tmp)
            (tmp / "reckon_weights.json").write_text(json.dumps({"version": version, "sha256": sha}))
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
            result = [str(out), sha]
        if self.world > 1:
            torch.distributed.broadcast_object_list(result, src=0)
        return result[0], result[1]

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, ckpt_dir: str | os.PathLike, *, step: int, stage: str, log_position: int) -> None:
        """Save model, optimizer, lr-schedule position, RNG states (per rank), ``step``,
        ``stage`` and the event-log ``log_position`` consumed (collective).

        The directory also holds the model's config and tokenizer, so
        :meth:`Learner.resume` needs nothing else.
        """
        ckpt = Path(ckpt_dir)
        ckpt.mkdir(parents=True, exist_ok=True)
        client_state = {
            "reckon": {
                "step": step,
                "stage": stage,
                "log_position": log_position,
                "optimizer_steps": self.optimizer_steps,
                "config": self.cfg.model_dump(mode="json"),
            }
        }
        self.engine.save_checkpoint(str(ckpt), tag=_CKPT_TAG, client_state=client_state)
        torch.save(_rng_state(), ckpt / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            model_files = ckpt / _MODEL_SUBDIR
            model_files.mkdir(exist_ok=True)
            _copy_aux_files(self.model_dir, model_files)
            self.engine.module.config.save_pretrained(model_files)
        torch.distributed.barrier()

    def load_checkpoint(self, ckpt_dir: str | os.PathLike) -> dict:
        """Restore what :meth:`save_checkpoint` wrote (collective).

        Returns:
            ``{"step", "stage", "log_position"}`` as saved.

        Raises:
            FileNotFoundError: ``ckpt_dir`` holds no reckon checkpoint.
        """
        ckpt = Path(ckpt_dir)
        if not (ckpt / _CKPT_TAG).is_dir():
            raise FileNotFoundError(f"{str(ckpt)!r} is not a learner checkpoint (no {_CKPT_TAG}/ inside)")
        _, client_state = self.engine.load_checkpoint(
            str(ckpt), tag=_CKPT_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        info = client_state["reckon"]
        self.optimizer_steps = int(info["optimizer_steps"])
        rng = ckpt / f"rng_rank{self.rank}.pt"
        if rng.exists():  # absent when resuming on more ranks than saved
            _set_rng_state(torch.load(rng, weights_only=False))
        return {"step": info["step"], "stage": info["stage"], "log_position": info["log_position"]}

    @classmethod
    def resume(cls, cfg: LearnerConfig, ckpt_dir: str | os.PathLike, work_dir: str | os.PathLike) -> tuple[Learner, dict]:
        """Build a Learner from a checkpoint alone; returns it and ``{"step", "stage", "log_position"}``."""
        learner = cls(cfg, Path(ckpt_dir) / _MODEL_SUBDIR, work_dir, _load_weights=False)
        return learner, learner.load_checkpoint(ckpt_dir)

    def close(self) -> None:
        """Leave the process group cleanly (collective); call once, at shutdown.

        Even after it, a multi-process CPU run now and then aborts during interpreter
        finalisation ("terminate called without an active exception", no Python frame, all
        work done); a process that must exit 0 can end with ``os._exit(0)`` after this.
        """
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    # ------------------------------------------------------------------ internals

    def _base_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer under DeepSpeed's wrappers (ZeRO, bf16), holding the state."""
        opt = self.engine.optimizer
        while hasattr(opt, "optimizer"):  # DeepSpeed wrappers keep the wrapped one here
            opt = opt.optimizer
        return opt

    def _capture_fp32_grad_norm(self) -> None:
        """Record the norm DeepSpeed computes when clipping plain fp32 ZeRO-0 gradients.

        The ZeRO and bf16 optimizers expose it (``get_global_grad_norm``); this path
        clips with ``clip_grad_norm_`` and drops the value, so keep it.
        """
        from deepspeed.runtime.utils import clip_grad_norm_

        engine = self.engine

        def clip() -> None:
            self._grad_norm = float(clip_grad_norm_(engine.module.parameters(), engine.gradient_clipping(), mpu=engine.mpu))

        engine.clip_fp32_gradients = clip

    def _all_reduce_max(self, n: int) -> int:
        if self.world == 1:
            return n
        t = torch.tensor([n], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def _all_reduce_sum(self, sums: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return dict(sums)
        keys = sorted(sums)
        keys_all: list = [None] * self.world
        torch.distributed.all_gather_object(keys_all, keys)
        keys = sorted(set().union(*keys_all))  # a rank with only padding rows has no keys
        t = torch.tensor([sums.get(k, 0.0) for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return dict(zip(keys, t.tolist()))
