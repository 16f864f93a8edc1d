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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

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
    # the weight version that sampled each token (an engine that records it: SGLang), else None
    token_versions: list | None = None


class RolloutEngineError(RuntimeError):
    """The rollout engine failed (crashed, unreachable, returned malformed output)."""


class RolloutEngine:
    """Base class: everything the trainer calls on an engine. Subclasses implement ``generate`` and
    ``update_weights``; an engine that shares the trainer's GPU (colocated SGLang) also implements the
    memory methods, which the trainer calls only with ``rollout.sglang_release_memory``."""

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[Completion]:
        """``n`` completions per prompt, prompt-major (see the module docstring)."""
        raise NotImplementedError

    def update_weights(self, buckets: Iterable[Sequence[tuple[str, torch.Tensor]]], version: int | None = None) -> None:
        """Take the trainer's weights, bucket by bucket (HF names, full tensors); ``version``: their weight
        version (rollout steps trained), which an engine that records versions stamps its tokens with."""
        raise NotImplementedError

    def memory_tags(self) -> list[str]:
        """What ``release_memory`` can free while the trainer trains (e.g. ``["weights", "kv_cache"]``); the
        trainer resumes ``"weights"`` first, the rest after the weight sync."""
        raise NotImplementedError(f"{type(self).__name__} does not release memory; set rollout.sglang_release_memory=false")

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """Free the memory of ``tags`` (all: None) until ``resume_memory``."""
        raise NotImplementedError(f"{type(self).__name__} does not release memory")

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """Take back the memory ``release_memory`` freed."""
        raise NotImplementedError(f"{type(self).__name__} does not release memory")

    def close(self) -> None:
        """Release the engine's resources (idempotent)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
