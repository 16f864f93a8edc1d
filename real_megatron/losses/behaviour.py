"""Correcting for the behaviour policy μ — the engine that sampled — when it is not π_old (pure PyTorch).

Three policies are in play: μ (the rollout engine: its per-token log-probs come back with each response,
``Sample.engine_logp``), π_old (the trainer's weights when a rollout batch's updates start; the losses'
ratios and REAL's s̄ are measured against it) and π_θ. Rollouts generated ahead of training
(``train.max_staleness`` ≥ 1) or by an engine with other numerics (a bf16 server) have μ ≠ π_old.

The importance weight of rollout k is π_old(o_k)/μ(o_k). Its per-token factors ``w_t = exp(log π_old − log μ)``
are used by the token-level losses (GRPO, DAPO: decoupled PPO, each token's term times its w_t); the
sequence-level losses (GSPO and the REAL family) use the length-normalised weight
``w̄_k = exp((1/|o_k|) Σ_t (log π_old − log μ))``, the geometric mean of the token factors (its logarithm is
the analogue of s̄, which keeps the weight of a long response from exploding or vanishing).

``behaviour_correction`` (a hyperparameter of every policy loss, with ``behaviour_cap`` C > 1):

* ``"none"``: weights 1 — the loss as if μ = π_old;
* ``"truncate"``: ``min(w, C)`` (truncated importance sampling): the weight is bounded, never zero;
* ``"mask"``: ``w`` where ``1/C ≤ w ≤ C``, else 0 (the rollout or token is dropped from the loss: masked
  importance sampling).

Where the weight enters each loss, and what it does to REAL's bound, is derived in docs/method.md §6: for the
REAL family, ``log w̄_k`` is added to rollout k's logit inside its group's logsumexp (the group's sums are
Monte-Carlo estimates of expectations under π_old; weighting each term by w̄_k makes them estimates from
μ's samples), so each rollout's gradient weight is still a softmax probability over its group plus the anchor,
divided by τ: Prop. 5.1's bound 1/τ holds whatever the weights.
"""
from __future__ import annotations

import math

import torch

CORRECTIONS = ("none", "truncate", "mask")
# every policy loss takes these two hyperparameters, with these defaults (chosen by measurement: docs/results.md)
BEHAVIOUR_DEFAULTS = {"behaviour_correction": "none", "behaviour_cap": 2.0}


class BehaviourCorrection:
    """``kind`` ("none" | "truncate" | "mask") with the cap ``cap`` (> 1), checked on construction."""

    def __init__(self, kind: str, cap):
        if kind not in CORRECTIONS:
            raise ValueError(f"behaviour_correction must be one of {CORRECTIONS}, got {kind!r}")
        if isinstance(cap, bool) or not (isinstance(cap, (int, float)) and math.isfinite(cap) and cap > 1):
            raise ValueError(f"behaviour_cap must be a finite number > 1 (the weights are kept within [1/C, C] or "
                             f"truncated at C), got {cap!r}")
        self.kind = kind
        self.cap = float(cap)

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def log_weights(self, log_ratio: torch.Tensor) -> torch.Tensor:
        """``log w`` after the correction, from ``log_ratio`` = log π_old − log μ (per rollout, length-normalised,
        or per token); −inf where masked (a weight of 0), 0 everywhere with ``"none"``. Never carries a gradient."""
        log_ratio = log_ratio.detach()
        log_cap = math.log(self.cap)
        if self.kind == "none":
            return torch.zeros_like(log_ratio)
        if self.kind == "truncate":
            return log_ratio.clamp(max=log_cap)
        return torch.where(log_ratio.abs() <= log_cap, log_ratio, torch.full_like(log_ratio, -math.inf))

    def weights(self, log_ratio: torch.Tensor) -> torch.Tensor:
        """``w`` after the correction (``exp(log_weights)``): 0 where masked, 1 with ``"none"``."""
        return torch.exp(self.log_weights(log_ratio))

    def stats(self, log_ratio: torch.Tensor) -> dict[str, float]:
        """The raw weights' mean and max and the fraction the correction changed (truncated or masked), over the
        given entries (rollouts or response tokens, 1-D)."""
        raw = torch.exp(log_ratio.detach().double().reshape(-1))
        if raw.numel() == 0:
            return {}
        changed = (raw > self.cap) if self.kind == "truncate" else (raw > self.cap) | (raw < 1 / self.cap)
        return {"weight_mean": float(raw.mean()), "weight_max": float(raw.max()),
                "corrected_fraction": float(changed.double().mean()) if self.active else 0.0}


def behaviour_kl(old_logp: torch.Tensor, behaviour_logp: torch.Tensor) -> float:
    """Mean over response tokens (1-D tensors of log π_old and log μ) of the k3 estimate of KL(μ ‖ π_old) from μ's
    samples: ``r − 1 − log r`` with ``r = π_old/μ`` (≥ 0; 0 iff the engine samples from π_old exactly)."""
    d = (old_logp.double() - behaviour_logp.double()).reshape(-1)
    return float((torch.exp(d) - 1.0 - d).mean()) if d.numel() else 0.0
