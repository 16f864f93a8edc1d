"""One dataclass tree for a run: YAML file + dotted command-line overrides, validated up front.

    cfg = load_config("examples/configs/tiny_cpu.yaml", ["loss.tau=1.0", "parallel.tp=2"])
    validate_config(cfg, world_size=2, hf_config=hf_config_dict)

Every field has a default (the paper's recipe, docs/method.md §4, where one exists); YAML and
overrides may set any subset. A field with a fixed set of values is annotated ``Literal[...]``;
its values are checked from that annotation, on loading and in ``validate_config``. Unknown keys,
wrong types, values outside a Literal and layouts that cannot work are errors that name the field
and a valid choice, raised before any process group or allocation.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from real_megatron.context_window import context_fix, context_overflow
from real_megatron.hf_model import LayoutError, check_layout, check_world, divisors
from real_megatron.weight_buckets import DEFAULT_BUCKET_BYTES


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the field and the fix."""


@dataclass
class ModelConfig:
    hf_dir: str = ""  # HF checkpoint directory (config.json, tokenizer, weights)
    megatron_dir: str = ""  # optional converted Megatron checkpoint to start from instead of hf_dir's weights
    dtype: Literal["float32", "bfloat16"] = "float32"  # parameters and activations
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"  # auto: TE when it imports
    recompute_activations: bool = False  # full activation recomputation (saves memory at 7B+)
    sequence_parallel: bool = False  # Megatron sequence parallelism (needs tp > 1)
    # log-probs straight from the output layer's input, never holding the [tokens, V/tp] logits
    # (megatron/fused_output.py); false: Megatron's output layer + megatron/logprobs.py, to compare
    fused_output: bool = True


@dataclass
class DataConfig:
    train_files: list = field(default_factory=list)
    eval_files: list = field(default_factory=list)
    max_prompt_length: int = 1024
    on_bad_row: Literal["error", "skip"] = "error"  # skips are counted in metrics
    answer_after_think: bool = False  # reward only the \boxed{} answer after </think>


@dataclass
class RolloutConfig:
    engine: Literal["embedded", "sglang"] = "embedded"  # embedded: transformers in the trainer (CPU/GPU)
    n: int = 8  # G: rollouts per prompt
    temperature: float = 0.6
    top_p: float = 1.0
    max_new_tokens: int = 8192
    # running SGLang servers, a list or one URL; empty: sglang.Engine in the trainer's rank-0 process.
    # Several servers: each prompt's n rollouts go to one of them, every weight sync reaches all.
    sglang_urls: list = field(default_factory=list)
    # tensor: colocated, update_weights_from_tensor; distributed: separate servers, NCCL broadcast
    sglang_weight_sync: Literal["tensor", "distributed"] = "tensor"
    sglang_tp_size: int = 1  # each SGLang server's tensor-parallel size
    sglang_master_port: int = 29600  # distributed weight sync: port of the {trainer rank 0 + SGLang} group
    sglang_timeout_s: float = 3600.0  # a server that does not answer a request within this is an error naming it
    weight_bucket_mb: int = DEFAULT_BUCKET_BYTES >> 20  # largest weight-sync bucket, MiB
    sglang_release_memory: bool = False  # colocated SGLang: release weights + KV cache while the trainer trains
    # embedded engine: sequences per transformers generate call (the prompts x n rollouts are cut into such
    # chunks, in order); 64 is what the engine used before this setting existed
    embedded_batch_size: int = 64
    # SGLang with train.max_staleness >= 1: new weights reach the servers during generation (requests in flight
    # are paused, take them, and continue), each token records the version that sampled it
    partial: bool = False


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
    # token positions per packed micro-batch row (megatron/batch.py); must hold the longest rollout
    max_tokens_per_micro_batch: int = 16384
    micro_batch_rollouts: int = 0  # optional cap on rollouts per micro-batch (0: none, the token budget decides)
    eval_every: int = 50
    save_every: int = 50
    # rollout batches generated ahead of training (rollout/producer.py): 0 = the synchronous loop; S >= 1: a
    # batch is trained on at most S weight versions after the weights that sampled it (1: one-step-off)
    max_staleness: int = 0


@dataclass
class EvalConfig:
    samples: int = 16  # k samples per problem
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 8192
    max_prompts: int = 0  # the first N prompts of each eval file (0: all)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1


@dataclass
class LoggingConfig:
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "real-megatron"
    progress_bar: bool = True
    update_size: bool = False  # log diag/update_rel_norm = ‖Δθ‖/‖θ‖ per optimizer step (a parameter copy per step)


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


_KINDS = {int, float, str, bool, list, dict}


def _allowed(annotation) -> tuple | None:
    """The values a ``Literal[...]`` annotation allows (None for a plain type)."""
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None


def _check_type(path: str, value, annotation):
    """Coerce/validate one leaf value against its dataclass annotation (a plain type or a Literal)."""
    allowed = _allowed(annotation)
    kind = type(allowed[0]) if allowed else annotation
    assert kind in _KINDS, f"{path}: unsupported annotation {annotation!r}"
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
        raise ConfigError(f"{path}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
    _check_allowed(path, value, annotation)
    return value


def _check_allowed(path: str, value, annotation) -> None:
    allowed = _allowed(annotation)
    if allowed is not None and value not in allowed:
        raise ConfigError(f"{path}={value!r} is not one of the allowed values {list(allowed)}")


def _apply(obj, data: dict, prefix: str = "") -> None:
    types = typing.get_type_hints(type(obj))
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in types:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {sorted(types)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                names = sorted(f.name for f in dataclasses.fields(current))
                raise ConfigError(f"{path}: expected a mapping of {names}")
            _apply(current, value, path + ".")
        elif types[key] is dict and isinstance(value, dict):
            getattr(obj, key).update(value)
        else:
            setattr(obj, key, _check_type(path, value, types[key]))


def check_allowed_values(obj, prefix: str = "") -> None:
    """Every ``Literal``-annotated field of a config tree holds one of its allowed values (a config built
    in code skips the check ``load_config`` does)."""
    types = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_allowed_values(value, f"{prefix}{f.name}.")
        else:
            _check_allowed(f"{prefix}{f.name}", value, types[f.name])


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


# ----------------------------------------------------------------------------- validation


def _positive(v) -> bool:
    return v > 0 and math.isfinite(v)


def _non_negative(v) -> bool:
    return v >= 0 and math.isfinite(v)


# Every numeric field's rule, written once: (field, test, what a valid value is); the parallel sizes have the
# layout rule of ``hf_model.check_layout``. ``validate_config`` applies
# them to a run's config; commands with flags of their own (``evaluate``) apply them to the same fields
# (``check_values`` with their flag names), so a value means the same thing everywhere.
VALUE_RULES = (
    ("rollout.temperature", _positive, "> 0 (log-probs divide by it)"),
    ("rollout.top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("rollout.max_new_tokens", lambda v: v >= 1, ">= 1 (a response needs at least its EOS)"),
    ("rollout.embedded_batch_size", lambda v: v >= 1, ">= 1 (sequences per generate call of the embedded engine)"),
    ("rollout.sglang_tp_size", lambda v: v >= 1, ">= 1"),
    ("rollout.sglang_timeout_s", _positive, "> 0 seconds"),
    ("rollout.weight_bucket_mb", lambda v: v >= 1, ">= 1 MiB"),
    ("reward.num_workers", lambda v: v >= 1, ">= 1 (rewards are verified in worker processes)"),
    ("reward.timeout_s", _positive, "> 0 seconds"),
    ("data.max_prompt_length", lambda v: v >= 1, ">= 1 token"),
    ("optim.lr", _positive, "> 0"),
    ("optim.weight_decay", _non_negative, ">= 0"),
    ("optim.clip_grad", _non_negative, ">= 0 (0: no clipping)"),
    ("optim.adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.adam_eps", _positive, "> 0"),
    ("train.steps", lambda v: v >= 1, ">= 1"),
    ("train.rollout_batch_prompts", lambda v: v >= 1, ">= 1"),
    ("train.mini_batch_prompts", lambda v: v >= 1, ">= 1"),
    ("train.max_tokens_per_micro_batch", lambda v: v >= 1, ">= 1"),
    ("train.micro_batch_rollouts", lambda v: v >= 0, ">= 0 (0: no cap)"),
    ("train.eval_every", lambda v: v >= 0, ">= 0 (0: no evaluation during training)"),
    ("train.save_every", lambda v: v >= 1, ">= 1"),
    ("train.max_staleness", lambda v: v >= 0, ">= 0 (0: the synchronous loop; S: batches generated up to S ahead)"),
    ("eval.samples", lambda v: v >= 1, ">= 1 sample per problem"),
    ("eval.temperature", _positive, "> 0"),
    ("eval.top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("eval.max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("eval.max_prompts", lambda v: v >= 0, ">= 0 (0: every prompt of each file)"),
    ("seed", lambda v: v >= 0, ">= 0"),
)


def check_values(cfg, *, fields: typing.Iterable[str] | None = None, names: dict[str, str] | None = None) -> None:
    """Apply ``VALUE_RULES`` (all, or those of ``fields``) to ``cfg``; a ``ConfigError`` names the first bad value
    by its field, or by ``names[field]`` (a command's flag, e.g. ``{"eval.samples": "--samples"}``)."""
    names = names or {}
    for path, ok, requirement in VALUE_RULES:
        if fields is not None and path not in fields:
            continue
        value = cfg
        for part in path.split("."):
            value = getattr(value, part)
        if not ok(value):
            raise ConfigError(f"{names.get(path, path)}={value!r} must be {requirement}")


def _check_token_budget(cfg: RunConfig) -> None:
    """The packed micro-batch must hold the longest rollout, in the positions its slot takes (megatron/batch.py,
    rule 1)."""
    t = cfg.train
    step = 2 * cfg.parallel.cp if cfg.parallel.cp > 1 else 1
    if cfg.model.sequence_parallel:
        step = step * cfg.parallel.tp // math.gcd(step, cfg.parallel.tp)
    needed = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    longest = -(-needed // step) * step
    if t.max_tokens_per_micro_batch < longest:
        raise ConfigError(
            f"train.max_tokens_per_micro_batch={t.max_tokens_per_micro_batch} cannot hold the longest rollout: "
            f"data.max_prompt_length + rollout.max_new_tokens = {needed}"
            + (f" ({longest} positions aligned to {step})" if longest != needed else "")
            + f"; set train.max_tokens_per_micro_batch >= {longest}")


def validate_config(cfg: RunConfig, *, world_size: int = 1, hf_config: dict | None = None) -> int:
    """Everything that can be checked before start-up; returns the data-parallel size.

    ``hf_config``: the model's config as ``hf_model.read_hf_config`` returns it; without it the
    checks that need the model's shapes (layout, context) are left to the trainer, which has it.
    """
    from real_megatron.losses import LOSSES, build_loss, check_loss_name

    check_allowed_values(cfg)
    try:
        check_loss_name(cfg.loss.name)
    except ValueError as err:
        raise ConfigError(f"loss.name: {err}") from err
    for key, why in LOSSES[cfg.loss.name].PER_CALL.items():
        if key in cfg.loss.hparams:
            raise ConfigError(f"loss.hparams.{key} cannot be set: {why}; remove it from the config")
    try:
        build_loss(cfg.loss.name, dict(cfg.loss.hparams))
    except ValueError as err:
        raise ConfigError(f"loss.hparams: {err}") from err
    if (cfg.rollout.engine == "sglang" and cfg.rollout.sglang_weight_sync == "distributed"
            and not cfg.rollout.sglang_urls):
        raise ConfigError("rollout.sglang_weight_sync=distributed is for separate SGLang servers: "
                          "set rollout.sglang_urls")
    if not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in cfg.rollout.sglang_urls):
        raise ConfigError(f"rollout.sglang_urls={cfg.rollout.sglang_urls!r}: each entry must be a URL starting with "
                          "http:// or https:// (e.g. [http://10.0.0.5:30000, http://10.0.0.6:30000])")
    if cfg.rollout.n < 2:
        raise ConfigError(f"rollout.n={cfg.rollout.n}: loss {cfg.loss.name} compares the rollouts of a prompt with "
                          "each other (labels within a group, or group-normalised advantages), so each prompt needs "
                          "rollout.n >= 2 rollouts")
    check_values(cfg)
    t = cfg.train
    if cfg.rollout.partial and (cfg.rollout.engine != "sglang" or t.max_staleness < 1):
        raise ConfigError("rollout.partial=true pushes weights into SGLang requests in flight: it needs "
                          "rollout.engine=sglang and train.max_staleness >= 1 (the embedded engine samples each "
                          "batch with one weight version)")
    if t.max_staleness >= 1 and cfg.rollout.sglang_release_memory:
        raise ConfigError("rollout.sglang_release_memory frees the engine's memory while the trainer trains, but "
                          f"train.max_staleness={t.max_staleness} generates during training: use one or the other")
    if t.rollout_batch_prompts % t.mini_batch_prompts:
        raise ConfigError(
            f"train.rollout_batch_prompts={t.rollout_batch_prompts} is not divisible by train.mini_batch_prompts="
            f"{t.mini_batch_prompts}; valid mini-batch sizes: {divisors(t.rollout_batch_prompts)}")
    if cfg.model.sequence_parallel and cfg.parallel.tp == 1:
        raise ConfigError("model.sequence_parallel=true needs parallel.tp > 1")
    p = cfg.parallel
    if hf_config is None:
        _check_token_budget(cfg)
    try:  # the one layout rule (hf_model.py); without the model only the world size can be checked
        if hf_config is None:
            return check_world(tp=p.tp, pp=p.pp, cp=p.cp, world_size=world_size)
        dp = check_layout(hf_config, tp=p.tp, pp=p.pp, cp=p.cp, world_size=world_size)
    except LayoutError as err:
        raise ConfigError(str(err)) from err
    generating = {"rollout.max_new_tokens": cfg.rollout.max_new_tokens}
    if cfg.data.eval_files:  # evaluations during training generate eval.max_new_tokens after the same prompts
        generating["eval.max_new_tokens"] = cfg.eval.max_new_tokens
    for name, new_tokens in generating.items():
        overflow = context_overflow(cfg.data.max_prompt_length, new_tokens, hf_config)
        if overflow:
            raise ConfigError(f"data.max_prompt_length + {name}: {overflow}; "
                              + context_fix(cfg.data.max_prompt_length, name, "data.max_prompt_length", hf_config))
    if cfg.parallel.cp > 1 and cfg.model.transformer_impl == "local":
        raise ConfigError("parallel.cp > 1 needs Transformer Engine attention; set model.transformer_impl=auto "
                          "on a GPU machine with transformer-engine installed, or parallel.cp=1")
    _check_token_budget(cfg)  # after the context rule: a rollout beyond the context is the first thing to fix
    return dp
