"""Training curves of a run: ``real-megatron plot RUN_DIR`` writes PNG curves from ``RUN_DIR/metrics.jsonl``
(reward, entropy, eval pass@1, time split); ``save_figure_atomic`` is the one way a figure is written.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from real_megatron.arguments import ArgumentParser


def save_figure_atomic(fig, out: Path) -> None:
    """Save a matplotlib figure to ``out`` (PNG) through a temporary sibling, fsynced and renamed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out)



# ----------------------------------------------------------------------------- run curves


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of ``RUN_DIR/metrics.jsonl``. Every complete line (ended by a newline) must be a JSON object; only
    a last line without its newline — a run killed mid-write — is left out."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory written by `real-megatron train`?")
    lines = path.read_text(errors="replace").split("\n")  # the last item is what follows the last newline
    rows = []
    for lineno, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not a JSON row ({err.msg}); is this a real-megatron metrics file?") \
                from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: not a JSON object; is this a real-megatron metrics file?")
        rows.append(row)
    return rows


PANELS = [
    ("reward", ["train/reward_mean"]),
    ("entropy", ["train/entropy"]),
    ("eval pass@1", ["eval/pass@1"]),
]
# the trainer's time in a rollout step, stacked in the order the loop spends it; the first part is its wait for
# rollouts: the generation and scoring themselves in the synchronous loop, only the wait when they run ahead
TIME_PARTS = (("waiting for rollouts", ("time/wait_rollout_s",)), ("old log-probs", ("time/logprob_s",)),
              ("reference log-probs", ("time/ref_logprob_s",)), ("updates", ("time/update_s",)),
              ("weight sync", ("time/sync_s",)), ("evaluation", ("time/eval_s",)))


def step_times(rows: list[dict]) -> dict[int, dict[str, float]]:
    """Per rollout step (rows carry ``rollout_step``): the seconds of each of ``TIME_PARTS`` summed over its rows, and
    ``"generation"``, the engine's generation + scoring time. In a synchronous run (no ``time/wait_rollout_s``) the
    trainer waits through all of the generation and scoring."""
    steps: dict[int, dict[str, float]] = {}
    for r in rows:
        k = r.get("rollout_step")
        if not k:
            continue
        acc = steps.setdefault(int(k), {name: 0.0 for name, _ in TIME_PARTS} | {"generation": 0.0})
        for name, keys in TIME_PARTS:
            acc[name] += sum(r.get(key) or 0.0 for key in keys)
        generation = (r.get("time/rollout_s") or 0.0) + (r.get("time/reward_s") or 0.0)
        acc["generation"] += generation
        if "time/wait_rollout_s" not in r:
            acc["waiting for rollouts"] += generation
    return steps


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """``RUN_DIR/curves.png``: reward, entropy and eval pass@1 by optimizer step, and where each rollout step's time
    goes (the trainer's phases stacked, the engine's generation + scoring beside them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{Path(run_dir) / 'metrics.jsonl'} has no rows yet")
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (title, keys) in zip(list(axes.flat)[:3], PANELS, strict=True):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    ax = axes.flat[3]
    steps = step_times(rows)
    if steps:
        ks = sorted(steps)
        bottom = [0.0] * len(ks)
        for name, _ in TIME_PARTS:
            heights = [steps[k][name] for k in ks]
            if any(heights):
                ax.bar(ks, heights, bottom=bottom, label=name, width=0.8)
                bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.plot(ks, [steps[k]["generation"] for k in ks], color="black", marker="." if len(ks) < 60 else None,
                linewidth=1, label="engine: generation + scoring")
        ax.legend(fontsize=7)
    ax.set_title("trainer time per rollout step (s)")
    ax.set_xlabel("rollout step")
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    save_figure_atomic(fig, out)
    plt.close(fig)
    return out


def main_plot_run(argv: list[str]) -> int:
    parser = ArgumentParser(prog="real-megatron plot", description="PNG curves from RUN_DIR/metrics.jsonl")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/curves.png")
    args = parser.parse_args(argv)
    from real_megatron.config import ConfigError
    from real_megatron.run_dir import check_writable_dir

    try:
        out = args.out or args.run_dir / "curves.png"
        check_writable_dir(out.parent, "--out")
        print(f"wrote {plot_run(args.run_dir, out)}")
    except (FileNotFoundError, ValueError, ConfigError) as err:
        print(f"real-megatron plot: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0
