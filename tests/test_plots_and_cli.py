"""Figure 1 from the library, run curves, and the command dispatcher."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from itertools import pairwise

import pytest

from real_megatron.plots import plot_run, read_metrics
from real_megatron.repro.figures import plot_weights


def test_figure1_curves_have_the_papers_shape(tmp_path):
    out = tmp_path / "fig1.png"
    c = plot_weights(out)
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = c["s"]
    pos, neg = c["real_pos"], c["real_neg"]
    # REAL: positives decrease, negatives increase, both strictly inside (0, 1/τ)
    assert all(a > b for a, b in pairwise(pos)) and all(a < b for a, b in pairwise(neg))
    assert max(pos + neg) < 2.0 and min(pos + neg) > 0
    zero = s.index(0.0)
    assert math.isclose(pos[zero], 2.0 / 5, rel_tol=1e-9)  # (1/τ)/(1 + C+) at s̄ = 0
    # GRPO: |A e^s| inside the clip range, 0 outside; negatives unbounded
    for x, gp, gn in zip(s, c["grpo_pos"], c["grpo_neg"], strict=True):
        assert math.isclose(gp, math.exp(x) if x < math.log(1.2) else 0.0, abs_tol=1e-12)
        assert math.isclose(gn, math.exp(x) if x > math.log(0.8) else 0.0, abs_tol=1e-12)


def test_plot_run_reads_metrics_and_tolerates_a_torn_last_line(tmp_path):
    rows = [{"step": i, "train/reward_mean": 0.1 * i, "train/entropy": 1.0, "time/rollout_s": 0.5} for i in range(1, 4)]
    rows[-1]["eval/pass@1"] = 0.4
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "train/rew'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert len(read_metrics(tmp_path)) == 3
    out = plot_run(tmp_path)
    assert out.exists() and out.stat().st_size > 10_000


def test_plot_run_names_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path)


def test_cli_help_and_unknown_command():
    ok = subprocess.run([sys.executable, "-m", "real_megatron", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "plot-weights" in ok.stdout and "train" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "real_megatron", "trian"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'trian'" in bad.stderr


def test_step_times_stack_the_trainers_phases_per_rollout_step():
    from real_megatron.plots import step_times

    sync = [{"step": 1, "rollout_step": 1, "time/rollout_s": 2.0, "time/reward_s": 0.5, "time/logprob_s": 0.3,
             "time/update_s": 0.4, "time/sync_s": 0.0},
            {"step": 2, "rollout_step": 1, "time/rollout_s": 0.0, "time/reward_s": 0.0, "time/logprob_s": 0.0,
             "time/update_s": 0.5, "time/sync_s": 0.1}]
    got = step_times(sync)[1]
    assert got["waiting for rollouts"] == 2.5 and got["generation"] == 2.5  # the synchronous loop waits it all
    assert got["updates"] == 0.9 and got["old log-probs"] == 0.3 and got["weight sync"] == 0.1
    ahead = [{**row, "time/wait_rollout_s": wait} for row, wait in zip(sync, (0.2, 0.0), strict=True)]
    got = step_times(ahead)[1]
    assert got["waiting for rollouts"] == 0.2 and got["generation"] == 2.5  # overlapped: only the wait
    assert step_times([{"step": 0, "eval/pass@1": 0.5}]) == {}  # the evaluation before training has no step
