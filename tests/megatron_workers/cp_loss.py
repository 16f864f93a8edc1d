"""CP = 2 on the loss path (CP attention needs Transformer Engine, so the model is not run here).

Each rank builds the same logits for one packed row holding the whole mini-batch, keeps the two
chunks of every sequence that Megatron's THD CP split gives it (chunks r and 2cp−1−r of 2·cp), runs
the hook's loss_func on them, and back-propagates. Checks,
per loss: the share equals the unsplit share (sequence-level losses: on every CP rank; token-level:
summed over CP ranks), and each rank's logits gradient equals the unsplit gradient at its positions.
Writes the largest relative errors per loss.

``--fused-output true``: the split side hands loss_func the output layer's *input* (hidden states) and a
stand-in for the last stage's GPTModel (``fused_output.model_logprobs`` reads only its output layer: a GPTModel
cannot be built at CP = 2 without Transformer Engine), as the hook does with ``model.fused_output``; the
unsplit reference stays Megatron's way, logits = h·Wᵀ through ``logprobs.py``. The hidden states' gradient
is compared at the rank's positions, the output weight's summed over the CP ranks (as DDP sums it)."""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--fused-output", choices=["true", "false"], default="false")
    args = parser.parse_args()
    fused = args.fused_output == "true"

    from common import fixed_samples
    from megatron.core import parallel_state as ps

    from real_megatron.losses import build_loss, group_advantages, loss_normalizer
    from real_megatron.megatron.batch import alignment, build_micro_batch, cp_row_indices, split_for_cp
    from real_megatron.megatron.hook import LossContext, loss_func
    from real_megatron.megatron.model import initialize_parallel

    initialize_parallel(tp=1, pp=1, cp=2, seed=3)
    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    samples = fixed_samples()
    n, vocab = len(samples), 300
    plain_batch = build_micro_batch(samples, list(range(n)), align=alignment(cp))
    g = torch.Generator().manual_seed(9)
    for s in samples:  # reference log-probs for the KL cases (a batch with them carries "ref_logp")
        s.ref_logp = s.old_logp + 0.5 * torch.randn(len(s.old_logp), generator=g)
    ref_batch = build_micro_batch(samples, list(range(n)), align=alignment(cp))
    batch = plain_batch
    seq_len = batch["tokens"].shape[1]
    logits_full = torch.randn(1, seq_len, vocab, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    gen = torch.Generator().manual_seed(6)
    hidden_full = torch.randn(seq_len, 1, 64, generator=gen, dtype=torch.float64)  # [S, B, H], Megatron's layout
    last_stage = _LastStage(0.3 * torch.randn(vocab, 64, generator=gen, dtype=torch.float64))
    rewards = torch.tensor([s.reward for s in samples])
    group_ids = torch.tensor([s.group_id for s in samples])
    lengths = torch.tensor([len(s.response_ids) for s in samples])
    resp_mask = (torch.arange(int(lengths.max()))[None] < lengths[:, None]).float()
    errors = {}
    kl_cases = [("real", {"kl_coef": 0.3}), ("real", {"kl_coef": 0.3, "kl_target": "old"}),
                ("real_bce", {"kl_coef": 0.3}), ("grpo", {"kl_coef": 0.3})]
    for loss, hparams in ([(name, {}) for name in ("real", "real_bce", "real_no_anchor", "gspo", "grpo", "dapo")]
                          + kl_cases):
        batch = ref_batch if hparams else plain_batch
        def context(cp_size, cp_group, loss=loss, hparams=hparams, fused_output=False):
            return LossContext(loss=build_loss(loss, hparams), temperature=0.7, vocab_size=vocab, rewards=rewards,
                               group_ids=group_ids,
                               normalizer=loss_normalizer(loss, mask=resp_mask, rewards=rewards, group_ids=group_ids),
                               advantages=(group_advantages(rewards, group_ids) if loss in ("grpo", "dapo", "gspo")
                                           else None),
                               weights=None, scale=1.0, cp_group=cp_group, cp_size=cp_size, fused_output=fused_output)

        keep = cp_row_indices(batch["cu_seqlens"], cp, cp_rank)
        weight = last_stage.output_layer.weight
        if fused:  # reference: the logits materialised; split: the hidden states, log-probs by the fused op
            full = hidden_full.clone().requires_grad_(True)
            ref_share, _ = loss_func(context(1, None), batch, (full @ weight.t()).transpose(0, 1))
            ref_grad, ref_wgrad = torch.autograd.grad(ref_share, (full, weight))
            ref_grad = ref_grad.transpose(0, 1)  # [B, S, H]: positions on dim 1, like the logits'
            local = hidden_full[keep].clone().requires_grad_(True)
            share, report = loss_func(context(cp, ps.get_context_parallel_group(), fused_output=True),
                                      split_for_cp(batch, cp, cp_rank), local, model=last_stage)
            grad, wgrad = torch.autograd.grad(share, (local, weight))
            grad = grad.transpose(0, 1)
            dist.all_reduce(wgrad, group=ps.get_context_parallel_group())
        else:
            full = logits_full.clone().requires_grad_(True)
            ref_share, _ = loss_func(context(1, None), batch, full)
            (ref_grad,) = torch.autograd.grad(ref_share, full)
            local = logits_full[:, keep].clone().requires_grad_(True)
            share, report = loss_func(context(cp, ps.get_context_parallel_group()), split_for_cp(batch, cp, cp_rank),
                                      local)
            (grad,) = torch.autograd.grad(share, local)
        total = share.detach().clone()
        if not build_loss(loss).sequence_level:  # token-level: the CP ranks' partial sums add up
            dist.all_reduce(total, group=ps.get_context_parallel_group())
        if hparams:  # a KL term (per-token, local) on top: the reported shares add up over CP ranks
            total = report["share"].detach().clone()
            dist.all_reduce(total, group=ps.get_context_parallel_group())
        err_loss = (total - ref_share.detach()).abs().item() / ref_share.detach().abs().item()
        err_grad = (grad - ref_grad[:, keep]).abs().max().item() / ref_grad.abs().max().item()
        if fused:
            err_grad = max(err_grad, (wgrad - ref_wgrad).abs().max().item() / ref_wgrad.abs().max().item())
        assert ref_grad[:, keep].abs().max() > 0
        stats = torch.tensor([err_loss, err_grad], dtype=torch.float64)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        errors[loss + "".join(f"-{k}={v}" for k, v in hparams.items())] = tuple(stats.tolist())
    if dist.get_rank() == 0:
        torch.save(errors, args.out)
    dist.barrier()
    dist.destroy_process_group()


class _LastStage(torch.nn.Module):
    """What ``model_logprobs`` reads of the last stage's GPTModel: an untied output layer (its weight, no TP)."""

    post_process = True
    share_embeddings_and_output_weights = False

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.output_layer = torch.nn.Module()
        self.output_layer.weight = torch.nn.Parameter(weight)
        self.output_layer.tp_group, self.output_layer.sequence_parallel = None, False


if __name__ == "__main__":
    main()
