"""``real-megatron compare --preset stress``: where each loss stays stable as the update grows.

A *cell* is one setting of the step size: ``u<updates>_lr<lr>`` = ``updates`` optimizer updates per rollout
batch (``train.mini_batch_prompts`` = rollout batch prompts / updates) at learning rate ``lr``, optionally
``_s<k>`` = ``train.max_staleness=k`` (rollouts generated up to k weight versions ahead of training).
The preset sweeps ``STRESS_CELLS`` (the recipe's 4 updates at 1e-4, then 8 updates and/or 3e-4) for the six
losses and REAL at τ = 1 (its per-rollout weight is bounded by 1/τ = 1 where REAL's default reaches 2,
about GRPO's |A|: the control for "REAL just takes larger steps"). A cell equal to the plain comparison's
settings runs in the same directories as ``real-megatron compare`` without the preset, so the two share
those runs.

Per cell and loss (mean over seeds; ``run_dynamics`` per run, from ``metrics.jsonl``):
final and best held-out pass@1 and the paired difference to REAL of the same cell; the policy entropy at
the first and last rollout step and its maximum; the clipped fraction (``loss/clip_fraction``: GRPO, DAPO,
GSPO); the ratio spread (share of response tokens with π_θ/π_old outside [0.95, 1.05) and outside
[0.8, 1.2), ``diag/ratio_bin_*``); gradient domination (``diag/grad_top1pct_share_{neg,pos}``: the top 1 %
of tokens' share of |∂L/∂log π|); the update size ‖Δθ‖/‖θ‖ per optimizer step (``diag/update_rel_norm``,
logged by ``logging.update_size``) and the total drift ‖θ_T − θ_0‖/‖θ_0‖ from the warm-up
(``weight_drift.json``); and where the training reward reaches 0 and stays there (every group all-wrong: no
mixed group, so REAL and the other group-relative losses get no gradient and nothing trains the policy back).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from real_megatron.megatron.update_size import UPDATE_SIZE_KEY

STRESS_CELLS = "u4_lr1e-4,u8_lr1e-4,u4_lr3e-4,u8_lr3e-4"
STRESS_TAU = "1.0"  # the control: REAL at τ = 1
SWEPT_KEYS = ("optim.lr", "train.mini_batch_prompts", "train.max_staleness")
_CELL = re.compile(r"^u(\d+)_lr([0-9.]+(?:e-?\d+)?)(?:_s(\d+))?$")


@dataclass(frozen=True)
class Cell:
    """One step-size setting: ``updates`` per rollout batch at ``lr``, rollouts up to ``staleness`` versions old."""

    name: str
    updates: int
    lr: float
    staleness: int | None = None

    def overrides(self, rollout_batch_prompts: int) -> list[str]:
        out = [f"train.mini_batch_prompts={rollout_batch_prompts // self.updates}", f"optim.lr={self.lr!r}"]
        if self.staleness is not None:
            out.append(f"train.max_staleness={self.staleness}")
        return out


def parse_cells(text: str, rollout_batch_prompts: int) -> list[Cell]:
    """``--cells`` -> cells; ValueError naming the flag and the fix for a bad one."""
    cells, seen = [], set()
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        m = _CELL.match(token)
        if not m:
            raise ValueError(f"--cells {token!r}: expected u<updates>_lr<lr>[_s<staleness>], e.g. u8_lr3e-4")
        updates, lr = int(m.group(1)), float(m.group(2))
        if updates < 1 or rollout_batch_prompts % updates:
            raise ValueError(f"--cells {token}: {rollout_batch_prompts} prompts per rollout batch do not split into "
                             f"{updates} mini-batches of whole prompts; use a divisor of {rollout_batch_prompts}")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"--cells {token}: the learning rate must be > 0")
        cell = Cell(token, updates, lr, int(m.group(3)) if m.group(3) else None)
        key = (cell.updates, cell.lr, cell.staleness)
        if key in seen:
            raise ValueError(f"--cells {text!r} names the setting of {token} twice")
        seen.add(key)
        cells.append(cell)
    if not cells:
        raise ValueError("--cells is empty; e.g. --cells u4_lr1e-4,u8_lr3e-4")
    return cells


# ----------------------------------------------------------------------------- one run's dynamics
def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(values) / len(values) if values else None


def run_dynamics(rows: list[dict]) -> dict:
    """The stress metrics of one run (module docstring) from its metric rows (one per optimizer step)."""
    steps = [r for r in rows if r.get("train/loss") is not None]
    per_rollout: dict[int, dict] = {}
    for r in steps:
        per_rollout.setdefault(int(r["rollout_step"]), r)  # rollout-level values repeat on the step's rows
    order = sorted(per_rollout)
    entropy = [per_rollout[k].get("train/entropy") for k in order]
    reward = [per_rollout[k].get("train/reward_mean") for k in order]
    zero_from = None
    for k, value in zip(reversed(order), reversed(reward), strict=False):
        if value is None or value > 0:
            break
        zero_from = k
    inside5 = [r.get("diag/ratio_bin_0.95_1.05") for r in steps]
    outside20 = [r["diag/ratio_bin_0_0.8"] + r["diag/ratio_bin_1.2_inf"] for r in steps
                 if r.get("diag/ratio_bin_0_0.8") is not None and r.get("diag/ratio_bin_1.2_inf") is not None]
    inside_mean = _mean(inside5)
    sizes = [r.get(UPDATE_SIZE_KEY) for r in steps if r.get(UPDATE_SIZE_KEY) is not None]
    return {
        "rollout_steps": len(order),
        "entropy_first": entropy[0] if entropy else None,
        "entropy_last": entropy[-1] if entropy else None,
        "entropy_max": max((e for e in entropy if e is not None), default=None),
        "reward_first": reward[0] if reward else None,
        "reward_last": reward[-1] if reward else None,
        "reward_zero_from": zero_from,  # rollout step from which the training reward is 0 to the end
        "clip_fraction": _mean(r.get("loss/clip_fraction") for r in steps),
        "ratio_outside_5pct": None if inside_mean is None else 1 - inside_mean,
        "ratio_outside_20pct": _mean(outside20),
        "top1_share_neg": _mean(r.get("diag/grad_top1pct_share_neg") for r in steps),
        "top1_share_pos": _mean(r.get("diag/grad_top1pct_share_pos") for r in steps),
        "grad_norm": _mean(r.get("train/grad_norm") for r in steps),
        "update_size_mean": _mean(sizes),
        "update_size_max": max(sizes) if sizes else None,
    }


def weight_drift(initial_dir: Path, final_dir: Path) -> float:
    """‖θ_final − θ_initial‖ / ‖θ_initial‖ over every tensor of two HF checkpoints (``model.safetensors``)."""
    from safetensors.torch import load_file

    a, b = (load_file(str(Path(initial_dir) / "model.safetensors")),
            load_file(str(Path(final_dir) / "model.safetensors")))
    if set(a) != set(b):
        raise ValueError(f"{initial_dir} and {final_dir} hold different tensors")
    diff = sum(float((b[k].double() - a[k].double()).pow(2).sum()) for k in a)
    norm = sum(float(a[k].double().pow(2).sum()) for k in a)
    return math.sqrt(diff / norm)


# ----------------------------------------------------------------------------- the sweep's summary
def _agg(values) -> dict | None:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values)}


def stress_summary(cells: list[Cell], per_cell: dict[str, dict], dynamics: dict[str, dict[str, dict[int, dict]]],
                   drifts: dict[str, dict[str, dict[int, float]]], *, settings: dict) -> dict:
    """``per_cell[cell]``: ``summary.summarize`` of that cell's runs; ``dynamics[cell][label][seed]``:
    ``run_dynamics``; ``drifts[cell][label][seed]``: ``weight_drift``. -> ``stress_summary.json``'s content."""
    out = {"settings": settings, "cells": []}
    for cell in cells:
        summary = per_cell.get(cell.name)
        if summary is None:
            continue
        rows = {}
        for label, row in summary["losses"].items():
            dyn = dynamics.get(cell.name, {}).get(label, {})
            agg = {key: _agg(d[key] for d in dyn.values()) for key in
                   ("entropy_first", "entropy_last", "entropy_max", "reward_last", "clip_fraction",
                    "ratio_outside_5pct", "ratio_outside_20pct", "top1_share_neg", "top1_share_pos", "grad_norm",
                    "update_size_mean", "update_size_max")}
            agg["weight_drift"] = _agg(drifts.get(cell.name, {}).get(label, {}).values())
            collapsed = {str(seed): d["reward_zero_from"] for seed, d in sorted(dyn.items())
                         if d["reward_zero_from"] is not None}
            paired = next((p for p in summary.get("paired", []) if p["label"] == label and p["vs"] == "real"), None)
            per_seed = row["per_seed"].values()
            rows[label] = {"name": row["name"], "seeds": row["seeds"],
                           "final": _agg(r["final"]["pass@1"]["average"] for r in per_seed if r["final"]),
                           "best": _agg(r["best"]["pass@1"]["average"] for r in per_seed if r["best"]),
                           "vs_real": paired, "dynamics": agg, "reward_zero_from": collapsed}
        out["cells"].append({"cell": cell.name, "updates": cell.updates, "lr": cell.lr, "staleness": cell.staleness,
                             "losses": rows, "start": summary["start"], "final_eval": summary.get("final_eval"),
                             "paired": summary.get("paired", [])})
    return out


def _pm(stats: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    if not stats:
        return "–"
    return f"{scale * stats['mean']:.{digits}f} ± {scale * stats['std']:.{digits}f}"


def _fmt(stats: dict | None, scale: float = 1.0, digits: int = 3, spec: str = "f") -> str:
    return "–" if not stats else f"{scale * stats['mean']:.{digits}{spec}}"


def stress_markdown(summary: dict) -> str:
    from real_megatron.repro.summary import paired_markdown

    lines = ["# Stress sweep: learning rate × updates per rollout batch", ""]
    settings = summary.get("settings") or {}
    if settings:
        lines += ["Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), ""]
    lines += [
        "Per cell and loss, mean ± std over seeds. *final*: the final evaluation (all held-out problems, many "
        "samples; see its SE below); *best*: the best of the trainer's small evaluations; *Δ vs REAL*: paired "
        "difference in points with its 95 % interval (resolved in bold). Entropy in nats/token at the first and "
        "last rollout step (max over the run). *ratio outside*: share of tokens with π_θ/π_old outside "
        "[0.95, 1.05) / [0.8, 1.2). *clipped*: `loss/clip_fraction`. *top 1 %*: the top 1 % of tokens' share of "
        "|∂L/∂log π|, negatives / positives. *‖Δθ‖/‖θ‖*: per optimizer step, mean (max); *drift*: "
        "‖θ_T − θ_0‖/‖θ_0‖ from the warm-up. *reward 0 from*: per seed, the rollout step from which the "
        "training reward is 0 to the end (every group all-wrong: no gradient for the group-relative losses).", "",
        "| cell | loss | final | best | Δ vs REAL [95 %] | entropy first → last (max) | ratio outside ±5 % / ±20 % "
        "| clipped | top 1 % neg / pos | ‖Δθ‖/‖θ‖ per step | drift | reward 0 from |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell in summary["cells"]:
        head = (f"{cell['updates']} upd, lr {cell['lr']:g}"
                + (f", stale {cell['staleness']}" if cell["staleness"] else ""))
        for label, row in cell["losses"].items():
            d = row["dynamics"]
            p = row["vs_real"]
            if p is None:
                delta = "(reference)" if label == "real" else "–"
            elif p["ci_low"] is None:
                delta = f"{p['mean_diff']:+.1f} (one seed)"
            else:
                text = f"{p['mean_diff']:+.1f} [{p['ci_low']:+.1f}, {p['ci_high']:+.1f}]"
                delta = f"**{text}**" if p["resolved"] else text
            entropy = (f"{_fmt(d['entropy_first'])} → {_fmt(d['entropy_last'])} ({_fmt(d['entropy_max'])})"
                       if d["entropy_first"] else "–")
            ratio = (f"{_fmt(d['ratio_outside_5pct'], 100, 1)} % / {_fmt(d['ratio_outside_20pct'], 100, 2)} %"
                     if d["ratio_outside_5pct"] else "–")
            clip = f"{_fmt(d['clip_fraction'], 100, 2)} %" if d["clip_fraction"] else "–"
            top = (f"{_fmt(d['top1_share_neg'], 100, 1)} / {_fmt(d['top1_share_pos'], 100, 1)} %"
                   if d["top1_share_neg"] or d["top1_share_pos"] else "–")
            size = (f"{_fmt(d['update_size_mean'], 1, 2, 'e')} ({_fmt(d['update_size_max'], 1, 1, 'e')})"
                    if d["update_size_mean"] else "pending")
            drift = _fmt(d["weight_drift"], 1, 3)
            zero = ", ".join(f"s{seed}: {k}" for seed, k in row["reward_zero_from"].items()) or "never"
            lines.append(f"| {head} | {row['name']} (n={len(row['seeds'])}) | {_pm(row['final'])} | {_pm(row['best'])} "
                         f"| {delta} | {entropy} | {ratio} | {clip} | {top} | {size} | {drift} | {zero} |")
    for cell in summary["cells"]:
        fe = cell.get("final_eval")
        if fe:
            lines += ["", f"Final evaluations of cell {cell['cell']}: standard error {fe['standard_error_mean']:.2f} "
                      f"points on average (max {fe['standard_error_max']:.2f}, "
                      f"bound {fe['standard_error_bound']:.2f}); "
                      f"start (warm-up, one evaluation) {100 * cell['start']['average']['mean']:.1f}."]
            break
    for cell in summary["cells"]:
        if cell["paired"]:
            names = {label: row["name"] for label, row in cell["losses"].items()}
            lines += ["", f"## Cell {cell['cell']}: paired differences (points of average pass@1)", ""]
            lines += paired_markdown(cell["paired"], names)
    return "\n".join(lines) + "\n"


def plot_stress(summary: dict, out: Path) -> Path:
    """Four panels against the cells: final pass@1, maximum entropy, tokens outside ±5 %, update size; one
    line per loss (seed mean, bar: min–max over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from real_megatron.repro.figures import finish_figure

    cells = summary["cells"]
    labels = []
    for cell in cells:
        labels += [lb for lb in cell["losses"] if lb not in labels]
    panels = (("final held-out pass@1 (final evaluation)", lambda row: row["final"], 1.0),
              ("maximum policy entropy (nats/token)", lambda row: row["dynamics"]["entropy_max"], 1.0),
              ("tokens with ratio outside [0.95, 1.05)", lambda row: row["dynamics"]["ratio_outside_5pct"], 1.0),
              ("update size ‖Δθ‖/‖θ‖ per step (mean)", lambda row: row["dynamics"]["update_size_mean"], 1.0))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    xs = list(range(len(cells)))
    for ax, (title, get, _) in zip(axes.flat, panels, strict=False):
        for i, label in enumerate(labels):
            pts = [(x, get(cell["losses"][label])) for x, cell in zip(xs, cells, strict=True)
                   if label in cell["losses"]]
            pts = [(x, s) for x, s in pts if s]
            if not pts:
                continue
            offset = (i - len(labels) / 2) * 0.04
            ax.errorbar([x + offset for x, _ in pts], [s["mean"] for _, s in pts],
                        yerr=[[s["mean"] - s["min"] for _, s in pts], [s["max"] - s["mean"] for _, s in pts]],
                        marker="o", markersize=4, capsize=2, color=f"C{i % 10}",
                        label=next(cell["losses"][label]["name"] for cell in cells if label in cell["losses"]))
        ax.set_xticks(xs, [f"{c['updates']} upd\nlr {c['lr']:g}" for c in cells])
        ax.set_title(title)
        ax.grid(alpha=0.3)
    return finish_figure(fig, axes, "Stress sweep (seed mean, bar: min–max over seeds)", out, max_columns=7)
