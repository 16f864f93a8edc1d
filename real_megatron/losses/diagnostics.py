"""The paper's gradient diagnostics as pure functions (pure PyTorch, no process groups).

Three views of where a policy loss puts its gradient, each computed from quantities the training
step already has (the per-token log-ratios, the per-token gradient ∂L/∂log π_t of the real backward,
REAL's per-rollout weights); the Megatron side (``megatron/diag_capture.py``) collects them over ranks
and calls these functions once per optimizer step on the whole mini-batch.

* ``ratio_bin_counts``: Figure 2's token-ratio histogram, ρ_t = π_θ/π_old = exp(log π_θ − log π_old),
  counted in the fixed bins ``RATIO_BIN_NAMES`` (edges ``RATIO_EDGES``, each bin ``[lo, hi)``) around
  the clip range [1 − ε, 1 + ε] with ε = 0.2 — fixed so that runs of different losses are comparable.
* ``top_share``: gradient domination, the share of Σ_t |∂L/∂log π_t| carried by the largest
  ``ceil(num_tokens · TOP_PERCENT / 100)`` tokens of a population (positives or negatives).
* ``score_weight_stats``: REAL's per-rollout weights |∂L_g/∂s̄_k| (Prop. 5.1: ≤ 1/τ): max, mean and
  the share at ≥ ``NEAR_BOUND``/τ, over the rollouts of contributing groups.
"""
from __future__ import annotations

import torch

RATIO_EDGES = (0.8, 0.95, 1.05, 1.2)
RATIO_BIN_NAMES = ("ratio_bin_0_0.8", "ratio_bin_0.8_0.95", "ratio_bin_0.95_1.05", "ratio_bin_1.05_1.2",
                   "ratio_bin_1.2_inf")
TOP_PERCENT = 1  # gradient domination: the top 1 % of tokens (rounded up)
NEAR_BOUND = 0.9  # REAL weights counted as "at the bound": |∂L_g/∂s̄_k| ≥ 0.9/τ


def ratio_bin_counts(log_ratio: torch.Tensor) -> torch.Tensor:
    """Token counts per ratio bin: ``log_ratio [M]`` (log π_θ − log π_old, any float) -> ``[5]`` float64.

    Bin i holds the tokens with ``RATIO_EDGES[i-1] <= exp(log_ratio) < RATIO_EDGES[i]`` (the first bin
    starts at 0, the last is open). Counts, not fractions, so that ranks can add them up.
    """
    ratio = torch.exp(log_ratio.detach().double().reshape(-1))
    edges = torch.tensor(RATIO_EDGES, dtype=torch.float64, device=ratio.device)
    bins = torch.bucketize(ratio, edges, right=True)  # right=True: a ratio equal to an edge goes up
    return torch.bincount(bins, minlength=len(RATIO_BIN_NAMES)).double().cpu()


def ratio_fractions(counts: torch.Tensor) -> dict[str, float]:
    """``{bin name: fraction}`` from ``ratio_bin_counts`` (summed over ranks) and ``ratio_tokens``; {} if none."""
    total = float(counts.sum())
    if total == 0:
        return {}
    out = {name: float(c) / total for name, c in zip(RATIO_BIN_NAMES, counts.tolist(), strict=True)}
    out["ratio_tokens"] = total
    return out


def top_count(num_tokens: int) -> int:
    """How many tokens the "top 1 %" is: ceil(num_tokens · TOP_PERCENT / 100), in integers (no float round-off)."""
    return -(-int(num_tokens) * TOP_PERCENT // 100)


def top_share(abs_grads: torch.Tensor, num_tokens: int, total: float | None = None) -> float | None:
    """Share of the population's gradient mass Σ|g| carried by its ``top_count(num_tokens)`` largest |g|.

    ``abs_grads [M]``: |∂L/∂log π_t| ≥ 0 of the population's tokens (tokens not given have gradient
    0, so ``M`` may be below ``num_tokens``); ``num_tokens``: the population's size, zeros included.
    ``total``: the population's Σ|g| when ``abs_grads`` holds only candidates for the top (a superset
    of its largest ``top_count`` values, e.g. each rank's own top values); default ``abs_grads.sum()``.
    Returns a float in (0, 1], or None when there are no tokens or no gradient.
    """
    values = abs_grads.detach().double().reshape(-1)
    if (values < 0).any():
        raise ValueError("top_share takes absolute gradients (>= 0)")
    total = float(values.sum()) if total is None else float(total)
    if num_tokens <= 0 or total == 0:
        return None
    k = min(top_count(num_tokens), values.numel())
    return float(torch.topk(values, k).values.sum()) / total


def score_weight_stats(weights: torch.Tensor, contributing: torch.Tensor, tau: float) -> dict[str, float]:
    """Max, mean and share ≥ NEAR_BOUND/τ of |weights| over the ``contributing [N]`` rollouts; {} if none.

    ``weights [N]``: each rollout's |∂L_g/∂s̄_k| for its own group loss L_g (not divided by the
    loss's denominator), so Prop. 5.1's bound 1/τ applies to every entry.
    """
    w = weights.detach().double().abs()[contributing.to(torch.bool)]
    if w.numel() == 0:
        return {}
    near = w >= NEAR_BOUND / tau
    return {"score_weight_max": float(w.max()), "score_weight_mean": float(w.mean()),
            "score_weight_near_bound_share": float(near.double().mean())}

