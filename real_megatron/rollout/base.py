"""The rollout-engine interface: what the trainer needs from anything that samples responses.

An engine takes already-tokenised prompts (the trainer owns the tokenizer and the chat template,
so every engine sees the same ids) and returns, for each prompt, ``n`` completions in
prompt-major order: completions ``[i*n, (i+1)*n)`` belong to prompt ``i``. A completion's token
ids include the EOS token when generation stopped on it (the loss trains on EOS too) and never
include padding.

Weights arrive as buckets (lists) of ``(hf_name, full_tensor)`` pairs, as
``real_megatron.convert.iter_hf_tensors`` yields them from the Megatron model in memory; an engine
that ships weights elsewhere sends each bucket as it comes, without re-bucketing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings for one ``generate`` call. ``seed`` makes the call reproducible."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0

    def __post_init__(self):
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"sampling temperature must be > 0 and finite, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Completion:
    """One sampled response. ``finish_reason`` is ``"stop"`` (EOS) or ``"length"`` (max_new_tokens);
    ``logprobs`` are the engine's own per-token log-probs (diagnostics only; may be None)."""

    prompt_index: int
    token_ids: list
    finish_reason: str
    logprobs: list | None = None


class RolloutEngineError(RuntimeError):
    """The rollout engine failed (crashed, unreachable, returned malformed output)."""


class RolloutEngine:
    """Base class. Subclasses implement ``generate`` and ``update_weights``; ``close`` is optional."""

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[Completion]:
        raise NotImplementedError

    def update_weights(self, buckets: Iterable[Sequence[tuple[str, torch.Tensor]]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
