"""``real-megatron compare``: the summary's numbers on hand-made metrics, argument errors before anything
starts, and a micro comparison end to end (real task, real warm-up, real Megatron runs) that a rerun skips."""
from __future__ import annotations

import json
import math

import pytest

from real_megatron.repro.compare import MEASURED, build_parser, plan_runs
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
    (["--final-samples", "1"], "--final-samples must be >= 2"),
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--final-problems", "-1"], "--final-problems must be >= 0"),
    (["--preset", "stress", "--set", "optim.lr=1e-3"],
     "the stress cells set optim.lr per cell; choose the cells with --cells"),
    (["--cells", "u3_lr1e-4"], "--cells u3_lr1e-4: 16 prompts per rollout batch do not split into 3 mini-batches"),
    (["--cells", "8x3e-4"], "--cells '8x3e-4': expected u<updates>_lr<lr>[_s<staleness>]"),
    (["--cells", "u4_lr1e-4,u4_lr0.0001"], "names the setting of u4_lr0.0001 twice"),
    (["--variant", "real"], "--variant 'real' is not of the form LABEL=LOSS"),
    (["--variant", "grpo=real"], "the label 'grpo' is already a run label"),
    (["--variant", "real_s1=reel"], "--variant 'real_s1=reel': unknown loss"),
    (["--preset", "stress", "--cells", "u4_lr1e-4_s2", "--set", "train.max_staleness=1"],
     "the stress cells set train.max_staleness per cell"),
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
    assert tau.loss == "real" and tau.overrides == (*MEASURED, "loss.hparams.tau=0.1", "eval.samples=4")
    assert specs[0].overrides == MEASURED and not (tmp_path / "cmp").exists()


def test_a_variant_is_a_loss_under_its_own_label_set_apart_by_its_sets(tmp_path):
    args = build_parser().parse_args(["--losses", "real", "--seeds", "1", "--out", str(tmp_path / "cmp"),
                                      "--variant", "real_s1=real", "--set", "real_s1:train.max_staleness=1",
                                      "--variant", "real_s1_trunc=real", "--set", "real_s1_trunc:train.max_staleness=1",
                                      "--set", "real_s1_trunc:loss.hparams.behaviour_correction=truncate"])
    specs, _ = plan_runs(args)
    assert [(s.label, s.loss, s.overrides) for s in specs] == [
        ("real", "real", MEASURED), ("real_s1", "real", (*MEASURED, "train.max_staleness=1")),
        ("real_s1_trunc", "real", (*MEASURED, "train.max_staleness=1", "loss.hparams.behaviour_correction=truncate"))]
    assert specs[1].run_dir(tmp_path) == tmp_path / "runs" / "real_s1" / "seed1"


def test_stress_plan_sweeps_cells_and_shares_the_plain_cell_with_the_plain_comparison(tmp_path):
    args = build_parser().parse_args(["--preset", "stress", "--losses", "real,grpo", "--seeds", "2",
                                      "--out", str(tmp_path / "cmp")])
    specs, plan = plan_runs(args)
    out = (tmp_path / "cmp").resolve()
    assert [c.name for c in plan.cells] == ["u4_lr1e-4", "u8_lr1e-4", "u4_lr3e-4", "u8_lr3e-4"]
    assert plan.cell_of == {"u4_lr1e-4": None, "u8_lr1e-4": "u8_lr1e-4", "u4_lr3e-4": "u4_lr3e-4",
                            "u8_lr3e-4": "u8_lr3e-4"}
    # seed-major; within a seed the cell shared with the plain comparison runs last; REAL at tau=1 is the control
    first_seed = [(s.cell, s.label) for s in specs if s.seed == 1]
    assert first_seed == [(c, lb) for c in ("u8_lr1e-4", "u4_lr3e-4", "u8_lr3e-4", None)
                          for lb in ("real", "grpo", "real_tau1")]
    assert len(specs) == 2 * 4 * 3 and not out.exists()
    by = {(s.cell, s.label, s.seed): s for s in specs}
    assert by[("u8_lr3e-4", "grpo", 1)].overrides == (*MEASURED, "train.mini_batch_prompts=2", "optim.lr=0.0003")
    assert by[("u8_lr3e-4", "grpo", 1)].run_dir(out) == out / "runs" / "u8_lr3e-4" / "grpo" / "seed1"
    assert by[(None, "real_tau1", 2)].overrides == (*MEASURED, "train.mini_batch_prompts=4", "optim.lr=0.0001",
                                                   "loss.hparams.tau=1.0")
    assert by[(None, "real", 1)].run_dir(out) == out / "runs" / "real" / "seed1"  # the plain comparison's run
    assert plan.final["samples"] == 20 and plan.final["problems"] == 0 and plan.final["temperature"] == 1.0
    # composable: --cells picks cells, --tau replaces the control, --losses / --seeds as without the preset
    args = build_parser().parse_args(["--preset", "stress", "--cells", "u8_lr3e-4", "--tau", "0.25", "--losses",
                                      "dapo,real", "--seeds", "1", "--set", "dapo:eval.samples=2", "--out", str(out)])
    specs, plan = plan_runs(args)
    assert [(s.cell, s.label) for s in specs] == [("u8_lr3e-4", "dapo"), ("u8_lr3e-4", "real"),
                                                  ("u8_lr3e-4", "real_tau0.25")]
    assert specs[0].overrides[-1] == "eval.samples=2"
    # a cell with _s<k> runs asynchronously: rollouts up to k weight versions ahead of training
    args = build_parser().parse_args(["--cells", "u8_lr1e-4_s1", "--losses", "real", "--seeds", "1", "--out", str(out)])
    specs, plan = plan_runs(args)
    assert specs[0].overrides[-3:] == ("train.mini_batch_prompts=2", "optim.lr=0.0001", "train.max_staleness=1")


def test_run_locks_let_a_second_process_skip_a_held_run(tmp_path):
    from real_megatron.repro.compare import _lock

    with _lock(tmp_path / "run" / ".compare.lock", wait=False) as first:
        assert first is True
        with _lock(tmp_path / "run" / ".compare.lock", wait=False) as second:  # another open file: another holder
            assert second is False
    with _lock(tmp_path / "run" / ".compare.lock", wait=False) as again:
        assert again is True


def test_update_size_counts_trainable_parameters_once():
    """‖θ_after − θ_before‖ / ‖θ_before‖ over the trainable parameters, each counted once (a chunk may list
    a tied one twice), frozen ones left out. (Under TP/PP/DP: tests/test_megatron_parallel.py.)"""
    import torch

    from real_megatron.megatron.update_size import relative_update, snapshot, trainable_parameters

    chunk = torch.nn.Linear(3, 4)
    with torch.no_grad():
        chunk.weight.fill_(1.0)  # ‖θ‖² = 12 + 4 (bias 1)
        chunk.bias.fill_(1.0)
    chunk.register_parameter("frozen", torch.nn.Parameter(torch.full((5,), 100.0), requires_grad=False))
    params = trainable_parameters([chunk, chunk])  # the same chunk twice: counted once
    assert len(params) == 2
    before = snapshot(params)
    with torch.no_grad():
        chunk.weight[0, 0] += 0.4
        chunk.bias[0] -= 0.3
    assert relative_update(params, before) == pytest.approx(0.5 / 4.0)  # sqrt(0.16 + 0.09) / sqrt(16)
    assert relative_update(params, snapshot(params)) == 0.0


def _compare_process(argv: list[str]) -> tuple[int, str, str]:
    """``real-megatron compare`` in its own process, as a user runs it: the trainings' process group, wandb's
    threads and the reward workers live and die there, not in the test session."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "real_megatron", "compare", *argv], capture_output=True, text=True,
                          timeout=1200)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.slow
def test_micro_comparison_writes_tables_and_figures_and_a_rerun_skips(tmp_path):
    out = tmp_path / "cmp"
    # 4 prompts per rollout batch, the recipe's mini-batch of 4 prompts: one update per rollout step
    small = ["train.rollout_batch_prompts=4", "rollout.n=2",
             "rollout.max_new_tokens=24", "eval.max_prompts=1", "eval.samples=2", "eval.max_new_tokens=24",
             "train.eval_every=1", "train.save_every=1"]
    argv = ["--losses", "real,dapo", "--seeds", "2", "--steps", "2", "--out", str(out), "--warmup-steps", "2",
            "--final-samples", "2", "--final-problems", "3",
            *[x for s in small for x in ("--set", s)],
            "--warmup-set", "eval.max_prompts=1", "--warmup-set", "eval.samples=2",
            "--warmup-set", "eval.max_new_tokens=24"]
    code, first, err = _compare_process(argv)
    assert code == 0, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["losses"]) == ["real", "dapo"]
    assert summary["levels"] == [f"level{k}" for k in range(1, 6)]
    for label in ("real", "dapo"):
        row = summary["losses"][label]
        assert row["seeds"] == [1, 2] and set(row["final"]) == {*summary["levels"], "average"}
        final = row["per_seed"]["1"]["final"]
        assert final["step"] == 2 and final["source"] == "final evaluation"  # 2 rollout steps x 1 update
        evaluation = json.loads((out / "runs" / label / "seed1" / "final_eval_n2_p3.json").read_text())
        assert [len(lv["correct_per_problem"]) for lv in evaluation["levels"].values()] == [3] * 5
        assert evaluation["seed"] == summary["final_eval"]["seed"] and evaluation["samples"] == 2
        assert final["pass@1"]["average"] == pytest.approx(evaluation["pass@1"])
    # the start row is one evaluation of the warm-up (no spread over seeds), with the runs' sampling seed
    start_eval = json.loads((out / "warmup" / "final_eval_n2_p3.json").read_text())
    assert summary["start"]["average"] == {"mean": pytest.approx(start_eval["pass@1"]), "std": 0.0, "n": 1}
    assert summary["final_eval"]["evaluations"] == 5 and summary["final_eval"]["problems_per_level"] == 3
    pairs = [(p["label"], p["vs"]) for p in summary["paired"]]
    assert pairs == [("dapo", "real"), ("real", "start"), ("dapo", "start")]
    for p in summary["paired"]:
        assert set(p) >= {"label", "vs", "mean_diff", "ci_low", "ci_high", "resolved"} and p["n_seeds"] == 2
    assert summary["ablation"] == ["real"]
    md = (out / "summary.md").read_text()
    assert "| REAL (n=2) |" in md and "| DAPO (n=2) |" in md and "| start (warm-up, one evaluation) |" in md
    assert "## Paired differences" in md and "| DAPO | REAL |" in md
    for fig in ("dynamics.png", "ablation.png"):
        assert (out / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "run 4/4: dapo seed 2 ->" in first and "[compare] summary:" in first
    assert "[compare] warm-up (the start row): final evaluation" in first
    rows = [json.loads(line) for line in (out / "runs" / "real" / "seed1" / "metrics.jsonl").read_text().splitlines()]
    assert all("diag/update_rel_norm" in r for r in rows if "train/loss" in r)  # every optimizer step's size
    assert json.loads((out / "runs" / "real" / "seed1" / "weight_drift.json").read_text())["relative_drift"] >= 0

    metrics = [out / "runs" / label / "seed1" / "metrics.jsonl" for label in ("real", "dapo")]
    stamps = [m.stat().st_mtime_ns for m in metrics + [out / "runs" / "real" / "seed1" / "final_eval_n2_p3.json"]]
    code, second, err = _compare_process(argv)
    assert code == 0, err[-3000:]
    assert "run 1/4: real seed 1: finished before, skipped" in second
    assert "run 4/4: dapo seed 2: finished before, skipped" in second
    assert [m.stat().st_mtime_ns
            for m in metrics + [out / "runs" / "real" / "seed1" / "final_eval_n2_p3.json"]] == stamps
    assert json.loads((out / "summary.json").read_text())["losses"] == summary["losses"]

    # an interrupted run (no done marker) resumes from its checkpoint: here the last one, so nothing retrains;
    # its missing final evaluation is run then
    (out / "runs" / "dapo" / "seed1" / "compare_done.json").unlink()
    (out / "runs" / "dapo" / "seed1" / "final_eval_n2_p3.json").unlink()
    rows = metrics[1].read_text().splitlines()
    code, third, err = _compare_process(argv)
    assert code == 0, err[-3000:]
    assert "run 2/4: dapo seed 1 -> " in third and "(resuming from its checkpoint)" in third
    assert "run 2/4: dapo seed 1: final evaluation" in third
    assert metrics[1].read_text().splitlines() == rows
    stamps = [m.stat().st_mtime_ns for m in metrics]

    # the same directory with other settings is refused, before any training
    code, _, err = _compare_process([*argv, "--set", "optim.lr=3e-4"])
    assert code == 2 and "was run with other settings" in err, err[-3000:]
    assert [m.stat().st_mtime_ns for m in metrics] == stamps

    # the stress preset into the same directory, one seed, two cells: the cell with the plain settings
    # (1 update per batch of 4 prompts at lr 1e-4) is the plain comparison's runs, skipped; REAL at tau=1 is new
    stress = argv[:argv.index("--seeds")] + ["--seeds", "1"] + argv[argv.index("--seeds") + 2:]
    stress += ["--preset", "stress", "--cells", "u1_lr1e-4,u2_lr3e-4"]
    code, fourth, err = _compare_process(stress)
    assert code == 0, err[-3000:]
    assert "run 4/6: real seed 1: finished before, skipped" in fourth  # the plain cell runs last
    assert "run 5/6: dapo seed 1: finished before, skipped" in fourth and "run 6/6: real_tau1 seed 1 ->" in fourth
    assert "run 1/6: real [u2_lr3e-4] seed 1 ->" in fourth
    assert [m.stat().st_mtime_ns for m in metrics] == stamps
    cfg = (out / "runs" / "u2_lr3e-4" / "dapo" / "seed1" / "config.yaml").read_text()
    assert "mini_batch_prompts: 2" in cfg and "lr: 0.0003" in cfg
    result = json.loads((out / "stress_summary.json").read_text())
    assert [c["cell"] for c in result["cells"]] == ["u1_lr1e-4", "u2_lr3e-4"]
    for cell in result["cells"]:
        assert list(cell["losses"]) == ["real", "dapo", "real_tau1"]
        dapo = cell["losses"]["dapo"]
        assert dapo["vs_real"]["vs"] == "real" and dapo["vs_real"]["ci_low"] is None  # one seed: no interval
        assert set(dapo["dynamics"]) >= {"entropy_first", "entropy_max", "clip_fraction", "ratio_outside_5pct",
                                         "top1_share_neg", "update_size_mean", "weight_drift"}
        assert dapo["dynamics"]["entropy_first"]["n"] == 1
    md = (out / "stress_summary.md").read_text()
    assert "| 2 upd, lr 0.0003 | DAPO (n=1) |" in md and "REAL τ=1" in md
    for fig in ("stress.png", "stress_dynamics_u1_lr1e-4.png", "stress_dynamics_u2_lr3e-4.png"):
        assert (out / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text())["losses"] == summary["losses"]  # the plain summary stays


@pytest.mark.slow
def test_jobs_2_trains_two_runs_side_by_side(tmp_path):
    """``--jobs 2``: after the warm-up a worker process takes the run the main process does not hold."""
    out = tmp_path / "cmp"
    small = ["train.rollout_batch_prompts=4", "rollout.n=2", "rollout.max_new_tokens=16", "eval.max_prompts=1",
             "eval.samples=2", "eval.max_new_tokens=16"]
    argv = ["--losses", "real,dapo", "--seeds", "1", "--steps", "1", "--out", str(out), "--warmup-steps", "1",
            "--final-samples", "2", "--final-problems", "1", "--jobs", "2", *[x for s in small for x in ("--set", s)],
            "--warmup-set", "eval.max_prompts=1", "--warmup-set", "eval.samples=2",
            "--warmup-set", "eval.max_new_tokens=16"]
    code, printed, err = _compare_process(argv)
    assert code == 0, err[-3000:]
    assert "[compare] 2 processes on" in printed
    import re

    trained = re.findall(r"^\[compare( worker 2)?\] run \d/2: (\w+) seed 1 -> ", printed, flags=re.M)
    assert (sorted(trained) == [("", "dapo"), (" worker 2", "real")]
            or sorted(trained) == [("", "real"), (" worker 2", "dapo")])
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["losses"]) == ["real", "dapo"] and [p["label"] for p in summary["paired"]][0] == "dapo"


def test_saved_config_check_names_the_changed_settings(tmp_path):
    """The rule `compare` and `demo` share: a run directory is resumed only with the settings it was run with."""
    from real_megatron.config import load_config, save_config
    from real_megatron.repro.recipe import check_saved_config

    check_saved_config(tmp_path, load_config(None, ["optim.lr=1e-4"]))  # nothing saved yet: nothing to compare
    save_config(load_config(None, ["optim.lr=1e-4"]), tmp_path / "config.yaml")
    check_saved_config(tmp_path, load_config(None, ["optim.lr=1e-4"]))
    with pytest.raises(ValueError,
                       match=r"other settings \(loss.hparams.tau: None -> 0.1, optim.lr: 0.0001 -> 0.0003\)"):
        check_saved_config(tmp_path, load_config(None, ["optim.lr=3e-4", "loss.hparams.tau=0.1"]))
    # a setting the saved config predates (written by an older version) counts as its default, not as a change
    import yaml

    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["train"]["max_staleness"], saved["rollout"]["partial"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    check_saved_config(tmp_path, load_config(None, ["optim.lr=1e-4"]))
    with pytest.raises(ValueError, match=r"train.max_staleness: 0 -> 1"):
        check_saved_config(tmp_path, load_config(None, ["optim.lr=1e-4", "train.max_staleness=1"]))


def _final_eval(correct_per_level: list[list[int]], samples: int = 4, seed: int = 271828) -> dict:
    from real_megatron.repro.stats import eval_standard_error, eval_standard_error_bound

    levels = {f"level{k}": {"problems": len(c), "pass@1": sum(c) / (len(c) * samples), "correct_per_problem": c}
              for k, c in enumerate(correct_per_level, 1)}
    return {"samples": samples, "problems_per_level": "all", "seed": seed, "temperature": 1.0, "top_p": 1.0,
            "max_new_tokens": 96, "levels": levels,
            "pass@1": sum(lv["pass@1"] for lv in levels.values()) / len(levels),
            "standard_error": eval_standard_error(correct_per_level, samples),
            "standard_error_bound": eval_standard_error_bound([len(c) for c in correct_per_level], samples)}


def test_summary_with_final_evaluations_has_a_one_evaluation_start_row_and_a_paired_table():
    """Hand-made: REAL solves 2 of 4 samples everywhere; GRPO 3 of 4 on every problem in every seed (a
    difference of +25 points, the same in each seed: resolved); DAPO +1 sample on one level in seed 1, -1 in
    seed 2, 0 in seed 3 (mean 0: not resolved)."""
    problems = 20
    real = [[2] * problems for _ in range(2)]
    grpo = [[3] * problems for _ in range(2)]
    dapo = {1: [[3] * problems, [2] * problems], 2: [[1] * problems, [2] * problems], 3: [[2] * problems] * 2}
    start = _final_eval([[1] * problems, [1] * problems])
    rows = _rows({0: {"level1": 0.1, "level2": 0.1}, 4: {"level1": 0.5, "level2": 0.5}})
    runs = {label: {s: rows for s in (1, 2, 3)} for label in ("real", "grpo", "dapo")}
    finals = {"real": {s: _final_eval(real) for s in (1, 2, 3)}, "grpo": {s: _final_eval(grpo) for s in (1, 2, 3)},
              "dapo": {s: _final_eval(dapo[s]) for s in (1, 2, 3)}}
    s = summarize(runs, final_evals=finals, start_eval=start)
    assert s["start"]["average"] == {"mean": pytest.approx(0.25), "std": 0.0, "n": 1}
    assert s["losses"]["grpo"]["final"]["average"]["mean"] == pytest.approx(0.75)  # the final evaluation's, not 0.5
    assert s["losses"]["grpo"]["best"]["average"]["mean"] == pytest.approx(0.5)  # the trainer's evaluations
    paired = {(p["label"], p["vs"]): p for p in s["paired"]}
    assert list(paired) == [("grpo", "real"), ("dapo", "real"), ("real", "start"), ("grpo", "start"), ("dapo", "start")]
    g = paired[("grpo", "real")]
    assert g["mean_diff"] == pytest.approx(25.0) and g["resolved"] is True and g["ci_low"] == pytest.approx(25.0)
    d = paired[("dapo", "real")]
    assert d["mean_diff"] == pytest.approx(0.0, abs=1e-9) and d["resolved"] is False and d["ci_low"] < 0 < d["ci_high"]
    assert paired[("real", "start")]["mean_diff"] == pytest.approx(25.0)
    fe = s["final_eval"]
    assert fe["samples"] == 4 and fe["evaluations"] == 10 and fe["standard_error_bound"] == pytest.approx(
        100 * math.sqrt(2 / (4 * 4 * problems)) / 2)
    md = summary_markdown(s)
    assert "| start (warm-up, one evaluation) | 25.0 | 25.0 | 25.0 |" in md
    assert "| GRPO | REAL | +25.0 | [+25.0, +25.0] | 3 | **resolved** |" in md
    assert "| DAPO | REAL | +0.0 |" in md and "| 3 | not resolved |" in md
    assert "Its standard error on the average" in md
    json.dumps(s)


def test_run_dynamics_reads_the_stress_metrics_and_where_the_reward_reaches_zero():
    from real_megatron.repro.stress import run_dynamics

    def step(i, rollout, reward, entropy, clip=None, inside=0.9):
        row = {"step": i, "rollout_step": rollout, "train/loss": 0.1, "train/reward_mean": reward,
               "train/entropy": entropy, "diag/ratio_bin_0.95_1.05": inside, "diag/ratio_bin_0_0.8": 0.01,
               "diag/ratio_bin_1.2_inf": 0.03, "diag/grad_top1pct_share_neg": 0.1, "diag/update_rel_norm": 1e-3 * i}
        if clip is not None:
            row["loss/clip_fraction"] = clip
        return row

    rows = [_eval_row(0, {"level1": 0.5})]
    rows += [step(1, 1, 0.3, 0.09, 0.01), step(2, 1, 0.3, 0.09, 0.03, inside=0.7)]
    rows += [step(3, 2, 0.0, 0.5), step(4, 2, 0.0, 0.5), step(5, 3, 0.2, 0.3), step(6, 3, 0.2, 0.3)]
    rows += [step(7, 4, 0.0, 0.02), step(8, 4, 0.0, 0.02), step(9, 5, 0.0, 0.01), step(10, 5, 0.0, 0.01)]
    d = run_dynamics(rows)
    assert d["rollout_steps"] == 5 and d["reward_zero_from"] == 4  # 0 at step 2 too, but it came back
    assert (d["entropy_first"], d["entropy_last"], d["entropy_max"]) == (0.09, 0.01, 0.5)
    assert d["clip_fraction"] == pytest.approx(0.02)  # over the steps that report it
    assert d["ratio_outside_5pct"] == pytest.approx(1 - (0.9 * 9 + 0.7) / 10)
    assert d["ratio_outside_20pct"] == pytest.approx(0.04)
    assert d["update_size_mean"] == pytest.approx(5.5e-3) and d["update_size_max"] == pytest.approx(1e-2)
    assert run_dynamics(rows[:3])["reward_zero_from"] is None


def test_weight_drift_is_the_relative_distance_between_two_checkpoints(tmp_path):
    import torch
    from safetensors.torch import save_file

    from real_megatron.repro.stress import weight_drift

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_file({"w": torch.ones(4), "v": torch.zeros(2)}, str(tmp_path / "a" / "model.safetensors"))
    save_file({"w": torch.tensor([1.0, 1.0, 1.0, 2.0]), "v": torch.tensor([0.0, 1.0])},
              str(tmp_path / "b" / "model.safetensors"))
    assert weight_drift(tmp_path / "a", tmp_path / "b") == pytest.approx(math.sqrt(2) / 2)


def test_stress_summary_markdown_and_figure_on_hand_made_runs(tmp_path):
    from real_megatron.repro.stress import Cell, plot_stress, run_dynamics, stress_markdown, stress_summary

    rows = _rows({0: {"level1": 0.2, "level2": 0.2}, 4: {"level1": 0.6, "level2": 0.4}})
    for r in rows[1:]:
        r.update({"train/loss": 0.1, "rollout_step": 1, "loss/clip_fraction": 0.004, "diag/update_rel_norm": 2e-3})
    cells = [Cell("u4_lr1e-4", 4, 1e-4), Cell("u8_lr3e-4", 8, 3e-4)]
    finals = {"real": {s: _final_eval([[2] * 10] * 2) for s in (1, 2)},
              "grpo": {s: _final_eval([[3] * 10] * 2) for s in (1, 2)}}
    runs = {"real": {1: rows, 2: rows}, "grpo": {1: rows, 2: rows}}
    start = _final_eval([[1] * 10] * 2)
    per_cell = {"u4_lr1e-4": summarize(runs, final_evals=finals, start_eval=start)}  # the other cell: no run yet
    dyn = {"u4_lr1e-4": {lb: {s: run_dynamics(rows) for s in (1, 2)} for lb in runs}}
    drift = {"u4_lr1e-4": {"real": {1: 0.01, 2: 0.03}}}
    s = stress_summary(cells, per_cell, dyn, drift, settings={"preset": "stress"})
    assert [c["cell"] for c in s["cells"]] == ["u4_lr1e-4"]
    grpo = s["cells"][0]["losses"]["grpo"]
    assert grpo["final"]["mean"] == pytest.approx(0.75) and grpo["vs_real"]["mean_diff"] == pytest.approx(25.0)
    assert grpo["dynamics"]["clip_fraction"]["mean"] == pytest.approx(0.004)
    assert s["cells"][0]["losses"]["real"]["dynamics"]["weight_drift"]["mean"] == pytest.approx(0.02)
    md = stress_markdown(s)
    assert "| 4 upd, lr 0.0001 | GRPO (n=2) | 75.0 ± 0.0 |" in md and "**+25.0 [+25.0, +25.0]**" in md
    assert "| 4 upd, lr 0.0001 | REAL (n=2) |" in md and "(reference)" in md
    assert "0.40 %" in md and "2.00e-03" in md
    assert grpo["final"]["min"] == pytest.approx(0.75) and grpo["best"]["max"] == pytest.approx(0.5)
    assert plot_stress(s, tmp_path / "stress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(s)


def test_help_names_the_stress_preset():
    text = build_parser().format_help()
    assert "--preset {stress}" in text and "--cells" in text and "--dry-run" in text
