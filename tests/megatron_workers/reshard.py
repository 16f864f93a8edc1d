"""One layout of the resharding tests: training runs on fixed mini-batches that save or resume a
``dist_checkpointing`` training state. Run alone (`python reshard.py …`) or under torchrun.

``--jobs`` is a JSON list; each job builds a fresh model + optimizer at its layout (``tp``, ``pp``,
``distributed_optimizer``) and either starts from the fixed weights (``"save"``: a run directory
the trainer's CheckpointManager writes a checkpoint into after ``save_at`` steps, then it keeps
going) or resumes
from ``"resume"``'s ``latest`` checkpoint (written by any layout), then trains up to ``steps``
optimizer steps. Step i always trains on the same mini-batch, so a
resumed job's steps are directly comparable with an uninterrupted job's. Rank 0 writes, per job,
the loss and grad norm of every step it ran and the full weights at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

LR, ADAM_EPS = 0.05, 1e-2  # eps keeps Adam's step smooth in the gradient (see test_megatron_parallel.py)


def manager(run_dir: str):
    from real_megatron.checkpoint import CheckpointManager
    from real_megatron.distributed import barrier, broadcast_object

    return CheckpointManager(run_dir, rank=dist.get_rank(), world_size=dist.get_world_size(), barrier=barrier,
                             broadcast=broadcast_object)


def save(mgr, chunks, optimizer, step: int, layout: dict) -> None:
    from real_megatron.megatron.dist_state import save_training_state

    mgr.save(step, {"layout": layout, "rollout_step": step}, lambda d: save_training_state(chunks, optimizer, d))


def run_job(job: dict, hf: dict) -> dict:
    from common import fixed_full_state_dict, fixed_samples

    from real_megatron.losses import build_loss
    from real_megatron.megatron.dist_state import inner_optimizers, load_training_state
    from real_megatron.megatron.model import build_model, initialize_parallel
    from real_megatron.megatron.optimizer import build_optimizer
    from real_megatron.megatron.policy import MegatronPolicy
    from real_megatron.megatron.sharding import gather_full_state_dict, load_full_state_dict

    initialize_parallel(tp=job.get("tp", 1), pp=job.get("pp", 1), cp=1, seed=7)
    dist_opt = bool(job.get("distributed_optimizer"))
    chunks = build_model(hf, wrap_ddp=True, transformer_impl="local", use_distributed_optimizer=dist_opt)
    load_full_state_dict(chunks[0], fixed_full_state_dict(hf))  # a resume overwrites these
    optimizer = build_optimizer(chunks, lr=LR, adam_eps=ADAM_EPS, use_distributed_optimizer=dist_opt)
    policy = MegatronPolicy(chunks, optimizer, loss=build_loss("real"), temperature=0.7, max_tokens_per_micro_batch=128)
    layout = {"tp": job.get("tp", 1), "pp": job.get("pp", 1), "cp": 1, "world_size": dist.get_world_size(),
              "dp": dist.get_world_size() // (job.get("tp", 1) * job.get("pp", 1)),
              "distributed_optimizer": dist_opt, "dtype": "float32"}
    start, loaded_steps, rng_draw = 0, None, None
    if job.get("resume"):
        mgr = manager(job["resume"])
        path = mgr.latest()
        mgr.load(path, layout=layout, read_state=lambda d: load_training_state(chunks, optimizer, d))
        start = int(job["save_at"])
        rng_draw = torch.rand(4)  # restored streams continue; a new layout's start from the seed
        if job.get("fresh_optimizer"):  # the mutation the tests must catch: weights resumed, Adam state not
            optimizer = build_optimizer(chunks, lr=LR, adam_eps=ADAM_EPS, use_distributed_optimizer=dist_opt)
            policy.optimizer = optimizer
        # every parameter's Adam step after the load: its value, and whether it is its own tensor
        steps = [s["step"] for inner in inner_optimizers(optimizer) for s in inner.state.values()]
        loaded_steps = {"values": sorted({float(s) for s in steps}), "distinct": len({id(s) for s in steps}) == len(steps)}
    losses, grad_norms = {}, {}
    for step in range(start, int(job["steps"])):
        if job.get("save") and step == int(job["save_at"]):
            save(manager(job["save"]), chunks, optimizer, step, layout)
            rng_draw = torch.rand(4)
        torch.rand(3)  # a consumer of the torch stream (as dropout would be), so a saved stream is not the seed's
        metrics = policy.train_step(fixed_samples(seed=100 + step))
        assert metrics["skipped"] == 0.0, f"step {step} skipped"
        losses[step + 1], grad_norms[step + 1] = metrics["loss"], metrics["grad_norm"]
    return {"losses": losses, "grad_norms": grad_norms, "loaded_steps": loaded_steps, "rng_draw": rng_draw,
            "weights": gather_full_state_dict(chunks[0], "param")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", required=True, help="JSON list of jobs (see the module docstring)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from common import TINY_QWEN2

    results = {job["name"]: run_job(job, dict(TINY_QWEN2)) for job in json.loads(args.jobs)}
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
