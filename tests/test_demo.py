"""`real-megatron demo` end to end at the smallest size: the README's main command on the chain task.

The demo's own settings (recipe.py) with 2 warm-up steps and 1 RL step: every stage runs for real
(task files, tokenizer, random model, Megatron SFT, REAL training with the embedded engine and math-verify,
per-level evaluations, the plot), so a broken stage fails here. The numbers of the full-size demo are
measured by running it (README), not asserted.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_every_stage_and_prints_start_and_end_pass_at_1(tmp_path):
    run_dir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "real_megatron", "demo", "--run-dir", str(run_dir), "--warmup-steps", "2",
           "--steps", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    match = re.search(r"\[demo\] held-out pass@1 \(average of levels 1-5\): ([0-9.]+) \(after the warm-up\) -> "
                      r"([0-9.]+) \(after 1 RL steps\)", out)
    assert match, out[-3000:]
    assert "[demo] per level, before: 1:" in out and "[demo] per level, after:  1:" in out
    assert (run_dir / "real" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (run_dir / "task" / "data").iterdir()) == [
        "level1.parquet", "level2.parquet", "level3.parquet", "level4.parquet", "level5.parquet", "train.parquet",
        "warmup.parquet"]
    rows = [json.loads(line) for line in (run_dir / "real" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/pass@1" in r]
    assert [r["step"] for r in evals] == [0, 4]  # before RL and after its one rollout step (4 updates)
    for r in evals:  # the printed average is the mean of the five levels' pass@1
        levels = [r[f"eval/level{k}/pass@1"] for k in range(1, 6)]
        assert r["eval/pass@1"] == pytest.approx(sum(levels) / 5)
    assert float(match.group(1)) == pytest.approx(evals[0]["eval/pass@1"], abs=5e-4)
    assert float(match.group(2)) == pytest.approx(evals[-1]["eval/pass@1"], abs=5e-4)
