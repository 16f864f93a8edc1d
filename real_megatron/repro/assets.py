"""Task assets that need no download: a tokenizer trained on a task's text and a random tiny Qwen2 for it.

``build_arithmetic_assets`` is the smallest end-to-end set-up (one-step sums, a 2-layer model with
128 positions); the test suite and benchmarks use it. The chain task of the demo and of
``real-megatron compare`` builds its own with ``save_random_qwen2`` (``recipe.py``).
"""
from __future__ import annotations

import shutil
from pathlib import Path

# The arithmetic set-up's model (a Qwen2 config.json minus vocabulary and special-token ids, which come
# from the task's tokenizer): small enough for 2 CPU cores, large enough to learn one-step sums.
ARITHMETIC_MODEL_CONFIG = {
    "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 128, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02,
}


def save_random_qwen2(out_dir: Path, tokenizer, model_config: dict, seed: int) -> Path:
    """A randomly initialised Qwen2ForCausalLM (``model_config`` + the tokenizer's vocabulary and special
    ids) and the tokenizer, written to ``out_dir`` atomically (a temporary directory renamed at the end).
    Same arguments, same weights."""
    import torch
    import transformers

    config = transformers.Qwen2Config(**model_config, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config)
    tmp = out_dir.parent / f".tmp-{out_dir.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def build_arithmetic_assets(run_dir: Path, seed: int) -> tuple[Path, Path, Path]:
    """One-step sums (147 train / 40 held-out), their tokenizer and a random tiny model, each skipped when
    already there; returns (train file, test file, base model dir)."""
    from real_megatron.repro.arithmetic import arithmetic_texts, write_arithmetic_task
    from real_megatron.repro.tokenizer import train_task_tokenizer

    run_dir = Path(run_dir)
    data_dir = run_dir / "data"
    train, test = data_dir / "train.parquet", data_dir / "test.parquet"
    if not (train.exists() and test.exists()):
        write_arithmetic_task(data_dir, n_train=147, n_test=40, seed=seed)
    base = run_dir / "base_model"
    if not (base / "config.json").exists():
        tokenizer = train_task_tokenizer(arithmetic_texts(), run_dir / "tokenizer")
        save_random_qwen2(base, tokenizer, ARITHMETIC_MODEL_CONFIG, seed)
    return train, test, base
