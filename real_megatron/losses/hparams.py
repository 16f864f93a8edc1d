"""The loss registry: each policy loss's name and hyperparameters with their defaults, and their checks.

The one place a loss name or hyperparameter is known: config validation, the Megatron loss hook
and the launcher all ask ``check_loss_name`` / ``resolve_hparams``.
"""
from __future__ import annotations

import math

from real_megatron.losses.kl import KL_LOSSES, KL_TARGETS
from real_megatron.losses.ppo import PPO_FAMILY
from real_megatron.losses.real import GROUP_NORMS, REAL_FAMILY

# losses that depend on the rollouts only through their scores s̄ (policy_loss_from_scores works)
SEQUENCE_LEVEL = REAL_FAMILY + ("gspo",)

_REAL_DEFAULTS = {
    "tau": 0.5,
    "positive_threshold": 1.0,
    "include_uniform_groups": False,
    "group_norm": "all_groups",
    "num_groups": None,  # denominator override for "all_groups" (a part of a bigger batch)
    "normalizer": None,  # denominator override, any group_norm
    "kl_coef": 0.0,  # Table 4's KL ablation: L_REAL + kl_coef · KL (losses/kl.py)
    "kl_target": "ref",  # "ref": the frozen initial model; "old": π_old
}
_PPO_COMMON = {"advantages": None, "adv_eps": 1e-6, "normalizer": None, "positive_threshold": 1.0}

# name -> hyperparameters accepted by policy_loss, with their defaults (the paper's settings)
LOSSES: dict[str, dict] = {
    "real": dict(_REAL_DEFAULTS),
    "real_no_anchor": dict(_REAL_DEFAULTS),
    "real_bce": dict(_REAL_DEFAULTS),
    "grpo": {**_PPO_COMMON, "clip_eps": 0.2, "clip_low": None, "clip_high": None, "kl_coef": 0.001,
             "kl_target": "ref"},
    "dapo": {**_PPO_COMMON, "clip_low": 0.2, "clip_high": 0.28},
    "gspo": {**_PPO_COMMON, "clip_low": 3e-4, "clip_high": 4e-4},
}
assert set(LOSSES) == {*REAL_FAMILY, *PPO_FAMILY}, "every loss family member has an entry, and only they"
assert {n for n, hp in LOSSES.items() if "kl_coef" in hp} == set(KL_LOSSES), "KL_LOSSES lists the losses with a KL term"

# hyperparameters the trainer computes per mini-batch itself (from the whole mini-batch), so a value in
# the config could never be honoured: validate_config rejects them with this reason
TRAINER_SET_HPARAMS = {
    "advantages": "the trainer computes each mini-batch's group advantages from its rewards",
    "normalizer": "the trainer sets the loss denominator from the whole mini-batch (loss_normalizer)",
    "num_groups": "the trainer sets the loss denominator from the whole mini-batch (loss_normalizer)",
}


def check_loss_name(name: str, extra: tuple[str, ...] = ()) -> None:
    """``name`` is a loss of ``LOSSES`` (or one of the caller's ``extra`` names); else a ValueError listing them."""
    if name not in LOSSES and name not in extra:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES) + list(extra)}")


def resolve_hparams(name: str, hparams: dict) -> dict:
    """``LOSSES[name]``'s defaults updated with ``hparams``, every value checked (ValueError naming it)."""
    check_loss_name(name)
    unknown = sorted(set(hparams) - set(LOSSES[name]))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown} for loss {name!r}; accepted: {sorted(LOSSES[name])}")
    hp = {**LOSSES[name], **hparams}
    if name in REAL_FAMILY:
        if not (isinstance(hp["tau"], (int, float)) and math.isfinite(hp["tau"]) and hp["tau"] > 0):
            raise ValueError(f"tau must be a positive finite number, got {hp['tau']!r}")
        if hp["group_norm"] not in GROUP_NORMS:
            raise ValueError(f"group_norm must be one of {GROUP_NORMS}, got {hp['group_norm']!r}")
        if hp["num_groups"] is not None and hp["group_norm"] != "all_groups":
            raise ValueError("num_groups overrides the 'all_groups' denominator; with "
                             "group_norm='contributing_groups' pass normalizer= instead")
    else:
        if name == "grpo":
            hp["clip_low"] = hp["clip_eps"] if hp["clip_low"] is None else hp["clip_low"]
            hp["clip_high"] = hp["clip_eps"] if hp["clip_high"] is None else hp["clip_high"]
        for key in ("clip_low", "clip_high"):
            if not (isinstance(hp[key], (int, float)) and 0 <= hp[key] and math.isfinite(hp[key])):
                raise ValueError(f"{key} must be a finite number >= 0, got {hp[key]!r}")
    if name in KL_LOSSES:
        coef = hp["kl_coef"]
        if isinstance(coef, bool) or not (isinstance(coef, (int, float)) and math.isfinite(coef) and coef >= 0):
            raise ValueError(f"kl_coef must be a finite number >= 0 (0: no KL term), got {coef!r}")
        if hp["kl_target"] not in KL_TARGETS:
            raise ValueError(f"kl_target must be one of {KL_TARGETS} ('ref': the frozen initial model, "
                             f"'old': π_old), got {hp['kl_target']!r}")
    for key in ("normalizer", "num_groups"):
        value = hp.get(key)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{key} must be a positive number (the whole batch's denominator), got {value!r}")
    return hp
