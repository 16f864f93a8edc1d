"""``real-megatron compare``: the summary's numbers on hand-made metrics, argument errors before anything
starts, and a micro comparison end to end (real task, real warm-up, real Megatron runs) that a rerun skips."""
from __future__ import annotations

import json
import math

import pytest

from real_megatron.repro.compare import build_parser, plan_runs
from real_megatron.repro.compare import main as compare_main
from real_megatron.repro.summary import run_result, summarize, summary_markdown


def _eval_row(step: int, levels: dict[str, float]) -> dict:
    row = {"step": step, "rollout_step": step, **{f"eval/{k}/pass@1": v for k, v in levels.items()}}
    row["eval/pass@1"] = sum(levels.values()) / len(levels)
    return row


def _train_row(step: int) -> dict:
    return {"step": step, "train/entropy": 1.0, "train/reward_mean": 0.5, "train/solved_all_ratio": 0.1}


def _rows(evals: dict[int, dict[str, float]]) -> list[dict]:
    rows = []
    for step in sorted(evals):
        rows.append({**_train_row(step), **_eval_row(step, evals[step])} if step else _eval_row(0, evals[0]))
    return rows


def test_run_result_best_is_one_evaluation_and_final_is_the_last():
    rows = _rows({0: {"level1": 0.2, "level2": 0.0},
                  2: {"level1": 0.9, "level2": 0.1},   # average 0.5: the best
                  4: {"level1": 0.3, "level2": 0.5},   # average 0.4, level2 higher than at the best step
                  6: {"level1": 0.4, "level2": 0.2}})  # average 0.3: the final
    r = run_result(rows)
    assert r["start"] == {"step": 0, "pass@1": {"level1": 0.2, "level2": 0.0, "average": pytest.approx(0.1)}}
    assert r["final"]["step"] == 6 and r["final"]["pass@1"]["average"] == pytest.approx(0.3)
    # best: the step with the highest average, with that step's per-level numbers (not a per-level max)
    assert r["best"]["step"] == 2 and r["best"]["pass@1"]["level2"] == pytest.approx(0.1)


def test_summary_mean_and_sample_std_over_seeds(tmp_path):
    runs = {
        "real": {1: _rows({0: {"level1": 0.2, "level2": 0.2}, 3: {"level1": 0.6, "level2": 0.4},
                           6: {"level1": 0.5, "level2": 0.3}}),
                 2: _rows({0: {"level1": 0.4, "level2": 0.2}, 3: {"level1": 0.5, "level2": 0.3},
                           6: {"level1": 0.7, "level2": 0.5}})},
        "grpo": {1: _rows({0: {"level1": 0.4, "level2": 0.4}, 3: {"level1": 0.1, "level2": 0.1},
                           6: {"level1": 0.3, "level2": 0.1}})},
        "real_tau1": {1: _rows({0: {"level1": 0.2, "level2": 0.2}, 6: {"level1": 0.5, "level2": 0.5}})},
        "real_tau0.1": {1: _rows({0: {"level1": 0.2, "level2": 0.2}, 6: {"level1": 0.1, "level2": 0.5}})},
    }
    s = summarize(runs)
    assert s["levels"] == ["level1", "level2"]
    real = s["losses"]["real"]
    assert real["seeds"] == [1, 2]
    # final averages: seed 1 0.4, seed 2 0.6 -> mean 0.5, sample std sqrt(0.02) = 0.1414
    assert real["final"]["average"]["mean"] == pytest.approx(0.5)
    assert real["final"]["average"]["std"] == pytest.approx(math.sqrt(0.02))
    assert real["final"]["level1"]["mean"] == pytest.approx(0.6)
    # best: seed 1 at step 3 (0.5), seed 2 at step 6 (0.6)
    assert real["best"]["average"]["mean"] == pytest.approx(0.55)
    assert real["best"]["level2"]["mean"] == pytest.approx(0.45)
    assert s["losses"]["grpo"]["final"]["average"] == {"mean": pytest.approx(0.2), "std": 0.0, "n": 1}
    # best is over the evaluations after training started: step 6 (0.2), not the higher step 0 (0.4)
    assert s["losses"]["grpo"]["best"]["average"]["mean"] == pytest.approx(0.2)
    # start: the step-0 evaluation per seed (seed 1: 0.2, seed 2: 0.3)
    assert s["start"]["average"]["mean"] == pytest.approx(0.25)
    # Table 4: the REAL family in the paper's order, then the τ sweep by τ
    assert s["ablation"] == ["real", "real_tau0.1", "real_tau1"]
    md = summary_markdown(s)
    assert "| REAL (n=2) | 60.0 ± 14.1 | 40.0 ± 14.1 | 50.0 ± 14.1 |" in md
    assert "| start (warm-up) |" in md and "| REAL τ=0.1 | 30.0 ± 0.0 | 30.0 ± 0.0 |" in md
    json.dumps(s)  # summary.json's content


@pytest.mark.parametrize("argv, message", [
    (["--losses", "real,foo"], "unknown loss 'foo'"),
    (["--set", "train.no_such_key=3"], "unknown config key 'train.no_such_key'"),
    (["--set", "train.mini_batch_prompts=abc"], "train.mini_batch_prompts: expected int"),
    (["--set", "loss.hparams.tau=0.3"], "run grpo (seed 1): loss.hparams"),  # grpo has no τ
    (["--set", "seed=7"], "reserved"),
    (["--set", "nope:eval.samples=2"], "'nope' is not a run label"),
    (["--tau", "0.1,-1"], "positive finite"),
    (["--warmup-set", "train.steps=0"], "--warmup-set: train.steps=0 must be >= 1"),
])
def test_bad_arguments_fail_before_anything_starts(tmp_path, capsys, monkeypatch, argv, message):
    import real_megatron.repro.recipe

    def started(*args, **kwargs):
        raise AssertionError("the comparison started despite a bad argument")

    monkeypatch.setattr(real_megatron.repro.recipe, "build_chain_assets", started)
    out = tmp_path / "cmp"
    assert compare_main(["--losses", "real,grpo", "--seeds", "1", "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_plan_is_seed_major_and_a_tau_equal_to_reals_reuses_the_real_run(tmp_path):
    args = build_parser().parse_args(["--losses", "real,dapo", "--seeds", "2", "--out", str(tmp_path / "cmp"),
                                      "--tau", "0.1,0.5", "--set", "real_tau0.1:eval.samples=4"])
    specs, _ = plan_runs(args)
    assert [(s.label, s.seed) for s in specs] == [("real", 1), ("dapo", 1), ("real_tau0.1", 1),
                                                  ("real", 2), ("dapo", 2), ("real_tau0.1", 2)]
    tau = next(s for s in specs if s.label == "real_tau0.1")
    assert tau.loss == "real" and tau.overrides == ("loss.hparams.tau=0.1", "eval.samples=4")
    assert specs[0].overrides == () and not (tmp_path / "cmp").exists()


@pytest.mark.slow
def _compare_process(argv: list[str]) -> tuple[int, str, str]:
    """``real-megatron compare`` in its own process, as a user runs it: the trainings' process group, wandb's
    threads and the reward workers live and die there, not in the test session."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "real_megatron", "compare", *argv], capture_output=True, text=True,
                          timeout=1200)
    return done.returncode, done.stdout, done.stderr


def test_micro_comparison_writes_tables_and_figures_and_a_rerun_skips(tmp_path):
    out = tmp_path / "cmp"
    small = ["train.rollout_batch_prompts=2", "train.mini_batch_prompts=1", "rollout.n=2",
             "rollout.max_new_tokens=24", "eval.max_prompts=1", "eval.samples=2", "eval.max_new_tokens=24",
             "train.eval_every=1", "train.save_every=1"]
    argv = ["--losses", "real,dapo", "--seeds", "1", "--steps", "2", "--out", str(out), "--warmup-steps", "2",
            *[x for s in small for x in ("--set", s)],
            "--warmup-set", "eval.max_prompts=1", "--warmup-set", "eval.samples=2", "--warmup-set", "eval.max_new_tokens=24"]
    code, first, err = _compare_process(argv)
    assert code == 0, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["losses"]) == ["real", "dapo"]
    assert summary["levels"] == [f"level{k}" for k in range(1, 6)]
    for label in ("real", "dapo"):
        row = summary["losses"][label]
        assert row["seeds"] == [1] and set(row["final"]) == {*summary["levels"], "average"}
        assert row["per_seed"]["1"]["final"]["step"] == 4  # 2 rollout steps x 2 optimizer steps
    assert summary["start"] is not None and summary["ablation"] == ["real"]
    md = (out / "summary.md").read_text()
    assert "| REAL (n=1) |" in md and "| DAPO (n=1) |" in md and "| start (warm-up) |" in md
    for fig in ("dynamics.png", "ablation.png"):
        assert (out / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "run 2/2: dapo seed 1 ->" in first and "[compare] summary:" in first

    metrics = [out / "runs" / label / "seed1" / "metrics.jsonl" for label in ("real", "dapo")]
    stamps = [m.stat().st_mtime_ns for m in metrics]
    code, second, err = _compare_process(argv)
    assert code == 0, err[-3000:]
    assert "run 1/2: real seed 1: finished before, skipped" in second
    assert "run 2/2: dapo seed 1: finished before, skipped" in second
    assert [m.stat().st_mtime_ns for m in metrics] == stamps  # nothing retrained
    assert json.loads((out / "summary.json").read_text())["losses"] == summary["losses"]

    # an interrupted run (no done marker) resumes from its checkpoint: here the last one, so nothing retrains
    (out / "runs" / "dapo" / "seed1" / "compare_done.json").unlink()
    rows = metrics[1].read_text().splitlines()
    code, third, err = _compare_process(argv)
    assert code == 0, err[-3000:]
    assert "run 2/2: dapo seed 1 -> " in third and "(resuming from its checkpoint)" in third
    assert metrics[1].read_text().splitlines() == rows
    stamps = [m.stat().st_mtime_ns for m in metrics]

    # the same directory with other settings is refused, before any training
    code, _, err = _compare_process([*argv, "--set", "optim.lr=3e-4"])
    assert code == 2 and "was run with other settings" in err, err[-3000:]
    assert [m.stat().st_mtime_ns for m in metrics] == stamps


def test_saved_config_check_names_the_changed_settings(tmp_path):
    """The rule `compare` and `demo` share: a run directory is resumed only with the settings it was run with."""
    from real_megatron.config import load_config, save_config
    from real_megatron.repro.recipe import check_saved_config

    check_saved_config(tmp_path, load_config(None, ["optim.lr=1e-4"]))  # nothing saved yet: nothing to compare
    save_config(load_config(None, ["optim.lr=1e-4"]), tmp_path / "config.yaml")
    check_saved_config(tmp_path, load_config(None, ["optim.lr=1e-4"]))
    with pytest.raises(ValueError, match=r"other settings \(loss.hparams.tau: None -> 0.1, optim.lr: 0.0001 -> 0.0003\)"):
        check_saved_config(tmp_path, load_config(None, ["optim.lr=3e-4", "loss.hparams.tau=0.1"]))
