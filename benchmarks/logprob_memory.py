"""Peak memory of per-token log-prob + entropy, as a ratio to the bytes of the logits tensor.

Vocabulary 151,936 (Qwen2's), float32 logits [S, V]. Each variant runs in a fresh process; its
peak is the process's high-water RSS (VmHWM, reset just before the measured call) minus the RSS
with the logits already allocated, i.e. the *extra* memory the computation needs, reported as a
ratio to the logits' bytes. Compared:

* ``naive``: ``log_softmax`` in fp32, gather the target, entropy as −Σ p·log p — the usual code.
* ``ours``: ``vocab_parallel_logprobs`` (chunked over rows, fp32 work, no full-vocab copies kept).

Forward only (old log-probs, entropy metrics) and forward+backward (training; the gradient of the
logits, 1× by itself, is unavoidable) are both measured. Target: ours ≤ 1.5× in both.

    python benchmarks/logprob_memory.py [--seq 4096]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from proc_memory import reset_peak, rss_kib  # benchmarks/proc_memory.py

VOCAB = 151_936


def child(variant: str, seq: int, backward: bool) -> None:
    import torch

    from real_megatron.megatron.logprobs import vocab_parallel_logprobs

    torch.manual_seed(0)
    logits = torch.randn(seq, VOCAB, dtype=torch.float32, requires_grad=backward)
    target = torch.randint(0, VOCAB, (seq,))
    logits_bytes = logits.numel() * 4
    base = reset_peak()
    if variant == "naive":
        logsm = torch.log_softmax(logits.float(), dim=-1)
        logp = logsm.gather(-1, target[:, None]).squeeze(-1)
        entropy = -(logsm.exp() * logsm).sum(-1)
    else:
        logp, entropy = vocab_parallel_logprobs(logits, target, temperature=0.6)
    if backward:
        logp.sum().backward()
    peak = rss_kib("VmHWM")
    print(json.dumps({"extra_over_logits": (peak - base) * 1024 / logits_bytes, "logits_gb": logits_bytes / 2**30}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=4096, help="tokens (rows of logits); 4096 x 151,936 fp32 = 2.3 GiB")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.seq, args.child[1] == "1")
        return
    results = {}
    for backward in (False, True):
        for variant in ("naive", "ours"):
            out = subprocess.run([sys.executable, __file__, "--seq", str(args.seq), "--child", variant, str(int(backward))],
                                 capture_output=True, text=True, check=True)
            results[(variant, backward)] = json.loads(out.stdout.strip().splitlines()[-1])
    gb = results[("ours", False)]["logits_gb"]
    print(f"logits: {args.seq} x {VOCAB} fp32 = {gb:.2f} GiB")
    for backward in (False, True):
        label = "forward+backward" if backward else "forward (log-prob + entropy)"
        naive = results[("naive", backward)]["extra_over_logits"]
        ours = results[("ours", backward)]["extra_over_logits"]
        print(f"{label:<30} extra peak / logits bytes: naive {naive:.2f}x   ours {ours:.2f}x   "
              f"(target <= 1.5x: {'met' if ours <= 1.5 else 'NOT met'})")


if __name__ == "__main__":
    main()
