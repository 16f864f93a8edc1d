"""One dataclass tree for a run: YAML file + dotted command-line overrides, validated up front.

    cfg = load_config("examples/configs/tiny_cpu.yaml", ["loss.tau=1.0", "parallel.tp=2"])
    validate_config(cfg, world_size=2, hf_config=hf_config_dict)

Every field has a default (the paper's recipe, REFERENCE.md §2, where one exists); YAML and
overrides may set any subset. Unknown keys, wrong types and layouts that cannot work are
errors that name the field and a valid choice, raised before any process group or allocation.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from real_megatron.context_window import context_overflow, model_context


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the field and the fix."""


@dataclass
class ModelConfig:
    hf_dir: str = ""  # HF checkpoint directory (config.json, tokenizer, weights)
    megatron_dir: str = ""  # optional converted Megatron checkpoint to start from instead of hf_dir's weights
    dtype: str = "float32"  # float32 | bfloat16
    transformer_impl: str = "auto"  # auto (TE when it imports) | local | transformer_engine
    recompute_activations: bool = False  # full activation recomputation (saves memory at 7B+)
    sequence_parallel: bool = False  # Megatron sequence parallelism (needs tp > 1)


@dataclass
class DataConfig:
    train_files: list = field(default_factory=list)
    eval_files: list = field(default_factory=list)
    max_prompt_length: int = 1024
    on_bad_row: str = "error"  # error | skip (skips are counted in metrics)
    answer_after_think: bool = False  # reward only the \boxed{} answer after </think>


@dataclass
class RolloutConfig:
    engine: str = "embedded"  # embedded (transformers, CPU/GPU) | sglang
    n: int = 8  # G: rollouts per prompt
    temperature: float = 0.6
    top_p: float = 1.0
    max_new_tokens: int = 8192
    sglang_url: str = ""  # a running SGLang server; empty: sglang.Engine in the trainer's rank-0 process
    sglang_weight_sync: str = "tensor"  # tensor (colocated: update_weights_from_tensor) | distributed (NCCL broadcast)
    sglang_tp_size: int = 1  # the SGLang server's tensor-parallel size
    sglang_master_port: int = 29600  # distributed weight sync: port of the {trainer rank 0 + SGLang} group
    weight_bucket_mb: int = 512  # largest weight-sync bucket
    sglang_release_memory: bool = False  # colocated SGLang: release weights + KV cache while the trainer trains
    # embedded engine: sequences per transformers generate call (the prompts x n rollouts are cut into such
    # chunks, in order); 64 is what the engine used before this setting existed
    embedded_batch_size: int = 64


@dataclass
class RewardConfig:
    num_workers: int = 2
    timeout_s: float = 5.0


@dataclass
class LossConfig:
    name: str = "real"
    hparams: dict = field(default_factory=dict)  # passed to policy_loss, e.g. {tau: 0.5}


@dataclass
class OptimConfig:
    lr: float = 2e-6
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    use_distributed_optimizer: bool = False


@dataclass
class TrainConfig:
    steps: int = 1400  # rollout batches (each gives rollout_batch_prompts / mini_batch_prompts optimizer steps)
    rollout_batch_prompts: int = 128  # B
    mini_batch_prompts: int = 32  # prompts per optimizer step
    micro_batch_rollouts: int = 8  # rollouts per forward/backward micro-batch (per data-parallel rank)
    eval_every: int = 50
    save_every: int = 50
    log_every: int = 1


@dataclass
class EvalConfig:
    samples: int = 16  # k samples per problem
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 8192
    max_prompts: int = 0  # 0: all


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1


@dataclass
class LoggingConfig:
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "real-megatron"
    progress_bar: bool = True


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    seed: int = 1234
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ----------------------------------------------------------------------------- loading


def _check_type(path: str, value, annotation):
    """Coerce/validate one leaf value against its dataclass annotation."""
    kind = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}[annotation]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-5" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if kind is list and isinstance(value, str):
        return [value]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{path}: expected {annotation}, got {type(value).__name__} {value!r}")
    return value


def _apply(obj, data: dict, prefix: str = "") -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {sorted(fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a mapping of {sorted(f.name for f in dataclasses.fields(current))}")
            _apply(current, value, path + ".")
        elif fields[key].type == "dict" and isinstance(value, dict):
            getattr(obj, key).update(value)
        else:
            setattr(obj, key, _check_type(path, value, fields[key].type))


def parse_overrides(overrides: typing.Sequence[str]) -> dict:
    """``["loss.hparams.tau=0.5", "data.train_files=[a.parquet,b.parquet]"]`` -> nested dict (YAML values)."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. loss.name=real)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from err
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    cfg = RunConfig()
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        _apply(cfg, data)
    _apply(cfg, parse_overrides(overrides))
    return cfg


def config_to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def config_from_dict(data: dict) -> RunConfig:
    cfg = RunConfig()
    _apply(cfg, json.loads(json.dumps(data)))
    return cfg


# ----------------------------------------------------------------------------- validation


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate_layout(*, tp: int, pp: int, cp: int, world_size: int, num_heads: int, num_kv_heads: int,
                    num_layers: int) -> int:
    """Check a TP/PP/CP layout against the model and the world size; return the DP size."""
    for name, value in (("parallel.tp", tp), ("parallel.pp", pp), ("parallel.cp", cp)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    common = [d for d in _divisors(num_heads) if num_kv_heads % d == 0]
    if num_heads % tp or num_kv_heads % tp:
        raise ConfigError(
            f"parallel.tp={tp} must divide num_attention_heads={num_heads} and num_key_value_heads="
            f"{num_kv_heads}; valid choices: {common}")
    if num_layers % pp:
        raise ConfigError(f"parallel.pp={pp} must divide num_hidden_layers={num_layers}; valid choices: "
                          f"{_divisors(num_layers)}")
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = {model_parallel}; "
            f"choose a layout whose product divides {world_size}")
    return world_size // model_parallel


def validate_config(cfg: RunConfig, *, world_size: int = 1, hf_config: dict | None = None) -> int:
    """Everything that can be checked before start-up; returns the data-parallel size."""
    from real_megatron.losses import LOSSES, _resolve_hparams

    if cfg.loss.name not in LOSSES:
        raise ConfigError(f"loss.name={cfg.loss.name!r} is unknown; choose one of {sorted(LOSSES)}")
    try:
        _resolve_hparams(cfg.loss.name, dict(cfg.loss.hparams))
    except ValueError as err:
        raise ConfigError(f"loss.hparams: {err}") from err
    if cfg.rollout.engine not in ("embedded", "sglang"):
        raise ConfigError(f"rollout.engine={cfg.rollout.engine!r}; choose 'embedded' or 'sglang'")
    if cfg.rollout.sglang_weight_sync not in ("tensor", "distributed"):
        raise ConfigError(f"rollout.sglang_weight_sync={cfg.rollout.sglang_weight_sync!r}; choose 'tensor' "
                          "(colocated) or 'distributed' (separate engines, NCCL)")
    if cfg.rollout.engine == "sglang" and cfg.rollout.sglang_weight_sync == "distributed" and not cfg.rollout.sglang_url:
        raise ConfigError("rollout.sglang_weight_sync=distributed is for a separate SGLang server: set rollout.sglang_url")
    if cfg.rollout.n < 2:
        raise ConfigError(f"rollout.n={cfg.rollout.n}: REAL classifies rollouts within a group, G must be >= 2")
    if not 0 < cfg.rollout.temperature:
        raise ConfigError(f"rollout.temperature={cfg.rollout.temperature} must be > 0 (log-probs divide by it)")
    if not 0 < cfg.rollout.top_p <= 1:
        raise ConfigError(f"rollout.top_p={cfg.rollout.top_p} must be in (0, 1]")
    if cfg.rollout.embedded_batch_size < 1:
        raise ConfigError(f"rollout.embedded_batch_size={cfg.rollout.embedded_batch_size} must be >= 1 "
                          "(sequences per generate call of the embedded engine)")
    t = cfg.train
    for name in ("steps", "rollout_batch_prompts", "mini_batch_prompts", "micro_batch_rollouts"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}={getattr(t, name)} must be >= 1")
    if t.rollout_batch_prompts % t.mini_batch_prompts:
        raise ConfigError(
            f"train.rollout_batch_prompts={t.rollout_batch_prompts} is not divisible by train.mini_batch_prompts="
            f"{t.mini_batch_prompts}; valid mini-batch sizes: {_divisors(t.rollout_batch_prompts)}")
    if cfg.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.dtype={cfg.model.dtype!r}; choose float32 or bfloat16")
    if cfg.data.on_bad_row not in ("error", "skip"):
        raise ConfigError(f"data.on_bad_row={cfg.data.on_bad_row!r}; choose 'error' or 'skip'")
    if cfg.logging.wandb_mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"logging.wandb_mode={cfg.logging.wandb_mode!r}; choose offline, online or disabled")
    if cfg.model.sequence_parallel and cfg.parallel.tp == 1:
        raise ConfigError("model.sequence_parallel=true needs parallel.tp > 1")
    if hf_config is None:
        return world_size // (cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.cp)
    dp = validate_layout(
        tp=cfg.parallel.tp, pp=cfg.parallel.pp, cp=cfg.parallel.cp, world_size=world_size,
        num_heads=hf_config["num_attention_heads"],
        num_kv_heads=hf_config.get("num_key_value_heads", hf_config["num_attention_heads"]),
        num_layers=hf_config["num_hidden_layers"])
    generating = {"rollout.max_new_tokens": cfg.rollout.max_new_tokens}
    if cfg.data.eval_files:  # evaluations during training generate eval.max_new_tokens after the same prompts
        generating["eval.max_new_tokens"] = cfg.eval.max_new_tokens
    for name, new_tokens in generating.items():
        overflow = context_overflow(cfg.data.max_prompt_length, new_tokens, hf_config)
        if overflow:
            raise ConfigError(f"data.max_prompt_length + {name}: {overflow}; lower {name} to <= "
                              f"{model_context(hf_config) - cfg.data.max_prompt_length} or data.max_prompt_length")
    if cfg.parallel.cp > 1 and cfg.model.transformer_impl == "local":
        raise ConfigError("parallel.cp > 1 needs Transformer Engine attention; set model.transformer_impl=auto on a GPU "
                          "machine with transformer-engine installed, or parallel.cp=1")
    return dp
