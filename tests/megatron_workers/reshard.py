"""One layout of the resharding tests: training runs on fixed mini-batches that save or resume a
``dist_checkpointing`` training state. Run alone (`python reshard.py …`) or under torchrun.

``--jobs`` is a JSON list; each job builds a fresh model + optimizer at this process's layout and
either starts from the fixed weights (``"save"``: write a checkpoint after ``save_at`` steps and
keep going) or loads ``"resume"`` (a checkpoint written after ``save_at`` steps, by any layout),
then trains up to ``steps`` optimizer steps. Step i always trains on the same mini-batch, so a
resumed job's steps are directly comparable with an uninterrupted job's. Rank 0 writes, per job,
the loss and grad norm of every step it ran and the full weights at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

LR, ADAM_EPS = 0.05, 1e-2  # eps keeps Adam's step smooth in the gradient (see test_megatron_parallel.py)


def run_job(job: dict, hf: dict) -> dict:
    from common import fixed_full_state_dict, fixed_samples

    from real_megatron.megatron.dist_state import load_training_state, save_training_state
    from real_megatron.megatron.model import build_model
    from real_megatron.megatron.sharding import gather_full_state_dict, load_full_state_dict
    from real_megatron.megatron.train import PolicyTrainer, build_optimizer

    dist_opt = bool(job.get("distributed_optimizer"))
    chunks = build_model(hf, wrap_ddp=True, transformer_impl="local", use_distributed_optimizer=dist_opt)
    load_full_state_dict(chunks[0], fixed_full_state_dict(hf))  # a resume overwrites these
    optimizer = build_optimizer(chunks, lr=LR, adam_eps=ADAM_EPS, use_distributed_optimizer=dist_opt)
    policy = PolicyTrainer(chunks, optimizer, loss_name="real", hparams={}, temperature=0.7, micro_batch_rollouts=16)
    start = 0
    if job.get("resume"):
        load_training_state(chunks, optimizer, job["resume"])
        start = int(job["save_at"])
    losses, grad_norms = {}, {}
    for step in range(start, int(job["steps"])):
        if job.get("save") and step == int(job["save_at"]):
            if torch.distributed.get_rank() == 0:
                os.makedirs(job["save"])
            torch.distributed.barrier()
            save_training_state(chunks, optimizer, job["save"])
        metrics = policy.train_step(fixed_samples(seed=100 + step))
        assert metrics["skipped"] == 0.0, f"step {step} skipped"
        losses[step + 1], grad_norms[step + 1] = metrics["loss"], metrics["grad_norm"]
    return {"losses": losses, "grad_norms": grad_norms, "weights": gather_full_state_dict(chunks[0], "param")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--jobs", required=True, help="JSON list of jobs (see the module docstring)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from common import TINY_QWEN2

    from real_megatron.megatron.model import initialize_parallel

    initialize_parallel(tp=args.tp, pp=args.pp, cp=1, seed=7)
    results = {job["name"]: run_job(job, dict(TINY_QWEN2)) for job in json.loads(args.jobs)}
    if torch.distributed.get_rank() == 0:
        torch.save(results, args.out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
