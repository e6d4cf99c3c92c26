"""CUDA checks, skipped by default (``-m gpu``): the learner on DeepSpeed and the transformers
engine on the GPU, with the device pinned, so a machine that silently fell back to the CPU
fails here instead of passing.

    python -m pytest -m gpu tests/test_gpu.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trio

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    from tests._tiny import build_tool_use_model

    return build_tool_use_model(tmp_path_factory.mktemp("tool_model"))


@pytest.mark.parametrize("zero_stage,dtype", [(2, "bf16"), (3, "fp32")])
def test_learner_trains_and_publishes_on_cuda(tool_model, tmp_path, zero_stage, dtype):
    import transformers

    from bench.learner import random_batch
    from training.learner import Learner, LearnerConfig, weights_sha256

    cfg = LearnerConfig(zero_stage=zero_stage, dtype=dtype, lr=1e-3, micro_batch_tokens=256)
    learner = Learner(cfg, tool_model, tmp_path / "work")
    assert learner.device.type == "cuda"
    assert next(learner.engine.module.parameters()).device.type == "cuda"
    vocab = transformers.AutoConfig.from_pretrained(tool_model).vocab_size
    b = random_batch(n_seqs=8, seq_len=64, vocab_size=vocab, step=0, kind="sft")
    losses = [learner.train_step(b)["loss"] for _ in range(4)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    path, sha = learner.publish(1, tmp_path / "pub")
    assert sha == weights_sha256(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)


def test_hf_engine_on_cuda_logprobs_match_the_learner_view(tool_model):
    """A rollout generated on the GPU: its recorded logprobs equal a float32 forward of the
    same tokens (the learner's recomputation) to 1e-4."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.engines import EngineConfig, create_engine
    from actors.rollout import RolloutSpec, run_trajectory
    from tests._tiny import PROBLEM
    from training.chat import encode_prompt

    tok = AutoTokenizer.from_pretrained(tool_model)
    prompt = encode_prompt(tok, PROBLEM)

    async def call_tool(code: str, turn: int) -> tuple[str, str]:
        return "ok", "42"

    async def main():
        cfg = EngineConfig(kind="hf", device="cuda", max_model_len=1024, max_running=4)
        async with create_engine(cfg, tool_model) as engine:
            return await run_trajectory(engine, tok, RolloutSpec("g0", prompt, 400, 4, temperature=1.0, seed=0), call_tool)

    traj = trio.run(main)
    assert traj.turns >= 2 and traj.tool_calls, traj.response_text
    ids = [*traj.prompt_ids.tolist(), *traj.response_ids.tolist()]
    torch.backends.cuda.matmul.allow_tf32 = False
    model = AutoModelForCausalLM.from_pretrained(tool_model, dtype=torch.float32).to("cuda").eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device="cuda")).logits[0].float()
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:], device="cuda")[:, None])[:, 0].cpu().numpy()
    mine = traj.loss_mask == 1
    want = lp[len(traj.prompt_ids) - 1:][mine]
    np.testing.assert_allclose(traj.logprobs[mine], want, atol=1e-4)
