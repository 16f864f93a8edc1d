"""Config: YAML + dotted overrides, unknown keys and impossible layouts rejected up front."""
from __future__ import annotations

import pytest

from real_megatron.config import ConfigError, load_config, validate_config, validate_layout

QWEN_TINY = {"num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4,
             "max_position_embeddings": 512}


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run_dir: runs/x\nloss:\n  name: real\n  hparams: {tau: 0.5}\ntrain:\n  steps: 3\n")
    cfg = load_config(path, ["loss.hparams.tau=1.0", "parallel.tp=2", "optim.lr=1e-5",
                             "data.train_files=[a.parquet, b.parquet]", "rollout.temperature=1"])
    assert cfg.run_dir == "runs/x" and cfg.train.steps == 3
    assert cfg.loss.hparams == {"tau": 1.0} and cfg.parallel.tp == 2 and cfg.optim.lr == 1e-5
    assert cfg.data.train_files == ["a.parquet", "b.parquet"]
    assert cfg.rollout.temperature == 1.0 and isinstance(cfg.rollout.temperature, float)
    # defaults follow the paper's recipe
    assert cfg.rollout.n == 8 and cfg.train.rollout_batch_prompts == 128 and cfg.train.mini_batch_prompts == 32


@pytest.mark.parametrize("override, message", [
    ("loss.tua=0.5", "unknown config key 'loss.tua'"),
    ("train.steps=many", "train.steps: expected int"),
    ("parallel.tp=true", "parallel.tp: expected int"),
    ("steps", "not of the form section.key=value"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.tp=3"], 3, r"parallel.tp=3 must divide num_attention_heads=4 .* valid choices: \[1, 2\]"),
    (["parallel.pp=3"], 3, r"parallel.pp=3 must divide num_hidden_layers=4; valid choices: \[1, 2, 4\]"),
    (["parallel.tp=2"], 3, "world size 3 is not divisible by tp"),
    (["train.mini_batch_prompts=5"], 1, r"not divisible by train.mini_batch_prompts=5; valid mini-batch sizes"),
    (["rollout.n=1"], 1, "G must be >= 2"),
    (["rollout.embedded_batch_size=0"], 1, r"rollout.embedded_batch_size=0 must be >= 1"),
    (["loss.name=ppo"], 1, "loss.name='ppo' is unknown"),
    (["loss.hparams={tau: -1}"], 1, "loss.hparams: tau must be a positive"),
    (["rollout.max_new_tokens=600", "data.max_prompt_length=64"], 1, "exceeds the model's context"),
])
def test_impossible_configs_fail_before_start(overrides, world, message):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg, world_size=world, hf_config=QWEN_TINY)


def test_valid_layout_returns_dp():
    assert validate_layout(tp=2, pp=2, cp=1, world_size=8, num_heads=4, num_kv_heads=2, num_layers=4) == 2
    cfg = load_config(None, ["rollout.max_new_tokens=256", "data.max_prompt_length=64", "parallel.tp=2"])
    assert validate_config(cfg, world_size=4, hf_config=QWEN_TINY) == 2
