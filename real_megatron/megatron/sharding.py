"""Full (unsharded) Megatron state dicts <-> this rank's TP/PP shards.

"Full" means Megatron's own parameter names and layouts as they are at TP = PP = 1, with global
layer numbers and the *unpadded* vocabulary (``hf_config["vocab_size"]`` rows). The HF converters
map HF <-> full; this module maps full <-> shards, so each layout rule is written once:

* column-parallel, split along dim 0: ``linear_qkv`` (weight and bias; rows are grouped per query
  group, so contiguous chunks keep whole groups), ``embedding.word_embeddings``, ``output_layer``
  (vocab-parallel, after padding the vocabulary with zero rows);
* ``linear_fc1`` is gated: full = [gate; up]; TP shard r = [gate_r; up_r];
* row-parallel, split along dim 1: ``linear_proj``, ``linear_fc2``;
* everything else (norms) is replicated.

Pipeline stage p holds global layers [p·L/pp, (p+1)·L/pp) under local numbers 0…L/pp−1.
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist

from real_megatron.hf_model import has_qkv_bias, head_dim, num_kv_heads
from real_megatron.megatron.model import model_hf_config, unwrap

# a per-layer Megatron parameter: ``decoder.layers.<layer number>.<rest>``
LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def split_kind(name: str) -> str:
    """How TP splits a full tensor: "column" (dim 0), "glu" ([gate; up], each on dim 0), "row" (dim 1),
    "vocab" (dim 0 after padding the vocabulary) or "replicated"."""
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return "column"
    if name.endswith("linear_fc1.weight"):
        return "glu"
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return "row"
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return "vocab"
    return "replicated"


def full_parameter_shapes(hf: dict) -> dict[str, tuple]:
    """Names and shapes of the full Megatron state dict of a Qwen2/Llama HF config."""
    hidden, layers, heads = hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"]
    groups, dim = num_kv_heads(hf), head_dim(hf)
    ffn, vocab = hf["intermediate_size"], hf["vocab_size"]
    shapes = {"embedding.word_embeddings.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"decoder.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "self_attention.linear_qkv.weight"] = ((heads + 2 * groups) * dim, hidden)
        if has_qkv_bias(hf):
            shapes[p + "self_attention.linear_qkv.bias"] = ((heads + 2 * groups) * dim,)
        shapes[p + "self_attention.linear_proj.weight"] = (hidden, heads * dim)
        shapes[p + "pre_mlp_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.linear_fc1.weight"] = (2 * ffn, hidden)
        shapes[p + "mlp.linear_fc2.weight"] = (hidden, ffn)
    shapes["decoder.final_layernorm.weight"] = (hidden,)
    if not hf.get("tie_word_embeddings", False):
        shapes["output_layer.weight"] = (vocab, hidden)
    return shapes


def stage_of(name: str, num_layers: int, pp: int) -> int:
    """Pipeline stage that owns a full tensor: its layer's stage; the embedding (also when tied) stage 0,
    the final norm and output layer the last stage."""
    m = LAYER_NAME.match(name)
    if m:
        return int(m.group(1)) // (num_layers // pp)
    return 0 if name.startswith("embedding.") else pp - 1


def layer_offset(model) -> int:
    """Global number of this stage's first layer."""
    from megatron.core import parallel_state

    gpt = unwrap(model)
    per_stage = gpt.config.num_layers // parallel_state.get_pipeline_model_parallel_world_size()
    return parallel_state.get_pipeline_model_parallel_rank() * per_stage


def global_name(local: str, offset: int) -> str:
    m = LAYER_NAME.match(local)
    return f"decoder.layers.{int(m.group(1)) + offset}.{m.group(2)}" if m else local


def shard(name: str, full: torch.Tensor, tp_rank: int, tp: int, padded_vocab: int) -> torch.Tensor:
    kind = split_kind(name)
    if kind == "replicated" or tp == 1 and kind != "vocab":
        return full
    if kind == "vocab":
        if full.shape[0] < padded_vocab:
            pad = full.new_zeros((padded_vocab - full.shape[0], *full.shape[1:]))
            full = torch.cat([full, pad])
        return full.chunk(tp, dim=0)[tp_rank]
    if kind == "column":
        return full.chunk(tp, dim=0)[tp_rank]
    if kind == "row":
        return full.chunk(tp, dim=1)[tp_rank]
    gate, up = full.chunk(2, dim=0)
    return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]])


def unshard(name: str, shards: list[torch.Tensor], vocab_size: int) -> torch.Tensor:
    kind = split_kind(name)
    if kind == "replicated":
        return shards[0]
    if kind == "vocab":
        return torch.cat(shards, dim=0)[:vocab_size]
    if kind == "column":
        return torch.cat(shards, dim=0)
    if kind == "row":
        return torch.cat(shards, dim=1)
    gates, ups = zip(*(s.chunk(2, dim=0) for s in shards), strict=True)
    return torch.cat([torch.cat(gates), torch.cat(ups)])


@torch.no_grad()
def load_full_state_dict(model, full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's shards of ``full`` into ``model`` (every parameter must be present)."""
    from megatron.core import parallel_state

    gpt = unwrap(model)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    padded = gpt.vocab_size
    offset = layer_offset(model)
    for local, param in gpt.named_parameters():
        name = global_name(local, offset)
        if name == "output_layer.weight" and gpt.share_embeddings_and_output_weights:
            name = "embedding.word_embeddings.weight"  # the last stage's copy of the tied weight
        if name not in full:
            raise KeyError(f"state dict has no {name!r} (needed by this rank's {local!r})")
        value = shard(name, full[name], tp_rank, tp, padded)
        if value.shape != param.shape:
            raise ValueError(f"{name}: shard shape {tuple(value.shape)} != parameter shape {tuple(param.shape)}")
        param.copy_(value.to(param.dtype))


@torch.no_grad()
def gather_full_state_dict(model, which: str = "param") -> dict[str, torch.Tensor]:
    """Full tensors (``which`` = "param" or "grad") assembled on every rank: TP all-gather + PP exchange.

    Meant for tests and small models (it materialises everything everywhere); the bucketed
    streaming export for weight sync lives with the converters.
    """
    from megatron.core import parallel_state

    gpt = unwrap(model)
    vocab_size = model_hf_config(model)["vocab_size"]
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    offset = layer_offset(model)
    tied_copy = gpt.share_embeddings_and_output_weights and not gpt.pre_process
    stage: dict[str, torch.Tensor] = {}
    for local, param in gpt.named_parameters():
        if local == "output_layer.weight" and tied_copy:
            continue
        name = global_name(local, offset)
        if which == "param":
            tensor = param.data
        else:
            tensor = getattr(param, "main_grad", None)
            tensor = param.grad if tensor is None else tensor
            tensor = torch.zeros_like(param.data) if tensor is None else tensor
        tensor = tensor.detach().float().clone()  # a copy: the optimizer later clips grads in place
        if tp > 1 and split_kind(name) != "replicated":
            parts = [torch.empty_like(tensor) for _ in range(tp)]
            dist.all_gather(parts, tensor, group=tp_group)
        else:
            parts = [tensor]
        stage[name] = unshard(name, parts, vocab_size).cpu()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        gathered = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(gathered, stage, group=parallel_state.get_pipeline_model_parallel_group())
        stage = {k: v for part in gathered for k, v in part.items()}
    return stage
