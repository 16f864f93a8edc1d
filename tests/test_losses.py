"""Loss library: REAL family against its formulas and Prop. 5.1; PPO family on hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from real_megatron.losses import (
    LOSSES,
    group_advantages,
    loss_normalizer,
    policy_loss,
    score_weights,
    sequence_scores,
)

DT = torch.float64


def random_batch(seed=0, sizes=(4, 3, 5, 1, 2), T=7, scale=1.0):
    """Rollouts for groups of the given sizes, random lengths, random 0/1 rewards (each size>1 group mixed)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    group_ids = torch.cat([torch.full((s,), 100 + 7 * i) for i, s in enumerate(sizes)])
    rewards = torch.zeros(n, dtype=DT)
    start = 0
    for s in sizes:
        r = torch.randint(0, 2, (s,), generator=g).to(DT)
        if s > 1:
            r[0], r[1] = 1.0, 0.0  # make sure the group is mixed
        rewards[start:start + s] = r[torch.randperm(s, generator=g)]
        start += s
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(DT)
    logp = (-torch.rand(n, T, generator=g, dtype=DT) * 3 * scale).requires_grad_(True)
    old_logp = -torch.rand(n, T, generator=g, dtype=DT) * 3 * scale
    return logp, old_logp, mask, rewards, group_ids


def grad_wrt_scores(name, logp, old_logp, mask, rewards, group_ids, **hp):
    """∂L/∂s̄_k recovered from autograd through policy_loss: ∂L/∂logp_{k,t} = (1/|o_k|) ∂L/∂s̄_k."""
    loss, metrics = policy_loss(name, logp=logp, old_logp=old_logp, mask=mask, rewards=rewards,
                                group_ids=group_ids, **hp)
    (grad,) = torch.autograd.grad(loss, logp)
    lengths = mask.sum(1)
    per_token = grad * lengths[:, None]
    # every response token of a rollout carries the same weight (the 1/|o| spreading)
    first = per_token[:, :1].expand_as(per_token)
    assert torch.allclose(per_token[mask.bool()], first[mask.bool()], rtol=1e-10, atol=1e-12)
    return loss, per_token[:, 0], metrics


def closed_form_weight(s, positive, group_ids, tau):
    """Prop. 5.1 / Eq. 9 signed: ∂L_g/∂s̄_k = ∓(1/τ) / (1 + C± exp(±s̄_k/τ))."""
    w = torch.zeros_like(s)
    for k in range(len(s)):
        same = (group_ids == group_ids[k])
        if positive[same].all() or (~positive[same]).all():
            continue
        others = same.clone()
        others[k] = False
        if positive[k]:
            c = 1 + torch.exp(-s[others & positive] / tau).sum()
            w[k] = -(1 / tau) / (1 + c * torch.exp(s[k] / tau))
        else:
            c = 1 + torch.exp(s[others & ~positive] / tau).sum()
            w[k] = (1 / tau) / (1 + c * torch.exp(-s[k] / tau))
    return w


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau", [0.5, 1.0, 0.1])
def test_real_gradient_matches_prop_5_1(seed, tau):
    logp, old, mask, rewards, gids = random_batch(seed)
    loss, w, metrics = grad_wrt_scores("real", logp, old, mask, rewards, gids, tau=tau)
    s = sequence_scores(logp, old, mask).detach()
    num_groups = len(torch.unique(gids))
    expected = closed_form_weight(s, rewards >= 1, gids, tau) / num_groups
    assert torch.allclose(w, expected, rtol=1e-10, atol=1e-14)
    assert (expected != 0).sum() >= 10  # the check really compared non-trivial weights
    assert metrics["max_score_weight"] <= 1 / tau
    assert math.isclose(metrics["max_score_weight"], float((expected * num_groups).abs().max()), rel_tol=1e-9)


def test_real_weight_at_zero_scores_is_one_over_tau_one_plus_count():
    # 3 positives and 5 negatives, s̄ = 0: positives get (1/τ)/(1+P), negatives (1/τ)/(1+N)
    n = 8
    logp = torch.zeros(n, 2, dtype=DT, requires_grad=True)
    rewards = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0], dtype=DT)
    _, w, _ = grad_wrt_scores("real", logp, torch.zeros(n, 2, dtype=DT), torch.ones(n, 2, dtype=DT), rewards,
                              torch.zeros(n, dtype=torch.long), tau=0.5)
    assert torch.allclose(w[:3], torch.full((3,), -2.0 / 4, dtype=DT))
    assert torch.allclose(w[3:], torch.full((5,), 2.0 / 6, dtype=DT))


@pytest.mark.parametrize("positive", [True, False])
def test_real_weight_bounded_and_monotonic(positive):
    tau = 0.5
    grid = torch.linspace(-30, 30, 241, dtype=DT)
    weights = []
    for value in grid:
        # rollout 0 is swept; the group has 3 more positives and 3 more negatives at random scores
        s = torch.tensor([value, 0.3, -0.2, 0.1, 0.4, -0.5, 0.0], dtype=DT)
        rewards = torch.tensor([1 if positive else 0, 1, 1, 1, 0, 0, 0], dtype=DT)
        logp = s[:, None].clone().requires_grad_(True)
        _, w, _ = grad_wrt_scores("real", logp, torch.zeros_like(logp), torch.ones_like(logp), rewards,
                                  torch.zeros(7, dtype=torch.long), tau=tau)
        weights.append(w[0].abs())
    weights = torch.stack(weights)
    assert (weights <= 1 / tau).all() and (weights >= 0).all()
    diffs = weights[1:] - weights[:-1]
    if positive:  # decreasing in s̄: confident positives get less
        assert (diffs <= 1e-15).all() and weights[0] > 0.99 / tau
    else:  # increasing in s̄: confident negatives get more, but never above 1/τ
        assert (diffs >= -1e-15).all() and weights[-1] > 0.99 / tau


def direct_real_loss(s, positive, gids, tau, variant):
    """The per-group formulas written out with Python floats, summed over mixed groups / all groups."""
    total = 0.0
    ids = sorted(set(gids.tolist()))
    for gid in ids:
        members = [k for k in range(len(s)) if gids[k] == gid]
        pos = [float(s[k]) for k in members if positive[k]]
        neg = [float(s[k].detach()) for k in members if not positive[k]]
        if not pos or not neg:
            continue
        if variant == "real":
            total += math.log(1 + sum(math.exp(-x / tau) for x in pos)) + math.log(1 + sum(math.exp(x / tau) for x in neg))
        elif variant == "real_no_anchor":
            total += math.log(1 + sum(math.exp((j - i) / tau) for j in neg for i in pos))
    return total / len(ids)


@pytest.mark.parametrize("variant", ["real", "real_no_anchor"])
@pytest.mark.parametrize("seed", [0, 3])
def test_real_losses_equal_direct_formula(variant, seed):
    logp, old, mask, rewards, gids = random_batch(seed)
    loss, _ = policy_loss(variant, logp=logp, old_logp=old, mask=mask, rewards=rewards, group_ids=gids, tau=0.7)
    s = sequence_scores(logp, old, mask)
    assert math.isclose(loss.item(), direct_real_loss(s, rewards >= 1, gids, 0.7, variant), rel_tol=1e-12)


def test_real_bce_equals_torch_bce():
    logp, old, mask, rewards, gids = random_batch(5)
    tau = 0.5
    loss, _ = policy_loss("real_bce", logp=logp, old_logp=old, mask=mask, rewards=rewards, group_ids=gids, tau=tau)
    s = sequence_scores(logp, old, mask)
    expected = 0.0
    for gid in torch.unique(gids):
        sel = gids == gid
        labels = (rewards[sel] >= 1).to(DT)
        if 0 < labels.sum() < sel.sum():
            expected = expected + F.binary_cross_entropy_with_logits(s[sel] / tau, labels, reduction="sum")
    expected = expected / len(torch.unique(gids))
    assert torch.allclose(loss, expected, rtol=1e-12)
    g1 = torch.autograd.grad(loss, logp, retain_graph=True)[0]
    g2 = torch.autograd.grad(expected, logp)[0]
    assert torch.allclose(g1, g2, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", list(LOSSES))
def test_invariant_to_row_permutation_and_group_relabelling(name):
    logp, old, mask, rewards, gids = random_batch(7)
    loss, _ = policy_loss(name, logp=logp, old_logp=old, mask=mask, rewards=rewards, group_ids=gids)
    (grad,) = torch.autograd.grad(loss, logp)
    perm = torch.randperm(len(rewards), generator=torch.Generator().manual_seed(1))
    logp2 = logp.detach()[perm].clone().requires_grad_(True)
    relabelled = (gids * -13 + 5)[perm]  # any injective relabelling, negative ids included
    loss2, _ = policy_loss(name, logp=logp2, old_logp=old[perm], mask=mask[perm], rewards=rewards[perm],
                           group_ids=relabelled)
    (grad2,) = torch.autograd.grad(loss2, logp2)
    assert torch.allclose(loss, loss2, rtol=1e-12)
    assert torch.allclose(grad[perm], grad2, rtol=1e-10, atol=1e-14)
    assert grad.abs().sum() > 0


def test_group_norm_and_uniform_groups():
    # group 0 mixed, group 1 all correct, group 2 all wrong, group 3 a single wrong rollout
    s = torch.tensor([0.2, -0.1, 0.3, 0.5, -0.4, 0.1, 0.05], dtype=DT)
    rewards = torch.tensor([1, 0, 1, 1, 0, 0, 0], dtype=DT)
    gids = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    tau = 0.5
    logp = s[:, None].clone().requires_grad_(True)
    kw = dict(logp=logp, old_logp=torch.zeros_like(logp), mask=torch.ones_like(logp), rewards=rewards, group_ids=gids)
    mixed = math.log(1 + math.exp(-0.2 / tau)) + math.log(1 + math.exp(-0.1 / tau))
    loss, m = policy_loss("real", **kw)
    assert math.isclose(loss.item(), mixed / 4, rel_tol=1e-12)
    assert m["contributing_group_fraction"] == 0.25 and m["solved_all_groups"] == 1 and m["solved_none_groups"] == 2
    loss, _ = policy_loss("real", group_norm="contributing_groups", **kw)
    assert math.isclose(loss.item(), mixed, rel_tol=1e-12)
    # uniform groups contribute through the anchor: positives pushed above 0, negatives below
    uniform = (math.log(1 + math.exp(-0.3 / tau) + math.exp(-0.5 / tau))
               + math.log(1 + math.exp(-0.4 / tau) + math.exp(0.1 / tau)) + math.log(1 + math.exp(0.05 / tau)))
    loss, m = policy_loss("real", include_uniform_groups=True, **kw)
    assert math.isclose(loss.item(), (mixed + uniform) / 4, rel_tol=1e-12)
    assert m["contributing_group_fraction"] == 1.0
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[2, 0] < 0 and grad[3, 0] < 0 and grad[4, 0] > 0 and grad[6, 0] > 0
    # the no-anchor variant has no pairs in a uniform group: include_uniform_groups changes nothing
    a, _ = policy_loss("real_no_anchor", **kw)
    b, _ = policy_loss("real_no_anchor", include_uniform_groups=True, **kw)
    assert math.isclose(a.item(), b.item(), rel_tol=1e-12)


@pytest.mark.parametrize("name", list(LOSSES))
def test_all_uniform_batch_gives_zero_loss_with_a_graph(name):
    n = 6
    logp = torch.randn(n, 3, dtype=DT).requires_grad_(True)
    rewards = torch.tensor([1, 1, 1, 0, 0, 0], dtype=DT)  # group 0 all correct, group 1 all wrong
    loss, metrics = policy_loss(name, logp=logp, old_logp=logp.detach() + 0.1, mask=torch.ones(n, 3, dtype=DT),
                                rewards=rewards, group_ids=torch.tensor([0, 0, 0, 1, 1, 1]))
    assert loss.item() == 0.0
    loss.backward()
    assert logp.grad is not None and torch.count_nonzero(logp.grad) == 0
    assert metrics["solved_all_groups"] == 1 and metrics["solved_none_groups"] == 1


@pytest.mark.parametrize("name", ["real", "real_no_anchor", "real_bce"])
@pytest.mark.parametrize("magnitude", [1e3, 5e3])
def test_extreme_scores_are_finite(name, magnitude):
    # |s̄|/τ up to 1e4 (τ = 0.5): confident and anti-confident positives and negatives
    s = torch.tensor([magnitude, -magnitude, magnitude, -magnitude, 0.0], dtype=DT)
    for dtype in (torch.float64, torch.float32):
        logp = s.to(dtype)[:, None].clone().requires_grad_(True)
        loss, metrics = policy_loss(name, logp=logp, old_logp=torch.zeros_like(logp), mask=torch.ones_like(logp),
                                    rewards=torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0]), group_ids=torch.zeros(5, dtype=torch.long))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logp.grad).all(), (name, dtype)
        assert loss.item() > 1000  # the anti-confident members dominate: a real, large loss
        assert metrics["max_score_weight"] <= 2.0 + 1e-6


def test_group_of_one_rollout():
    logp = torch.tensor([[-0.5, -0.2]], dtype=DT, requires_grad=True)
    kw = dict(logp=logp, old_logp=torch.zeros_like(logp), mask=torch.ones_like(logp),
              rewards=torch.tensor([1.0], dtype=DT), group_ids=torch.tensor([3]))
    loss, metrics = policy_loss("real", **kw)
    assert loss.item() == 0.0 and metrics["contributing_group_fraction"] == 0.0
    loss, _ = policy_loss("real", include_uniform_groups=True, **kw)
    assert math.isclose(loss.item(), math.log(1 + math.exp(0.35 / 0.5)), rel_tol=1e-12)
    assert group_advantages(torch.tensor([1.0]), torch.tensor([3])).item() == 0.0


# ---------------------------------------------------------------------------------- PPO family


def one_token_rows(log_ratios, dtype=DT):
    logp = torch.tensor(log_ratios, dtype=dtype).reshape(len(log_ratios), -1).requires_grad_(True)
    return logp, torch.zeros_like(logp), torch.ones_like(logp)


def test_group_advantages_hand_computed():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), torch.tensor([0, 0, 0, 1, 1, 2]))
    std0 = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # unbiased
    expected = [(2 / 3) / std0, -(1 / 3) / std0, -(1 / 3) / std0, 0.0, 0.0, 0.0]
    assert torch.allclose(adv, torch.tensor(expected), rtol=1e-5)


def test_grpo_hand_computed_clipped_and_unclipped():
    # rollout 0 (A=+1): ρ = 1.1 (inside) and 1.5 (clipped at 1.2: zero gradient)
    # rollout 1 (A=−1): ρ = 0.5 (clipped at 0.8: zero gradient) and 1.5 (unclipped, −min(−1.5, −1.2) = 1.5)
    logp, old, mask = one_token_rows([[math.log(1.1), math.log(1.5)], [math.log(0.5), math.log(1.5)]])
    loss, m = policy_loss("grpo", logp=logp, old_logp=old, mask=mask, rewards=torch.tensor([1.0, 0.0]),
                          group_ids=torch.tensor([0, 0]), advantages=torch.tensor([1.0, -1.0]))
    expected = ((-1.1 - 1.2) / 2 + (0.8 + 1.5) / 2) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-12)
    loss.backward()
    # d/dlogp of −ρA = −Aρ, times 1/|o| = 1/2, times 1/N = 1/2
    assert torch.allclose(logp.grad, torch.tensor([[-1.1 / 4, 0.0], [0.0, 1.5 / 4]], dtype=DT), rtol=1e-12)
    assert m["clip_fraction"] == 0.5 and m["clip_fraction_high"] == 0.25 and m["clip_fraction_low"] == 0.25


def test_grpo_kl_term_k3():
    logp, old, mask = one_token_rows([[0.0, 0.0]])
    ref = torch.tensor([[0.3, -0.2]], dtype=DT)
    loss, m = policy_loss("grpo", logp=logp, old_logp=old, mask=mask, rewards=torch.tensor([1.0]),
                          group_ids=torch.tensor([0]), advantages=torch.tensor([0.0]), ref_logp=ref, kl_coef=0.5)
    k3 = [math.exp(d) - d - 1 for d in (0.3, -0.2)]
    assert math.isclose(loss.item(), 0.5 * sum(k3) / 2, rel_tol=1e-12)
    assert math.isclose(m["kl"], sum(k3) / 2, rel_tol=1e-6)


def test_dapo_clip_higher_and_token_mean():
    # ρ = 1.25 with A = +1 is clipped by GRPO's 1.2 but not by DAPO's 1.28
    logp, old, mask = one_token_rows([[math.log(1.25), 0.0, 0.0], [math.log(0.7), 0.0, 0.0]])
    mask[0, 2] = 0  # rollout 0 has 2 tokens, rollout 1 has 3: token-mean over 5 tokens
    adv = torch.tensor([1.0, -1.0])
    kw = dict(logp=logp, old_logp=old, mask=mask, rewards=torch.tensor([1.0, 0.0]), group_ids=torch.tensor([0, 0]),
              advantages=adv)
    loss, m = policy_loss("dapo", **kw)
    # tokens: −1.25, −1, then A=−1: ρ=0.7 → −min(−0.7, −0.8) = 0.8 (clipped), 1, 1
    assert math.isclose(loss.item(), (-1.25 - 1 + 0.8 + 1 + 1) / 5, rel_tol=1e-12)
    (g,) = torch.autograd.grad(loss, logp)
    assert math.isclose(g[0, 0].item(), -1.25 / 5, rel_tol=1e-12) and g[1, 0].item() == 0.0
    assert m["clip_fraction"] == pytest.approx(1 / 5)
    grpo, _ = policy_loss("grpo", **kw)
    (g2,) = torch.autograd.grad(grpo, logp)
    assert g2[0, 0].item() == 0.0  # GRPO clips the same token


def test_gspo_sequence_ratio_clip():
    # rollout 0: s̄ = 1e-4 → ratio inside [1−3e-4, 1+4e-4]; rollout 1: s̄ = 1e-3 with A>0 → clipped
    logp, old, mask = one_token_rows([[1e-4, 1e-4], [1e-3, 1e-3], [-1e-3, -1e-3]])
    adv = torch.tensor([2.0, 1.0, -1.0])
    loss, m = policy_loss("gspo", logp=logp, old_logp=old, mask=mask, rewards=torch.tensor([1.0, 1.0, 0.0]),
                          group_ids=torch.tensor([0, 0, 0]), advantages=adv)
    r0, r2 = math.exp(1e-4), math.exp(-1e-3)
    expected = (-2 * r0 - 1 * (1 + 4e-4) + max(r2, 1 - 3e-4)) / 3
    assert math.isclose(loss.item(), expected, rel_tol=1e-12)
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(g[0], torch.full((2,), -2 * r0 / 2 / 3, dtype=DT), rtol=1e-12)
    assert (g[1] == 0).all() and (g[2] == 0).all()  # rollout 2: A<0, ratio below 1−3e-4 → clipped
    assert m["clip_fraction"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------- exact splits


@pytest.mark.parametrize("name", ["real", "real_no_anchor", "real_bce"])
def test_score_weights_reproduce_full_gradient_when_groups_are_split(name):
    logp, old, mask, rewards, gids = random_batch(11)
    loss, _ = policy_loss(name, logp=logp, old_logp=old, mask=mask, rewards=rewards, group_ids=gids)
    (full,) = torch.autograd.grad(loss, logp)
    with torch.no_grad():
        scores = sequence_scores(logp, old, mask)
    w, loss_w, _ = score_weights(name, scores=scores, rewards=rewards, group_ids=gids)
    assert math.isclose(loss_w.item(), loss.item(), rel_tol=1e-12)
    split = torch.zeros_like(logp)
    for part in (slice(0, 2), slice(2, 9), slice(9, None)):  # cuts through groups
        s_part = sequence_scores(logp[part], old[part], mask[part])
        (g,) = torch.autograd.grad((w[part] * s_part).sum(), logp)
        split += g
    assert torch.allclose(split, full, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", list(LOSSES))
def test_whole_group_parts_with_normalizer_sum_to_full_loss(name):
    logp, old, mask, rewards, gids = random_batch(12)
    loss, _ = policy_loss(name, logp=logp, old_logp=old, mask=mask, rewards=rewards, group_ids=gids)
    norm = loss_normalizer(name, mask=mask, rewards=rewards, group_ids=gids)
    extra = {}
    if name in ("grpo", "dapo", "gspo"):
        extra["advantages"] = group_advantages(rewards, gids)
    total = 0.0
    for part in (slice(0, 7), slice(7, None)):  # sizes (4, 3 | 5, 1, 2): whole groups
        part_extra = {k: v[part] for k, v in extra.items()}
        part_loss, _ = policy_loss(name, logp=logp[part], old_logp=old[part], mask=mask[part], rewards=rewards[part],
                                   group_ids=gids[part], normalizer=norm, **part_extra)
        total = total + part_loss
    assert torch.allclose(total, loss, rtol=1e-12)


# ---------------------------------------------------------------------------------- bad input


def base_kwargs(n=3, t=4):
    return dict(logp=torch.zeros(n, t), old_logp=torch.zeros(n, t), mask=torch.ones(n, t),
                rewards=torch.tensor([1.0, 0.0, 1.0]), group_ids=torch.tensor([0, 0, 1]))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda kw: kw.update(name="ppo"), "unknown loss 'ppo'"),
        (lambda kw: kw.update(taux=0.5), "unknown hyperparameter"),
        (lambda kw: kw.update(tau=0.0), "tau must be a positive"),
        (lambda kw: kw.update(tau=float("nan")), "tau must be a positive"),
        (lambda kw: kw.update(group_norm="tokens"), "group_norm must be one of"),
        (lambda kw: kw["mask"].__setitem__(1, 0.0), r"rows \[1\] have no response tokens"),
        (lambda kw: kw.update(old_logp=torch.zeros(3, 5)), "shape mismatch"),
        (lambda kw: kw.update(logp=torch.zeros(3)), "must be 2-D"),
        (lambda kw: kw["logp"].__setitem__((2, 1), float("nan")), r"logp is not finite .* \[row 2, col 1\]"),
        (lambda kw: kw["rewards"].__setitem__(0, float("nan")), r"rewards\[0\] is not finite"),
        (lambda kw: kw.update(rewards=torch.zeros(2)), "rewards must be a tensor of shape"),
        (lambda kw: kw.update(group_ids=torch.tensor([0.0, 0.0, 1.0])), "group_ids must be an integer"),
        (lambda kw: kw.update(normalizer=0), "normalizer must be a positive"),
    ],
)
def test_bad_input_raises_clear_value_error(change, message):
    kw = base_kwargs()
    kw["name"] = "real"
    change(kw)
    name = kw.pop("name")
    with pytest.raises(ValueError, match=message):
        policy_loss(name, **kw)


def test_padding_values_are_ignored():
    kw = base_kwargs()
    kw["mask"][0, 2:] = 0
    clean, _ = policy_loss("real", **kw)
    kw["logp"] = kw["logp"].clone()
    kw["logp"][0, 2:] = float("nan")  # garbage in padded positions must not leak
    dirty, _ = policy_loss("real", **kw)
    assert torch.equal(clean, dirty)


def test_ppo_hparam_validation():
    with pytest.raises(ValueError, match="clip_high must be"):
        policy_loss("dapo", clip_high=-0.1, **base_kwargs())
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        policy_loss("dapo", tau=0.5, **base_kwargs())
    with pytest.raises(ValueError, match="score_weights is for"):
        score_weights("grpo", scores=torch.zeros(3), rewards=torch.zeros(3), group_ids=torch.zeros(3, dtype=torch.long))


def test_loss_names_and_hyperparameters_have_one_registry():
    """Config validation, the trainer and the launcher build the loss object here; its defaults live in its class."""
    from real_megatron.losses import SFTLoss, build_loss, check_loss_name

    assert sorted(LOSSES) == ["dapo", "grpo", "gspo", "real", "real_bce", "real_no_anchor"]
    for name in LOSSES:
        check_loss_name(name)
        loss = build_loss(name, {})
        assert loss.name == name and loss.hp.keys() == LOSSES[name].DEFAULTS.keys()
    with pytest.raises(ValueError, match=r"unknown loss 'sft'; choose one of \['dapo', 'grpo', 'gspo', 'real', "
                                         r"'real_bce', 'real_no_anchor'\]$"):
        check_loss_name("sft")  # the warm-up's loss is built by the SFT loop itself, never named in a config
    assert SFTLoss().hp == {} and not SFTLoss().needs_old_logp
    assert build_loss("grpo", {"clip_eps": 0.1}).hp["clip_low"] == 0.1  # clip bounds default to clip_eps
    with pytest.raises(ValueError, match="unknown loss 'ppo'"):
        build_loss("ppo", {})
    # what a config cannot set says why (a part of a bigger batch passes the whole batch's value per call)
    with pytest.raises(ValueError, match="normalizer cannot be set: the trainer sets the loss denominator"):
        build_loss("real", {"normalizer": 3})
    with pytest.raises(ValueError, match="advantages cannot be set: the trainer computes"):
        build_loss("dapo", {"advantages": [1.0]})


def test_the_loss_answers_what_the_glue_asks():
    """Each property the Megatron glue branches on, per loss (the glue itself never asks a name)."""
    from real_megatron.losses import SFTLoss, build_loss

    table = {name: (build_loss(name).sequence_level, build_loss(name).couples_groups, build_loss(name).needs_reference)
             for name in LOSSES}
    assert table == {"real": (True, True, False), "real_no_anchor": (True, True, False),
                     "real_bce": (True, True, False), "grpo": (False, False, True), "dapo": (False, False, False),
                     "gspo": (True, False, False)}
    sft = SFTLoss()
    assert (sft.sequence_level, sft.couples_groups, sft.at_sampling_temperature, sft.diagnostics) == (False,) * 4
    assert build_loss("real", {"kl_coef": 0.1}).needs_reference
    assert not build_loss("real", {"kl_coef": 0.1, "kl_target": "old"}).needs_reference
