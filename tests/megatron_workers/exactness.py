"""One layout of the exactness tests: loss and full gradients for the fixed mini-batch, then one
optimizer step (with its logged size, ``diag/update_rel_norm``) and the full weights after it. Run alone
(`python exactness.py …`) or under torchrun.

``--unpacked``: the reference, without the planner or packed rows — every rollout through the model
alone (plain causal attention, positions 0…L−1), the loss library's ``policy_loss`` over all of them.
``--fresh``: old log-probs are this model's own (``compute_logprobs``, version-stamped), so s̄ = 0.
``--fused-output false``: the policy (and reference model) through Megatron's output layer + ``logprobs.py``
instead of ``fused_output.py`` (``model.fused_output``); the unpacked reference always takes the former."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--loss", default="real")
    parser.add_argument("--budget", type=int, default=512, help="max_tokens_per_micro_batch")
    parser.add_argument("--cap", type=int, default=None, help="max_rollouts_per_micro_batch")
    parser.add_argument("--force-exact", action="store_true")
    parser.add_argument("--tied", action="store_true")
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--unpacked", action="store_true")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--no-skip", action="store_true", help="run zero-gradient rollouts too")
    parser.add_argument("--no-fresh-skip", action="store_true", help="always pay the exact mode's extra forward")
    parser.add_argument("--hparams", default="{}", help="loss hyperparameters, JSON")
    parser.add_argument("--ref-seed", type=int, default=None,
                        help="a frozen reference model (weights of this seed) gives every sample's ref_logp")
    parser.add_argument("--fused-output", choices=["true", "false"], default="true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    fused = args.fused_output == "true"

    from common import TINY_QWEN2, fixed_full_state_dict, fixed_samples

    from real_megatron.losses import build_loss
    from real_megatron.megatron.model import build_model, initialize_parallel
    from real_megatron.megatron.optimizer import build_optimizer
    from real_megatron.megatron.policy import MegatronPolicy
    from real_megatron.megatron.sharding import gather_full_state_dict, load_full_state_dict

    hf = dict(TINY_QWEN2, tie_word_embeddings=args.tied)
    initialize_parallel(tp=args.tp, pp=args.pp, cp=1, seed=7)
    chunks = build_model(hf, wrap_ddp=True, transformer_impl="local",
                         use_distributed_optimizer=args.distributed_optimizer)
    load_full_state_dict(chunks[0], fixed_full_state_dict(hf))
    optimizer = build_optimizer(chunks, lr=10.0, adam_eps=1.0, use_distributed_optimizer=args.distributed_optimizer)
    policy = MegatronPolicy(chunks, optimizer, loss=build_loss(args.loss, json.loads(args.hparams)),
                           temperature=0.7, max_tokens_per_micro_batch=args.budget,
                           max_rollouts_per_micro_batch=args.cap,
                           force_exact=args.force_exact, skip_zero_gradient=not args.no_skip,
                           skip_fresh_exact_forward=not args.no_fresh_skip, fused_output=fused,
                           log_update_size=True)
    samples = fixed_samples()
    if args.ref_seed is not None:
        from real_megatron.megatron.reference import build_reference_policy

        ref = build_reference_policy(hf, load_weights=lambda c: load_full_state_dict(
            c[0], fixed_full_state_dict(hf, seed=args.ref_seed)), transformer_impl="local", temperature=0.7,
            max_tokens_per_micro_batch=args.budget, fused_output=fused)
        ref_logps = unpacked_logps(ref.chunks[0], samples) if args.unpacked else ref.compute_logprobs(samples)[0]
        for s, lp in zip(samples, ref_logps, strict=True):
            s.ref_logp = lp.detach()
    if args.fresh:
        logps, _ = policy.compute_logprobs(samples)
        for s, lp in zip(samples, logps, strict=True):
            s.old_logp, s.old_logp_version = lp, policy.version
    if args.unpacked:
        metrics = unpacked_forward_backward(chunks[0], samples, args.loss, json.loads(args.hparams))
    else:
        metrics = policy.forward_backward(samples)
    grads = gather_full_state_dict(chunks[0], "grad")
    metrics.update(policy.apply_gradients(metrics["loss"]))
    weights = gather_full_state_dict(chunks[0], "param")
    initial = fixed_full_state_dict(hf)
    deltas = {k: weights[k] - initial[k] for k in weights}
    if torch.distributed.get_rank() == 0:
        initial_norm = torch.sqrt(sum(t.double().pow(2).sum() for t in initial.values())).item()
        torch.save({"metrics": metrics, "grads": grads, "deltas": deltas, "initial_norm": initial_norm}, args.out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def unpacked_logps(model, samples) -> list:
    """Each rollout's response log-probs, the rollout run through the model alone (no planner, no packing)."""
    from real_megatron.megatron.logprobs import vocab_parallel_logprobs

    rows = []
    for s in samples:
        ids = torch.tensor([list(s.prompt_ids) + list(s.response_ids)])
        logits = model(ids, torch.arange(ids.shape[1])[None], None)
        labels = torch.roll(ids, -1, 1)
        logp, _ = vocab_parallel_logprobs(logits, labels, temperature=0.7, vocab_size=300, with_entropy=False)
        p, r = len(s.prompt_ids), len(s.response_ids)
        rows.append(logp[0, p - 1:p + r - 1])
    return rows


def unpacked_forward_backward(model, samples, loss_name: str, hparams: dict) -> dict:
    from real_megatron.losses import policy_loss

    assert torch.distributed.get_world_size() == 1, "the unpacked reference runs in one process"
    rows = unpacked_logps(model, samples)
    width = max(r.numel() for r in rows)
    logp = torch.stack([torch.nn.functional.pad(r, (0, width - r.numel())) for r in rows])
    old = torch.stack([torch.nn.functional.pad(s.old_logp, (0, width - len(s.old_logp))) for s in samples])
    mask = torch.stack([torch.arange(width) < len(s.response_ids) for s in samples])
    ref = None
    if samples[0].ref_logp is not None:
        ref = torch.stack([torch.nn.functional.pad(s.ref_logp, (0, width - len(s.ref_logp))) for s in samples])
    loss, metrics = policy_loss(loss_name, logp=logp, old_logp=old, mask=mask, ref_logp=ref,
                                rewards=torch.tensor([s.reward for s in samples]),
                                group_ids=torch.tensor([s.group_id for s in samples]), **hparams)
    loss.backward()
    return {"loss": loss.item(), "hook/exact_mode": 0.0, **({"loss/kl": metrics["kl"]} if "kl" in metrics else {})}


if __name__ == "__main__":
    main()
