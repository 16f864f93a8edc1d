"""Packing benchmarks (ratios, not timed tests).

``plan``: token efficiency (real tokens ÷ token positions the model processes) and rank imbalance
(max ÷ mean per data-parallel rank) of ``plan_micro_batches`` on the 1.5B recipe's length
distribution — 32 prompts × G = 8 per optimizer step, prompts uniform in 80–400 tokens, responses
log-normal with median 3,000 tokens and σ such that a quarter reach the 8,192 cap, 8 DP ranks —
next to the padded planner this replaced (rollouts split evenly by count, every row padded to the
mini-batch's longest sequence, ``micro_batch_rollouts=4``). Targets: efficiency ≥ 0.95, imbalance ≤ 1.05.

``step``: CPU, one process, real ``PolicyTrainer.train_step`` on a tiny Qwen2, a mini-batch with
skewed lengths (16–512 tokens, log-normal): packed rows vs the same rollouts in padded rows
(one rollout per row, every row as long as the longest). Target: packed ÷ padded ≤ 0.6.

``skip``: half the groups uniform (all-correct or all-wrong): update time with zero-gradient
rollouts dropped ÷ without, and which mini-batches pay for the exact mode's extra forward.
Target ≤ 0.6; no extra forward on the first mini-batch.

    python benchmarks/packing.py plan [--budget 16384] [--repeats 20]
    python benchmarks/packing.py step|skip [--repeats 5]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch

PROMPTS, G, DP, CAP = 32, 8, 8, 8192
SIGMA = math.log(CAP / 3000) / 0.6745  # P(response ≥ cap) = 1/4 for a median of 3,000


def recipe_samples(seed: int):
    from real_megatron.megatron.batch import Sample

    g = torch.Generator().manual_seed(seed)
    samples = []
    for gid in range(PROMPTS):
        prompt = [1] * int(torch.randint(80, 401, (1,), generator=g))
        for k in range(G):
            r = math.exp(math.log(3000) + SIGMA * float(torch.randn(1, generator=g)))
            samples.append(Sample(prompt, [1] * max(1, min(CAP, int(r))), float(k % 2), gid))
    return samples


def padded_baseline(samples, dp: int, rows_per_micro_batch: int = 4):
    """The replaced planner's cost: rollouts split evenly by count over ranks (G > micro_batch_rollouts
    forces its exact mode), rows padded to the mini-batch's longest rollout."""
    n, longest = len(samples), max(s.length for s in samples)
    ranks = [list(range(r * n // dp, (r + 1) * n // dp)) for r in range(dp)]
    processed = sum(-(-len(rows) // rows_per_micro_batch) * rows_per_micro_batch * longest for rows in ranks)
    real = [sum(samples[i].length for i in rows) for rows in ranks]
    return sum(real) / processed, max(real) / statistics.mean(real)


def bench_plan(args) -> int:
    from real_megatron.megatron.batch import plan_micro_batches

    rows = []
    for seed in range(args.repeats):
        samples = recipe_samples(seed)
        real = sum(s.length for s in samples)
        base_eff, base_imb = padded_baseline(samples, DP)
        plan = plan_micro_batches(samples, dp_size=DP, max_tokens_per_micro_batch=args.budget,
                                  sequence_level_groups=True, cp=args.cp, fixed_row_length=args.pp > 1)
        per_rank = plan.rank_tokens(samples)
        rows.append((real / plan.processed_tokens(samples), max(per_rank) / statistics.mean(per_rank),
                     base_eff, base_imb, plan.mode))
    eff, imb, b_eff, b_imb, modes = zip(*rows)
    print(f"recipe: {PROMPTS} prompts x G={G}, {DP} DP ranks, budget {args.budget} tokens/micro-batch, cp={args.cp}, pp={args.pp}, "
          f"{args.repeats} mini-batches (modes: {sorted(set(modes))})")
    print(f"token efficiency  packed: mean {statistics.mean(eff):.3f} worst {min(eff):.3f}   "
          f"padded (before): mean {statistics.mean(b_eff):.3f}   target >= 0.95")
    print(f"rank imbalance    packed: mean {statistics.mean(imb):.3f} worst {max(imb):.3f}   "
          f"padded (before): mean {statistics.mean(b_imb):.3f}   target <= 1.05")
    return 0 if min(eff) >= 0.95 and max(imb) <= 1.05 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["plan", "step", "skip"])
    parser.add_argument("--budget", type=int, default=16384)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1, help="> 1: every row padded to the longest (fixed p2p shapes)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    if args.what == "plan":
        args.repeats = args.repeats or 20
        return bench_plan(args)
    from benchmarks_packing_steps import bench_skip, bench_step  # noqa: E402  (model benchmarks)

    args.repeats = args.repeats or 5
    return bench_step(args) if args.what == "step" else bench_skip(args)


if __name__ == "__main__":
    sys.exit(main())
