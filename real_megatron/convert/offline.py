"""Whole-checkpoint conversions, files to files (offline), single process, a few tensors in memory at a time.

``hf_to_megatron`` and ``megatron_to_hf`` validate everything they can from file headers
(architecture, layout, every tensor's presence and shape, truncation) before writing a byte, then
build the output in a temp directory next to it and rename it into place (``atomic.py``), so a
failure at any point leaves nothing at the output path (or the old directory, with --overwrite).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from real_megatron.convert.atomic import atomic_dir, check_output
from real_megatron.convert.hf_io import HFCheckpoint, HFShardedWriter, copy_side_files, parse_size
from real_megatron.convert.mapping import (
    ConversionError,
    check_conversion_layout,
    hf_names,
    hf_shapes,
    hf_to_megatron_blocks,
    megatron_to_hf_blocks,
    model_dims,
    read_config,
)
from real_megatron.convert.megatron_format import HF_SUBDIR, MegatronCheckpoint, write_meta, write_shards
from real_megatron.convert.st_io import nbytes, prefetch
from real_megatron.dtypes import SHORT_NAMES, dtype_name, torch_dtype
from real_megatron.megatron.sharding import full_parameter_shapes

# hf_to_megatron's dtype choices: keep each tensor's own, or cast (float32 etc. are accepted too)
CONVERSION_DTYPES = ("auto", *SHORT_NAMES)



def _dominant(dtypes: dict[str, torch.dtype], shapes: dict[str, tuple]) -> torch.dtype:
    weight = Counter()
    for name, dt in dtypes.items():
        weight[dt] += nbytes(shapes[name], dt)
    return weight.most_common(1)[0][0]


def hf_to_megatron(hf_dir, out, *, tp: int = 1, pp: int = 1, dtype: str = "auto", overwrite: bool = False,
                   fsync: bool = True) -> Path:
    """Convert a HF Qwen2/Llama directory to a Megatron checkpoint at TP=``tp``, PP=``pp``.

    ``dtype="auto"`` keeps every tensor's dtype (bit-exact round trip); bf16/fp16/fp32 cast.
    ``fsync=False`` returns before the output is on the disk (``atomic_dir``): faster, but not
    power-loss safe.
    """
    try:
        target = None if dtype == "auto" else torch_dtype(dtype)
    except ValueError:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {', '.join(CONVERSION_DTYPES)}") from None
    hf_dir = Path(hf_dir)
    check_output(out, overwrite, (hf_dir,))  # fail fast, before reading any weights
    with HFCheckpoint(hf_dir) as src:
        hf = src.config
        check_conversion_layout(hf, tp, pp, where=str(hf_dir / "config.json"))
        src.validate()
        shapes = full_parameter_shapes(hf)
        dtypes: dict[str, torch.dtype] = {}
        for name in shapes:
            found = {src.dtype(n) for n in hf_names(name)}
            if target is None and len(found) > 1:
                raise ConversionError(f"{hf_dir}: {hf_names(name)} have different dtypes {sorted(map(str, found))} but "
                                      f"are fused into one Megatron tensor; pass --dtype bf16|fp16|fp32")
            dtypes[name] = target or found.pop()

        def full_tensors():  # row blocks that are views of the input files: bytes go file to file
            for name in shapes:
                yield name, [block.to(dtypes[name]) for block in hf_to_megatron_blocks(name, src, hf)]

        with atomic_dir(out, overwrite, (hf_dir,), fsync=fsync) as tmp:
            write_shards(tmp, hf, tp, pp, prefetch(full_tensors()), dtypes, fsync=fsync)
            (tmp / HF_SUBDIR).mkdir()
            copy_side_files(hf_dir, tmp / HF_SUBDIR)
            write_meta(tmp, hf, tp, pp, dtype_name(_dominant(dtypes, shapes)))
    return Path(out)


def _same_shapes(a: dict, b: dict, where: str) -> None:
    """``b`` (a user-given config) must describe the model ``a`` was converted from."""
    def dims(hf: dict) -> dict:
        d = model_dims(hf)
        return {"hidden_size": d["hidden"], "num_attention_heads": d["heads"], "num_key_value_heads": d["groups"],
                "head_dim": d["head_dim"], "num_hidden_layers": hf["num_hidden_layers"],
                "intermediate_size": hf["intermediate_size"], "vocab_size": hf["vocab_size"],
                "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False))}

    da, db = dims(a), dims(b)
    for field in da:
        if da[field] != db[field]:
            raise ConversionError(f"{where}: {field}={db[field]!r} but the Megatron checkpoint was made with "
                                  f"{field}={da[field]!r}; pass the config of the model that was converted")
    if full_parameter_shapes(a) != full_parameter_shapes(b):
        raise ConversionError(f"{where}: tensor shapes differ from the Megatron checkpoint's config (qkv bias: "
                              f"architecture {b['architectures'][0]} vs {a['architectures'][0]}); pass the config "
                              f"of the model that was converted")


def hf_entries(hf: dict, dtypes: dict[str, torch.dtype]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(HF name, dtype, shape) of every HF tensor, in the order the Megatron tensors are walked."""
    out_shapes = hf_shapes(hf)
    return [(n, dtypes[name], out_shapes[n]) for name in full_parameter_shapes(hf) for n in hf_names(name)]


def write_hf_dir(out_dir: Path, entries, tensors, max_shard_size: int, fsync: bool = True) -> None:
    """Stream (HF name, tensor) pairs, in ``entries`` order, into sharded safetensors + index."""
    writer = HFShardedWriter(out_dir, entries, max_shard_size, fsync=fsync)
    try:
        for hf_name, tensor in tensors:
            writer.write(hf_name, tensor)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def write_hf_config(out_dir: Path, hf: dict, side: Path, main_dtype: str) -> None:
    """config.json (``side``'s own if it has one, its dtype field set to ``main_dtype``) and ``side``'s
    other non-weight files (generation config, tokenizer, chat template)."""
    config_path = side / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else dict(hf)
    for key in ("dtype", "torch_dtype"):  # transformers 5 writes "dtype", older ones "torch_dtype"
        if key in config:
            config[key] = main_dtype
    if "dtype" not in config and "torch_dtype" not in config:
        config["torch_dtype"] = main_dtype
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if side.is_dir():
        copy_side_files(side, out_dir, skip=("config.json",))


def megatron_to_hf(megatron_dir, out, *, hf_config_from=None, max_shard_size="5GB", overwrite: bool = False,
                   fsync: bool = True) -> Path:
    """Convert a Megatron checkpoint (any saved TP/PP) to a HF directory loadable by transformers.

    Config, generation config and tokenizer files come from ``hf_config_from`` if given (its shapes
    must match), else from the checkpoint's ``hf/`` folder, else config.json is written from meta.json.
    ``fsync`` as in ``hf_to_megatron``.
    """
    megatron_dir = Path(megatron_dir)
    limit = parse_size(max_shard_size)
    inputs = (megatron_dir,) + ((Path(hf_config_from),) if hf_config_from else ())
    check_output(out, overwrite, inputs)
    with MegatronCheckpoint(megatron_dir) as ckpt:
        ckpt.validate()
        hf = ckpt.hf
        if hf_config_from:
            side = Path(hf_config_from)
            _same_shapes(hf, read_config(side), str(side / "config.json"))
        else:
            side = megatron_dir / HF_SUBDIR
        shapes = full_parameter_shapes(hf)
        dtypes = {name: ckpt.dtype(name) for name in shapes}
        entries = hf_entries(hf, dtypes)

        def hf_tensors():  # row blocks: views of the Megatron files at TP=1, written without copies
            for name in dtypes:
                yield from megatron_to_hf_blocks(name, ckpt.full(name), hf)

        with atomic_dir(out, overwrite, inputs, fsync=fsync) as tmp:
            write_hf_dir(tmp, entries, prefetch(hf_tensors()), limit, fsync=fsync)
            write_hf_config(tmp, hf, side, dtype_name(_dominant(dtypes, shapes)))
    return Path(out)
