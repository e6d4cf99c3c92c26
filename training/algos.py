"""GRPO-RoC losses and advantages as pure functions (DESIGN §6).

Tensors in, ``(loss, metrics)`` out; nothing here knows about DeepSpeed, events or
packing. Shapes use B = sequences (or packed rows), T = tokens per row, V = vocabulary.

Every reduction over tokens is a *token-mean over the whole batch*: a sum over unmasked
tokens divided by ``token_count``. ``token_count`` defaults to this call's ``mask.sum()``;
a caller that splits one batch into micro-batches (or data-parallel ranks) passes the
whole batch's count, so that the per-call losses and metrics simply add up to the batch
value. This is the one place the loss is aggregated.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch


def group_advantages(
    rewards: torch.Tensor, group_ids: Sequence[Hashable] | torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO outcome advantage: ``(r - mean_g) / (std_g + eps)`` within each group.

    Args:
        rewards: (B,) float rewards.
        group_ids: (B,) group labels (ints, strings, anything hashable, or a tensor);
            rollouts with equal labels form one group.
        eps: added to the std so an all-equal group gives 0 instead of 0/0.

    Returns:
        (B,) float advantages, same dtype as ``rewards``. ``std_g`` is the unbiased std
        (as ``torch.std``). A group of one rollout has no defined std; its advantage is 0.

    Raises:
        ValueError: ``rewards`` is not 1-D or ``group_ids`` has a different length.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    labels = group_ids.tolist() if isinstance(group_ids, torch.Tensor) else list(group_ids)
    if len(labels) != rewards.shape[0]:
        raise ValueError(f"group_ids has {len(labels)} entries but rewards has {rewards.shape[0]}")
    index: dict[Hashable, int] = {}
    inverse = torch.tensor([index.setdefault(g, len(index)) for g in labels], dtype=torch.long)  # (B,)
    n_groups = len(index)
    r = rewards.to(torch.float64)  # float64 sums: the mean/std of 0/1 rewards stay exact
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, r) / count
    centred = r - mean[inverse]  # (B,)
    sq = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, centred * centred)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))  # (G,) unbiased
    adv = centred / (std[inverse] + eps)
    adv = torch.where(count[inverse] > 1, adv, torch.zeros_like(adv))
    return adv.to(rewards.dtype)


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, *, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of each target token, and optionally each position's entropy.

    Args:
        logits: (B, T, V) scores; ``logits[b, t]`` is the distribution for ``targets[b, t]``
            (the caller shifts: the logits at position t-1 predict token t).
        targets: (B, T) int token ids.
        with_entropy: also return the entropy ``-sum_v p_v log p_v`` (for logging; no grad).

    Returns:
        ``(logprobs, entropy)``: (B, T) float32 ``log softmax(logits)[targets]``,
        differentiable w.r.t. ``logits``; (B, T) float32 entropy, or None.
    """
    # one float32 log_softmax serves both: the entropy then costs one exp and one sum
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    logprobs = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            p = logp.detach()
            entropy = -(p.exp() * p).sum(-1)
    return logprobs, entropy


def _token_mean(x: torch.Tensor, mask: torch.Tensor, token_count: float) -> torch.Tensor:
    return (x * mask).sum() / token_count


def _count(mask: torch.Tensor, token_count: float | None) -> float:
    n = float(mask.sum()) if token_count is None else float(token_count)
    return max(n, 1.0)  # an all-masked batch gives loss 0, not NaN


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_c: float = 3.0,
    entropy: torch.Tensor | None = None,
    token_count: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip policy loss with clip-higher and dual-clip, token-mean over the batch.

    Per token, with ratio ``r = exp(logprobs - old_logprobs)`` and advantage ``A``::

        l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))   # clip-higher (DAPO)
        l = min(l, -A clip_c)            if A < 0                 # dual-clip (Ye et al.)
        loss = sum(l * mask) / token_count

    No KL term and no entropy bonus (GRPO-RoC).

    Args:
        logprobs: (B, T) current policy logprobs of the taken tokens (carries the grad).
        old_logprobs: (B, T) behaviour-policy logprobs (no grad needed).
        advantages: (B,) one per sequence, or (B, T) per token.
        mask: (B, T) 1 on tokens that are trained on, 0 elsewhere (prompt, tool output).
        clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].
        clip_c: dual-clip bound (> 1) on the loss of negative-advantage tokens.
        entropy: optional (B, T) per-token entropy, only reported (``actor/entropy``).
        token_count: the number of unmasked tokens the mean is over; default ``mask.sum()``.
            Pass the whole batch's count when this call sees one micro-batch of it.

    Returns:
        ``(loss, metrics)``: scalar loss; metrics (floats, token-means with the same
        normaliser, so micro-batch values add up) ``loss/pg``, ``actor/clip_frac_low``
        (A < 0 and r < 1 - clip_low), ``actor/clip_frac_high`` (A > 0 and r > 1 +
        clip_high), ``actor/clip_frac_dual`` (A < 0 and the dual clip binds),
        ``actor/approx_kl`` (k3 estimator of KL(old || new): ``(r - 1) - log r``),
        ``actor/entropy`` when ``entropy`` is given.

    Raises:
        ValueError: mismatched shapes or ``clip_c <= 1``.
    """
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape or logprobs.dim() != 2:
        raise ValueError(
            f"logprobs, old_logprobs and mask must share one (B, T) shape, got {tuple(logprobs.shape)}, "
            f"{tuple(old_logprobs.shape)}, {tuple(mask.shape)}"
        )
    if clip_c <= 1.0:
        raise ValueError(f"clip_c must be > 1 for dual-clip, got {clip_c}")
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # (B, 1): broadcast over tokens
    advantages = advantages.expand_as(logprobs).to(logprobs.dtype)  # (B, T)
    mask = mask.to(logprobs.dtype)
    n = _count(mask, token_count)

    log_ratio = logprobs - old_logprobs.to(logprobs.dtype)  # (B, T)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    pg_dual = torch.minimum(pg, -advantages * clip_c)
    negative = advantages < 0
    per_token = torch.where(negative, pg_dual, pg)  # (B, T)
    loss = _token_mean(per_token, mask, n)

    with torch.no_grad():
        r = ratio.detach()
        low = (negative & (r < 1.0 - clip_low)).to(mask.dtype)
        high = ((advantages > 0) & (r > 1.0 + clip_high)).to(mask.dtype)
        dual = (negative & (pg.detach() > -advantages * clip_c)).to(mask.dtype)
        k3 = (r - 1.0) - log_ratio.detach()
        metrics = {
            "loss/pg": float(loss.detach()),
            "actor/clip_frac_low": float(_token_mean(low, mask, n)),
            "actor/clip_frac_high": float(_token_mean(high, mask, n)),
            "actor/clip_frac_dual": float(_token_mean(dual, mask, n)),
            "actor/approx_kl": float(_token_mean(k3, mask, n)),
        }
        if entropy is not None:
            metrics["actor/entropy"] = float(_token_mean(entropy.to(mask.dtype), mask, n))
    return loss, metrics


def sft_loss(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    entropy: torch.Tensor | None = None,
    token_count: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Supervised (negative log-likelihood) loss on masked targets, token-mean.

    Args:
        logprobs: (B, T) logprobs of the target tokens (carries the grad).
        mask: (B, T) 1 on target tokens (the assistant's), 0 on prompt/tool tokens.
        entropy: optional (B, T) per-token entropy, only reported.
        token_count: normaliser; default ``mask.sum()`` (see :func:`policy_loss`).

    Returns:
        ``(loss, metrics)``: ``loss = -sum(logprobs * mask) / token_count``; metrics
        ``loss/sft`` and ``actor/entropy`` when given.

    Raises:
        ValueError: ``logprobs`` and ``mask`` differ in shape.
    """
    if logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and mask {tuple(mask.shape)} must match")
    mask = mask.to(logprobs.dtype)
    n = _count(mask, token_count)
    loss = _token_mean(-logprobs, mask, n)
    metrics = {"loss/sft": float(loss.detach())}
    if entropy is not None:
        metrics["actor/entropy"] = float(_token_mean(entropy.to(mask.dtype).detach(), mask, n))
    return loss, metrics
