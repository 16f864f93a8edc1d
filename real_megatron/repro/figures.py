"""The paper's figures at small scale: Figure 1 (``real-megatron plot-weights``: gradient weight against the
relative log-prob) and the figures of ``real-megatron compare``, Figure 4 (training dynamics) and Figure 5 (ablation).

Figure 1: |W| against s for GRPO (ε = 0.2, A = ±1, per token) and REAL (τ = 0.5, C± = 4, per rollout),
positives and negatives. Every point is ∂loss/∂s obtained by autograd through ``policy_loss``: the
closed forms are never re-typed here, so the figure shows what the library actually computes.

Figures 4 and 5:
Input: ``runs[label][seed]`` = that run's metric rows (one per optimizer step, ``plots.read_metrics``).
Every curve is the mean over seeds at each optimizer step, with a band from the seeds' minimum to maximum.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from real_megatron.losses import policy_loss
from real_megatron.plots import save_figure_atomic
from real_megatron.repro.summary import display_name


def grpo_weight(s: float, advantage: float, clip_eps: float = 0.2) -> float:
    """|∂L/∂s_t| of GRPO's clipped token objective for one token with log-ratio s (one rollout, one token)."""
    logp = torch.tensor([[s]], dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss("grpo", logp=logp, old_logp=torch.zeros_like(logp), mask=torch.ones_like(logp),
                          rewards=torch.tensor([1.0 if advantage > 0 else 0.0], dtype=torch.float64),
                          group_ids=torch.tensor([0]), advantages=torch.tensor([advantage], dtype=torch.float64),
                          clip_eps=clip_eps, kl_coef=0.0)
    (grad,) = torch.autograd.grad(loss, logp)
    return abs(grad.item())


def real_weight(s: float, positive: bool, tau: float = 0.5, c: float = 4.0) -> float:
    """|∂L_g/∂s̄| of REAL for one rollout with score s in a group whose other members give C± = c.

    C+ = 1 + Σ_{other positives} exp(−s̄/τ): with the other positives at s̄ = 0, C+ = 1 + (#others),
    so c − 1 other members of the same label sit at 0 (c must be an integer ≥ 1). One member of the
    opposite label makes the group mixed; it does not enter this rollout's weight.
    """
    others = int(round(c)) - 1
    if others < 0 or not math.isclose(others + 1, c):
        raise ValueError(f"c must be an integer >= 1, got {c}")
    scores = [s] + [0.0] * others + [0.0]
    labels = [positive] * (1 + others) + [not positive]
    logp = torch.tensor(scores, dtype=torch.float64)[:, None].requires_grad_(True)
    loss, _ = policy_loss("real", logp=logp, old_logp=torch.zeros_like(logp), mask=torch.ones_like(logp),
                          rewards=torch.tensor([1.0 if x else 0.0 for x in labels], dtype=torch.float64),
                          group_ids=torch.zeros(len(scores), dtype=torch.long), tau=tau)
    (grad,) = torch.autograd.grad(loss, logp)
    return abs(grad[0, 0].item())  # one group in the call: the normaliser is 1


def plot_weights(out: Path, *, tau: float = 0.5, c: float = 4.0, clip_eps: float = 0.2) -> dict:
    """Draw Figure 1 and return the curves (for tests and the README)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [-2.0 + 4.0 * i / 240 for i in range(241)]
    curves = {
        "grpo_pos": [grpo_weight(s, +1.0, clip_eps) for s in grid],
        "grpo_neg": [grpo_weight(s, -1.0, clip_eps) for s in grid],
        "real_pos": [real_weight(s, True, tau, c) for s in grid],
        "real_neg": [real_weight(s, False, tau, c) for s in grid],
    }
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, label, title in ((axes[0], "pos", "(a) positive samples (r = 1)"),
                             (axes[1], "neg", "(b) negative samples (r = 0)")):
        ax.plot(grid, curves[f"grpo_{label}"], color="tab:red", label=f"GRPO |W| vs $s_t$ (ε={clip_eps}, A=±1)")
        ax.plot(grid, curves[f"real_{label}"], color="tab:blue", label=f"REAL |W| vs $\\bar s$ (τ={tau}, C±={c:g})")
        ax.axhline(1 / tau, color="tab:blue", linestyle=":", linewidth=1, label="1/τ bound")
        ax.set_title(title)
        ax.set_xlabel("relative log-probability s")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gradient magnitude |W|")
    axes[0].set_ylim(0, max(max(curves["grpo_neg"]), 1 / tau) * 1.05)
    axes[1].legend(loc="upper left", fontsize=8)
    fig.suptitle("Gradient weight per rollout/token, by autograd through real_megatron.losses.policy_loss")
    save_figure_atomic(fig, out)
    plt.close(fig)
    return {"s": grid, **curves}


def main_plot_weights(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="real-megatron plot-weights",
                                     description="Figure 1 of the paper: gradient weight |W| vs s")
    parser.add_argument("--out", type=Path, default=Path("runs/figure1_gradient_weights.png"))
    parser.add_argument("--tau", type=float, default=0.5)
    parser.add_argument("--c", type=float, default=4.0, help="C+ = C- of Eq. 9 (integer >= 1)")
    parser.add_argument("--clip-eps", type=float, default=0.2)
    args = parser.parse_args(argv)
    curves = plot_weights(args.out, tau=args.tau, c=args.c, clip_eps=args.clip_eps)
    print(f"wrote {args.out}")
    print(f"  REAL positives: |W| from {curves['real_pos'][0]:.3f} (s=-2) down to {curves['real_pos'][-1]:.3f} (s=+2), "
          f"bound 1/τ = {1 / args.tau:g}")
    print(f"  REAL negatives: |W| from {curves['real_neg'][0]:.3f} (s=-2) up to {curves['real_neg'][-1]:.3f} (s=+2)")
    print(f"  GRPO negatives: |W| = e^s up to {max(curves['grpo_neg']):.3f} at s=+2 (unbounded); "
          f"GRPO positives are zero above s=log(1+ε)")
    return 0



# Figure 4's panels: (title, metric key); the all-solved ratio is per rollout batch (rollout/collect.py)
DYNAMICS_PANELS = (
    ("policy entropy (nats/token)", "train/entropy"),
    ("held-out pass@1 (average over levels)", "eval/pass@1"),
    ("training reward", "train/reward_mean"),
    ("ratio of all-solved groups", "train/solved_all_ratio"),
)
# Figure 5: the ablation curves, in the paper's order
ABLATION_CURVES = ("dapo", "real_bce", "real_no_anchor", "real")


def seed_band(by_seed: dict[int, list[dict]], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, min, max) of ``key`` over the seeds, at every step where at least one seed has it."""
    values: dict[int, list[float]] = {}
    for rows in by_seed.values():
        for row in rows:
            if row.get(key) is not None:
                values.setdefault(int(row["step"]), []).append(float(row[key]))
    steps = sorted(values)
    return (steps, [sum(values[s]) / len(values[s]) for s in steps],
            [min(values[s]) for s in steps], [max(values[s]) for s in steps])


def _draw(ax, runs: dict, labels, key: str) -> None:
    for i, label in enumerate(labels):
        steps, mean, low, high = seed_band(runs[label], key)
        if not steps:
            continue
        color = f"C{i % 10}"
        ax.plot(steps, mean, color=color, marker="o" if len(steps) < 20 else None, markersize=3,
                label=f"{display_name(label)} (n={len(runs[label])})")
        ax.fill_between(steps, low, high, color=color, alpha=0.15, linewidth=0)


def finish_figure(fig, axes, title: str, out: Path, *, max_columns: int) -> Path:
    """A panel grid's shared legend (from its first panel) below it, its title, then the atomic save; closes
    ``fig`` and returns ``out``."""
    import matplotlib.pyplot as plt

    handles, names = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(len(names), max_columns), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    save_figure_atomic(fig, Path(out))
    plt.close(fig)
    return Path(out)


def plot_dynamics(runs: dict[str, dict[int, list[dict]]], out: Path) -> Path:
    """Figure 4: entropy, held-out pass@1, reward and all-solved ratio vs optimizer step, one curve per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (title, key) in zip(axes.flat, DYNAMICS_PANELS, strict=True):
        _draw(ax, runs, list(runs), key)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    return finish_figure(fig, axes, "Training dynamics (seed mean, band: min–max over seeds)", out, max_columns=6)


def plot_ablation(runs: dict[str, dict[int, list[dict]]], out: Path) -> Path:
    """Figure 5: held-out pass@1 of DAPO, REAL-BCE, REAL w/o anchor and REAL (those that were run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _draw(ax, runs, [lb for lb in ABLATION_CURVES if lb in runs], "eval/pass@1")
    ax.set_title("Ablation: held-out pass@1 (seed mean, band: min–max)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("pass@1 (average over levels)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, Path(out))
    plt.close(fig)
    return Path(out)
