"""GPU end-to-end smoke: the demo's assets, 600 SFT steps and 20 REAL steps on CUDA, embedded engine on the GPU.

    python benchmarks/gpu_train_smoke.py OUT_DIR bfloat16   # or float32

Prints held-out pass@1 before/after, a few metric rows, times and peak GPU memory.
"""
import json
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    import torch
    import torch.distributed as dist

    from real_megatron.config import load_config
    from real_megatron.job_runner import setup_logging
    from real_megatron.repro.assets import build_arithmetic_assets as build_assets
    from real_megatron.sft import run_sft
    from real_megatron.trainer import train as run_training

    setup_logging()
    out = Path(sys.argv[1])
    train, test, base = build_assets(out, 1234)
    common = [f"data.train_files=[{train}]", f"data.eval_files=[{test}]", "data.max_prompt_length=64",
              "logging.wandb_mode=disabled", "logging.progress_bar=false", "rollout.max_new_tokens=24",
              "eval.samples=8", "eval.temperature=1.0", "eval.top_p=1.0", "eval.max_new_tokens=24",
              "reward.num_workers=2", "train.micro_batch_rollouts=64", f"model.dtype={sys.argv[2]}",
              "model.transformer_impl=local"]
    t0 = time.time()
    assert run_sft(load_config(None, common + [f"run_dir={out}/sft", f"model.hf_dir={base}", "train.steps=600",
                                               "train.mini_batch_prompts=16", "train.rollout_batch_prompts=16",
                                               "train.eval_every=600", "optim.lr=1e-3", "optim.weight_decay=0.0"])) == 0
    dist.destroy_process_group()
    t1 = time.time()
    cfg = load_config(None, common + [f"run_dir={out}/real", f"model.hf_dir={out}/sft/hf", "train.steps=20",
                                      "train.rollout_batch_prompts=16", "train.mini_batch_prompts=16",
                                      "train.eval_every=10", "train.save_every=10", "rollout.n=8",
                                      "rollout.temperature=1.0", "optim.lr=1e-4", "optim.weight_decay=0.0"])
    assert run_training(cfg) == 0
    t2 = time.time()
    rows = [json.loads(line) for line in (out / "real" / "metrics.jsonl").read_text().splitlines()]
    sft_rows = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    print("SFT", [(r["step"], r.get("train/loss"), r.get("eval/pass@1")) for r in sft_rows if r["step"] in (0, 1, 300, 600)])
    from real_megatron.rewards import math_reward
    print("MATHREWARD", math_reward("\\boxed{7}", "7"))
    keys = ["reward/crashes", "reward/timeouts", "train/skipped_steps", "train/response_length_mean", "train/loss", "train/reward_mean", "train/entropy", "train/grad_norm", "rollout/logprob_abs_diff_mean",
            "time/rollout_s", "time/logprob_s", "time/update_s", "time/sync_s"]
    print("EVAL", [(r["step"], r["eval/pass@1"]) for r in rows if "eval/pass@1" in r])
    for r in rows:
        if "train/loss" in r and r["step"] in (1, 10, 20):
            print("ROW", r["step"], {k: round(r[k], 6) for k in keys if r.get(k) is not None})
    print(f"TIMES sft {t1 - t0:.1f}s real {t2 - t1:.1f}s; device {torch.cuda.get_device_name()}; "
          f"max memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
