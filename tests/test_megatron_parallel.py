"""Exactness of the loss hook and packed micro-batches under every supported layout (real torchrun + gloo).

For a fixed mini-batch (5 groups of sizes 3, 4, 2, 5, 2, different prompt and response lengths, one
all-correct group) and fixed initial weights, the loss, every parameter's gradient (gathered to
full shape), the weight change of one optimizer step and its logged size must match the *unpacked*
reference: each rollout run through the model alone and the loss library's ``policy_loss`` over all of
them (no planner, no packing, no hook). Tolerance: 1e-5 of each tensor's largest entry (float32).

The optimizer in the worker uses Adam with eps = 1 and lr = 10: with a small eps, Adam's first step
is ≈ lr·sign(g), which turns float32 round-off in near-zero gradient entries into whole-lr
differences; eps = 1 keeps the step linear in the gradient so the comparison tests the layout, not
sign(±1e-12).

The policy runs with ``model.fused_output``'s default (log-probs by ``fused_output.py``, no logits);
``test_fused_output_equals_megatrons_output_layer`` runs a set of layouts both ways and compares them
(loss and metrics to 1e-6, gradients and the step's weight change by norm to 1e-6 and by largest entry to
2e-6: see tests/test_fused_output.py's docstring for why float32 gradients get 2e-6 there).
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
    """The worker's result for this layout; one already run into ``tmp_path`` is read back (the runs are
    deterministic), so a layout shared by two tests costs one run."""
    out = tmp_path / f"result-{worker.stem}-{nproc}-{'-'.join(a.strip('-') for a in args) or 'ref'}.pt"
    if out.exists():
        return torch.load(out, weights_only=False)
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


def assert_update_size(result: dict, reference: dict) -> None:
    """The step's logged size (``logging.update_size``: each rank's shards, reduced over the model-parallel
    group) equals the single-process run's and ‖Δθ‖/‖θ‖ of the gathered full weights."""
    logged, ref = result["metrics"]["diag/update_rel_norm"], reference["metrics"]["diag/update_rel_norm"]
    full = torch.sqrt(sum(d.double().pow(2).sum() for d in result["deltas"].values())).item() / result["initial_norm"]
    assert ref > 0 and abs(logged - ref) <= RTOL * ref and abs(logged - full) <= RTOL * full, (logged, ref, full)


def assert_matches(result: dict, reference: dict) -> None:
    ref_loss, loss = reference["metrics"]["loss"], result["metrics"]["loss"]
    assert abs(loss - ref_loss) <= RTOL * abs(ref_loss), (loss, ref_loss)
    assert_close_tensors(result, reference, "grads")
    assert_close_tensors(result, reference, "deltas")
    assert_update_size(result, reference)
    assert result["metrics"]["skipped"] == 0.0


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("megatron_parallel")


@pytest.fixture(scope="module")
def reference(workdir):
    """Every rollout through the model alone, the loss library on top: no planner, no packed rows."""
    return run_layout(workdir, 1, "--unpacked")


def test_one_packed_row_equals_each_rollout_alone(workdir, reference):
    result = run_layout(workdir, 1)  # budget 512: the whole mini-batch in one row
    assert result["metrics"]["hook/exact_mode"] == 0.0 and result["metrics"]["hook/micro_batches"] == 1
    assert_matches(result, reference)


@pytest.mark.parametrize("budget, micro_batches", [(100, 2), (80, 3)])
def test_several_packed_micro_batches_with_whole_groups(workdir, reference, budget, micro_batches):
    result = run_layout(workdir, 1, "--budget", str(budget))
    assert result["metrics"]["hook/exact_mode"] == 0.0  # groups stayed whole
    assert result["metrics"]["hook/micro_batches"] == micro_batches
    assert_matches(result, reference)


def test_group_split_across_micro_batches_exact_mode(workdir, reference):
    # 40 positions cannot hold the 79-token group: exact mode (w_k = ∂L/∂s̄_k)
    result = run_layout(workdir, 1, "--budget", "40")
    assert result["metrics"]["hook/exact_mode"] == 1.0 and result["metrics"]["hook/extra_forward"] == 1.0
    assert result["metrics"]["hook/micro_batches"] >= 5
    assert_matches(result, reference)


def test_tensor_parallel_2(workdir, reference):
    assert_matches(run_layout(workdir, 2, "--tp", "2", "--budget", "64"), reference)


def test_pipeline_parallel_2(workdir, reference):
    result = run_layout(workdir, 2, "--pp", "2", "--budget", "40")  # 5+ fixed-length rows through 2 stages
    assert result["metrics"]["hook/micro_batches"] >= 5
    assert_matches(result, reference)


def test_data_parallel_2_whole_groups(workdir, reference):
    result = run_layout(workdir, 2, "--budget", "80")
    assert result["metrics"]["hook/exact_mode"] == 0.0
    assert_matches(result, reference)


def test_distributed_optimizer_under_data_parallel_2(workdir, reference):
    # Megatron's distributed optimizer (optimizer state sharded over DP ranks) takes the same step.
    # Its gradients are reduce-scattered (each rank keeps only its shard's reduced gradient), so the
    # check is the loss, the grad norm and the weight change, not per-rank gradient buffers.
    result = run_layout(workdir, 2, "--budget", "80", "--distributed-optimizer")
    ref_loss, loss = reference["metrics"]["loss"], result["metrics"]["loss"]
    assert abs(loss - ref_loss) <= RTOL * abs(ref_loss), (loss, ref_loss)
    ref_norm, norm = reference["metrics"]["grad_norm"], result["metrics"]["grad_norm"]
    assert abs(norm - ref_norm) <= 1e-4 * ref_norm, (norm, ref_norm)
    assert_close_tensors(result, reference, "deltas")
    assert_update_size(result, reference)
    assert result["metrics"]["skipped"] == 0.0


def test_group_split_across_data_parallel_ranks(workdir, reference):
    result = run_layout(workdir, 2, "--force-exact")  # rollouts balanced one by one: groups straddle the ranks
    assert result["metrics"]["hook/exact_mode"] == 1.0
    assert_matches(result, reference)


def test_tensor_2_x_data_2(workdir, reference):
    assert_matches(run_layout(workdir, 4, "--tp", "2", "--budget", "80"), reference)


@pytest.mark.parametrize("loss", ["real_bce", "real_no_anchor", "gspo", "grpo", "dapo"])
def test_every_loss_packed_across_micro_batches_and_ranks_equals_unpacked(workdir, loss):
    ref = run_layout(workdir, 1, "--loss", loss, "--unpacked")
    # 32-position rows: groups straddle micro-batches and ranks (REAL family: exact mode)
    result = run_layout(workdir, 2, "--loss", loss, "--budget", "32")
    assert result["metrics"]["hook/micro_batches"] >= 6
    assert_matches(result, ref)


def test_tied_embeddings_under_pipeline_parallel(workdir):
    ref = run_layout(workdir, 1, "--tied", "--unpacked")
    assert "output_layer.weight" not in ref["grads"]
    assert_matches(run_layout(workdir, 2, "--tied", "--pp", "2", "--budget", "64"), ref)


@pytest.mark.parametrize("loss", ["real", "grpo"])
def test_skipping_zero_gradient_rollouts_changes_nothing(workdir, loss):
    # group 2 is all-correct: REAL's uniform group and GRPO's zero-advantage group carry no gradient
    skipped = run_layout(workdir, 2, "--loss", loss, "--budget", "40")
    assert skipped["metrics"]["hook/trained_rollout_fraction"] == 14 / 16
    everything = run_layout(workdir, 2, "--loss", loss, "--budget", "40", "--no-skip")
    assert everything["metrics"]["hook/trained_rollout_fraction"] == 1.0
    assert_matches(skipped, everything)
    if loss == "real":  # the skipped group still counts in the denominator and the group metrics
        assert skipped["metrics"]["loss/num_groups"] == 5.0 and skipped["metrics"]["loss/solved_all_groups"] == 1.0


def test_skipping_the_fresh_exact_mode_forward_changes_nothing(workdir):
    # old log-probs from this very model: s̄ = 0, w = ∂L/∂s̄ in closed form, no extra forward
    skipped = run_layout(workdir, 1, "--fresh", "--budget", "40")
    assert skipped["metrics"]["hook/exact_mode"] == 1.0 and skipped["metrics"]["hook/extra_forward"] == 0.0
    paid = run_layout(workdir, 1, "--fresh", "--budget", "40", "--no-fresh-skip")
    assert paid["metrics"]["hook/extra_forward"] == 1.0
    assert_matches(skipped, paid)


@pytest.mark.parametrize("fused_output", ["false", "true"])
def test_context_parallel_2_loss_path(workdir, fused_output):
    # fused: the hook gets hidden states and computes log-probs with fused_output.py (float64 here)
    result = run_layout(workdir, 2, "--fused-output", fused_output, worker=CP_WORKER)
    assert {"real-kl_coef=0.3", "real-kl_coef=0.3-kl_target=old", "grpo-kl_coef=0.3"} <= set(result)  # KL cases
    for loss, (err_loss, err_grad) in result.items():
        assert err_loss <= RTOL and err_grad <= RTOL, (loss, err_loss, err_grad)


@pytest.mark.parametrize("loss, hparams, ref_seed", [
    ("grpo", '{"kl_coef": 0.3}', "1"),
    ("real", '{"kl_coef": 0.3}', "1"),
    ("real", '{"kl_coef": 0.3, "kl_target": "old"}', None),
])
def test_kl_term_exact_under_data_and_tensor_parallel(workdir, loss, hparams, ref_seed):
    # reference model: frozen weights of another seed (so the KL and its gradient are far from 0), its
    # log-probs from the packed forward-only pass under each layout, vs each rollout alone in the reference
    args = ["--loss", loss, "--hparams", hparams, *(["--ref-seed", ref_seed] if ref_seed else [])]
    reference = run_layout(workdir, 1, *args, "--unpacked")
    assert reference["metrics"]["loss/kl"] > 0.05
    data = run_layout(workdir, 2, *args, "--budget", "32")  # groups split over micro-batches and ranks
    tensor = run_layout(workdir, 2, *args, "--tp", "2")  # whole groups in one micro-batch
    assert data["metrics"]["hook/trained_rollout_fraction"] == 1.0  # the all-correct group's KL has a gradient
    if loss == "real":
        assert data["metrics"]["hook/exact_mode"] == 1.0 and tensor["metrics"]["hook/exact_mode"] == 0.0
    for result in (data, tensor):
        assert_matches(result, reference)
        kl, ref_kl = result["metrics"]["loss/kl"], reference["metrics"]["loss/kl"]
        assert abs(kl - ref_kl) <= RTOL * ref_kl, (kl, ref_kl)


# model.fused_output: the same layout through the fused op (the default) and through Megatron's output
# layer + logprobs.py. One process with groups split over micro-batches (exact mode, its extra forward and
# the old log-probs' forward), TP = 2, PP = 2 with tied embeddings (the last stage's copy of the embedding),
# DP = 2 with groups straddling the ranks, and a KL to a frozen reference model (its forward) at DP = 2.
# CP = 2 is test_context_parallel_2_loss_path[true] (CP attention needs Transformer Engine).
FUSED_LAYOUTS = {
    "one-process-exact": (1, "--budget", "40"),
    "tp2": (2, "--tp", "2", "--budget", "64"),
    "pp2-tied": (2, "--tied", "--pp", "2", "--budget", "64"),
    "dp2-split-groups": (2, "--force-exact"),
    "dp2-kl-reference": (2, "--loss", "real", "--hparams", '{"kl_coef": 0.3}', "--ref-seed", "1", "--budget", "32"),
}
FUSED_RTOL, FUSED_MAX_ENTRY = 1e-6, 2e-6


def fused_errors(fused: dict, unfused: dict) -> dict:
    """Largest relative differences: metrics, and per tensor kind the norm-wise and largest-entry ones."""
    errors = {"metrics": max(abs(fused["metrics"][k] - v) / max(abs(v), 1e-12) for k, v in unfused["metrics"].items()
                             if isinstance(v, float) and v == v)}
    for key in ("grads", "deltas"):
        assert fused[key].keys() == unfused[key].keys()
        pairs = [(fused[key][k], unfused[key][k]) for k in unfused[key]]
        assert all(ref.abs().max() > 0 for _, ref in pairs), f"an all-zero {key} tensor: the check would be vacuous"
        errors[f"{key}/norm"] = max(((got - ref).norm() / ref.norm()).item() for got, ref in pairs)
        errors[f"{key}/max"] = max(((got - ref).abs().max() / ref.abs().max()).item() for got, ref in pairs)
    return errors


@pytest.mark.parametrize("layout", FUSED_LAYOUTS)
def test_fused_output_equals_megatrons_output_layer(workdir, layout):
    nproc, *args = FUSED_LAYOUTS[layout]
    fused = run_layout(workdir, nproc, *args)  # shared with the layout's own test above when both run
    unfused = run_layout(workdir, nproc, *args, "--fused-output", "false")
    assert fused["metrics"].keys() == unfused["metrics"].keys()
    assert fused["metrics"]["skipped"] == 0.0
    if layout == "one-process-exact":
        assert fused["metrics"]["hook/extra_forward"] == 1.0
    errors = fused_errors(fused, unfused)
    print(f"fused vs unfused, {layout}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors["metrics"], errors["grads/norm"], errors["deltas/norm"]) <= FUSED_RTOL, errors
    assert errors["grads/max"] <= FUSED_MAX_ENTRY and errors["deltas/max"] <= FUSED_MAX_ENTRY, errors
