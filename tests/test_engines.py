"""Engine contract on real engines (transformers and vLLM): logprobs, stop strings, abort, capacity, cancellation."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest
import torch
import trio

from actors.engines import EngineConfig, SamplingSpec, create_engine
from tests._tiny import build_tiny

KINDS = ["hf", pytest.param("vllm", marks=pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed"))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"))


def _plain_logprobs(model_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_engine_contract(kind, model_dir):
    async def main():
        async with create_engine(EngineConfig(kind=kind, max_model_len=512, max_running=8), model_dir) as engine:
            cap = engine.capacity()
            assert cap["total_tokens"] > 0 and cap["free_slots"] == 8 and cap["running"] == 0
            prompts = [[1, 10 + i, 20, 30] for i in range(6)]
            outs = {}

            async def one(i):
                outs[i] = await engine.generate(f"g{i}", prompts[i], SamplingSpec(max_tokens=40, seed=i))

            async with trio.open_nursery() as nursery:  # concurrent requests, batched together
                for i in range(6):
                    nursery.start_soon(one, i)
            # abort: the waiting generate returns what it had, finish "abort"
            async with trio.open_nursery() as nursery:
                got = {}

                async def long():
                    got["out"] = await engine.generate("long", prompts[0], SamplingSpec(max_tokens=400, seed=0))

                nursery.start_soon(long)
                await trio.sleep(0.05)
                await engine.abort("long")
            # cancelling a generate call frees its request; the engine keeps serving
            with trio.move_on_after(0.05):
                await engine.generate("cancelled", prompts[1], SamplingSpec(max_tokens=400))
            after = await engine.generate("after", prompts[1], SamplingSpec(max_tokens=5, seed=1))
            return outs, got["out"], after

    outs, aborted, after = trio.run(main)
    for i, out in outs.items():
        assert 1 <= len(out.token_ids) <= 40 and len(out.logprobs) == len(out.token_ids) == len(out.versions)
        assert out.finish_reason in ("eos", "length")
        ids = [1, 10 + i, 20, 30, *out.token_ids]
        np.testing.assert_allclose(out.logprobs, _plain_logprobs(model_dir, ids)[3:], atol=1e-4)
    assert aborted.finish_reason == "abort" and len(aborted.token_ids) < 400
    assert len(after.token_ids) >= 1


def test_sampling_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="temperature"):
        SamplingSpec(max_tokens=4, temperature=0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingSpec(max_tokens=0)


def test_missing_model_dir_names_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        create_engine(EngineConfig(kind="hf"), tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_reload_weights_serves_the_new_weights(kind, model_dir, tmp_path):
    """After a reload to different weights, logprobs match a fresh transformers model of those weights.

    Guards the vLLM CPU bug where the tied lm_head kept its start-time packed GEMM weights.
    """
    # Same config and tokenizer, different weights (a second build_tiny may train a different vocab).
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():  # tied: embed_tokens (= lm_head) changes too
            param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(other)
    prompt = [1, 11, 20, 30]

    async def main():
        async with create_engine(EngineConfig(kind=kind, max_model_len=256, max_running=2), model_dir) as engine:
            await engine.reload_weights(other, version=1)
            return await engine.generate("r", prompt, SamplingSpec(max_tokens=24, seed=3))

    out = trio.run(main)
    assert set(out.versions) == {1}
    ids = [*prompt, *out.token_ids]
    new = _plain_logprobs(other, ids)[3:]
    assert np.abs(_plain_logprobs(model_dir, ids)[3:] - new).max() > 1e-2  # the two models really differ
    np.testing.assert_allclose(out.logprobs, new, atol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")
def test_vllm_seeded_requests_whose_prompts_overflow_one_step(model_dir):
    """Seeded sampling with more prompt tokens than one engine step takes (reckon eval: k samples
    of many problems at once). vLLM's CPU build split such prefills across steps and then died
    rewinding the per-request generator ("CPU Generator does not use offset")."""

    async def round_():
        async with create_engine(EngineConfig(kind="vllm", max_model_len=512, max_running=16), model_dir) as engine:
            outs = {}

            async def one(i):
                prompt = [1 + (i + j) % 50 for j in range(450)]
                outs[i] = await engine.generate(f"s{i}", prompt, SamplingSpec(max_tokens=8, seed=100 + i))

            async with trio.open_nursery() as nursery:  # 12 x 450 prompt tokens, all waiting together
                for i in range(12):
                    nursery.start_soon(one, i)
            return {i: list(o.token_ids) for i, o in outs.items()}

    first = trio.run(round_)
    assert len(first) == 12 and all(1 <= len(t) <= 8 for t in first.values())
    assert trio.run(round_) == first  # per-request seeds: the same samples again


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")
def test_vllm_next_turn_reuses_all_but_a_block_of_its_history(model_dir):
    """On CPU the default KV block is 32 tokens (vLLM's own is 128): a rollout's next turn,
    whose prompt extends the last one's history, is prefilled from the prefix cache for all
    but the tail of fewer than 32 tokens (with 128, a ~100-token history was prefilled whole)."""
    from actors.engines.vllm_engine import CPU_BLOCK_SIZE, VLLMBackend, _on_cpu

    b = VLLMBackend(EngineConfig(kind="vllm", max_model_len=512, max_running=4, warmup=False), model_dir)
    try:
        if _on_cpu():
            assert b._block_size == CPU_BLOCK_SIZE == 32
        first = [1 + j % 50 for j in range(90)]
        b.add("t1", first, SamplingSpec(max_tokens=20, seed=0, ignore_eos=True))
        out: list[int] = []
        while b.has_work():
            out += [t for d in b.step() for t in d.token_ids]
        history = [*first, *out, 7, 8, 9]  # the turn's tokens plus a "tool response"
        b.add("t2", history, SamplingSpec(max_tokens=1, seed=1))
        cached = None
        while b.has_work():
            for o in b._engine.step():
                cached = o.num_cached_tokens if cached is None else cached
        # every whole block of the history but the last token's is reused
        assert cached == (len(history) - 1) // b._block_size * b._block_size, (cached, len(history))
        if _on_cpu():
            assert cached >= len(history) - 32, (cached, len(history))
    finally:
        b.close()


@pytest.mark.parametrize("kind", KINDS)
def test_stream_yields_tokens_as_they_come_and_leaving_early_aborts(kind, model_dir):
    from contextlib import aclosing

    async def main():
        async with create_engine(EngineConfig(kind=kind, max_model_len=512, max_running=8), model_dir) as engine:
            spec = SamplingSpec(max_tokens=30, seed=3, ignore_eos=True)
            chunks = [c async for c in engine.stream("s", [1, 10, 20, 30], spec)]
            whole = await engine.generate("g", [1, 10, 20, 30], spec)
            # leave a long stream after its first chunk: the request is aborted, its slot freed
            async with aclosing(engine.stream("left", [1, 11, 20, 30], SamplingSpec(max_tokens=400, ignore_eos=True))) as s:
                async for first in s:
                    break
            assert engine.running == 0
            with trio.fail_after(10):
                while engine.capacity()["running"]:
                    await trio.sleep(0.01)
            return chunks, whole, first

    chunks, whole, first = trio.run(main)
    assert len(chunks) > 1 and len(first.token_ids) >= 1 and first.finish_reason is None
    assert all(c.finish_reason is None for c in chunks[:-1]) and chunks[-1].finish_reason == "length"
    ids = [t for c in chunks for t in c.token_ids]
    lps = [x for c in chunks for x in c.logprobs]
    # the same seeded request through generate: same tokens, same logprobs
    assert ids == whole.token_ids and len(ids) == 30
    np.testing.assert_allclose(lps, whole.logprobs, atol=1e-5)
    assert [v for c in chunks for v in c.versions] == [0] * 30
