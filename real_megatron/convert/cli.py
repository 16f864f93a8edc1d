"""`real-megatron convert hf-to-megatron|megatron-to-hf ...` (also checkpoints_convert/*.py).

Single process, no torchrun, no process groups: pure tensor work. Exit status 0 on success,
2 on bad input (the message names the file / tensor / field and the fix; nothing is written).
"""
from __future__ import annotations

import argparse
import sys
import time

from real_megatron.arguments import ArgumentParser


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-fsync", dest="fsync", action="store_false",
                   help="return without waiting for the output to reach the disk: faster (memory-bound, not "
                        "disk-bound); a failed or killed run still leaves nothing at --out, but a power loss or OS "
                        "crash soon after may leave truncated files (loading then reports them)")


def hf_to_megatron_parser(prog: str = "real-megatron convert hf-to-megatron") -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description="HF Qwen2/Llama directory -> real-megatron/v1 checkpoint")
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the saved shards (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the saved shards (default 1)")
    p.add_argument("--dtype", default="auto",  # checked by hf_to_megatron (offline.CONVERSION_DTYPES)
                   help="auto (default) keeps the checkpoint's dtypes; bf16, fp16 or fp32 cast every tensor")
    _add_common(p)
    return p


def megatron_to_hf_parser(prog: str = "real-megatron convert megatron-to-hf") -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description="real-megatron/v1 checkpoint (any TP/PP) -> HF directory")
    p.add_argument("--megatron-dir", required=True, help="checkpoint written by hf-to-megatron")
    p.add_argument("--out", required=True, help="output HF directory (must not exist unless --overwrite)")
    p.add_argument("--hf-config-from", default=None,
                   help="take config/tokenizer files from this HF directory instead of the checkpoint's hf/")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB (default 5GB)")
    _add_common(p)
    return p


def run_hf_to_megatron(argv: list[str], prog: str | None = None) -> int:
    from real_megatron.convert import ConversionError, hf_to_megatron

    args = (hf_to_megatron_parser(prog) if prog else hf_to_megatron_parser()).parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = hf_to_megatron(args.hf_dir, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype, overwrite=args.overwrite,
                             fsync=args.fsync)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} (tp={args.tp}, pp={args.pp}) in {time.perf_counter() - t0:.1f} s")
    return 0


def run_megatron_to_hf(argv: list[str], prog: str | None = None) -> int:
    from real_megatron.convert import ConversionError, megatron_to_hf

    args = (megatron_to_hf_parser(prog) if prog else megatron_to_hf_parser()).parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = megatron_to_hf(args.megatron_dir, args.out, hf_config_from=args.hf_config_from,
                             max_shard_size=args.max_shard_size, overwrite=args.overwrite, fsync=args.fsync)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return 0


USAGE = """usage: real-megatron convert <hf-to-megatron|megatron-to-hf> [options]

  hf-to-megatron  --hf-dir HF --out MEG [--tp N --pp M] [--dtype auto|bf16|fp16|fp32] [--overwrite] [--no-fsync]
  megatron-to-hf  --megatron-dir MEG --out HF2 [--hf-config-from HF] [--max-shard-size 5GB] [--overwrite]
                  [--no-fsync]
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "hf-to-megatron":
        return run_hf_to_megatron(rest)
    if command == "megatron-to-hf":
        return run_megatron_to_hf(rest)
    print(f"real-megatron convert: unknown sub-command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
