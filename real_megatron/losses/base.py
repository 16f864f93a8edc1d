"""What every loss object answers: the one interface the Megatron glue and the trainer use (pure PyTorch).

A loss is built once from its name and the config's hyperparameters (``registry.build_loss``); the
object holds its resolved, checked hyperparameters (``hp``) and answers everything the glue needs, so
the glue never asks a loss its name:

* **shape of the loss** — ``sequence_level`` (it sees the rollouts only through their scores s̄, so
  under context parallelism every CP rank holds the same share), ``couples_groups`` (a group's loss is
  not a sum over its rollouts: the micro-batch planner keeps groups whole or uses the exact mode),
  ``needs_old_logp``, ``at_sampling_temperature``, ``diagnostics``, ``group_metrics``;
* **the mini-batch** — ``normalizer`` (the whole mini-batch's denominator), ``advantages``,
  ``zero_gradient_rollouts`` (rollouts with no loss and no gradient whatever their log-probs),
  ``score_weights`` / ``exact_loss_value`` (the exact mode, for ``couples_groups`` losses);
* **one micro-batch** — ``share(MicroBatch)`` (its share of the mini-batch loss) and ``kl_share``;
* **reporting** — ``token_metric_keys`` (per-micro-batch metrics the glue averages) and
  ``batch_metrics`` (the ``loss/*`` and REAL's ``diag/score_weight_*`` metrics of a mini-batch);
* **the KL penalty** — ``kl`` (a ``kl.KLPenalty`` or None) and ``needs_reference``;
* **the behaviour policy** — ``behaviour`` (a ``behaviour.BehaviourCorrection`` or None) and
  ``corrects_behaviour``: the micro-batch then carries log π_old − log μ, and the mini-batch methods of a
  group-coupled loss take each rollout's length-normalised ``behaviour_log_ratio`` ``[N]``.

Hyperparameters come in two kinds: ``DEFAULTS`` (the config may set them; the paper's values are
the defaults, written only here) and ``PER_CALL`` (``normalizer``, ``advantages``, ``num_groups``:
a part of a bigger batch passes the whole batch's value at call time; the config cannot set them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from real_megatron.losses.behaviour import BehaviourCorrection
from real_megatron.losses.common import Groups, check_rollout_tensors
from real_megatron.losses.kl import KLPenalty, kl_per_rollout


@dataclass
class MicroBatch:
    """One micro-batch's rollouts as a loss sees them (``n`` rollouts, right-padded rows of ``T`` tokens).

    ``logp`` carries the graph; under context parallelism the rows hold this rank's tokens only and
    ``lengths`` / ``scores`` are the CP-reduced whole-rollout values.
    """

    logp: torch.Tensor  # [n, T] log π_θ of each response token at the loss's temperature
    old_logp: torch.Tensor  # [n, T] log π_old
    mask: torch.Tensor  # [n, T] bool, response tokens (EOS included) present on this rank
    ref_logp: torch.Tensor | None  # [n, T] the reference model's, when the samples carry it
    lengths: torch.Tensor  # [n] float, each rollout's full response length
    scores: torch.Tensor  # [n] s̄ = Σ (logp − old_logp) / length (differentiable)
    rewards: torch.Tensor  # [n]
    group_ids: torch.Tensor  # [n]
    advantages: torch.Tensor | None  # [n], the whole mini-batch's (``PolicyLoss.advantages``)
    normalizer: float  # the whole mini-batch's denominator (``PolicyLoss.normalizer``)
    batch_rollouts: int  # N, the whole mini-batch's rollout count (the KL term's denominator)
    # the behaviour policy μ (``behaviour.py``), when the loss corrects for it: log π_old − log μ per response
    # token [n, T] (this rank's tokens) and its mean over each whole response [n] (CP-reduced)
    behaviour_token_log_ratio: torch.Tensor | None = None
    behaviour_log_ratio: torch.Tensor | None = None


class PolicyLoss:
    """Base class: a loss with its resolved hyperparameters ``hp`` (see the module docstring)."""

    DEFAULTS: ClassVar[dict] = {}
    PER_CALL: ClassVar[dict[str, str]] = {}  # call-time hyperparameter -> why the config cannot set it
    sequence_level: ClassVar[bool] = False
    couples_groups: ClassVar[bool] = False
    needs_old_logp: ClassVar[bool] = True
    at_sampling_temperature: ClassVar[bool] = True  # log-probs divide by the rollout temperature
    diagnostics: ClassVar[bool] = True  # the diag/ metrics (ratio bins, gradient domination) apply
    group_metrics: ClassVar[bool] = True  # labels and groups mean something (loss/* metrics)
    token_metric_keys: ClassVar[tuple[str, ...]] = ()
    kl_inside_loss: ClassVar[bool] = False  # the KL term is part of ``share`` (GRPO) rather than added to it

    def __init__(self, name: str, hparams: dict | None = None):
        hparams = dict(hparams or {})
        per_call = sorted(set(hparams) & set(self.PER_CALL))
        if per_call:
            key = per_call[0]
            raise ValueError(f"{key} cannot be set: {self.PER_CALL[key]}")
        unknown = sorted(set(hparams) - set(self.DEFAULTS))
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {unknown} for loss {name!r}; accepted: {sorted(self.DEFAULTS)}")
        self.name = name
        self.hp = {**self.DEFAULTS, **hparams}
        self._check()
        self.kl = KLPenalty(self.hp["kl_coef"], self.hp["kl_target"]) if "kl_coef" in self.DEFAULTS else None
        self.behaviour = (BehaviourCorrection(self.hp["behaviour_correction"], self.hp["behaviour_cap"])
                          if "behaviour_correction" in self.DEFAULTS else None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.hp})"

    def _check(self) -> None:
        """Raise ValueError naming a hyperparameter that cannot work."""

    # ------------------------------------------------------------------ labels and the KL term
    def positive(self, rewards: torch.Tensor) -> torch.Tensor:
        """``[N]`` bool: the rollouts labelled correct (reward ≥ ``positive_threshold``)."""
        return rewards >= self.hp.get("positive_threshold", 1.0)

    @property
    def corrects_behaviour(self) -> bool:
        """Whether the loss weights rollouts by π_old/μ (``behaviour.py``): it then needs the engine's log-probs."""
        return self.behaviour is not None and self.behaviour.active

    @property
    def needs_reference(self) -> bool:
        """Whether training needs the frozen reference model's log-probs (a KL term toward it)."""
        return self.kl is not None and self.kl.needs_reference

    def kl_applies(self, has_ref: bool) -> bool:
        """Whether the KL term is on for samples that carry (``has_ref``) or lack reference log-probs."""
        return self.kl is not None and self.kl.applies(has_ref)

    def kl_share(self, mb: MicroBatch):
        """``(share or None, each rollout's token-mean KL [n] or None)`` of the KL penalty for a micro-batch.

        The penalty ``kl_coef · (1/N) Σ_k mean_t kl_{k,t}`` is a sum of per-token terms over the whole
        mini-batch's N rollouts (``kl.py``), so shares add up over micro-batches, DP and CP ranks. A loss
        whose ``share`` already holds it (``kl_inside_loss``) returns only the values, for the metric."""
        if self.kl is None:
            return None, None
        target = self.kl.target_of(mb.old_logp, mb.ref_logp, strict=not self.kl_inside_loss, loss=self.name)
        if target is None:
            return None, None
        kl = kl_per_rollout(mb.logp, target, mb.mask, mb.lengths)
        if self.kl_inside_loss:
            return None, kl.detach()
        return self.kl.coef * kl.sum() / mb.batch_rollouts, kl.detach()

    # ------------------------------------------------------------------ the mini-batch
    def normalizer(self, lengths: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor) -> float:
        """The whole mini-batch's loss denominator; ``lengths`` ``[N]``: response lengths in tokens."""
        raise NotImplementedError

    def advantages(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor | None:
        """``[N]`` per-rollout advantages of the whole mini-batch, or None when the loss has none."""
        return None

    def zero_gradient_rollouts(self, rewards: torch.Tensor, group_ids: torch.Tensor, *, has_ref: bool = False,
                               advantages: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` bool: rollouts whose loss term and gradient are exactly zero *whatever their log-probs*.

        None at all when a KL term is on (every rollout's KL has a gradient). Leaving them out of the
        forward/backward changes neither the loss nor the gradient, as long as the denominator
        (``normalizer``) and ``advantages`` are those of the whole batch."""
        check_rollout_tensors(rewards.shape[0], rewards, group_ids)
        Groups.from_ids(group_ids)  # checks the ids
        if self.kl_applies(has_ref):
            return torch.zeros(rewards.shape[0], dtype=torch.bool)
        return self._without_gradient(rewards, group_ids, advantages)

    def _without_gradient(self, rewards, group_ids, advantages) -> torch.Tensor:
        return torch.zeros(rewards.shape[0], dtype=torch.bool)

    def score_weights(self, scores: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor,
                      behaviour_log_ratio: torch.Tensor | None = None):
        """``(w [N], loss, metrics)`` with ``w = ∂L/∂s̄`` over the whole mini-batch (``couples_groups`` losses)."""
        raise NotImplementedError(f"{self.name} is a sum over tokens/rollouts: it needs no exact mode")

    def exact_loss_value(self, scores: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor,
                         kl: torch.Tensor | None, behaviour_log_ratio: torch.Tensor | None = None) -> float:
        """The mini-batch loss at ``scores`` (plus the KL term from each rollout's token-mean ``kl`` [N])."""
        raise NotImplementedError(f"{self.name} is a sum over tokens/rollouts: it needs no exact mode")

    # ------------------------------------------------------------------ one micro-batch
    def share(self, mb: MicroBatch):
        """``(share, metrics)``: this micro-batch's share of the mini-batch loss (without an added KL term)."""
        raise NotImplementedError

    def batch_metrics(self, scores: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor,
                      ran: torch.Tensor, token_means: dict[str, float],
                      behaviour_log_ratio: torch.Tensor | None = None) -> dict[str, float]:
        """``loss/*`` (and REAL's ``diag/score_weight_*``) metrics of a whole mini-batch.

        ``scores`` ``[N]`` float64: each rollout's s̄ (0 for rollouts that did not run); ``ran`` ``[N]``
        bool; ``token_means``: the mean over micro-batches of each of ``token_metric_keys``."""
        return {}
