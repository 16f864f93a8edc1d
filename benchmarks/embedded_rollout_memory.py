"""Peak memory and speed of one embedded-engine rollout call: step-by-step log-probs vs stacked logits.

A tiny random Qwen2 (2 layers, hidden 64) with Qwen2's real vocabulary (151,936 tokens), fp32 on
the CPU, samples ``--batch`` rollouts of ``--new-tokens`` tokens in one ``generate`` call. Two
variants of ``TransformersEngine`` are compared, each in its own fresh process:

* ``before``: the engine as it was — ``generate(output_logits=True)`` keeps every step's logits,
  which are then stacked, divided by T and log-softmaxed: O(batch × new tokens × vocabulary).
  It is reconstructed here by swapping in the old ``_generate_chunk`` body.
* ``after``: the engine as it is — :class:`SampledTokenLogprobs` records the sampled token's
  log-prob step by step: O(batch × new tokens), plus one step's [batch, vocab].

Peak memory = the process's high-water RSS during the measured calls (VmHWM, reset through
/proc/self/clear_refs right before them, after a warm-up call has loaded everything) minus the RSS
at the reset: the extra memory the rollout needs beyond the model. The small "after" figure moves
from run to run with the layout of glibc's heap (about 90-135 MiB for the default call), so the
variants run in turn ``--rounds`` times and the ratio divides the smallest "before" by the largest
"after".
Speed = generated tokens per second, best over rounds and ``--repeats`` calls, one thread. Both
variants must sample the same tokens (same seed) and report the same log-probs; the script checks.

    python benchmarks/embedded_rollout_memory.py [--batch 16 --new-tokens 256 --rounds 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proc_memory import reset_peak, rss_kib  # benchmarks/proc_memory.py

VOCAB = 151_936
EOS = 151_643  # Qwen2's <|endoftext|>
MODEL = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": VOCAB, "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 4096, "tie_word_embeddings": True}


def stacked_logits_chunk(self, requests, sampling):
    """``TransformersEngine._generate_chunk`` before step-by-step log-probs (its computation verbatim)."""
    import torch

    input_ids, attention = self._left_padded(requests)
    result = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                 **self._generate_kwargs(sampling), output_logits=True, return_dict_in_generate=True)
    new_tokens = result.sequences[:, input_ids.shape[1]:].cpu()
    logits = torch.stack(result.logits, dim=1).float().cpu() / float(sampling.temperature)
    token_logp = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens[..., None]).squeeze(-1)
    return self._completions(requests, new_tokens, token_logp)


def child(variant: str, batch: int, new_tokens: int, repeats: int, out_path: str) -> None:
    import torch

    from real_megatron.rollout.base import SamplingParams
    from real_megatron.rollout.transformers_engine import TransformersEngine

    torch.set_num_threads(1)
    if variant == "before":
        TransformersEngine._generate_chunk = stacked_logits_chunk
    torch.manual_seed(0)
    engine = TransformersEngine(MODEL, eos_token_id=EOS, pad_token_id=EOS, batch_size=batch)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, EOS, (int(n),), generator=generator).tolist()
               for n in torch.randint(8, 33, (batch // 4,), generator=generator)]
    sampling = SamplingParams(temperature=0.6, top_p=1.0, max_new_tokens=new_tokens, seed=5)
    engine.generate(prompts[:1], 2, SamplingParams(temperature=0.6, max_new_tokens=4))  # warm-up
    base = reset_peak()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        completions = engine.generate(prompts, 4, sampling)
        seconds.append(time.perf_counter() - t0)
    peak = rss_kib("VmHWM")
    with open(out_path, "w") as fh:
        json.dump({"extra_bytes": (peak - base) * 1024, "seconds": min(seconds),
                   "tokens": [c.token_ids for c in completions], "logprobs": [c.logprobs for c in completions]}, fh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="rollouts per generate call (a multiple of 4)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="measured calls per process")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per variant, run in turn")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch % 4:
        parser.error("--batch must be a multiple of 4 (prompts x 4 rollouts)")
    if args.child:
        child(args.child[0], args.batch, args.new_tokens, args.repeats, args.child[1])
        return
    runs = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for variant in runs:
                out = Path(tmp) / f"{variant}{round_}.json"
                subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--new-tokens",
                                str(args.new_tokens), "--repeats", str(args.repeats), "--child", variant, str(out)],
                               check=True)
                runs[variant].append(json.loads(out.read_text()))
    first = runs["before"][0]
    for run in runs["before"] + runs["after"]:
        if run["tokens"] != first["tokens"]:
            sys.exit("the runs sampled different tokens: the comparison is void")
    diff = max(abs(a - b) for run in runs["after"]
               for la, lb in zip(first["logprobs"], run["logprobs"], strict=True) for a, b in zip(la, lb, strict=True))
    tokens = sum(len(t) for t in first["tokens"])
    gib = 2**30
    logits_gib = args.batch * max(len(t) for t in first["tokens"]) * VOCAB * 4 / gib
    peak = {v: [r["extra_bytes"] / gib for r in rs] for v, rs in runs.items()}
    speed = {v: max(tokens / r["seconds"] for r in rs) for v, rs in runs.items()}
    print(f"{args.batch} rollouts x {args.new_tokens} new tokens, vocabulary {VOCAB:,}, fp32, CPU, 1 thread, "
          f"{args.rounds} rounds; {tokens} tokens generated; all steps' logits = {logits_gib:.2f} GiB")
    print(f"extra peak RSS (GiB)  before {min(peak['before']):.3f}-{max(peak['before']):.3f}   "
          f"after {min(peak['after']):.3f}-{max(peak['after']):.3f}   "
          f"before / after >= {min(peak['before']) / max(peak['after']):.1f}x")
    print(f"tokens/s (best)       before {speed['before']:.1f}   after {speed['after']:.1f}   "
          f"after / before = {speed['after'] / speed['before']:.2f}x")
    print(f"same tokens in every run; max |log-prob difference| = {diff:.2e}")

if __name__ == "__main__":
    main()
