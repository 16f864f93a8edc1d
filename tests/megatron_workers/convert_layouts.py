"""Worker for tests/test_convert.py under torchrun (2 processes, gloo).

For each model directory pair (HF dir, converted Megatron dir) and each layout (TP=2 PP=1, then
TP=1 PP=2): build the Megatron model, load the converted checkpoint (resharded from whatever
layout it was saved at), and on rank 0 record the full logits of fixed input ids (TP=2 only: the
vocab-parallel logits are all-gathered) and every (HF name, tensor) ``iter_hf_tensors`` yields,
with the bucket sizes. Ranks other than 0 must yield nothing. Results go to ``--out`` (torch.save).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True, help="JSON list of [name, hf_dir, megatron_dir]")
    ap.add_argument("--bucket-bytes", type=int, required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from megatron.core import parallel_state

    from real_megatron.convert import iter_hf_tensors, load_megatron_checkpoint_into
    from real_megatron.hf_model import read_hf_config
    from real_megatron.megatron.model import build_model, initialize_parallel

    results: dict = {}
    input_ids = torch.tensor([[3, 17, 250, 42, 9, 101, 77, 5, 299, 1, 64, 128]])
    for tp, pp in ((2, 1), (1, 2)):
        for name, hf_dir, meg_dir in json.loads(args.models):
            hf = read_hf_config(hf_dir)
            initialize_parallel(tp=tp, pp=pp, cp=1, seed=1, hf_config=hf)
            chunks = build_model(hf, dtype=torch.float32, transformer_impl="local")
            load_megatron_checkpoint_into(chunks, meg_dir)
            key = f"{name}/tp{tp}pp{pp}"
            entry: dict = {}
            if pp == 1:
                with torch.no_grad():
                    chunks[0].eval()
                    pos = torch.arange(input_ids.shape[1]).unsqueeze(0)
                    logits = chunks[0](input_ids, pos, None)  # [b, s, padded_vocab / tp]
                parts = [torch.empty_like(logits) for _ in range(tp)]
                dist.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
                entry["logits"] = torch.cat(parts, dim=-1)[..., : hf["vocab_size"]]
            tensors, buckets = {}, []
            for bucket in iter_hf_tensors(chunks, hf, bucket_bytes=args.bucket_bytes):
                buckets.append(sum(t.numel() * t.element_size() for _, t in bucket))
                for n, t in bucket:
                    assert n not in tensors, f"{n} yielded twice"
                    tensors[n] = t
            entry["tensors"], entry["buckets"] = tensors, buckets
            if dist.get_rank() != 0:
                assert not tensors, f"rank {dist.get_rank()} yielded {len(tensors)} tensors"
            results[key] = entry
            del chunks
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
