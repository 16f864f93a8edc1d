"""``real-megatron compare``: REAL against its baselines on the chain task, as the paper compares them.

    real-megatron compare --losses real,grpo,dapo,gspo,real_bce,real_no_anchor --seeds 3 --out DIR
                          [--steps N] [--set [LABEL:]key=value ...] [--tau 0.1,0.5,1.0] [--warmup-steps N]
                          [--final-samples 20] [--final-problems 0] [--preset stress] [--cells u8_lr3e-4,...]
                          [--variant LABEL=LOSS ...] [--jobs N] [--dry-run]

1. the chain task, tokenizer and random base model (``DIR/task``) and one supervised warm-up
   (``DIR/warmup``), both from ``recipe.py``; the warm-up's final evaluation (the start row), once;
2. one RL run per (seed, label) in ``DIR/runs/<label>/seed<k>``, every one from the warm-up's weights;
   the seed fixes the prompt order and every sampling seed, so within a seed only the loss differs.
   ``--tau`` adds REAL runs at those τ (labels ``real_tau<τ>``; τ equal to REAL's own reuses the ``real`` run);
3. each finished run's final evaluation (``final_eval.py``: every held-out problem of every level ×
   ``--final-samples``, one sampling seed for every model; standard error <= 0.5 points by default);
4. ``DIR/summary.json`` / ``DIR/summary.md`` (Tables 1 and 4 and the paired differences, ``summary.py`` and
   ``stats.py``) and ``DIR/dynamics.png`` / ``DIR/ablation.png`` (Figures 4 and 5, ``figures.py``), rewritten
   after every finished run.

``--preset stress`` sweeps the step size (``stress.py``): cells of updates per rollout batch × learning rate
(``--cells``, default ``u4_lr1e-4,u8_lr1e-4,u4_lr3e-4,u8_lr3e-4``) for every loss, plus REAL at τ = 1 (``--tau``
overrides it); runs of a cell in ``DIR/runs/<cell>/<label>/seed<k>`` (the cell with the plain comparison's
settings in the plain comparison's directories, so a plain ``compare`` into the same ``DIR`` shares them);
outputs ``DIR/stress_summary.{json,md}``, ``DIR/stress.png`` and ``DIR/stress_dynamics_<cell>.png``.

Every run's configuration is built and validated before anything is written (exit 2 naming the run
and the setting). A finished run (``compare_done.json``) is skipped; an interrupted one resumes from its
checkpoint; a run directory whose saved ``config.yaml`` differs from what would run now is an error (use a
new ``--out``). Runs execute one at a time in this process; ``--jobs N`` adds N − 1 worker processes on the
same ``DIR`` (one CPU thread each) after the warm-up. Any second ``compare`` process on the same ``DIR`` skips
the runs another one holds (a lock per run directory) and waits for them at the end.

``--set key=value`` applies to every RL run, ``--set LABEL:key=value`` to one label's runs (e.g.
``--set gspo:loss.hparams.clip_high=1e-3``); ``--warmup-set`` to the warm-up. ``--variant LABEL=LOSS`` adds runs
of a loss under a label of their own, to be set apart with ``--set LABEL:...`` (asynchronous REAL against the
synchronous one: ``--variant real_s1=real --set real_s1:train.max_staleness=1``); the paired table compares
every label with ``real``. The losses' own hyperparameters are their defaults (each loss class's ``DEFAULTS``:
the paper's).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_LOSSES = "real,grpo,dapo,gspo,real_bce,real_no_anchor"
# set by compare itself: changing them through --set would break the comparison's invariants
RESERVED_KEYS = ("run_dir", "seed", "loss.name", "model.hf_dir", "data.train_files", "data.eval_files")
DONE_MARKER = "compare_done.json"


class CompareError(ValueError):
    """A bad argument: reported with exit code 2 before anything starts."""


# what every run logs beyond the recipe: each optimizer step's size (the stress table's ‖Δθ‖/‖θ‖ column)
MEASURED = ("logging.update_size=true",)


@dataclass(frozen=True)
class RunSpec:
    """One RL run: ``label`` names it in the tables (a loss name or ``real_tau<τ>``); ``cell`` the stress
    cell (None: the plain comparison's settings)."""

    label: str
    loss: str
    seed: int
    overrides: tuple[str, ...]  # after recipe.rl_overrides: the cell's settings, the label's τ, then --set entries
    cell: str | None = None

    def run_dir(self, out: Path) -> Path:
        base = out / "runs" if self.cell is None else out / "runs" / self.cell
        return base / self.label / f"seed{self.seed}"


@dataclass
class Plan:
    """What ``plan_runs`` decided besides the runs: the final evaluation's protocol and the sweep's cells."""

    warmup_extra: list[str]
    final: dict  # samples, problems, temperature, top_p, max_new_tokens, max_prompt_length, reward_timeout_s
    cells: list | None = None  # stress.Cell list; None: a plain comparison
    cell_of: dict = field(default_factory=dict)  # cell name -> RunSpec.cell (None for the plain settings' cell)


_LABEL = re.compile(r"^[a-z][a-z0-9_.]*$")


def _parse_variants(items: list[str], labels: dict) -> list[tuple[str, str]]:
    """``--variant LABEL=LOSS`` entries -> (label, loss): more runs of a loss under their own label, told apart
    by ``--set LABEL:key=value`` (e.g. ``real_s1=real`` with ``--set real_s1:train.max_staleness=1``)."""
    from real_megatron.losses import check_loss_name

    out, seen = [], set(labels)
    for item in items:
        label, _, loss = item.partition("=")
        label, loss = label.strip(), loss.strip()
        if not _LABEL.match(label) or not loss:
            raise CompareError(f"--variant {item!r} is not of the form LABEL=LOSS (e.g. real_s1=real; a label is "
                               "lower-case letters, digits, '_' and '.')")
        if label in seen:
            raise CompareError(f"--variant {item!r}: the label {label!r} is already a run label of this comparison")
        try:
            check_loss_name(loss)
        except ValueError as err:
            raise CompareError(f"--variant {item!r}: {err}") from err
        seen.add(label)
        out.append((label, loss))
    return out


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
            raise CompareError(f"--set {item}: {key} is set by compare for every run "
                               f"(reserved: {list(RESERVED_KEYS)}); "
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


def plan_runs(args) -> tuple[list[RunSpec], Plan]:
    """Every run of the comparison (seed-major, so each finished seed is a complete comparison) and the
    plan (warm-up overrides, final evaluation, cells); each run's config is loaded and validated here.
    Writes nothing."""
    from real_megatron.config import ConfigError, load_config, validate_config
    from real_megatron.losses import LOSSES, check_loss_name
    from real_megatron.repro import stress
    from real_megatron.repro.recipe import ChainAssets, rl_overrides, warmup_overrides
    from real_megatron.run_dir import check_writable_dir

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
    for flag in ("seeds", "steps", "warmup_steps", "jobs"):
        if getattr(args, flag) < 1:
            raise CompareError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.final_samples < 2:
        raise CompareError(f"--final-samples must be >= 2 (the standard error needs two samples per problem), "
                           f"got {args.final_samples}")
    if args.final_problems < 0:
        raise CompareError(f"--final-problems must be >= 0 (0: every problem), got {args.final_problems}")
    sweep = args.preset == "stress" or args.cells is not None
    tau_text = args.tau if args.tau is not None else (stress.STRESS_TAU if args.preset == "stress" else None)
    taus = _parse_taus(tau_text)
    labels = {name: (name, ()) for name in losses}
    for tau in taus:
        labels[f"real_tau{tau:g}"] = ("real", (f"loss.hparams.tau={tau!r}",))
    for label, loss in _parse_variants(args.variant, labels):
        labels[label] = (loss, ())
    common, per_label = _parse_sets(args.set, list(labels))
    if sweep:
        for item in [*common, *(x for v in per_label.values() for x in v)]:
            if item.split("=", 1)[0].strip() in stress.SWEPT_KEYS:
                raise CompareError(f"--set {item}: the stress cells set {item.split('=', 1)[0].strip()} per cell; "
                                   "choose the cells with --cells, e.g. --cells u4_lr1e-4,u8_lr3e-4")

    out = Path(args.out).resolve()
    try:
        check_writable_dir(out, "--out")
    except ConfigError as err:
        raise CompareError(str(err)) from None
    todo = out / "task" / "<not written yet>"  # validation reads no file: placeholders until the task exists
    placeholder = ChainAssets(todo, todo, (todo,), todo)
    init_dir = out / "warmup" / "hf"

    def build(overrides: list[str], what: str):
        try:
            cfg = load_config(None, overrides)
            validate_config(cfg)
        except (ConfigError, ValueError) as err:
            raise CompareError(f"{what}: {err}") from err
        return cfg

    base = build(rl_overrides(placeholder, init_dir=init_dir, run_dir=out / "runs" / "_base", loss="real", seed=1,
                              steps=args.steps) + common, "--set")
    cells: list = [None]
    cell_of: dict = {}
    if sweep:
        try:
            cells = stress.parse_cells(args.cells if args.cells is not None else stress.STRESS_CELLS,
                                       base.train.rollout_batch_prompts)
        except ValueError as err:
            raise CompareError(str(err)) from err
        for cell in cells:
            plain = (cell.staleness is None and cell.lr == base.optim.lr
                     and cell.updates * base.train.mini_batch_prompts == base.train.rollout_batch_prompts)
            cell_of[cell.name] = None if plain else cell.name
    specs, configs = [], {}
    for seed in range(1, args.seeds + 1):
        # the cell that shares the plain comparison's runs goes last: a plain compare on the same DIR runs those first
        ordered = sorted(cells, key=lambda c: c is not None and cell_of[c.name] is None)
        for cell in ordered:
            cell_overrides = tuple(cell.overrides(base.train.rollout_batch_prompts)) if cell is not None else ()
            where = None if cell is None else cell_of[cell.name]
            for label, (loss, own) in labels.items():
                spec = RunSpec(label, loss, seed, MEASURED + cell_overrides + tuple(own) + tuple(common)
                               + tuple(per_label.get(label, ())), where)
                name = f"run {label} (seed {seed}{'' if cell is None else ', cell ' + cell.name})"
                configs[(label, seed, where)] = build(
                    rl_overrides(placeholder, init_dir=init_dir, run_dir=spec.run_dir(out), loss=loss, seed=seed,
                                 steps=args.steps) + list(spec.overrides), name)
                specs.append(spec)
    # a τ equal to the `real` run's own τ is that run: no duplicate training
    real_tau = {(seed, where): configs[("real", seed, where)].loss.hparams.get("tau", LOSSES["real"].DEFAULTS["tau"])
                for (label, seed, where) in configs if label == "real"}
    specs = [s for s in specs if not (s.label.startswith("real_tau") and (s.seed, s.cell) in real_tau
                                      and float(s.label[len("real_tau"):]) == real_tau[(s.seed, s.cell)])]
    build(warmup_overrides(placeholder, run_dir=out / "warmup", steps=args.warmup_steps) + list(args.warmup_set),
          "--warmup-set")
    final = {"samples": args.final_samples, "problems": args.final_problems, "temperature": base.eval.temperature,
             "top_p": base.eval.top_p, "max_new_tokens": base.eval.max_new_tokens,
             "max_prompt_length": base.data.max_prompt_length, "reward_timeout_s": base.reward.timeout_s}
    return specs, Plan(list(args.warmup_set), final, cells if sweep else None, cell_of)


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

    from real_megatron.losses import build_loss
    from real_megatron.parts import build_parts
    from real_megatron.run_dir import NothingToDo
    from real_megatron.trainer import Trainer

    try:
        trainer = Trainer(build_parts(cfg, build_loss(cfg.loss.name, cfg.loss.hparams)))
        return trainer.run()
    except NothingToDo:  # trained to the end before it was marked done (stopped after training)
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def _lock(path: Path, *, wait: bool):
    """An exclusive lock on ``path`` (created), held while the block runs; yields False when ``wait`` is off
    and another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cpu_minutes() -> float:
    """CPU time (user + system) of this process and its reaped children so far, in minutes: the work done,
    whatever else shares the cores."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime) / 60


def _drop_results(run_dir: Path) -> None:
    """Before an unfinished run trains: remove what compare itself wrote into it (final evaluations, weight
    drift). They are stale (redone after training), and the trainer refuses a run directory holding files
    that are not a run's own."""
    if run_dir.is_dir():
        for path in [*run_dir.glob("final_eval_n*.json"), run_dir / "weight_drift.json"]:
            path.unlink(missing_ok=True)


def _final_eval_of(run_dir: Path, plan: Plan) -> Path:
    from real_megatron.repro.final_eval import final_eval_path

    return final_eval_path(run_dir, plan.final["samples"], plan.final["problems"])


def _evaluate(model_dir: Path, run_dir: Path, assets, plan: Plan, head: str) -> None:
    from real_megatron.repro.final_eval import run_final_evaluation
    from real_megatron.repro.recipe import FINAL_EVAL_SEED

    f = plan.final
    result = run_final_evaluation(model_dir, assets.eval_files, _final_eval_of(run_dir, plan), samples=f["samples"],
                                  problems=f["problems"], temperature=f["temperature"], top_p=f["top_p"],
                                  max_new_tokens=f["max_new_tokens"], max_prompt_length=f["max_prompt_length"],
                                  seed=FINAL_EVAL_SEED, reward_timeout_s=f["reward_timeout_s"])
    per_level = " ".join(f"{k[len('level'):] if k.startswith('level') else k}:{100 * v['pass@1']:.1f}"
                         for k, v in result["levels"].items())
    print(f"{head}: final evaluation {100 * result['pass@1']:.1f} ± {100 * result['standard_error']:.2f} (SE) "
          f"[{per_level}] in {result['seconds']:.0f} s", flush=True)


def _collect(out: Path, specs: list[RunSpec], plan: Plan):
    """The finished runs' metric rows, final evaluations, dynamics and drifts, by cell, label and seed."""
    from real_megatron.plots import read_metrics
    from real_megatron.repro.final_eval import read_final_eval
    from real_megatron.repro.stress import run_dynamics

    runs, finals, dyn, drifts = {}, {}, {}, {}
    for spec in specs:
        d = spec.run_dir(out)
        if not (d / DONE_MARKER).exists():
            continue
        rows = read_metrics(d)
        runs.setdefault(spec.cell, {}).setdefault(spec.label, {})[spec.seed] = rows
        dyn.setdefault(spec.cell, {}).setdefault(spec.label, {})[spec.seed] = run_dynamics(rows)
        final = read_final_eval(_final_eval_of(d, plan))
        if final is not None:
            finals.setdefault(spec.cell, {}).setdefault(spec.label, {})[spec.seed] = final
        if (d / "weight_drift.json").exists():
            drift = json.loads((d / "weight_drift.json").read_text())["relative_drift"]
            drifts.setdefault(spec.cell, {}).setdefault(spec.label, {})[spec.seed] = drift
    return runs, finals, dyn, drifts


def _write_outputs(out: Path, specs: list[RunSpec], plan: Plan, settings: dict) -> dict:
    """Summary and figures over the finished runs (rewritten after each one): ``summary.*`` and Figures 4/5
    for a plain comparison, ``stress_summary.*`` and ``stress*.png`` for a sweep."""
    from real_megatron.checkpoint import atomic_write_text
    from real_megatron.repro import stress
    from real_megatron.repro.figures import plot_ablation, plot_dynamics
    from real_megatron.repro.final_eval import read_final_eval
    from real_megatron.repro.summary import summarize, write_summary

    runs, finals, dyn, drifts = _collect(out, specs, plan)
    start_eval = read_final_eval(_final_eval_of(out / "warmup", plan))
    if plan.cells is None:
        summary = summarize(runs.get(None, {}), settings=settings, final_evals=finals.get(None, {}),
                            start_eval=start_eval)
        write_summary(out, summary)
        if runs.get(None):
            plot_dynamics(runs[None], out / "dynamics.png")
            plot_ablation(runs[None], out / "ablation.png")
        return summary
    per_cell, by_name = {}, {}
    for cell in plan.cells:
        where = plan.cell_of[cell.name]
        if runs.get(where):
            per_cell[cell.name] = summarize(runs[where], settings=settings, final_evals=finals.get(where, {}),
                                            start_eval=start_eval)
            plot_dynamics(runs[where], out / f"stress_dynamics_{cell.name}.png")
        by_name[cell.name] = where
    summary = stress.stress_summary(plan.cells, per_cell, {c: dyn.get(w, {}) for c, w in by_name.items()},
                                    {c: drifts.get(w, {}) for c, w in by_name.items()}, settings=settings)
    atomic_write_text(out / "stress_summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out / "stress_summary.md", stress.stress_markdown(summary))
    if summary["cells"]:
        stress.plot_stress(summary, out / "stress.png")
    return summary


def _finish_run(spec: RunSpec, run_dir: Path, out: Path, assets, plan: Plan, head: str, minutes: float | None) -> None:
    """After training: the final evaluation, the weight drift, then the done marker (a rerun redoes what is missing)."""
    from real_megatron.checkpoint import atomic_write_text
    from real_megatron.repro.stress import weight_drift

    t0 = time.perf_counter()
    if not _final_eval_of(run_dir, plan).exists():
        _evaluate(run_dir / "hf_final", run_dir, assets, plan, head)
    if not (run_dir / "weight_drift.json").exists():
        drift = weight_drift(out / "warmup" / "hf", run_dir / "hf_final")
        atomic_write_text(run_dir / "weight_drift.json", json.dumps({"relative_drift": drift}) + "\n")
    if not (run_dir / DONE_MARKER).exists():
        atomic_write_text(run_dir / DONE_MARKER, json.dumps({
            "label": spec.label, "loss": spec.loss, "seed": spec.seed, "cell": spec.cell, "minutes": minutes,
            "final_eval_s": time.perf_counter() - t0}) + "\n")


def run_comparison(args) -> int:
    from real_megatron.config import load_config
    from real_megatron.job_runner import setup_logging
    from real_megatron.repro.recipe import build_chain_assets, check_saved_config, rl_overrides, run_warmup

    specs, plan = plan_runs(args)  # raises CompareError before anything is written
    out = Path(args.out).resolve()
    if args.dry_run:
        f = plan.final
        print(f"[compare] dry run: {len(specs)} runs into {out} (nothing written)")
        if plan.cells is not None:
            print("[compare] cells: " + ", ".join(f"{c.name} ({c.updates} updates per rollout batch, lr {c.lr:g})"
                                                  for c in plan.cells))
        for i, spec in enumerate(specs, 1):
            extra = " ".join(spec.overrides)
            print(f"[compare]   {i}. {spec.label} seed {spec.seed} -> {spec.run_dir(out)}"
                  f"{'  ' + extra if extra else ''}")
        print(f"[compare] final evaluation: {'all' if not f['problems'] else f['problems']} problems per level x "
              f"{f['samples']} samples (temperature {f['temperature']:g}, top-p {f['top_p']:g}), the warm-up's too")
        return 0
    settings = {"preset": args.preset or "", "losses": args.losses, "seeds": args.seeds, "steps": args.steps,
                "tau": args.tau if args.tau is not None else "", "variant": list(args.variant),
                "warmup_steps": args.warmup_steps,
                "final_samples": args.final_samples, "final_problems": args.final_problems or "all",
                "set": list(args.set), "warmup_set": list(args.warmup_set)}
    if plan.cells is not None:
        settings["cells"] = ",".join(c.name for c in plan.cells)
    setup_logging()
    started, cpu_started = time.perf_counter(), _cpu_minutes()
    out.mkdir(parents=True, exist_ok=True)
    with _lock(out / ".warmup.lock", wait=True):
        assets = build_chain_assets(out / "task")
        configs = {}
        for spec in specs:
            configs[spec] = load_config(None, rl_overrides(assets, init_dir=out / "warmup" / "hf",
                                                           run_dir=spec.run_dir(out), loss=spec.loss, seed=spec.seed,
                                                           steps=args.steps) + list(spec.overrides))
            try:
                check_saved_config(spec.run_dir(out), configs[spec])
            except ValueError as err:
                raise CompareError(str(err)) from err
        print(f"[compare] warm-up ({args.warmup_steps} steps) -> {out / 'warmup'}", flush=True)
        t0 = time.perf_counter()
        init_dir = run_warmup(out / "warmup", assets, steps=args.warmup_steps, extra=plan.warmup_extra)
        print(f"[compare] warm-up ready: {init_dir} ({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
        if not _final_eval_of(out / "warmup", plan).exists():
            _evaluate(init_dir, out / "warmup", assets, plan, "[compare] warm-up (the start row)")

    def one(i: int, spec: RunSpec, *, wait: bool) -> int | None:
        run_dir = spec.run_dir(out)
        cell = "" if spec.cell is None else f" [{spec.cell}]"
        who = f"[compare worker {args.worker}]" if args.worker else "[compare]"
        head = f"{who} run {i}/{len(specs)}: {spec.label}{cell} seed {spec.seed}"
        done = (run_dir / DONE_MARKER).exists()
        if done and _final_eval_of(run_dir, plan).exists():
            print(f"{head}: finished before, skipped ({run_dir})", flush=True)
            return 0
        with _lock(run_dir / ".compare.lock", wait=wait) as held:
            if not held:
                print(f"{head}: another compare process holds {run_dir}; back to it at the end", flush=True)
                return None
            if (run_dir / DONE_MARKER).exists() and _final_eval_of(run_dir, plan).exists():
                print(f"{head}: finished by another compare process, skipped ({run_dir})", flush=True)
                return 0
            minutes = cpu = None
            if not (run_dir / DONE_MARKER).exists():
                resuming = (run_dir / "checkpoints").exists()
                print(f"{head} -> {run_dir}{' (resuming from its checkpoint)' if resuming else ''}", flush=True)
                t0, cpu0 = time.perf_counter(), _cpu_minutes()
                _drop_results(run_dir)
                code = _run_training(configs[spec])
                minutes, cpu = (time.perf_counter() - t0) / 60, _cpu_minutes() - cpu0
                if code != 0:
                    _write_outputs(out, specs, plan, settings)
                    print(f"{head}: stopped with exit code {code} after {minutes:.1f} min; rerun the same command to "
                          f"resume. Summary of the finished runs: {out}", flush=True)
                    return code
            _finish_run(spec, run_dir, out, assets, plan, head, minutes)
            timing = f"trained in {minutes:.1f} min ({cpu:.1f} CPU min), " if minutes is not None else ""
            print(f"{head}: done ({timing}process memory {_rss_gib():.2f} GiB)", flush=True)
        _write_outputs(out, specs, plan, settings)
        return 0

    workers = []
    if args.jobs > 1 and not args.worker:  # after the warm-up: every process starts from its weights
        import subprocess

        import torch

        torch.set_num_threads(1)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for k in range(2, args.jobs + 1):
            workers.append(subprocess.Popen([sys.executable, "-m", "real_megatron", "compare", *args.argv,
                                             "--jobs", "1", "--worker", str(k)], env=env))
        print(f"[compare] {args.jobs} processes on {out}, one CPU thread each (workers: "
              f"{', '.join(str(w.pid) for w in workers)})", flush=True)
    deferred = []
    code = 0
    for i, spec in enumerate(specs, 1):
        code = one(i, spec, wait=False)
        if code is None:
            deferred.append((i, spec))
            code = 0
        elif code != 0:
            break
    for i, spec in deferred if code == 0 else ():
        code = one(i, spec, wait=True)
        if code:
            break
    failed = [w.pid for w in workers if w.wait() != 0]
    if code or failed:
        if failed:
            print(f"[compare] worker process(es) {failed} failed; rerun the same command to resume", flush=True)
        return code or 1
    if args.worker:
        return 0

    summary = _write_outputs(out, specs, plan, settings)
    minutes = (time.perf_counter() - started) / 60
    timing = f"{minutes:.1f} min in this invocation ({_cpu_minutes() - cpu_started:.1f} CPU min; load average " \
             f"{' '.join(f'{x:.1f}' for x in os.getloadavg())})"
    if plan.cells is None:
        from real_megatron.repro.summary import summary_markdown

        print("\n" + summary_markdown(summary))
        print(f"[compare] {len(specs)} runs, {timing}\n"
              f"[compare] summary: {out / 'summary.md'} and {out / 'summary.json'}\n"
              f"[compare] figures: {out / 'dynamics.png'} (Figure 4), {out / 'ablation.png'} (Figure 5)", flush=True)
    else:
        from real_megatron.repro.stress import stress_markdown

        print("\n" + stress_markdown(summary))
        print(f"[compare] {len(specs)} runs, {timing}\n"
              f"[compare] stress summary: {out / 'stress_summary.md'} and {out / 'stress_summary.json'}\n"
              f"[compare] figures: {out / 'stress.png'}, {out}/stress_dynamics_<cell>.png", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from real_megatron.repro.recipe import FINAL_EVAL_SAMPLES, RL_STEPS, WARMUP_STEPS
    from real_megatron.repro.stress import STRESS_CELLS

    parser = argparse.ArgumentParser(prog="real-megatron compare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--losses", default=DEFAULT_LOSSES, help=f"comma-separated losses (default {DEFAULT_LOSSES})")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N per loss (default 3)")
    parser.add_argument("--out", required=True, help="output directory (rerun the same command to resume)")
    parser.add_argument("--steps", type=int, default=RL_STEPS, help=f"rollout batches per run (default {RL_STEPS})")
    parser.add_argument("--tau", default=None, help="REAL's τ sweep, e.g. 0.1,0.5,1.0 (adds runs real_tau<τ>)")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=LOSS",
                        help="more runs of LOSS under LABEL (repeatable), set apart with --set LABEL:KEY=VALUE, e.g. "
                             "--variant real_s1=real --set real_s1:train.max_staleness=1")
    parser.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS,
                        help=f"supervised warm-up steps (default {WARMUP_STEPS})")
    parser.add_argument("--set", action="append", default=[], metavar="[LABEL:]KEY=VALUE",
                        help="config override for every RL run, or one label's runs (repeatable)")
    parser.add_argument("--warmup-set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the warm-up (repeatable)")
    parser.add_argument("--final-samples", type=int, default=FINAL_EVAL_SAMPLES,
                        help=f"samples per problem in each run's final evaluation (default {FINAL_EVAL_SAMPLES}: "
                             "standard error <= 0.5 points over 5 levels x 100 problems)")
    parser.add_argument("--final-problems", type=int, default=0,
                        help="first N held-out problems per level in the final evaluation (default 0: all)")
    parser.add_argument("--preset", choices=("stress",), default=None,
                        help="stress: sweep updates per rollout batch x learning rate (--cells, default "
                             f"{STRESS_CELLS}) for every loss, plus REAL at tau=1 (unless --tau); writes "
                             "stress_summary.md/.json and stress.png")
    parser.add_argument("--jobs", type=int, default=1,
                        help="compare processes working on --out at once, one CPU thread each (default 1; 2 on a "
                             "2-core machine runs two trainings side by side)")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)  # set by --jobs for its processes
    parser.add_argument("--dry-run", action="store_true",
                        help="validate every run's configuration and print the plan (runs, directories, final "
                             "evaluation); write nothing")
    parser.add_argument("--cells", default=None, metavar="u<UPDATES>_lr<LR>,...",
                        help="the sweep's cells, e.g. u4_lr1e-4,u8_lr3e-4 (implies a sweep; default with "
                             "--preset stress: all four)")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = [a for a in argv]  # a --jobs worker gets the same command (its own --jobs/--worker come last)
    try:
        return run_comparison(args)
    except CompareError as err:
        print(f"real-megatron compare: {err}", file=sys.stderr)
        return 2
