"""pass@k evaluation, the paper's protocol by default.

    real-megatron evaluate --model HF_DIR --files data/aime24.parquet data/math500.parquet \
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

import json
import math
import sys
from pathlib import Path

from real_megatron.arguments import ArgumentParser


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
    length_sums = [0] * len(records)
    lengths, timeouts, crashes = [], 0, 0
    for start in range(0, len(records), batch_prompts):
        scored = generate_and_score(engine, reward_pool, tokenizer, records[start:start + batch_prompts],
                                    prompt_ids[start:start + batch_prompts], samples, sampling)
        timeouts += scored.reward_stats.get("timeouts", 0)
        crashes += scored.reward_stats.get("crashes", 0)
        for c, reward in zip(scored.completions, scored.rewards, strict=True):
            correct[start + c.prompt_index] += int(reward >= 1.0)
            length_sums[start + c.prompt_index] += len(c.token_ids)
            lengths.append(len(c.token_ids))
    result = {f"pass@{k}": sum(pass_at_k(samples, c, k) for c in correct) / len(records) for k in report_ks(samples)}
    result.update({"problems": len(records), "samples": samples, "response_length_mean": sum(lengths) / len(lengths),
                   "reward_timeouts": timeouts, "reward_crashes": crashes,
                   # in file order: for per-problem analysis, re-checking pass@k and per-benchmark splits
                   "correct_per_problem": correct, "length_per_problem": length_sums})
    return result


def first_per_file(records, max_prompts: int) -> list:
    """The first ``max_prompts`` records of each source file (0: all), in order — each file is one benchmark."""
    if not max_prompts:
        return list(records)
    taken: dict[str, int] = {}
    kept = []
    for r in records:
        taken[r.source_file] = taken.get(r.source_file, 0) + 1
        if taken[r.source_file] <= max_prompts:
            kept.append(r)
    return kept


def benchmark_names(files) -> dict[str, str]:
    """Each benchmark file's name in results and metrics: its stem (``aime24`` for ``data/aime24.parquet``),
    or its whole path when two files share a stem."""
    files = list(dict.fromkeys(str(f) for f in files))
    unique = len({Path(f).stem for f in files}) == len(files)
    return {f: Path(f).stem if unique else f for f in files}


def evaluate_benchmarks(engine, reward_pool, tokenizer, records, prompt_ids, *, samples: int, sampling) -> dict:
    """Every record's ``samples`` responses in one pass (``evaluate_prompts``), then split by source file.

    Returns ``{"overall": <evaluate_prompts result over all records>, "benchmarks": {name: result}}``; a
    benchmark's result has ``pass@k`` for ``report_ks(samples)`` — pass@1 the mean of all its 0/1 scores,
    pass@k (k > 1) the unbiased estimator averaged over its problems — ``problems``, ``samples``,
    ``response_length_mean`` and ``correct_per_problem``. The one evaluation behind ``train``, ``sft`` and
    ``real-megatron evaluate``."""
    overall = evaluate_prompts(engine, reward_pool, tokenizer, records, prompt_ids, samples=samples, sampling=sampling)
    names = benchmark_names(r.source_file for r in records)
    benchmarks = {}
    for f, name in names.items():
        rows = [i for i, r in enumerate(records) if r.source_file == f]
        correct = [overall["correct_per_problem"][i] for i in rows]
        result = {"pass@1": sum(correct) / (len(correct) * samples)}
        result.update({f"pass@{k}": sum(pass_at_k(samples, c, k) for c in correct) / len(correct)
                       for k in report_ks(samples) if k > 1})
        result.update({"problems": len(rows), "samples": samples,
                       "response_length_mean": sum(overall["length_per_problem"][i] for i in rows) / (len(rows) * samples),
                       "correct_per_problem": correct})
        benchmarks[name] = result
    return {"overall": overall, "benchmarks": benchmarks}


def metrics_row(results: dict, samples: int) -> dict:
    """The ``eval/*`` metrics of an ``evaluate_benchmarks`` result: pass@1, pass@``samples`` and the mean response
    length over all problems; with several benchmarks, each one's pass@1 and ``eval/pass@1`` their mean (Table 1's
    average)."""
    overall, benchmarks = results["overall"], results["benchmarks"]
    row = {"eval/pass@1": overall["pass@1"], f"eval/pass@{samples}": overall[f"pass@{samples}"],
           "eval/response_length_mean": overall["response_length_mean"]}
    if len(benchmarks) > 1:
        row.update({f"eval/{name}/pass@1": r["pass@1"] for name, r in benchmarks.items()})
        row["eval/pass@1"] = sum(r["pass@1"] for r in benchmarks.values()) / len(benchmarks)
    return row


def prompts_beyond_context(records, prompt_ids, max_new_tokens: int, hf_config: dict) -> str | None:
    """None when every prompt plus ``max_new_tokens`` fits the model's context (the rule of
    ``context_window``), else an error naming the file, the first row that does not fit, how many do
    not, and the fix. A benchmark is scored whole or not at all: skipping rows would change its pass@k."""
    from real_megatron.context_window import context_fix, context_overflow

    beyond = [(r, len(ids)) for r, ids in zip(records, prompt_ids, strict=True)
              if context_overflow(len(ids), max_new_tokens, hf_config)]
    if not beyond:
        return None
    record, n_tokens = beyond[0]
    longest = max(len(ids) for ids in prompt_ids)
    return (f"{record.source_file}: row {record.row}: prompt of {n_tokens} tokens + --max-new-tokens "
            f"{max_new_tokens}: {context_overflow(n_tokens, max_new_tokens, hf_config)}; {len(beyond)} of "
            f"{len(records)} prompts do not fit (the longest is {longest} tokens). "
            + context_fix(longest, "--max-new-tokens", "--max-prompt-length (prompts longer are refused)", hf_config))


def markdown_table(results: dict, ks: list[int]) -> str:
    head = "| benchmark | problems | " + " | ".join(f"pass@{k}" for k in ks) + " | mean length |"
    lines = [head, "|" + "---|" * (len(ks) + 3)]
    for name, r in results.items():
        cells = " | ".join(f"{100 * r[f'pass@{k}']:.1f}" for k in ks)
        problems = r.get("problems", "")
        lines.append(f"| {name} | {problems} | {cells} | {r['response_length_mean']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from real_megatron.config import DataConfig, EvalConfig, RewardConfig

    e, d, r = EvalConfig(), DataConfig(), RewardConfig()  # the defaults of train's eval.*, data.*, reward.*
    parser = ArgumentParser(prog="real-megatron evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model directory (weights, config, tokenizer)")
    parser.add_argument("--files", nargs="+", required=True, help="benchmark files (verl-style parquet or JSONL)")
    parser.add_argument("--samples", type=int, default=e.samples)
    parser.add_argument("--temperature", type=float, default=e.temperature)
    parser.add_argument("--top-p", type=float, default=e.top_p)
    parser.add_argument("--max-new-tokens", type=int, default=e.max_new_tokens)
    parser.add_argument("--max-prompt-length", type=int, default=d.max_prompt_length)
    parser.add_argument("--max-problems", type=int, default=e.max_prompts, help="first N problems per file (0: all)")
    parser.add_argument("--engine", choices=("embedded", "sglang"), default="embedded")
    parser.add_argument("--sglang-url", default=[], action="append",
                        help="a running SGLang server; repeat for several (else sglang.Engine in-process)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--answer-after-think", action="store_true")
    parser.add_argument("--reward-workers", type=int, default=r.num_workers)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="directory for results.json and results.md (default: print only)")
    args = parser.parse_args(argv)
    try:
        prepared = _prepare(args)
    except ValueError as err:  # ConfigError, a bad prompt row, an unreadable checkpoint: each names the fix
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return _run(args, *prepared)


def _prepare(args):
    """Everything checked before a model loads or a file is written: the flags (by the config's own rules),
    ``--out``, the model directory and its weights, every benchmark file and prompt. Returns what ``_run`` needs."""
    from real_megatron.components import load_prompt_files, load_tokenizer
    from real_megatron.config import ConfigError, DataConfig, EvalConfig, RewardConfig, RunConfig, check_values
    from real_megatron.convert import ConversionError
    from real_megatron.convert.hf_io import HFCheckpoint
    from real_megatron.data import encode_prompt
    from real_megatron.hf_model import read_hf_config
    from real_megatron.run_dir import check_output_dir

    flags = {"eval.samples": "--samples", "eval.temperature": "--temperature", "eval.top_p": "--top-p",
             "eval.max_new_tokens": "--max-new-tokens", "eval.max_prompts": "--max-problems",
             "data.max_prompt_length": "--max-prompt-length", "reward.num_workers": "--reward-workers"}
    cfg = RunConfig(eval=EvalConfig(samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                                    max_new_tokens=args.max_new_tokens, max_prompts=args.max_problems),
                    data=DataConfig(max_prompt_length=args.max_prompt_length),
                    reward=RewardConfig(num_workers=args.reward_workers))
    check_values(cfg, fields=flags, names=flags)
    if args.out:
        check_output_dir(Path(args.out), "--out", ("results.json", "results.md"))
    model = Path(args.model)
    if not (model / "config.json").exists():
        raise ConfigError(f"--model {model}: no config.json there; give a HF model directory")
    for f in args.files:
        if not Path(f).exists():
            raise ConfigError(f"--files: {f} does not exist")
    try:  # the weights' headers and sizes, before the engine loads them (a truncated file is named)
        with HFCheckpoint(model) as checkpoint:
            checkpoint.validate()
    except ConversionError as err:
        raise ConfigError(f"--model: {err}") from err
    tokenizer = load_tokenizer(model)
    records, _ = load_prompt_files(args.files, tokenizer=tokenizer, max_prompt_length=args.max_prompt_length,
                                   on_bad_row="error")
    records = first_per_file(records, args.max_problems)
    ids = [encode_prompt(tokenizer, rec.messages) for rec in records]
    too_long = prompts_beyond_context(records, ids, args.max_new_tokens, read_hf_config(model))
    if too_long:
        raise ConfigError(too_long)
    return model, tokenizer, records, ids


def _run(args, model, tokenizer, records, ids) -> int:
    from real_megatron.checkpoint import atomic_write_text
    from real_megatron.components import make_engine
    from real_megatron.config import RolloutConfig
    from real_megatron.rewards import RewardPool
    from real_megatron.rollout import SamplingParams

    engine = make_engine(RolloutConfig(engine=args.engine, sglang_urls=args.sglang_url), model, tokenizer,
                         dtype=args.dtype, load_weights=True)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                              seed=args.seed)
    with RewardPool(num_workers=args.reward_workers, answer_after_think=args.answer_after_think) as pool:
        try:
            results = evaluate_benchmarks(engine, pool, tokenizer, records, ids, samples=args.samples,
                                          sampling=sampling)["benchmarks"]
        finally:
            engine.close()
    for name, result in results.items():
        print(f"{name}: pass@1 {100 * result['pass@1']:.1f} ({result['problems']} problems)", flush=True)
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
