"""Behaviour-policy correction (losses/behaviour.py) in every loss, against float64 formulas written here."""
from __future__ import annotations

import math

import pytest
import torch

from real_megatron.losses import LOSSES, MicroBatch, build_loss, policy_loss
from real_megatron.losses.behaviour import BehaviourCorrection, behaviour_kl

DT = torch.float64
TAU = 0.5


def batch(seed=0, sizes=(4, 3, 5, 2), T=6, spread=0.4):
    """Random rollouts: log π_θ (grad), log π_old, log μ (the engine's: old plus noise), mask, rewards, groups."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    gids = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    rewards = torch.zeros(n, dtype=DT)
    start = 0
    for s in sizes:  # every group mixed
        rewards[start] = 1.0
        rewards[start + 1:start + s] = torch.randint(0, 2, (s - 1,), generator=g).to(DT)
        rewards[start + s - 1] = 0.0
        start += s
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).to(DT)
    old = -torch.rand(n, T, generator=g, dtype=DT) * 2
    logp = (old + 0.3 * torch.randn(n, T, generator=g, dtype=DT)).requires_grad_(True)
    mu = old + spread * torch.randn(n, T, generator=g, dtype=DT)
    return logp, old, mu, mask, rewards, gids


def seq_mean(x, mask):
    return (x * mask).sum(1) / mask.sum(1)


def corrected(log_ratio, kind, cap=2.0):
    w = torch.exp(log_ratio)
    if kind == "none":
        return torch.ones_like(w)
    if kind == "truncate":
        return w.clamp(max=cap)
    return torch.where((w >= 1 / cap) & (w <= cap), w, torch.zeros_like(w))


def real_by_formula(name, s, w, positive, gids, tau=TAU):
    """Σ_groups L_g / #groups with rollout k's term weighted by w_k (REAL, no anchor: the pairs; BCE: the terms)."""
    total = 0.0
    for g in torch.unique(gids):
        sel = gids == g
        pos = [(s[k], w[k]) for k in sel.nonzero().flatten().tolist() if positive[k]]
        neg = [(s[k], w[k]) for k in sel.nonzero().flatten().tolist() if not positive[k]]
        if not pos or not neg:
            continue
        if name == "real":
            total = total + torch.log(1 + sum(wi * torch.exp(-si / tau) for si, wi in pos)) \
                + torch.log(1 + sum(wj * torch.exp(sj / tau) for sj, wj in neg))
        elif name == "real_no_anchor":
            total = total + torch.log(1 + sum(wj * wi * torch.exp((sj - si) / tau) for sj, wj in neg for si, wi in pos))
        else:
            total = total + sum(wi * torch.nn.functional.softplus(-si / tau) for si, wi in pos) \
                + sum(wj * torch.nn.functional.softplus(sj / tau) for sj, wj in neg)
    return total / len(torch.unique(gids))


@pytest.mark.parametrize("kind", ["none", "truncate", "mask"])
@pytest.mark.parametrize("name", ["real", "real_no_anchor", "real_bce"])
def test_real_family_with_behaviour_weights_equals_the_formula(name, kind):
    logp, old, mu, mask, rewards, gids = batch(1)
    loss, _ = policy_loss(name, logp=logp, old_logp=old, mask=mask, rewards=rewards, group_ids=gids,
                          behaviour_logp=mu, behaviour_correction=kind, behaviour_cap=1.3)
    s = seq_mean(logp - old, mask)
    w = corrected(seq_mean(old - mu, mask), kind, cap=1.3)
    assert kind == "none" or (w != 1).any()  # the weights act in this batch
    if kind == "mask":
        assert (w == 0).any() and (w > 0).any()
    expected = real_by_formula(name, s, w, rewards >= 1, gids)
    assert torch.allclose(loss, expected, rtol=1e-12), (loss.item(), expected.item())
    g1 = torch.autograd.grad(loss, logp, retain_graph=True)[0]
    g2 = torch.autograd.grad(expected, logp)[0]
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", list(LOSSES))
def test_weights_of_one_change_nothing(name):
    """μ = π_old (an engine that samples the trainer's own policy exactly): every correction is the plain loss."""
    logp, old, _, mask, rewards, gids = batch(2)
    plain, _ = policy_loss(name, logp=logp, old_logp=old, mask=mask, rewards=rewards, group_ids=gids)
    for kind in ("truncate", "mask"):
        same, _ = policy_loss(name, logp=logp, old_logp=old, mask=mask, rewards=rewards, group_ids=gids,
                              behaviour_logp=old.clone(), behaviour_correction=kind)
        assert torch.equal(same, plain), (name, kind)


def test_prop_5_1_bound_holds_with_any_weights():
    """|∂L_g/∂s̄_k| = (1/τ)·(w_k e^{∓s̄_k/τ})/(1 + Σ_i w_i e^{∓s̄_i/τ}) ≤ 1/τ: a softmax probability over the group
    and the anchor, whatever the weights (even the huge ones a cap would cut)."""
    loss = build_loss("real", {"behaviour_correction": "truncate", "behaviour_cap": 1e6})
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        n = 8
        scores = 3 * torch.randn(n, generator=g, dtype=DT)
        rewards = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1], dtype=DT)
        log_ratio = 6 * torch.randn(n, generator=g, dtype=DT)
        w, _, metrics = loss.score_weights(scores, rewards, torch.zeros(n, dtype=torch.long), log_ratio)
        assert w.abs().max() <= 1 / TAU + 1e-12  # one group: the denominator is 1
        assert metrics["max_score_weight"] <= 1 / TAU + 1e-12


def test_grpo_weights_each_tokens_clipped_term_and_not_its_kl():
    logp, old, mu, mask, rewards, gids = batch(3)
    ref = old + 0.1
    kw = dict(logp=logp, old_logp=old, mask=mask, rewards=rewards, group_ids=gids, ref_logp=ref, kl_coef=0.05)
    loss, _ = policy_loss("grpo", behaviour_logp=mu, behaviour_correction="truncate", behaviour_cap=1.5, **kw)
    w = corrected(old - mu, "truncate", 1.5)
    # by hand: GRPO's per-token clipped objective times w_t, plus the unweighted k3 KL, per-rollout token mean
    from real_megatron.losses import group_advantages

    adv = group_advantages(rewards, gids)[:, None]
    ratio = torch.exp(logp - old)
    term = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv) * w
    d = ref - logp
    term = term + 0.05 * (torch.exp(d) - d - 1)
    expected = ((term * mask).sum(1) / mask.sum(1)).mean()
    assert torch.allclose(loss, expected, rtol=1e-12)


def test_masked_tokens_and_rollouts_get_no_gradient():
    logp, old, mu, mask, rewards, gids = batch(4, spread=1.0)
    for name in ("dapo", "gspo", "real"):
        loss, _ = policy_loss(name, logp=logp, old_logp=old, mask=mask, rewards=rewards, group_ids=gids,
                              behaviour_logp=mu, behaviour_correction="mask", behaviour_cap=1.5)
        (grad,) = torch.autograd.grad(loss, logp)
        if name == "dapo":
            dropped = ((old - mu).abs() > math.log(1.5)) & (mask > 0)
        else:
            dropped = (seq_mean(old - mu, mask).abs() > math.log(1.5))[:, None] & (mask > 0)
        assert dropped.any() and (~dropped & (mask > 0)).any()
        assert (grad[dropped] == 0).all(), name
        assert (grad[~dropped & (mask > 0)] != 0).any(), name


def test_a_fully_masked_side_of_a_group_leaves_no_pairs_and_no_nan():
    s = torch.tensor([0.3, -0.2, 0.1], dtype=DT, requires_grad=True)
    rewards = torch.tensor([1.0, 0.0, 0.0], dtype=DT)
    gids = torch.zeros(3, dtype=torch.long)
    for name in ("real_no_anchor", "real", "real_bce"):
        loss = build_loss(name, {"behaviour_correction": "mask"})
        value, _ = loss.loss_from_scores(s, rewards, gids, behaviour_log_ratio=torch.tensor([5.0, 0.0, 0.0], dtype=DT))
        (grad,) = torch.autograd.grad(value, s)
        assert torch.isfinite(value) and torch.isfinite(grad).all(), name
        assert grad[0] == 0  # the masked positive
        if name == "real_no_anchor":
            assert value == 0  # no positive left: no (negative, positive) pair


def test_split_batches_with_behaviour_weights_are_exact():
    """Whole-group parts with the batch's normalizer, and the exact mode's w = ∂L/∂s̄, give the full loss's gradient."""
    logp, old, mu, mask, rewards, gids = batch(6)
    hp = {"behaviour_correction": "truncate", "behaviour_cap": 1.3}
    loss = build_loss("real", hp)
    full, _ = loss.loss(logp=logp, old_logp=old, mask=mask, rewards=rewards, group_ids=gids, behaviour_logp=mu)
    (want,) = torch.autograd.grad(full, logp)
    ratio = seq_mean(old - mu, mask)
    scores = seq_mean(logp - old, mask)
    w, value, _ = loss.score_weights(scores.detach(), rewards, gids, ratio)
    assert torch.allclose(value, full.detach(), rtol=1e-12)
    (got,) = torch.autograd.grad((w * scores).sum(), logp)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)
    # the micro-batch form (what the hook calls) on whole groups, with the batch's normalizer
    norm = loss.normalizer(mask.sum(1), rewards, gids)
    total = 0
    for part in (slice(0, 7), slice(7, None)):
        mb = MicroBatch(logp=logp[part], old_logp=old[part], mask=mask[part].bool(), ref_logp=None,
                        lengths=mask[part].sum(1), scores=scores[part], rewards=rewards[part], group_ids=gids[part],
                        advantages=None, normalizer=norm, batch_rollouts=len(rewards),
                        behaviour_token_log_ratio=(old - mu)[part] * mask[part], behaviour_log_ratio=ratio[part])
        share, _ = loss.share(mb)
        total = total + share
    assert torch.allclose(total, full, rtol=1e-12)


def test_bad_corrections_are_refused_naming_the_hyperparameter():
    with pytest.raises(ValueError, match=r"behaviour_correction must be one of \('none', 'truncate', 'mask'\)"):
        build_loss("real", {"behaviour_correction": "tis"})
    with pytest.raises(ValueError, match="behaviour_cap must be a finite number > 1"):
        build_loss("grpo", {"behaviour_cap": 1.0})
    assert not build_loss("dapo").corrects_behaviour and build_loss("dapo", {"behaviour_correction": "mask"}) \
        .corrects_behaviour


def test_correction_statistics_and_behaviour_kl():
    c = BehaviourCorrection("truncate", 2.0)
    stats = c.stats(torch.log(torch.tensor([0.25, 1.0, 3.0, 4.0], dtype=DT)))
    assert stats == pytest.approx({"weight_mean": 2.0625, "weight_max": 4.0, "corrected_fraction": 0.5}, rel=1e-12)
    assert BehaviourCorrection("mask", 2.0).stats(torch.log(torch.tensor([0.25, 1.0, 3.0, 4.0], dtype=DT)))[
        "corrected_fraction"] == 0.75
    old = torch.tensor([-1.0, -2.0])
    assert behaviour_kl(old, old) == 0.0
    d = torch.tensor([0.3, -0.5], dtype=DT)  # log π_old − log μ
    assert math.isclose(behaviour_kl(old.double(), old.double() - d), float((torch.exp(d) - 1 - d).mean()))
