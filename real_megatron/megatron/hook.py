"""The policy-loss hook for Megatron-Core's ``forward_backward_func``.

``forward_step(data_iterator, model)`` runs the model on one micro-batch — a packed row of
rollouts (``batch.py``, ``packed_forward.py``) — and returns ``(output, loss_func)``;
``loss_func`` runs on the last pipeline stage only and gathers each slot's positions back into the
loss library's right-padded ``[N, T]`` rows. A micro-batch may also be an empty row (a data-parallel
rank without rollouts): its share is 0 with a graph, so backward and DDP's reduction still run.

The last stage's output is the final hidden states when ``LossContext.fused_output``
(``model.fused_output``, on by default): ``fused_output.py`` turns them and the output weight into the
labels' log-probs tile by tile, never holding the ``[tokens, V/tp]`` logits. Otherwise it is
Megatron's logits, reduced by ``logprobs.py``. The two paths compute the same numbers (tested to 1e-6
in fp32); ``model_output`` and ``label_logprobs`` are the only places that tell them apart.

Cancelling Megatron's averaging — the one derivation of the scale factor
-----------------------------------------------------------------------
We want the parameter gradient of the *mini-batch* loss L, whatever the layout. Split L into
micro-batch shares: L = Σ_{dp ranks d} Σ_{micro-batches m of d} ℓ_{d,m}, where each share is
already normalised by the whole mini-batch's denominator (``loss_normalizer``) or, in exact mode,
is Σ_k w_k·s̄_k with w = ∂L/∂s̄ over the whole mini-batch. Megatron then does, with our
``loss_func`` returning the 2-tuple ``(value, report)`` and ``calculate_per_token_loss=False``:

1. the schedule multiplies the returned value by cp and divides it by M_d (this rank's number of
   micro-batches) before backward (``forward_step_calc_loss``);
2. DDP averages gradients over the dp·cp ranks (``gradient_scaling_factor = 1/(dp·cp)``).

So the gradient that reaches the optimizer is Σ_{d,c} (1/(dp·cp)) Σ_m (cp/M_d) ∇value_{d,c,m}.
Returning value = ℓ·M_d·dp gives Σ_{d,c} Σ_m ∇ℓ_{d,c,m}: the sum over data-parallel ranks and
micro-batches of the shares, and over CP ranks of each rank's *local* contribution (see below) —
exactly ∇L. ``calculate_per_token_loss`` stays False (asserted): with it, Megatron would divide
by a token count that means nothing for a group-level loss.

Context parallelism
-------------------
A CP rank holds chunks r and 2cp−1−r of every sequence. The per-rollout sums behind s̄ (Σ of
logp − old_logp over response tokens, and the token count) are all-reduced over the CP group
with an all-reduce whose backward is the identity: every CP rank then holds the same s̄ and the
same loss, but the gradient flows only into its own tokens, so summing over CP ranks (DDP does)
counts each token once. Token-level losses (GRPO, DAPO) need no reduction of the loss: their
per-token terms are local, normalised by the full response lengths (CP-reduced counts) and the
mini-batch denominator, and the CP ranks' partial sums add up. The KL penalty (``losses/kl.py``) is
such a per-token sum for every loss, so it is added to the share the same way (``PolicyLoss.kl_share``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist

from real_megatron.losses import MicroBatch, PolicyLoss
from real_megatron.megatron.batch import slot_rows
from real_megatron.megatron.diag_capture import watch_tokens
from real_megatron.megatron.fused_output import model_logprobs, output_hidden_states
from real_megatron.megatron.logprobs import vocab_parallel_logprobs
from real_megatron.megatron.packed_forward import run_packed


class _AllReduceSumIdentityBackward(torch.autograd.Function):
    """Sum over a group in forward; pass the gradient through unchanged in backward."""

    @staticmethod
    def forward(ctx, tensor, group):
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def cp_sum(tensor: torch.Tensor, group, size: int) -> torch.Tensor:
    return _AllReduceSumIdentityBackward.apply(tensor, group) if size > 1 else tensor


@dataclass
class LossContext:
    """Everything ``loss_func`` needs besides the micro-batch, fixed for one mini-batch."""

    loss: PolicyLoss | None  # None: forward-only log-probs (``logprob_step``)
    temperature: float
    vocab_size: int
    rewards: torch.Tensor  # [n] for the whole mini-batch (indexed by sample_index)
    group_ids: torch.Tensor  # [n]
    normalizer: float  # the whole mini-batch's denominator
    advantages: torch.Tensor | None  # [n] (``PolicyLoss.advantages``), else None
    weights: torch.Tensor | None  # [n] = ∂L/∂s̄ (exact mode), else None
    scale: float  # M_d · dp (see the module docstring)
    tp_group: object = None
    cp_group: object = None
    cp_size: int = 1
    # the last stage hands the loss hidden states, not logits (fused_output.py); False for callers that
    # pass logits themselves
    fused_output: bool = False
    # filled by loss_func, read by train_step
    records: list = field(default_factory=list)


def _per_row(logp, old_logp, mask):
    diff = torch.where(mask, logp - old_logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    return diff.sum(dim=1), mask.sum(dim=1).to(logp.dtype)


def model_output(ctx: LossContext, model, batch: dict) -> torch.Tensor:
    """The model's output for one micro-batch: on the last stage the final hidden states when fused, else the
    logits; other pipeline stages' hidden states either way."""
    if not ctx.fused_output:
        return run_packed(model, batch)
    with output_hidden_states(model):
        return run_packed(model, batch)


def label_logprobs(ctx: LossContext, model, batch: dict, output: torch.Tensor, *, with_entropy: bool):
    """Per-position ``(logp, entropy)`` ``[R, S]`` of ``batch["labels"]`` from ``model_output``'s ``output``.

    Only response positions (``loss_mask``) are ever read: the fused op computes nothing else (they are
    0), the unfused one computes every position."""
    if ctx.fused_output:
        return model_logprobs(model, output, batch["labels"], temperature=ctx.temperature, vocab_size=ctx.vocab_size,
                              with_entropy=with_entropy, token_mask=batch["loss_mask"] > 0)
    return vocab_parallel_logprobs(output, batch["labels"], temperature=ctx.temperature, vocab_size=ctx.vocab_size,
                                   tp_group=ctx.tp_group, with_entropy=with_entropy,
                                   overwrite_logits=True)  # the logits are read by nothing else


def loss_func(ctx: LossContext, batch: dict, output: torch.Tensor, model=None):
    """Compute this micro-batch's share of the mini-batch loss (see the module docstring). ``output``: the
    last stage's ``model_output`` (logits, or with ``ctx.fused_output`` the hidden states of ``model``)."""
    idx = batch["sample_index"]
    if idx.numel() == 0:  # an empty row (a rank without rollouts): no share, but a graph for backward
        # (fused: the graph reaches no output weight; DDP's buffer, zeroed per step, is reduced anyway)
        return output.sum() * 0.0, {"share": torch.zeros((), device=output.device)}
    # no entropy here: it is a metric, measured in the forward-only pass over the same rollouts
    # (compute_logprobs), and leaving it out keeps the training step as cheap as cross-entropy
    logp, _ = label_logprobs(ctx, model, batch, output, with_entropy=False)
    # the loss library takes one right-padded row per rollout: gather each slot's positions
    index, valid = slot_rows(batch["segment"], idx.numel())
    logp = logp.reshape(-1)[index]
    mask = (batch["loss_mask"].reshape(-1)[index] > 0) & valid
    old = batch["old_logp"].reshape(-1)[index].to(logp.dtype)
    loss = ctx.loss
    watched = watch_tokens(logp, old, mask) if loss.diagnostics else None  # diag/ metrics (diag_capture.py)

    # per-rollout sums, reduced over the CP group (identity backward: see the docstring)
    num, count = _per_row(logp, old, mask)
    num = cp_sum(num, ctx.cp_group, ctx.cp_size)
    count = cp_sum(count.detach(), ctx.cp_group, ctx.cp_size)
    if (count == 0).any():
        raise ValueError(f"rollout {int(idx[(count == 0).nonzero()[0]])} has no response tokens")
    scores = num / count
    ref = batch["ref_logp"].reshape(-1)[index].to(logp.dtype) if "ref_logp" in batch else None
    mb = MicroBatch(logp=logp, old_logp=old, mask=mask, ref_logp=ref, lengths=count, scores=scores,
                    rewards=ctx.rewards[idx], group_ids=ctx.group_ids[idx],
                    advantages=ctx.advantages[idx] if ctx.advantages is not None else None,
                    normalizer=ctx.normalizer, batch_rollouts=ctx.rewards.shape[0])
    if "behaviour_logp" in batch:  # log π_old − log μ per token, and its mean over each whole (CP-reduced) response
        mu = batch["behaviour_logp"].reshape(-1)[index].to(logp.dtype)
        mb.behaviour_token_log_ratio = torch.where(mask, old - mu, torch.zeros_like(old))
        mb.behaviour_log_ratio = cp_sum(mb.behaviour_token_log_ratio.sum(dim=1), ctx.cp_group, ctx.cp_size) / count

    if not torch.isfinite(scores.detach()).all() or not torch.isfinite(logp.detach()[mask]).all():
        # non-finite forward (overflow, corrupted weights): propagate NaN so train_step skips the step
        share = (scores * 0.0).sum() * float("nan")
        metrics = {}
    elif ctx.weights is not None:  # exact mode: Σ_k w_k s̄_k reproduces ∂L/∂θ
        share = (ctx.weights[idx].to(scores.dtype) * scores).sum()
        metrics = {}
    else:
        share, metrics = loss.share(mb)

    # bookkeeping for train_step: each CP rank holds the full share for sequence-level losses,
    # a partial one for token-level losses; report shares so that a sum over CP ranks is right
    sequence_level = loss.sequence_level or ctx.weights is not None
    reported_share = share.detach() / ctx.cp_size if sequence_level else share.detach()
    kl_share, kl = loss.kl_share(mb)
    if kl_share is not None:  # a sum of per-token terms: local to each CP rank, like a token-level loss
        share = share + kl_share
        reported_share = reported_share + kl_share.detach()
    ctx.records.append({"sample_index": idx, "scores": scores.detach(), "share": reported_share,
                        "tokens": mask.sum().detach(), "metrics": metrics, "diag": watched, "kl": kl})
    return share * ctx.scale, {"share": reported_share}


def forward_step(ctx: LossContext, data_iterator, model):
    batch = next(data_iterator)
    return model_output(ctx, model, batch), partial(loss_func, ctx, batch, model=model)


def logprob_step(ctx: LossContext, data_iterator, model):
    """Forward-only variant: per-token log-probs and entropy of the labels (old log-probs, the exact mode's
    scores, the reference model's log-probs)."""
    batch = next(data_iterator)
    output = model_output(ctx, model, batch)

    def collect(output):
        with torch.no_grad():
            logp, entropy = label_logprobs(ctx, model, batch, output, with_entropy=True)
        ctx.records.append({"batch": batch, "logp": logp, "entropy": entropy})
        return torch.zeros((), device=output.device), {}

    return output, collect
