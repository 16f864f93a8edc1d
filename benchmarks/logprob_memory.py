"""The output layer with log-probs and entropy: fused (``megatron/fused_output.py``) vs Megatron's
output layer + ``logprobs.py`` — peak memory, head speed, and whole-step speed at Qwen2-1.5B shapes.

Vocabulary 151,936, hidden 1,536, float32 (the CPU's training dtype). Every measurement runs in a
fresh process (``--child``), so no allocator cache carries over from one to the next.

* **Memory** (2k / 8k / 16k tokens): peak resident memory of forward+backward (and of the
  forward-only pass under ``no_grad``, as the old log-probs are computed) *above the inputs* —
  VmHWM reset once the hidden states [N, 1, H], the weight [V, H] and the targets exist — minus
  the bytes of the gradients the pass must return (∂h [N, H] and ∂W [V, H], identical in both
  paths), ÷ the bytes of the fp32 logits [N, V]. Unfused = what the stack runs today: the logits
  of ``h·Wᵀ``, then ``vocab_parallel_logprobs(..., overwrite_logits=True)`` (the training hook's
  call: the softmax kept for backward in the logits' own storage). The sweep uses hidden 128:
  its FLOPs at hidden 1,536 and 16k tokens would take ~10 minutes on 2 cores by themselves, and
  nothing the ratio counts depends on the hidden size (the temporaries are [tokens, vocab] tiles or
  logits; the [·, H] tensors are the inputs and gradients left out); the timed runs below, at hidden
  1,536, report the same ratio as a check.
* **Head speed**: forward+backward of the output layer with log-probs and entropy at hidden 1,536,
  vocabulary 151,936, 1,024 tokens, fused ÷ unfused: CPU time of one thread (``thread_time``, which
  other jobs on the machine do not inflate), the minimum over ``--reps`` alternating processes.
* **Whole step**: a ``GPTModel`` of the 1.5B shapes (hidden 1,536, FFN 8,960, 12 heads / 2 KV heads,
  vocabulary 151,936, tied embeddings, local spec, fp32) with 2 layers, one packed row of 512
  tokens (4 sequences, each 1/8 prompt and 7/8 response), forward + the training hook's loss (mean
  log-prob of the response tokens, no entropy) + backward. Fused as the hook is to call it:
  ``token_mask`` = the response tokens (the only log-probs the loss reads); also measured without
  it (every position in forward; backward still skips the g = 0 rows). The optimizer step is left
  out (it does not depend on the output layer, and leaving it out makes the ratio larger).
  Per-layer time: the first decoder layer alone, forward + backward on exactly the inputs the
  model gave it (captured by a forward pre-hook), minimum of 2 × ``--reps`` runs; the 28-layer step
  = step(2 layers) + 26 × per-layer time, fused and unfused. One thread, CPU time, minimum over
  ``--reps``.

The last line printed is one JSON object: ``fused_peak_ratio`` / ``unfused_peak_ratio`` (the largest
over the token counts, forward+backward), ``fused_fwd_peak_ratio`` / ``unfused_fwd_peak_ratio``,
``head_time_ratio``, ``step_time_ratio`` (``step_time_ratio_no_token_mask``) and the measurements
behind them.

    python benchmarks/logprob_memory.py [--reps 2] [--tokens 2048,8192,16384]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from proc_memory import reset_peak, rss_kib  # benchmarks/proc_memory.py

VOCAB = 151_936
HIDDEN = 1_536
SWEEP_HIDDEN = 128
TEMPERATURE = 0.6  # the recipes' sampling temperature


# ------------------------------------------------------------------------------------------ children

def child_head(variant: str, tokens: int, hidden: int, mode: str, threads: int) -> dict:
    """One pass of the output layer + log-probs + entropy; peak memory above the inputs, CPU time."""
    import torch

    from real_megatron.megatron.fused_output import fused_logprobs
    from real_megatron.megatron.logprobs import vocab_parallel_logprobs

    torch.set_num_threads(threads)
    backward = mode == "fb"
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, 1, hidden, generator=g).requires_grad_(backward)
    w = (0.02 * torch.randn(VOCAB, hidden, generator=g)).requires_grad_(backward)
    target = torch.randint(0, VOCAB, (1, tokens), generator=g)
    coef = torch.rand(1, tokens, generator=g)
    grad_bytes = (h.numel() + w.numel()) * 4 if backward else 0

    marks = {}

    def run(h, w, target, coef):
        with torch.set_grad_enabled(backward):
            if variant == "fused":
                logp, entropy = fused_logprobs(h, w, target, temperature=TEMPERATURE, vocab_size=VOCAB)
            else:  # Megatron's layer writes [S, B, V]; GPTModel hands back [B, S, V]
                logits = torch.matmul(h, w.t()).transpose(0, 1)
                logp, entropy = vocab_parallel_logprobs(logits, target, temperature=TEMPERATURE, vocab_size=VOCAB,
                                                        overwrite_logits=backward)
                del logits
            # the forward's peak, and what forward leaves alive for backward, measured apart: the
            # gradients appear only in backward, so they are subtracted from backward's peak alone
            marks["forward_peak"] = rss_kib("VmHWM")
            marks["before_backward"] = reset_peak()
            if backward:
                (logp * coef).sum().backward()
        return logp, entropy

    # warm-up on 4 tokens: the math libraries' one-off allocations (thread pools, GEMM workspaces)
    # happen here, not inside the measured peak; then the weight's gradient is dropped again
    small = h[:4].detach().requires_grad_(backward)
    run(small, w, target[:, :4], coef[:, :4])
    w.grad = None
    del small
    base = reset_peak()
    wall, cpu = time.perf_counter(), time.thread_time()
    logp, entropy = run(h, w, target, coef)
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    backward_peak = rss_kib("VmHWM")
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    logits_bytes = tokens * VOCAB * 4
    extra = (marks["forward_peak"] - base) * 1024
    if backward:  # everything alive at backward's peak, less the two gradients it returns
        extra = max(extra, (backward_peak - base) * 1024 - grad_bytes)
    return {"variant": variant, "tokens": tokens, "hidden": hidden, "mode": mode, "ratio": extra / logits_bytes,
            "extra_mib": extra / 2**20, "logits_mib": logits_bytes / 2**20, "cpu_s": cpu, "wall_s": wall}


def child_step(tokens: int, reps: int) -> dict:
    """Forward + loss + backward of a 2-layer GPTModel of the 1.5B shapes, fused and unfused, and the
    same model with one layer (for the per-layer time). CPU time of one thread."""
    import torch

    from real_megatron.megatron.batch import Sample, build_micro_batch
    from real_megatron.megatron.fused_output import model_logprobs, output_hidden_states
    from real_megatron.megatron.logprobs import vocab_parallel_logprobs
    from real_megatron.megatron.model import build_model, initialize_parallel, unwrap
    from real_megatron.megatron.packed_forward import run_packed

    torch.set_num_threads(1)
    hf = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": HIDDEN,
          "num_hidden_layers": 2, "num_attention_heads": 12, "num_key_value_heads": 2, "intermediate_size": 8960,
          "vocab_size": VOCAB, "tie_word_embeddings": True, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
          "max_position_embeddings": 32768}
    initialize_parallel(tp=1, pp=1, cp=1, seed=1)
    model = build_model(hf, transformer_impl="local", dtype=torch.float32)[0]
    gpt = unwrap(model)
    g = torch.Generator().manual_seed(0)
    per = tokens // 4
    # prompt 1/8 of each sequence: the recipes' prompts (≤ 1,024) are short beside their responses
    # (up to 8,192); only response tokens carry a log-prob the loss reads
    samples = [Sample(torch.randint(1, VOCAB, (per // 8,), generator=g).tolist(),
                      torch.randint(1, VOCAB, (per - per // 8,), generator=g).tolist(), 1.0, k) for k in range(4)]
    batch = build_micro_batch(samples, [0, 1, 2, 3])
    mask = batch["loss_mask"] > 0

    def step(fused: bool, token_mask: bool = True) -> float:
        model.zero_grad(set_to_none=False)
        start = time.thread_time()
        if fused:  # the hook's training call, fused: log-probs only (the entropy is a forward-only metric),
            # of the response tokens only when token_mask (else every position, and backward skips g = 0 rows)
            with output_hidden_states(model):
                hidden = run_packed(model, batch)
            logp, _ = model_logprobs(model, hidden, batch["labels"], temperature=TEMPERATURE, vocab_size=VOCAB,
                                     with_entropy=False, token_mask=mask if token_mask else None)
        else:  # the hook's training call today
            logits = run_packed(model, batch)
            logp, _ = vocab_parallel_logprobs(logits, batch["labels"], temperature=TEMPERATURE, vocab_size=VOCAB,
                                              with_entropy=False, overwrite_logits=True)
            del logits
        loss = -(logp * mask).sum() / mask.sum()
        loss.backward()
        return time.thread_time() - start

    # one decoder layer alone, forward + backward, on exactly the inputs the model gives it
    captured = {}

    def grab(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs

    handle = gpt.decoder.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        run_packed(model, batch)
    handle.remove()

    def layer() -> float:
        args, kwargs = list(captured["args"]), dict(captured["kwargs"])
        if args:
            args[0] = args[0].detach().requires_grad_(True)
        else:
            kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_(True)
        start = time.thread_time()
        out, _ = gpt.decoder.layers[0](*args, **kwargs)
        out.backward(torch.ones_like(out))
        return time.thread_time() - start

    times = {"unfused_2": [], "fused_2": [], "fused_2_no_mask": [], "layer": []}
    step(False)  # warm-up: first-touch of the gradient buffers, one-off allocations
    for _ in range(reps):
        times["unfused_2"].append(step(False))
        times["fused_2"].append(step(True))
        times["fused_2_no_mask"].append(step(True, token_mask=False))
        times["layer"].append(layer())
        times["layer"].append(layer())
    return {k: min(v) for k, v in times.items()} | {"all": times, "tokens": tokens,
                                                     "response_fraction": float(mask.float().mean())}


# ------------------------------------------------------------------------------------------ parent

CHILD_SECONDS: dict[str, float] = {}  # wall seconds of each child process, for the record


def run_child(*args: str, timeout: float = 900) -> dict | None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, __file__, "--child", *args]
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    CHILD_SECONDS[" ".join(args)] = round(time.perf_counter() - began, 1)
    if proc.returncode != 0:
        print(f"  child {' '.join(args)} failed (rc {proc.returncode}): {proc.stderr.strip()[-600:]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mem_available_gib() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="2048,8192,16384", help="token counts of the memory sweep")
    parser.add_argument("--time-tokens", type=int, default=1024, help="tokens of the timed head runs")
    parser.add_argument("--step-tokens", type=int, default=512, help="tokens of the whole-step runs (one packed row)")
    parser.add_argument("--reps", type=int, default=2, help="alternating repetitions of each timed run")
    parser.add_argument("--skip-step", action="store_true", help="leave out the whole-step measurement")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "head":
            out = child_head(rest[0], int(rest[1]), int(rest[2]), rest[3], int(rest[4]))
        else:
            out = child_step(int(rest[0]), int(rest[1]))
        print(json.dumps(out))
        return

    began = time.perf_counter()
    threads = os.cpu_count() or 1
    print(f"machine: {platform.processor() or platform.machine()}, {threads} CPUs, "
          f"{mem_available_gib():.1f} GiB available; vocabulary {VOCAB:,}, float32", flush=True)

    # memory sweep (hidden 128, all cores)
    sweep = {}
    print(f"\nmemory: peak above inputs (and the returned gradients) / fp32 logits bytes, hidden {SWEEP_HIDDEN}")
    print(f"{'tokens':>7} {'logits':>9} | {'fwd+bwd fused':>14} {'unfused':>8} | {'fwd-only fused':>15} {'unfused':>8}")
    for tokens in (int(t) for t in args.tokens.split(",")):
        row = {}
        for mode in ("fb", "fwd"):
            for variant in ("fused", "unfused"):
                need = tokens * VOCAB * 4 * (1.3 if variant == "unfused" else 0.2) / 2**30 + 2
                if need > mem_available_gib():
                    print(f"  skipped {variant} {mode} at {tokens} tokens: needs ~{need:.1f} GiB, "
                          f"{mem_available_gib():.1f} available", flush=True)
                    continue
                row[(variant, mode)] = run_child("head", variant, str(tokens), str(SWEEP_HIDDEN), mode, str(threads))
        sweep[tokens] = row

        def fmt(key, row=row):
            r = row.get(key)
            return f"{r['ratio']:.3f}x" if r else "-"

        print(f"{tokens:>7} {tokens * VOCAB * 4 / 2**30:>7.2f}G | {fmt(('fused', 'fb')):>14} "
              f"{fmt(('unfused', 'fb')):>8} | "
              f"{fmt(('fused', 'fwd')):>15} {fmt(('unfused', 'fwd')):>8}", flush=True)

    # head speed (hidden 1536, one thread, alternating processes); their peaks are the hidden-1536 check
    n = args.time_tokens
    head = {"fused": [], "unfused": []}
    for _ in range(args.reps):
        for variant in ("unfused", "fused"):
            r = run_child("head", variant, str(n), str(HIDDEN), "fb", "1")
            if r:
                head[variant].append(r)
    fwd_check = {v: run_child("head", v, str(n), str(HIDDEN), "fwd", str(threads)) for v in ("fused", "unfused")}
    head_cpu = {v: min(r["cpu_s"] for r in rs) for v, rs in head.items() if rs}
    head_ratio = head_cpu["fused"] / head_cpu["unfused"] if len(head_cpu) == 2 else None
    print(f"\nhead, forward+backward with log-probs and entropy, {n} tokens x hidden {HIDDEN} x {VOCAB:,} "
          f"(one thread, CPU s, min of {args.reps}):")
    for v, rs in head.items():
        cpu_s = ", ".join(f"{r['cpu_s']:.2f}" for r in rs)
        peaks = ", ".join(f"{r['ratio']:.3f}x" for r in rs)
        fwd = f"{fwd_check[v]['ratio']:.3f}x" if fwd_check.get(v) else "-"
        print(f"  {v:8s} {cpu_s} s   peak ratio {peaks}   (forward-only peak ratio {fwd})")
    if head_ratio:
        print(f"  fused / unfused = {head_ratio:.3f}  (target <= 1.35)")

    step = None
    step_ratio = None
    if not args.skip_step:
        step = run_child("step", str(args.step_tokens), str(args.reps), timeout=1500)
    step_ratio_no_mask = None
    if step:
        per_layer = step["layer"]
        unfused_28 = step["unfused_2"] + 26 * per_layer
        fused_28 = step["fused_2"] + 26 * per_layer
        step_ratio = fused_28 / unfused_28
        step_ratio_no_mask = (step["fused_2_no_mask"] + 26 * per_layer) / unfused_28
        print(f"\nstep, 1.5B shapes, {args.step_tokens} tokens, {step['response_fraction']:.1%} of them response "
              f"(one thread, CPU s, min of {args.reps}): 2 layers unfused {step['unfused_2']:.2f}, fused "
              f"{step['fused_2']:.2f} (no token mask {step['fused_2_no_mask']:.2f}); one layer alone "
              f"{per_layer:.2f}")
        print(f"  28 layers: unfused {unfused_28:.1f} s, fused {fused_28:.1f} s, fused / unfused = {step_ratio:.3f} "
              f"(no token mask: {step_ratio_no_mask:.3f}; target <= 1.05)")

    def largest(variant, mode):
        values = [row[(variant, mode)]["ratio"] for row in sweep.values() if row.get((variant, mode))]
        return max(values) if values else None

    result = {
        "fused_peak_ratio": largest("fused", "fb"), "unfused_peak_ratio": largest("unfused", "fb"),
        "fused_fwd_peak_ratio": largest("fused", "fwd"), "unfused_fwd_peak_ratio": largest("unfused", "fwd"),
        "head_time_ratio": head_ratio, "step_time_ratio": step_ratio,
        "step_time_ratio_no_token_mask": step_ratio_no_mask,
        "peak_ratio_by_tokens": {str(t): {f"{v}_{m}": round(r["ratio"], 4) for (v, m), r in row.items() if r}
                                 for t, row in sweep.items()},
        "hidden1536_check": {f"{v}_{m}": round(r["ratio"], 4) for v, m, r in
                             [(v, "fb", rs[0]) for v, rs in head.items() if rs] +
                             [(v, "fwd", r) for v, r in fwd_check.items() if r]},
        "head_cpu_s": head_cpu, "head_tokens": n, "step": step, "seconds": round(time.perf_counter() - began, 1),
        "child_seconds": CHILD_SECONDS,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
