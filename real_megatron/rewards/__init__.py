"""Verifiable rewards: math answers checked with math-verify, in killable worker processes.

``RewardPool`` is what the trainer and the evaluator call (hard per-answer deadline, see
``real_megatron.rewards.pool``); ``math_reward`` is the in-process check for trusted input.
"""
from real_megatron.rewards.math_reward import extract_answer, last_boxed_answer, math_reward, verify_answer
from real_megatron.rewards.pool import RewardPool

__all__ = ["RewardPool", "math_reward", "verify_answer", "extract_answer", "last_boxed_answer"]
