"""Config: YAML + dotted overrides, unknown keys and impossible layouts rejected up front."""
from __future__ import annotations

import pytest

from real_megatron.config import ConfigError, RunConfig, load_config, validate_config
from real_megatron.hf_model import LayoutError, check_layout

QWEN_TINY = {"num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4, "intermediate_size": 64,
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
    (["parallel.tp=3"], 3, r"parallel.tp=3 does not divide num_attention_heads=4, .* valid choices: \[1, 2\]"),
    (["parallel.pp=3"], 3, r"parallel.pp=3 does not divide num_hidden_layers=4; valid choices: \[1, 2, 4\]"),
    (["parallel.tp=2"], 3, "world size 3 is not divisible by tp"),
    # TP must divide the FFN width too (before, only the converters checked it: a run passed validation and failed
    # when its weights were loaded)
    (["parallel.tp=4"], 4, r"parallel.tp=4 does not divide intermediate_size=90 \(.*\); valid choices: \[1, 2\]"),
    (["parallel.tp=0"], 4, r"parallel.tp=0 must be a positive integer"),
    (["train.mini_batch_prompts=5"], 1, r"not divisible by train.mini_batch_prompts=5; valid mini-batch sizes"),
    (["rollout.n=1"], 1, "so each prompt needs rollout.n >= 2"),
    (["rollout.embedded_batch_size=0"], 1, r"rollout.embedded_batch_size=0 must be >= 1"),
    (["loss.name=ppo"], 1, r"loss.name: unknown loss 'ppo'; choose one of \['dapo', 'grpo', 'gspo', 'real', "),
    (["loss.hparams={tau: -1}"], 1, "loss.hparams: tau must be a positive"),
    (["rollout.max_new_tokens=600", "data.max_prompt_length=64"], 1, "exceeds the model's context"),
    (["train.max_tokens_per_micro_batch=300", "rollout.max_new_tokens=256", "data.max_prompt_length=64"], 1,
     r"train.max_tokens_per_micro_batch=300 cannot hold the longest rollout: .* = 320; set "
     r"train.max_tokens_per_micro_batch >= 320"),
    (["train.max_tokens_per_micro_batch=319", "rollout.max_new_tokens=255", "data.max_prompt_length=64",
      "parallel.cp=2"], 2, r"= 319 \(320 positions aligned to 4\); set train.max_tokens_per_micro_batch >= 320"),
    (["train.micro_batch_rollouts=-1"], 1, r"train.micro_batch_rollouts=-1 must be >= 0"),
    # hyperparameters the trainer sets per mini-batch itself: never silently dropped
    (["loss.name=grpo", "loss.hparams={advantages: [1.0]}"], 1,
     r"loss.hparams.advantages cannot be set: the trainer computes each mini-batch's group advantages"),
    (["loss.hparams={normalizer: 8}"], 1, r"loss.hparams.normalizer cannot be set: the trainer sets the loss denominator"),
    (["loss.hparams={num_groups: 8}"], 1, r"loss.hparams.num_groups cannot be set"),
    (["loss.hparams={kl_coef: 0.01, kl_target: reff}"], 1,
     r"loss.hparams: kl_target must be one of \('ref', 'old'\).*got 'reff'"),
    (["loss.name=dapo", "loss.hparams={kl_coef: 0.01}"], 1, r"unknown hyperparameter\(s\) \['kl_coef'\] for loss 'dapo'"),
    (["loss.name=gspo", "loss.hparams={kl_target: old}"], 1, r"unknown hyperparameter\(s\) \['kl_target'\]"),
])
def test_impossible_configs_fail_before_start(overrides, world, message):
    cfg = load_config(None, overrides)
    hf = dict(QWEN_TINY, num_attention_heads=8, num_key_value_heads=4, intermediate_size=90)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg, world_size=world, hf_config=hf if "intermediate_size=90" in message else QWEN_TINY)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-0.1", "optim.lr=-0.1 must be > 0"),
    ("optim.lr=.nan", "optim.lr=nan must be > 0"),
    ("optim.adam_beta2=1.0", r"optim.adam_beta2=1.0 must be in \[0, 1\)"),
    ("optim.weight_decay=-1", "optim.weight_decay=-1.0 must be >= 0"),
    ("eval.samples=0", "eval.samples=0 must be >= 1 sample per problem"),
    ("eval.max_prompts=-1", r"eval.max_prompts=-1 must be >= 0 \(0: every prompt of each file\)"),
    ("eval.top_p=2", r"eval.top_p=2.0 must be in \(0, 1\]"),
    ("reward.num_workers=0", "reward.num_workers=0 must be >= 1"),
    ("reward.timeout_s=0", "reward.timeout_s=0.0 must be > 0 seconds"),
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens=0 must be >= 1"),
    ("train.save_every=0", "train.save_every=0 must be >= 1"),
    ("train.eval_every=-1", "train.eval_every=-1 must be >= 0"),
    ("data.max_prompt_length=0", "data.max_prompt_length=0 must be >= 1 token"),
    ("seed=-3", "seed=-3 must be >= 0"),
])
def test_every_numeric_value_is_checked_with_its_rule(override, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(load_config(None, [override]), world_size=1, hf_config=QWEN_TINY)


def test_value_rules_name_a_commands_own_flags():
    """``evaluate`` checks its flags with the config's rules, naming the flag."""
    from real_megatron.config import EvalConfig, RunConfig, check_values

    cfg = RunConfig(eval=EvalConfig(samples=0))
    with pytest.raises(ConfigError, match=r"^--samples=0 must be >= 1"):
        check_values(cfg, fields={"eval.samples"}, names={"eval.samples": "--samples"})
    check_values(RunConfig(), fields={"eval.samples"})  # the defaults pass
    check_values(RunConfig())


def test_valid_layout_returns_dp():
    assert check_layout(QWEN_TINY, tp=2, pp=2, cp=1, world_size=8) == 2
    assert check_layout(dict(QWEN_TINY, num_key_value_heads=None), tp=4, pp=1) == 1  # null KV heads: = heads
    with pytest.raises(LayoutError, match=r"--tp 8 does not divide num_attention_heads=4"):
        check_layout(QWEN_TINY, tp=8, pp=1, option=lambda key, value: f"--{key} {value}")
    cfg = load_config(None, ["rollout.max_new_tokens=256", "data.max_prompt_length=64", "parallel.tp=2"])
    assert validate_config(cfg, world_size=4, hf_config=QWEN_TINY) == 2
    # without the model, the world size is still checked (before, dp was floor(world / tp*pp*cp))
    with pytest.raises(ConfigError, match="world size 6 is not divisible by tp"):
        validate_config(load_config(None, ["parallel.tp=4"]), world_size=6)


@pytest.mark.parametrize("override, field, allowed", [
    ("model.dtype=float16", "model.dtype", "['float32', 'bfloat16']"),
    ("model.transformer_impl=te", "model.transformer_impl", "['auto', 'local', 'transformer_engine']"),
    ("rollout.engine=vllm", "rollout.engine", "['embedded', 'sglang']"),
    ("rollout.sglang_weight_sync=nccl", "rollout.sglang_weight_sync", "['tensor', 'distributed']"),
    ("data.on_bad_row=ignore", "data.on_bad_row", "['error', 'skip']"),
    ("logging.wandb_mode=silent", "logging.wandb_mode", "['offline', 'online', 'disabled']"),
])
def test_a_value_outside_its_literal_names_the_field_and_the_allowed_values(override, field, allowed):
    value = override.split("=", 1)[1]
    message = f"{field}={value!r} is not one of the allowed values {allowed}"
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message
    # a config built in code is checked from the same annotation by validate_config
    cfg = RunConfig()
    section, key = field.split(".")
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, world_size=1, hf_config=QWEN_TINY)
    assert str(err.value) == message
    with pytest.raises(ConfigError, match=rf"{field}: expected str, got int"):
        load_config(None, [f"{field}=3"])


def test_every_literal_default_is_allowed():
    validate_config(RunConfig(), world_size=1)  # the defaults pass the generic check (and every other one)
