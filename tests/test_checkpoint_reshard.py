"""Resume on a different layout (real torchrun + gloo, tiny Qwen2, float32).

Every run trains on the same fixed mini-batch per step (``megatron_workers/reshard.py``), so a
resharded resume's steps are compared with an uninterrupted run AT THE NEW LAYOUT from the same
initial weights: losses within 1e-5 relative, final weights within 1e-5 of each tensor's largest
entry. Three torchrun launches serve every assertion here (a 1-process one that saves, a 2-process
one that saves at DP 2 / TP 2 / PP 2 and resumes 1-process checkpoints, a 1-process one that
resumes the 2-process checkpoints); each job builds its own model and optimizer.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # torchrun process groups and the real train command

WORKER = Path(__file__).parent / "megatron_workers" / "reshard.py"
RTOL = 1e-5
SAVE_AT, STEPS = 2, 4
DURATIONS: dict[str, float] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, jobs: list[dict], out: Path) -> dict:
    jobs = [{"save_at": SAVE_AT, "steps": STEPS, **job} for job in jobs]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), str(WORKER), "--jobs", json.dumps(jobs), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    DURATIONS[out.stem] = time.perf_counter() - t0
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("reshard")
    ck = {name: str(d / name) for name in ("one", "onedo", "dp2", "dp2do", "pp2", "tp2")}
    do = {"distributed_optimizer": True}
    results = launch(1, [{"name": "one", "save": ck["one"]}, {"name": "onedo", "save": ck["onedo"], **do}],
                     d / "one_process_saves.pt")
    results.update(launch(2, [
        {"name": "dp2", "save": ck["dp2"]},
        {"name": "dp2do", "save": ck["dp2do"], **do},
        {"name": "dp2do_from_onedo", "resume": ck["onedo"], **do},
        {"name": "pp2", "pp": 2, "save": ck["pp2"]},
        {"name": "tp2", "tp": 2, "save": ck["tp2"]},
        {"name": "tp2_from_one", "tp": 2, "resume": ck["one"]},
    ], d / "two_processes.pt"))
    results.update(launch(1, [
        {"name": "one_from_one", "resume": ck["one"]},
        {"name": "one_from_dp2", "resume": ck["dp2"]},
        {"name": "one_from_pp2", "resume": ck["pp2"]},
        {"name": "one_from_tp2", "resume": ck["tp2"]},
        {"name": "onedo_from_dp2do", "resume": ck["dp2do"], **do},
        {"name": "one_from_dp2_without_adam_state", "resume": ck["dp2"], "fresh_optimizer": True},
    ], d / "one_process_resumes.pt"))
    print(f"\nreshard launches (s): { {k: round(v, 1) for k, v in DURATIONS.items()} }")
    return {"results": results, "checkpoints": ck}


def max_weight_error(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    return max((got[k] - want[k]).abs().max().item() / want[k].abs().max().item() for k in want)


def assert_continues(resumed: dict, reference: dict) -> None:
    """The resumed job's steps SAVE_AT+1..STEPS equal the reference's, and so do the final weights."""
    assert sorted(resumed["losses"]) == list(range(SAVE_AT + 1, STEPS + 1))
    for step, loss in resumed["losses"].items():
        want = reference["losses"][step]
        assert abs(loss - want) <= RTOL * abs(want), f"step {step}: loss {loss} vs {want} uninterrupted"
        assert reference["grad_norms"][step] > 0
    err = max_weight_error(resumed["weights"], reference["weights"])
    assert err <= RTOL, f"final weights differ by {err:.2e} of a tensor's largest entry"


def assert_adam_steps_restored(resumed: dict) -> None:
    steps = resumed["loaded_steps"]
    assert steps["values"] == [float(SAVE_AT)] and steps["distinct"], steps


def test_reshard_dp2_to_dp1(runs):
    r = runs["results"]
    assert_continues(r["one_from_dp2"], r["one"])
    assert_adam_steps_restored(r["one_from_dp2"])


def test_reshard_tp1_to_tp2_and_back(runs):
    r = runs["results"]
    assert_continues(r["tp2_from_one"], r["tp2"])  # vocabulary padding 384 -> 512 rows
    assert_continues(r["one_from_tp2"], r["one"])


def test_reshard_pp2_to_pp1(runs):
    r = runs["results"]
    assert_continues(r["one_from_pp2"], r["one"])


def test_reshard_distributed_optimizer_dp2_to_dp1_and_back(runs):
    r = runs["results"]
    assert_continues(r["onedo_from_dp2do"], r["onedo"])
    assert_continues(r["dp2do_from_onedo"], r["dp2do"])
    for name in ("onedo_from_dp2do", "dp2do_from_onedo"):  # one Adam step tensor per parameter (README's bug)
        assert_adam_steps_restored(r[name])


def test_reshard_comparison_catches_a_resume_without_adam_state(runs):
    """The mutation the tests above must catch: weights resumed, optimizer state started fresh."""
    r = runs["results"]
    err = max_weight_error(r["one_from_dp2_without_adam_state"]["weights"], r["one"]["weights"])
    assert err > 100 * RTOL, err


def test_reshard_rng_streams_restored_only_at_the_same_layout(runs):
    r = runs["results"]
    assert torch.equal(r["one_from_one"]["rng_draw"], r["one"]["rng_draw"])
    assert_continues(r["one_from_one"], r["one"])
    assert not torch.equal(r["one_from_dp2"]["rng_draw"], r["dp2"]["rng_draw"])


def test_reshard_truncated_or_missing_shard_is_a_clear_error(runs, tmp_path):
    from real_megatron.checkpoint import CheckpointError, CheckpointManager

    run = tmp_path / "run"
    shutil.copytree(runs["checkpoints"]["dp2"], run)
    mgr = CheckpointManager(run)
    path = mgr.latest()
    shard = next((path / "state").glob("*.distcp"))
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size // 2)

    def never(_):
        raise AssertionError("the state must not be read from an incomplete checkpoint")

    layout = {"tp": 1, "pp": 1, "cp": 1, "dp": 1, "world_size": 1, "distributed_optimizer": False, "dtype": "float32"}
    with pytest.raises(CheckpointError, match=f"{shard.name} has .* bytes, the save wrote"):
        mgr.load(path, layout=layout, read_state=never)
    (path / "state" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"\.metadata is missing"):
        mgr.load(path, layout=layout, read_state=never)
    with pytest.raises(CheckpointError, match="optim.use_distributed_optimizer=False"):
        mgr.load(path, layout={**layout, "distributed_optimizer": True}, read_state=never)


def test_reshard_corrupt_state_file_is_a_clear_error(runs, tmp_path):
    """Same size, garbage bytes (what a size check cannot see): Megatron's reader fails, and the error
    names the state directory. In this process: a 1-process group, the tiny model."""
    sys.path.insert(0, str(WORKER.parent))
    from common import TINY_QWEN2

    from real_megatron.checkpoint import CheckpointError, CheckpointManager
    from real_megatron.megatron.dist_state import load_training_state
    from real_megatron.megatron.model import build_model, initialize_parallel
    from real_megatron.megatron.optimizer import build_optimizer

    run = tmp_path / "run"
    shutil.copytree(runs["checkpoints"]["one"], run)
    initialize_parallel(hf_config=TINY_QWEN2)
    chunks = build_model(TINY_QWEN2, transformer_impl="local", wrap_ddp=True)
    optimizer = build_optimizer(chunks, lr=1e-2)
    mgr = CheckpointManager(run)
    path = mgr.latest()
    common = path / "state" / "common.pt"
    common.write_bytes(b"\0" * common.stat().st_size)
    layout = {"tp": 1, "pp": 1, "cp": 1, "dp": 1, "world_size": 1, "distributed_optimizer": False, "dtype": "float32"}
    with pytest.raises(CheckpointError, match=f"{path / 'state'} could not be loaded"):
        mgr.load(path, layout=layout, read_state=lambda d: load_training_state(chunks, optimizer, d))


TRAIN = {"train.steps": 3, "train.eval_every": 0}  # 3 rollout steps = 6 optimizer steps; a checkpoint each


def train(assets, run_dir: Path, nproc: int = 1, **extra):
    from test_trainer import overrides, run_train

    t0 = time.perf_counter()
    proc = run_train(overrides(assets, run_dir, **{**TRAIN, **extra}), nproc=nproc)
    DURATIONS[f"train {run_dir.name} x{nproc}"] = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def train_reference(warm_assets, tmp_path_factory):
    """An uninterrupted one-process `train` run of 3 rollout steps (the rows every resume is held to)."""
    run_dir = tmp_path_factory.mktemp("train") / "reference"
    train(warm_assets, run_dir)
    return run_dir


def assert_rows_continue(run_dir: Path, reference: Path, resumed_after: int) -> None:
    from test_trainer import assert_learning_signal, close, deterministic, rows_of

    ref_rows, res_rows = rows_of(reference), rows_of(run_dir)
    assert [r["step"] for r in res_rows] == [r["step"] for r in ref_rows] == list(range(1, 7))
    assert_learning_signal([r for r in ref_rows if r["rollout_step"] > resumed_after])
    for a, b in zip(ref_rows, res_rows, strict=True):
        a, b = deterministic(a), deterministic(b)
        assert a.keys() == b.keys()
        resumed = a["rollout_step"] > resumed_after
        rel = RTOL if resumed else 1e-4  # before the resume: maybe another layout
        for key in a:
            if not resumed and key.startswith("hook/"):  # how the loss hook split the batch depends on the layout
                continue
            assert close(a[key], b[key], rel=rel), f"step {a['step']} {key}: {a[key]} vs {b[key]}"


def test_reshard_train_command_dp2_checkpoint_continues_in_one_process(warm_assets, train_reference, tmp_path):
    """The real `train` command end to end: 1 rollout step at DP 2 (torchrun), then the same run
    directory resumed by one process for 2 more; its metrics equal the uninterrupted one-process
    run's, the sampler's position and every rollout included (after the resume within 1e-5)."""
    moved = tmp_path / "moved"
    train(warm_assets, moved, nproc=2, **{"train.steps": 1})
    proc = train(warm_assets, moved)
    assert "resharded resume" in proc.stderr and "dp 2 -> 1" in proc.stderr, proc.stderr[-3000:]
    assert_rows_continue(moved, train_reference, resumed_after=1)
    print(f"\nreshard train runs (s): { {k: round(v, 1) for k, v in DURATIONS.items() if k.startswith('train')} }")


def test_reshard_bf16_state_round_trip_with_fp32_norm_weights(tmp_path):
    """bf16 parameters with fp32 masters, and fp32 RMSNorm weights beside them (the local spec's):
    a save, a load into a fresh model + optimizer and one more step equal two uninterrupted steps
    (Megatron's own mixed-precision sharded state mis-numbers the Adam states of such a model)."""
    sys.path.insert(0, str(WORKER.parent))
    from common import TINY_QWEN2, fixed_full_state_dict, fixed_samples

    from real_megatron.checkpoint import CheckpointManager
    from real_megatron.losses import build_loss
    from real_megatron.megatron.dist_state import load_training_state, save_training_state
    from real_megatron.megatron.model import build_model, initialize_parallel
    from real_megatron.megatron.optimizer import build_optimizer
    from real_megatron.megatron.policy import MegatronPolicy
    from real_megatron.megatron.sharding import gather_full_state_dict, load_full_state_dict

    initialize_parallel(hf_config=TINY_QWEN2)

    def fresh():
        chunks = build_model(TINY_QWEN2, transformer_impl="local", wrap_ddp=True, dtype=torch.bfloat16)
        load_full_state_dict(chunks[0], fixed_full_state_dict(TINY_QWEN2))
        optimizer = build_optimizer(chunks, lr=1e-2)
        return chunks, optimizer, MegatronPolicy(chunks, optimizer, loss=build_loss("real"), max_tokens_per_micro_batch=128)

    chunks, optimizer, policy = fresh()
    assert {p.dtype for p in chunks[0].parameters()} == {torch.bfloat16, torch.float32}
    policy.train_step(fixed_samples(seed=100))
    saved = gather_full_state_dict(chunks[0])
    mgr = CheckpointManager(tmp_path)
    layout = {"tp": 1, "pp": 1, "cp": 1, "dp": 1, "world_size": 1, "distributed_optimizer": False, "dtype": "bfloat16"}
    mgr.save(1, {"layout": layout}, lambda d: save_training_state(chunks, optimizer, d))
    policy.train_step(fixed_samples(seed=101))
    want = gather_full_state_dict(chunks[0])

    chunks, optimizer, policy = fresh()
    mgr.load(mgr.latest(), layout=layout, read_state=lambda d: load_training_state(chunks, optimizer, d))
    policy.train_step(fixed_samples(seed=101))
    got = gather_full_state_dict(chunks[0])
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert any(not torch.equal(want[name], saved[name]) for name in want)  # the step after the load moved weights
