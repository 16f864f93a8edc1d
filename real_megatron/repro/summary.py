"""The numbers of ``real-megatron compare``: Table 1 and Table 4 of the paper from the runs' metrics.

Input: for every run label (``real``, ``grpo``, ``real_tau0.1``, ...) the ``metrics.jsonl`` rows of each
seed (``plots.read_metrics``). Held-out pass@1 comes from the evaluation rows: ``eval/<file stem>/pass@1``
per level and ``eval/pass@1``, their mean (the "average" column); one eval file gives only the average.

Per run (one label, one seed):
- start: the evaluation at step 0 (before any RL update: the warm-up model);
- final: the last evaluation;
- best: the evaluation during training (step > 0) with the highest average, with that same
  evaluation's per-level numbers (never a per-level maximum over different steps).

Per label: mean ± sample standard deviation (n − 1 in the denominator; 0 for one seed) over seeds.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

AVERAGE = "average"
_LEVEL_KEY = re.compile(r"^eval/(.+)/pass@1$")

# how the tables and figures name a loss (the paper's names)
DISPLAY = {"real": "REAL", "grpo": "GRPO", "dapo": "DAPO", "gspo": "GSPO", "real_bce": "REAL-BCE",
           "real_no_anchor": "REAL w/o anchor"}
# Table 4's ablation rows, in the paper's order (τ sweep rows follow)
ABLATION_LABELS = ("real", "real_bce", "real_no_anchor")


def display_name(label: str) -> str:
    """``real_tau0.1`` -> ``REAL τ=0.1``; a loss name -> the paper's name."""
    if label.startswith("real_tau"):
        return f"REAL τ={label[len('real_tau'):]}"
    return DISPLAY.get(label, label)


def eval_points(rows: list[dict]) -> list[tuple[int, dict[str, float]]]:
    """The evaluation rows as ``(step, {level: pass@1, ..., "average": pass@1})``, in step order."""
    points = []
    for row in rows:
        if row.get("eval/pass@1") is None:
            continue
        values = {m.group(1): float(v) for k, v in row.items() if (m := _LEVEL_KEY.match(k)) and v is not None}
        values[AVERAGE] = float(row["eval/pass@1"])
        points.append((int(row["step"]), values))
    return sorted(points, key=lambda p: p[0])


def run_result(rows: list[dict]) -> dict:
    """start / final / best evaluation of one run (each ``{"step": n, "pass@1": {level: v}}`` or None)."""
    points = eval_points(rows)
    start = next(({"step": s, "pass@1": v} for s, v in points if s == 0), None)
    trained = [(s, v) for s, v in points if s > 0]
    final = {"step": trained[-1][0], "pass@1": trained[-1][1]} if trained else None
    best = None
    if trained:
        s, v = max(trained, key=lambda p: (p[1][AVERAGE], -p[0]))  # ties: the earliest
        best = {"step": s, "pass@1": v}
    return {"start": start, "final": final, "best": best}


def mean_std(values: list[float]) -> dict:
    """``{"mean", "std", "n"}``: sample standard deviation (n − 1), 0.0 for a single value."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def _aggregate(results: list[dict | None]) -> dict | None:
    """Mean ± std per level over the seeds' evaluations (levels every seed has)."""
    results = [r for r in results if r is not None]
    if not results:
        return None
    keys = [k for k in results[0]["pass@1"] if all(k in r["pass@1"] for r in results)]
    return {k: mean_std([r["pass@1"][k] for r in results]) for k in keys}


def summarize(runs: dict[str, dict[int, list[dict]]], *, settings: dict | None = None) -> dict:
    """``runs[label][seed]`` = that run's metric rows -> the summary (``summary.json``'s content).

    ``start``: the step-0 evaluation per seed (every loss of a seed starts from the same weights with the
    same evaluation seeds; the first label's run of each seed is taken), averaged over seeds.
    """
    per_run = {label: {seed: run_result(rows) for seed, rows in sorted(by_seed.items())}
               for label, by_seed in runs.items()}
    start_by_seed: dict[int, dict] = {}
    for by_seed in per_run.values():
        for seed, result in by_seed.items():
            if result["start"] is not None:
                start_by_seed.setdefault(seed, result["start"])
    table = {}
    for label, by_seed in per_run.items():
        table[label] = {
            "name": display_name(label),
            "seeds": sorted(by_seed),
            "final": _aggregate([r["final"] for r in by_seed.values()]),
            "best": _aggregate([r["best"] for r in by_seed.values()]),
            "per_seed": {str(seed): r for seed, r in by_seed.items()},
        }
    levels = []
    for row in table.values():
        for k in (row["final"] or {}):
            if k != AVERAGE and k not in levels:
                levels.append(k)
    tau_rows = sorted((lb for lb in table if lb.startswith("real_tau")), key=lambda lb: float(lb[len("real_tau"):]))
    return {
        "settings": settings or {},
        "levels": levels,
        "start": _aggregate([start_by_seed[s] for s in sorted(start_by_seed)]),
        "losses": table,
        "ablation": [lb for lb in ABLATION_LABELS if lb in table] + tau_rows,
    }


def _cell(stats: dict | None, key: str) -> str:
    if not stats or key not in stats:
        return "–"
    s = stats[key]
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def summary_markdown(summary: dict) -> str:
    """Table 1 (final and best, per level and average) and Table 4 (ablation) as Markdown; pass@1 in %."""
    levels = summary["levels"]
    cols = levels + [AVERAGE]
    header = "| | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    lines = ["# Loss comparison (held-out pass@1, %, mean ± std over seeds)", ""]
    settings = summary.get("settings") or {}
    if settings:
        lines += ["Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), ""]
    for which, title in (("final", "Final evaluation"), ("best", "Best evaluation during training (by average)")):
        lines += [f"## {title}", "", header.rstrip("\n")]
        if summary["start"]:
            lines.append("| start (warm-up) | " + " | ".join(_cell(summary["start"], c) for c in cols) + " |")
        for row in summary["losses"].values():
            n = len(row["seeds"])
            lines.append(f"| {row['name']} (n={n}) | " + " | ".join(_cell(row[which], c) for c in cols) + " |")
        lines.append("")
    if summary["ablation"]:
        lines += ["## Ablation (Table 4): average pass@1", "", "| | final | best |", "|---|---|---|"]
        for label in summary["ablation"]:
            row = summary["losses"][label]
            lines.append(f"| {row['name']} | {_cell(row['final'], AVERAGE)} | {_cell(row['best'], AVERAGE)} |")
        lines.append("")
    return "\n".join(lines)


def write_summary(out_dir: Path, summary: dict) -> tuple[Path, Path]:
    """``out_dir/summary.json`` and ``out_dir/summary.md``, each written atomically."""
    from real_megatron.checkpoint import atomic_write_text as write_text_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "summary.json", out_dir / "summary.md"
    write_text_atomic(json_path, json.dumps(summary, indent=1) + "\n")
    write_text_atomic(md_path, summary_markdown(summary))
    return json_path, md_path
