"""Train-step time of the REAL loss hook vs plain token cross-entropy, same model and batch.

One process on the CPU (gloo), a Qwen2-shaped model (hidden 256, 4 layers, vocab 32,768), a
mini-batch of 8 groups × 4 rollouts with 96-token sequences in 4 packed micro-batches of 8 rollouts. Both steps run
forward+backward through Megatron's schedule and one optimizer step:

* ``ce``: Megatron's ``vocab_parallel_cross_entropy`` over response tokens, token-mean;
* ``real``: ``MegatronPolicy.train_step`` (our log-probs + entropy, per-rollout scores, the group
  loss, the scale factor, the metrics).

Timings alternate between the two, median of ``--repeats``. Target: real / ce ≤ 1.05.

    python benchmarks/hook_overhead.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

HF = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
      "num_key_value_heads": 2, "intermediate_size": 512, "vocab_size": 32768, "max_position_embeddings": 256,
      "tie_word_embeddings": False, "rope_theta": 10000.0, "rms_norm_eps": 1e-6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from real_megatron.megatron.batch import Sample, build_micro_batch
    from real_megatron.megatron.model import build_model, initialize_parallel
    from real_megatron.megatron.optimizer import build_optimizer
    from real_megatron.megatron.packed_forward import run_packed
    from real_megatron.megatron.policy import MegatronPolicy

    initialize_parallel(hf_config=HF)
    chunks = build_model(HF, transformer_impl="local", wrap_ddp=True)
    optimizer = build_optimizer(chunks, lr=1e-6)
    g = torch.Generator().manual_seed(0)
    samples = []
    for gid in range(8):
        prompt = torch.randint(0, 32768, (32,), generator=g).tolist()
        for k in range(4):
            samples.append(Sample(prompt, torch.randint(0, 32768, (64,), generator=g).tolist(), float(k % 2), gid,
                                  old_logp=-torch.rand(64, generator=g) - 9.0))
    real = MegatronPolicy(chunks, optimizer, loss_name="real", temperature=0.6, max_tokens_per_micro_batch=768)

    ce_batches = [build_micro_batch(samples, list(range(i, i + 8))) for i in range(0, 32, 8)]  # the hook's rows too
    seq = ce_batches[0]["tokens"].shape[1]
    total_tokens = float(sum(b["loss_mask"].sum() for b in ce_batches))

    def ce_loss(batch, logits):
        losses = vocab_parallel_cross_entropy(logits.float(), batch["labels"])
        return (losses * batch["loss_mask"]).sum() / total_tokens * len(ce_batches), {}

    def ce_forward(data_iterator, model):
        batch = next(data_iterator)
        return run_packed(model, batch), partial(ce_loss, batch)

    def ce_step():
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(forward_step_func=ce_forward, data_iterator=iter(ce_batches), model=chunks,
                                    num_microbatches=len(ce_batches), seq_length=seq, micro_batch_size=1,
                                    forward_only=False)
        optimizer.step()

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    timed(ce_step), timed(lambda: real.train_step(samples))  # warm-up
    ce_times, real_times = [], []
    for _ in range(args.repeats):
        ce_times.append(timed(ce_step))
        real_times.append(timed(lambda: real.train_step(samples)))
    ce, re = statistics.median(ce_times), statistics.median(real_times)
    print(f"train step, median of {args.repeats}: cross-entropy {ce * 1000:.0f} ms, REAL hook {re * 1000:.0f} ms")
    print(f"ratio REAL / CE = {re / ce:.3f} (target <= 1.05: {'met' if re / ce <= 1.05 else 'NOT met'})")
    # the fastest run of each is the least disturbed by other load on the machine
    print(f"ratio of the fastest runs = {min(real_times) / min(ce_times):.3f} "
          f"({min(real_times) * 1000:.0f} ms / {min(ce_times) * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
