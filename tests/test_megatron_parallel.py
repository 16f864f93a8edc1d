"""Exactness of the REAL loss hook under every supported parallel layout (real torchrun + gloo).

For a fixed mini-batch (5 groups of sizes 3, 4, 2, 5, 2, different prompt and response lengths, one
all-correct group) and fixed initial weights, the loss, every parameter's gradient (gathered to
full shape) and the weight change of one optimizer step must match the single-process run with one
micro-batch. Tolerance: 1e-5 of each tensor's largest entry (float32).

The optimizer in the worker uses Adam with eps = 1 and lr = 10: with a small eps, Adam's first step
is ≈ lr·sign(g), which turns float32 round-off in near-zero gradient entries into whole-lr
differences; eps = 1 keeps the step linear in the gradient so the comparison tests the layout, not
sign(±1e-12).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # every test here starts torchrun process groups

WORKER = Path(__file__).parent / "megatron_workers" / "exactness.py"
CP_WORKER = Path(__file__).parent / "megatron_workers" / "cp_loss.py"
RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(tmp_path: Path, nproc: int, *args: str, worker: Path = WORKER) -> dict:
    out = tmp_path / f"result-{nproc}-{'-'.join(a.strip('-') for a in args) or 'ref'}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if nproc == 1:
        cmd = [sys.executable, str(worker), *args, "--out", str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(worker), *args, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out, weights_only=False)


def assert_close_tensors(result: dict, reference: dict, key: str) -> None:
    assert result[key].keys() == reference[key].keys()
    for name, ref in reference[key].items():
        got = result[key][name]
        assert got.shape == ref.shape, name
        scale = ref.abs().max().item()
        assert scale > 0, f"{key}[{name}] is all zero in the reference: the check would be vacuous"
        err = (got - ref).abs().max().item() / scale
        assert err <= RTOL, f"{key}[{name}]: max error {err:.2e} of its largest entry (> {RTOL})"


def assert_matches(result: dict, reference: dict) -> None:
    ref_loss, loss = reference["metrics"]["loss"], result["metrics"]["loss"]
    assert abs(loss - ref_loss) <= RTOL * abs(ref_loss), (loss, ref_loss)
    assert_close_tensors(result, reference, "grads")
    assert_close_tensors(result, reference, "deltas")
    assert result["metrics"]["skipped"] == 0.0


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("megatron_parallel")


@pytest.fixture(scope="module")
def reference(workdir):
    ref = run_layout(workdir, 1)
    assert ref["metrics"]["hook/exact_mode"] == 0.0
    return ref


@pytest.mark.parametrize("micro_batch_rollouts, micro_batches", [(10, 2), (5, 4)])
def test_micro_batch_counts(workdir, reference, micro_batch_rollouts, micro_batches):
    result = run_layout(workdir, 1, "--micro-batch-rollouts", str(micro_batch_rollouts))
    assert result["metrics"]["hook/exact_mode"] == 0.0  # groups stayed whole
    assert_matches(result, reference)


def test_group_split_across_micro_batches_exact_mode(workdir, reference):
    # micro-batches of 4 rollouts cannot hold the group of 5: exact mode (w_k = ∂L/∂s̄_k)
    result = run_layout(workdir, 1, "--micro-batch-rollouts", "4")
    assert result["metrics"]["hook/exact_mode"] == 1.0
    assert_matches(result, reference)


def test_tensor_parallel_2(workdir, reference):
    assert_matches(run_layout(workdir, 2, "--tp", "2"), reference)


def test_pipeline_parallel_2(workdir, reference):
    result = run_layout(workdir, 2, "--pp", "2", "--micro-batch-rollouts", "5")  # 4 micro-batches through 2 stages
    assert_matches(result, reference)


def test_data_parallel_2_whole_groups(workdir, reference):
    result = run_layout(workdir, 2, "--micro-batch-rollouts", "5")
    assert result["metrics"]["hook/exact_mode"] == 0.0
    assert_matches(result, reference)


def test_distributed_optimizer_under_data_parallel_2(workdir, reference):
    # Megatron's distributed optimizer (optimizer state sharded over DP ranks) takes the same step.
    # Its gradients are reduce-scattered (each rank keeps only its shard's reduced gradient), so the
    # check is the loss, the grad norm and the weight change, not per-rank gradient buffers.
    result = run_layout(workdir, 2, "--micro-batch-rollouts", "5", "--distributed-optimizer")
    ref_loss, loss = reference["metrics"]["loss"], result["metrics"]["loss"]
    assert abs(loss - ref_loss) <= RTOL * abs(ref_loss), (loss, ref_loss)
    ref_norm, norm = reference["metrics"]["grad_norm"], result["metrics"]["grad_norm"]
    assert abs(norm - ref_norm) <= 1e-4 * ref_norm, (norm, ref_norm)
    assert_close_tensors(result, reference, "deltas")
    assert result["metrics"]["skipped"] == 0.0


def test_group_split_across_data_parallel_ranks(workdir, reference):
    result = run_layout(workdir, 2, "--force-exact")  # 8 | 8 rollouts: group 2 straddles the ranks
    assert result["metrics"]["hook/exact_mode"] == 1.0
    assert_matches(result, reference)


def test_tensor_2_x_data_2(workdir, reference):
    assert_matches(run_layout(workdir, 4, "--tp", "2", "--micro-batch-rollouts", "5"), reference)


@pytest.mark.parametrize("loss", ["grpo", "dapo"])
def test_token_level_losses_under_data_parallel_with_straddling_groups(workdir, loss):
    ref = run_layout(workdir, 1, "--loss", loss)
    # micro-batches of 3 rollouts: groups straddle micro-batches and ranks; advantages are global
    assert_matches(run_layout(workdir, 2, "--loss", loss, "--micro-batch-rollouts", "3"), ref)


def test_tied_embeddings_under_pipeline_parallel(workdir):
    ref = run_layout(workdir, 1, "--tied")
    assert "output_layer.weight" not in ref["grads"]
    assert_matches(run_layout(workdir, 2, "--tied", "--pp", "2"), ref)


def test_context_parallel_2_loss_path(workdir):
    result = run_layout(workdir, 2, worker=CP_WORKER)
    for loss, (err_loss, err_grad) in result.items():
        assert err_loss <= RTOL and err_grad <= RTOL, (loss, err_loss, err_grad)
