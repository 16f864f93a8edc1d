"""The KL penalty of the loss library (losses/kl.py) for GRPO and the REAL family, checked by hand."""
from __future__ import annotations

import math

import pytest
import torch

from real_megatron.losses import build_loss, policy_loss, zero_gradient_rollouts


def resolve_hparams(name, hparams):
    return build_loss(name, hparams).hp


def needs_reference_model(name, hparams):
    return build_loss(name, hparams).needs_reference

# one group: a positive rollout of 2 tokens, a negative one of 1 token (row 1 padded with a NaN)
LOGP = torch.tensor([[-1.0, -2.0], [-0.5, float("nan")]], dtype=torch.float64)
OLD = torch.tensor([[-1.2, -1.8], [-0.7, 0.0]], dtype=torch.float64)
REF = torch.tensor([[-1.1, -2.5], [-0.4, 0.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
REWARDS = torch.tensor([1.0, 0.0])
GROUPS = torch.tensor([0, 0])


def k3(d: float) -> float:
    return math.exp(d) - d - 1.0


def real_by_hand(tau: float = 0.5) -> float:
    s_pos = ((-1.0 + 1.2) + (-2.0 + 1.8)) / 2  # 0.0
    s_neg = -0.5 + 0.7  # 0.2
    return math.log(1 + math.exp(-s_pos / tau)) + math.log(1 + math.exp(s_neg / tau))  # one group: denominator 1


def loss_of(name, logp=LOGP, **kw):
    return policy_loss(name, logp=logp, old_logp=OLD, mask=MASK, rewards=REWARDS, group_ids=GROUPS, **kw)


@pytest.mark.parametrize("target, deltas", [
    ("ref", ([-1.1 + 1.0, -2.5 + 2.0], [-0.4 + 0.5])),  # target − logp per token
    ("old", ([-1.2 + 1.0, -1.8 + 2.0], [-0.7 + 0.5])),
])
def test_real_with_kl_by_hand(target, deltas):
    coef = 0.3
    pos, neg = deltas
    kl_pos = (k3(pos[0]) + k3(pos[1])) / 2  # per-rollout token mean
    kl_neg = k3(neg[0])
    kl = (kl_pos + kl_neg) / 2  # mean over the 2 rollouts
    logp = LOGP.clone().requires_grad_(True)
    loss, metrics = loss_of("real", logp, ref_logp=REF, kl_coef=coef, kl_target=target)
    assert math.isclose(loss.item(), real_by_hand() + coef * kl, rel_tol=1e-12)
    assert math.isclose(metrics["kl"], kl, rel_tol=1e-12)
    # the KL term's gradient per token: coef/N · 1/|o_k| · (1 − exp(target − logp))
    (with_kl,) = torch.autograd.grad(loss, logp)
    plain = LOGP.clone().requires_grad_(True)
    (without,) = torch.autograd.grad(loss_of("real", plain)[0], plain)
    expected = torch.tensor([[coef / 2 / 2 * (1 - math.exp(d)) for d in pos], [coef / 2 * (1 - math.exp(neg[0])), 0.0]],
                            dtype=torch.float64)
    assert torch.allclose((with_kl - without)[MASK], expected[MASK], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", ["real", "real_no_anchor", "real_bce"])
def test_real_family_kl_is_off_by_default_and_zero_coef_is_the_plain_loss(name):
    assert resolve_hparams(name, {})["kl_coef"] == 0.0 and resolve_hparams(name, {})["kl_target"] == "ref"
    plain, metrics = loss_of(name)
    assert "kl" not in metrics
    assert loss_of(name, ref_logp=REF, kl_coef=0.0)[0].item() == plain.item()
    assert loss_of(name, ref_logp=REF, kl_coef=0.5)[0].item() > plain.item()


def test_real_kl_to_the_reference_needs_ref_logp():
    with pytest.raises(ValueError, match=r"kl_target='ref' needs ref_logp"):
        loss_of("real", kl_coef=0.1)
    loss_of("real", kl_coef=0.1, kl_target="old")  # π_old needs nothing more


def test_grpo_kl_unchanged_and_old_target_is_pi_old():
    assert resolve_hparams("grpo", {})["kl_coef"] == 0.001
    adv = {"advantages": torch.tensor([1.0, -1.0], dtype=torch.float64)}
    # GRPO's historic contract: no ref_logp, no KL term
    assert "kl" not in loss_of("grpo", **adv)[1]
    with_ref, m = loss_of("grpo", ref_logp=REF, kl_coef=0.5, **adv)
    no_kl, _ = loss_of("grpo", kl_coef=0.0, **adv)
    kl = ((k3(-0.1) + k3(-0.5)) / 2 + k3(0.1)) / 2
    assert math.isclose(with_ref.item(), no_kl.item() + 0.5 * kl, rel_tol=1e-12) and math.isclose(m["kl"], kl)
    to_old, _ = loss_of("grpo", kl_coef=0.5, kl_target="old", **adv)
    same, _ = loss_of("grpo", ref_logp=OLD, kl_coef=0.5, **adv)
    assert to_old.item() == same.item() != no_kl.item()


@pytest.mark.parametrize("name, hparams, message", [
    ("real", {"kl_target": "reff"}, r"kl_target must be one of \('ref', 'old'\)"),
    ("grpo", {"kl_target": "π"}, r"kl_target must be one of"),
    ("real", {"kl_coef": -0.1}, r"kl_coef must be a finite number >= 0"),
    ("real_bce", {"kl_coef": float("nan")}, r"kl_coef must be a finite number >= 0"),
    ("dapo", {"kl_coef": 0.1}, r"unknown hyperparameter\(s\) \['kl_coef'\] for loss 'dapo'"),
    ("gspo", {"kl_target": "old"}, r"unknown hyperparameter\(s\) \['kl_target'\] for loss 'gspo'"),
])
def test_bad_kl_hyperparameters(name, hparams, message):
    with pytest.raises(ValueError, match=message):
        resolve_hparams(name, hparams)


def test_reference_model_only_when_the_kl_targets_it():
    assert needs_reference_model("grpo", {})
    assert not needs_reference_model("grpo", {"kl_coef": 0.0})
    assert not needs_reference_model("grpo", {"kl_target": "old"})
    assert not needs_reference_model("real", {})
    assert needs_reference_model("real_bce", {"kl_coef": 0.01})
    assert not needs_reference_model("dapo", {})


def test_no_rollout_is_skipped_when_its_kl_term_has_a_gradient():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0])  # group 0 all-correct: no REAL/advantage gradient without KL
    groups = torch.tensor([0, 0, 1, 1])
    for name in ("real", "real_bce", "grpo"):
        assert zero_gradient_rollouts(name, rewards=rewards, group_ids=groups, kl_coef=0.0).tolist() == \
            [True, True, False, False]
        assert not zero_gradient_rollouts(name, rewards=rewards, group_ids=groups, kl_coef=0.1, has_ref=True).any()
        assert not zero_gradient_rollouts(name, rewards=rewards, group_ids=groups, kl_coef=0.1, kl_target="old").any()
    # GRPO without reference log-probs has no KL term: the shortcut stays
    assert zero_gradient_rollouts("grpo", rewards=rewards, group_ids=groups).tolist() == [True, True, False, False]
