"""HF (Qwen2 / Llama) <-> Megatron-Core checkpoint conversion and live weight export.

Public API::

    hf_to_megatron(hf_dir, out, *, tp=1, pp=1, dtype="auto", overwrite=False, fsync=True) -> Path
    megatron_to_hf(megatron_dir, out, *, hf_config_from=None, max_shard_size="5GB", overwrite=False, fsync=True) -> Path
    load_megatron_shards(ckpt_dir, tp_rank, tp, pp_rank, pp, padded_vocab_size=None) -> {global name: shard}
    load_megatron_checkpoint_into(model_chunks, megatron_dir)     # built model, current layout
    load_hf_into(model_chunks, hf_dir)                            # built model, streams HF safetensors
    iter_hf_tensors(model_chunks, hf_config=None, *, bucket_bytes=512 MiB)
        -> Iterator[list[(hf_name, full tensor)]]                 # weight sync; all ranks iterate
    save_hf_from_model(model_chunks, out_dir, *, side_files_from)  # HF export; all ranks call, rank 0 writes
    iter_buckets(pairs, bucket_bytes=DEFAULT_BUCKET_BYTES)         # the one bucketer (real_megatron/weight_buckets.py)

The Megatron checkpoint format and why it is not dist_checkpointing: ``megatron_format.py``.
The name/tensor mapping: ``mapping.py``. CLI: ``real-megatron convert hf-to-megatron|megatron-to-hf``
and ``checkpoints_convert/*.py``.
"""
from real_megatron.convert.mapping import ConversionError
from real_megatron.convert.megatron_format import FORMAT, MegatronCheckpoint, load_megatron_shards
from real_megatron.convert.model_io import (
    iter_hf_tensors,
    load_hf_into,
    load_megatron_checkpoint_into,
    save_hf_from_model,
)
from real_megatron.convert.offline import hf_to_megatron, megatron_to_hf
from real_megatron.weight_buckets import DEFAULT_BUCKET_BYTES, iter_buckets

__all__ = [
    "ConversionError", "FORMAT", "DEFAULT_BUCKET_BYTES", "MegatronCheckpoint", "hf_to_megatron", "megatron_to_hf",
    "load_megatron_shards", "load_megatron_checkpoint_into", "load_hf_into", "iter_hf_tensors",
    "save_hf_from_model", "iter_buckets",
]
