"""GPU smoke test of the Megatron path: CUDA tensors end to end, fp32 vs bf16, Transformer Engine if present.

Run on a machine with one GPU (``python benchmarks/gpu_smoke.py``); prints one JSON object:

* ``logprob_max_abs_err``: vocab-parallel log-probs on CUDA vs ``torch.log_softmax`` (fp32 logits);
* ``fp32_losses`` / ``bf16_losses``: REAL loss over 5 optimizer steps on one fixed mini-batch,
  from the same initial weights (the loss must fall in both);
* ``bf16_vs_fp32_grad_cosine``: cosine similarity of the first step's full gradient;
* ``step_ms``: median train-step time per dtype; ``transformer_engine``: whether the TE spec was used.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "megatron_workers"))

HF = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 256, "num_hidden_layers": 4,
      "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 512, "vocab_size": 32000,
      "tie_word_embeddings": False, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 512}


def samples_for(vocab: int):
    from real_megatron.megatron.batch import Sample

    g = torch.Generator().manual_seed(0)
    out = []
    for gid, size in enumerate([4, 4, 4, 4]):
        prompt = torch.randint(1, vocab, (48,), generator=g).tolist()
        for k in range(size):
            n = int(torch.randint(40, 120, (1,), generator=g))
            out.append(Sample(prompt, torch.randint(1, vocab, (n,), generator=g).tolist(), float(k % 2), gid))
    return out


def run(dtype, full, transformer_impl):
    from real_megatron.megatron.model import build_model
    from real_megatron.megatron.optimizer import build_optimizer
    from real_megatron.megatron.policy import MegatronPolicy
    from real_megatron.megatron.sharding import gather_full_state_dict, load_full_state_dict

    chunks = build_model(HF, dtype=dtype, transformer_impl=transformer_impl, wrap_ddp=True)
    load_full_state_dict(chunks[0], full)
    optimizer = build_optimizer(chunks, lr=1e-4)
    policy = MegatronPolicy(chunks, optimizer, loss_name="real", temperature=0.6, max_tokens_per_micro_batch=4096)
    samples = samples_for(HF["vocab_size"])
    logps, _ = policy.compute_logprobs(samples)
    for s, lp in zip(samples, logps, strict=True):
        s.old_logp = lp
    metrics = policy.forward_backward(samples)
    grad = torch.cat([t.flatten() for t in gather_full_state_dict(chunks[0], "grad").values()])
    losses, times = [], []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = policy.train_step(samples)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(result["loss"])
    return {"first_loss": metrics["loss"], "losses": losses, "grad": grad, "step_ms": 1000 * statistics.median(times[1:]),
            "uses_te": any("transformer_engine" in type(m).__module__ for m in chunks[0].modules()),  # TE layers built
            "param_dtype": str(next(chunks[0].parameters()).dtype)}


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: this smoke test needs a GPU")
        return 1
    from common import fixed_full_state_dict

    from real_megatron.megatron.logprobs import vocab_parallel_logprobs
    from real_megatron.megatron.model import initialize_parallel, te_available

    initialize_parallel(hf_config=HF)
    logits = 4 * torch.randn(8, 64, 1000, device="cuda")
    target = torch.randint(0, 1000, (8, 64), device="cuda")
    lp, _ = vocab_parallel_logprobs(logits, target, temperature=0.6)
    ref = torch.log_softmax(logits / 0.6, -1).gather(-1, target[..., None]).squeeze(-1)
    impl = "auto" if te_available() else "local"
    full = fixed_full_state_dict(HF)
    fp32 = run(torch.float32, full, impl)
    bf16 = run(torch.bfloat16, full, impl)
    cosine = torch.nn.functional.cosine_similarity(fp32["grad"].double(), bf16["grad"].double(), dim=0).item()
    report = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "transformer_engine": fp32["uses_te"],
        "logprob_max_abs_err": (lp - ref).abs().max().item(),
        "fp32_losses": fp32["losses"], "bf16_losses": bf16["losses"], "bf16_param_dtype": bf16["param_dtype"],
        "bf16_vs_fp32_first_loss": [fp32["first_loss"], bf16["first_loss"]],
        "bf16_vs_fp32_grad_cosine": cosine,
        "step_ms": {"fp32": fp32["step_ms"], "bf16": bf16["step_ms"]},
    }
    print(json.dumps(report, indent=1))
    ok = report["logprob_max_abs_err"] < 1e-4 and cosine > 0.99 and fp32["losses"][-1] < fp32["losses"][0] \
        and bf16["losses"][-1] < bf16["losses"][0]
    print("GPU smoke:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
