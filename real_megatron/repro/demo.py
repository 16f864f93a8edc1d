"""The CPU demo (the README's first command): REAL on a multi-step reasoning task, nothing downloaded.

    real-megatron demo [--run-dir runs/demo] [--loss real] [--steps N] [--warmup-steps N] [--seed S]

1. the chain task (``repro/chains.py``: arithmetic chains of 1–8 steps, five held-out levels), its
   tokenizer, and a tiny random Qwen2 (``recipe.py`` holds every setting);
2. a supervised warm-up (``real-megatron sft``, Megatron-Core, cross-entropy on reference
   solutions of the easy levels) that leaves the model partially competent;
3. RL with REAL from there (``real-megatron train``: embedded rollout engine, math-verify rewards
   in worker processes, Megatron-Core updates through the loss hook), with held-out pass@1 per
   level before, during and after;
4. plots of the run.

Every stage writes into ``--run-dir`` and is skipped when its output is already there, so a second
invocation resumes an interrupted demo (training itself resumes from its latest checkpoint).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _evals(metrics: Path) -> list[dict]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("eval/pass@1") is not None]


def _levels(row: dict) -> str:
    levels = sorted(k.split("/")[1] for k in row if k.startswith("eval/level") and k.endswith("/pass@1"))
    return " ".join(f"{name[len('level'):]}:{row[f'eval/{name}/pass@1']:.2f}" for name in levels)


def main(argv=None) -> int:
    from real_megatron.repro import recipe

    parser = argparse.ArgumentParser(prog="real-megatron demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--warmup-steps", type=int, default=recipe.WARMUP_STEPS)
    parser.add_argument("--steps", type=int, default=recipe.RL_STEPS, help="RL rollout steps")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--loss", default="real", help="policy loss (real, grpo, dapo, gspo, real_bce, real_no_anchor)")
    args = parser.parse_args(argv)

    import torch.distributed as dist

    from real_megatron.config import load_config
    from real_megatron.job_runner import setup_logging
    from real_megatron.plots import plot_run
    from real_megatron.trainer import train

    setup_logging()
    started = time.perf_counter()
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    assets = recipe.build_chain_assets(run_dir / "task")
    print(f"[demo] supervised warm-up ({args.warmup_steps} steps, levels {list(recipe.WARMUP_LEVELS)}) -> "
          f"{run_dir / 'warmup'}", flush=True)
    warm = recipe.run_warmup(run_dir / "warmup", assets, steps=args.warmup_steps)

    rl_dir = run_dir / args.loss
    print(f"[demo] {args.loss.upper()} training ({args.steps} rollout steps) -> {rl_dir}", flush=True)
    cfg = load_config(None, recipe.rl_overrides(assets, init_dir=warm, run_dir=rl_dir, loss=args.loss, seed=args.seed,
                                                steps=args.steps))
    try:  # a directory of another demo version or other flags must not be resumed as this run
        recipe.check_saved_config(rl_dir, cfg)
    except ValueError as err:
        print(f"error: {err}", flush=True)
        return 2
    code = train(cfg)
    if dist.is_initialized():
        dist.destroy_process_group()
    if code != 0:
        return code

    plot = plot_run(rl_dir)
    evals = _evals(rl_dir / "metrics.jsonl")
    first, last = evals[0], evals[-1]
    minutes = (time.perf_counter() - started) / 60
    print(f"\n[demo] held-out pass@1 (average of levels 1-5): {first['eval/pass@1']:.3f} (after the warm-up) -> "
          f"{last['eval/pass@1']:.3f} (after {args.steps} RL steps); {minutes:.1f} min")
    print(f"[demo] per level, before: {_levels(first)}\n[demo] per level, after:  {_levels(last)}")
    print(f"[demo] run directory: {rl_dir}\n[demo] metrics: {rl_dir / 'metrics.jsonl'}\n[demo] plot: {plot}")
    return 0
