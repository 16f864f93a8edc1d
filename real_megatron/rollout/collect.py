"""The rollout phase of a training step: prompts -> n completions each -> rewards -> labelled records;
and the generate-and-score step it shares with evaluation.

Runs on rank 0 (which owns the rollout engine and the reward workers); the records are then
broadcast to every rank. Nothing here imports Megatron.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class RolloutRecord:
    """One sampled response with its verifiable reward. ``group_id`` identifies the prompt."""

    group_id: int
    prompt_ids: list
    response_ids: list
    reward: float
    finish_reason: str
    engine_logprobs: list | None = None
    engine_versions: list | None = None  # the weight version of each token, when the engine records it


@dataclass
class ScoredCompletions:
    """``n`` completions per prompt, prompt-major, with their 0/1 rewards (same order)."""

    completions: list  # rollout.Completion
    rewards: list[float]
    reward_stats: dict  # RewardPool.score's counts: timeouts, crashes, ...
    generate_s: float
    score_s: float


def generate_and_score(engine, reward_pool, tokenizer, prompts, prompt_ids, n: int, sampling) -> ScoredCompletions:
    """Generate ``n`` responses per prompt, decode them and verify each against its prompt's accepted answers.

    ``prompts``: PromptRecord list (for ground truths); ``prompt_ids``: their encoded token ids.
    """
    t0 = time.perf_counter()
    completions = engine.generate(prompt_ids, n, sampling)
    if len(completions) != len(prompt_ids) * n:
        raise RuntimeError(f"rollout engine returned {len(completions)} completions for {len(prompt_ids)} prompts x "
                           f"n={n}; expected {len(prompt_ids) * n}")
    t1 = time.perf_counter()
    texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
    truths = [prompts[c.prompt_index].answers for c in completions]
    rewards, reward_stats = reward_pool.score(texts, truths)
    return ScoredCompletions(completions, rewards, reward_stats, t1 - t0, time.perf_counter() - t1)


def collect_rollouts(*, engine, reward_pool, tokenizer, prompts, prompt_ids, n: int, sampling, first_group_id: int):
    """Generate ``n`` responses per prompt and score them.

    Returns ``(records, metrics)``; records are prompt-major, group ids ``first_group_id + i``.
    Empty responses (the engine stopped at once without even an EOS) are dropped and counted:
    a rollout needs at least one response token for s̄ to exist.
    """
    scored = generate_and_score(engine, reward_pool, tokenizer, prompts, prompt_ids, n, sampling)
    records, dropped = [], 0
    for c, reward in zip(scored.completions, scored.rewards, strict=True):
        if not c.token_ids:
            dropped += 1
            continue
        records.append(RolloutRecord(
            group_id=first_group_id + c.prompt_index, prompt_ids=list(prompt_ids[c.prompt_index]),
            response_ids=list(c.token_ids), reward=float(reward), finish_reason=c.finish_reason,
            engine_logprobs=list(c.logprobs) if c.logprobs is not None else None,
            engine_versions=list(c.token_versions) if c.token_versions is not None else None))
    metrics = rollout_metrics(records, n)
    metrics.update({
        "time/rollout_s": scored.generate_s,
        "time/reward_s": scored.score_s,
        "rollout/dropped_empty": float(dropped),
        "reward/timeouts": float(scored.reward_stats.get("timeouts", 0)),
        "reward/crashes": float(scored.reward_stats.get("crashes", 0)),
    })
    return records, metrics


def rollout_metrics(records: list[RolloutRecord], n: int) -> dict:
    if not records:
        return {"train/reward_mean": 0.0, "train/solved_all_ratio": 0.0, "train/solved_none_ratio": 0.0,
                "train/response_length_mean": 0.0}
    by_group: dict[int, list[float]] = {}
    for r in records:
        by_group.setdefault(r.group_id, []).append(r.reward)
    solved_all = sum(all(x >= 1.0 for x in g) for g in by_group.values())
    solved_none = sum(all(x < 1.0 for x in g) for g in by_group.values())
    lengths = torch.tensor([len(r.response_ids) for r in records], dtype=torch.float64)
    return {
        "train/reward_mean": sum(r.reward for r in records) / len(records),
        "train/solved_all_ratio": solved_all / len(by_group),
        "train/solved_none_ratio": solved_none / len(by_group),
        "train/response_length_mean": float(lengths.mean()),
        "train/response_length_max": float(lengths.max()),
        "train/truncated_ratio": sum(r.finish_reason == "length" for r in records) / len(records),
    }


def split_mini_batches(records: list[RolloutRecord], mini_batch_prompts: int) -> list[list[RolloutRecord]]:
    """Cut a rollout batch into mini-batches of whole prompts (groups), in prompt order."""
    order: list[int] = []
    groups: dict[int, list[RolloutRecord]] = {}
    for r in records:
        if r.group_id not in groups:
            order.append(r.group_id)
            groups[r.group_id] = []
        groups[r.group_id].append(r)
    return [[r for gid in order[i:i + mini_batch_prompts] for r in groups[gid]]
            for i in range(0, len(order), mini_batch_prompts)]
