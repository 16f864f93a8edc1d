"""The loss registry: every policy loss's name and its class; ``build_loss`` makes the one object a run uses.

    loss = build_loss("real", {"tau": 0.5})      # ValueError naming a bad or unknown hyperparameter
    loss.hp                                      # the resolved hyperparameters (defaults: the paper's)

Config validation, the trainer and the launcher ask here; the defaults live in each loss's class
(``real.RealLoss``, ``ppo.GRPOLoss`` / ``DAPOLoss`` / ``GSPOLoss``).
"""
from __future__ import annotations

from real_megatron.losses.base import PolicyLoss
from real_megatron.losses.ppo import DAPOLoss, GRPOLoss, GSPOLoss
from real_megatron.losses.real import REAL_FAMILY, RealLoss

# name -> class; the REAL family's three variants share one class (the formula differs by name, real.py)
LOSSES: dict[str, type[PolicyLoss]] = {
    **{name: RealLoss for name in REAL_FAMILY},
    "grpo": GRPOLoss,
    "dapo": DAPOLoss,
    "gspo": GSPOLoss,
}


def check_loss_name(name: str) -> None:
    """``name`` is a loss of ``LOSSES``; else a ValueError listing them."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")


def build_loss(name: str, hparams: dict | None = None) -> PolicyLoss:
    """The loss ``name`` with ``hparams`` over its defaults, every value checked (ValueError naming it)."""
    check_loss_name(name)
    return LOSSES[name](name, hparams)
