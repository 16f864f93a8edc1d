"""The RL loop end to end on the tiny CPU setup: one process, torchrun DP=2, kill -9 + resume, faults.

Assets (task files, a tokenizer trained on the task, a tiny Qwen2 after a short supervised warm-up, so
rewards are mixed and gradients nonzero) are built once per session (tests/conftest.py) by the
demo's own builder and the real `sft` command; each run is a real `python -m real_megatron train`
subprocess (or torchrun), so process groups, signals and files are the real ones.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here runs the real train command (and the warm-up it needs)


@pytest.fixture(scope="module")
def assets(warm_assets):
    """Every run here starts from the warmed-up model, so losses and gradients are not all zero."""
    return warm_assets


REQUIRED_KEYS = {
    "step", "train/loss", "train/reward_mean", "train/solved_all_ratio", "train/solved_none_ratio", "train/entropy",
    "train/response_length_mean", "train/grad_norm", "time/rollout_s", "time/reward_s", "time/logprob_s",
    "time/update_s", "time/sync_s", "loss/contributing_group_fraction", "loss/max_score_weight",
    "hook/exact_mode", "hook/extra_forward", "hook/trained_rollout_fraction", "hook/micro_batches",
    "diag/grad_abs_sum_pos", "diag/grad_abs_sum_neg",
}


def overrides(assets, run_dir, **extra):
    values = {
        "run_dir": run_dir, "model.hf_dir": assets["base"], "data.train_files": f"[{assets['train']}]",
        "data.eval_files": f"[{assets['test']}]", "data.max_prompt_length": 64, "eval.max_prompts": 8,
        "eval.samples": 2, "eval.max_new_tokens": 8, "rollout.max_new_tokens": 8, "rollout.n": 4,
        "rollout.temperature": 1.0, "train.steps": 3, "train.rollout_batch_prompts": 4,
        "train.mini_batch_prompts": 2, "train.eval_every": 2,
        # packed rows of 128 positions: a group of 4 rollouts (up to 72 tokens each) may not fit one,
        # so runs use whole groups and the exact mode, several micro-batches, and both shortcuts
        "train.max_tokens_per_micro_batch": 128,
        "train.save_every": 1, "optim.lr": 1e-3, "reward.num_workers": 1, "logging.wandb_mode": "disabled",
        "logging.progress_bar": False, "seed": 11,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def train_cmd(args, nproc: int = 1):
    if nproc == 1:
        return [sys.executable, "-m", "real_megatron", "train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "real_megatron", "train", *args]


def run_train(args, nproc: int = 1, timeout: int = 300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(train_cmd(args, nproc), capture_output=True, text=True, timeout=timeout, env=env)
    return proc


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def deterministic(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time/")}


def assert_learning_signal(rows: list[dict]) -> None:
    """Some update had nonzero loss and gradient, so comparing runs is not comparing zeros."""
    updates = [r for r in rows if "train/grad_norm" in r]
    assert any(r["train/grad_norm"] > 0 and r["train/loss"] != 0 for r in updates), \
        [(r["step"], r["train/loss"], r["train/grad_norm"], r["train/reward_mean"]) for r in updates]


def close(a, b, rel=1e-5):
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-7)


def kill_9_after_checkpoint(args: list[str], run_dir: Path, env: dict, step: int = 2, timeout: float = 300) -> None:
    """Start ``train`` with ``args`` and SIGKILL it as soon as the checkpoint of rollout ``step`` is complete."""
    p = subprocess.Popen(train_cmd(args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + timeout
    while not (run_dir / "checkpoints" / f"step_{step:06d}" / "meta.json").exists():
        assert p.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()


def assert_same_rows(ref_rows: list[dict], rows: list[dict]) -> None:
    """Two runs logged the same optimizer steps with the same keys and values (``close``), timings aside."""
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    for a, b in zip(ref_rows, rows, strict=True):
        a, b = deterministic(a), deterministic(b)
        assert a.keys() == b.keys()
        for key in a:
            assert close(a[key], b[key]), f"step {a['step']} {key}: {a[key]} vs {b[key]}"


def test_train_one_process_logs_every_key_checkpoints_and_exports(assets, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(overrides(assets, run_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = rows_of(run_dir)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]  # 3 rollout steps x 2 mini-batches
    for row in train_rows:
        missing = REQUIRED_KEYS - set(row)
        assert not missing, f"step {row['step']} lacks {missing}"
        assert math.isfinite(row["train/loss"]) and 0.0 <= row["train/reward_mean"] <= 1.0
        assert row["train/entropy"] > 0
    evals = [r for r in rows if "eval/pass@1" in r]
    assert [r["step"] for r in evals] == [0, 4, 6]  # before training, rollout step 2, the end
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000003"
    assert (run_dir / "hf_final" / "config.json").exists()
    from real_megatron.plots import plot_run

    assert plot_run(run_dir).stat().st_size > 10_000


def test_kill_9_then_resume_matches_an_uninterrupted_run(assets, tmp_path):
    # lr 1e-4, not the module's 1e-3: at 1e-3 this tiny policy collapses to reward 0 by rollout step 3,
    # and the steps after the kill point would then compare all-zero losses and gradients
    settings = {"train.steps": 4, "train.eval_every": 0, "optim.lr": 1e-4}
    reference = tmp_path / "reference"
    proc = run_train(overrides(assets, reference, **settings))
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed = tmp_path / "killed"
    args = overrides(assets, killed, **settings)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    kill_9_after_checkpoint(args, killed, env)
    proc = run_train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr + proc.stdout

    ref_rows, res_rows = rows_of(reference), rows_of(killed)
    assert_learning_signal([r for r in ref_rows if r["rollout_step"] > 2])  # after the kill point
    assert_same_rows(ref_rows, res_rows)


def test_fused_output_false_logs_the_same_rows(assets, tmp_path):
    # model.fused_output=false (Megatron's output layer + logprobs.py) against the default (log-probs
    # from the output layer's input, no logits): every logged number of 2 rollout steps (4 updates,
    # exact mode, old log-probs, the second batch sampled from the updated weights) within 1e-5
    settings = {"train.steps": 2, "train.eval_every": 0}
    rows = {}
    for fused in ("true", "false"):
        run_dir = tmp_path / f"fused_{fused}"
        proc = run_train(overrides(assets, run_dir, **settings, **{"model.fused_output": fused}))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        rows[fused] = [deterministic(r) for r in rows_of(run_dir)]
    assert_learning_signal(rows["true"])
    assert [r["step"] for r in rows["true"]] == [r["step"] for r in rows["false"]] == [1, 2, 3, 4]
    worst = (0.0, None)
    for a, b in zip(rows["true"], rows["false"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert close(a[key], b[key]), f"step {a['step']} {key}: {a[key]} (fused) vs {b[key]} (unfused)"
            if isinstance(b[key], float) and abs(b[key]) > 1e-4:  # below, close()'s absolute 1e-7 decides
                worst = max(worst, (abs(a[key] - b[key]) / abs(b[key]), key), key=lambda w: w[0])
    print(f"fused vs unfused metric rows: largest relative difference {worst[0]:.1e} ({worst[1]}) of the values "
          "above 1e-4")


@pytest.fixture(scope="module")
def one_process_run(assets, tmp_path_factory):
    one = tmp_path_factory.mktemp("one") / "run"
    proc = run_train(overrides(assets, one, **{"train.steps": 1, "train.eval_every": 0}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return one


@pytest.mark.parametrize("layout", [{}, {"parallel.tp": 2}, {"parallel.pp": 2}], ids=["dp2", "tp2", "pp2"])
def test_torchrun_2_processes_match_one_process(assets, tmp_path, layout, one_process_run):
    one = one_process_run
    two = tmp_path / "two"
    common = {"train.steps": 1, "train.eval_every": 0}
    proc = run_train(overrides(assets, two, **common, **layout), nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a_rows, b_rows = rows_of(one), rows_of(two)
    assert len(a_rows) == len(b_rows) == 2
    assert_learning_signal(a_rows)
    for a, b in zip(a_rows, b_rows, strict=True):
        for key in ("train/loss", "train/reward_mean", "train/entropy", "train/grad_norm", "loss/max_score_weight"):
            assert close(a[key], b[key], rel=1e-4), f"{key}: {a[key]} (1 process) vs {b[key]} ({layout or 'DP=2'})"


def test_configs_that_cannot_work_fail_before_anything_starts(assets, tmp_path):
    cases = [
        ({"rollout.n": 1}, "so each prompt needs rollout.n >= 2"),
        ({"train.rollout_batch_prompts": 4, "train.mini_batch_prompts": 3}, "not divisible"),
        ({"rollout.max_new_tokens": 4000}, "exceeds the model's context"),
        ({"data.train_files": "[missing.parquet]"}, "does not exist"),
        ({"parallel.tp": 3}, "parallel.tp=3"),
        ({"train.max_tokens_per_micro_batch": 64}, "set train.max_tokens_per_micro_batch >= 72"),
    ]
    for extra, message in cases:
        run_dir = tmp_path / f"bad{len(message)}"
        proc = run_train(overrides(assets, run_dir, **extra), timeout=120)
        assert proc.returncode == 2, (extra, proc.stdout[-2000:], proc.stderr[-2000:])
        assert message in proc.stderr, (extra, proc.stderr[-2000:])
        assert not run_dir.exists()  # refused before anything was written


def test_rollout_engine_failure_saves_then_fails_clearly(assets, tmp_path, monkeypatch):
    from real_megatron.config import load_config
    from real_megatron.rollout import transformers_engine
    from real_megatron.trainer import RolloutFailed, train

    calls = {"n": 0}
    real_generate = transformers_engine.TransformersEngine.generate

    def flaky(self, *a, **k):  # the second rollout batch dies (e.g. the engine's GPU fell over)
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("engine crashed: CUDA error: an illegal memory access")
        return real_generate(self, *a, **k)

    monkeypatch.setattr(transformers_engine.TransformersEngine, "generate", flaky)
    run_dir = tmp_path / "run"
    cfg = load_config(None, overrides(assets, run_dir, **{"train.eval_every": 0, "train.save_every": 10}))
    try:
        with pytest.raises(RolloutFailed, match="illegal memory access.*rerun the same command to resume"):
            train(cfg)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000001"


def test_bf16_run_trains_the_loaded_weights_not_the_random_init(assets, tmp_path):
    # bf16 params: Megatron's optimizer keeps fp32 master copies made when it is built; the initial
    # weights must be in the model by then, or the first step writes the random init back
    from safetensors.torch import load_file

    run_dir = tmp_path / "bf16"
    proc = run_train(overrides(assets, run_dir, **{"model.dtype": "bfloat16", "train.steps": 1, "optim.lr": 1e-7,
                                                   "train.eval_every": 0}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = {}
    for f in Path(assets["base"]).glob("*.safetensors"):
        base.update(load_file(f))
    final = {}
    for f in (run_dir / "hf_final").glob("*.safetensors"):
        final.update(load_file(f))
    assert final.keys() == base.keys()
    for name, tensor in base.items():
        got, want = final[name].float(), tensor.bfloat16().float()
        err = ((got - want).abs() / want.abs().clamp_min(1e-2)).max().item()
        assert err < 0.02, f"{name}: the trained model is not the loaded one (relative change {err:.3g})"


@pytest.mark.parametrize("sync", ["distributed", "tensor"])
def test_trainer_drives_a_real_sglang_server(assets, sglang_server, tmp_path, sync):
    """The trainer with rollout.engine=sglang against a REAL SGLang 0.5.23 server (conftest.sglang_server):
    rollouts over HTTP, memory release/resume around every update, weights in 1 MB buckets either
    broadcast in a gloo group (distributed) or handed over as shared-memory tensors (tensor,
    colocated). Afterwards the server serves exactly hf_final: its greedy continuations and their
    log-probs equal transformers' loaded from hf_final."""
    import socket

    import torch
    from safetensors.torch import load_file

    from real_megatron.rollout.base import SamplingParams
    from real_megatron.rollout.sglang_engine import SGLangEngine

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        group_port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    args = overrides(assets, run_dir, **{
        "train.steps": 2, "train.eval_every": 0, "rollout.engine": "sglang", "rollout.sglang_urls": sglang_server.url,
        "rollout.sglang_weight_sync": sync, "rollout.sglang_master_port": group_port,
        "rollout.sglang_release_memory": "true", "rollout.weight_bucket_mb": 1})
    # output to a file, not a pipe: with tensor sync on the CPU the trainer starts torch's
    # torch_shm_manager daemon, which inherits its stdout/stderr and lives while the server still
    # maps the shared weights, so a pipe would never reach EOF
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        code = subprocess.run(train_cmd(args), stdout=out, stderr=subprocess.STDOUT, timeout=900,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}).returncode
    assert code == 0, log.read_text()[-3000:] + "\nserver log:\n" + sglang_server.log_tail()
    final = load_file(run_dir / "hf_final" / "model.safetensors")
    sglang_server.weights = final
    base = load_file(assets["base"] / "model.safetensors")
    assert any(not torch.equal(final[n], base[n]) for n in final)  # training changed the weights

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_sglang_real import PROMPTS, Reference

    engine = SGLangEngine(sglang_server.url, eos_token_id=sglang_server.eos)
    got = engine.generate(PROMPTS, 1, SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=12))
    want = Reference(run_dir / "hf_final", sglang_server.eos).greedy(final, PROMPTS, 12)
    for c, (ids, lps) in zip(got, want, strict=True):
        assert c.token_ids == ids
        assert c.logprobs is None or torch.allclose(torch.tensor(c.logprobs), torch.tensor(lps), atol=1e-3)
    rows = rows_of(run_dir)
    assert [r["rollout_step"] for r in rows] == [1, 1, 2, 2]  # two mini-batches per rollout step
    # engine vs trainer log-probs of the same sampled tokens (fp32 both): reported, and small
    diffs = [r["rollout/logprob_abs_diff_mean"] for r in rows]
    print(f"rollout/logprob_abs_diff_mean ({sync}): {diffs}")
    assert all(0 <= d < 1e-3 for d in diffs), diffs


def test_distributed_optimizer_resume_matches_an_uninterrupted_run(assets, tmp_path):
    """DP=2 with optim.use_distributed_optimizer: Megatron's state_dict() leaves out each rank's
    fp32 master / Adam shards; without them the first step after a resume wrote NaN weights."""
    import torch
    from safetensors.torch import load_file

    common = {"train.eval_every": 0, "optim.use_distributed_optimizer": "true"}
    reference, split = tmp_path / "reference", tmp_path / "split"
    for run_dir, steps in ((reference, 2), (split, 1), (split, 2)):
        proc = run_train(overrides(assets, run_dir, **{"train.steps": steps, **common}), nproc=2)
        assert proc.returncode == 0, proc.stderr[-3000:]
    ref_rows, res_rows = rows_of(reference), rows_of(split)
    assert_learning_signal([r for r in ref_rows if r["rollout_step"] > 1])  # after the resume point
    assert [r["step"] for r in res_rows] == [r["step"] for r in ref_rows] == [1, 2, 3, 4]
    for a, b in zip(ref_rows, res_rows, strict=True):
        a, b = deterministic(a), deterministic(b)
        assert a.keys() == b.keys()
        for key in a:
            assert close(a[key], b[key]), f"step {a['step']} {key}: {a[key]} vs {b[key]}"
    assert res_rows[-1]["train/skipped_steps"] == 0
    want, got = (load_file(reference / "hf_final" / "model.safetensors"),
                 load_file(split / "hf_final" / "model.safetensors"))
    for name, tensor in want.items():
        assert torch.isfinite(got[name]).all() and torch.allclose(got[name], tensor, rtol=1e-6, atol=1e-7), name
