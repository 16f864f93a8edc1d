"""Prompt data: verl-style parquet / JSONL loading, the synthetic arithmetic task, prompt encoding,
and a resumable prompt sampler.

Public names (imported by the trainer and the evaluator; keep them stable):
``PromptRecord``, ``PromptSet``, ``load_prompts``, ``normalize_ground_truth``, ``ground_truth_candidates``,
``encode_prompt``, ``PROMPT_SUFFIX``, ``PromptSampler``, ``write_arithmetic_task``, ``arithmetic_problems``,
``arithmetic_texts``, ``train_task_tokenizer``, and the multi-step chain task (``write_chain_task``, ``chain_splits``,
``chain_texts``, ``ChainProblem``, ``CHAIN_LEVELS``).
"""
from real_megatron.data.chains import (CHAIN_LEVELS, CHAINS_DATA_SOURCE, ChainProblem, chain_splits, chain_texts,
                                       write_chain_task)
from real_megatron.data.prompts import (BAD_ROW_REASONS, PROMPT_SUFFIX, PromptRecord, PromptSet, encode_prompt,
                                        ground_truth_candidates, load_prompts, normalize_ground_truth)
from real_megatron.data.sampler import PromptSampler
from real_megatron.data.synthetic import (ARITHMETIC_DATA_SOURCE, arithmetic_problems, arithmetic_prompt,
                                          arithmetic_solution, arithmetic_texts, write_arithmetic_task)
from real_megatron.data.tokenizer import train_task_tokenizer

__all__ = [
    "BAD_ROW_REASONS", "PROMPT_SUFFIX", "PromptRecord", "PromptSet", "encode_prompt", "ground_truth_candidates",
    "load_prompts", "normalize_ground_truth", "PromptSampler", "ARITHMETIC_DATA_SOURCE", "arithmetic_problems",
    "arithmetic_prompt", "arithmetic_solution", "arithmetic_texts", "write_arithmetic_task", "train_task_tokenizer",
    "CHAINS_DATA_SOURCE", "CHAIN_LEVELS", "ChainProblem", "chain_splits", "chain_texts", "write_chain_task",
]
