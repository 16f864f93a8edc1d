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
import time

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
    eff, imb, b_eff, b_imb, modes = zip(*rows, strict=True)
    print(f"recipe: {PROMPTS} prompts x G={G}, {DP} DP ranks, budget {args.budget} tokens/micro-batch, cp={args.cp}, pp={args.pp}, "
          f"{args.repeats} mini-batches (modes: {sorted(set(modes))})")
    print(f"token efficiency  packed: mean {statistics.mean(eff):.3f} worst {min(eff):.3f}   "
          f"padded (before): mean {statistics.mean(b_eff):.3f}   target >= 0.95")
    print(f"rank imbalance    packed: mean {statistics.mean(imb):.3f} worst {max(imb):.3f}   "
          f"padded (before): mean {statistics.mean(b_imb):.3f}   target <= 1.05")
    return 0 if min(eff) >= 0.95 and max(imb) <= 1.05 else 1


TINY = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 512, "vocab_size": 4096, "max_position_embeddings": 1024,
        "tie_word_embeddings": False, "rope_theta": 10000.0, "rms_norm_eps": 1e-6}


def skewed_samples(seed: int, groups: int = 8, size: int = 8, uniform_groups: int = 0):
    """Rollouts of 16–512 tokens (log-normal, median 64; the longest is 512), 8-token prompts."""
    from real_megatron.megatron.batch import Sample

    g = torch.Generator().manual_seed(seed)
    samples = []
    for gid in range(groups):
        prompt = torch.randint(0, TINY["vocab_size"], (8,), generator=g).tolist()
        for k in range(size):
            length = min(512, max(16, int(math.exp(math.log(64) + 0.8 * float(torch.randn(1, generator=g))))))
            if gid == 0 and k == 0:
                length = 512
            response = torch.randint(0, TINY["vocab_size"], (length - 8,), generator=g).tolist()
            reward = float(gid % 2) if gid < uniform_groups else float(k % 2)
            samples.append(Sample(prompt, response, reward, gid, old_logp=-torch.rand(length - 8, generator=g) - 8.0))
    return samples


def _policy(budget: int, **kw):
    from real_megatron.megatron.model import build_model, initialize_parallel
    from real_megatron.megatron.optimizer import build_optimizer
    from real_megatron.megatron.policy import MegatronPolicy

    initialize_parallel(hf_config=TINY)
    chunks = build_model(TINY, transformer_impl="local", wrap_ddp=True)
    return MegatronPolicy(chunks, build_optimizer(chunks, lr=1e-7), loss_name="real", temperature=0.6,
                          max_tokens_per_micro_batch=budget, **kw)


def padded_micro_batches(samples, indices, rows: int = 8):
    """The replaced layout: ``rows`` rollouts per micro-batch, every row as long as the longest rollout."""
    from real_megatron.megatron.batch import build_micro_batch

    longest = max(samples[i].length for i in indices)
    batches = []
    for start in range(0, len(indices), rows):
        parts = [build_micro_batch(samples, [i], row_length=longest) for i in indices[start:start + rows]]
        batch = {k: torch.cat([p[k] for p in parts]) for k in ("tokens", "labels", "loss_mask", "old_logp", "sample_index")}
        batch["position_ids"] = torch.arange(longest).expand(len(parts), longest).contiguous()  # one causal block per row
        batch["segment"] = torch.stack([torch.where(p["segment"][0] >= 0, j, -1) for j, p in enumerate(parts)])
        batches.append(batch)
    return batches, longest


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_step(args) -> int:
    from real_megatron.megatron.policy import MegatronPolicy

    policy = _policy(2048, skip_zero_gradient=False)  # groups fit: whole groups, as the padded layout had
    samples = skewed_samples(0)
    real = sum(s.length for s in samples)

    class Padded(MegatronPolicy):
        def _micro_batches(self, samples, plan, lay):
            return padded_micro_batches(samples, sorted(i for mb in plan.rank_micro_batches[0] for i in mb))

    padded = Padded(policy.chunks, policy.optimizer, loss_name="real", temperature=0.6, max_tokens_per_micro_batch=4096,
                    skip_zero_gradient=False)
    plan = policy.plan(samples, sequence_level_groups=True)
    _, longest = padded_micro_batches(samples, list(range(len(samples))))
    print(f"{len(samples)} rollouts, {real} tokens (16-512, log-normal); packed: {plan.mode}, "
          f"{sum(len(r) for r in plan.rank_micro_batches)} rows of <= 2048 positions, {plan.processed_tokens(samples)} "
          f"positions; padded: {-(-len(samples) // 8)} micro-batches of 8 x {longest}, {len(samples) * longest} positions")
    _timed(lambda: policy.train_step(samples)), _timed(lambda: padded.train_step(samples))  # warm-up
    times = {"packed": [], "padded": []}
    for _ in range(args.repeats):
        times["packed"].append(_timed(lambda: policy.train_step(samples)))
        times["padded"].append(_timed(lambda: padded.train_step(samples)))
    ratio = statistics.median(times["packed"]) / statistics.median(times["padded"])
    print(f"train step, median of {args.repeats}: packed {statistics.median(times['packed']):.2f} s, "
          f"padded {statistics.median(times['padded']):.2f} s; packed / padded = {ratio:.2f} (target <= 0.6)")
    return 0 if ratio <= 0.6 else 1


def bench_skip(args) -> int:
    skipping = _policy(512)
    plain = type(skipping)(skipping.chunks, skipping.optimizer, loss_name="real", temperature=0.6,
                           max_tokens_per_micro_batch=512, skip_zero_gradient=False, skip_fresh_exact_forward=False)
    samples = skewed_samples(1, uniform_groups=4)  # groups of ~700 tokens > 512: the exact mode
    results = {}
    for name, policy in (("skip", skipping), ("plain", plain)):
        metrics = policy.train_step(samples)  # warm-up; a later mini-batch: old log-probs are stale
        results[name] = {"later": [], "first": [], "metrics": metrics}
    for _ in range(args.repeats):
        for name, policy in (("skip", skipping), ("plain", plain)):
            results[name]["later"].append(_timed(lambda policy=policy: policy.train_step(samples)))
            logps, _ = policy.compute_logprobs(samples)  # the first mini-batch after a rollout
            fresh = [type(s)(s.prompt_ids, s.response_ids, s.reward, s.group_id, lp, None, policy.version)
                     for s, lp in zip(samples, logps, strict=True)]
            start = time.perf_counter()
            results[name]["first_metrics"] = policy.train_step(fresh)
            results[name]["first"].append(time.perf_counter() - start)
    med = {name: {k: statistics.median(r[k]) for k in ("later", "first")} for name, r in results.items()}
    later, first = med["skip"]["later"] / med["plain"]["later"], med["skip"]["first"] / med["plain"]["first"]
    sk, pl = results["skip"], results["plain"]
    print(f"{len(samples)} rollouts, half the groups uniform, exact mode (budget 512); trained rollout fraction "
          f"{sk['metrics']['hook/trained_rollout_fraction']:.2f} with skipping, "
          f"{pl['metrics']['hook/trained_rollout_fraction']:.2f} without")
    print(f"later mini-batch (stale old log-probs): {med['skip']['later']:.2f} s vs {med['plain']['later']:.2f} s "
          f"= {later:.2f}; extra forward: {sk['metrics']['hook/extra_forward']:.0f} vs {pl['metrics']['hook/extra_forward']:.0f}")
    print(f"first mini-batch (fresh old log-probs):  {med['skip']['first']:.2f} s vs {med['plain']['first']:.2f} s "
          f"= {first:.2f}; extra forward: {sk['first_metrics']['hook/extra_forward']:.0f} vs "
          f"{pl['first_metrics']['hook/extra_forward']:.0f}   (target: both ratios <= 0.6, no extra forward on the first)")
    return 0 if later <= 0.6 and first <= 0.6 and sk["first_metrics"]["hook/extra_forward"] == 0 else 1


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
    args.repeats = args.repeats or 5
    return bench_step(args) if args.what == "step" else bench_skip(args)


if __name__ == "__main__":
    sys.exit(main())
