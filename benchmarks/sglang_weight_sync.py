"""Weight-sync throughput into REAL SGLang servers on the CPU, one and two engines, against a plain
in-memory copy of the same bytes.

A random Qwen2 of ~50 MB fp32 (hidden 512, 4 layers; the project's tokenizer) is served by one or
two SGLang 0.5.23 servers (tests/sglang_server.py, the pinned test environment). For each way of
syncing (``distributed``: one gloo group spanning this process and every server, each bucket
broadcast once; ``tensor``: shared-memory tensors, the colocated path) the whole model is pushed in
16 MB buckets through ``SGLangEngine.update_weights`` — the trainer's own call — ``--repeats``
times; the best time is reported as bytes/s (the model's bytes once, however many servers) and
as a ratio to ``torch.Tensor.clone`` of the same tensors (best of ``--repeats``).

Run: ``.venv/bin/python benchmarks/sglang_weight_sync.py`` (needs .venv-sglang: tests/sglang_env/build.sh).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def build_model(out: Path) -> Path:
    import transformers

    from real_megatron.repro.assets import build_arithmetic_assets as build_assets

    _, _, base = build_assets(out / "assets", seed=7)  # the project's tokenizer and tiny Qwen2 config
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=4)
    cfg.pop("layer_types", None)  # derived from num_hidden_layers again
    config = transformers.Qwen2Config.from_dict(cfg)
    torch.manual_seed(0)
    model_dir = out / "model"
    transformers.Qwen2ForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=int, default=16)
    args = parser.parse_args()

    import sglang_server
    from safetensors.torch import load_file

    from real_megatron.rollout.sglang_engine import SGLangEngine
    from real_megatron.weight_buckets import iter_buckets

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp))
        state = load_file(model_dir / "model.safetensors")
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        buckets = list(iter_buckets(iter(state.items()), args.bucket_mb << 20))
        copy_s = best_of(args.repeats, lambda: [t.clone() for t in state.values()])
        results = {"model_bytes": nbytes, "buckets": len(buckets), "copy_bytes_per_s": nbytes / copy_s}
        print(f"model {nbytes / 2**20:.1f} MiB in {len(buckets)} buckets; in-memory copy "
              f"{nbytes / copy_s / 2**20:.0f} MiB/s", flush=True)
        servers = sglang_server.Server.several(model_dir, tmp, 2, max_running_requests=2)
        try:
            for count in (1, 2):
                urls = [s.url for s in servers[:count]]
                for sync in ("distributed", "tensor"):
                    eng = SGLangEngine(urls, weight_sync=sync)
                    if sync == "distributed":
                        eng.init_weights_update_group("127.0.0.1", sglang_server.free_port(), backend="gloo",
                                                      timeout_s=120)
                    try:
                        seconds = best_of(args.repeats, lambda eng=eng: eng.update_weights(buckets))
                    finally:
                        eng.close()
                    rate = nbytes / seconds
                    key = f"{sync}_{count}_engine{'s' if count > 1 else ''}"
                    results[key] = {"seconds": seconds, "bytes_per_s": rate,
                                    "ratio_to_copy": rate / results["copy_bytes_per_s"]}
                    print(f"{key}: {seconds:.2f} s, {rate / 2**20:.1f} MiB/s = "
                          f"{rate / results['copy_bytes_per_s']:.4f} x the in-memory copy", flush=True)
        finally:
            for s in servers:
                s.stop()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
