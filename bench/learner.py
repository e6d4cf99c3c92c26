"""Step time of the reckon learner vs a bare DeepSpeed forward + backward + step.

Both train the same locally built Qwen2-architecture model on the same packed batch
(same micro-batches, same DeepSpeed config); the bare loop computes a plain masked
token-mean NLL, the learner its full GRPO-RoC step (packing, logprobs, clipped loss,
metrics, lr schedule). Prints median step seconds of each and their ratio (goal <= 1.15).

    python -m bench.learner [--hidden 256 --layers 4 --vocab 2048 --seqs 8 --len 384 --budget 1536 --steps 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from protocol.events import BatchFormed

#: a few chat-shaped strings to train the tiny model's BPE on (the token ids are random anyway)
TOKENIZER_CORPUS = [
    "<|im_start|>user\nWhat is 12 * 7? Use python.<|im_end|>\n<|im_start|>assistant\n",
    "print(sum(range(10)))  # the answer is \\boxed{45} <answer>45</answer>",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( )",
] * 20


def random_batch(
    *, n_seqs: int, seq_len: int, vocab_size: int, step: int = 0, seed: int = 0, kind: str = "rl", lr: float = 0.0
) -> BatchFormed:
    """A BatchFormed of ``n_seqs`` random sequences (lengths around ``seq_len``; a quarter prompt)."""
    rng = np.random.default_rng([seed, step])
    lens = rng.integers(max(2, seq_len // 2), seq_len + 1, size=n_seqs)
    prompt_lens = np.maximum(1, lens // 4).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    n = int(offsets[-1])
    input_ids = rng.integers(0, vocab_size, size=n).astype(np.int32)
    loss_mask = np.ones(n, dtype=np.int32)
    for i in range(n_seqs):
        loss_mask[offsets[i] : offsets[i] + prompt_lens[i]] = 0
        # a "tool response" span inside the response, masked like the generator does
        a = offsets[i] + prompt_lens[i] + (lens[i] - prompt_lens[i]) // 2
        loss_mask[a : a + 3] = 0
    old_logprobs = np.where(loss_mask == 1, -rng.exponential(3.0, size=n), 0.0).astype(np.float32)
    rewards = rng.integers(0, 2, size=n_seqs).astype(np.float32)
    advantages = ((rewards - rewards.mean()) / (rewards.std() + 1e-6)).astype(np.float32)
    return BatchFormed(
        step=step, stage="bench", kind=kind, rollout_ids=[f"r{i}" for i in range(n_seqs)],
        offsets=offsets, prompt_lens=prompt_lens, input_ids=input_ids, loss_mask=loss_mask,
        old_logprobs=old_logprobs, advantages=advantages, lr=lr, optimizer_reset=False,
    )  # fmt: skip


def _bare_step(engine, rows) -> None:
    """The baseline: DeepSpeed forward + backward per packed row, one step, nothing else."""
    for ids, pos, mask in rows:
        logits = engine(input_ids=ids, position_ids=pos, use_cache=False).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[0, 1:], reduction="none")
        engine.backward((nll * mask[0]).sum() / mask.sum().clamp(min=1))
    engine.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--len", type=int, default=384)
    ap.add_argument("--budget", type=int, default=1536, help="micro_batch_tokens")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--old-logprobs", default="recompute", choices=["recompute", "generator"])
    args = ap.parse_args()

    import transformers

    from training.learner import Learner, LearnerConfig, _pack_row, pack_micro_batches
    from training.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(
            Path(tmp) / "model", corpus=TOKENIZER_CORPUS, vocab_size=args.vocab, hidden_size=args.hidden,
            layers=args.layers, heads=args.hidden // 32, kv_heads=2,
        )  # fmt: skip
        vocab = transformers.AutoConfig.from_pretrained(model_dir).vocab_size
        cfg = LearnerConfig(
            zero_stage=args.zero, dtype=args.dtype, micro_batch_tokens=args.budget, lr=1e-5,
            old_logprobs=args.old_logprobs,
        )  # fmt: skip
        learner = Learner(cfg, model_dir, Path(tmp) / "work")
        batches = [random_batch(n_seqs=args.seqs, seq_len=args.len, vocab_size=vocab, step=s) for s in range(args.steps)]

        # The baseline runs on the learner's own engine (same model, optimizer, DeepSpeed
        # config and micro-batches); its state is irrelevant to timing.
        engine = learner.engine

        def rows_of(batch):
            lengths = np.diff(batch.offsets).astype(int).tolist()
            packs = pack_micro_batches(list(range(len(lengths))), lengths, args.budget)
            out = []
            for p in packs:
                r = _pack_row(batch, p, learner.device)
                out.append((r.input_ids, r.position_ids, r.mask))
            return out

        bare_rows = [rows_of(b) for b in batches]
        t_reckon, t_bare = [], []
        for b, rows in zip(batches, bare_rows):  # interleaved so drift hits both equally
            t0 = time.perf_counter()
            learner.train_step(b)
            t_reckon.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _bare_step(engine, rows)
            t_bare.append(time.perf_counter() - t0)

        # the first step of each includes warm-up (allocations, first kernels)
        r = statistics.median(t_reckon[1:] or t_reckon)
        base = statistics.median(t_bare[1:] or t_bare)
        tokens = int(batches[0].offsets[-1])
        n_params = sum(p.numel() for p in engine.module.parameters())
        print(
            f"model {n_params / 1e6:.1f}M params (vocab {vocab}), batch {args.seqs} seqs / ~{tokens} tokens, "
            f"budget {args.budget}, ZeRO-{args.zero} {args.dtype}, old_logprobs={args.old_logprobs}, "
            f"{torch.get_num_threads()} threads"
        )
        print(f"reckon learner step: {r:.3f} s (median of {len(t_reckon) - 1})")
        print(f"bare DeepSpeed step: {base:.3f} s")
        print(f"ratio: {r / base:.3f} (goal <= 1.15)")


if __name__ == "__main__":
    main()
