"""A synthetic verifiable task a tiny model can learn on a CPU: small-integer arithmetic.

Problems are ``a+b`` and ``a-b`` with operands in ``0..max_operand`` (subtractions never go negative),
so answers are integers in ``0..2*max_operand``. The prompt is one user message in the paper's form
("3+5=? Let's think step by step and output the final answer within \\boxed{}.") and the files use
the same verl parquet schema as the real datasets, so the whole pipeline (loader, chat template,
math-verify reward) is exercised. Each row also stores a reference ``solution`` in ``extra_info``
("\\boxed{8}") for a supervised warm-up. The text is kept short on purpose: a tokenizer trained on it
and a tiny model must learn the task in minutes on 2 CPU cores.

Train and test are disjoint sets of distinct problems drawn from one seeded shuffle.
"""
from __future__ import annotations

from pathlib import Path

from real_megatron.data.prompts import PROMPT_SUFFIX
from real_megatron.data.writer import write_table_atomic

ARITHMETIC_DATA_SOURCE = "synthetic_arithmetic"


def arithmetic_problems(max_operand: int = 10, ops: str = "+-") -> list[tuple[int, str, int, int]]:
    """Every distinct problem as ``(a, op, b, answer)``, in a fixed order."""
    if max_operand < 1:
        raise ValueError(f"max_operand={max_operand} must be >= 1")
    unknown = set(ops) - {"+", "-"}
    if unknown or not ops:
        raise ValueError(f"ops={ops!r}: use a non-empty combination of '+' and '-'")
    problems = []
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            if "+" in ops:
                problems.append((a, "+", b, a + b))
            if "-" in ops and a >= b:
                problems.append((a, "-", b, a - b))
    return problems


def arithmetic_prompt(a: int, op: str, b: int) -> str:
    """The user message: ``"3+4=? Let's think step by step and output the final answer within \\boxed{}."``."""
    return f"{a}{op}{b}=? {PROMPT_SUFFIX}"


def arithmetic_solution(a: int, op: str, b: int, answer: int) -> str:
    """The reference response for supervised warm-up: just the boxed answer (``"\\boxed{7}"``).

    Deliberately no worked steps: a tiny model on 2 CPU cores has to learn the format and the sums
    in minutes, and every response token costs rollout time. ``a``, ``op``, ``b`` are accepted so a
    longer form can be swapped in without touching callers.
    """
    return f"\\boxed{{{answer}}}"


def arithmetic_texts(max_operand: int = 10, ops: str = "+-") -> list[str]:
    """Prompt + reference solution of every problem: the corpus to train the task's tokenizer on."""
    return [f"{arithmetic_prompt(a, op, b)} {arithmetic_solution(a, op, b, ans)}"
            for a, op, b, ans in arithmetic_problems(max_operand, ops)]


def write_arithmetic_task(out_dir, *, n_train: int, n_test: int, seed: int = 0, max_operand: int = 10,
                          ops: str = "+-") -> tuple[Path, Path]:
    """Write ``train.parquet`` and ``test.parquet`` (verl schema) under ``out_dir``; returns their paths.

    Deterministic in ``seed``; the splits share no problem. There are ``len(arithmetic_problems(...))``
    distinct problems (187 with the defaults); ask for more by raising ``max_operand``.
    """
    import numpy as np  # lazily, like pyarrow: this package is imported by the reward pool's fork server
    import pyarrow as pa

    if n_train <= 0 or n_test <= 0:
        raise ValueError(f"n_train={n_train} and n_test={n_test} must both be positive")
    problems = arithmetic_problems(max_operand, ops)
    if n_train + n_test > len(problems):
        raise ValueError(f"n_train + n_test = {n_train + n_test} but there are only {len(problems)} distinct problems "
                         f"with max_operand={max_operand}, ops={ops!r}; raise max_operand or ask for fewer")
    order = np.random.default_rng(np.random.SeedSequence([seed, 0xA417])).permutation(len(problems))
    splits = {"test": [problems[i] for i in order[:n_test]],
              "train": [problems[i] for i in order[n_test:n_test + n_train]]}
    out = Path(out_dir)
    paths = {}
    for split, rows in splits.items():
        table = pa.table({
            "data_source": [ARITHMETIC_DATA_SOURCE] * len(rows),
            "prompt": [[{"content": arithmetic_prompt(a, op, b), "role": "user"}] for a, op, b, _ in rows],
            "ability": ["math"] * len(rows),
            "reward_model": [{"ground_truth": str(ans), "style": "rule"} for *_, ans in rows],
            "extra_info": [{"index": i, "split": split, "solution": arithmetic_solution(a, op, b, ans)}
                           for i, (a, op, b, ans) in enumerate(rows)],
        })
        paths[split] = write_table_atomic(table, out / f"{split}.parquet")
    return paths["train"], paths["test"]
