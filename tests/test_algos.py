"""training.algos against plain-Python loop versions of the same math."""

from __future__ import annotations

import math

import pytest
import torch

from training.algos import group_advantages, policy_loss, sft_loss, token_logprobs


def loop_group_advantages(rewards: list[float], groups: list, eps: float) -> list[float]:
    out = []
    for r, g in zip(rewards, groups):
        members = [x for x, h in zip(rewards, groups) if h == g]
        if len(members) < 2:
            out.append(0.0)
            continue
        mean = sum(members) / len(members)
        std = math.sqrt(sum((x - mean) ** 2 for x in members) / (len(members) - 1))
        out.append((r - mean) / (std + eps))
    return out


def loop_policy_loss(lp, old, adv, mask, cl, ch, c):
    """Token by token, with the clipping cases written out as branches."""
    total = n = low = high = dual = kl = 0.0
    for b in range(len(lp)):
        for t in range(len(lp[b])):
            if not mask[b][t]:
                continue
            a = adv[b]
            r = math.exp(lp[b][t] - old[b][t])
            clipped = min(max(r, 1 - cl), 1 + ch)
            loss = max(-a * r, -a * clipped)
            if a < 0:
                if loss > -a * c:
                    dual += 1
                    loss = -a * c
                if r < 1 - cl:
                    low += 1
            if a > 0 and r > 1 + ch:
                high += 1
            kl += (r - 1) - math.log(r)
            total += loss
            n += 1
    return total / n, low / n, high / n, dual / n, kl / n


def test_group_advantages_matches_loop():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (23,), generator=g).double()
    rewards[5] = 0.5
    groups = ["a", "b", "c", "a", "b", "c", "d"] * 3 + ["e", "a"]  # "e" is a singleton
    adv = group_advantages(rewards, groups, eps=1e-6)
    want = loop_group_advantages(rewards.tolist(), groups, 1e-6)
    assert adv.tolist() == pytest.approx(want, abs=1e-9)
    assert adv[groups.index("e")] == 0


def test_group_advantages_std_is_torch_unbiased_std():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    adv = group_advantages(r, torch.zeros(5, dtype=torch.long))
    assert torch.allclose(adv, (r - r.mean()) / (r.std() + 1e-6))


def test_group_advantages_all_equal_group_is_zero():
    assert group_advantages(torch.ones(4), [7, 7, 7, 7]).abs().max() == 0


def test_group_advantages_rejects_mismatch():
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.ones(3), [1, 2])


def _random_case(seed: int, b: int = 5, t: int = 9):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    # ratios spread over [e^-1.5, e^1.5] so every clip region is hit
    old = lp + (torch.rand(b, t, generator=g, dtype=torch.float64) - 0.5) * 3
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    adv[0] = 0.0
    mask = (torch.rand(b, t, generator=g) > 0.3).double()
    return lp, old, adv, mask


@pytest.mark.parametrize("seed", range(5))
def test_policy_loss_matches_loop(seed):
    lp, old, adv, mask = _random_case(seed)
    loss, m = policy_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.28, clip_c=3.0)
    want = loop_policy_loss(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, 3.0)
    got = (float(loss), m["actor/clip_frac_low"], m["actor/clip_frac_high"], m["actor/clip_frac_dual"], m["actor/approx_kl"])
    assert got == pytest.approx(want, abs=1e-12)
    assert m["loss/pg"] == pytest.approx(want[0])


def test_policy_loss_hits_every_clip_region():
    lp, old, adv, mask = _random_case(0, b=40, t=20)
    _, m = policy_loss(lp, old, adv, mask)
    assert m["actor/clip_frac_low"] > 0 and m["actor/clip_frac_high"] > 0 and m["actor/clip_frac_dual"] > 0


def test_policy_loss_gradient_matches_loop_gradient():
    lp, old, adv, mask = _random_case(1)
    lp = lp.clone().requires_grad_(True)
    loss, _ = policy_loss(lp, old, adv, mask)
    loss.backward()
    # gradient of the loop version by central differences on a few entries
    h = 1e-6
    for b, t in [(1, 0), (2, 3), (3, 5), (4, 8)]:
        plus, minus = lp.detach().clone(), lp.detach().clone()
        plus[b, t] += h
        minus[b, t] -= h
        f = lambda x: loop_policy_loss(x.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, 3.0)[0]
        assert float(lp.grad[b, t]) == pytest.approx((f(plus) - f(minus)) / (2 * h), abs=1e-6)


def test_policy_loss_token_count_splits_batch_into_additive_parts():
    lp, old, adv, mask = _random_case(2, b=6)
    whole, mw = policy_loss(lp, old, adv, mask)
    n = float(mask.sum())
    a, ma = policy_loss(lp[:2], old[:2], adv[:2], mask[:2], token_count=n)
    b, mb = policy_loss(lp[2:], old[2:], adv[2:], mask[2:], token_count=n)
    assert float(a + b) == pytest.approx(float(whole), abs=1e-12)
    for k in mw:
        assert ma[k] + mb[k] == pytest.approx(mw[k], abs=1e-12)


def test_policy_loss_per_token_advantages_equal_per_sequence():
    lp, old, adv, mask = _random_case(3)
    l1, _ = policy_loss(lp, old, adv, mask)
    l2, _ = policy_loss(lp, old, adv[:, None].expand_as(lp), mask)
    assert float(l1) == float(l2)


def test_policy_loss_on_policy_is_minus_mean_advantage():
    lp, _, adv, mask = _random_case(4)
    loss, m = policy_loss(lp, lp, adv, mask)
    want = -sum(adv[b] * mask[b].sum() for b in range(len(adv))) / mask.sum()
    assert float(loss) == pytest.approx(float(want), abs=1e-12)
    assert m["actor/approx_kl"] == 0 and m["actor/clip_frac_low"] == 0


def test_policy_loss_entropy_is_reported_not_trained():
    lp, old, adv, mask = _random_case(5)
    ent = torch.rand_like(lp)
    l1, m = policy_loss(lp, old, adv, mask, entropy=ent)
    l2, _ = policy_loss(lp, old, adv, mask)
    assert float(l1) == float(l2)
    assert m["actor/entropy"] == pytest.approx(float((ent * mask).sum() / mask.sum()))


def test_policy_loss_rejects_bad_inputs():
    lp, old, adv, mask = _random_case(6)
    with pytest.raises(ValueError, match="clip_c"):
        policy_loss(lp, old, adv, mask, clip_c=1.0)
    with pytest.raises(ValueError, match="shape"):
        policy_loss(lp, old[:, :-1], adv, mask)


def test_sft_loss_matches_loop():
    lp, _, _, mask = _random_case(7)
    loss, m = sft_loss(lp, mask)
    total = n = 0.0
    for b in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if mask[b, t]:
                total -= float(lp[b, t])
                n += 1
    assert float(loss) == pytest.approx(total / n, abs=1e-12)
    assert m["loss/sft"] == pytest.approx(total / n)


def test_token_logprobs_and_entropy_match_loop():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 4, 11, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 11, (2, 4), generator=g)
    lp, ent = token_logprobs(logits, targets, with_entropy=True)
    assert token_logprobs(logits, targets)[1] is None
    for b in range(2):
        for t in range(4):
            z = [math.exp(x) for x in logits[b, t].tolist()]
            s = sum(z)
            assert float(lp[b, t]) == pytest.approx(math.log(z[targets[b, t]] / s), abs=1e-5)
            assert float(ent[b, t]) == pytest.approx(-sum(p / s * math.log(p / s) for p in z), abs=1e-5)
