"""Build the demo's tiny policy: a random-init Qwen2 causal LM and a locally trained tokenizer.

No downloads: the tokenizer is a byte-level BPE trained with ``tokenizers`` on a small
corpus (by default rendered demo conversations), with digits split one per token so that
copying a number from the problem into code, and from tool output into the answer, is a
token-by-token copy a tiny model can learn. The chat special tokens are single ids and the
chat template is :data:`training.chat.CHAT_TEMPLATE`. Everything is written with
``save_pretrained``, so ``AutoTokenizer``, ``AutoModelForCausalLM`` and vLLM load the
directory like any Hugging Face model.

CLI: ``reckon make-tiny-model DIR`` (:func:`make_tiny_model_command`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel, ConfigDict, Field, model_validator

from training.chat import ADDED_TOKENS, CHAT_TEMPLATE, ENDOFTEXT, IM_END, SPECIAL_TOKENS


class TinyModelConfig(BaseModel):
    """Shape of the tiny demo model (head_dim = hidden_size / heads must be 32 or 64 for vLLM CPU)."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(512, ge=300)  # BPE vocabulary before special/added tokens (>= 256 bytes + merges)
    hidden_size: int = Field(128, ge=32)  # model width
    layers: int = Field(4, ge=1)  # transformer blocks
    heads: int = Field(4, ge=1)  # attention heads
    kv_heads: int = Field(2, ge=1)  # key/value heads (grouped-query attention); divides heads
    intermediate_size: int | None = None  # MLP width; None = 4 * hidden_size
    max_position_embeddings: int = 2048  # longest sequence the model accepts
    seed: int = 0  # weight initialisation seed
    pretrain_steps: int = Field(0, ge=0)  # base-model pretraining on the copy corpus (0 = leave it random)

    @model_validator(mode="after")
    def _check_shape(self) -> TinyModelConfig:
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by heads ({self.heads})")
        if self.hidden_size // self.heads not in (32, 64):
            raise ValueError(
                f"head_dim = hidden_size/heads = {self.hidden_size // self.heads}; vLLM's CPU attention needs 32 or 64"
            )
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        return self


def train_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``corpus``, with reckon's chat tokens.

    Digits are split before the byte-level step (one token per digit). ``SPECIAL_TOKENS``
    are special (skipped by ``decode(skip_special_tokens=True)``), ``ADDED_TOKENS`` are
    ordinary added tokens (kept in decoded text, where the generator parses them).
    eos = ``<|im_end|>``, pad = ``<|endoftext|>``; no BOS.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=list(SPECIAL_TOKENS),
    )
    fast.add_tokens(list(ADDED_TOKENS))
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    out_dir: str | Path,
    *,
    corpus: list[str] | None = None,
    vocab_size: int = TinyModelConfig.model_fields["vocab_size"].default,
    hidden_size: int = TinyModelConfig.model_fields["hidden_size"].default,
    layers: int = TinyModelConfig.model_fields["layers"].default,
    heads: int = TinyModelConfig.model_fields["heads"].default,
    kv_heads: int = TinyModelConfig.model_fields["kv_heads"].default,
    intermediate_size: int | None = None,
    seed: int = 0,
    pretrain_steps: int = TinyModelConfig.model_fields["pretrain_steps"].default,
) -> str:
    """Write a random-init fp32 Qwen2ForCausalLM (tied embeddings) and its tokenizer to ``out_dir``.

    ``corpus``: texts to train the BPE on; default: rendered demo conversations
    (:func:`training.demo_tasks.tokenizer_corpus`). ``pretrain_steps`` > 0 pretrains the
    random init on the copy corpus (:func:`pretrain_copy`) before saving, so the result is
    a tiny *base* model. Returns ``out_dir`` as a string.
    Raises ValueError (pydantic) on a shape vLLM's CPU backend cannot run.
    """
    cfg = TinyModelConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate_size=intermediate_size,
        seed=seed,
        pretrain_steps=pretrain_steps,
    )
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if corpus is None:
        from training.demo_tasks import tokenizer_corpus

        corpus = tokenizer_corpus(seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus, cfg.vocab_size)
    tokenizer.save_pretrained(out)

    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    model_cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
        dtype="float32",
    )
    torch.manual_seed(cfg.seed)
    model = Qwen2ForCausalLM(model_cfg).to(torch.float32)
    if cfg.pretrain_steps:
        pretrain_copy(model, cfg.pretrain_steps, vocab=len(tokenizer), seed=cfg.seed)
    # Sample the full distribution (HF would otherwise default to top_k=50; vLLM reads this file too).
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=eos_id, pad_token_id=pad_id
    )
    model.save_pretrained(out)
    return str(out)


def pretrain_copy(model, steps: int, *, vocab: int, seed: int = 0, batch_size: int = 32, span: int = 40,
                  lr: float = 3e-3) -> list[float]:
    """Pretrain ``model`` in place to copy: each sequence is a random token span written twice.

    Why: a pretrained base model (the paper starts from Qwen3-14B-Base) can continue a
    text by copying what it read earlier (induction heads); a random init cannot, and
    learning that inside SFT costs hundreds of steps before the first number is copied
    right into code. Random spans over the whole vocabulary carry no task content: no
    problems, no answers, no chat or tool format. The loss is on the second copy only.
    Deterministic in ``seed``. Returns the loss of each step.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        x = torch.randint(0, vocab, (batch_size, span), generator=gen)
        ids = torch.cat([x, x], dim=1)
        logits = model(input_ids=ids).logits[:, span:-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, span + 1 :].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


_DEFAULTS = TinyModelConfig.model_fields


def make_tiny_model_command(
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the model and tokenizer into.")],
    hidden_size: Annotated[int, typer.Option(help="Model width (head_dim = hidden/heads must be 32 or 64).")] = _DEFAULTS["hidden_size"].default,
    layers: Annotated[int, typer.Option(help="Transformer blocks.")] = _DEFAULTS["layers"].default,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = _DEFAULTS["heads"].default,
    kv_heads: Annotated[int, typer.Option(help="Key/value heads (divides heads).")] = _DEFAULTS["kv_heads"].default,
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size before chat tokens.")] = _DEFAULTS["vocab_size"].default,
    seed: Annotated[int, typer.Option(help="Initialisation and corpus seed.")] = _DEFAULTS["seed"].default,
    pretrain_steps: Annotated[int, typer.Option(help="Pretrain on the copy corpus for this many steps (0: random init).")] = _DEFAULTS["pretrain_steps"].default,
) -> None:
    """Build a tiny random-init Qwen2 model and a local byte-level BPE tokenizer in OUT_DIR."""
    try:
        path = build_tiny_model(
            out_dir, vocab_size=vocab_size, hidden_size=hidden_size, layers=layers, heads=heads, kv_heads=kv_heads, seed=seed,
            pretrain_steps=pretrain_steps,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    typer.echo(path)
