"""pass@k evaluation, the paper's protocol by default.

    real-megatron evaluate --model HF_DIR --files ../shared/data/aime24.parquet ../shared/data/math500.parquet \
        [--samples 16 --temperature 0.6 --top-p 0.95 --max-new-tokens 8192] [--out results/] [--engine sglang]

Each file is one benchmark (named after the file). For every problem, ``samples`` responses are
drawn and verified; pass@1 is the mean of all scores and pass@k the unbiased estimator
1 − C(n−c, k) / C(n, k) (Chen et al., 2021) averaged over problems. Results go to
``results.json`` (with each problem's correct-sample count) and ``results.md`` (one row per
benchmark and the average over benchmarks).

Every prompt plus ``--max-new-tokens`` must fit the model's context (``max_position_embeddings``):
a prompt that does not is an error naming the file and row, before any generation (exit code 2).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``c`` correct of ``n`` samples."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def report_ks(samples: int) -> list[int]:
    """1, 2, 4, … up to and including ``samples``."""
    ks = [1]
    while ks[-1] * 2 < samples:
        ks.append(ks[-1] * 2)
    if ks[-1] != samples:
        ks.append(samples)
    return ks


def evaluate_prompts(engine, reward_pool, tokenizer, records, prompt_ids, *, samples: int, sampling,
                     batch_prompts: int = 64) -> dict:
    """Sample ``samples`` responses per prompt, verify them, and return pass@k and lengths."""
    if not records:
        raise ValueError("evaluation needs at least one prompt")
    from real_megatron.rollout.collect import generate_and_score

    correct = [0] * len(records)
    lengths, timeouts, crashes = [], 0, 0
    for start in range(0, len(records), batch_prompts):
        scored = generate_and_score(engine, reward_pool, tokenizer, records[start:start + batch_prompts],
                                    prompt_ids[start:start + batch_prompts], samples, sampling)
        timeouts += scored.reward_stats.get("timeouts", 0)
        crashes += scored.reward_stats.get("crashes", 0)
        for c, reward in zip(scored.completions, scored.rewards):
            correct[start + c.prompt_index] += int(reward >= 1.0)
            lengths.append(len(c.token_ids))
    result = {f"pass@{k}": sum(pass_at_k(samples, c, k) for c in correct) / len(records) for k in report_ks(samples)}
    result.update({"problems": len(records), "samples": samples, "response_length_mean": sum(lengths) / len(lengths),
                   "reward_timeouts": timeouts, "reward_crashes": crashes,
                   "correct_per_problem": correct})  # in file order: for per-problem analysis and re-checking pass@k
    return result


def prompts_beyond_context(records, prompt_ids, max_new_tokens: int, hf_config: dict) -> str | None:
    """None when every prompt plus ``max_new_tokens`` fits the model's context (the rule of
    ``context_window``), else an error naming the file, the first row that does not fit, how many do
    not, and the fix. A benchmark is scored whole or not at all: skipping rows would change its pass@k."""
    from real_megatron.context_window import context_overflow, model_context

    beyond = [(r, len(ids)) for r, ids in zip(records, prompt_ids)
              if context_overflow(len(ids), max_new_tokens, hf_config)]
    if not beyond:
        return None
    record, n_tokens = beyond[0]
    longest = max(len(ids) for ids in prompt_ids)
    return (f"{record.source_file}: row {record.row}: prompt of {n_tokens} tokens + --max-new-tokens "
            f"{max_new_tokens}: {context_overflow(n_tokens, max_new_tokens, hf_config)}; {len(beyond)} of "
            f"{len(records)} prompts in this file do not fit. Lower --max-new-tokens to <= "
            f"{model_context(hf_config) - longest} (the file's longest prompt is {longest} tokens) or evaluate a "
            "model with a longer context")


def markdown_table(results: dict, ks: list[int]) -> str:
    head = "| benchmark | problems | " + " | ".join(f"pass@{k}" for k in ks) + " | mean length |"
    lines = [head, "|" + "---|" * (len(ks) + 3)]
    for name, r in results.items():
        cells = " | ".join(f"{100 * r[f'pass@{k}']:.1f}" for k in ks)
        problems = r.get("problems", "")
        lines.append(f"| {name} | {problems} | {cells} | {r['response_length_mean']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="real-megatron evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model directory (weights, config, tokenizer)")
    parser.add_argument("--files", nargs="+", required=True, help="benchmark files (verl-style parquet or JSONL)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-new-tokens", type=int, default=8192)
    parser.add_argument("--max-prompt-length", type=int, default=2048)
    parser.add_argument("--max-problems", type=int, default=0, help="first N problems per file (0: all)")
    parser.add_argument("--engine", choices=("embedded", "sglang"), default="embedded")
    parser.add_argument("--sglang-url", default=[], action="append",
                        help="a running SGLang server; repeat for several (else sglang.Engine in-process)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--answer-after-think", action="store_true")
    parser.add_argument("--reward-workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="directory for results.json and results.md (default: print only)")
    args = parser.parse_args(argv)

    from real_megatron.checkpoint import atomic_write_text
    from real_megatron.components import load_tokenizer, make_engine
    from real_megatron.config import RolloutConfig
    from real_megatron.data import encode_prompt, load_prompts
    from real_megatron.hf_model import read_hf_config
    from real_megatron.rewards import RewardPool
    from real_megatron.rollout import SamplingParams

    model = Path(args.model)
    if not (model / "config.json").exists():
        print(f"error: --model {model}: no config.json there; give a HF model directory", flush=True)
        return 2
    for f in args.files:
        if not Path(f).exists():
            print(f"error: --files: {f} does not exist", flush=True)
            return 2
    tokenizer = load_tokenizer(model)
    hf_config = read_hf_config(model)
    benchmarks = {}
    for f in args.files:
        records = load_prompts(f, max_prompt_length=args.max_prompt_length, tokenizer=tokenizer, on_bad_row="error")
        if args.max_problems:
            records = records[:args.max_problems]
        ids = [encode_prompt(tokenizer, r.messages) for r in records]
        too_long = prompts_beyond_context(records, ids, args.max_new_tokens, hf_config)
        if too_long:
            print(f"error: {too_long}", flush=True)
            return 2
        benchmarks[Path(f).name.split(".")[0]] = (records, ids)
    engine = make_engine(RolloutConfig(engine=args.engine, sglang_urls=args.sglang_url), model, tokenizer,
                         dtype=args.dtype, load_weights=True)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                              seed=args.seed)
    results = {}
    with RewardPool(num_workers=args.reward_workers, answer_after_think=args.answer_after_think) as pool:
        try:
            for name, (records, ids) in benchmarks.items():
                results[name] = evaluate_prompts(engine, pool, tokenizer, records, ids, samples=args.samples,
                                                 sampling=sampling)
                print(f"{name}: pass@1 {100 * results[name]['pass@1']:.1f} ({len(records)} problems)", flush=True)
        finally:
            engine.close()
    ks = report_ks(args.samples)
    average = {f"pass@{k}": sum(r[f"pass@{k}"] for r in results.values()) / len(results) for k in ks}
    average["response_length_mean"] = sum(r["response_length_mean"] for r in results.values()) / len(results)
    table = markdown_table({**results, "average": average}, ks)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"model": str(model), "samples": args.samples, "temperature": args.temperature,
                   "top_p": args.top_p, "max_new_tokens": args.max_new_tokens, "benchmarks": results,
                   "average": average}
        atomic_write_text(out / "results.json", json.dumps(payload, indent=1))
        atomic_write_text(out / "results.md", table)
        print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0
