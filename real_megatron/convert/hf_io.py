"""Hugging Face checkpoint directories: lazy, validated reading and streamed, sharded writing."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from real_megatron.convert.mapping import IGNORED_HF_SUFFIXES, ConversionError, hf_shapes, read_config
from real_megatron.convert.st_io import SafetensorsReader, SafetensorsWriter, nbytes

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# files that hold weights (never copied as "side files": the converter writes its own)
_WEIGHT_FILE = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.ckpt|\.h5|\.msgpack|\.gguf|\.index\.json)$")


class HFCheckpoint:
    """A HF model directory: config, and every tensor located through the index (or the single file).

    ``validate()`` checks, from the headers only, that exactly the tensors the config implies are
    present with the implied shapes, before anything is converted.
    """

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise ConversionError(f"{self.dir}: not a directory; pass a HF model directory (config.json + *.safetensors)")
        self.config = read_config(self.dir)
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ConversionError(f"{index}: unreadable index ({err!r}); copy the checkpoint again") from err
        elif (self.dir / SINGLE).is_file():
            weight_map = None
        else:
            bins = sorted(p.name for p in self.dir.glob("*.bin"))
            hint = (f" (found {bins[:2]}: PyTorch pickles are not read; re-save with "
                    f"save_pretrained(..., safe_serialization=True))" if bins else "")
            raise ConversionError(f"{self.dir}: no {INDEX} and no {SINGLE}{hint}")
        self._readers: dict[str, SafetensorsReader] = {}
        if weight_map is None:
            reader = self._reader(SINGLE)
            weight_map = {name: SINGLE for name in reader.keys()}
        else:
            for fname in sorted(set(weight_map.values())):  # opening checks presence and truncation
                self._reader(fname)
            for fname, reader in self._readers.items():
                for name in reader.keys():
                    if weight_map.get(name) == fname:
                        continue
                    if name not in weight_map:
                        raise ConversionError(f"{self.dir / fname}: tensor {name!r} is not in {INDEX}; the index "
                                              f"does not match the shard files")
        self.weight_map: dict[str, str] = {k: v for k, v in weight_map.items()
                                           if not k.endswith(IGNORED_HF_SUFFIXES)}

    def _reader(self, fname: str) -> SafetensorsReader:
        if fname not in self._readers:
            self._readers[fname] = SafetensorsReader(self.dir / fname)
        return self._readers[fname]

    def validate(self) -> dict[str, tuple[int, ...]]:
        """Check names and shapes against the config; returns the expected HF shapes (ordered)."""
        expected = hf_shapes(self.config)
        tied = bool(self.config.get("tie_word_embeddings", False))
        for name, shape in expected.items():
            fname = self.weight_map.get(name)
            if fname is None:
                raise ConversionError(f"{self.dir}: tensor {name!r} is missing from the checkpoint (config.json "
                                      f"implies it); the checkpoint is incomplete or config.json belongs to another model")
            reader = self._reader(fname)
            if name not in reader:
                raise ConversionError(f"{self.dir / fname}: tensor {name!r} is listed in {INDEX} but not in the file; "
                                      f"copy the checkpoint again")
            got = reader.shape(name)
            if tuple(got) != tuple(shape):
                raise ConversionError(f"{self.dir / fname}: tensor {name!r} has shape {tuple(got)} but config.json "
                                      f"implies {tuple(shape)} ({_fields_hint(name)}); config.json and the weights "
                                      f"do not match")
        extra = [n for n in self.weight_map if n not in expected and not (tied and n == "lm_head.weight")]
        if extra:
            raise ConversionError(f"{self.dir}: tensors not expected for {self.config['architectures'][0]} with this "
                                  f"config.json: {extra[:5]}{' …' if len(extra) > 5 else ''}; config.json and the "
                                  f"weights do not match")
        return expected

    def dtype(self, name: str) -> torch.dtype:
        return self._reader(self.weight_map[name]).dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._reader(self.weight_map[name]).shape(name)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ConversionError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        return self._reader(self.weight_map[name]).get(name)

    def view(self, name: str) -> torch.Tensor:
        """The tensor as a view of the file's bytes, no copy (``SafetensorsReader.view``)."""
        if name not in self.weight_map:
            raise ConversionError(f"{self.dir}: tensor {name!r} is missing from the checkpoint")
        return self._reader(self.weight_map[name]).view(name)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _fields_hint(name: str) -> str:
    if "embed_tokens" in name or "lm_head" in name:
        return "vocab_size, hidden_size"
    if "q_proj" in name or "k_proj" in name or "v_proj" in name or "o_proj" in name:
        return "hidden_size, num_attention_heads, num_key_value_heads, head_dim"
    if "mlp" in name:
        return "hidden_size, intermediate_size"
    return "hidden_size"


def side_files(src: Path) -> list[Path]:
    """Top-level non-weight files of a HF directory (config, generation config, tokenizer, chat template…)."""
    return sorted(p for p in Path(src).iterdir()
                  if p.is_file() and not p.name.startswith(".") and not _WEIGHT_FILE.search(p.name))


def copy_side_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    for p in side_files(src):
        if p.name not in skip:
            shutil.copyfile(p, dst / p.name)


def parse_size(text: str | int) -> int:
    """'5GB' (10^9), '500MB', '2GiB' (2^30), '1000000' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not m:
        raise ConversionError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    unit = m.group(2).rstrip("B") if m.group(2) not in ("", "B") else ""
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise ConversionError(f"--max-shard-size {text!r} must be positive")
    return size


class HFShardedWriter:
    """Write HF tensors, in a planned order, into ``model-0000i-of-0000N.safetensors`` files + the index
    (a single ``model.safetensors`` when everything fits in one file).

    The plan (which tensor goes in which file) is made up front from names, shapes and dtypes with
    Hugging Face's greedy rule (start a new file when the next tensor would overflow a non-empty
    one), so each file is streamed tensor by tensor and the "of-N" names are right from the start.
    """

    def __init__(self, out_dir: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_size: int,
                 fsync: bool = True):
        self.out_dir = Path(out_dir)
        self.fsync = fsync
        files: list[list] = [[]]
        size = 0
        for entry in entries:
            n = nbytes(entry[2], entry[1])
            if files[-1] and size + n > max_shard_size:
                files.append([])
                size = 0
            files[-1].append(entry)
            size += n
        total = len(files)
        # one file: "model.safetensors" and no index, as transformers' save_pretrained writes it
        self.names = [SINGLE] if total == 1 else [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        self.plan = files
        self.total_size = sum(nbytes(e[2], e[1]) for e in entries)
        self.weight_map = {e[0]: fname for fname, group in zip(self.names, files, strict=True) for e in group}
        self._file = -1
        self._left = 0
        self._writer: SafetensorsWriter | None = None

    def write(self, name: str, tensor: torch.Tensor | list[torch.Tensor]) -> None:
        """``tensor``: a tensor or its row blocks (``SafetensorsWriter.write``)."""
        if self._left == 0:
            self._advance()
        self._writer.write(name, tensor)
        self._left -= 1

    def _advance(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._file += 1
        group = self.plan[self._file]
        self._writer = SafetensorsWriter(self.out_dir / self.names[self._file], group, {"format": "pt"},
                                         fsync=self.fsync)
        self._left = len(group)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._file != len(self.plan) - 1 or self._left:
            raise RuntimeError("HF writer closed before every planned tensor was written")
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            (self.out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
