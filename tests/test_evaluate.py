"""pass@k evaluation: the unbiased estimator, and `real-megatron evaluate` on benchmark-shaped files."""
from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import pytest

from real_megatron.evaluate import pass_at_k, report_ks


@pytest.mark.parametrize("n,c", [(4, 0), (4, 1), (4, 4), (6, 2), (7, 3)])
def test_pass_at_k_equals_the_probability_over_all_k_subsets(n, c):
    scores = [1] * c + [0] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(scores[i] for i in s) for s in subsets) / len(subsets)
        assert math.isclose(pass_at_k(n, c, k), brute, rel_tol=1e-12, abs_tol=1e-12), (n, c, k)
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)]:
        with pytest.raises(ValueError, match="pass@k needs"):
            pass_at_k(n, c, k)


def test_report_ks():
    assert report_ks(1) == [1]
    assert report_ks(16) == [1, 2, 4, 8, 16]
    assert report_ks(12) == [1, 2, 4, 8, 12]


@pytest.mark.slow  # the evaluate command end to end, after the session's SFT warm-up
def test_evaluate_cli_on_benchmark_shaped_files(tmp_path, warm_assets):
    import pyarrow.parquet as pq

    # the warmed-up tiny model solves some problems: with the random one every count is 0 and pass@k
    # would be 0 whatever the estimator did
    test, base = warm_assets["test"], warm_assets["base"]
    # a second benchmark file: the first 5 rows of the test split, as a user's own file would be
    small = tmp_path / "small_bench.parquet"
    pq.write_table(pq.read_table(test).slice(0, 5), small)
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "real_megatron", "evaluate", "--model", str(base), "--files",
                           str(test), str(small), "--samples", "4", "--max-new-tokens", "8", "--max-problems", "6",
                           "--temperature", "1.0", "--top-p", "1.0", "--reward-workers", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["benchmarks"]) == {"test", "small_bench"}
    assert results["benchmarks"]["test"]["problems"] == 6 and results["benchmarks"]["small_bench"]["problems"] == 5
    for r in results["benchmarks"].values():
        assert 0.0 <= r["pass@1"] <= r["pass@2"] <= r["pass@4"] <= 1.0
        counts = r["correct_per_problem"]
        assert len(counts) == r["problems"] and all(0 <= c <= 4 for c in counts)
        for k in (1, 2, 4):  # the reported numbers are the estimator applied to the reported counts
            want = sum(1 - math.comb(4 - c, k) / math.comb(4, k) for c in counts) / len(counts)
            assert math.isclose(r[f"pass@{k}"], want, rel_tol=1e-12), (k, r[f"pass@{k}"], want)
    assert sum(results["benchmarks"]["test"]["correct_per_problem"]) > 0
    table = (out / "results.md").read_text()
    assert "| average |" in table and "pass@4" in table

    bad = subprocess.run([sys.executable, "-m", "real_megatron", "evaluate", "--model", str(base), "--files",
                          str(tmp_path / "nope.parquet")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nope.parquet does not exist" in bad.stderr


def test_a_prompt_beyond_the_context_is_an_error_naming_file_and_row():
    from types import SimpleNamespace

    from real_megatron.evaluate import prompts_beyond_context

    hf = {"max_position_embeddings": 128}
    records = [SimpleNamespace(source_file="bench.parquet", row=i) for i in range(4)]
    ids = [[0] * n for n in (20, 100, 30, 110)]
    assert prompts_beyond_context(records, ids, 18, hf) is None  # 110 + 18 = 128: fits exactly
    message = prompts_beyond_context(records, ids, 20, hf)  # only row 3 (110 + 20 = 130) does not fit
    assert message.startswith("bench.parquet: row 3: prompt of 110 tokens + --max-new-tokens 20: 110 + 20 = 130 "
                              "tokens exceeds the model's context (max_position_embeddings=128); 1 of 4 prompts")
    assert message.endswith("1 of 4 prompts do not fit (the longest is 110 tokens). lower --max-new-tokens to <= 18 "
                            "or --max-prompt-length (prompts longer are refused)")
    message = prompts_beyond_context(records, ids, 29, hf)  # rows 1 and 3; the first is named
    assert message.startswith("bench.parquet: row 1: prompt of 100 tokens") and "2 of 4 prompts" in message


@pytest.mark.slow  # the evaluate command in a subprocess
def test_evaluate_cli_refuses_prompts_beyond_the_context_before_generating(tmp_path, assets):
    # the demo's model has 128 positions; the arithmetic prompts are ~20 tokens, so 120 new tokens cannot fit
    proc = subprocess.run([sys.executable, "-m", "real_megatron", "evaluate", "--model", str(assets["base"]),
                           "--files", str(assets["test"]), "--max-new-tokens", "120", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"error: {assets['test']}: row 0: prompt of" in proc.stderr and "max_position_embeddings=128" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # one line, no traceback
    assert not (tmp_path / "r").exists()
