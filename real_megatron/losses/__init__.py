"""Policy losses for RLVR, in pure PyTorch (no Megatron import): REAL and its baselines.

Public API::

    from real_megatron.losses import sequence_scores, policy_loss, LOSSES
    s = sequence_scores(logp, old_logp, mask)              # [N,T] x3 -> [N]
    loss, metrics = policy_loss(name, logp=logp, old_logp=old_logp, mask=mask,
                                rewards=rewards, group_ids=group_ids, **hparams)

``LOSSES`` maps each name to its hyperparameters and their defaults (``hparams.py``, with
``check_loss_name`` and ``resolve_hparams``); the entry points are in ``dispatch.py``; the formulas
in ``real.py`` (REAL, REAL-no-anchor, REAL-BCE) and ``ppo.py`` (GRPO, DAPO, GSPO).

Splitting a batch (micro-batches, data-parallel ranks) exactly:

* PPO family: the loss is a sum of per-token/per-rollout terms, so pass the whole batch's
  ``advantages`` (``group_advantages``) and ``normalizer`` (``loss_normalizer``) to every part.
* REAL family: a group's loss couples its rollouts (it is not a sum over rollouts). If the
  part holds whole groups, pass ``normalizer=loss_normalizer(...)`` of the whole batch. If a
  group is split, compute ``w = score_weights(...)`` from *all* rollouts' scores under the
  current parameters; then ∂L/∂θ = Σ_k w_k ∂s̄_k/∂θ, i.e. each part back-propagates
  ``(w * sequence_scores(...)).sum()`` over its own rollouts.
"""
from real_megatron.losses.common import sequence_scores
from real_megatron.losses.dispatch import (
    loss_normalizer,
    policy_loss,
    policy_loss_from_scores,
    score_weights,
    zero_gradient_rollouts,
)
from real_megatron.losses.hparams import LOSSES, SEQUENCE_LEVEL, check_loss_name, resolve_hparams
from real_megatron.losses.ppo import PPO_FAMILY, group_advantages
from real_megatron.losses.real import REAL_FAMILY

__all__ = [
    "LOSSES",
    "policy_loss",
    "sequence_scores",
    "score_weights",
    "group_advantages",
    "loss_normalizer",
    "policy_loss_from_scores",
    "check_loss_name",
    "resolve_hparams",
    "SEQUENCE_LEVEL",
    "REAL_FAMILY",
    "PPO_FAMILY",
    "zero_gradient_rollouts",
]
