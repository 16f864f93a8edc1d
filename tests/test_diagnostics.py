"""The gradient diagnostics (``diag/*``): hand-computed cases of the pure functions, the capture in the
hook leaving the gradient alone, and the live metrics identical under every layout (real torchrun + gloo).

The layout tests compare against a reference that shares no code path with the hook: each rollout
run through the model alone, the loss library's loss, autograd's ∂L/∂log π_t, and the pure functions
of ``losses/diagnostics.py`` on top. Old log-probs put every token's ratio in the middle of a bin
(0.5, 0.9, 1.0, 1.1 or 1.5), so float round-off between layouts cannot move a token across an edge.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from real_megatron.losses import policy_loss, score_weights
from real_megatron.losses.diagnostics import (
    RATIO_BIN_NAMES,
    ratio_bin_counts,
    ratio_fractions,
    score_weight_stats,
    top_count,
    top_share,
)
from real_megatron.megatron.diag_capture import reduce_diagnostics, watch_tokens

# ---------------------------------------------------------------- pure functions, by hand


def test_ratio_bins_by_hand_with_edges_going_up():
    ratios = torch.tensor([0.1, 0.7999, 0.8, 0.9, 0.95, 1.0, 1.0499, 1.05, 1.1999, 1.2, 3.0], dtype=torch.float64)
    counts = ratio_bin_counts(ratios.log())
    # [0,0.8): 0.1, 0.7999 | [0.8,0.95): 0.8, 0.9 | [0.95,1.05): 0.95, 1.0, 1.0499 | [1.05,1.2): 1.05, 1.1999 | 1.2, 3
    assert counts.tolist() == [2, 2, 3, 2, 2]
    fractions = ratio_fractions(counts)
    assert fractions["ratio_tokens"] == 11
    assert fractions["ratio_bin_0.95_1.05"] == 3 / 11
    assert math.isclose(sum(fractions[name] for name in RATIO_BIN_NAMES), 1.0)
    assert ratio_fractions(torch.zeros(5)) == {}


def test_top_count_is_one_percent_rounded_up_in_integers():
    assert [top_count(n) for n in (1, 99, 100, 101, 700, 1000)] == [1, 1, 1, 2, 7, 10]


def test_top_share_by_hand_counting_absent_tokens_as_zeros():
    grads = torch.tensor([4.0, 1.0, 1.0, 2.0])
    assert top_share(grads, 4) == 4.0 / 8.0  # top 1 of 4
    assert top_share(grads, 150) == 6.0 / 8.0  # top 2 of 150 (146 tokens with gradient 0)
    # candidates only (each rank's own top values) with the population's total given
    assert top_share(torch.tensor([4.0, 2.0]), 150, total=8.0) == 6.0 / 8.0
    assert top_share(torch.zeros(3), 3) is None and top_share(torch.ones(2), 0) is None
    with pytest.raises(ValueError, match="absolute"):
        top_share(torch.tensor([-1.0]), 1)


def test_score_weight_stats_by_hand():
    tau = 0.5  # bound 1/τ = 2, "near" = ≥ 1.8
    weights = torch.tensor([-1.9, 0.5, 1.8, 2.0, 0.0], dtype=torch.float64)  # 1.8 = 0.9/τ exactly: counts
    contributing = torch.tensor([True, True, True, False, False])
    stats = score_weight_stats(weights, contributing, tau)
    assert stats == {"score_weight_max": pytest.approx(1.9), "score_weight_mean": pytest.approx((1.9 + 0.5 + 1.8) / 3),
                     "score_weight_near_bound_share": pytest.approx(2 / 3)}
    assert score_weight_stats(weights, torch.zeros(5, dtype=torch.bool), tau) == {}


def test_real_weight_stats_in_the_loss_metrics_by_hand():
    # one mixed group {+, −} and one all-correct group; real, τ = 1, s̄ = 0:
    # L_g = log(1 + e^{−z+}) + log(1 + e^{z−}) → |∂L_g/∂s̄| = σ(0) = 1/2 for each rollout of the mixed group
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    group_ids = torch.tensor([0, 0, 1, 1])
    _, _, metrics = score_weights("real", scores=torch.zeros(4, dtype=torch.float64), rewards=rewards,
                                  group_ids=group_ids, tau=1.0)
    assert metrics["score_weight_max"] == pytest.approx(0.5)
    assert metrics["score_weight_mean"] == pytest.approx(0.5)  # over the 2 rollouts of the contributing group
    assert metrics["score_weight_near_bound_share"] == 0.0
    # s̄₊ = −5 (the positive far below the anchor): its weight σ(5)/τ ≈ 0.993 ≥ 0.9/τ; the negative's stays 1/2
    _, _, metrics = score_weights("real", scores=torch.tensor([-5.0, 0.0, 0.0, 0.0], dtype=torch.float64),
                                  rewards=rewards, group_ids=group_ids, tau=1.0)
    assert metrics["score_weight_max"] == pytest.approx(1 / (1 + math.exp(-5)))  # σ(5) ≥ 0.9/τ
    assert metrics["score_weight_near_bound_share"] == 0.5


# ---------------------------------------------------------------- capture and reduction, one process


def test_capture_leaves_the_gradient_alone_and_records_it():
    g = torch.Generator().manual_seed(0)
    logp0 = -torch.rand(4, 6, generator=g, dtype=torch.float64) - 1
    old = logp0 + 0.1 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = torch.arange(6)[None] < torch.tensor([6, 3, 5, 1])[:, None]
    kw = dict(old_logp=old, mask=mask, rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]), group_ids=torch.tensor([0, 0, 1, 1]))
    grads = []
    for watch in (False, True):
        logp = logp0.clone().requires_grad_(True)
        gathered = logp * 1.0  # a non-leaf, as in the hook (gathered slot rows)
        record = watch_tokens(gathered, old, mask) if watch else None
        loss, _ = policy_loss("real", logp=gathered, **kw)
        (3.0 * loss).backward()  # a scale, as Megatron's schedule applies
        grads.append(logp.grad)
    assert torch.equal(grads[0], grads[1])
    assert torch.equal(record["grad"], grads[1])
    assert torch.equal(record["log_ratio"], logp0 - old)


def test_reduction_divides_the_factor_and_counts_only_gradient_carrying_rollouts():
    mask = torch.tensor([[True, True, False], [True, True, True]])
    grad = torch.tensor([[-6.0, 2.0, 99.0], [4.0, 0.0, 2.0]])  # 99 sits at a padded position: ignored
    log_ratio = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, -0.5]])
    records = [{"sample_index": torch.tensor([0, 2]), "diag": {"mask": mask, "log_ratio": log_ratio, "grad": grad}},
               {"sample_index": torch.tensor([], dtype=torch.long), "diag": None}]
    lengths = torch.tensor([2, 300, 3])  # rollout 1 (negative, 300 tokens) was skipped: gradient 0
    positive = torch.tensor([True, False, False])
    carries = torch.tensor([True, False, False])  # only rollout 0's tokens go into the ratio bins
    m = reduce_diagnostics(records, reporter=True, lengths=lengths, positive=positive, carries=carries, factor=2.0)
    assert m["diag/ratio_tokens"] == 2 and m["diag/ratio_bin_0.95_1.05"] == 1.0
    assert m["diag/grad_abs_sum_pos"] == 4.0 and m["diag/grad_abs_sum_neg"] == 3.0
    assert m["diag/grad_top1pct_share_pos"] == 3.0 / 4.0  # top 1 of 2 tokens
    assert m["diag/grad_top1pct_share_neg"] == 3.0 / 3.0  # top 4 of 303 tokens hold all of it
    assert reduce_diagnostics(records, reporter=False, lengths=lengths, positive=positive, carries=carries,
                              factor=2.0) == {"diag/grad_abs_sum_pos": 0.0, "diag/grad_abs_sum_neg": 0.0}


# ---------------------------------------------------------------- live, under every layout

WORKER = Path(__file__).parent / "megatron_workers" / "diagnostics.py"
RTOL = 1e-5


def _layout(workdir: Path, nproc: int, *args: str) -> dict:
    from test_megatron_parallel import run_layout

    return run_layout(workdir, nproc, *args, worker=WORKER)  # old log-probs: workdir/old.pt, from the reference


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("diagnostics")


@pytest.fixture(scope="module")
def reference(workdir):
    ref = _layout(workdir, 1, "--reference")
    assert ref["metrics"]["edge_distance"] > 0.01  # every ratio sits well inside its bin
    return ref


def assert_same_diagnostics(result: dict, reference: dict) -> None:
    """Every diag/ metric of the reference, equal (ratio bins exactly) — and the gradients unchanged."""
    from test_megatron_parallel import assert_close_tensors

    expected = {k: v for k, v in reference["metrics"].items() if k.startswith("diag/")}
    assert 0 < expected["diag/ratio_bin_0_0.8"] < 1 and expected["diag/grad_top1pct_share_neg"] > 0  # not vacuous
    for rank, metrics in enumerate(result["rank_metrics"]):  # every rank returns the whole mini-batch's values
        got = {k: v for k, v in metrics.items() if k.startswith("diag/")}
        assert got.keys() == expected.keys(), rank
        for key, value in expected.items():
            if key.startswith("diag/ratio_"):
                assert got[key] == value, (rank, key)
            else:
                assert got[key] == pytest.approx(value, rel=RTOL), (rank, key)
    assert result["metrics"]["loss"] == pytest.approx(reference["metrics"]["loss"], rel=RTOL)
    assert_close_tensors(result, reference, "grads")


@pytest.mark.slow
@pytest.mark.parametrize("nproc, args", [
    (1, ()),  # one packed row
    (2, ("--budget", "80")),  # DP = 2, whole groups
    (2, ("--force-exact",)),  # DP = 2, groups split across ranks (exact mode)
    (2, ("--tp", "2", "--budget", "64")),  # TP = 2
    (2, ("--pp", "2", "--budget", "40")),  # PP = 2: the records live on the last stage
    (2, ("--budget", "80", "--no-skip")),  # the zero-gradient rollouts run too: same metrics
], ids=["one-process", "dp2", "dp2-split-groups", "tp2", "pp2", "dp2-no-skip"])
def test_diagnostics_equal_the_reference_under_every_layout(workdir, reference, nproc, args):
    result = _layout(workdir, nproc, *args)
    if "--force-exact" in args:
        assert result["metrics"]["hook/exact_mode"] == 1.0
    assert_same_diagnostics(result, reference)


@pytest.mark.slow
def test_token_level_loss_diagnostics_under_data_parallel_2(workdir, reference):
    ref = _layout(workdir, 1, "--reference", "--loss", "grpo")  # reference first: it rewrites old.pt the same way
    assert not any(k.startswith("diag/score_weight") for k in ref["metrics"])
    assert_same_diagnostics(_layout(workdir, 2, "--loss", "grpo", "--budget", "32"), ref)
