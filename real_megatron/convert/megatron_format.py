"""The Megatron checkpoint format written by ``hf-to-megatron`` and read by the trainer.

Layout of a checkpoint directory (format ``real-megatron/v1``)::

    meta.json                       format, tp, pp, dtype, vocab_size, padded_vocab_size,
                                    vocab_divisible_by, hf_config (the HF config dict), files
    model_tp{t}_pp{p}.safetensors   rank (t, p)'s shards, one per TP×PP rank, under GLOBAL
                                    full-Megatron names (``decoder.layers.{global i}.…``), cut
                                    by ``real_megatron.megatron.sharding.shard`` at the saved tp
                                    (vocabulary padded to ``padded_vocab_size``)
    hf/                             the HF side files (config.json, generation_config.json,
                                    tokenizer files, chat template) so megatron-to-hf can write a
                                    complete HF directory

A tied embedding is stored once, in stage 0's files; the last stage's ``output_layer`` is its copy.

Why this format and an explicit resharding step instead of ``megatron.core.dist_checkpointing``:
the converters must run as one plain process with no process groups; dist_checkpointing's save
needs a torch.distributed world and starts a ``multiprocessing`` writer (which re-imports the
caller's main module, see docs/environment.md §2), and its files are only readable through Megatron. Here each
rank file is an ordinary safetensors file that any tool can inspect, the shard names are global
so a file says exactly what it holds, and ``load_megatron_shards`` reshards to any TP/PP the shapes
allow by reading, per tensor, only the saved shards it needs (one full tensor in memory at a time):
full = ``unshard(saved shards)``, then ``shard(full, new layout)``. Loading at the saved layout
reads each shard directly, with no resharding cost.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from real_megatron.convert.mapping import ConversionError, check_conversion_layout, read_config
from real_megatron.convert.st_io import SafetensorsReader, SafetensorsWriter
from real_megatron.megatron.model import VOCAB_DIVISIBLE_BY, padded_vocab_size
from real_megatron.megatron.sharding import full_parameter_shapes, stage_of

FORMAT = "real-megatron/v1"
META = "meta.json"
HF_SUBDIR = "hf"


def rank_file(tp_rank: int, pp_rank: int) -> str:
    return f"model_tp{tp_rank}_pp{pp_rank}.safetensors"


def padded_vocab(hf: dict, tp: int) -> int:
    """The vocabulary size of the saved shards: the model provider's padding rule."""
    return padded_vocab_size(hf["vocab_size"], tp, VOCAB_DIVISIBLE_BY)


def shard_shape(name: str, shape, tp: int, padded: int) -> tuple[int, ...]:
    """Shape of one TP shard, computed by the sharding rule itself on a meta tensor."""
    from real_megatron.megatron.sharding import shard

    return tuple(shard(name, torch.empty(shape, device="meta"), 0, tp, padded).shape)


def stored_names(hf: dict, pp: int, pp_rank: int) -> list[str]:
    """Full-Megatron names stored in stage ``pp_rank``'s files (model order)."""
    return [n for n in full_parameter_shapes(hf) if stage_of(n, hf["num_hidden_layers"], pp) == pp_rank]


def needed_names(hf: dict, pp: int, pp_rank: int) -> list[str]:
    """Full-Megatron names a model chunk at stage ``pp_rank`` loads (the tied copy on the last stage too)."""
    names = stored_names(hf, pp, pp_rank)
    if hf.get("tie_word_embeddings") and pp_rank == pp - 1 and pp_rank != 0:
        names.append("embedding.word_embeddings.weight")
    return names


def write_shards(out_dir: Path, hf: dict, tp: int, pp: int, full_tensors, dtypes: dict[str, torch.dtype],
                 fsync: bool = True) -> None:
    """Write every rank file from ``full_tensors``: (full name, row blocks) in model order, where the
    blocks' dim-0 concatenation is the full tensor (``mapping.hf_to_megatron_blocks``)."""
    from real_megatron.megatron.sharding import shard, split_kind

    shapes = full_parameter_shapes(hf)
    padded = padded_vocab(hf, tp)
    writers: dict[tuple[int, int], SafetensorsWriter] = {}
    try:
        for p in range(pp):
            names = stored_names(hf, pp, p)
            for t in range(tp):
                entries = [(n, dtypes[n], shard_shape(n, shapes[n], tp, padded)) for n in names]
                writers[(t, p)] = SafetensorsWriter(
                    out_dir / rank_file(t, p), entries,
                    {"format": "pt", "real_megatron_format": FORMAT, "tp_rank": str(t), "pp_rank": str(p)}, fsync=fsync)
        for name, blocks in full_tensors:
            p = stage_of(name, hf["num_hidden_layers"], pp)
            if tp == 1:
                # the one shard is the full tensor, its vocabulary padded with zero rows: the blocks
                # are written as they are, never concatenated in memory (``shard`` does the same at
                # tp=1; test_resharding_equals_direct_conversion compares the two)
                rows = sum(b.shape[0] for b in blocks)
                if split_kind(name) == "vocab" and rows < padded:
                    blocks = [*blocks, blocks[0].new_zeros((padded - rows, *blocks[0].shape[1:]))]
                writers[(0, p)].write(name, blocks)
                continue
            full = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
            for t in range(tp):
                writers[(t, p)].write(name, shard(name, full, t, tp, padded))
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise


def write_meta(out_dir: Path, hf: dict, tp: int, pp: int, dtype: str) -> None:
    meta = {
        "format": FORMAT, "tp": tp, "pp": pp, "dtype": dtype,
        "vocab_size": hf["vocab_size"], "padded_vocab_size": padded_vocab(hf, tp),
        "vocab_divisible_by": VOCAB_DIVISIBLE_BY,
        "files": [rank_file(t, p) for p in range(pp) for t in range(tp)],
        "hf_config": hf,
    }
    (out_dir / META).write_text(json.dumps(meta, indent=2) + "\n")


class MegatronCheckpoint:
    """A saved checkpoint: meta, and each full tensor's saved shards, located from the file headers."""

    def __init__(self, ckpt_dir: str | Path):
        self.dir = Path(ckpt_dir)
        meta_path = self.dir / META
        if not meta_path.is_file():
            raise ConversionError(f"{self.dir}: no {META}; not a real-megatron checkpoint (make one with "
                                  f"`real-megatron convert hf-to-megatron`)")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise ConversionError(f"{meta_path}: unreadable ({err}); the checkpoint is damaged") from err
        if self.meta.get("format") != FORMAT:
            raise ConversionError(f"{meta_path}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        for key in ("tp", "pp", "hf_config"):
            if key not in self.meta:
                raise ConversionError(f"{meta_path}: field {key!r} is missing; the checkpoint is damaged")
        self.hf = read_config(self.meta["hf_config"])
        self.tp, self.pp = int(self.meta["tp"]), int(self.meta["pp"])
        check_conversion_layout(self.hf, self.tp, self.pp, where=str(meta_path))
        self.padded = int(self.meta.get("padded_vocab_size") or padded_vocab(self.hf, self.tp))
        self._readers: dict[tuple[int, int], SafetensorsReader] = {}
        self.location: dict[str, dict[int, SafetensorsReader]] = {}
        for p in range(self.pp):
            for t in range(self.tp):
                reader = SafetensorsReader(self.dir / rank_file(t, p))  # checks presence and truncation
                self._readers[(t, p)] = reader
                for name in reader.keys():
                    self.location.setdefault(name, {})[t] = reader

    def validate(self) -> None:
        """Every full tensor the config implies is present once per saved TP rank with its shard shape."""
        for name, shape in full_parameter_shapes(self.hf).items():
            want = shard_shape(name, shape, self.tp, self.padded)
            found = self.location.get(name, {})
            for t in range(self.tp):
                reader = found.get(t)
                if reader is None:
                    p = stage_of(name, self.hf["num_hidden_layers"], self.pp)
                    raise ConversionError(f"{self.dir / rank_file(t, p)}: tensor {name!r} is missing; the checkpoint "
                                          f"is incomplete")
                if tuple(reader.shape(name)) != want:
                    raise ConversionError(f"{reader.path}: tensor {name!r} has shape {tuple(reader.shape(name))}, "
                                          f"expected {want} from meta.json's hf_config at tp={self.tp}")

    def dtype(self, name: str) -> torch.dtype:
        return self._reader(name, 0).dtype(name)

    def _reader(self, name: str, tp_rank: int) -> SafetensorsReader:
        try:
            return self.location[name][tp_rank]
        except KeyError:
            raise ConversionError(f"{self.dir}: tensor {name!r} (tp rank {tp_rank}) is missing from the "
                                  f"checkpoint") from None

    def full(self, name: str) -> torch.Tensor:
        """The full tensor (unpadded vocabulary), assembled from the saved shards. At TP=1 (and for
        replicated tensors) it is a view of the file's bytes (``SafetensorsReader.view``), no copy."""
        from real_megatron.megatron.sharding import split_kind, unshard

        if self.tp == 1 or split_kind(name) == "replicated":
            # one shard is the full tensor (vocabulary rows beyond vocab_size are padding)
            tensor = self._reader(name, 0).view(name)
            return tensor[: self.hf["vocab_size"]] if split_kind(name) == "vocab" else tensor
        return unshard(name, [self._reader(name, t).view(name) for t in range(self.tp)], self.hf["vocab_size"])

    def shard(self, name: str, tp_rank: int, tp: int, padded: int) -> torch.Tensor:
        """This name's shard for rank ``tp_rank`` of ``tp`` (vocab padded to ``padded``), resharding if needed."""
        from real_megatron.megatron.sharding import shard

        if tp == self.tp and padded == self.padded:
            return self._reader(name, tp_rank).get(name)  # same layout: the saved shard as is
        return shard(name, self.full(name), tp_rank, tp, padded)

    def close(self) -> None:
        for r in self._readers.values():
            r.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_megatron_shards(ckpt_dir: str | Path, tp_rank: int, tp: int, pp_rank: int, pp: int,
                         padded_vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """{global full-Megatron name: shard} for rank (tp_rank, pp_rank) of a TP×PP layout, resharded
    from whatever layout the checkpoint was saved at (``padded_vocab_size`` defaults to Megatron's
    multiple of 128·tp). Stage ``pp_rank`` of a tied model's last stage also gets the embedding."""
    with MegatronCheckpoint(ckpt_dir) as ckpt:
        check_conversion_layout(ckpt.hf, tp, pp, where=f"{ckpt.dir / META}")
        if not (0 <= tp_rank < tp and 0 <= pp_rank < pp):
            raise ConversionError(f"rank (tp {tp_rank}, pp {pp_rank}) is outside a tp={tp} × pp={pp} layout")
        padded = padded_vocab_size or padded_vocab(ckpt.hf, tp)
        return {name: ckpt.shard(name, tp_rank, tp, padded) for name in needed_names(ckpt.hf, pp, pp_rank)}
