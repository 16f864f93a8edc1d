"""Figures: the paper's Figure 1 (gradient weight vs relative log-prob) and training curves.

``real-megatron plot-weights --out FILE.png``
    |W| against s for GRPO (ε = 0.2, A = ±1, per token) and REAL (τ = 0.5, C± = 4, per rollout),
    positives and negatives. Every point is ∂loss/∂s obtained by autograd through
    ``policy_loss`` — the closed forms are never re-typed here, so the figure shows what the
    library actually computes.

``real-megatron plot RUN_DIR``
    PNG curves from ``RUN_DIR/metrics.jsonl`` (reward, entropy, eval pass@1, time split).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch

from real_megatron.losses import policy_loss


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


def _atomic_savefig(fig, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out)


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
    _atomic_savefig(fig, out)
    plt.close(fig)
    return {"s": grid, **curves}


def main_plot_weights(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="real-megatron plot-weights", description=__doc__.split("\n\n")[1])
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


# ----------------------------------------------------------------------------- run curves


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory written by `real-megatron train`?")
    rows = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                # a run killed mid-write can leave a torn last line; anything else is corruption
                if lineno == sum(1 for _ in open(path)):
                    break
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from err
    return rows


PANELS = [
    ("reward", ["train/reward_mean"]),
    ("entropy", ["train/entropy"]),
    ("eval pass@1", ["eval/pass@1"]),
    ("time per step (s)", ["time/rollout_s", "time/reward_s", "time/logprob_s", "time/update_s", "time/sync_s"]),
]


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{Path(run_dir) / 'metrics.jsonl'} has no rows yet")
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    _atomic_savefig(fig, out)
    plt.close(fig)
    return out


def main_plot_run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="real-megatron plot", description="PNG curves from RUN_DIR/metrics.jsonl")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/curves.png")
    args = parser.parse_args(argv)
    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0
