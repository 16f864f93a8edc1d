"""The CPU demo (the README's first command): REAL training end to end, nothing downloaded.

    real-megatron demo [--run-dir runs/demo] [--real-steps 120] [--sft-steps 600] [--loss real]

1. a synthetic arithmetic task in the verl parquet schema (train / held-out test split);
2. a tokenizer trained on the task's text, and a tiny random Qwen2-architecture model (HF format);
3. a short supervised warm-up (``real-megatron sft``, Megatron-Core, cross-entropy) that leaves the
   model partially correct;
4. REAL training from there (``real-megatron train``: embedded rollout engine, math-verify
   rewards in worker processes, Megatron-Core updates through the loss hook), with held-out
   pass@1 evaluations;
5. plots of the run.

Every stage writes into ``--run-dir`` and is skipped when its output is already there, so a second
invocation resumes an interrupted demo (training itself resumes from its latest checkpoint).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# The demo's model (a Qwen2 config.json minus vocabulary and special-token ids, which come from the task's
# tokenizer): small enough for 2 CPU cores, large enough to learn the task in minutes.
DEMO_MODEL_CONFIG = {
    "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu",
    "attention_dropout": 0.0, "initializer_range": 0.02,
}


def build_assets(run_dir: Path, seed: int) -> tuple[Path, Path, Path]:
    """Task files, tokenizer and the random base model; returns (train, test, base model dir)."""
    import transformers

    from real_megatron.data import arithmetic_texts, train_task_tokenizer, write_arithmetic_task

    data_dir = run_dir / "data"
    train, test = data_dir / "train.parquet", data_dir / "test.parquet"
    if not (train.exists() and test.exists()):
        write_arithmetic_task(data_dir, n_train=147, n_test=40, seed=seed)
    base = run_dir / "base_model"
    if not (base / "config.json").exists():
        tokenizer = train_task_tokenizer(arithmetic_texts(), run_dir / "tokenizer")
        config = transformers.Qwen2Config(**DEMO_MODEL_CONFIG, vocab_size=len(tokenizer),
                                          bos_token_id=tokenizer.bos_token_id,
                                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        config.architectures = ["Qwen2ForCausalLM"]
        import torch

        torch.manual_seed(seed)
        model = transformers.Qwen2ForCausalLM(config)
        tmp = run_dir / ".tmp-base_model"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(base)
    return train, test, base


def _eval_rows(metrics: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [(r["step"], r["eval/pass@1"]) for r in rows if r.get("eval/pass@1") is not None]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="real-megatron demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--sft-steps", type=int, default=600)
    parser.add_argument("--real-steps", type=int, default=120)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--loss", default="real", help="policy loss (real, grpo, dapo, gspo, ...)")
    args = parser.parse_args(argv)

    import torch.distributed as dist

    from real_megatron.config import load_config
    from real_megatron.plots import plot_run
    from real_megatron.sft import run_sft
    from real_megatron.job_runner import setup_logging
    from real_megatron.trainer import Trainer

    setup_logging()
    started = time.perf_counter()
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    train, test, base = build_assets(run_dir, args.seed)
    common = [f"data.train_files=[{train}]", f"data.eval_files=[{test}]", "data.max_prompt_length=64",
              f"seed={args.seed}", "logging.wandb_mode=offline", "rollout.max_new_tokens=24",
              "eval.samples=8", "eval.temperature=1.0", "eval.top_p=1.0", "eval.max_new_tokens=24",
              "reward.num_workers=1", "reward.timeout_s=5.0", "train.micro_batch_rollouts=64"]

    sft_dir = run_dir / "sft"
    if not (sft_dir / "hf" / "config.json").exists():
        print(f"[demo] supervised warm-up ({args.sft_steps} steps) -> {sft_dir}", flush=True)
        cfg = load_config(None, common + [f"run_dir={sft_dir}", f"model.hf_dir={base}", f"train.steps={args.sft_steps}",
                                          "train.mini_batch_prompts=16", "train.rollout_batch_prompts=16",
                                          f"train.eval_every={args.sft_steps}", "optim.lr=1e-3",
                                          "optim.weight_decay=0.0"])
        if run_sft(cfg) != 0:
            return 1
        dist.destroy_process_group()

    real_dir = run_dir / args.loss
    print(f"[demo] {args.loss.upper()} training ({args.real_steps} rollout steps) -> {real_dir}", flush=True)
    cfg = load_config(None, common + [
        f"run_dir={real_dir}", f"model.hf_dir={sft_dir / 'hf'}", f"loss.name={args.loss}",
        f"train.steps={args.real_steps}", "train.rollout_batch_prompts=16", "train.mini_batch_prompts=16",
        "train.eval_every=20", "train.save_every=20", "rollout.n=8", "rollout.temperature=1.0", "optim.lr=1e-4",
        "optim.weight_decay=0.0"])
    code = Trainer(cfg).run()
    if dist.is_initialized():
        dist.destroy_process_group()
    if code != 0:
        return code

    plot = plot_run(real_dir)
    evals = _eval_rows(real_dir / "metrics.jsonl")
    minutes = (time.perf_counter() - started) / 60
    print(f"\n[demo] held-out pass@1: {evals[0][1]:.3f} (step {evals[0][0]}) -> {evals[-1][1]:.3f} "
          f"(step {evals[-1][0]}); {minutes:.1f} min")
    print(f"[demo] run directory: {real_dir}\n[demo] metrics: {real_dir / 'metrics.jsonl'}\n"
          f"[demo] plot: {plot}")
    return 0
