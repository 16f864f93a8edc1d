"""Fused output layer vs Megatron's (logits + ``vocab_parallel_logprobs``) under one parallel layout.

Run alone (`python fused_output.py --out r.pt`, a world of one) or under torchrun. Three modes:

* model (default): a tiny Qwen2 ``GPTModel`` (``build_model``, DDP-wrapped, fixed weights) runs
  Megatron's forward/backward schedule over two micro-batches per data-parallel rank (packed rows,
  or ``--unpacked`` [2, S] rows), once with the output layer's logits and ``vocab_parallel_logprobs``,
  once with ``output_hidden_states`` + ``model_logprobs``. Loss = Σ_positions c·log p with fixed
  c ∈ [0.5, 1.5] at every position (so every row of the op carries gradient). Compared: log-probs,
  entropy and the loss (forward+backward, and forward-only under no_grad as the old log-probs are
  computed), and every parameter's gradient after ``finalize_model_grads`` (DP reduction, and the tied
  embedding's sum over pipeline stages), gathered to full shape.
* ``--layer``: TP=2 with and without sequence parallelism on Megatron's ``ColumnParallelLinear``
  (the local layer spec's norms refuse SP on the CPU, so the full model cannot run SP here).
* ``--cp``: context parallelism on the op alone (CP attention needs Transformer Engine): each CP
  rank keeps its two chunks of every sequence of a packed row (Megatron's THD split) and runs the op
  on those rows only; a sequence-level loss over per-rollout sums reduced over the CP group (identity
  backward, as the hook does) must give the unsplit log-probs at those positions, the unsplit ∂h
  rows, and — summed over CP ranks — the unsplit ∂W.

Each runs in every dtype of ``--dtypes`` (float32 and float64 by default). ``--mutate NAME[,NAME]``
re-runs the fused side (first dtype) with one deliberate bug patched in and records its errors too
(the test asserts they are large): ``chunk`` (every tile but the last stops one entry short),
``tp_stats`` (no all-reduce of the per-token maxima and sums), ``tp_dgrad`` (∂h not reduced over the
TP ranks), ``tied`` (the output weight detached: its gradient dropped).

Result: ``{section: {tensor: (max |fused − unfused| / max |unfused|, ‖fused − unfused‖ / ‖unfused‖)}}``,
each the largest over ranks.
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

VOCAB = 300  # TINY_QWEN2's; padded to 384 (tp=1) or 512 (tp=2): padding is present in every layout


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``(max |got − ref| / max |ref|, ‖got − ref‖₂ / ‖ref‖₂)``; NaN counts as infinitely wrong."""
    diff, ref = got.double() - ref.double(), ref.double()
    if ref.abs().max().item() == 0:
        raise AssertionError("reference tensor is all zero: the comparison would be vacuous")
    errs = (diff.abs().max().item() / ref.abs().max().item(), diff.norm().item() / ref.norm().item())
    return tuple(float("inf") if e != e else e for e in errs)


def max_over_ranks(err: dict, group=None) -> dict:
    """``{key: (max, norm)}`` with each error the largest over the ranks (keys may differ by rank)."""
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, list(err), group=group)
    keys = sorted({k for part in parts for k in part})
    values = torch.tensor([err.get(k, (0.0, 0.0)) for k in keys], dtype=torch.float64).reshape(len(keys), 2)
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
    return {k: tuple(v) for k, v in zip(keys, values.tolist(), strict=True)}


def _no_dgrad_reduction(hidden, group, sequence_parallel):
    """The TP-region entry without its backward reduction: ∂h stays this rank's partial sum."""
    from megatron.core.tensor_parallel import mappings

    if sequence_parallel:  # all-gather forward, but a plain split (no reduce-scatter) backward
        return mappings.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False, group=group)
    return hidden


def tile_of(spec: str) -> dict:
    """``"7,50"`` → chunk_tokens=7, vocab_block=50 (many ragged tiles on the tiny sizes); "default": the op's own."""
    if spec == "default":
        return {}
    chunk, block = (int(v) for v in spec.split(","))
    return {"chunk_tokens": chunk, "vocab_block": block}


def unpacked_batches(samples, parts) -> list[dict]:
    """Plain rows, one rollout each, right-padded to a common length: ``[2, S]`` micro-batches, causal mask."""
    out = []
    for part in parts:
        seq = max(samples[i].length for i in part)
        tokens = torch.zeros(len(part), seq, dtype=torch.long)
        for row, i in enumerate(part):
            ids = list(samples[i].prompt_ids) + list(samples[i].response_ids)
            tokens[row, :len(ids)] = torch.tensor(ids)
        labels = torch.roll(tokens, -1, 1)
        labels[:, -1] = 0
        out.append({"tokens": tokens, "labels": labels,
                    "position_ids": torch.arange(seq).expand(len(part), seq).contiguous()})
    return out


def mutations(names: list[str]):
    """Context managers that patch one bug each into fused_output (see the module docstring)."""
    from unittest import mock

    from real_megatron.megatron import fused_output as fo

    real_output_weight = fo.output_weight
    patches = {
        # off by one: every tile but the last stops one short, so one entry per boundary is never visited
        "chunk": mock.patch.object(fo, "_tiles", lambda total, size: [
            (s, min(s + size, total) - (s + size < total)) for s in range(0, total, size)]),
        "tp_stats": mock.patch.object(fo, "_tp_all_reduce", lambda tensor, op, group: None),
        "tp_dgrad": mock.patch.object(fo, "_into_tp_region", _no_dgrad_reduction),
        "tied": mock.patch.object(fo, "output_weight", lambda model: real_output_weight(model).detach()),
    }
    stack = ExitStack()
    for name in names:
        stack.enter_context(patches[name])
    return stack


def model_mode(args) -> dict:
    from common import TINY_QWEN2, fixed_full_state_dict, fixed_samples
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from real_megatron.megatron.batch import build_micro_batch
    from real_megatron.megatron.fused_output import model_logprobs, output_hidden_states
    from real_megatron.megatron.logprobs import vocab_parallel_logprobs
    from real_megatron.megatron.model import build_model, initialize_parallel
    from real_megatron.megatron.packed_forward import run_packed
    from real_megatron.megatron.sharding import gather_full_state_dict, load_full_state_dict

    hf = dict(TINY_QWEN2, tie_word_embeddings=args.tied)
    dp = initialize_parallel(tp=args.tp, pp=args.pp, cp=1, seed=7)
    tp_group = ps.get_tensor_model_parallel_group()
    samples = fixed_samples()
    # this DP rank's rollouts in two micro-batches
    mine = list(range(len(samples)))[ps.get_data_parallel_rank()::dp]
    if args.unpacked:  # two rollouts per micro-batch, one per row
        batches = unpacked_batches(samples, [mine[k:k + 2] for k in range(0, 4, 2)])
    else:  # packed rows; under PP every row has one length (the schedule's p2p buffers)
        halves = [mine[: len(mine) // 2], mine[len(mine) // 2:]]
        row = max(sum(samples[i].length for i in part) for part in halves) if args.pp > 1 else None
        batches = [build_micro_batch(samples, part, row_length=row) for part in halves]
    g = torch.Generator().manual_seed(11 + ps.get_data_parallel_rank())
    for batch in batches:
        # positive weights: Σ c·log p has no cancellation, so its relative error means something
        batch["coef"] = 0.5 + torch.rand(batch["labels"].shape, generator=g, dtype=torch.float64)
    seq_len = max(b["tokens"].shape[1] for b in batches)
    tile = tile_of(args.tile)

    def run(model, fused: bool, forward_only: bool):
        records = []

        def forward_step(data_iterator, model):
            batch = next(data_iterator)

            def forward():
                if args.unpacked:
                    return model(batch["tokens"], batch["position_ids"], None)
                return run_packed(model, batch)

            if fused:
                with output_hidden_states(model):
                    output = forward()
            else:
                output = forward()

            def loss_func(output):
                if fused:
                    logp, ent = model_logprobs(model, output, batch["labels"], temperature=args.temperature,
                                               vocab_size=VOCAB, **tile)
                else:
                    logp, ent = vocab_parallel_logprobs(output, batch["labels"], temperature=args.temperature,
                                                        vocab_size=VOCAB, tp_group=tp_group)
                loss = (logp * batch["coef"].to(logp.dtype)).sum()
                records.append({"logp": logp.detach().clone(), "entropy": ent.detach().clone(),
                                "loss": loss.detach().clone()})
                return loss, {}

            return output, loss_func

        model.zero_grad_buffer()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
                                    num_microbatches=len(batches), seq_length=seq_len,
                                    micro_batch_size=batches[0]["tokens"].shape[0], forward_only=forward_only)
        grads = None if forward_only else gather_full_state_dict(model, "grad")
        return records, grads

    def compare(fused, ref, fused_grads=None, ref_grads=None) -> dict:
        # (also used with the float32 unfused run as "fused" and the float64 one as "ref")
        err = {}
        if ps.is_pipeline_last_stage():  # the log-probs exist there only
            for key in ("logp", "entropy", "loss"):
                pairs = [rel_err(f[key], r[key]) for f, r in zip(fused, ref, strict=True)]
                err[key] = tuple(max(p[i] for p in pairs) for i in range(2))
        if ref_grads is not None:
            assert fused_grads.keys() == ref_grads.keys()
            for name in ref_grads:
                err["grad/" + name] = rel_err(fused_grads[name], ref_grads[name])
        return max_over_ranks(err)

    result = {}
    refs = {}
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        model = build_model(hf, wrap_ddp=True, transformer_impl="local", dtype=dtype)[0]
        load_full_state_dict(model, fixed_full_state_dict(hf))
        ref, ref_grads = run(model, fused=False, forward_only=False)
        refs[dtype_name] = (ref, ref_grads)
        fused, fused_grads = run(model, fused=True, forward_only=False)
        result[f"{dtype_name}/train"] = compare(fused, ref, fused_grads, ref_grads)
        ref_fwd, _ = run(model, fused=False, forward_only=True)
        with torch.no_grad():  # as the old log-probs are computed
            fused_fwd, _ = run(model, fused=True, forward_only=True)
        result[f"{dtype_name}/forward_only"] = compare(fused_fwd, ref_fwd)
        if dtype_name == args.dtypes[0]:
            for name in args.mutate:
                with mutations([name]):
                    mutated, mutated_grads = run(model, fused=True, forward_only=False)
                result[f"mutated/{name}"] = compare(mutated, ref, mutated_grads, ref_grads)
    if {"float32", "float64"} <= set(refs):  # the float32 rounding floor: the unfused path against itself in float64
        (ref32, grads32), (ref64, grads64) = refs["float32"], refs["float64"]
        result["floor/unfused_float32_vs_float64"] = compare(ref32, ref64, grads32, grads64)
    result["layout"] = {"tp": args.tp, "pp": args.pp, "dp": dp, "tied": args.tied,
                        "shapes": [tuple(b["tokens"].shape) for b in batches]}
    return result


def cp_mode(args) -> dict:
    from common import fixed_samples
    from megatron.core import parallel_state as ps

    from real_megatron.megatron.batch import alignment, build_micro_batch, cp_row_indices, split_for_cp
    from real_megatron.megatron.fused_output import fused_logprobs
    from real_megatron.megatron.logprobs import vocab_parallel_logprobs
    from real_megatron.megatron.model import initialize_parallel

    initialize_parallel(tp=1, pp=1, cp=2, seed=3)
    cp, cp_rank, cp_group = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank(), \
        ps.get_context_parallel_group()
    samples = fixed_samples()
    batch = build_micro_batch(samples, list(range(len(samples))), align=alignment(cp))
    keep = cp_row_indices(batch["cu_seqlens"], cp, cp_rank)
    local = split_for_cp(batch, cp, cp_rank)
    seq, hidden_size, padded = batch["tokens"].shape[1], 16, 384
    g = torch.Generator().manual_seed(5)
    hidden_full = torch.randn(seq, 1, hidden_size, generator=g, dtype=torch.float64)
    weight_full = 0.5 * torch.randn(padded, hidden_size, generator=g, dtype=torch.float64)
    coef = torch.randn(seq, generator=g, dtype=torch.float64)

    class _CpSum(torch.autograd.Function):  # all-reduce forward, identity backward (the hook's cp_sum)
        @staticmethod
        def forward(ctx, x):
            x = x.clone()
            dist.all_reduce(x, group=cp_group)
            return x

        @staticmethod
        def backward(ctx, grad):
            return grad

    def run(fused: bool, dtype, h, labels, segment, weights, reduce):
        h = h.to(dtype).clone().requires_grad_(True)
        w = weight_full.to(dtype).clone().requires_grad_(True)
        if fused:
            logp, ent = fused_logprobs(h, w, labels, temperature=0.7, vocab_size=VOCAB, **tile_of(args.tile))
        else:
            logp, ent = vocab_parallel_logprobs((h @ w.t()).transpose(0, 1), labels, temperature=0.7,
                                                vocab_size=VOCAB)
        # per-rollout Σ c·log p, CP-reduced, through a nonlinearity: a sequence-level loss like REAL's
        seg = segment[0]
        sums = torch.zeros(len(samples), dtype=logp.dtype).index_add(
            0, seg.clamp(min=0), torch.where(seg >= 0, logp[0] * weights.to(dtype), 0.0))
        loss = torch.sigmoid(0.1 * (_CpSum.apply(sums) if reduce else sums)).sum()
        dh, dw = torch.autograd.grad(loss, (h, w))
        return {"logp": logp.detach(), "entropy": ent.detach(), "loss": loss.detach(), "grad/hidden": dh,
                "grad/weight": dw}

    result = {}
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        ref = run(False, dtype, hidden_full, batch["labels"], batch["segment"], coef, reduce=False)
        got = run(True, dtype, hidden_full[keep], local["labels"], local["segment"], coef[keep], reduce=True)
        dist.all_reduce(got["grad/weight"], group=cp_group)  # DDP sums the CP ranks' weight gradients
        ref["logp"], ref["entropy"], ref["grad/hidden"] = ref["logp"][:, keep], ref["entropy"][:, keep], \
            ref["grad/hidden"][keep]
        result[f"{dtype_name}/cp"] = max_over_ranks({k: rel_err(got[k], ref[k]) for k in ref})
    result["layout"] = {"cp": cp, "shapes": [(seq, 1, hidden_size)], "rank_positions": int(keep.numel())}
    return result


def layer_mode(args) -> dict:
    """TP=2 on Megatron's own ``ColumnParallelLinear`` (the output layer's class), with and without
    sequence parallelism: the local layer spec's norms refuse SP on the CPU, the output layer does not.
    Unfused: the layer's logits + ``vocab_parallel_logprobs``; fused: ``fused_logprobs`` on the layer's
    input and weight. Two vocabularies: 300 of 512 (padding in rank 1's slice) and 200 of 512 (rank 1's
    slice is all padding)."""
    from common import TINY_QWEN2
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from real_megatron.megatron.fused_output import fused_logprobs
    from real_megatron.megatron.logprobs import vocab_parallel_logprobs
    from real_megatron.megatron.model import initialize_parallel, transformer_config

    initialize_parallel(tp=2, pp=1, cp=1, seed=3)
    tp, rank, group = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(), \
        ps.get_tensor_model_parallel_group()
    hidden_size, padded, seq, batch = TINY_QWEN2["hidden_size"], 512, 24, 2
    g = torch.Generator().manual_seed(17)
    h_full = torch.randn(seq, batch, hidden_size, generator=g, dtype=torch.float64)
    w_full = 0.3 * torch.randn(padded, hidden_size, generator=g, dtype=torch.float64)
    coef = 0.5 + torch.rand(batch, seq, generator=g, dtype=torch.float64)
    coef[torch.rand(batch, seq, generator=g) < 0.3] = 0.0  # positions no loss reads: backward skips them
    tile = tile_of(args.tile)

    def case(dtype, sp: bool, vocab: int, fused: bool) -> dict:
        layer = ColumnParallelLinear(hidden_size, padded, config=transformer_config(TINY_QWEN2, dtype=dtype,
                                                                                    sequence_parallel=sp),
                                     init_method=lambda w: None, bias=False, gather_output=False, tp_group=group)
        with torch.no_grad():
            layer.weight.copy_(w_full.chunk(tp)[rank])
        target = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(vocab))
        h = (h_full.chunk(tp)[rank] if sp else h_full).to(dtype).clone().requires_grad_(True)
        if fused:
            logp, ent = fused_logprobs(h, layer.weight, target, temperature=0.7, vocab_size=vocab, tp_group=group,
                                       sequence_parallel=sp, **tile)
        else:
            logits, _ = layer(h)
            logp, ent = vocab_parallel_logprobs(logits.transpose(0, 1), target, temperature=0.7, vocab_size=vocab,
                                                tp_group=group)
        loss = (coef.to(dtype) * logp).sum()
        loss.backward()
        return {"logp": logp.detach(), "entropy": ent.detach(), "loss": loss.detach(), "grad/hidden": h.grad,
                "grad/weight": layer.weight.grad}

    def full(tensor):  # the TP ranks' pieces side by side (a rank's weight slice may be all padding)
        parts = [torch.empty_like(tensor) for _ in range(tp)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat([p.reshape(-1) for p in parts])

    def compare(got, ref):
        return {k: rel_err(full(got[k]), full(ref[k])) for k in ref}

    result = {}
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for sp in (False, True):
            for vocab in (300, 200):
                name = f"sp={sp},vocab={vocab}"
                ref = case(dtype, sp, vocab, fused=False)
                result[f"{dtype_name}/{name}"] = compare(case(dtype, sp, vocab, fused=True), ref)
                if dtype_name == args.dtypes[0]:
                    for mutation in args.mutate:
                        with mutations([mutation]):
                            result[f"mutated/{mutation}/{name}"] = compare(case(dtype, sp, vocab, fused=True), ref)
    result["layout"] = {"tp": tp, "shapes": [(seq, batch, hidden_size)]}
    return result


def parse(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--tied", action="store_true")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--dtypes", default="float32,float64", help="parameter dtypes, each compared in turn")
    parser.add_argument("--tile", default="7,50", help="chunk_tokens,vocab_block of the fused op ('default': its own)")
    parser.add_argument("--cp", action="store_true", help="CP=2 on the op alone")
    parser.add_argument("--layer", action="store_true", help="TP=2 ± SP on Megatron's ColumnParallelLinear")
    parser.add_argument("--mutate", default="", help="comma-separated: chunk, tp_stats, tp_dgrad, tied")
    parser.add_argument("--unpacked", action="store_true", help="[2, S] rows of one rollout each, causal mask")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.mutate = [m for m in args.mutate.split(",") if m]
    args.dtypes = args.dtypes.split(",")
    return args


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    result = cp_mode(args) if args.cp else layer_mode(args) if args.layer else model_mode(args)
    if dist.get_rank() == 0:
        torch.save(result, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
