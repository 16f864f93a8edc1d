"""Run a packed row (``batch.build_micro_batch``) through Megatron's ``GPTModel``.

Several sequences share a row; attention must never cross a slot boundary and RoPE positions
restart in every slot, so each sequence sees exactly what it would see alone:

* **Transformer Engine spec** (GPU): THD packing — ``PackedSeqParams(qkv_format="thd")`` with the
  row's ``cu_seqlens`` (slot boundaries; each slot already padded to the CP/TE alignment, so the
  padded and unpadded boundaries coincide). TE's attention and fused RoPE restart per sequence.
  Needs a GPU and ``transformer-engine``; *not exercised on the CPU machine this was written on*.
* **local spec** (CPU): an explicit block-diagonal causal mask ``[R, 1, S, S]`` (True = masked,
  Megatron's convention), and a RoPE table indexed by ``position_ids``. Megatron-Core 0.16.1's
  local attention honours a given mask only in ``FusedScaleMaskSoftmax``'s PyTorch path; its fused
  kernel (``masked_softmax_fusion=True``, fp16/bf16) applies a plain causal mask and ignores ours,
  so ``run_packed`` refuses that setting. The RoPE table: the model computes one table for
  positions 0…S−1 of the row; ``RestartingRotaryEmbedding`` (swapped in on the first packed
  forward) returns it re-indexed by the row's ``position_ids`` for the call in progress.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from real_megatron.megatron.model import unwrap


class RestartingRotaryEmbedding(RotaryEmbedding):
    """Megatron's RoPE table, re-indexed by ``positions`` ([S], set for one forward) when given."""

    positions: torch.Tensor | None = None

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        emb = super().forward(max_seq_len, offset, packed_seq, cp_group)  # [S, 1, 1, dim]
        if self.positions is None:
            return emb
        if cp_group is not None and cp_group.size() > 1:
            raise RuntimeError("packed rows with context parallelism need the Transformer Engine spec (THD)")
        return emb[self.positions]


@contextmanager
def _positions(gpt, position_ids: torch.Tensor):
    rope = gpt.rotary_pos_emb
    if type(rope) is RotaryEmbedding:
        # same object, buffers and settings; only forward() gains the re-indexing
        rope.__class__ = RestartingRotaryEmbedding
    if not isinstance(rope, RestartingRotaryEmbedding):
        raise RuntimeError(f"packed rows on the local spec need Megatron's RotaryEmbedding, got {type(rope).__name__}")
    if position_ids.shape[0] > 1 and not (position_ids == position_ids[:1]).all():
        raise ValueError("rows of one micro-batch must share position_ids on the local spec (one RoPE table)")
    rope.positions = position_ids[0]
    try:
        yield
    finally:
        rope.positions = None


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """``[R, 1, S, S]`` bool, True where attention is forbidden: across blocks (a block starts where
    ``position_ids`` is 0) or to a later position."""
    block = (position_ids == 0).cumsum(-1)
    same = block[:, :, None] == block[:, None, :]
    seq = position_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    return ~(same & causal)[:, None]


def run_packed(model, batch: dict):
    """The model's output (logits on the last stage, hidden states elsewhere) for one packed micro-batch."""
    gpt = unwrap(model)
    if getattr(gpt, "uses_transformer_engine", False):
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = batch["cu_seqlens"].to(torch.int32)
        longest = int(batch["max_seqlen"])
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                                 cu_seqlens_kv_padded=cu, max_seqlen_q=longest, max_seqlen_kv=longest)
        return model(batch["tokens"], batch["position_ids"], None, packed_seq_params=params)
    if gpt.config.masked_softmax_fusion:
        raise RuntimeError("packed rows on the local spec need masked_softmax_fusion=False: the fused softmax "
                           "kernel ignores the block-diagonal mask")
    with _positions(gpt, batch["position_ids"]):
        return model(batch["tokens"], batch["position_ids"], block_causal_mask(batch["position_ids"]))
