"""Transformers backend: continuous batching over a Hugging Face causal LM, for machines without vLLM.

Every step: requests that joined are prefilled one by one (each gets its own KV; a turn
that continues the same request id's finished turn reuses that turn's KV and prefills
only the new tokens, e.g. the tool response), then
all running requests decode ONE token together in a single batched forward over a
left-padded KV cache. The padded batch cache is rebuilt only when the set of running
requests changes (a request joins or leaves), not every step. Sampling draws from the
full distribution unless the request sets top-k/top-p (unlike ``generate``, whose
default top_k=50 would silently truncate it); the recorded logprob is that of the
sampled token under the model (``raw``) or under the processed distribution.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from actors.engines.base import Backend, Delta, EngineConfig, SamplingSpec, stop_token_ids


@dataclass(slots=True)
class _Req:
    request_id: str
    tokens: list[int]  # prompt + generated so far
    spec: SamplingSpec
    n_prompt: int
    generator: torch.Generator | None
    stop_ids: frozenset[int] | None  # the stop strings as token ids (see stop_token_ids), or None: match text
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (1, H, L, D); None: needs prefill
    new: list[int] = field(default_factory=list)  # generated this turn
    reused: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # KV of tokens[:n] kept from the previous turn

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.n_prompt


class HFBackend(Backend):
    """A transformers causal LM with batched decode; used only from the engine thread."""

    def __init__(self, cfg: EngineConfig, model_dir: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        self._cfg = cfg
        self._device = torch.device(device)
        self._model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self._device).eval()
        self._tok = AutoTokenizer.from_pretrained(model_dir)
        try:
            eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        except OSError:
            eos = None
        eos = eos if eos is not None else self._model.config.eos_token_id
        self._eos = set([eos] if isinstance(eos, int) else (eos or []))
        if self._tok.eos_token_id is not None:
            self._eos.add(self._tok.eos_token_id)
        torch.manual_seed(cfg.seed)
        self._waiting: list[_Req] = []
        self._rows: list[_Req] = []  # running, in batch order
        self._batch_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._dirty = True  # the padded batch cache must be rebuilt from per-row KV
        # Finished turns' KV by request id, for the next turn of the same rollout (LRU,
        # at most max_running entries; dropped by a weight reload).
        self._kept: OrderedDict[str, tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]] = OrderedDict()
        self._stop_ids: dict[tuple[str, ...], frozenset[int] | None] = {}

    # ---- requests ------------------------------------------------------------------------

    def add(self, request_id: str, prompt_ids: list[int], spec: SamplingSpec) -> None:
        if len(prompt_ids) >= self._cfg.max_model_len:
            raise ValueError(f"request {request_id!r}: prompt of {len(prompt_ids)} tokens >= max_model_len {self._cfg.max_model_len}")
        gen = None
        if spec.seed is not None:
            gen = torch.Generator(device=self._device)
            gen.manual_seed(spec.seed)
        if spec.stop not in self._stop_ids:
            ids = stop_token_ids(self._tok, spec.stop)
            self._stop_ids[spec.stop] = None if ids is None else frozenset(ids)
        r = _Req(request_id, list(prompt_ids), spec, len(prompt_ids), gen, self._stop_ids[spec.stop])
        kept = self._kept.pop(request_id, None)
        if kept is not None:
            tokens, kv = kept
            n = kv[0][0].shape[2]  # KV covers tokens[:n] (the last sampled token has none yet)
            if n < len(r.tokens) and r.tokens[:n] == tokens[:n]:
                r.reused = kv
        self._waiting.append(r)

    def abort(self, request_id: str) -> None:
        self._kept.pop(request_id, None)
        self._waiting = [r for r in self._waiting if r.request_id != request_id]
        self._drop([r for r in self._rows if r.request_id == request_id])

    def has_work(self) -> bool:
        return bool(self._waiting or self._rows)

    def capacity(self) -> dict[str, int]:
        used = sum(len(r.tokens) for r in self._rows)
        total = self._cfg.max_running * self._cfg.max_model_len
        return dict(
            total_tokens=total,
            free_tokens=max(0, total - used),
            total_slots=self._cfg.max_running,
            free_slots=max(0, self._cfg.max_running - len(self._rows) - len(self._waiting)),
            running=len(self._rows),
            waiting=len(self._waiting),
        )

    # ---- model step ----------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[Delta]:
        deltas: list[Delta] = []
        # Admit waiting requests up to max_running; prefill each (its prompt, or after a
        # reload everything but the pending token) and sample its first token.
        while self._waiting and len(self._rows) < self._cfg.max_running:
            r = self._waiting.pop(0)
            logits = self._prefill(r, r.tokens, r.reused)
            r.reused = None
            self._rows.append(r)
            self._dirty = True
            self._accept(r, logits, deltas)
        for r in [r for r in self._rows if r.kv is None]:  # KV dropped by a weight reload
            self._prefill(r, r.tokens[:-1])
            self._dirty = True
        if self._rows:
            logits = self._decode()  # (B, V)
            for i, r in enumerate(list(self._rows)):
                self._accept(r, logits[i], deltas)
        return deltas

    def _prefill(self, r: _Req, ids: list[int], past: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Compute the KV of ``ids`` (after ``past``, the KV of ``ids[:n]``, when given) into ``r.kv``;
        return the logits after the last id."""
        cache = None
        if past is not None:
            from transformers import DynamicCache

            cache = DynamicCache()
            for layer, (k, v) in enumerate(past):
                cache.update(k, v, layer)
            ids = ids[past[0][0].shape[2] :]
        x = torch.tensor([ids], device=self._device)
        out = self._model(input_ids=x, past_key_values=cache, use_cache=True)
        r.kv = [(k, v) for k, v in _cache_layers(out.past_key_values)]
        return out.logits[0, -1].float()

    def _decode(self) -> torch.Tensor:
        from transformers import DynamicCache

        rows = self._rows
        lens = [r.kv[0][0].shape[2] for r in rows]  # tokens in each row's KV
        t = max(lens)
        if self._dirty:
            self._batch_kv = []
            for layer in range(len(rows[0].kv)):
                ks = [_left_pad(r.kv[layer][0], t) for r in rows]
                vs = [_left_pad(r.kv[layer][1], t) for r in rows]
                self._batch_kv.append((torch.cat(ks), torch.cat(vs)))
            self._dirty = False
        cache = DynamicCache()
        for layer, (k, v) in enumerate(self._batch_kv):
            cache.update(k, v, layer)
        mask = torch.zeros(len(rows), t + 1, dtype=torch.long, device=self._device)
        for i, n in enumerate(lens):
            mask[i, t - n :] = 1
        x = torch.tensor([[r.tokens[-1]] for r in rows], device=self._device)
        pos = torch.tensor([[n] for n in lens], device=self._device)
        out = self._model(input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        new = list(_cache_layers(out.past_key_values))  # (B, H, t+1, D)
        self._batch_kv = new
        for i, r in enumerate(rows):  # each row's KV is a view of its unpadded part
            r.kv = [(k[i : i + 1, :, t - lens[i] :], v[i : i + 1, :, t - lens[i] :]) for k, v in new]
        return out.logits[:, -1].float()

    def _accept(self, r: _Req, logits: torch.Tensor, deltas: list[Delta]) -> None:
        """Sample the next token of ``r`` from ``logits`` (V,), record it, retire ``r`` if done."""
        spec = r.spec
        raw = torch.log_softmax(logits, -1)
        proc = logits / spec.temperature
        if spec.top_k > 0:
            kth = torch.topk(proc, min(spec.top_k, proc.numel())).values[-1]
            proc = proc.masked_fill(proc < kth, float("-inf"))
        if spec.top_p < 1.0:
            sorted_l, idx = torch.sort(proc, descending=True)
            cum = torch.softmax(sorted_l, -1).cumsum(-1)
            drop = cum - torch.softmax(sorted_l, -1) > spec.top_p  # keep the smallest set reaching top_p
            proc = proc.scatter(0, idx, sorted_l.masked_fill(drop, float("-inf")))
        logp = torch.log_softmax(proc, -1)
        tok = int(torch.multinomial(logp.exp(), 1, generator=r.generator))
        lp = float((raw if self._cfg.logprobs_mode == "raw" else logp)[tok])
        r.tokens.append(tok)
        r.new.append(tok)
        finish = None
        if tok in self._eos and not spec.ignore_eos:
            finish = "eos"
        elif spec.stop and (tok in r.stop_ids if r.stop_ids is not None else self._hit_stop(r)):
            finish = "stop"
        elif len(r.new) >= spec.max_tokens or len(r.tokens) >= self._cfg.max_model_len:
            finish = "length"
        deltas.append(Delta(r.request_id, [tok], [lp], finish))
        if finish is not None:
            self._drop([r])
            if finish == "stop" and self._cfg.prefix_caching:  # a tool call: the next turn extends this one
                self._keep(r)

    def _keep(self, r: _Req) -> None:
        """Keep a finished turn's KV (a compact copy, not a view of the batch cache) for its next turn."""
        self._kept[r.request_id] = (r.tokens, [(k.clone(), v.clone()) for k, v in r.kv])
        self._kept.move_to_end(r.request_id)
        while len(self._kept) > self._cfg.max_running:
            self._kept.popitem(last=False)

    def _hit_stop(self, r: _Req) -> bool:
        width = max(len(s) for s in r.spec.stop) + 2  # a stop string spans at most this many new tokens
        tail = self._tok.decode(r.new[-width:])
        return any(s in tail for s in r.spec.stop)

    def _drop(self, rows: list[_Req]) -> None:
        if rows:
            self._rows = [r for r in self._rows if r not in rows]
            self._dirty = True

    # ---- weights -------------------------------------------------------------------------

    def reload_weights(self, path: str) -> None:
        from safetensors.torch import load_file

        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {path!r}; save the model with save_pretrained")
        state = {}
        for f in files:
            state.update(load_file(str(f), device=str(self._device)))
        missing, unexpected = self._model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and self._model.config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"weights in {path!r} do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for r in self._rows:  # recompute running sequences' KV with the new weights
            r.kv = None
        for r in self._waiting:
            r.reused = None
        self._kept.clear()
        self._dirty = True


def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a transformers Cache, (B, H, T, D) each."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _left_pad(x: torch.Tensor, t: int) -> torch.Tensor:
    """Left-pad (1, H, L, D) with zeros to (1, H, t, D)."""
    pad = t - x.shape[2]
    return x if pad == 0 else torch.nn.functional.pad(x, (0, 0, pad, 0))
