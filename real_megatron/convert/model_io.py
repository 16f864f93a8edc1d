"""Weights in and out of a built (possibly TP/PP-sharded) Megatron model in memory.

* ``iter_hf_tensors``: the live weights as full HF-named tensors, in bounded buckets, for weight
  sync to the rollout engine (and for export). Every rank calls it and iterates it to the end.
* ``load_hf_into`` / ``load_megatron_checkpoint_into``: fill this rank's parameters from a HF
  directory or a converted Megatron checkpoint (any saved TP/PP: resharded on the fly). Each rank
  reads only the tensors its own shards need. Call them before the optimizer is built (a
  distributed optimizer keeps fp32 master copies made at construction).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from real_megatron.convert.mapping import ConversionError, hf_to_megatron_tensor, megatron_to_hf_tensors, read_config
from real_megatron.megatron.sharding import full_parameter_shapes, stage_of
from real_megatron.weight_buckets import DEFAULT_BUCKET_BYTES, iter_buckets


def _as_list(model_chunks) -> list:
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    if len(chunks) != 1:
        raise ValueError(f"expected one model chunk per rank (virtual pipelining is not used), got {len(chunks)}")
    return chunks


def _model_hf(chunk, hf_config=None) -> dict:
    from real_megatron.megatron.model import model_hf_config

    return read_config(hf_config if hf_config is not None else model_hf_config(chunk))


def _named_global_params(chunk):
    """(global full name, parameter) of this rank's chunk; a tied last stage's output_layer maps to the
    embedding (its copy). Yields nothing twice."""
    from real_megatron.megatron.model import unwrap
    from real_megatron.megatron.sharding import global_name, layer_offset

    gpt = unwrap(chunk)
    offset = layer_offset(chunk)
    for local, param in gpt.named_parameters():
        name = global_name(local, offset)
        if name == "output_layer.weight" and gpt.share_embeddings_and_output_weights:
            name = "embedding.word_embeddings.weight"
        yield local, name, param


def _check_same_model(model_hf: dict, other: dict, where: str) -> None:
    if full_parameter_shapes(model_hf) != full_parameter_shapes(other):
        diff = [f for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                            "intermediate_size", "vocab_size", "tie_word_embeddings", "head_dim")
                if model_hf.get(f) != other.get(f)]
        raise ConversionError(f"{where}: the checkpoint's config differs from the model's in {diff or 'shapes'}; "
                              f"load the checkpoint made for this model")


@torch.no_grad()
def _copy_into(chunk, get_shard) -> int:
    from real_megatron.megatron.model import unwrap

    count = 0
    for local, name, param in _named_global_params(chunk):
        value = get_shard(name, unwrap(chunk).vocab_size)
        if tuple(value.shape) != tuple(param.shape):
            raise ConversionError(f"{name}: checkpoint shard shape {tuple(value.shape)} != this rank's parameter "
                                  f"{local!r} shape {tuple(param.shape)}")
        param.copy_(value.to(device=param.device, dtype=param.dtype))
        count += 1
    return count


def load_hf_into(model_chunks, hf_dir) -> None:
    """Copy this rank's shards of a HF checkpoint's weights into the built model (dtype cast to the model's)."""
    from megatron.core import parallel_state

    from real_megatron.convert.hf_io import HFCheckpoint
    from real_megatron.megatron.sharding import shard

    chunk = _as_list(model_chunks)[0]
    hf = _model_hf(chunk)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    with HFCheckpoint(hf_dir) as src:
        _check_same_model(hf, src.config, str(Path(hf_dir) / "config.json"))
        src.validate()
        _copy_into(chunk, lambda name, padded: shard(name, hf_to_megatron_tensor(name, src, hf), tp_rank, tp, padded))


def load_megatron_checkpoint_into(model_chunks, megatron_dir) -> None:
    """Copy this rank's shards from a converted Megatron checkpoint, resharding from its saved TP/PP."""
    from megatron.core import parallel_state

    from real_megatron.convert.megatron_format import META, MegatronCheckpoint

    chunk = _as_list(model_chunks)[0]
    hf = _model_hf(chunk)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    with MegatronCheckpoint(megatron_dir) as ckpt:
        _check_same_model(hf, ckpt.hf, str(Path(megatron_dir) / META))
        ckpt.validate()
        _copy_into(chunk, lambda name, padded: ckpt.shard(name, tp_rank, tp, padded))


@torch.no_grad()
def iter_hf_tensors(model_chunks, hf_config=None, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES
                    ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield the model's weights as buckets of (HF name, full tensor) on global rank 0.

    Tensors are full (TP-gathered, vocabulary padding removed), cloned (later optimizer steps do not
    change them), in the model's dtype and on its device; a bucket holds at most ``bucket_bytes``
    (a larger tensor comes alone), and only one bucket is alive at a time in here.

    Collectives: for each full tensor in model order, the TP group of the stage that owns it
    all-gathers it; with PP > 1 that stage's TP-rank-0 then sends it to global rank 0 (point to
    point, so other stages hold nothing extra). Only data-parallel rank 0 / context-parallel rank 0
    ranks take part (their replicas are identical). Every rank must iterate the generator to the
    end; ranks other than 0 yield nothing.
    """
    from megatron.core import parallel_state

    from real_megatron.megatron.sharding import split_kind, unshard

    chunk = _as_list(model_chunks)[0]
    hf = _model_hf(chunk, hf_config)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    if parallel_state.get_data_parallel_rank() != 0 or parallel_state.get_context_parallel_rank() != 0:
        return
    tp_group = parallel_state.get_tensor_model_parallel_group()
    pp_ranks = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group()) if pp > 1 else [0]
    is_rank0 = tp_rank == 0 and pp_rank == 0
    params = {}
    for _local, name, param in _named_global_params(chunk):
        params.setdefault(name, param)  # a tied last stage's output_layer copy: the embedding is sent by stage 0
    some = next(iter(params.values()))
    dtype, device = some.dtype, some.device
    shapes = full_parameter_shapes(hf)

    def gather(name: str) -> torch.Tensor:
        local = params[name].detach()
        if tp > 1 and split_kind(name) != "replicated":
            parts = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(parts, local.contiguous(), group=tp_group)
            return unshard(name, parts, hf["vocab_size"]).contiguous()  # cat: a new tensor
        return unshard(name, [local], hf["vocab_size"]).clone()

    def pairs():
        for name, shape in shapes.items():
            stage = stage_of(name, hf["num_hidden_layers"], pp)
            if stage == pp_rank:
                if name not in params:
                    raise RuntimeError(f"stage {pp_rank} has no parameter for {name!r}: the model does not match "
                                       f"its hf_config")
                full = gather(name)
                if is_rank0:
                    yield from megatron_to_hf_tensors(name, full, hf)
                elif tp_rank == 0 and pp_rank != 0:
                    dist.send(full, dst=pp_ranks[0])
                del full
            elif is_rank0:
                full = torch.empty(shape, dtype=dtype, device=device)
                dist.recv(full, src=pp_ranks[stage])
                yield from megatron_to_hf_tensors(name, full, hf)

    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    yield from iter_buckets(pairs(), bucket_bytes)


def save_hf_from_model(model_chunks, out_dir, *, side_files_from, hf_config=None, max_shard_size="5GB",
                       bucket_bytes: int = DEFAULT_BUCKET_BYTES, tokenizer=None,
                       dtype: torch.dtype | None = None) -> Path | None:
    """Write the model's live weights as a HF directory at ``out_dir`` (replacing it), atomically.

    Every rank must call it (the weights are gathered with ``iter_hf_tensors``); global rank 0
    writes sharded safetensors + index, config.json and the tokenizer / generation-config files of
    ``side_files_from`` (a HF directory of the same model; a ``tokenizer`` given here writes its
    own files over those), and returns the path; other ranks return None. Every tensor is written in
    ``dtype`` (default: the model's ``params_dtype``), as HF checkpoints are: a bf16 Megatron model
    keeps some parameters (norms) in float32, a HF bf16 checkpoint has them in bf16.
    """
    from real_megatron.convert.atomic import atomic_dir
    from real_megatron.convert.hf_io import parse_size
    from real_megatron.convert.offline import hf_entries, write_hf_config, write_hf_dir
    from real_megatron.dtypes import dtype_name

    chunk = _as_list(model_chunks)[0]
    hf = _model_hf(chunk, hf_config)
    buckets = iter_hf_tensors(model_chunks, hf, bucket_bytes=bucket_bytes)
    if dist.is_initialized() and dist.get_rank() != 0:
        for _ in buckets:  # drive the collectives
            pass
        return None
    if dtype is None:
        from real_megatron.megatron.model import unwrap

        config = getattr(unwrap(chunk), "config", None)
        dtype = getattr(config, "params_dtype", None) or next(chunk.parameters()).dtype
    pairs = ((name, tensor.to(dtype)) for bucket in buckets for name, tensor in bucket)
    entries = hf_entries(hf, {name: dtype for name in full_parameter_shapes(hf)})
    with atomic_dir(Path(out_dir), overwrite=True, inputs=(Path(side_files_from),)) as tmp:
        write_hf_dir(tmp, entries, pairs, parse_size(max_shard_size))
        write_hf_config(tmp, hf, Path(side_files_from), dtype_name(dtype))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)
