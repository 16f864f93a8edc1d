"""A multi-step reasoning task for the CPU scale: arithmetic chains with worked solutions.

A problem starts from a number and applies a chain of operations left to right::

    Start with 37, add 8, multiply by 2, subtract 5. What is the result? Let's think step by step ...

and its reference solution writes one intermediate result per line and boxes the last::

    37+8=45
    45*2=90
    90-5=85
    \\boxed{85}

Difficulty is the chain length: level k applies ``LEVEL_STEPS[k]`` operations (1, 2, 4, 6, 8), so a
per-step error compounds and the reference response grows with the level (11 to 70 tokens, means
12.6 / 19.7 / 33.4 / 47.2 / 61.0, with the task's tokenizer; `real-megatron make-task chains --tokenizer`
prints them). Every value in the chain, the start and each intermediate result included, is an
integer in ``1..MAX_VALUE`` (20), operands of add/subtract are 1..9, of multiply/divide 2..3:

- no negatives and no zero: a sign or a zero that absorbs the rest of the chain (``0*7``) would
  add a skill or a shortcut unrelated to following the chain; math-verify would check ``-5`` fine,
  the choice is about the task, not the verifier;
- few distinct steps (302 one-step facts): a tiny model learns the single steps in a short warm-up,
  so what separates levels — and what RL can improve — is carrying a chain through without a slip,
  not arithmetic the model has never seen; a step costs about seven tokens whatever the level, so the
  length of a response measures the reasoning;
- division only where it is exact, multiplication only while the product stays <= MAX_VALUE.

Files use the verl parquet schema the loader reads (``real_megatron.data.prompts``): one train file
(the chosen ``train_levels`` shuffled together) and one held-out file per level,
``level1.parquet`` .. ``level5.parquet``, so ``real-megatron evaluate --files level*.parquet``
prints a per-level table and the average. Problems are drawn per level from a stream seeded by
``(seed, level)`` alone, test first, so a level's test file and its train problems do not depend
on which other levels are written, and train never holds a test problem (compared as the
``ChainProblem``, i.e. start value and operations, not as text).
"""
from __future__ import annotations

import functools
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from real_megatron.data.prompts import PROMPT_SUFFIX
from real_megatron.data.writer import write_table_atomic

CHAINS_DATA_SOURCE = "synthetic_chains"
LEVEL_STEPS = {1: 1, 2: 2, 3: 4, 4: 6, 5: 8}  # level -> number of operations in the chain
CHAIN_LEVELS = tuple(LEVEL_STEPS)
MAX_VALUE = 20  # every value in a chain lies in 1..MAX_VALUE
MAX_ADDEND = 9  # add / subtract take 1..MAX_ADDEND
MAX_FACTOR = 3  # multiply / divide take 2..MAX_FACTOR

_WORDS = {"+": "add {}", "-": "subtract {}", "*": "multiply by {}", "/": "divide by {}"}


@dataclass(frozen=True)
class ChainProblem:
    """A start value and the operations applied to it, e.g. ``ChainProblem(37, (("+", 8), ("*", 2)))``.

    Two problems are the same problem exactly when these fields are equal; the prompt and the solution
    are functions of them.
    """

    start: int
    steps: tuple[tuple[str, int], ...]

    @property
    def level(self) -> int:
        return _LEVEL_OF_STEPS[len(self.steps)]

    def values(self) -> list[int]:
        """The start value followed by the result of each step (``len(steps) + 1`` integers)."""
        out = [self.start]
        for op, b in self.steps:
            out.append(apply_step(out[-1], op, b))
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def prompt(self) -> str:
        """The user message: the chain in words, then the paper's instruction."""
        ops = ", ".join(_WORDS[op].format(b) for op, b in self.steps)
        return f"Start with {self.start}, {ops}. What is the result? {PROMPT_SUFFIX}"

    def solution(self) -> str:
        """The reference response: one ``a<op>b=c`` line per step, then ``\\boxed{answer}``."""
        values = self.values()
        lines = [f"{a}{op}{b}={c}" for a, (op, b), c in zip(values, self.steps, values[1:], strict=False)]  # values has one more
        return "\n".join(lines + [f"\\boxed{{{values[-1]}}}"])


_LEVEL_OF_STEPS = {n: level for level, n in LEVEL_STEPS.items()}


def apply_step(value: int, op: str, b: int) -> int:
    """``value <op> b`` for one valid step (see ``valid_steps``); raises ValueError for any other."""
    if b not in valid_steps(value).get(op, ()):
        raise ValueError(f"{value}{op}{b} is not a valid chain step: values must stay integers in 1..{MAX_VALUE}")
    return {"+": value + b, "-": value - b, "*": value * b, "/": value // b}[op]


@functools.cache
def valid_steps(value: int) -> dict[str, tuple[int, ...]]:
    """Operation -> the operands allowed from ``value`` (keeping the result an integer in 1..MAX_VALUE).

    Cached (the sampler asks for every step); do not mutate the result.
    """
    steps = {
        "+": tuple(b for b in range(1, MAX_ADDEND + 1) if value + b <= MAX_VALUE),
        "-": tuple(b for b in range(1, MAX_ADDEND + 1) if value - b >= 1),
        "*": tuple(b for b in range(2, MAX_FACTOR + 1) if value * b <= MAX_VALUE),
        "/": tuple(b for b in range(2, MAX_FACTOR + 1) if value % b == 0),
    }
    return {op: bs for op, bs in steps.items() if bs}


@functools.cache
def count_level_problems(level: int) -> int:
    """How many distinct problems ``level`` has (exact; used to refuse impossible requests)."""
    n_steps = _steps_of(level)
    ways = {v: 1 for v in range(1, MAX_VALUE + 1)}  # chains of 0 steps ending at v
    for _ in range(n_steps):
        nxt = dict.fromkeys(ways, 0)
        for v, n in ways.items():
            for op, bs in valid_steps(v).items():
                for b in bs:
                    nxt[apply_step(v, op, b)] += n
        ways = nxt
    return sum(ways.values())


def _steps_of(level: int) -> int:
    if level not in LEVEL_STEPS:
        raise ValueError(f"level={level!r}: the chain task has levels {list(CHAIN_LEVELS)}")
    return LEVEL_STEPS[level]


def _random_problem(rng: random.Random, n_steps: int) -> ChainProblem:
    # the operation first (uniform over those possible), then its operand: multiply and divide, which
    # have few operands, come up as often as add and subtract
    value = rng.randint(1, MAX_VALUE)
    start, steps = value, []
    for _ in range(n_steps):
        options = valid_steps(value)
        op = rng.choice(sorted(options))
        b = rng.choice(options[op])
        steps.append((op, b))
        value = apply_step(value, op, b)
    return ChainProblem(start, tuple(steps))


def _draw_distinct(rng: random.Random, level: int, n: int, exclude: set) -> list[ChainProblem]:
    n_steps = _steps_of(level)
    seen, out = set(exclude), []
    budget = 200 * n + 10_000  # rejection sampling; far more than needed unless the level is nearly exhausted
    while len(out) < n and budget > 0:
        budget -= 1
        problem = _random_problem(rng, n_steps)
        if problem not in seen:
            seen.add(problem)
            out.append(problem)
    if len(out) < n:
        raise ValueError(f"level {level}: drew only {len(out)} of {n} distinct problems (the level has "
                         f"{count_level_problems(level)}, {len(exclude)} already taken); ask for fewer")
    return out


def _enumerate_level(level: int) -> list[ChainProblem]:
    """Every problem of ``level``, in a fixed order (for levels small enough to list)."""
    out: list[ChainProblem] = []

    def extend(start: int, value: int, steps: tuple) -> None:
        if len(steps) == _steps_of(level):
            out.append(ChainProblem(start, steps))
            return
        for op, bs in sorted(valid_steps(value).items()):
            for b in bs:
                extend(start, apply_step(value, op, b), steps + ((op, b),))

    for start in range(1, MAX_VALUE + 1):
        extend(start, start, ())
    return out


_ENUMERATE_BELOW = 20_000  # levels with fewer problems are listed and shuffled instead of rejection-sampled


def chain_splits(*, seed: int = 0, n_train_per_level: int = 2500,
                 n_test_per_level: int = 100) -> dict[int, tuple[list[ChainProblem], list[ChainProblem]]]:
    """Level -> (train problems, test problems), disjoint and deterministic in ``seed``.

    Each level is drawn from its own stream seeded by ``(seed, level)``: the test problems first, then
    the train problems among the rest. A level with fewer than ``n_train_per_level + n_test_per_level``
    problems (level 1 has 302) gives all its non-test problems to train.
    """
    if n_train_per_level < 0 or n_test_per_level <= 0:
        raise ValueError(f"n_train_per_level={n_train_per_level} must be >= 0 and n_test_per_level="
                         f"{n_test_per_level} positive")
    splits = {}
    for level in CHAIN_LEVELS:
        available = count_level_problems(level)
        if n_test_per_level >= available:
            raise ValueError(f"level {level} has {available} distinct problems but n_test_per_level = "
                             f"{n_test_per_level}; ask for fewer")
        n_train = min(n_train_per_level, available - n_test_per_level)
        rng = random.Random(f"chains:{seed}:{level}")  # str seeds hash with SHA-512: stable across Python versions
        if available < _ENUMERATE_BELOW:
            problems = _enumerate_level(level)
            rng.shuffle(problems)
            test, train = problems[:n_test_per_level], problems[n_test_per_level:n_test_per_level + n_train]
        else:
            test = _draw_distinct(rng, level, n_test_per_level, set())
            train = _draw_distinct(rng, level, n_train, set(test))
        splits[level] = (train, test)
    return splits


def chain_texts(*, seed: int = 0, per_level: int = 400) -> list[str]:
    """Prompt + reference solution of ``per_level`` problems per level: the corpus for the task's tokenizer.

    Drawn from a stream of its own, so it does not depend on the split; it only has to contain the
    task's words, operators and digits (digits are one token each whatever the corpus).
    """
    rng = random.Random(f"chains-corpus:{seed}")
    return [f"{p.prompt()} {p.solution()}" for level in CHAIN_LEVELS
            for p in _draw_distinct(rng, level, min(per_level, count_level_problems(level)), set())]


def _table(problems: Iterable[ChainProblem], split: str):
    import pyarrow as pa  # lazily: this package is imported by the reward pool's fork server

    problems = list(problems)
    return pa.table({
        "data_source": [CHAINS_DATA_SOURCE] * len(problems),
        "prompt": [[{"content": p.prompt(), "role": "user"}] for p in problems],
        "ability": ["math"] * len(problems),
        "reward_model": [{"ground_truth": str(p.answer), "style": "rule"} for p in problems],
        "extra_info": [{"index": i, "split": split, "solution": p.solution(), "level": p.level}
                       for i, p in enumerate(problems)],
    })


def write_chain_task(out_dir, *, seed: int = 0, train_levels: Iterable[int] = CHAIN_LEVELS,
                     n_train_per_level: int = 2500, n_test_per_level: int = 100,
                     train_name: str = "train.parquet") -> tuple[Path, dict[int, Path]]:
    """Write ``train_name`` (the ``train_levels``, rows shuffled together) and ``level1..5.parquet``.

    Returns ``(train path, {level: test path})``. Same arguments, same bytes. A level's test file is
    the same whatever ``train_levels`` is, and no train row is a test problem of its level, so two
    calls with different ``train_levels`` and ``train_name`` (say a warm-up file of the easy levels
    and an RL file of all of them) share one set of test files.
    """
    train_levels = sorted(set(train_levels))
    if not train_levels or any(level not in LEVEL_STEPS for level in train_levels):
        raise ValueError(f"train_levels={train_levels}: choose a non-empty subset of {list(CHAIN_LEVELS)}")
    if not train_name.endswith(".parquet") or "/" in train_name or train_name.startswith("level"):
        raise ValueError(f"train_name={train_name!r}: give a file name ending in .parquet, not starting with "
                         "'level' (the test files are named level<k>.parquet)")
    if n_train_per_level <= 0:
        raise ValueError(f"n_train_per_level={n_train_per_level} must be positive")
    splits = chain_splits(seed=seed, n_train_per_level=n_train_per_level, n_test_per_level=n_test_per_level)
    train = [p for level in train_levels for p in splits[level][0]]
    random.Random(f"chains-order:{seed}:{train_levels}").shuffle(train)
    out = Path(out_dir)
    tests = {level: write_table_atomic(_table(test, "test"), out / f"level{level}.parquet")
             for level, (_, test) in splits.items()}
    return write_table_atomic(_table(train, "train"), out / train_name), tests
