r"""Megatron checkpoint (any TP/PP) -> HF directory (same as `real-megatron convert megatron-to-hf`).

    python checkpoints_convert/megatron_to_hf.py --megatron-dir MEG --out HF2 \
        [--hf-config-from HF] [--max-shard-size 5GB]
"""
import sys

from real_megatron.convert.cli import run_megatron_to_hf

if __name__ == "__main__":
    sys.exit(run_megatron_to_hf(sys.argv[1:], prog="megatron_to_hf.py"))
