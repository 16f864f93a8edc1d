"""``real-megatron compare``: REAL against its baselines on the chain task, as the paper compares them.

    real-megatron compare --losses real,grpo,dapo,gspo,real_bce,real_no_anchor --seeds 3 --out DIR
                          [--steps N] [--set [LABEL:]key=value ...] [--tau 0.1,0.5,1.0] [--warmup-steps N]

1. the chain task, tokenizer and random base model (``DIR/task``) and one supervised warm-up
   (``DIR/warmup``), both from ``recipe.py``;
2. one RL run per (seed, label) in ``DIR/runs/<label>/seed<k>``, every one from the warm-up's weights;
   the seed fixes the prompt order and every sampling seed, so within a seed only the loss differs.
   ``--tau`` adds REAL runs at those τ (labels ``real_tau<τ>``; τ equal to REAL's own reuses the ``real`` run);
3. ``DIR/summary.json`` / ``DIR/summary.md`` (Tables 1 and 4, ``compare_summary.py``) and
   ``DIR/dynamics.png`` / ``DIR/ablation.png`` (Figures 4 and 5, ``compare_plots.py``), rewritten after
   every finished run.

Every run's configuration is built and validated before anything is written (exit 2 naming the run
and the setting). A finished run (``compare_done.json``) is skipped; an interrupted one resumes from its
checkpoint; a run directory whose saved ``config.yaml`` differs from what would run now is an error (use a
new ``--out``). Runs execute one at a time in this process (2 CPU cores).

``--set key=value`` applies to every RL run, ``--set LABEL:key=value`` to one label's runs (e.g.
``--set gspo:loss.hparams.clip_high=1e-3``); ``--warmup-set`` to the warm-up. The losses' own
hyperparameters are the library's defaults (``losses/hparams.py``: the paper's).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LOSSES = "real,grpo,dapo,gspo,real_bce,real_no_anchor"
# set by compare itself: changing them through --set would break the comparison's invariants
RESERVED_KEYS = ("run_dir", "seed", "loss.name", "model.hf_dir", "data.train_files", "data.eval_files")
DONE_MARKER = "compare_done.json"


class CompareError(ValueError):
    """A bad argument: reported with exit code 2 before anything starts."""


@dataclass(frozen=True)
class RunSpec:
    """One RL run: ``label`` names it in the tables (a loss name or ``real_tau<τ>``)."""

    label: str
    loss: str
    seed: int
    overrides: tuple[str, ...]  # after recipe.rl_overrides: the label's τ, then --set entries

    def run_dir(self, out: Path) -> Path:
        return out / "runs" / self.label / f"seed{self.seed}"


def _parse_sets(items: list[str], labels: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """``--set`` entries -> (for every run, per label); reserved keys and unknown labels are errors."""
    common, per_label = [], {}
    for item in items:
        if "=" not in item:
            raise CompareError(f"--set {item!r} is not of the form [LABEL:]key=value (e.g. eval.max_prompts=20)")
        key = item.split("=", 1)[0]
        label = None
        if ":" in key:
            label, item = item.split(":", 1)
            key = item.split("=", 1)[0]
            if label not in labels:
                raise CompareError(f"--set {label}:{item}: {label!r} is not a run label of this comparison {labels}")
        if key.strip() in RESERVED_KEYS:
            raise CompareError(f"--set {item}: {key} is set by compare for every run (reserved: {list(RESERVED_KEYS)}); "
                               "choose the losses with --losses and the seeds with --seeds")
        (per_label.setdefault(label, []) if label else common).append(item)
    return common, per_label


def _parse_taus(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        taus = [float(t) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise CompareError(f"--tau {text!r}: expected comma-separated positive numbers, e.g. 0.1,0.5,1.0") from err
    bad = [t for t in taus if not (math.isfinite(t) and t > 0)]
    if bad:
        raise CompareError(f"--tau {text!r}: τ must be a positive finite number, got {bad}")
    return taus


def plan_runs(args) -> tuple[list[RunSpec], list[str]]:
    """Every run of the comparison (seed-major, so each finished seed is a complete comparison) and the
    warm-up's extra overrides; each run's config is loaded and validated here. Writes nothing."""
    from real_megatron.config import ConfigError, load_config, validate_config
    from real_megatron.losses import LOSSES, check_loss_name
    from real_megatron.repro.recipe import ChainAssets, rl_overrides, warmup_overrides

    losses = [name.strip() for name in args.losses.split(",") if name.strip()]
    if not losses:
        raise CompareError("--losses is empty; e.g. --losses real,grpo")
    for name in losses:
        try:
            check_loss_name(name)
        except ValueError as err:
            raise CompareError(f"--losses: {err}") from err
    if len(set(losses)) != len(losses):
        raise CompareError(f"--losses {args.losses!r} names a loss twice")
    for flag in ("seeds", "steps", "warmup_steps"):
        if getattr(args, flag) < 1:
            raise CompareError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    taus = _parse_taus(args.tau)
    labels = {name: (name, ()) for name in losses}
    for tau in taus:
        labels[f"real_tau{tau:g}"] = ("real", (f"loss.hparams.tau={tau!r}",))
    common, per_label = _parse_sets(args.set, list(labels))

    out = Path(args.out).resolve()
    todo = out / "task" / "<not written yet>"  # validation reads no file: placeholders until the task exists
    placeholder = ChainAssets(todo, todo, (todo,), todo)
    init_dir = out / "warmup" / "hf"
    specs, configs = [], {}
    for seed in range(1, args.seeds + 1):
        for label, (loss, own) in labels.items():
            spec = RunSpec(label, loss, seed, tuple(own) + tuple(common) + tuple(per_label.get(label, ())))
            overrides = rl_overrides(placeholder, init_dir=init_dir, run_dir=spec.run_dir(out), loss=loss, seed=seed,
                                     steps=args.steps) + list(spec.overrides)
            try:
                cfg = load_config(None, overrides)
                validate_config(cfg)
            except (ConfigError, ValueError) as err:
                raise CompareError(f"run {label} (seed {seed}): {err}") from err
            configs[(label, seed)] = cfg
            specs.append(spec)
    # a τ equal to the `real` run's own τ is that run: no duplicate training
    real_tau = {seed: configs[("real", seed)].loss.hparams.get("tau", LOSSES["real"].DEFAULTS["tau"])
                for seed in range(1, args.seeds + 1) if ("real", seed) in configs}
    specs = [s for s in specs if not (s.label.startswith("real_tau") and s.seed in real_tau and float(s.label[len("real_tau"):]) == real_tau[s.seed])]
    try:
        validate_config(load_config(None, warmup_overrides(placeholder, run_dir=out / "warmup", steps=args.warmup_steps)
                                    + list(args.warmup_set)))
    except (ConfigError, ValueError) as err:
        raise CompareError(f"--warmup-set: {err}") from err
    return specs, list(args.warmup_set)


def _rss_gib() -> float:
    """This process's resident memory now (GiB): the runs share it, so a leak between runs shows here."""
    import os

    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:  # no /proc (not Linux)
        return float("nan")


def _run_training(cfg) -> int:
    import torch.distributed as dist

    from real_megatron.trainer import train

    try:
        return train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _write_outputs(out: Path, specs: list[RunSpec], settings: dict) -> dict:
    """Summary and figures over the finished runs (rewritten after each one)."""
    from real_megatron.plots import read_metrics
    from real_megatron.repro.figures import plot_ablation, plot_dynamics
    from real_megatron.repro.summary import summarize, write_summary

    runs: dict[str, dict[int, list[dict]]] = {}
    for spec in specs:
        d = spec.run_dir(out)
        if (d / DONE_MARKER).exists():
            runs.setdefault(spec.label, {})[spec.seed] = read_metrics(d)
    summary = summarize(runs, settings=settings)
    write_summary(out, summary)
    if runs:
        plot_dynamics(runs, out / "dynamics.png")
        plot_ablation(runs, out / "ablation.png")
    return summary


def run_comparison(args) -> int:
    from real_megatron.checkpoint import atomic_write_text as write_text_atomic
    from real_megatron.config import load_config
    from real_megatron.job_runner import setup_logging
    from real_megatron.repro.recipe import build_chain_assets, check_saved_config, rl_overrides, run_warmup
    from real_megatron.repro.summary import summary_markdown

    specs, warmup_extra = plan_runs(args)  # raises CompareError before anything is written
    out = Path(args.out).resolve()
    settings = {"losses": args.losses, "seeds": args.seeds, "steps": args.steps, "tau": args.tau or "",
                "warmup_steps": args.warmup_steps, "set": list(args.set), "warmup_set": list(args.warmup_set)}
    setup_logging()
    started = time.perf_counter()
    assets = build_chain_assets(out / "task")
    configs = {}
    for spec in specs:
        configs[spec] = load_config(None, rl_overrides(assets, init_dir=out / "warmup" / "hf", run_dir=spec.run_dir(out),
                                                       loss=spec.loss, seed=spec.seed, steps=args.steps)
                                    + list(spec.overrides))
        try:
            check_saved_config(spec.run_dir(out), configs[spec])
        except ValueError as err:
            raise CompareError(str(err)) from err
    print(f"[compare] warm-up ({args.warmup_steps} steps) -> {out / 'warmup'}", flush=True)
    t0 = time.perf_counter()
    init_dir = run_warmup(out / "warmup", assets, steps=args.warmup_steps, extra=warmup_extra)
    print(f"[compare] warm-up ready: {init_dir} ({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)

    for i, spec in enumerate(specs, 1):
        run_dir = spec.run_dir(out)
        head = f"[compare] run {i}/{len(specs)}: {spec.label} seed {spec.seed}"
        if (run_dir / DONE_MARKER).exists():
            print(f"{head}: finished before, skipped ({run_dir})", flush=True)
            continue
        resuming = (run_dir / "checkpoints").exists()
        print(f"{head} -> {run_dir}{' (resuming from its checkpoint)' if resuming else ''}", flush=True)
        t0 = time.perf_counter()
        code = _run_training(configs[spec])
        minutes = (time.perf_counter() - t0) / 60
        if code != 0:
            _write_outputs(out, specs, settings)
            print(f"{head}: stopped with exit code {code} after {minutes:.1f} min; rerun the same command to resume. "
                  f"Summary of the finished runs: {out / 'summary.md'}", flush=True)
            return code
        write_text_atomic(run_dir / DONE_MARKER, json.dumps({"label": spec.label, "loss": spec.loss, "seed": spec.seed,
                                                             "minutes": minutes}) + "\n")
        print(f"{head}: done in {minutes:.1f} min (process memory {_rss_gib():.2f} GiB)", flush=True)
        _write_outputs(out, specs, settings)

    summary = _write_outputs(out, specs, settings)
    print("\n" + summary_markdown(summary))
    print(f"[compare] {len(specs)} runs, {(time.perf_counter() - started) / 60:.1f} min in this invocation\n"
          f"[compare] summary: {out / 'summary.md'} and {out / 'summary.json'}\n"
          f"[compare] figures: {out / 'dynamics.png'} (Figure 4), {out / 'ablation.png'} (Figure 5)", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from real_megatron.repro.recipe import RL_STEPS, WARMUP_STEPS

    parser = argparse.ArgumentParser(prog="real-megatron compare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--losses", default=DEFAULT_LOSSES, help=f"comma-separated losses (default {DEFAULT_LOSSES})")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N per loss (default 3)")
    parser.add_argument("--out", required=True, help="output directory (rerun the same command to resume)")
    parser.add_argument("--steps", type=int, default=RL_STEPS, help=f"rollout batches per run (default {RL_STEPS})")
    parser.add_argument("--tau", default=None, help="REAL's τ sweep, e.g. 0.1,0.5,1.0 (adds runs real_tau<τ>)")
    parser.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS,
                        help=f"supervised warm-up steps (default {WARMUP_STEPS})")
    parser.add_argument("--set", action="append", default=[], metavar="[LABEL:]KEY=VALUE",
                        help="config override for every RL run, or one label's runs (repeatable)")
    parser.add_argument("--warmup-set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the warm-up (repeatable)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_comparison(args)
    except CompareError as err:
        print(f"real-megatron compare: {err}", file=sys.stderr)
        return 2
