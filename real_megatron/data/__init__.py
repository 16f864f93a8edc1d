"""Prompt data: verl-style parquet / JSONL loading, prompt encoding, a resumable prompt sampler, and the
atomic parquet writer.

Public names (imported by the trainer and the evaluator; keep them stable):
``PromptRecord``, ``PromptSet``, ``load_prompts``, ``normalize_ground_truth``, ``ground_truth_candidates``,
``encode_prompt``, ``PROMPT_SUFFIX``, ``BAD_ROW_REASONS``, ``PromptSampler``, ``write_table_atomic``.
The paper's synthetic tasks (arithmetic, chains) live in ``real_megatron.repro``.
"""
from real_megatron.data.prompts import (
                                        BAD_ROW_REASONS,
                                        PROMPT_SUFFIX,
                                        PromptRecord,
                                        PromptSet,
                                        encode_prompt,
                                        ground_truth_candidates,
                                        load_prompts,
                                        normalize_ground_truth,
)
from real_megatron.data.sampler import PromptSampler
from real_megatron.data.writer import write_table_atomic

__all__ = [
    "BAD_ROW_REASONS", "PROMPT_SUFFIX", "PromptRecord", "PromptSet", "encode_prompt", "ground_truth_candidates",
    "load_prompts", "normalize_ground_truth", "PromptSampler", "write_table_atomic",
]
