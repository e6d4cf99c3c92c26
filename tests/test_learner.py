"""training.learner on a tiny Qwen2 model, single process on CPU (DeepSpeed + gloo)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from bench.learner import TOKENIZER_CORPUS, random_batch
from training.learner import (
    Learner,
    LearnerConfig,
    lr_at,
    pack_micro_batches,
    shard_sequences,
    validate_batch,
    weights_sha256,
)

VOCAB = 300  # BPE size; token ids of the random batches stay below it


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from training.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "model"
    # head_dim 32, tied embeddings (as the demo model): publish must handle the tie
    return build_tiny_model(path, corpus=TOKENIZER_CORPUS, vocab_size=VOCAB, hidden_size=64, layers=2, heads=2, kv_heads=1)


def batch(step: int, **kw):
    """6 sequences of 20..40 tokens (a 64-token budget packs several per micro-batch), with
    generator logprobs near the tiny model's own (about -log 300), so that PPO ratios fall
    in every clip region and the loss depends on the weights."""
    b = random_batch(n_seqs=6, seq_len=40, vocab_size=VOCAB, step=step, **kw)
    noise = np.random.default_rng(step).normal(0, 0.3, len(b.loss_mask))
    return dataclasses.replace(b, old_logprobs=np.where(b.loss_mask == 1, -5.7 + noise, 0).astype(np.float32))


# --------------------------------------------------------------------------- pure parts


def test_shard_balances_tokens_and_keeps_every_sequence():
    lengths = [50, 10, 40, 30, 20, 20, 5]
    shards = shard_sequences(lengths, 2)
    assert sorted(i for s in shards for i in s) == list(range(7))
    loads = [sum(lengths[i] for i in s) for s in shards]
    assert abs(loads[0] - loads[1]) <= 5


def test_pack_respects_budget_and_isolates_long_sequences():
    lengths = [30, 70, 25, 40, 10, 100]
    packs = pack_micro_batches(list(range(6)), lengths, 64)
    assert sorted(i for p in packs for i in p) == list(range(6))
    for p in packs:
        assert len(p) == 1 or sum(lengths[i] for i in p) <= 64
    assert [1] in packs and [5] in packs


def test_lr_schedule_warmup_then_cosine():
    cfg = LearnerConfig(warmup_steps=4, schedule="cosine", total_steps=12, min_lr_ratio=0.1)
    lrs = [lr_at(cfg, s, 1.0) for s in range(14)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[8] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[12] == lrs[13] == pytest.approx(0.1)
    assert lr_at(LearnerConfig(), 100, 3e-6) == 3e-6


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="total_steps"):
        LearnerConfig(schedule="cosine")
    with pytest.raises(ValueError, match="zero_stage"):
        LearnerConfig(zero_stage=4)
    with pytest.raises(ValueError, match="extra"):
        LearnerConfig(zero=1)


def test_validate_batch_names_the_bad_field():
    b = batch(0)
    with pytest.raises(ValueError, match="prompt_lens"):
        validate_batch(dataclasses.replace(b, prompt_lens=np.zeros_like(b.prompt_lens)))
    with pytest.raises(ValueError, match="offsets"):
        validate_batch(dataclasses.replace(b, offsets=b.offsets[::-1].copy()))
    with pytest.raises(ValueError, match="advantages"):
        validate_batch(dataclasses.replace(b, advantages=b.advantages[:-1]))
    with pytest.raises(ValueError, match="kind"):
        validate_batch(dataclasses.replace(b, kind="ppo"))


# --------------------------------------------------------------------------- exact loss


def reference_losses(model_dir, b, cfg: LearnerConfig) -> dict:
    """Per sequence, unpacked, plain transformers + Python loops: the PPO and SFT losses."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    pg = nll = mismatch = n = 0.0
    for i in range(len(b.prompt_lens)):
        a, e, p = int(b.offsets[i]), int(b.offsets[i + 1]), int(b.prompt_lens[i])
        ids = torch.tensor(b.input_ids[a:e], dtype=torch.long)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0], -1)  # (n, V)
        adv = float(b.advantages[i])
        for t in range(p, e - a):
            if not b.loss_mask[a + t]:
                continue
            lp = float(logp[t - 1, ids[t]])  # logits at t-1 predict token t
            old = float(b.old_logprobs[a + t])
            r = math.exp(lp - old)
            loss = max(-adv * r, -adv * min(max(r, 1 - cfg.clip_low), 1 + cfg.clip_high))
            if adv < 0:
                loss = min(loss, -adv * cfg.clip_c)
            pg += loss
            nll -= lp
            mismatch += abs(lp - old)
            n += 1
    return {"pg": pg / n, "sft": nll / n, "mismatch": mismatch / n}


def test_packed_losses_equal_unpacked_reference(model_dir, tmp_path):
    # lr 0: the weights never move, so every step is measured on the initial model
    cfg = LearnerConfig(lr=0.0, old_logprobs="generator", micro_batch_tokens=64)
    b = batch(0)
    ref = reference_losses(model_dir, b, cfg)
    learner = Learner(cfg, model_dir, tmp_path / "work")

    m = learner.train_step(b)
    for key in ("loss", "loss/pg", "actor/clip_frac_low", "actor/clip_frac_high", "actor/clip_frac_dual",
                "actor/approx_kl", "actor/entropy", "actor/grad_norm", "actor/logprob_mismatch", "actor/lr",
                "perf/step_s", "perf/tokens"):  # fmt: skip
        assert math.isfinite(m[key]), key
    assert m["perf/micro_batches"] > 1
    assert m["loss"] == pytest.approx(ref["pg"], abs=1e-5)
    assert m["actor/logprob_mismatch"] == pytest.approx(ref["mismatch"], abs=1e-5)
    assert m["actor/clip_frac_low"] + m["actor/clip_frac_high"] > 0

    m = learner.train_step(dataclasses.replace(b, kind="sft"))
    assert m["loss"] == pytest.approx(ref["sft"], abs=1e-5)

    # a different packing (one sequence per micro-batch) gives the same loss
    learner.cfg = cfg.model_copy(update={"micro_batch_tokens": 1})
    assert learner.train_step(b)["loss"] == pytest.approx(ref["pg"], abs=1e-5)

    # optimizer reset: fresh AdamW state and the lr schedule restarts
    opt = learner._base_optimizer()
    assert all(float(s["step"]) == 3 for s in opt.state.values())
    learner.train_step(dataclasses.replace(b, optimizer_reset=True))
    assert all(float(s["step"]) == 1 for s in opt.state.values()) and learner.optimizer_steps == 1


# --------------------------------------------------------------------------- resume, publish

RESUME_CFG = LearnerConfig(
    lr=2e-3, warmup_steps=2, schedule="cosine", total_steps=8, micro_batch_tokens=64, old_logprobs="generator"
)
STEPS = 4


@pytest.fixture(scope="module")
def uninterrupted(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    learner = Learner(RESUME_CFG, model_dir, tmp / "work")
    metrics = [learner.train_step(batch(s)) for s in range(STEPS)]
    path, sha = learner.publish(7, tmp / "published")
    state = {k: v.detach().cpu().clone() for k, v in learner.engine.module.state_dict().items()}
    return metrics, path, sha, state


def test_stop_and_resume_matches_uninterrupted(model_dir, uninterrupted, tmp_path):
    metrics, _, _, state = uninterrupted
    first = Learner(RESUME_CFG, model_dir, tmp_path / "w1")
    got = [first.train_step(batch(s)) for s in range(2)]
    first.save_checkpoint(tmp_path / "ckpt", step=2, stage="rl1", log_position=1234)
    del first

    resumed, info = Learner.resume(RESUME_CFG, tmp_path / "ckpt", tmp_path / "w2")
    assert info == {"step": 2, "stage": "rl1", "log_position": 1234}
    got += [resumed.train_step(batch(s)) for s in range(2, STEPS)]

    # the loss depends on the weights (generator logprobs), so equal losses after the
    # resume need the weights and the AdamW state restored
    for want, have in zip(metrics, got):
        assert have["loss"] == pytest.approx(want["loss"], abs=1e-6)
        assert have["actor/grad_norm"] == pytest.approx(want["actor/grad_norm"], abs=1e-6)
        assert have["actor/lr"] == pytest.approx(want["actor/lr"], abs=1e-12)
    for k, v in resumed.engine.module.state_dict().items():
        assert torch.allclose(v.cpu(), state[k], atol=1e-6), k


def test_published_weights_load_and_generate(uninterrupted):
    _, path, sha, state = uninterrupted
    assert sha == weights_sha256(path)
    assert json.loads((Path(path) / "reckon_weights.json").read_text()) == {"version": 7, "sha256": sha}
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok("<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 5
    assert isinstance(tok.decode(out[0, ids.shape[1] :]), str)


@pytest.mark.slow
def test_bf16_zero3_with_checkpointing_trains_and_publishes(model_dir, tmp_path):
    cfg = LearnerConfig(zero_stage=3, dtype="bf16", gradient_checkpointing=True, lr=1e-3, micro_batch_tokens=64)
    learner = Learner(cfg, model_dir, tmp_path / "work")
    # SFT on one batch three times: the loss must go down (the RL loss of a recomputed
    # ratio is -mean(advantage) whatever the weights)
    losses = [learner.train_step(batch(0, kind="sft"))["loss"] for _ in range(3)]
    assert losses[2] < losses[0]
    path, sha = learner.publish(1, tmp_path / "pub")
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16 and sha == weights_sha256(path)
