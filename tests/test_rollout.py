"""Multi-turn rollouts on real engines (transformers and vLLM) with a model that memorized a tool-use rollout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trio
import trio.testing

from actors.engines import EngineConfig, SamplingSpec, create_engine
from actors.rollout import RolloutSpec, run_trajectory
from tests._tiny import GOOD_CODE, PROBLEM, build_tool_use_model, scripted_turns
from training.chat import prompt_messages, split_turns

KINDS = ["hf", pytest.param("vllm", marks=pytest.mark.skipif(not __import__("importlib").util.find_spec("vllm"), reason="vLLM not installed"))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tool_use_model(tmp_path_factory.mktemp("tool_model"))


def recompute_logprobs(model_dir, ids: list[int]) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t >= 1 by one plain transformers forward (the learner's view)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return lp.numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_three_turn_rollout(kind, model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    turns, replies = scripted_turns()
    prompt_ids = tok.apply_chat_template(prompt_messages(PROBLEM), add_generation_prompt=True, tokenize=False)
    prompt_ids = tok.encode(prompt_ids, add_special_tokens=False)
    calls: list[tuple[str, int]] = []

    async def call_tool(code: str, turn: int) -> tuple[str, str]:
        calls.append((code, turn))
        await trio.sleep(0.01)
        return "ok", replies[0]

    async def main():
        cfg = EngineConfig(kind=kind, max_model_len=1024, max_running=8)
        async with create_engine(cfg, model_dir) as engine:
            spec = RolloutSpec("r0", prompt_ids, max_tokens=600, max_turns=5, temperature=0.01, seed=1)
            async with trio.open_nursery() as nursery:  # several rollouts share the engine
                results = {}

                async def one(i):
                    results[i] = await run_trajectory(engine, tok, RolloutSpec(f"r{i}", prompt_ids, 600, 5, 0.01, seed=i), call_tool)

                for i in range(3):
                    nursery.start_soon(one, i)
            traj = results[0]

            # a reload during the first tool call: tokens after it carry the new version, earlier ones keep theirs
            async def reload_on_first_call(code: str, turn: int) -> tuple[str, str]:
                if turn == 1:
                    await engine.reload_weights(str(model_dir), 7)
                return await call_tool(code, turn)

            spec = RolloutSpec("mid", prompt_ids, max_tokens=600, max_turns=5, temperature=0.01, seed=1)
            mid = await run_trajectory(engine, tok, spec, reload_on_first_call)
            # ignore_eos: exactly max_tokens, past the EOS the memorized rollout ends with
            plain = await engine.generate("plain", prompt_ids, SamplingSpec(max_tokens=300, temperature=0.01, seed=1, ignore_eos=True))
            return traj, mid, plain

    traj, mid, plain = trio.run(main)
    # the model wrote the scripted rollout: a good call, a malformed one, an answer
    assert traj.turns == 3 and traj.finish_reason == "stop", traj.response_text
    assert traj.tool_calls == [{"call_id": "r0/call1", "status": "ok"}, {"call_id": "r0/call2", "status": "parse_error"}]
    assert (GOOD_CODE, 1) in calls and all(turn == 1 for _, turn in calls)  # the malformed call never reached the tool
    msgs = split_turns(traj.response_text)
    assert [m["role"] for m in msgs] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert msgs[3]["content"] == replies[1] and "not valid JSON" in msgs[3]["content"]
    # masks, logprobs and versions line up; tool tokens are masked with logprob 0 / version -1
    n = len(traj.response_ids)
    assert traj.logprobs.shape == traj.loss_mask.shape == traj.versions.shape == (n,)
    tool = traj.loss_mask == 0
    assert tool.any() and (traj.loss_mask[~tool] == 1).all()
    assert (traj.logprobs[tool] == 0).all() and (traj.versions[tool] == -1).all() and (traj.versions[~tool] == 0).all()
    got = [*traj.prompt_ids.tolist(), *traj.response_ids.tolist()]
    # recorded logprobs == a plain forward over the same tokens (fp32, 1e-4)
    ref = recompute_logprobs(model_dir, got)[len(traj.prompt_ids) - 1 :]
    np.testing.assert_allclose(traj.logprobs[~tool], ref[~tool], atol=1e-4)
    # the reload happened in the first tool wait: turn 1 keeps version 0, every later model token has 7
    assert mid.turns == 3, mid.response_text
    first_tool = int(np.argmin(mid.loss_mask))  # the first tool-response token
    model = mid.loss_mask == 1
    assert (mid.versions[:first_tool] == 0).all() and first_tool > 0
    assert set(mid.versions[first_tool:][model[first_tool:]].tolist()) == {7}
    assert len(plain.token_ids) == 300 and tok.eos_token_id in plain.token_ids[:-1]
    # token ids == chat template applied to the messages (the template ends the last turn with "\n")
    rendered = tok.apply_chat_template(prompt_messages(PROBLEM) + msgs, tokenize=False)
    rendered = rendered.removesuffix("\n")
    expected = tok.encode(rendered, add_special_tokens=False)
    got = [*traj.prompt_ids.tolist(), *traj.response_ids.tolist()]
    assert got == expected



@pytest.mark.parametrize("kind", ["hf"])
def test_budget_is_shared_by_model_and_tool_tokens(kind, model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = tok.encode(tok.apply_chat_template(prompt_messages(PROBLEM), add_generation_prompt=True, tokenize=False), add_special_tokens=False)

    async def call_tool(code, turn):
        return "ok", "x" * 500  # a huge tool output eats the budget

    async def main():
        async with create_engine(EngineConfig(kind=kind, max_model_len=1024), model_dir) as engine:
            return await run_trajectory(engine, tok, RolloutSpec("b", prompt_ids, 60, 5, 0.05, seed=0), call_tool)

    traj = trio.run(main)
    assert traj.finish_reason == "length" and len(traj.response_ids) == 60
    assert traj.loss_mask[-1] == 0  # the budget ran out inside the tool response


def test_hf_continuation_prefills_only_the_new_tokens(model_dir):
    """The next turn of a rollout reuses the finished turn's KV: only the tool response is prefilled.

    And a stop string that is one added token (``</tool_call>``) stops by token id, a
    plain-text stop string still by text.
    """
    from transformers import AutoTokenizer

    from actors.engines.base import stop_token_ids
    from actors.engines.hf_engine import HFBackend
    from training.chat import TOOL_CALL_END, encode_prompt, tool_response_suffix

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert stop_token_ids(tok, (TOOL_CALL_END,)) == [tok.convert_tokens_to_ids(TOOL_CALL_END)]
    assert stop_token_ids(tok, ("compute",)) is None and stop_token_ids(tok, ()) is None
    backend = HFBackend(EngineConfig(kind="hf", max_model_len=1024, max_running=4), str(model_dir))
    seen: list[int] = []  # tokens fed to each model forward
    forward = backend._model.forward

    def spy(*args, input_ids=None, **kw):
        seen.append(input_ids.shape[1])
        return forward(*args, input_ids=input_ids, **kw)

    backend._model.forward = spy

    def run(request_id, ids, stop):
        backend.add(request_id, ids, SamplingSpec(max_tokens=200, temperature=0.01, seed=0, stop=stop))
        out: list[int] = []
        while True:
            for d in backend.step():
                out += d.token_ids
                if d.finish_reason is not None:
                    return out, d.finish_reason

    prompt = encode_prompt(tok, PROBLEM)
    turn1, reason = run("r", prompt, (TOOL_CALL_END,))
    assert reason == "stop" and tok.decode(turn1).endswith(TOOL_CALL_END)
    suffix = tok.encode(tool_response_suffix("42"), add_special_tokens=False)
    seen.clear()
    turn2, reason = run("r", [*prompt, *turn1, *suffix], (TOOL_CALL_END,))
    assert seen[0] == len(suffix) + 1  # the last sampled token of turn 1 and the tool response, not the history
    assert reason == "stop"
    text, reason = run("t", prompt, ("compute",))
    assert reason == "stop" and "compute" in tok.decode(text) and len(text) < len(turn1)


@pytest.mark.parametrize("policy", ["continue", "finish", "abort"])
def test_weights_policy_for_rollouts_in_flight(model_dir, policy):
    """New weights arrive while three rollouts wait on their first tool call, and a fourth
    rollout arrives right after: generator.on_weights decides what the three do; the fourth
    always starts on the new weights."""
    from transformers import AutoTokenizer

    from actors.generator import WeightsSwitch
    from training.chat import encode_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = encode_prompt(tok, PROBLEM)
    parked: set[str] = set()
    release = trio.Event()

    async def main():
        async with create_engine(EngineConfig(kind="hf", max_model_len=1024, max_running=8), model_dir) as engine:
            switch = WeightsSwitch(engine, policy)
            results: dict[str, object] = {}

            async def one(rid: str) -> None:
                async def tool(code: str, turn: int) -> tuple[str, str]:
                    parked.add(rid)
                    await release.wait()
                    return "ok", "42"

                spec = RolloutSpec(rid, prompt, 600, 5, temperature=0.01, seed=1)
                results[rid] = await switch.run(rid, lambda: run_trajectory(engine, tok, spec, tool))

            swapped_at_release = None
            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(one, f"old{i}")
                with trio.fail_after(60):
                    while len(parked) < 3:
                        await trio.sleep(0.01)
                switch.hold()  # what the generator does on receiving WeightsPublished
                nursery.start_soon(one, "new")
                swapped = trio.Event()

                async def swap() -> None:
                    assert await switch.swap(str(model_dir), 1)
                    swapped.set()

                nursery.start_soon(swap)
                with trio.move_on_after(0.5 if policy == "finish" else 30):
                    await swapped.wait()
                swapped_at_release = swapped.is_set()
                assert "new" not in parked  # it waits for the reload, whatever the policy
                release.set()
            assert engine.version == 1
            return results, swapped_at_release

    results, swapped_at_release = trio.run(main)
    # "finish" reloads only once the three have ended; the others at once
    assert swapped_at_release == (policy != "finish")

    def versions(rid: str) -> set[int]:
        t = results[rid]
        return set(t.versions[t.loss_mask == 1].tolist())

    assert versions("new") == {1} and results["new"].turns >= 2
    for rid in ("old0", "old1", "old2"):
        if policy == "abort":
            assert results[rid] is None
        else:
            assert results[rid].turns >= 2 and results[rid].finish_reason == "stop"
            assert versions(rid) == ({0, 1} if policy == "continue" else {0})


def test_tool_calls_in_flight_are_bounded_per_generator():
    """generator.max_tool_calls_in_flight = 2: with credit for 10 at the executor, the third
    call goes out only when one of the first two is answered."""
    import structlog

    from actors.config import Config
    from actors.generator import ToolDispatcher
    from protocol.events import ToolCallCompleted

    class Ctx:
        name = "generator-0"
        config = Config.model_validate({"generator": {"max_tool_calls_in_flight": 2}})
        log = structlog.get_logger()
        sent: list = []

        def emit(self, event, to=(), cause=None):
            self.sent.append(event)

    async def main():
        ctx = Ctx()
        tools = ToolDispatcher(ctx)
        tools.on_capacity("tool-0", 10)
        answers = {}

        async def call(i: int) -> None:
            answers[i] = await tools.call(f"r{i}", 1, "print(1)")

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(call, i)
            await trio.testing.wait_all_tasks_blocked()
            assert len(ctx.sent) == 2
            first = ctx.sent[0]
            tools.on_completed(ToolCallCompleted(call_id=first.call_id, rollout_id=first.rollout_id, status="ok", stdout="1\n",
                                                 stderr="", exit_code=0, signal=None, duration_s=0.01, text="1"))
            await trio.testing.wait_all_tasks_blocked()
            assert len(ctx.sent) == 3
            for ev in ctx.sent[1:]:
                tools.on_completed(ToolCallCompleted(call_id=ev.call_id, rollout_id=ev.rollout_id, status="ok", stdout="",
                                                     stderr="", exit_code=0, signal=None, duration_s=0.01, text="ok"))
        return answers

    assert sorted(trio.run(main).values()) == [("ok", "1"), ("ok", "ok"), ("ok", "ok")]
