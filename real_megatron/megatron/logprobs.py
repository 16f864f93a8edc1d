"""Per-token log-probs and entropy from vocab-parallel logits, exact across tensor-parallel ranks.

``logits``: ``[..., V/tp]`` (this rank's slice of the padded vocabulary), ``target``: ``[...]`` token ids.
With x = logits / T (T = the rollout sampling temperature, as the authors do):

    log p(target) = x_target − logsumexp(x)        H = logsumexp(x) − Σ softmax(x)·x

Each logsumexp is assembled from per-rank pieces: an all-reduce(MAX) of the row maxima, then one
all-reduce(SUM) of [Σ exp(x − m), Σ exp(x − m)·x, x_target-if-local] stacked together. Vocabulary
padding (entries ≥ ``vocab_size``) is excluded.

Memory and speed: the work runs over chunks of rows, so besides the logits and what backward
keeps, only one chunk's fp32 temporaries exist at a time. ∂ log p/∂x = (onehot(target) −
softmax(x)) / T, and what backward keeps depends on the logits' dtype:

* fp32/fp64 logits (the CPU, tests): forward keeps softmax(x) (one logits-sized buffer) and
  backward turns it into the gradient *in place* — no recomputation and no new allocation, so
  it costs what Megatron's cross-entropy costs (which keeps its softmax the same way);
* bf16/fp16 logits (GPU training): an fp32 softmax would be twice the logits' size, so backward
  keeps only the per-row logsumexp and recomputes softmax chunk by chunk.

Forward-only calls (old log-probs under ``torch.no_grad``) keep nothing. The entropy is a metric
(REAL has no entropy bonus), so it carries no gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# rows per chunk: at most ~32M fp32 elements of temporaries at a time (220 rows at Qwen2's vocab)
CHUNK_ELEMENTS = 2**25
PAD_LOGIT = -1e30  # finite stand-in for −inf on vocab padding: exp() gives 0 and 0·x stays 0 (no NaN)


def _tp_info(tp_group):
    if tp_group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def _vocab_mask(vocab_start: int, local_vocab: int, vocab_size: int, device) -> torch.Tensor | None:
    """Boolean mask of padded entries in this rank's slice, or None when there are none."""
    if vocab_start + local_vocab <= vocab_size:
        return None
    return torch.arange(vocab_start, vocab_start + local_vocab, device=device) >= vocab_size


class _VocabParallelLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, temperature, vocab_size, tp_group, chunk_rows, with_entropy, overwrite_logits):
        tp, tp_rank = _tp_info(tp_group)
        local_vocab = logits.shape[-1]
        vocab_start = tp_rank * local_vocab
        flat = logits.reshape(-1, local_vocab)
        flat_target = target.reshape(-1)
        rows = flat.shape[0]
        pad_mask = _vocab_mask(vocab_start, local_vocab, vocab_size, logits.device)
        # fp32 work (fp64 when the logits are fp64, e.g. in tests)
        work = torch.float64 if logits.dtype == torch.float64 else torch.float32
        logp = torch.empty(rows, dtype=work, device=logits.device)
        lse = torch.empty(rows, dtype=work, device=logits.device)
        entropy = torch.empty(rows, dtype=work, device=logits.device) if with_entropy else None
        # keep softmax for backward when it costs no more than the logits themselves (see the docstring)
        keep_probs = ctx.needs_input_grad[0] and logits.dtype == work
        probs = None
        if keep_probs:  # the softmax buffer: the logits' own storage when the caller gives it up
            probs = flat if overwrite_logits and flat.is_contiguous() else torch.empty(
                (rows, local_vocab), dtype=work, device=logits.device)
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            if keep_probs:
                x = probs[start:stop]
                torch.div(flat[start:stop], temperature, out=x)
            else:
                x = flat[start:stop].to(work) / temperature  # the only full-width fp32 temporary
            if pad_mask is not None:
                x.masked_fill_(pad_mask, PAD_LOGIT)
            m = x.max(dim=-1).values
            if tp > 1:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
            local_t = flat_target[start:stop] - vocab_start
            in_range = (local_t >= 0) & (local_t < local_vocab)
            x_t = x.gather(-1, local_t.clamp(0, local_vocab - 1)[:, None]).squeeze(-1)
            x_t = torch.where(in_range, x_t, torch.zeros_like(x_t))
            x.sub_(m[:, None])  # x − m in place
            if with_entropy:
                e = x.exp()
                z_chunk = e.sum(-1)
                zx_chunk = torch.linalg.vecdot(e, x)  # Σ exp(x − m)·(x − m), without a product temporary
                if keep_probs:
                    x.copy_(e)
                del e
            else:
                x.exp_()  # x now holds exp(x − m), the unnormalised softmax
                z_chunk = x.sum(-1)
                zx_chunk = torch.zeros_like(m)
            sums = torch.stack([z_chunk, zx_chunk, x_t])
            if tp > 1:
                dist.all_reduce(sums, group=tp_group)
            z, zx, target_logit = sums
            if keep_probs:
                x.div_(z[:, None])  # softmax of this chunk, kept for backward
            del x
            chunk_lse = m + z.log()
            lse[start:stop] = chunk_lse
            logp[start:stop] = target_logit - chunk_lse
            if with_entropy:
                # H = lse − E[x] = log z − E[x − m], with E[x − m] = zx / z
                entropy[start:stop] = z.log() - zx / z
        # kept softmax: save the logits tensor itself when its storage holds it (a view made here
        # could not be saved), else the separate buffer; no softmax kept: the logits, to recompute
        ctx.save_for_backward(logits if probs is None or probs is flat else probs, target, lse)
        ctx.kept_probs = keep_probs
        ctx.temperature = temperature
        ctx.vocab_size = vocab_size
        ctx.tp_group = tp_group
        ctx.chunk_rows = chunk_rows
        shape = target.shape
        ctx.logits_shape = logits.shape
        out_entropy = entropy.reshape(shape) if with_entropy else torch.empty(0, device=logits.device)
        ctx.mark_non_differentiable(out_entropy)
        return logp.reshape(shape), out_entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        saved, target, lse = ctx.saved_tensors
        tp, tp_rank = _tp_info(ctx.tp_group)
        local_vocab = saved.shape[-1]
        vocab_start = tp_rank * local_vocab
        flat_target = target.reshape(-1)
        g = grad_logp.reshape(-1).to(lse.dtype)
        if ctx.kept_probs:
            # the kept softmax becomes the gradient in place: (onehot − p)·g / T
            # (a second backward through the same graph is refused by autograd's saved-tensor version check)
            grad = saved.reshape(-1, local_vocab)
            local_t = flat_target - vocab_start
            rows = ((local_t >= 0) & (local_t < local_vocab)).nonzero().squeeze(-1)
            grad.mul_(-g[:, None])
            grad[rows, local_t[rows]] += g[rows]
            grad.div_(ctx.temperature)
            return grad.reshape(ctx.logits_shape), None, None, None, None, None, None, None
        logits = saved
        pad_mask = _vocab_mask(vocab_start, local_vocab, ctx.vocab_size, logits.device)
        flat = logits.reshape(-1, local_vocab)
        grad = torch.empty_like(flat)
        for start in range(0, flat.shape[0], ctx.chunk_rows):
            stop = min(start + ctx.chunk_rows, flat.shape[0])
            p = (flat[start:stop].to(lse.dtype) / ctx.temperature).sub_(lse[start:stop, None]).exp_()
            if pad_mask is not None:
                p.masked_fill_(pad_mask, 0.0)
            p.mul_(-g[start:stop, None])
            local_t = flat_target[start:stop] - vocab_start
            in_range = (local_t >= 0) & (local_t < local_vocab)
            rows = in_range.nonzero().squeeze(-1)
            p[rows, local_t[rows]] += g[start:stop][rows]
            grad[start:stop] = p.div_(ctx.temperature)
        return grad.reshape(logits.shape), None, None, None, None, None, None, None


def vocab_parallel_logprobs(logits: torch.Tensor, target: torch.Tensor, *, temperature: float = 1.0,
                            vocab_size: int | None = None, tp_group=None, with_entropy: bool = True,
                            chunk_rows: int | None = None, overwrite_logits: bool = False):
    """Return ``(logp, entropy)`` of shape ``target.shape`` (float32, or float64 for float64 logits);
    ``entropy`` is an empty tensor when ``with_entropy`` is False.

    ``overwrite_logits=True`` lets forward reuse the logits' storage for the softmax it keeps (as
    Megatron's own cross-entropy does): no extra logits-sized buffer and one copy fewer. Only for
    callers that never read the logits again (the training loss hook); Megatron's output layer
    does not keep its output for backward, and autograd's version check guards any node that did.

    ``tp_group``: the tensor-parallel group the vocabulary is split over (None: unsplit).
    ``vocab_size``: the real vocabulary (entries past it are padding); default: all of it.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    tp, _ = _tp_info(tp_group)
    full_vocab = logits.shape[-1] * tp
    vocab_size = full_vocab if vocab_size is None else vocab_size
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} must equal logits shape without the vocab dim "
                         f"{tuple(logits.shape[:-1])}")
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // logits.shape[-1])
    return _VocabParallelLogProb.apply(logits, target, float(temperature), int(vocab_size), tp_group,
                                       int(chunk_rows), bool(with_entropy), bool(overwrite_logits))
