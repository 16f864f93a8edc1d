"""What a HF ``config.json`` says about a model, and the rules derived from it, each written once.

    hf = read_hf_config("path/to/model")                 # dict | config.json | its directory
    check_layout(hf, tp=2, pp=1, cp=1, world_size=8)     # LayoutError naming the option and valid values

Used by the Megatron model provider, the converters, config validation (``train`` / ``sft``), the
launcher (``real-megatron launch``, before submitting) and ``evaluate``. Imports neither torch nor
Megatron, so checks run in a second.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM")
_ARCH_OF_MODEL_TYPE = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


class LayoutError(ValueError):
    """A TP/PP/CP layout that cannot split this model or this world; the message names the option and valid values."""


def read_hf_config(hf_config) -> dict:
    """The config of a supported model (Qwen2 / Llama), checked and normalised (``rope_theta`` a float).

    Accepts a dict, a ``config.json`` path or a directory containing one. Raises
    ``FileNotFoundError`` when there is no file, ``ValueError`` naming what is unsupported or missing.
    """
    if isinstance(hf_config, dict):
        cfg = dict(hf_config)
    else:
        path = Path(hf_config)
        path = path / "config.json" if path.is_dir() else path
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: expected a HF config.json")
        cfg = json.loads(path.read_text())
    arch = architecture(cfg)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r} (model_type {cfg.get('model_type')!r}); "
                         f"supported: {SUPPORTED_ARCHITECTURES}")
    for key in REQUIRED_KEYS:
        if key not in cfg:
            raise ValueError(f"HF config is missing {key!r}")
    if cfg.get("mlp_bias"):
        raise ValueError("mlp_bias=True (MLP biases) is not supported by the Megatron model provider")
    # transformers 5 writes RoPE settings under rope_parameters; older configs keep rope_theta / rope_scaling
    rope = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ValueError(f"HF config uses RoPE scaling {rope_type!r}; only plain RoPE (rope_type 'default') is "
                         "supported by the Megatron model provider")
    cfg["rope_theta"] = float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    return cfg


def architecture(hf: dict) -> str:
    """The model class name (``architectures[0]``, else from ``model_type``; "?" when neither says)."""
    archs = hf.get("architectures") or [_ARCH_OF_MODEL_TYPE.get(hf.get("model_type"), "?")]
    return archs[0]


def num_kv_heads(hf: dict) -> int:
    """Key/value heads = Megatron's query groups (absent or null: as many as attention heads)."""
    return hf.get("num_key_value_heads") or hf["num_attention_heads"]


def head_dim(hf: dict) -> int:
    return hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]


def has_qkv_bias(hf: dict) -> bool:
    """Qwen2 always has q/k/v biases; Llama only with ``attention_bias``. A config that names neither an
    architecture nor a model_type (a bare dict of shapes) counts as Qwen2."""
    return architecture(hf) in ("Qwen2ForCausalLM", "?") or bool(hf.get("attention_bias", False))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _config_option(key: str, value) -> str:
    return f"parallel.{key}={value}"


def _check_positive(tp, pp, cp, option) -> None:
    for key, value in (("tp", tp), ("pp", pp), ("cp", cp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LayoutError(f"{option(key, value)} must be a positive integer")


def check_world(*, tp: int, pp: int, cp: int = 1, world_size: int,
                option: Callable[[str, object], str] = _config_option) -> int:
    """Positive sizes whose product divides the world size; returns the data-parallel size."""
    _check_positive(tp, pp, cp, option)
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise LayoutError(f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = {model_parallel}; "
                          f"choose a layout whose product divides {world_size}")
    return world_size // model_parallel


def check_layout(hf: dict, *, tp: int, pp: int, cp: int = 1, world_size: int | None = None, where: str = "",
                 option: Callable[[str, object], str] = _config_option) -> int:
    """The one layout rule: TP divides the attention heads, the KV heads (query groups) and the FFN width
    (``intermediate_size``); PP divides the layers; tp*pp*cp divides ``world_size`` when one is given.

    ``option(key, value)`` spells a setting as the caller's user typed it (``parallel.tp=3``,
    ``--tp 3``); ``where`` names the config file. Returns the data-parallel size (1 without a world size).
    """
    _check_positive(tp, pp, cp, option)
    source = f" ({where})" if where else ""
    sizes = {"num_attention_heads": hf["num_attention_heads"], "num_key_value_heads": num_kv_heads(hf),
             "intermediate_size": hf["intermediate_size"]}
    undivided = [f"{name}={value}" for name, value in sizes.items() if value % tp]
    if undivided:
        valid = [d for d in divisors(sizes["num_attention_heads"]) if all(v % d == 0 for v in sizes.values())]
        raise LayoutError(f"{option('tp', tp)} does not divide {', '.join(undivided)} (TP must divide the attention "
                          f"heads, the KV heads and intermediate_size); valid choices: {valid}{source}")
    layers = hf["num_hidden_layers"]
    if layers % pp:
        raise LayoutError(f"{option('pp', pp)} does not divide num_hidden_layers={layers}; valid choices: "
                          f"{divisors(layers)}{source}")
    return check_world(tp=tp, pp=pp, cp=cp, world_size=tp * pp * cp if world_size is None else world_size,
                       option=option)
