"""The output layer fused with per-token log-probs and entropy: no ``[tokens, V/tp]`` logits tensor.

Unfused, Megatron's output layer writes the logits ``h·Wᵀ`` of a whole micro-batch (16,384 tokens ×
151,936 Qwen2 entries = 10 GB in fp32) and ``logprobs.py`` reduces them. Here the same numbers are
computed tile by tile — a tile is ``chunk_tokens`` tokens × ``vocab_block`` entries of this rank's
vocabulary slice — and each tile is dropped as soon as it has been reduced, in forward and again
(recomputed) in backward. Peak temporaries are a few tiles (``TILE_ELEMENTS`` floats each),
whatever the number of tokens.

Math (x = h·Wᵀ / T, one token, T the sampling temperature, v over the real vocabulary):

    lse = log Σ_v exp(x_v)        log p(target) = x_target − lse        H = lse − Σ_v softmax(x)_v·x_v
    ∂ log p/∂x_v = (onehot(target)_v − softmax(x)_v) / T
    with g = ∂L/∂log p per token and G = (onehot − softmax(x))·g/T  (tokens × vocab, one tile at a time):
    ∂L/∂h = G·W                   ∂L/∂W = Gᵀ·h

Forward runs over token chunks, and inside a chunk over vocabulary blocks with an online
log-sum-exp (running maximum m, Σ exp(x − m), Σ exp(x − m)·(x − m), rescaled when m grows).
Tensor parallelism splits the vocabulary: each rank reduces its slice, then one all-reduce(MAX) of
the per-token maxima and one all-reduce(SUM) of [Σ exp, Σ exp·x, x_target] — the reductions
``logprobs.py`` makes, once per call instead of once per chunk. Vocabulary padding (entries ≥
``vocab_size``) is never multiplied at all: only the real rows of W enter the matmuls, so padded
entries get probability 0 and a zero gradient row. Backward saves only [tokens] floats (the
log-sum-exp) from forward and recomputes only the tokens whose log-prob has a nonzero gradient (a
loss that reads the response tokens gives the prompts g = 0, and their rows of G are exactly 0). It
runs vocabulary blocks outside and token chunks inside, so each block's ∂L/∂W rows are summed over
all tokens in a block-sized buffer and written once, and ∂L/∂h accumulates over blocks in a
[tokens, H] buffer (the returned gradient itself in fp32).

Cost: forward one matmul (logits), backward three (logits again, ∂h, ∂W) where the unfused layer
does three in all — the recomputation is the price of not keeping softmax(x); see
docs/fused_output.md for measured times and memory.

Precision: float32 hidden states and weights work in float32 (float64 in float64); bfloat16/fp16
ones multiply in their own dtype (as Megatron's output layer does, so the logits are rounded as
they would be unfused), then every reduction, the softmax and the gradient tile are float32, and
both gradients accumulate in float32 before the cast to the parameter's dtype.

Tensor-parallel semantics are Megatron's ``ColumnParallelLinear`` around the op, with Megatron's own
mappings: without sequence parallelism the input is copied into the TP region (identity forward,
all-reduce of ∂h in backward); with it the [S/tp, B, H] shard is all-gathered along the sequence and
∂h reduce-scattered back. The weight gradient is returned through autograd like any parameter's,
so DDP's grad hooks (``main_grad``) and ``finalize_model_grads`` (which sums a tied embedding's
gradient over the first and last pipeline stages) see it exactly as they see the unfused one's.
Context parallelism needs nothing: the op is per token, a CP rank's rows are just fewer tokens.

Getting the op's inputs out of Megatron's ``GPTModel`` (megatron-core 0.16.1):

    with output_hidden_states(model):                      # the output layer returns its input
        hidden = run_packed(model, batch)                  # [S, B, H] (SP: [S/tp, B, H]) on the last stage
    logp, entropy = model_logprobs(model, hidden, batch["labels"], temperature=T, vocab_size=V)
    # == vocab_parallel_logprobs(logits, batch["labels"], ...) with logits = run_packed(model, batch)
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

from real_megatron.megatron.logprobs import PAD_LOGIT
from real_megatron.megatron.model import unwrap

# Floats in one tile of logits (tokens × vocabulary entries). 2**22 fp32 = 16 MiB: big enough that
# the matmuls run near the CPU's peak (measured, one thread: [1024, 1536]·[1536, 4096] tiles within
# 5% of one unchunked matmul's time), small enough that the two or three tiles alive at once stay
# far under a tenth of the logits of a 2k-token micro-batch at Qwen2's vocabulary (1.16 GiB). On a
# GPU the matmuls want larger tiles; 2**24 there is a guess, not a measurement.
TILE_ELEMENTS = {"cpu": 2**22, "cuda": 2**24}
DEFAULT_CHUNK_TOKENS = 1024


def _tp_info(tp_group) -> tuple[int, int]:
    if tp_group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tiles(total: int, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges covering ``0…total`` in steps of ``size`` (every chunk loop goes through here)."""
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def _tile_size(tokens: int, vocab: int, chunk_tokens: int, vocab_block: int) -> int:
    """Floats in the largest tile these sizes make (at least 1)."""
    return max(1, min(tokens, chunk_tokens) * min(vocab, vocab_block))


def _tp_all_reduce(tensor: torch.Tensor, op, tp_group) -> None:
    """The vocabulary-parallel reductions of the per-token statistics (in place)."""
    dist.all_reduce(tensor, op=op, group=tp_group)


def _into_tp_region(hidden: torch.Tensor, tp_group, sequence_parallel: bool) -> torch.Tensor:
    """What ``ColumnParallelLinear`` does to its input before the matmul (Megatron's own mappings)."""
    from megatron.core.tensor_parallel import mappings

    if sequence_parallel:  # all-gather along the sequence; backward: reduce-scatter of ∂h
        return mappings.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True,
                                                             group=tp_group)
    return mappings.copy_to_tensor_model_parallel_region(hidden, group=tp_group)  # backward: all-reduce of ∂h


class _Tiles:
    """Reusable flat buffers for one tile (work dtype, and the matmul dtype when that is lower)."""

    def __init__(self, elements: int, work: torch.dtype, compute: torch.dtype, device, extra: bool = False):
        self.work = torch.empty(elements, dtype=work, device=device)
        self.low = torch.empty(elements, dtype=compute, device=device) if compute != work else None
        self.extra = torch.empty(elements, dtype=work, device=device) if extra else None

    def logits(self, h: torch.Tensor, w: torch.Tensor, temperature: float, shift: torch.Tensor | None = None):
        """``h·wᵀ / T − shift`` (``shift``: one value per row, or none) as a ``[len(h), len(w)]`` work-dtype
        view of the buffer."""
        shape = (h.shape[0], w.shape[0])
        x = self.work[: shape[0] * shape[1]].view(shape)
        if self.low is None:
            torch.mm(h, w.t(), out=x)
        else:  # multiply in the low dtype (the logits Megatron's layer would write), then fp32
            low = self.low[: x.numel()].view(shape)
            torch.mm(h, w.t(), out=low)
            x.copy_(low)
        # divided, not multiplied by 1/T inside the matmul: the same rounding as logprobs.py's
        # logits / T, and backward's recomputed tile equal to forward's to the bit (a 1-ulp
        # difference in x moves the entropy and ∂h by ~|x|·1e-7, a visible share of the 1e-6 bar)
        if temperature != 1.0:
            x.div_(temperature)
        if shift is not None:
            x.sub_(shift[:, None])
        return x

    def lowered(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the matmul dtype (a view of the low buffer), or ``x`` itself."""
        if self.low is None:
            return x
        return self.low[: x.numel()].view(x.shape).copy_(x)


class _FusedLinearLogProb(torch.autograd.Function):
    """``hidden [N, H]``, ``weight [V/tp, H]``, ``target [N]`` → ``logp [N]``, ``entropy [N]`` (work dtype).

    Communication inside: only the TP reductions of the per-token statistics (the input's TP-region
    mapping is applied outside, by ``fused_logprobs``)."""

    @staticmethod
    def forward(ctx, hidden, weight, target, temperature, vocab_size, tp_group, with_entropy, chunk_tokens,
                vocab_block):
        n = hidden.shape[0]
        local_vocab = weight.shape[0]
        tp, tp_rank = _tp_info(tp_group)
        start = tp_rank * local_vocab
        real = max(0, min(local_vocab, vocab_size - start))  # this rank's entries that are not padding
        work = _work_dtype(hidden.dtype)
        dev = hidden.device
        local_t = target - start
        # per-token statistics of this rank's slice; a rank whose slice is all padding keeps
        # m = PAD_LOGIT and zero sums, which the cross-rank combination turns into exact zeros
        m = torch.full((n,), PAD_LOGIT, dtype=work, device=dev)
        z = torch.zeros(n, dtype=work, device=dev)  # Σ exp(x − m)
        zx = torch.zeros(n, dtype=work, device=dev) if with_entropy else None  # Σ exp(x − m)·(x − m)
        xt = torch.zeros(n, dtype=work, device=dev)  # x_target where the target is in this slice
        bufs = _Tiles(_tile_size(n, real, chunk_tokens, vocab_block), work, hidden.dtype, dev, extra=with_entropy)
        for a, b in _tiles(n, chunk_tokens):
            h, t = hidden[a:b], local_t[a:b]
            cm = cz = czx = None
            for v0, v1 in _tiles(real, vocab_block):
                x = bufs.logits(h, weight[v0:v1], temperature)
                here = (t >= v0) & (t < v1)
                col = (t - v0).clamp(0, v1 - v0 - 1)
                xt[a:b] += torch.where(here, x.gather(1, col[:, None]).squeeze(1),
                                       torch.zeros((), dtype=work, device=dev))
                tile_m = x.amax(dim=1)
                new_m = tile_m if cm is None else torch.maximum(cm, tile_m)
                x.sub_(new_m[:, None])  # x − m, in place
                if with_entropy:
                    e = bufs.extra[: x.numel()].view(x.shape)
                    torch.exp(x, out=e)
                    # Σ e·(x − m) row by row as a batched dot product: linalg.vecdot would
                    # materialise the tile-sized product on the CPU
                    tile_z, tile_zx = e.sum(1), torch.bmm(e[:, None, :], x[:, :, None]).view(-1)
                else:
                    tile_z, tile_zx = x.exp_().sum(1), None
                if cm is None:
                    cz, czx = tile_z, tile_zx
                else:  # rescale the running sums to the new maximum
                    shift = cm - new_m
                    scale = shift.exp()
                    if with_entropy:
                        czx = scale * (czx + shift * cz) + tile_zx
                    cz = scale * cz + tile_z
                cm = new_m
            if cm is not None:
                m[a:b], z[a:b] = cm, cz
                if with_entropy:
                    zx[a:b] = czx
        del bufs
        # a target in this slice's padding gets the unfused path's masked logit
        xt = torch.where((local_t >= real) & (local_t < local_vocab), torch.full_like(xt, PAD_LOGIT), xt)
        if tp > 1:
            top = m.clone()
            _tp_all_reduce(top, dist.ReduceOp.MAX, tp_group)
            shift = m - top
            scale = shift.exp()
            parts = [scale * z, xt] if not with_entropy else [scale * z, xt, scale * (zx + shift * z)]
            sums = torch.stack(parts)
            _tp_all_reduce(sums, dist.ReduceOp.SUM, tp_group)
            z, xt = sums[0], sums[1]
            zx = sums[2] if with_entropy else None
            m = top
        log_z = z.log()
        lse = m + log_z
        logp = xt - lse
        entropy = log_z - zx / z if with_entropy else torch.empty(0, dtype=work, device=dev)
        ctx.save_for_backward(hidden, weight, target, lse)
        ctx.temperature, ctx.real, ctx.start = temperature, real, start
        ctx.chunk_tokens, ctx.vocab_block = chunk_tokens, vocab_block
        ctx.mark_non_differentiable(entropy)  # a metric: REAL has no entropy bonus
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, target, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        all_rows = hidden.shape[0]
        work = lse.dtype
        dev = hidden.device
        g_t = grad_logp.to(work) / ctx.temperature  # g/T per token
        # a token whose log-prob the loss does not use (a prompt, row padding) has g = 0: its row of
        # G is exactly 0 and adds nothing to ∂h or ∂W, so it is not recomputed at all
        rows = None
        live = g_t != 0
        if not bool(live.all()):
            rows = live.nonzero().squeeze(1)
            hidden, target, lse, g_t = hidden.index_select(0, rows), target[rows], lse[rows], g_t[rows]
        n = hidden.shape[0]
        local_t = target - ctx.start
        same = hidden.dtype == work
        # G = diag(g/T)·(onehot − softmax) = −diag(g/T)·Q with Q = softmax − onehot, so the tile only
        # becomes Q (one exp pass and a scatter); the per-token factor −g/T is applied to the
        # [tokens, H] operands instead: ∂h = −diag(g/T)·(Q·W), ∂W = Qᵀ·(−diag(g/T)·h)
        neg_g_t = -g_t
        scaled_h = hidden * neg_g_t[:, None].to(hidden.dtype) if need_w else None
        minus_one = torch.full((), -1.0, dtype=work, device=dev)
        nothing = torch.zeros((), dtype=work, device=dev)
        # accumulators: the returned gradients themselves when they are in the work dtype
        dh = torch.zeros(hidden.shape, dtype=work, device=dev) if need_h else None
        dw = torch.zeros_like(weight) if need_w else None
        qw = torch.empty(min(n, ctx.chunk_tokens), hidden.shape[1], dtype=hidden.dtype, device=dev) if need_h else None
        bufs = _Tiles(_tile_size(n, ctx.real, ctx.chunk_tokens, ctx.vocab_block), work, hidden.dtype, dev)
        for v0, v1 in _tiles(ctx.real, ctx.vocab_block):
            w = weight[v0:v1]
            dw_block = None
            if need_w:  # this block's rows, summed over every token chunk in the work dtype
                dw_block = dw[v0:v1] if weight.dtype == work else torch.zeros(w.shape, dtype=work, device=dev)
            for a, b in _tiles(n, ctx.chunk_tokens):
                x = bufs.logits(hidden[a:b], w, ctx.temperature, shift=lse[a:b])
                x.exp_()  # softmax over the whole (all-rank) vocabulary
                t = local_t[a:b]
                here = (t >= v0) & (t < v1)
                col = (t - v0).clamp(0, v1 - v0 - 1)
                # − 1 at the target (rows whose target is elsewhere add 0): Q = softmax − onehot, formed in
                # the work dtype before any cast, so a confident token's small 1 − p survives in bf16
                x.scatter_add_(1, col[:, None], torch.where(here, minus_one, nothing)[:, None])
                q = bufs.lowered(x)
                if need_h:
                    prod = qw[: b - a]
                    torch.mm(q, w, out=prod)
                    dh[a:b].addcmul_(prod, neg_g_t[a:b, None])
                if need_w:
                    if same:
                        dw_block.addmm_(q.t(), scaled_h[a:b])
                    else:
                        dw_block += torch.mm(q.t(), scaled_h[a:b])
            if need_w and weight.dtype != work:
                dw[v0:v1] = dw_block
        del bufs
        if dh is not None and not same:
            dh = dh.to(hidden.dtype)
        if dh is not None and rows is not None:
            dh = dh.new_zeros((all_rows, dh.shape[1])).index_copy_(0, rows, dh)
        return dh, dw, None, None, None, None, None, None, None


def fused_logprobs(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *, temperature: float = 1.0,
                   vocab_size: int | None = None, tp_group=None, sequence_parallel: bool = False,
                   with_entropy: bool = True, chunk_tokens: int | None = None, vocab_block: int | None = None,
                   token_mask: torch.Tensor | None = None):
    """Per-token ``(logp, entropy)`` of ``target`` under the output layer ``weight`` applied to ``hidden``.

    Drop-in for ``vocab_parallel_logprobs(logits, target, ...)`` where ``logits`` is what GPTModel
    returns for these hidden states ([B, S, V/tp], batch first), without ever forming the logits.

    ``hidden``: the final layernorm's output in Megatron's layout ``[S, B, H]`` — under sequence
        parallelism this rank's ``[S/tp, B, H]`` shard (``sequence_parallel=True``);
    ``weight``: this rank's output weight ``[V_pad/tp, H]`` (``output_weight(model)``: the untied
        output layer's, or the tied embedding's); its gradient comes back through autograd;
    ``target``: ``[B, S]`` token ids (the labels, full sequence length even under SP); ids must be
        < ``vocab_size`` (a padded id gets the unfused path's log-prob of about −1e30);
    ``vocab_size``: the real vocabulary (default: all ``V_pad`` entries); ``tp_group``: the group
        the vocabulary is split over (None: unsplit);
    ``token_mask``: optional ``[B, S]`` bool; positions where it is False are not computed at all
        (log-prob and entropy 0, no gradient) — e.g. the prompts, whose log-probs no loss reads;
    ``chunk_tokens`` × ``vocab_block``: the tile (defaults: up to 1,024 tokens, and as many vocabulary
        entries as keep a tile at ``TILE_ELEMENTS`` floats).

    Returns ``logp`` and ``entropy``, ``[B, S]``, float32 (float64 for float64 inputs); ``entropy``
    is an empty tensor when ``with_entropy`` is False and never carries a gradient. Gradients flow
    to ``hidden`` (through the TP mapping) and ``weight``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [S, B, H] (Megatron's layout), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [V/tp, H] with H = {hidden.shape[2]}")
    tp, _ = _tp_info(tp_group)
    sequence_parallel = sequence_parallel and tp > 1
    seq = hidden.shape[0] * (tp if sequence_parallel else 1)
    batch = hidden.shape[1]
    if tuple(target.shape) != (batch, seq):
        raise ValueError(f"target shape {tuple(target.shape)} must be [B, S] = {(batch, seq)} for hidden "
                         f"{tuple(hidden.shape)}{' (sequence-parallel shard)' if sequence_parallel else ''}")
    full_vocab = weight.shape[0] * tp
    vocab_size = full_vocab if vocab_size is None else int(vocab_size)
    if not 0 < vocab_size <= full_vocab:
        raise ValueError(f"vocab_size {vocab_size} must be in 1…{full_vocab} (the padded vocabulary)")
    if tp > 1:
        hidden = _into_tp_region(hidden, tp_group, sequence_parallel)
    flat = hidden.reshape(seq * batch, hidden.shape[2])  # row s·B + b
    flat_target = target.transpose(0, 1).reshape(-1)  # the same order: target[b, s] at row s·B + b
    keep = None
    if token_mask is not None:
        if tuple(token_mask.shape) != (batch, seq):
            raise ValueError(f"token_mask shape {tuple(token_mask.shape)} must equal target's {(batch, seq)}")
        keep = token_mask.transpose(0, 1).reshape(-1).nonzero().squeeze(1)
        flat, flat_target = flat.index_select(0, keep), flat_target.index_select(0, keep)
    tile = TILE_ELEMENTS.get(hidden.device.type, TILE_ELEMENTS["cuda"])
    rows = max(1, flat.shape[0])
    chunk_tokens = int(chunk_tokens) if chunk_tokens else min(rows, DEFAULT_CHUNK_TOKENS)
    # a multiple of 128 entries: tile rows start 512-byte aligned (a block of 9,362 made the CPU's matmul
    # and elementwise passes ~25% slower than one of 9,216)
    vocab_block = int(vocab_block) if vocab_block else max(128, tile // chunk_tokens // 128 * 128)
    logp, entropy = _FusedLinearLogProb.apply(flat, weight, flat_target, float(temperature), vocab_size, tp_group,
                                              bool(with_entropy), chunk_tokens, vocab_block)
    if keep is not None:  # back to every position; the masked ones stay 0
        logp = logp.new_zeros(seq * batch).index_copy(0, keep, logp)
        if with_entropy:
            entropy = entropy.new_zeros(seq * batch).index_copy(0, keep, entropy)
    logp = logp.reshape(seq, batch).transpose(0, 1).contiguous()
    if with_entropy:
        entropy = entropy.reshape(seq, batch).transpose(0, 1).contiguous()
    return logp, entropy


# ---------------------------------------------------------------------------------------- GPTModel


def output_weight(model) -> torch.Tensor:
    """The weight the last stage's output layer multiplies by: ``[V_pad/tp, H]``.

    Untied: ``output_layer.weight``. Tied: the embedding's weight on a single stage, the last
    stage's own copy under pipeline parallelism (Megatron's ``shared_embedding_or_output_weight``;
    ``finalize_model_grads`` sums that copy's gradient with the first stage's embedding gradient)."""
    gpt = unwrap(model)
    if not gpt.post_process:
        raise ValueError("output_weight: this pipeline stage has no output layer (only the last stage has)")
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def _passthrough(input_, weight=None, runtime_gather_output=None):
    # GPTModel turns the output layer's [s, b, ...] result into [b, s, ...] with
    # `.transpose(0, 1).contiguous()`: handing it the transposed view gives back Megatron's own
    # [S, B, H] tensor (the same strides, so no copy)
    return input_.transpose(0, 1), None


@contextmanager
def output_hidden_states(model):
    """Inside the block the model's forward returns, on the last pipeline stage, the hidden states the
    output layer would receive — the final layernorm's output ``[S, B, H]`` (``[S/tp, B, H]`` under
    sequence parallelism) — instead of logits. Other stages return their hidden states as always.

    Works on a bare ``GPTModel`` or a DDP (any ``.module``) wrapper, with ``run_packed``. Only the
    output layer's forward is replaced, for the block: parameters, DDP's gradient hooks and the
    pipeline schedule are untouched. Not for calls with ``labels`` (Megatron's own loss) or with
    multi-token prediction (both need the logits inside GPTModel)."""
    gpt = unwrap(model)
    if not gpt.post_process:
        yield
        return
    if gpt.config.mtp_num_layers:
        raise RuntimeError("output_hidden_states: multi-token prediction needs the output layer inside GPTModel")
    layer = gpt.output_layer
    previous = layer.__dict__.get("forward")
    layer.forward = _passthrough
    try:
        yield
    finally:
        if previous is None:
            del layer.forward
        else:
            layer.forward = previous


def model_logprobs(model, hidden: torch.Tensor, target: torch.Tensor, *, temperature: float = 1.0,
                   vocab_size: int | None = None, with_entropy: bool = True, token_mask: torch.Tensor | None = None,
                   chunk_tokens: int | None = None, vocab_block: int | None = None):
    """``fused_logprobs`` with the weight, TP group and sequence parallelism of ``model``'s output layer:
    the drop-in for ``vocab_parallel_logprobs(logits, target, tp_group=<TP group>, ...)``."""
    gpt = unwrap(model)
    layer = gpt.output_layer
    return fused_logprobs(hidden, output_weight(model), target, temperature=temperature, vocab_size=vocab_size,
                          tp_group=layer.tp_group, sequence_parallel=bool(layer.sequence_parallel),
                          with_entropy=with_entropy, token_mask=token_mask, chunk_tokens=chunk_tokens,
                          vocab_block=vocab_block)
