"""The figures of ``real-megatron compare``: Figure 4 (training dynamics) and Figure 5 (ablation) of the paper.

Input: ``runs[label][seed]`` = that run's metric rows (one per optimizer step, ``plots.read_metrics``).
Every curve is the mean over seeds at each optimizer step, with a band from the seeds' minimum to maximum.
"""
from __future__ import annotations

from pathlib import Path

from real_megatron.compare_summary import display_name
from real_megatron.plots import _atomic_savefig

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


def plot_dynamics(runs: dict[str, dict[int, list[dict]]], out: Path) -> Path:
    """Figure 4: entropy, held-out pass@1, reward and all-solved ratio vs optimizer step, one curve per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (title, key) in zip(axes.flat, DYNAMICS_PANELS):
        _draw(ax, runs, list(runs), key)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    handles, names = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="lower center", ncol=min(len(names), 6), fontsize=8)
    fig.suptitle("Training dynamics (seed mean, band: min–max over seeds)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _atomic_savefig(fig, Path(out))
    plt.close(fig)
    return Path(out)


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
    _atomic_savefig(fig, Path(out))
    plt.close(fig)
    return Path(out)
