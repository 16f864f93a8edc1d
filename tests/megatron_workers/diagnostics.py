"""One layout of the diagnostics tests: the policy's ``diag/*`` metrics and full gradients for the fixed
mini-batch. Run alone (`python diagnostics.py …`) or under torchrun.

``--reference`` (one process): writes the old log-probs every layout then uses — this model's own
log-probs shifted so that each token's ratio π_θ/π_old is one of ``RATIOS`` (the middle of a ratio bin,
far from the edges) — and the expected metrics, from the pure functions of ``losses/diagnostics.py``
applied to the *loss library's* per-token gradient ∂L/∂log π_t (autograd over each rollout run alone),
no planner, no hook, no capture.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

RATIOS = (0.5, 0.9, 1.0, 1.1, 1.5)
TEMPERATURE = 0.7


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--loss", default="real")
    parser.add_argument("--budget", type=int, default=512, help="max_tokens_per_micro_batch")
    parser.add_argument("--force-exact", action="store_true")
    parser.add_argument("--no-skip", action="store_true", help="run zero-gradient rollouts too")
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--old", default=None, help="old log-probs: written by --reference, read otherwise "
                        "(default: old.pt beside --out)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    args.old = args.old or os.path.join(os.path.dirname(os.path.abspath(args.out)), "old.pt")

    from common import TINY_QWEN2, fixed_full_state_dict, fixed_samples

    from real_megatron.losses import build_loss
    from real_megatron.megatron.model import build_model, initialize_parallel
    from real_megatron.megatron.optimizer import build_optimizer
    from real_megatron.megatron.policy import MegatronPolicy
    from real_megatron.megatron.sharding import gather_full_state_dict, load_full_state_dict

    initialize_parallel(tp=args.tp, pp=args.pp, cp=1, seed=7)
    chunks = build_model(TINY_QWEN2, wrap_ddp=True, transformer_impl="local")
    load_full_state_dict(chunks[0], fixed_full_state_dict(TINY_QWEN2))
    policy = MegatronPolicy(chunks, build_optimizer(chunks, lr=1e-3), loss=build_loss(args.loss),
                            temperature=TEMPERATURE, max_tokens_per_micro_batch=args.budget,
                            force_exact=args.force_exact, skip_zero_gradient=not args.no_skip)
    samples = fixed_samples()
    if args.reference:
        logps, _ = policy.compute_logprobs(samples)
        g = torch.Generator().manual_seed(3)
        old = []
        for lp in logps:
            ratio = torch.tensor(RATIOS)[torch.randint(len(RATIOS), lp.shape, generator=g)]
            old.append(lp - ratio.log())
        torch.save(old, args.old)
    for s, lp in zip(samples, torch.load(args.old), strict=True):
        s.old_logp = lp
    metrics = reference_metrics(chunks[0], samples, args.loss) if args.reference else policy.forward_backward(samples)
    grads = gather_full_state_dict(chunks[0], "grad")
    rank_metrics = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(rank_metrics, metrics)
    if torch.distributed.get_rank() == 0:
        torch.save({"metrics": metrics, "rank_metrics": rank_metrics, "grads": grads}, args.out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def reference_metrics(model, samples, loss_name: str) -> dict:
    """The loss library over every rollout run alone; the diag metrics from the pure functions."""
    from real_megatron.losses import policy_loss, zero_gradient_rollouts
    from real_megatron.losses.diagnostics import ratio_bin_counts, ratio_fractions, top_share
    from real_megatron.megatron.logprobs import vocab_parallel_logprobs

    assert torch.distributed.get_world_size() == 1, "the reference runs in one process"
    rows = []
    for s in samples:
        ids = torch.tensor([list(s.prompt_ids) + list(s.response_ids)])
        logits = model(ids, torch.arange(ids.shape[1])[None], None)
        logp, _ = vocab_parallel_logprobs(logits, torch.roll(ids, -1, 1), temperature=TEMPERATURE, vocab_size=300,
                                          with_entropy=False)
        p, r = len(s.prompt_ids), len(s.response_ids)
        rows.append(logp[0, p - 1:p + r - 1])
    width = max(r.numel() for r in rows)
    logp = torch.stack([torch.nn.functional.pad(r, (0, width - r.numel())) for r in rows])
    logp.retain_grad()
    old = torch.stack([torch.nn.functional.pad(s.old_logp, (0, width - len(s.old_logp))) for s in samples])
    mask = torch.stack([torch.arange(width) < len(s.response_ids) for s in samples])
    rewards = torch.tensor([s.reward for s in samples])
    group_ids = torch.tensor([s.group_id for s in samples])
    loss, lib_metrics = policy_loss(loss_name, logp=logp, old_logp=old, mask=mask, rewards=rewards, group_ids=group_ids)
    loss.backward()

    carries = ~zero_gradient_rollouts(loss_name, rewards=rewards, group_ids=group_ids)
    counts = ratio_bin_counts((logp - old).detach()[mask & carries[:, None]])
    metrics = {"loss": loss.item(), **{f"diag/{k}": v for k, v in ratio_fractions(counts).items()}}
    grad = logp.grad.abs().double()
    positive = rewards >= 1.0
    for name, rows_of in (("pos", positive), ("neg", ~positive)):
        sel = mask & rows_of[:, None]
        metrics[f"diag/grad_abs_sum_{name}"] = grad[sel].sum().item()
        metrics[f"diag/grad_top1pct_share_{name}"] = top_share(grad[sel], int(sel.sum()))
    metrics.update({f"diag/{k}": v for k, v in lib_metrics.items() if k.startswith("score_weight_")})
    # how far each token's ratio is from the nearest bin edge (the check that ratios sit mid-bin)
    ratio = (logp - old).detach()[mask].exp()
    metrics["edge_distance"] = min(abs(r - e) for r in ratio.tolist() for e in (0.8, 0.95, 1.05, 1.2))
    return metrics


if __name__ == "__main__":
    main()
