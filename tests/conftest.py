"""Fixtures shared by several test files."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def random_assets(tmp_path_factory):
    """The demo's tiny setup, built once: task files, a tokenizer trained on them, a random tiny Qwen2."""
    from real_megatron.repro.assets import build_arithmetic_assets as build_assets

    train, test, base = build_assets(tmp_path_factory.mktemp("assets"), seed=7)
    return {"train": train, "test": test, "base": base}


@pytest.fixture(scope="session")
def assets(random_assets):
    """What most tests use; a test file that needs the warmed-up model overrides it with ``warm_assets``."""
    return random_assets


@pytest.fixture(scope="session")
def warm_assets(random_assets, tmp_path_factory):
    """``random_assets`` with "base" replaced by the model after a short supervised warm-up (the real
    `real-megatron sft` command, 300 steps, ~30 s on 2 cores).

    Why: the random model never answers correctly, so every reward is 0, every REAL group is
    "solved none" and every loss and gradient is exactly 0; tests comparing losses or gradients
    across runs would then pass whatever the trainer did. The warmed model solves ~19% of the
    held-out problems at temperature 1, so RL groups have mixed rewards and nonzero gradients.
    """
    run_dir = tmp_path_factory.mktemp("warm") / "sft"
    args = [f"run_dir={run_dir}", f"model.hf_dir={random_assets['base']}", f"data.train_files=[{random_assets['train']}]",
            f"data.eval_files=[{random_assets['test']}]", "data.max_prompt_length=64", "rollout.max_new_tokens=24",
            "eval.max_prompts=8", "eval.samples=2", "eval.max_new_tokens=8", "train.steps=300",
            "train.mini_batch_prompts=16", "train.rollout_batch_prompts=16", "train.micro_batch_rollouts=64",
            "train.eval_every=0", "optim.lr=1e-3", "optim.weight_decay=0.0", "reward.num_workers=1",
            "logging.wandb_mode=disabled", "logging.progress_bar=false", "seed=7"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "real_megatron", "sft", *args], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {**random_assets, "base": run_dir / "hf"}


@pytest.fixture(scope="session")
def sglang_server(random_assets, tmp_path_factory):
    """A REAL SGLang 0.5.23 server (tests/sglang_server.py) on the tiny random Qwen2, for the session;
    killed at the end. ``.weights`` holds the HF weights it serves: a test that changes them records
    the new ones there. Fails (never skips) when the pinned SGLang environment is missing."""
    import json
    from pathlib import Path

    import sglang_server as launcher
    from safetensors.torch import load_file

    base = Path(random_assets["base"])
    srv = launcher.Server(base, tmp_path_factory.mktemp("sglang") / "server.log")
    print(f"\nSGLang server ready in {srv.start_s:.0f}s", flush=True)
    srv.model_dir = base
    srv.eos = json.loads((base / "config.json").read_text())["eos_token_id"]
    srv.weights = load_file(base / "model.safetensors")
    try:
        yield srv
    finally:
        srv.stop()
