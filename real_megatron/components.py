"""The pieces ``train``, ``sft`` and ``evaluate`` assemble a run from: the model directory, the tokenizer,
the prompt files, the initial weights, and the one rollout-engine factory.

Below the trainer and the evaluator (both import from here; nothing here imports them). Every check
raises ``ConfigError`` naming the field and the fix, before anything expensive starts.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from real_megatron.config import ConfigError, RolloutConfig, RunConfig
from real_megatron.dtypes import torch_dtype


def read_model_dir(cfg: RunConfig) -> dict:
    """The HF config of ``model.hf_dir``, checked before anything starts."""
    from real_megatron.hf_model import read_hf_config

    if not cfg.model.hf_dir:
        raise ConfigError("model.hf_dir is empty: point it at a HF model directory (config.json + tokenizer)")
    path = Path(cfg.model.hf_dir)
    if not (path / "config.json").exists():
        raise ConfigError(f"model.hf_dir={path}: no config.json there; give a HF model directory")
    return read_hf_config(path / "config.json")


def check_data_files(cfg: RunConfig) -> None:
    """``data.train_files`` is not empty and every train/eval file exists."""
    if not cfg.data.train_files:
        raise ConfigError("data.train_files is empty: give one or more parquet/JSONL prompt files")
    for field_name in ("train_files", "eval_files"):
        for f in getattr(cfg.data, field_name):
            if not Path(f).exists():
                raise ConfigError(f"data.{field_name}: {f} does not exist")


def load_prompt_files(files, *, tokenizer, max_prompt_length: int, on_bad_row: str):
    """All records of several files as one list (indices renumbered 0..n-1), plus the skip counts by reason."""
    from real_megatron.data import load_prompts

    records, skipped = [], {}
    for f in files:
        try:
            part = load_prompts(f, max_prompt_length=max_prompt_length, tokenizer=tokenizer, on_bad_row=on_bad_row)
        except ValueError as err:  # the message names the file and the row; a config error, not a bug
            raise ConfigError(str(err)) from err
        for reason, count in part.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
        records.extend(part)
    for i, r in enumerate(records):
        r.index = i
    if not records:
        raise ConfigError(f"no usable prompts in {list(files)} (skipped: {skipped})")
    return records, skipped


def load_tokenizer(hf_dir):
    """The model directory's tokenizer; it must have an EOS token (generation stops on it)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    if tok.eos_token_id is None:
        raise ConfigError(f"the tokenizer in {hf_dir} has no eos_token: generation could never stop")
    return tok


def pad_id_of(tokenizer) -> int:
    """The padding id: the tokenizer's pad token, else its EOS token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_initial_weights(cfg: RunConfig, chunks) -> str:
    """Load ``model.megatron_dir`` (if set) or ``model.hf_dir`` into the Megatron model; returns which."""
    from real_megatron.convert import load_hf_into, load_megatron_checkpoint_into

    if cfg.model.megatron_dir:
        load_megatron_checkpoint_into(chunks, cfg.model.megatron_dir)
        return cfg.model.megatron_dir
    load_hf_into(chunks, cfg.model.hf_dir)
    return cfg.model.hf_dir


def warn_if_cores_oversubscribed(device: torch.device) -> None:
    """The embedded engine generating beside training on the CPU: its process and this node's trainer ranks
    each run ``torch.get_num_threads()`` threads; more threads than cores made S = 1 slower than S = 0
    (measured on 2 cores: 0.56×, docs/results.md), so say so once, with the fix."""
    if device.type != "cpu":
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) + 1  # the trainer ranks here and the engine
    threads = torch.get_num_threads()
    if processes * threads > cores:
        logging.getLogger("real_megatron").warning(
            "train.max_staleness >= 1 with the embedded engine on the CPU: %d processes x %d threads on %d cores; "
            "generation and training will slow each other down (measured: slower than max_staleness=0). Set "
            "OMP_NUM_THREADS=%d, or train.max_staleness=0", processes, threads, cores, max(1, cores // processes))


def make_engine(rollout: RolloutConfig, hf_dir, tokenizer, *, dtype: str, load_weights: bool = False,
                background: bool = False):
    """The rollout engine ``rollout.engine`` names, for the model in ``hf_dir`` (rank 0 only).

    ``load_weights=False`` (training): the embedded engine starts with random weights and gets the
    trainer's right after; ``True`` (evaluation): it loads ``hf_dir``'s weights itself. ``background``: the
    embedded engine generates beside training (``train.max_staleness`` ≥ 1), so it runs in a process of its
    own (``rollout/engine_process.py``). An SGLang engine always holds its server's (or its in-process
    engine's ``model_path``) weights; with ``rollout.sglang_weight_sync=distributed`` it joins the weight
    broadcast group here.
    """
    from functools import partial

    from real_megatron.distributed import compute_device

    if rollout.engine == "embedded":
        from real_megatron.rollout.transformers_engine import TransformersEngine

        factory = partial(TransformersEngine, str(hf_dir), eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=pad_id_of(tokenizer), dtype=torch_dtype(dtype), device=compute_device(),
                          batch_size=rollout.embedded_batch_size,
                          load_weights_from=str(hf_dir) if load_weights else None)
        if background:
            from real_megatron.rollout.engine_process import EngineProcess

            warn_if_cores_oversubscribed(compute_device())
            return EngineProcess(factory, name="embedded rollout engine")
        return factory()
    from real_megatron.rollout.sglang_engine import SGLangEngine

    common = {"eos_token_id": tokenizer.eos_token_id, "weight_sync": rollout.sglang_weight_sync,
              "tp_size": rollout.sglang_tp_size, "request_timeout_s": rollout.sglang_timeout_s,
              "partial": rollout.partial}
    if not rollout.sglang_urls:
        return SGLangEngine(engine_kwargs={"model_path": str(hf_dir), "tp_size": rollout.sglang_tp_size}, **common)
    engine = SGLangEngine(rollout.sglang_urls, **common)
    if rollout.sglang_weight_sync == "distributed":  # join the {trainer rank 0 + every server's ranks} broadcast group
        # NCCL between GPUs; gloo when the trainer runs on the CPU (what the CPU tests exercise)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        engine.init_weights_update_group(os.environ.get("MASTER_ADDR", "127.0.0.1"), rollout.sglang_master_port,
                                         backend=backend)
    return engine
