"""The context rule (real_megatron/context_window.py) and the two places that apply it: config validation
(train / sft) and evaluate (per prompt; evaluate's end-to-end refusal is in test_evaluate.py)."""
from __future__ import annotations

import pytest

from real_megatron.config import ConfigError, load_config, validate_config
from real_megatron.context_window import context_overflow, model_context

HF = {"num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 256,
      "max_position_embeddings": 128}


def test_the_rule_is_prompt_plus_new_tokens_within_max_position_embeddings():
    assert model_context(HF) == 128 and model_context({}) is None
    assert context_overflow(100, 28, HF) is None  # exactly full: allowed
    assert context_overflow(100, 29, HF) == ("100 + 29 = 129 tokens exceeds the model's context "
                                             "(max_position_embeddings=128)")
    assert context_overflow(10**6, 10**6, {}) is None  # no stated context: no limit


@pytest.mark.parametrize("overrides, message", [
    (["data.max_prompt_length=64", "rollout.max_new_tokens=65"],
     r"data.max_prompt_length \+ rollout.max_new_tokens: 64 \+ 65 = 129 .* lower rollout.max_new_tokens to <= 64"),
    # evaluations during training generate eval.max_new_tokens after the same prompts: checked when there are eval files
    (["data.max_prompt_length=64", "rollout.max_new_tokens=24", "data.eval_files=[test.parquet]",
      "eval.max_new_tokens=100"],
     r"data.max_prompt_length \+ eval.max_new_tokens: 64 \+ 100 = 164 .* lower eval.max_new_tokens to <= 64"),
])
def test_train_refuses_a_config_beyond_the_context(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(load_config(None, overrides), world_size=1, hf_config=HF)


def test_eval_tokens_do_not_count_without_eval_files():
    cfg = load_config(None, ["data.max_prompt_length=64", "rollout.max_new_tokens=64", "eval.max_new_tokens=8192"])
    assert validate_config(cfg, world_size=1, hf_config=HF) == 1
