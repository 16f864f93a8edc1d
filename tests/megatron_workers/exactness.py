"""One layout of the exactness tests: loss and full gradients for the fixed mini-batch, then one
optimizer step and the full weights after it. Run alone (`python exactness.py …`) or under torchrun."""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--loss", default="real")
    parser.add_argument("--micro-batch-rollouts", type=int, default=16)
    parser.add_argument("--force-exact", action="store_true")
    parser.add_argument("--tied", action="store_true")
    parser.add_argument("--distributed-optimizer", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from common import TINY_QWEN2, fixed_full_state_dict, fixed_samples

    from real_megatron.megatron.model import build_model, initialize_parallel
    from real_megatron.megatron.sharding import gather_full_state_dict, load_full_state_dict
    from real_megatron.megatron.optimizer import build_optimizer
    from real_megatron.megatron.policy import MegatronPolicy

    hf = dict(TINY_QWEN2, tie_word_embeddings=args.tied)
    initialize_parallel(tp=args.tp, pp=args.pp, cp=1, seed=7)
    chunks = build_model(hf, wrap_ddp=True, transformer_impl="local",
                         use_distributed_optimizer=args.distributed_optimizer)
    load_full_state_dict(chunks[0], fixed_full_state_dict(hf))
    policy = MegatronPolicy(chunks, build_optimizer(chunks, lr=10.0, adam_eps=1.0,
                                                         use_distributed_optimizer=args.distributed_optimizer), loss_name=args.loss, hparams={},
                           temperature=0.7, micro_batch_rollouts=args.micro_batch_rollouts,
                           force_exact=args.force_exact)
    samples = fixed_samples()
    metrics = policy.forward_backward(samples)
    grads = gather_full_state_dict(chunks[0], "grad")
    metrics.update(policy.apply_gradients(metrics["loss"]))
    weights = gather_full_state_dict(chunks[0], "param")
    initial = fixed_full_state_dict(hf)
    deltas = {k: weights[k] - initial[k] for k in weights}
    if torch.distributed.get_rank() == 0:
        torch.save({"metrics": metrics, "grads": grads, "deltas": deltas}, args.out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
