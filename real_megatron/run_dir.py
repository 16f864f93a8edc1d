"""A run directory is the user's data: an owner, a settings record, and checks that refuse before anything is written.

Every ``train`` / ``sft`` run directory holds ``run.json`` (``{"job": "train" | "sft", ...}``, written first,
before anything else) and ``config.yaml`` (the settings the run trains with). ``check_run_dir`` runs before a
model loads or a file is written, on every rank alike:

* ``run_dir`` must be a directory, or not exist yet under a directory that can be written;
* a directory that belongs to the other job (an SFT directory for ``train``, a directory with checkpoints for
  ``sft``) or that holds files of no real-megatron run is refused;
* ``train`` resuming a checkpoint compares the checkpoint's settings with the new ones: a difference in
  anything that changes the training trajectory (the loss and its hyperparameters, the optimizer, the
  rollouts, the data, the seed, the model and its numerics) is refused, listing the keys. Only the settings
  of ``SAFE_TO_CHANGE`` may differ — more ``train.steps`` extends a run; evaluation, logging, checkpoint
  frequency, the parallel layout (checkpoints reshard) and the micro-batch packing (exact by construction)
  do not change what is trained. Asking for no more steps than are done is "nothing to do" (exit 0, nothing
  written);
* ``train`` without a checkpoint yet (a first rollout step failed) starts afresh: there is no progress to
  protect, and the fixed command must be able to use the directory;
* ``sft`` keeps no checkpoints: a finished SFT directory (``hf/`` written) is refused, an unfinished one is
  restarted.

``check_output_dir`` is the same refusal for the commands that write a directory of results
(``evaluate --out``, ``compare --out``, ``make-task --out``).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from real_megatron.config import ConfigError, RunConfig, config_to_dict

RUN_FILE = "run.json"
TRAIN_JOB, SFT_JOB = "train", "sft"  # the commands that own run directories (not loss names)
JOBS = (TRAIN_JOB, SFT_JOB)
# settings a resumed ``train`` may change; everything else is compared with the checkpoint's
SAFE_TO_CHANGE = ("run_dir", "train.steps", "train.eval_every", "train.save_every", "train.max_tokens_per_micro_batch",
                  "train.micro_batch_rollouts", "eval.", "data.eval_files", "logging.", "parallel.",
                  "reward.num_workers", "model.recompute_activations", "model.sequence_parallel", "model.fused_output",
                  "rollout.sglang_urls", "rollout.sglang_weight_sync", "rollout.sglang_tp_size",
                  "rollout.sglang_master_port", "rollout.sglang_timeout_s", "rollout.weight_bucket_mb",
                  "rollout.sglang_release_memory")
# what a real-megatron run writes into its directory (a directory holding anything else is not a run's)
RUN_FILES = {RUN_FILE, "config.yaml", "metrics.jsonl", "checkpoints", "hf", "hf_final", "wandb", "curves.png"}


class NothingToDo(Exception):
    """The run is already where the command asks it to be; the message says so (exit 0, nothing written)."""


def check_writable_dir(path: Path, what: str) -> None:
    """``path`` is a writable directory, or can be created: no file on its way, the nearest existing parent
    writable. ``what`` names it in the error (a config field or a flag)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what}={path} is a file, not a directory; give a directory path")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what}={path}: {probe} is a file, so the directory cannot be created there")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}={path}: {probe} is not writable; choose a directory you can write to")


def check_output_dir(path: Path, flag: str, outputs: tuple[str, ...]) -> None:
    """A command's result directory: writable, and none of the ``outputs`` it will write there exists already."""
    check_writable_dir(path, flag)
    existing = [name for name in outputs if (Path(path) / name).exists()]
    if existing:
        raise ConfigError(f"{flag}={path} already holds {', '.join(existing)}: nothing is overwritten; give a new "
                          f"{flag} directory or move those files away")


def read_run_file(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is not readable JSON ({err}); it records which job owns the directory. "
                          "Restore it or use a new run_dir") from err
    if not isinstance(record, dict) or record.get("job") not in JOBS:
        raise ConfigError(f"{path} does not name a job ({JOBS}); use a new run_dir")
    return record


def owner_of(run_dir: Path) -> str | None:
    """Which job owns ``run_dir``: ``run.json``'s, else inferred from what it holds (checkpoints: train; an SFT
    model ``hf/``: sft), else None (new or empty, or an unfinished run that never wrote either)."""
    record = read_run_file(run_dir)
    if record is not None:
        return record["job"]
    if (run_dir / "checkpoints").exists():
        return TRAIN_JOB
    if (run_dir / "hf").exists():
        return SFT_JOB
    return None


def flat(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (a mapping leaf such as ``loss.hparams`` is flattened too; an empty
    mapping adds no key: ``{}`` and a missing key are the same settings)."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _resolved(config: dict) -> dict:
    """``config`` with ``loss.hparams`` as the loss resolves them (a default written out is no change)."""
    from real_megatron.losses import build_loss

    loss = config.get("loss", {})
    try:
        hp = build_loss(loss.get("name"), dict(loss.get("hparams") or {})).hp
    except (ValueError, TypeError):  # a record of another version: compared as written
        return config
    return {**config, "loss": {**loss, "hparams": hp}}


def with_defaults(saved: dict, defaults: dict) -> dict:
    """``saved`` over ``defaults``: a setting a run directory predates counts as its default."""
    out = dict(defaults)
    for key, value in saved.items():
        out[key] = with_defaults(value, defaults[key]) if isinstance(value, dict) and isinstance(
            defaults.get(key), dict) and key != "hparams" else value
    return out


def trajectory_changes(saved: dict, current: dict) -> dict:
    """``{key: (saved, current)}`` of the settings that differ and are not ``SAFE_TO_CHANGE``. The hyperparameters
    of two different losses are not listed: the name says it."""
    saved = with_defaults(saved, config_to_dict(RunConfig()))
    saved, current = _resolved(saved), _resolved(current)
    if saved.get("loss", {}).get("name") != current.get("loss", {}).get("name"):
        saved, current = ({**c, "loss": {k: v for k, v in c.get("loss", {}).items() if k != "hparams"}}
                          for c in (saved, current))
    a, b = flat(saved), flat(current)
    changed = {k: (a.get(k), b.get(k)) for k in sorted({*a, *b}) if a.get(k) != b.get(k)}
    return {k: v for k, v in changed.items() if not any(k == s or (s.endswith(".") and k.startswith(s))
                                                        for s in SAFE_TO_CHANGE)}


def _foreign_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_FILES and not p.name.startswith("."))


def check_run_dir(cfg: RunConfig, job: str) -> str:
    """Refuse ``cfg.run_dir`` for ``job`` before anything is loaded or written (see the module docstring).
    Returns what the run will do, said in the log: "new", "resume", "extend" or "restart"; raises
    ``ConfigError`` (a refusal) or ``NothingToDo``."""
    run_dir = Path(cfg.run_dir)
    check_writable_dir(run_dir, "run_dir")
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return "new"
    foreign = _foreign_files(run_dir)
    if foreign:
        raise ConfigError(f"run_dir={run_dir} holds files that no real-megatron run wrote ({', '.join(foreign[:5])}); "
                          "give a new or empty run_dir")
    owner = owner_of(run_dir)
    if owner is not None and owner != job:
        raise ConfigError(f"run_dir={run_dir} is a `real-megatron {owner}` run directory; `real-megatron {job}` "
                          f"never writes into it. Give {job} a new run_dir")
    if job == SFT_JOB:
        if (run_dir / "hf").exists():
            raise ConfigError(f"run_dir={run_dir} already holds a finished SFT model ({run_dir / 'hf'}); give a new "
                              "run_dir, or delete that directory to train it again")
        return "restart"  # SFT keeps no checkpoints: an unfinished one starts over
    meta = _latest_meta(run_dir)
    if meta is None:
        return "restart"  # no training progress yet (e.g. the first rollout step failed): nothing to protect
    saved = meta.get("config")
    if isinstance(saved, dict):
        changes = trajectory_changes(saved, config_to_dict(cfg))
        if changes:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changes.items()))
            raise ConfigError(f"run_dir={run_dir} was trained with other settings ({listed}); resuming with them "
                              "would mix two runs. Rerun with the saved values (see its config.yaml) or give a new "
                              "run_dir. Settings a resume may change: "
                              + ", ".join(k + "*" if k.endswith(".") else k for k in SAFE_TO_CHANGE[1:]))
    done = int(meta.get("rollout_step", 0))
    if cfg.train.steps <= done:
        raise NothingToDo(f"{run_dir} has {done} rollout steps done and train.steps={cfg.train.steps}: nothing to "
                          f"do. To train further, set train.steps above {done}")
    before = saved.get("train", {}).get("steps") if isinstance(saved, dict) else None
    return "extend" if before is not None and cfg.train.steps > before and done >= before else "resume"


def _latest_meta(run_dir: Path) -> dict | None:
    """The latest checkpoint's ``meta.json`` (read-only), or None when there is none."""
    from real_megatron.checkpoint import CheckpointError, CheckpointManager, read_meta

    try:
        latest = CheckpointManager(run_dir).latest()
        return read_meta(latest) if latest is not None else None
    except CheckpointError as err:
        raise ConfigError(str(err)) from err


_CREATED: list[Path] = []  # run directories this process created (``release_unused``)


def claim_run_dir(run_dir: Path, job: str) -> None:
    """Create ``run_dir`` (if needed) and record its owner; the first thing a run writes (rank 0)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        _CREATED.append(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if read_run_file(run_dir) is None:
        from real_megatron import __version__
        from real_megatron.checkpoint import atomic_write_text

        atomic_write_text(run_dir / RUN_FILE, json.dumps({"job": job, "real_megatron": __version__,
                                                          "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))


def release_unused() -> None:
    """Remove the run directories this process created that hold nothing a run needs (an interrupted start):
    at most ``run.json``, ``config.yaml``, an empty ``metrics.jsonl`` and wandb's offline files."""
    import shutil

    for run_dir in _CREATED:
        if not run_dir.is_dir():
            continue
        names = {p.name for p in run_dir.iterdir()}
        metrics = run_dir / "metrics.jsonl"
        if names <= {RUN_FILE, "config.yaml", "metrics.jsonl", "wandb"} and (
                not metrics.exists() or metrics.stat().st_size == 0):
            shutil.rmtree(run_dir, ignore_errors=True)
