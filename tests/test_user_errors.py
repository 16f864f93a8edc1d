"""Nothing lost, nothing mixed: every command refuses bad input before it works, and run directories refuse
before they write.

Every case runs the real command in a subprocess (as a user does) and checks its exit code, its single line on
stderr, that no traceback was printed, and — where it refuses — that nothing was created and every file of the
directory it was pointed at is unchanged, byte for byte.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real commands in subprocesses

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run(args, cwd, timeout=300):
    cmd = [sys.executable, *args] if args[0].endswith(".py") else [sys.executable, "-m", "real_megatron", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> sha256 of its bytes), and every directory."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def assert_one_line_refusal(proc, needle: str, code: int = 2) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, (proc.returncode, proc.stdout[-1500:], proc.stderr[-1500:])
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr}"
    assert needle in lines[0], (needle, lines[0])


def train_args(assets, run_dir, **extra):
    values = {"run_dir": run_dir, "model.hf_dir": assets["base"], "data.train_files": f"[{assets['train']}]",
              "data.max_prompt_length": 64, "rollout.max_new_tokens": 8, "rollout.n": 4, "train.steps": 1,
              "train.rollout_batch_prompts": 4, "train.mini_batch_prompts": 2,
              "train.max_tokens_per_micro_batch": 128, "reward.num_workers": 1, "logging.wandb_mode": "disabled",
              "logging.progress_bar": False, "seed": 3}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def dirs(assets, tmp_path_factory):
    """A finished one-step REAL run and a finished SFT run, each built once by the real commands."""
    root = tmp_path_factory.mktemp("owned")
    rl = run(["train", *train_args(assets, root / "rl")], root)
    assert rl.returncode == 0, rl.stderr[-3000:]
    sft = run(["sft", *train_args(assets, root / "sft", **{"train.steps": 2})], root)
    assert sft.returncode == 0, sft.stderr[-3000:]
    return {"root": root, "rl": root / "rl", "sft": root / "sft"}


# ------------------------------------------------------------------------------ bad values, every command

def bad_value_cases(assets, tmp):
    """(command line, the text its one line must hold); run in an empty directory ``tmp``."""
    (tmp / "a_file").write_text("not a directory")
    metrics_dir = tmp / "not_a_run"
    metrics_dir.mkdir()
    (metrics_dir / "metrics.jsonl").write_text("hello world\nthis is not JSON\n")
    ev = ["evaluate", "--model", str(assets["base"]), "--files", str(assets["test"])]
    return [
        (["train", *train_args(assets, tmp / "r", **{"optim.lr": -0.1})], "optim.lr=-0.1 must be > 0"),
        (["train", *train_args(assets, tmp / "r", **{"eval.samples": 0})], "eval.samples=0 must be >= 1"),
        (["train", *train_args(assets, tmp / "r", **{"reward.num_workers": 0})], "reward.num_workers=0 must be >= 1"),
        (["train", *train_args(assets, tmp / "r", **{"rollout.max_new_tokens": 0})],
         "rollout.max_new_tokens=0 must be >= 1"),
        (["train", *train_args(assets, tmp / "r", **{"rollout.n": 1, "loss.name": "grpo"})],
         "loss grpo compares the rollouts of a prompt"),
        (["train", *train_args(assets, tmp / "r", **{"train.steps": 0})], "train.steps=0 must be >= 1"),
        (["train", *train_args(assets, tmp / "r", **{"optim.lrr": 1})], "unknown config key 'optim.lrr'"),
        (["train", *train_args(assets, tmp / "a_file")], "is a file, not a directory"),
        (["train", *train_args(assets, tmp / "a_file" / "run")], "a_file is a file, so the directory cannot"),
        (["sft", *train_args(assets, tmp / "r", **{"optim.lr": -1})], "optim.lr=-1.0 must be > 0"),
        ([*ev, "--samples", "0"], "--samples=0 must be >= 1"),
        ([*ev, "--temperature", "-1"], "--temperature=-1.0 must be > 0"),
        ([*ev, "--top-p", "2"], "--top-p=2.0 must be in (0, 1]"),
        ([*ev, "--max-problems", "-1"], "--max-problems=-1 must be >= 0"),
        ([*ev, "--out", str(tmp / "a_file")], "--out=" + str(tmp / "a_file") + " is a file"),
        ([*ev, "--samples", "two"], "argument --samples: invalid int value: 'two'"),
        (["evaluate", "--model", str(tmp / "nope"), "--files", str(assets["test"])], "no config.json there"),
        (["plot", str(metrics_dir)], "not_a_run/metrics.jsonl:1: not a JSON row"),
        (["plot", str(tmp / "nope")], "does not exist"),
        (["convert", "hf-to-megatron", "--hf-dir", str(tmp / "nope"), "--out", str(tmp / "m")], "not a directory"),
        (["nonsense"], "unknown command 'nonsense'"),
        ([str(REPO / "tools" / "prepare_data.py"), str(tmp / "in.json"), str(tmp / "o.parquet"), "--limit", "-1"],
         "argument --limit: must be >= 0 (0: all), got -1"),
    ]


def test_bad_values_of_every_command_exit_2_with_one_line_and_create_nothing(assets, tmp_path):
    cases = bad_value_cases(assets, tmp_path)
    before = snapshot(tmp_path)
    for argv, needle in cases:
        proc = run(argv, tmp_path)
        assert_one_line_refusal(proc, needle)
        assert snapshot(tmp_path) == before, f"{argv[:2]} created or changed files"


# ------------------------------------------------------------------------------ run directories

def test_resuming_with_other_settings_is_refused_listing_them_and_nothing_changes(assets, dirs):
    before = snapshot(dirs["rl"])
    proc = run(["train", *train_args(assets, dirs["rl"], **{"train.steps": 2, "loss.name": "grpo", "optim.lr": 0.5,
                                                             "rollout.n": 6})], dirs["root"])
    assert_one_line_refusal(proc, "was trained with other settings (loss.name: 'real' -> 'grpo'; optim.lr: 2e-06 -> "
                                  "0.5; rollout.n: 4 -> 6)")
    assert "Rerun with the saved values" in proc.stderr
    assert snapshot(dirs["rl"]) == before


def test_asking_for_no_more_steps_than_done_is_nothing_to_do(assets, dirs):
    before = snapshot(dirs["rl"])
    proc = run(["train", *train_args(assets, dirs["rl"])], dirs["root"])  # train.steps=1, done 1
    assert_one_line_refusal(proc, "has 1 rollout steps done and train.steps=1: nothing to do", code=0)
    assert snapshot(dirs["rl"]) == before


def test_sft_never_writes_into_an_rl_directory_and_train_never_into_an_sft_one(assets, dirs):
    for job, target, needle in (("sft", "rl", "is a `real-megatron train` run directory; `real-megatron sft` never"),
                                ("train", "sft", "is a `real-megatron sft` run directory; `real-megatron train` never"),
                                ("sft", "sft", "already holds a finished SFT model")):
        before = snapshot(dirs[target])
        proc = run([job, *train_args(assets, dirs[target], **{"train.steps": 2})], dirs["root"])
        assert_one_line_refusal(proc, needle)
        assert snapshot(dirs[target]) == before, (job, target)


def test_evaluate_refuses_an_out_directory_with_results_before_evaluating(assets, dirs, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "results.json").write_text('{"precious": true}')
    before = snapshot(out)
    proc = run(["evaluate", "--model", str(dirs["sft"] / "hf"), "--files", str(assets["test"]), "--out", str(out)],
               tmp_path)
    assert_one_line_refusal(proc, "already holds results.json: nothing is overwritten")
    assert snapshot(out) == before


def test_evaluate_names_a_truncated_weights_file(assets, dirs, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(dirs["sft"] / "hf", broken)
    with open(broken / "model.safetensors", "r+b") as fh:
        fh.truncate(1000)
    proc = run(["evaluate", "--model", str(broken), "--files", str(assets["test"])], tmp_path)
    assert_one_line_refusal(proc, f"{broken / 'model.safetensors'}: header length")


def test_more_steps_extend_a_finished_run_and_say_so(assets, dirs, tmp_path):
    import shutil

    run_dir = tmp_path / "extend"
    shutil.copytree(dirs["rl"], run_dir)
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    proc = run(["train", *train_args(assets, run_dir, **{"train.steps": 2, "eval.samples": 3})], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"extending to train.steps=2 from {run_dir}/checkpoints/step_000001" in proc.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout_step"] for r in rows] == [1, 1, 2, 2] and rows[0] == first


def test_a_failed_first_rollout_step_leaves_a_directory_the_fixed_command_uses(assets, tmp_path, monkeypatch):
    """The first rollout batch fails: nothing was trained, so no checkpoint is written (a step-0 checkpoint could
    not be loaded back); the same command, fixed, then starts afresh in that directory."""
    from real_megatron.config import load_config
    from real_megatron.rollout import transformers_engine
    from real_megatron.trainer import RolloutFailed, train

    def broken(self, *a, **k):
        raise RuntimeError("engine crashed: out of memory")

    monkeypatch.setattr(transformers_engine.TransformersEngine, "generate", broken)
    run_dir = tmp_path / "run"
    try:
        with pytest.raises(RolloutFailed, match="rollout step 1 failed: .*out of memory. Nothing was trained, so no "
                                                "checkpoint was written; fix the cause and rerun the same command"):
            train(load_config(None, train_args(assets, run_dir)))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    assert not (run_dir / "checkpoints").exists()
    proc = run(["train", *train_args(assets, run_dir)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting afresh: no checkpoint to resume" in proc.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000001"


def test_ctrl_c_during_start_up_is_one_line_and_leaves_no_directory(assets, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "real_megatron", "train", *train_args(assets, run_dir)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    # interrupt once the run has said what runs where (its parts are built; training has not begun)
    lines, deadline = [], time.monotonic() + 240
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if "rollouts on rank 0:" in line or not line:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    stderr = "".join(lines) + err
    if proc.returncode == 0:  # the run finished before the signal landed: the start-up was too quick to test
        pytest.fail("the run finished before SIGINT arrived; make it longer")
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    if "stopped by signal" in out:  # it landed in the first rollout step: the trainer finished it and saved
        assert (run_dir / "checkpoints" / "latest").exists()
    else:  # before training: one line, and the directory this start created is gone
        assert "interrupted before training began; nothing was saved" in stderr, stderr[-2000:]
        assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())


def test_a_config_error_under_torchrun_is_said_once(assets, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "real_megatron",
           "train", *train_args(assets, tmp_path / "r", **{"optim.lr": -1})]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=ENV)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    said = [line for line in output.splitlines() if line.startswith("config error:")]
    assert said == ["config error: optim.lr=-1.0 must be > 0"], output[-3000:]
    # torchrun's own failure summary names it as the root cause; no traceback from a rank
    assert "traceback : config error: optim.lr=-1.0 must be > 0" in output
    assert "real_megatron/" not in "".join(line for line in output.splitlines() if line.startswith('  File "'))
    assert not (tmp_path / "r").exists()
