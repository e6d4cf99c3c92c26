"""Inference engines for the generator: vLLM (in-process) and Hugging Face transformers.

``async with create_engine(cfg, model_dir) as engine`` gives a trio-native
:class:`Engine`; see :mod:`actors.engines.base` for the interface.
"""

from __future__ import annotations

from pathlib import Path

from actors.engines.base import Engine, EngineConfig, EngineError, SamplingSpec, TurnChunk, TurnOutput

__all__ = ["Engine", "EngineConfig", "EngineError", "SamplingSpec", "TurnChunk", "TurnOutput", "create_engine"]


def create_engine(cfg: EngineConfig, model_dir: str | Path) -> Engine:
    """An engine for the Hugging Face model directory ``model_dir`` (weights + tokenizer).

    kind "auto" picks vLLM when it is installed, else transformers. The model loads when
    the returned engine is entered (``async with``), on the engine's own thread.
    """
    model_dir = str(model_dir)
    if not Path(model_dir, "config.json").is_file():
        raise FileNotFoundError(f"model_dir {model_dir!r} has no config.json; pass a Hugging Face model directory")
    kind = cfg.kind
    if kind == "auto":
        from actors.engines.vllm_engine import vllm_available

        kind = "vllm" if vllm_available() else "hf"
    if kind == "vllm":
        from actors.engines.vllm_engine import VLLMBackend

        return Engine(lambda: VLLMBackend(cfg, model_dir), "vllm")
    from actors.engines.hf_engine import HFBackend

    return Engine(lambda: HFBackend(cfg, model_dir), "hf")
