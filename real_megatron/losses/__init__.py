"""Policy losses for RLVR, in pure PyTorch (no Megatron import): REAL and its baselines.

A loss is an object (``base.PolicyLoss``), built once from its name and hyperparameters::

    from real_megatron.losses import build_loss
    loss = build_loss("real", {"tau": 0.5})            # the defaults are the paper's settings
    value, metrics = loss.loss(logp=logp, old_logp=old_logp, mask=mask, rewards=rewards, group_ids=group_ids)

The functional form by name (``dispatch.py``) builds the object and asks it::

    from real_megatron.losses import sequence_scores, policy_loss, LOSSES
    s = sequence_scores(logp, old_logp, mask)              # [N,T] x3 -> [N]
    loss, metrics = policy_loss(name, logp=logp, old_logp=old_logp, mask=mask,
                                rewards=rewards, group_ids=group_ids, **hparams)

``LOSSES`` maps each name to its class (``registry.py``); the formulas are in ``real.py`` (REAL,
REAL-no-anchor, REAL-BCE) and ``ppo.py`` (GRPO, DAPO, GSPO), the KL penalty in ``kl.py``, the SFT
warm-up's cross-entropy in ``sft.py``.

Splitting a batch (micro-batches, data-parallel ranks) exactly:

* PPO family: the loss is a sum of per-token/per-rollout terms, so pass the whole batch's
  ``advantages`` (``group_advantages``) and ``normalizer`` (``loss_normalizer``) to every part.
* REAL family: a group's loss couples its rollouts (it is not a sum over rollouts). If the
  part holds whole groups, pass ``normalizer=loss_normalizer(...)`` of the whole batch. If a
  group is split, compute ``w = score_weights(...)`` from *all* rollouts' scores under the
  current parameters; then ∂L/∂θ = Σ_k w_k ∂s̄_k/∂θ, i.e. each part back-propagates
  ``(w * sequence_scores(...)).sum()`` over its own rollouts.
"""
from real_megatron.losses.base import MicroBatch, PolicyLoss
from real_megatron.losses.common import sequence_scores
from real_megatron.losses.dispatch import (
    loss_normalizer,
    policy_loss,
    policy_loss_from_scores,
    score_weights,
    zero_gradient_rollouts,
)
from real_megatron.losses.ppo import group_advantages
from real_megatron.losses.registry import LOSSES, build_loss, check_loss_name
from real_megatron.losses.sft import SFTLoss

__all__ = [
    "LOSSES",
    "MicroBatch",
    "PolicyLoss",
    "SFTLoss",
    "build_loss",
    "check_loss_name",
    "group_advantages",
    "loss_normalizer",
    "policy_loss",
    "policy_loss_from_scores",
    "score_weights",
    "sequence_scores",
    "zero_gradient_rollouts",
]
