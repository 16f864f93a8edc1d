"""HF Qwen2/Llama directory -> Megatron checkpoint (same as `real-megatron convert hf-to-megatron`).

    python checkpoints_convert/hf_to_megatron.py --hf-dir HF --out MEG [--tp N --pp M] [--dtype auto|bf16|fp16|fp32]
"""
import sys

from real_megatron.convert.cli import run_hf_to_megatron

if __name__ == "__main__":
    sys.exit(run_hf_to_megatron(sys.argv[1:], prog="hf_to_megatron.py"))
