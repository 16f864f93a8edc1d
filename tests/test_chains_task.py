"""The multi-step arithmetic-chain task (real_megatron/repro/chains.py): files, splits, rewards, lengths.

Problems are read back from the written parquet files and parsed from their prompt text here, so
the checks hold for what a trainer would load, not for the generator's own objects.
"""
from __future__ import annotations

import re
import statistics

import pyarrow.parquet as pq
import pytest

from real_megatron.data import PROMPT_SUFFIX, load_prompts
from real_megatron.repro.chains import (
    CHAIN_LEVELS,
    CHAINS_DATA_SOURCE,
    LEVEL_STEPS,
    MAX_VALUE,
    chain_splits,
    chain_texts,
    count_level_problems,
    write_chain_task,
)
from real_megatron.repro.tokenizer import train_task_tokenizer

SMALL = {"n_train_per_level": 300, "n_test_per_level": 100}
_WORDS = {"add": "+", "subtract": "-", "multiply by": "*", "divide by": "/"}
_PROMPT = re.compile(r"Start with (\d+), (.*)\. What is the result\? " + re.escape(PROMPT_SUFFIX))
_STEP_LINE = re.compile(r"(\d+)([-+*/])(\d+)=(\d+)")


def parse_prompt(text: str) -> tuple:
    """``(start, ((op, operand), ...))`` from a prompt: the canonical problem, independent of wording."""
    match = _PROMPT.fullmatch(text)
    assert match, text
    steps = []
    for phrase in match.group(2).split(", "):
        words, number = phrase.rsplit(" ", 1)
        steps.append((_WORDS[words], int(number)))
    return int(match.group(1)), tuple(steps)


def file_problems(path) -> list[tuple]:
    return [parse_prompt(r.messages[0]["content"]) for r in load_prompts(path)]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    out = tmp_path_factory.mktemp("chains")
    train, tests = write_chain_task(out, seed=0)  # the default sizes, as `make-task chains` writes them
    return {"dir": out, "train": train, "tests": tests}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_task_tokenizer(chain_texts(), tmp_path_factory.mktemp("tok") / "tokenizer")


def test_same_seed_same_bytes_other_seed_other_problems(tmp_path):
    a_train, a_tests = write_chain_task(tmp_path / "a", seed=3, **SMALL)
    b_train, b_tests = write_chain_task(tmp_path / "b", seed=3, **SMALL)
    c_train, c_tests = write_chain_task(tmp_path / "c", seed=4, **SMALL)
    for a, b in [(a_train, b_train), *((a_tests[k], b_tests[k]) for k in CHAIN_LEVELS)]:
        assert a.read_bytes() == b.read_bytes(), a.name
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["level1.parquet", "level2.parquet", "level3.parquet",
                                                                   "level4.parquet", "level5.parquet", "train.parquet"]
    # another seed: other problems. Levels 1 and 2 are small (302 and 4,732 problems), so two random
    # 100-problem test sets share some by chance (about 33 and 2 expected); the larger levels almost none
    for level in CHAIN_LEVELS:
        shared = set(file_problems(a_tests[level])) & set(file_problems(c_tests[level]))
        assert len(shared) <= {1: 55, 2: 8}.get(level, 1), (level, len(shared))
    # the train files share level 1 and part of level 2 by necessity; levels 3-5 almost nothing
    assert len(set(file_problems(a_train)) & set(file_problems(c_train))) < 1_000


def test_train_and_test_are_disjoint_and_levels_are_separate(task, tmp_path):
    train = file_problems(task["train"])
    assert len(set(train)) == len(train)
    test_problems = set()
    for level, path in task["tests"].items():
        problems = file_problems(path)
        assert len(problems) == len(set(problems)) == 100
        assert {len(steps) for _, steps in problems} == {LEVEL_STEPS[level]}
        assert {r.extra_info["level"] for r in load_prompts(path)} == {level}
        test_problems |= set(problems)
    assert not set(train) & test_problems

    # a warm-up file of the easy levels written next to it: the test files stay byte-identical, and its
    # problems are the same levels' train problems
    before = {level: path.read_bytes() for level, path in task["tests"].items()}
    warm, tests = write_chain_task(tmp_path, seed=0, train_levels=(2, 1), train_name="warmup.parquet")
    assert {level: path.read_bytes() for level, path in tests.items()} == before
    warm_problems = file_problems(warm)
    assert len(warm_problems) == 202 + 2500 and {len(s) for _, s in warm_problems} == {1, 2}
    assert set(warm_problems) <= set(train) and not set(warm_problems) & test_problems


def test_reference_solutions_score_one_and_wrong_answers_zero(task):
    from real_megatron.rewards import RewardPool

    records = ([r for path in task["tests"].values() for r in load_prompts(path)]
               + list(load_prompts(task["train"]))[::40])
    responses, truths, wrong = [], [], []
    for r in records:
        start, steps = parse_prompt(r.messages[0]["content"])
        solution = r.extra_info["solution"]
        *lines, boxed = solution.split("\n")
        value = start
        assert len(lines) == len(steps)
        # each line is the next step of the prompt's chain, computed right
        for line, (op, b) in zip(lines, steps, strict=True):
            a, line_op, line_b, c = _STEP_LINE.fullmatch(line).groups()
            assert (int(a), line_op, int(line_b)) == (value, op, b), (line, r.row)
            assert op != "/" or value % b == 0, (line, r.row)
            value = {"+": value + b, "-": value - b, "*": value * b, "/": value // b}[op]
            assert value == int(c) and 1 <= value <= MAX_VALUE, (line, r.row)
        assert boxed == f"\\boxed{{{value}}}" and r.ground_truth == str(value) and r.data_source == CHAINS_DATA_SOURCE
        responses.append(solution)
        truths.append(r.ground_truth)
        wrong.append(solution[:-len(boxed)] + f"\\boxed{{{value + 1}}}")
    with RewardPool(num_workers=2, timeout_s=5.0) as pool:
        rewards, stats = pool.score(responses + wrong, truths + truths)
    assert stats["timeouts"] == stats["crashes"] == 0
    assert rewards == [1.0] * len(records) + [0.0] * len(records)


def test_response_length_grows_with_level(task, tokenizer):
    means = {}
    for level, (train, test) in chain_splits(seed=0).items():
        lengths = [len(tokenizer.encode(p.solution(), add_special_tokens=False)) for p in train + test]
        means[level] = statistics.mean(lengths)
        if level == 1:
            assert 8 <= min(lengths) and means[level] <= 20, (min(lengths), means[level])
        if level == 5:
            assert max(lengths) <= 100 and means[level] >= 50, (max(lengths), means[level])
    assert [means[k] for k in CHAIN_LEVELS] == sorted(set(means.values())), means  # strictly increasing


def test_at_least_ten_thousand_distinct_train_problems(task):
    problems = file_problems(task["train"])
    assert len(problems) == len(set(problems)) >= 10_000
    per_level = [sum(len(s) == LEVEL_STEPS[k] for _, s in problems) for k in CHAIN_LEVELS]
    # level 1 has 302 problems: the 202 that are not test problems; the others 2,500 each
    assert per_level == [count_level_problems(1) - 100] + [2500] * 4
    # levels are interleaved, not in blocks: the first 500 rows hold every level
    assert {len(s) for _, s in problems[:500]} == set(LEVEL_STEPS.values())


def test_files_load_with_the_task_tokenizer_without_skips(task, tokenizer):
    paths = [task["train"], *task["tests"].values()]
    # 72: the prompts measure 32-68 tokens through the chat template (README); a wordier prompt would show here
    records = load_prompts(paths, tokenizer=tokenizer, max_prompt_length=72, on_bad_row="skip")
    assert records.num_skipped == 0 and len(records) == 202 + 4 * 2500 + 500
    assert records[0].extra_info.keys() >= {"index", "split", "solution", "level"}
    assert [r.extra_info["index"] for r in load_prompts(task["tests"][3])] == list(range(100))
    table = pq.read_table(task["tests"][1])
    assert table.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]


def test_bad_requests_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"train_levels=\[0, 1\]: choose a non-empty subset of \[1, 2, 3, 4, 5\]"):
        write_chain_task(tmp_path, train_levels=(0, 1))
    with pytest.raises(ValueError, match="level 1 has 302 distinct problems but n_test_per_level = 302"):
        write_chain_task(tmp_path, n_train_per_level=10, n_test_per_level=302)
    with pytest.raises(ValueError, match="train_name='level1.parquet'"):
        write_chain_task(tmp_path, train_name="level1.parquet")
    assert not list(tmp_path.iterdir())  # nothing half-written
    # the exact count agrees with enumerating level 1 here: start 1..20, add/subtract 1..9, multiply/divide
    # by 2..3, the result an integer in 1..20
    result = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
    operands = {"+": range(1, 10), "-": range(1, 10), "*": range(2, 4), "/": range(2, 4)}
    one_step = [(a, op, b) for a in range(1, 21) for op in result for b in operands[op]
                if result[op](a, b) in range(1, 21)]  # 4.0 in range(...) is True, 4.5 is not
    assert count_level_problems(1) == len(one_step) == 302
    assert count_level_problems(2) == 4732


def test_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    write_chain_task(tmp_path, seed=0, **SMALL)
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(table, where, *args, **kwargs):
        where.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        write_chain_task(tmp_path, seed=5, **SMALL)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old  # every file whole, no temp file left


def test_make_task_command(tmp_path, capsys):
    from real_megatron.cli import main

    out = tmp_path / "task"
    assert main(["make-task", "chains", "--out", str(out), "--train-per-level", "50", "--test-per-level", "100",
                 "--train-levels", "1,2", "--seed", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert len(load_prompts(out / "train.parquet")) == 100
    assert (out / "level5.parquet").read_bytes() == write_chain_task(tmp_path / "api", seed=3, train_levels=(1, 2),
                                                                     **SMALL)[1][5].read_bytes()
    assert main(["make-task", "chains", "--out", str(out), "--test-per-level", "400"]) == 2
    assert "level 1 has 302 distinct problems" in capsys.readouterr().err  # errors go to stderr
