"""Reshardable training checkpoint (model + optimizer) at DeepSeek-R1-Distill-Qwen-1.5B's shapes, against
a plain ``torch.save`` / ``torch.load`` of the same tensors.

    python benchmarks/checkpoint_1p5b.py [--layers 2] [--repeats 2] [--workdir /tmp] [--cold]

One process, a world of one (gloo), float32 model with Megatron's Adam (fp32 params, ``exp_avg``,
``exp_avg_sq``): hidden 1536, 12 heads, 2 KV heads, FFN 8960, vocabulary 151,936 (untied output
layer), ``--layers`` transformer layers (the embedding and output layer are 0.47 B of the 1.5 B
parameters; each layer adds 47 M). Phases, each after an ``os.sync()`` (and, as root with
``--cold``, a dropped page cache, so loads read from the disk):

* save: ``CheckpointManager.save`` with ``save_training_state`` — the trainer's path: Megatron-Core
  ``dist_checkpointing`` into a temp directory, fsync, rename, ``latest``;
* load: ``CheckpointManager.load`` with ``load_training_state`` into the live model + optimizer;
* baseline save: one ``torch.save`` of the same tensors (model parameters, each parameter's
  ``exp_avg`` and ``exp_avg_sq``) + fsync; baseline load: ``torch.load`` of that file.

Prints seconds (fastest of --repeats), bytes on disk and the ratios. Needs
~2 x 7 GB free disk and ~10 GB RAM at 2 layers (model, gradient buffer, Adam state; the baseline
load runs after they are freed).
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536, "num_attention_heads": 12,
    "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
}


def settle(cold: bool) -> None:
    os.sync()
    if cold and os.geteuid() == 0:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def timed(label: str, fn, results: dict, cold: bool):
    settle(cold)
    t0 = time.perf_counter()
    out = fn()
    results.setdefault(label, []).append(time.perf_counter() - t0)
    print(f"  {label:<14} {results[label][-1]:7.2f} s", flush=True)
    return out


def dist_and_plain_saves(hf: dict, args, work: Path, results: dict) -> tuple[int, Path]:
    """Build the model + Adam state, then per repeat: dist save, baseline save, dist load. Returns the
    checkpoint's size and the baseline file; the model and optimizer are freed on return."""
    import torch

    from real_megatron.checkpoint import CheckpointManager
    from real_megatron.megatron.dist_state import inner_optimizers, load_training_state, save_training_state
    from real_megatron.megatron.model import build_model, initialize_parallel
    from real_megatron.megatron.optimizer import build_optimizer

    initialize_parallel(hf_config=hf)
    chunks = build_model(hf, transformer_impl="local", wrap_ddp=True)
    optimizer = build_optimizer(chunks, lr=1e-5)
    for inner in inner_optimizers(optimizer):  # Adam's state as after some steps: random moments, a step count
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p].update(step=torch.tensor(10.0), exp_avg=torch.randn_like(p) * 1e-3,
                                      exp_avg_sq=torch.rand_like(p) * 1e-6)
    numel = sum(p.numel() for c in chunks for p in c.parameters())
    print(f"{numel / 1e9:.3f} B parameters ({args.layers} layers), model + Adam state "
          f"{3 * numel * 4 / 1e9:.2f} GB in float32", flush=True)
    layout = {"tp": 1, "pp": 1, "cp": 1, "dp": 1, "world_size": 1, "distributed_optimizer": False, "dtype": "float32"}
    mgr = CheckpointManager(work / "run")
    plain = work / "plain.pt"

    def plain_save():
        tensors = {f"param.{n}": p.data for c in chunks for n, p in c.named_parameters()}
        for inner in inner_optimizers(optimizer):
            for i, state in enumerate(inner.state.values()):
                tensors.update({f"adam.{i}.exp_avg": state["exp_avg"], f"adam.{i}.exp_avg_sq": state["exp_avg_sq"]})
        torch.save(tensors, plain)
        with open(plain, "rb") as fh:
            os.fsync(fh.fileno())

    for r in range(args.repeats):
        print(f"repeat {r + 1}/{args.repeats}", flush=True)
        path = timed("save", lambda: mgr.save(1, {"layout": layout},
                                              lambda d: save_training_state(chunks, optimizer, d)), results, args.cold)
        timed("baseline save", plain_save, results, args.cold)
        timed("load", lambda path=path: mgr.load(path, layout=layout,
                                       read_state=lambda d: load_training_state(chunks, optimizer, d)),
              results, args.cold)
    return size_of(mgr.latest()), plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--cold", action="store_true", help="drop the page cache before every phase (root)")
    args = parser.parse_args()

    import torch

    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.workdir))
    results: dict[str, list[float]] = {}
    try:
        dist_bytes, plain = dist_and_plain_saves({**SHAPES, "num_hidden_layers": args.layers}, args, work, results)
        plain_bytes = size_of(plain)
        gc.collect()  # the baseline load allocates a second copy of everything: the first is gone now
        for _ in range(args.repeats):
            loaded = timed("baseline load", lambda: torch.load(plain, map_location="cpu"), results, args.cold)
            del loaded
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {k: min(v) for k, v in results.items()}
    print(f"\nfastest of {args.repeats}{' (cold page cache)' if args.cold else ''}:")
    for label in ("save", "baseline save", "load", "baseline load"):
        print(f"  {label:<14} {best[label]:7.2f} s")
    print(f"save / baseline save: {best['save'] / best['baseline save']:.2f}x")
    print(f"load / baseline load: {best['load'] / best['baseline load']:.2f}x")
    print(f"size: {dist_bytes / 1e9:.2f} GB vs {plain_bytes / 1e9:.2f} GB ({dist_bytes / plain_bytes:.3f}x)")


if __name__ == "__main__":
    main()
