"""The numbers of ``real-megatron compare``: Table 1 and Table 4 of the paper from the runs' metrics.

Input: for every run label (``real``, ``grpo``, ``real_tau0.1``, ...) the ``metrics.jsonl`` rows of each
seed (``plots.read_metrics``). Held-out pass@1 comes from the evaluation rows: ``eval/<file stem>/pass@1``
per level and ``eval/pass@1``, their mean (the "average" column); one eval file gives only the average.

Per run (one label, one seed):
- start: the evaluation at step 0 (before any RL update: the warm-up model);
- final: the run's final evaluation (``final_eval.py``: every held-out problem, many samples) when there is
  one, else the trainer's last evaluation;
- best: the trainer's evaluation during training (step > 0) with the highest average, with that same
  evaluation's per-level numbers (never a per-level maximum over different steps).

Per label: mean ± sample standard deviation (n − 1 in the denominator; 0 for one seed) over seeds.

With final evaluations, the start row is the warm-up's own final evaluation (one evaluation, the same
sampling seed as every run's: no spread over seeds), and ``paired`` lists every label against REAL and
against the start: the mean of per-seed differences in points of average pass@1 with its 95 % interval
(``stats.paired_difference``), ``resolved`` when the interval excludes 0.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from real_megatron.repro import stats

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


def _final_result(rows: list[dict], final_eval: dict) -> dict:
    levels = {name: lv["pass@1"] for name, lv in final_eval["levels"].items()}
    levels[AVERAGE] = sum(levels.values()) / len(levels)
    trained = [s for s, _ in eval_points(rows) if s > 0]
    return {"step": trained[-1] if trained else None, "pass@1": levels, "source": "final evaluation",
            "standard_error": final_eval.get("standard_error")}


def _points(d: dict) -> dict:
    """A ``paired_difference`` result in points of average pass@1 (the summary's unit)."""
    scale = lambda v: None if v is None else 100 * v  # noqa: E731
    return {"mean_diff": scale(d["mean_diff"]), "ci_low": scale(d["ci_low"]), "ci_high": scale(d["ci_high"]),
            "resolved": d["resolved"], "n_seeds": d["n_seeds"],
            "per_seed": {str(k): 100 * v for k, v in d["per_seed"].items()},
            "se": scale(d["se"]), "se_seeds": scale(d["se_seeds"]), "se_problems": scale(d["se_problems"])}


def paired_table(final_evals: dict[str, dict[int, dict]], start_eval: dict | None, *,
                 reference: str = "real") -> list[dict]:
    """Every label against ``reference`` (when it has final evaluations), then every label against the start."""
    from real_megatron.repro.final_eval import level_rates

    rates = {label: {seed: level_rates(ev) for seed, ev in by_seed.items()} for label, by_seed in final_evals.items()
             if by_seed}
    out = []
    if reference in rates:
        for label, by_seed in rates.items():
            if label != reference and set(by_seed) & set(rates[reference]):
                d = stats.paired_difference(by_seed, rates[reference])
                out.append({"label": label, "vs": reference, **_points(d)})
    if start_eval is not None:
        start = level_rates(start_eval)
        for label, by_seed in rates.items():
            out.append({"label": label, "vs": "start", **_points(stats.paired_difference(by_seed, start))})
    return out


def summarize(runs: dict[str, dict[int, list[dict]]], *, settings: dict | None = None,
              final_evals: dict[str, dict[int, dict]] | None = None, start_eval: dict | None = None) -> dict:
    """``runs[label][seed]`` = that run's metric rows -> the summary (``summary.json``'s content).

    ``final_evals[label][seed]``: that run's final evaluation (``final_eval.py``'s JSON); ``start_eval``: the
    warm-up's. Without a start evaluation, ``start`` is the step-0 evaluation per seed (every loss of a seed
    starts from the same weights with the same evaluation seeds; the first label's run of each seed is
    taken), averaged over seeds.
    """
    final_evals = final_evals or {}
    per_run = {}
    for label, by_seed in runs.items():
        per_run[label] = {}
        for seed, rows in sorted(by_seed.items()):
            result = run_result(rows)
            final_eval = final_evals.get(label, {}).get(seed)
            if final_eval is not None:
                result["final"] = _final_result(rows, final_eval)
            per_run[label][seed] = result
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
    if start_eval is not None:
        values = {name: lv["pass@1"] for name, lv in start_eval["levels"].items()}
        values[AVERAGE] = sum(values.values()) / len(values)
        start = {k: {"mean": v, "std": 0.0, "n": 1} for k, v in values.items()}
    else:
        start_by_seed: dict[int, dict] = {}
        for by_seed in per_run.values():
            for seed, result in by_seed.items():
                if result["start"] is not None:
                    start_by_seed.setdefault(seed, result["start"])
        start = _aggregate([start_by_seed[s] for s in sorted(start_by_seed)])
    summary = {
        "settings": settings or {},
        "levels": levels,
        "start": start,
        "losses": table,
        "ablation": [lb for lb in ABLATION_LABELS if lb in table] + tau_rows,
    }
    evals = [ev for by_seed in final_evals.values() for ev in by_seed.values()] + ([start_eval] if start_eval else [])
    if evals:
        first = evals[0]
        summary["final_eval"] = {
            "samples": first["samples"], "problems_per_level": first["problems_per_level"], "seed": first["seed"],
            "temperature": first["temperature"], "top_p": first["top_p"], "max_new_tokens": first["max_new_tokens"],
            "standard_error_bound": 100 * first["standard_error_bound"],
            "standard_error_max": 100 * max(ev["standard_error"] for ev in evals),
            "standard_error_mean": 100 * sum(ev["standard_error"] for ev in evals) / len(evals),
            "evaluations": len(evals),
            "start_standard_error": 100 * start_eval["standard_error"] if start_eval else None,
            "formula": "SE = (1/L) sqrt(sum_l sum_i r_i (1 - r_i) / ((n - 1) P_l^2)), r_i = c_i / n; "
                       "bound (1/L) sqrt(sum_l 1 / (4 n P_l))",
        }
        summary["paired"] = paired_table(final_evals, start_eval)
    return summary


def _cell(stats: dict | None, key: str) -> str:
    if not stats or key not in stats:
        return "–"
    s = stats[key]
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def _start_cell(stats_: dict | None, key: str) -> str:
    if not stats_ or key not in stats_:
        return "–"
    s = stats_[key]
    return f"{100 * s['mean']:.1f}" if s["n"] == 1 else f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def _interval(p: dict) -> str:
    if p["ci_low"] is None:
        return "– (one seed)"
    return f"[{p['ci_low']:+.1f}, {p['ci_high']:+.1f}]"


def paired_markdown(paired: list[dict], names: dict[str, str]) -> list[str]:
    """The paired table's lines: one row per (label, vs)."""
    lines = ["| | vs | mean of per-seed differences | 95 % interval | seeds | resolved? |", "|---|---|---|---|---|---|"]
    for p in paired:
        vs = "start (warm-up)" if p["vs"] == "start" else names.get(p["vs"], display_name(p["vs"]))
        mark = "**resolved**" if p["resolved"] else "not resolved"
        lines.append(f"| {names.get(p['label'], display_name(p['label']))} | {vs} | {p['mean_diff']:+.1f} | "
                     f"{_interval(p)} | {p['n_seeds']} | {mark} |")
    return lines


def summary_markdown(summary: dict) -> str:
    """Table 1 (final and best, per level and average), the paired differences and Table 4 (ablation) as
    Markdown; pass@1 in %."""
    levels = summary["levels"]
    cols = levels + [AVERAGE]
    header = "| | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    lines = ["# Loss comparison (held-out pass@1, %, mean ± std over seeds)", ""]
    settings = summary.get("settings") or {}
    if settings:
        lines += ["Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), ""]
    fe = summary.get("final_eval")
    if fe:
        problems = "all" if fe["problems_per_level"] == "all" else f"the first {fe['problems_per_level']}"
        lines += [f"Final evaluation: {problems} held-out problems of each level × {fe['samples']} samples "
                  f"(temperature {fe['temperature']:g}, top-p {fe['top_p']:g}, sampling seed {fe['seed']}, the same "
                  f"for every model). Its standard error on the average (evaluation noise, given the problems: "
                  f"{fe['formula']}) is {fe['standard_error_mean']:.2f} points on average over the "
                  f"{fe['evaluations']} evaluations, at most {fe['standard_error_max']:.2f}; "
                  f"≤ {fe['standard_error_bound']:.2f} for any pass rates.", ""]
    start_name = "start (warm-up, one evaluation)" if fe else "start (warm-up)"
    for which, title in (("final", "Final evaluation"),
                         ("best", "Best evaluation during training (by average; the trainer's small evaluations)")):
        lines += [f"## {title}", "", header.rstrip("\n")]
        if summary["start"]:
            lines.append(f"| {start_name} | " + " | ".join(_start_cell(summary["start"], c) for c in cols) + " |")
        for row in summary["losses"].values():
            n = len(row["seeds"])
            lines.append(f"| {row['name']} (n={n}) | " + " | ".join(_cell(row[which], c) for c in cols) + " |")
        lines.append("")
    if summary.get("paired"):
        names = {label: row["name"] for label, row in summary["losses"].items()}
        lines += ["## Paired differences (final evaluation, points of average pass@1)", "",
                  "Per seed the difference of the two runs' averages (same warm-up, prompts and sampling seeds), "
                  "then their mean; 95 % interval from the seeds' spread (Student's t) and a per-problem effect "
                  "shared by the seeds (`repro/stats.py`). *Resolved*: the interval excludes 0. No ranking is "
                  "claimed for pairs that are not resolved.", ""]
        lines += paired_markdown(summary["paired"], names) + [""]
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
