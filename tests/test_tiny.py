"""The tiny demo model: builds, loads back through the Auto classes, speaks the chat format."""

from __future__ import annotations

import pytest

from training.chat import ADDED_TOKENS, ENDOFTEXT, IM_END, SPECIAL_TOKENS, encode_text, tool_call_text, tool_response_suffix

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from training.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("tiny")
    return build_tiny_model(out, hidden_size=64, layers=2, heads=2, kv_heads=1, vocab_size=400, seed=0)


def test_round_trip_through_auto_classes(tiny_dir):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.config.model_type == "qwen2"
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tok)
    assert tok.eos_token == IM_END and tok.pad_token == ENDOFTEXT
    assert model.config.eos_token_id == tok.eos_token_id
    ids = tok("What is 12 * 7?", return_tensors="pt")["input_ids"]
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))


def test_generation_config_samples_full_distribution(tiny_dir):
    gc = transformers.GenerationConfig.from_pretrained(tiny_dir)
    assert gc.top_k == 0 and gc.top_p == 1.0 and gc.temperature == 1.0


@pytest.mark.parametrize("token", SPECIAL_TOKENS + ADDED_TOKENS)
def test_chat_tokens_are_single_ids(tiny_dir, token):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    ids = tok(f"x{token}y", add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids(token) in ids
    assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1


def test_digits_are_split_individually(tiny_dir):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    ids = tok("print(4821 * 937)", add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    assert [p for p in pieces if p.strip().isdigit()] == list("4821937")


def test_decode_round_trips_a_tool_call(tiny_dir):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    text = "Use Python.\n" + tool_call_text("import math\nprint(math.comb(23, 7))")
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


@pytest.mark.parametrize("text", [
    tool_response_suffix("42"),
    tool_response_suffix("Traceback (most recent call last):\n  ValueError: ünïcødé ✓\t\r\n"),
    "  leading spaces, <|im_start|>inline specials<|im_end|> and </tool_call>",
    "",
])
def test_encode_text_is_tokenizer_encode(tiny_dir, text):
    # the generator's fast path must give exactly the ids transformers gives, or the
    # trajectory's tool tokens would differ from the chat template's (slow tokenizers
    # have no backend and take the plain call)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    assert encode_text(tok, text) == tok.encode(text, add_special_tokens=False)
    assert tok.backend_tokenizer is not None


def test_chat_template_renders_the_chat_format(tiny_dir):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "What is 2 * 3?"},
        {"role": "assistant", "content": tool_call_text("print(2 * 3)")},
        {"role": "tool", "content": "<stdout>\n6\n</stdout>"},
        {"role": "assistant", "content": "<answer>\\boxed{6}</answer>"},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWhat is 2 * 3?<|im_end|>\n<|im_start|>assistant\n"
        + tool_call_text("print(2 * 3)")
        + tool_response_suffix("<stdout>\n6\n</stdout>")
        + "<answer>\\boxed{6}</answer><|im_end|>\n"
    )
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_bad_shape_is_rejected_with_the_reason(tmp_path):
    from training.tiny import build_tiny_model

    with pytest.raises(ValueError, match="head_dim"):
        build_tiny_model(tmp_path, hidden_size=96, heads=4)  # head_dim 24
    with pytest.raises(ValueError, match="kv_heads"):
        build_tiny_model(tmp_path, hidden_size=128, heads=4, kv_heads=3)


def test_custom_corpus_and_seed_determinism(tmp_path):
    from training.tiny import build_tiny_model

    corpus = ["What is 1 + 1? print(1 + 1)"] * 20
    a = build_tiny_model(tmp_path / "a", corpus=corpus, hidden_size=64, layers=1, heads=2, kv_heads=2, vocab_size=300)
    b = build_tiny_model(tmp_path / "b", corpus=corpus, hidden_size=64, layers=1, heads=2, kv_heads=2, vocab_size=300)
    ma = transformers.AutoModelForCausalLM.from_pretrained(a)
    mb = transformers.AutoModelForCausalLM.from_pretrained(b)
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(pa, pb)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def test_make_tiny_model_command(tmp_path):
    import typer
    from typer.testing import CliRunner

    from training.tiny import make_tiny_model_command

    app = typer.Typer()
    app.command()(make_tiny_model_command)
    res = CliRunner().invoke(app, [str(tmp_path / "m"), "--hidden-size", "64", "--layers", "1", "--heads", "2", "--kv-heads", "1"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m" / "config.json").exists()
    bad = CliRunner().invoke(app, [str(tmp_path / "n"), "--hidden-size", "100", "--heads", "4"])
    assert bad.exit_code != 0 and "head_dim" in bad.output


def test_copy_pretraining_teaches_the_random_init_to_copy():
    """The base-model pretraining learns its corpus (spans written twice) and is deterministic."""
    from training.tiny import pretrain_copy

    def fresh():
        torch.manual_seed(0)
        cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
        return transformers.Qwen2ForCausalLM(cfg)

    losses = pretrain_copy(fresh(), 120, vocab=64, seed=3, batch_size=16, span=12, lr=1e-2)
    assert losses[-1] < 0.25 * losses[0], losses[::20]  # from ~ln(64) toward 0: it copies
    assert pretrain_copy(fresh(), 5, vocab=64, seed=3, batch_size=16, span=12, lr=1e-2) == losses[:5]
