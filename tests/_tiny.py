"""A tiny Qwen2 model and byte-level BPE tokenizer built locally (no downloads) for tests.

Uses training.tiny.build_tiny_model when that module exists; otherwise builds its own.
"""

from __future__ import annotations

from pathlib import Path

from training.chat import ADDED_TOKENS, CHAT_TEMPLATE, SPECIAL_TOKENS, tool_call_text

_CORPUS = [
    "Solve the problem. Compute 12 * 7 and give the answer.",
    "print(sum(range(10)))",
    "import math\nprint(math.factorial(5))",
    "The answer is \\boxed{42}.",
    'call {"name": "python", "arguments": {"code": "print(1+1)"}}',
    "ok\nstdout:\n2\n",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ +-*/=()[]{}<>:;,.'\"\\_",
]


def build_tiny(out_dir: str | Path, *, hidden_size: int = 64, layers: int = 2, heads: int = 2, seed: int = 0) -> Path:
    """Write a random-weight Qwen2 causal LM (fp32, tied embeddings) and its tokenizer to ``out_dir``.

    head_dim = hidden_size / heads (keep it 32 or 64 for vLLM's CPU attention). Returns ``out_dir``.
    """
    try:
        from training.tiny import build_tiny_model
    except ImportError:
        build_tiny_model = None
    if build_tiny_model is not None:
        build_tiny_model(out_dir, hidden_size=hidden_size, layers=layers, heads=heads, kv_heads=heads, seed=seed)
        return Path(out_dir)
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS + [tool_call_text("print(6*7)")] * 3, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    fast.add_tokens(ADDED_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=fast.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=None,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(out)
    return out


def memorize(model_dir: str | Path, texts: list[str], steps: int = 400, lr: float = 1e-2) -> None:
    """Train the model in ``model_dir`` in place on ``texts`` until it reproduces them (a few seconds).

    Gives tests a real model that writes known multi-turn tool calls at low temperature.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batch = [torch.tensor([tok.encode(t, add_special_tokens=False)]) for t in texts]
    model.train()
    for _ in range(steps):  # until memorized (greedy reproduces the text), at most ``steps``
        worst = 0.0
        for x in batch:
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            worst = max(worst, loss.item())
        if worst < 2e-3:
            break
    model.eval()
    model.save_pretrained(model_dir)


if __name__ == "__main__":
    import sys

    print(build_tiny(sys.argv[1]))


# ---- a model that has memorized one 3-turn tool-use rollout (for rollout tests) ----------

PROBLEM = "What is 6*7?"
GOOD_CODE = "print(6*7)"
BAD_CALL = "<tool_call>\n{bad json\n</tool_call>"


def scripted_turns() -> tuple[list[str], list[str]]:
    """(assistant turn texts, tool reply texts) of the memorized rollout: a good call, a malformed call, an answer."""
    from training.chat import IM_END, ToolCallParseError, parse_tool_call

    try:
        parse_tool_call(BAD_CALL)
    except ToolCallParseError as e:
        err = f"Error: {e}"
    turns = ["Let me compute." + tool_call_text(GOOD_CODE), "Check." + BAD_CALL, "<answer>\\boxed{42}</answer>" + IM_END]
    return turns, ["42", err]


def build_tool_use_model(out_dir: str | Path) -> Path:
    """A tiny model trained to write the scripted rollout of :func:`scripted_turns` after the PROBLEM prompt."""
    from transformers import AutoTokenizer

    from training.chat import prompt_messages, tool_response_suffix

    out = build_tiny(out_dir)
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template(prompt_messages(PROBLEM), add_generation_prompt=True, tokenize=False)
    turns, replies = scripted_turns()
    text = prompt + turns[0] + tool_response_suffix(replies[0]) + turns[1] + tool_response_suffix(replies[1]) + turns[2]
    memorize(out, [text])
    return out
