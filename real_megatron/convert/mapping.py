"""HF (Qwen2 / Llama) names and tensors <-> full Megatron names and tensors.

"Full Megatron" is the naming and layout of a megatron-core ``GPTModel`` (local layer spec) at
TP = PP = 1 with *global* layer numbers and the *unpadded* vocabulary; the TP/PP split of a full
tensor into one rank's shard (and vocabulary padding) is ``real_megatron.megatron.sharding``'s job.
Every rule is a pure function of one Megatron tensor, so conversion streams tensor by tensor:

=====================================================  =============================================
Megatron (full)                                         HF
=====================================================  =============================================
embedding.word_embeddings.weight                        model.embed_tokens.weight
decoder.layers.{i}.input_layernorm.weight               model.layers.{i}.input_layernorm.weight
decoder.layers.{i}.self_attention.linear_qkv.weight     q_proj / k_proj / v_proj .weight, interleaved
decoder.layers.{i}.self_attention.linear_qkv.bias       q_proj / k_proj / v_proj .bias (Qwen2)
decoder.layers.{i}.self_attention.linear_proj.weight    model.layers.{i}.self_attn.o_proj.weight
decoder.layers.{i}.pre_mlp_layernorm.weight             model.layers.{i}.post_attention_layernorm.weight
decoder.layers.{i}.mlp.linear_fc1.weight                cat(gate_proj, up_proj).weight
decoder.layers.{i}.mlp.linear_fc2.weight                model.layers.{i}.mlp.down_proj.weight
decoder.final_layernorm.weight                          model.norm.weight
output_layer.weight (absent when tied)                  lm_head.weight (absent when tied)
=====================================================  =============================================

QKV interleaving: the rows of ``linear_qkv`` are ordered per query group g (= KV head):
``[q heads g·h/G … (g+1)·h/G − 1; k_g; v_g]``, each ``head_dim`` rows; the bias follows the same
order. Contiguous TP chunks of this layout therefore hold whole query groups.

The Transformer-Engine layer spec fuses the norms into the following linear layer
(``…linear_qkv.layer_norm_weight`` / ``…linear_fc1.layer_norm_weight``); ``canonical_name`` maps
those to the local-spec names used here, ``spec_name`` maps back.
"""
from __future__ import annotations

from pathlib import Path

import torch

from real_megatron.hf_model import LayoutError, check_layout, head_dim, num_kv_heads, read_hf_config
from real_megatron.megatron.sharding import LAYER_NAME, full_parameter_shapes

# per-layer names without the layer prefix: megatron suffix -> HF suffixes (in concatenation order)
_LAYER_MAP: dict[str, tuple[str, ...]] = {
    "input_layernorm.weight": ("input_layernorm.weight",),
    "self_attention.linear_qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                         "self_attn.v_proj.weight"),
    "self_attention.linear_qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
}
_GLOBAL_MAP: dict[str, tuple[str, ...]] = {
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight",),
    "decoder.final_layernorm.weight": ("model.norm.weight",),
    "output_layer.weight": ("lm_head.weight",),
}
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
# HF tensors that carry no weights (older checkpoints store rotary buffers)
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(ValueError):
    """Bad input for a conversion: the message names the file / tensor / field and the fix."""


def check_conversion_layout(hf: dict, tp: int, pp: int, where: str = "config.json") -> None:
    """``hf_model.check_layout`` (the one layout rule) with the converters' flags and error type."""
    try:
        check_layout(hf, tp=tp, pp=pp, where=where, option=lambda key, value: f"--{key} {value}")
    except LayoutError as err:
        raise ConversionError(str(err)) from err


def read_config(path) -> dict:
    """``hf_model.read_hf_config`` (dict, config.json or its directory) with the converters' error type and hints."""
    try:
        hf = read_hf_config(path)
    except FileNotFoundError as err:
        raise ConversionError(f"{err}; pass the HF model directory (the one with config.json)") from err
    except ValueError as err:
        if isinstance(path, dict):
            where = "HF config"
        else:
            where = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
        hint = " (convert only Qwen2 / Llama checkpoints)" if "architecture" in str(err) else ""
        raise ConversionError(f"{where}: {err}{hint}") from err
    return hf


def model_dims(hf: dict) -> dict:
    heads, groups = hf["num_attention_heads"], num_kv_heads(hf)
    if heads % groups:
        raise ConversionError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}")
    return {"heads": heads, "groups": groups, "head_dim": head_dim(hf), "hidden": hf["hidden_size"]}


def canonical_name(name: str) -> str:
    """Local-spec name of a (possibly Transformer-Engine-spec) Megatron parameter name."""
    for te, local in _TE_ALIASES.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def hf_names(meg_name: str) -> tuple[str, ...]:
    """HF tensor names that make up one full Megatron tensor (concatenation order)."""
    meg_name = canonical_name(meg_name)
    if meg_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[meg_name]
    m = LAYER_NAME.match(meg_name)
    if m and m.group(2) in _LAYER_MAP:
        return tuple(f"model.layers.{m.group(1)}.{s}" for s in _LAYER_MAP[m.group(2)])
    raise ConversionError(f"no HF counterpart for Megatron tensor {meg_name!r}")


def _qkv_rows(dims: dict) -> tuple[int, int]:
    return dims["heads"] // dims["groups"] * dims["head_dim"], dims["head_dim"]


def merge_qkv_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: dict) -> list[torch.Tensor]:
    """HF q/k/v (weights [rows, hidden] or biases [rows]) -> the row blocks of Megatron's fused QKV,
    whose concatenation along dim 0 is the per-query-group layout [q_g; k_g; v_g] for each group g.
    The blocks are views of q, k and v: nothing is copied."""
    q_rows, kv_rows = _qkv_rows(dims)
    blocks = []
    for g in range(dims["groups"]):
        blocks += [q[g * q_rows:(g + 1) * q_rows], k[g * kv_rows:(g + 1) * kv_rows], v[g * kv_rows:(g + 1) * kv_rows]]
    return blocks


def split_qkv_blocks(qkv: torch.Tensor, dims: dict) -> tuple[list[torch.Tensor], ...]:
    """Inverse of ``merge_qkv_blocks``: the row blocks (views of ``qkv``) of HF's q, k and v."""
    q_rows, kv_rows = _qkv_rows(dims)
    width = q_rows + 2 * kv_rows
    q, k, v = [], [], []
    for g in range(dims["groups"]):
        at = g * width
        q.append(qkv[at:at + q_rows])
        k.append(qkv[at + q_rows:at + q_rows + kv_rows])
        v.append(qkv[at + q_rows + kv_rows:at + width])
    return q, k, v


def hf_to_megatron_blocks(meg_name: str, src, hf: dict) -> list[torch.Tensor]:
    """One full Megatron tensor as row blocks (their dim-0 concatenation is the tensor), from the HF
    checkpoint ``src`` (``view(name)``: an ``HFCheckpoint``). The blocks are views of the HF
    tensors: fc1 is [gate; up], the fused QKV is its per-group q/k/v blocks, others are one tensor."""
    tensors = [src.view(n) for n in hf_names(meg_name)]
    if meg_name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return merge_qkv_blocks(*tensors, model_dims(hf))
    return tensors


def hf_to_megatron_tensor(meg_name: str, src, hf: dict) -> torch.Tensor:
    """One full Megatron tensor from the HF checkpoint ``src``, as a tensor of its own (a copy)."""
    return torch.cat(hf_to_megatron_blocks(meg_name, src, hf))


def megatron_to_hf_blocks(meg_name: str, tensor: torch.Tensor, hf: dict) -> list[tuple[str, list[torch.Tensor]]]:
    """The HF (name, row blocks) pairs of one full Megatron tensor; the blocks are views of ``tensor``."""
    names = hf_names(meg_name)
    if meg_name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return list(zip(names, split_qkv_blocks(tensor, model_dims(hf)), strict=True))
    if meg_name.endswith("linear_fc1.weight"):
        gate, up = tensor.chunk(2, dim=0)
        return [(names[0], [gate]), (names[1], [up])]
    return [(names[0], [tensor])]


def megatron_to_hf_tensors(meg_name: str, tensor: torch.Tensor, hf: dict) -> list[tuple[str, torch.Tensor]]:
    """The HF (name, tensor) pairs of one full Megatron tensor (views of ``tensor`` where they can be)."""
    return [(name, blocks[0] if len(blocks) == 1 else torch.cat(blocks))
            for name, blocks in megatron_to_hf_blocks(meg_name, tensor, hf)]


def hf_shapes(hf: dict) -> dict[str, tuple[int, ...]]:
    """Ordered names and shapes of the HF state dict the mapping expects (tied: no lm_head)."""
    dims = model_dims(hf)
    out: dict[str, tuple[int, ...]] = {}
    for meg, shape in full_parameter_shapes(hf).items():
        names = hf_names(meg)
        if meg.endswith(("linear_qkv.weight", "linear_qkv.bias")):
            rest = tuple(shape[1:])
            kv = dims["groups"] * dims["head_dim"]
            sizes = (dims["heads"] * dims["head_dim"], kv, kv)
            out.update({n: (s, *rest) for n, s in zip(names, sizes, strict=True)})
        elif meg.endswith("linear_fc1.weight"):
            out.update({n: (shape[0] // 2, *shape[1:]) for n in names})
        else:
            out[names[0]] = tuple(shape)
    return out
