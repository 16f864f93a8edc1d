"""The gradient diagnostics (``losses/diagnostics.py``) live: captured in the hook, reduced over ranks.

Capture (``watch_tokens``, called by ``hook.loss_func``): the micro-batch's per-token log-ratios
log π_θ − log π_old and a tensor hook on the per-token log-prob tensor that records ∂/∂log π_t of
what Megatron back-propagates — during the real backward, so there is no extra forward or backward.
The hook returns nothing, so the gradient flowing on is untouched (tested: parameter gradients equal
the loss library's).

What reaches the hook is ∂L/∂log π_t times one factor, the same on every rank: the hook's scale
M_d·dp (``hook.py``'s docstring) times the schedule's cp/M_d times the optimizer's loss scale
(``config.grad_scale_func``; 1 without one) = dp·cp·loss_scale. ``reduce_diagnostics`` divides it out.

Reduction (``reduce_diagnostics``, called by ``policy.forward_backward``): the reporting ranks
(last pipeline stage, TP rank 0; each data-parallel and CP rank holds its own tokens, so every token
is held by exactly one of them) add up their ratio-bin counts and gradient sums, and send their own
largest ``top_count`` |∂L/∂log π_t| per population: the mini-batch's top tokens are among those, so
the top-1 % share is exactly the one a single process would compute over the whole mini-batch.

Populations and exactness across layouts and the zero-gradient shortcut:

* ratio bins: the response tokens of the rollouts that carry a gradient (not
  ``losses.zero_gradient_rollouts``) — the only ones the shortcut forwards; the others' ratio is
  never computed. ``diag/ratio_tokens`` is that count.
* gradient domination: all response tokens of the positive (resp. negative) rollouts of the
  mini-batch; the skipped rollouts' tokens count, with gradient exactly 0.
"""
from __future__ import annotations

import torch

from real_megatron.distributed import world, world_sum
from real_megatron.losses.diagnostics import (
    ratio_bin_counts,
    ratio_fractions,
    top_count,
    top_share,
)


def watch_tokens(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> dict:
    """Start capturing one micro-batch: ``[S, T]`` rows as the hook gathers them; returns the record.

    The record holds ``mask`` and ``log_ratio`` now, and ``grad`` (∂ of the back-propagated value
    w.r.t. ``logp``, detached) once the backward has run through ``logp``.
    """
    record = {"mask": mask.detach(), "log_ratio": (logp.detach() - old_logp.detach())}
    if logp.requires_grad:
        def keep(grad):
            record["grad"] = grad.detach().clone()  # returns None: the gradient flows on unchanged
        logp.register_hook(keep)
    return record


def grad_factor(config) -> float:
    """dp·cp·loss_scale: what the hook's captured gradient is ∂L/∂log π_t multiplied by (module docstring)."""
    from megatron.core import parallel_state as ps

    scale = 1.0
    if getattr(config, "grad_scale_func", None) is not None:
        scale = float(config.grad_scale_func(torch.ones(1)).item())
    return ps.get_data_parallel_world_size() * ps.get_context_parallel_world_size() * scale


def reduce_diagnostics(records: list[dict], *, reporter: bool, lengths: torch.Tensor, positive: torch.Tensor,
                       carries: torch.Tensor, factor: float) -> dict[str, float]:
    """``diag/*`` metrics of the whole mini-batch, the same on every rank (one collective round).

    ``records``: the hook's records of this rank (each with ``sample_index`` [S] and ``diag`` from
    ``watch_tokens``); ``reporter``: whether this rank's records count (``policy._Layout.reporter``);
    ``lengths``/``positive``/``carries``: ``[n]`` response lengths, positive labels and
    gradient-carrying flags of the mini-batch's rollouts; ``factor``: ``grad_factor``.
    """
    n_pos = int(lengths[positive].sum())
    n_neg = int(lengths[~positive].sum())
    k = (top_count(n_pos), top_count(n_neg))
    counts = torch.zeros(5, dtype=torch.float64)
    mass = torch.zeros(2, dtype=torch.float64)  # Σ|∂L/∂log π_t| of positives, negatives
    local = ([], [])
    if reporter:
        for rec in records:
            watched = rec.get("diag")
            if watched is None:  # an empty row (a rank without rollouts)
                continue
            idx = rec["sample_index"].cpu()
            mask = watched["mask"].cpu()
            counts += ratio_bin_counts(watched["log_ratio"].cpu()[mask & carries[idx][:, None]])
            if "grad" not in watched:
                continue
            grad = watched["grad"].cpu().double().abs() / factor
            for j, rows in enumerate((positive[idx], ~positive[idx])):
                values = grad[mask & rows[:, None]]
                mass[j] += values.sum()
                local[j].append(values)
    # each rank's own largest k values per population, side by side in a [world, k_pos + k_neg] buffer
    rank, size = world()
    candidates = torch.zeros(size, k[0] + k[1], dtype=torch.float64)
    for j, offset in enumerate((0, k[0])):
        if local[j]:
            values = torch.cat(local[j])
            top = torch.topk(values, min(k[j], values.numel())).values
            candidates[rank, offset:offset + top.numel()] = top
    world_sum(counts)
    world_sum(mass)
    world_sum(candidates)

    metrics = {f"diag/{key}": value for key, value in ratio_fractions(counts).items()}
    for j, (name, n_tokens) in enumerate((("pos", n_pos), ("neg", n_neg))):
        metrics[f"diag/grad_abs_sum_{name}"] = mass[j].item()
        share = top_share(candidates[:, k[0]:] if j else candidates[:, :k[0]], n_tokens, total=mass[j].item())
        if share is not None:
            metrics[f"diag/grad_top1pct_share_{name}"] = share
    return metrics
