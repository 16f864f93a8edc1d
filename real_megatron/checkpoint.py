"""Training checkpoints: atomic, multi-rank, reshardable, with a `latest` pointer.

Layout of ``<run_dir>/checkpoints/``::

    step_000012/            one finished checkpoint
        meta.json           format, step, layout (tp/pp/cp/dp, world size, optimizer kind, dtype),
                            sampler state, config, and every file's size (checked on load)
        state/              model + optimizer: a Megatron-Core dist_checkpointing directory, each
                            tensor under its global name and shape, loadable at any TP/PP/DP
        rng/rank_00000.pt   each rank's RNG streams (python, numpy, torch, CUDA, Megatron's tracker)
    latest                  text file: "step_000012"
    .tmp-step_000016-<id>/  a save in progress (ignored on load, removed on the next save)

A save writes into a temp directory, waits for all ranks, then rank 0 fsyncs every file, writes
``meta.json``, renames the directory to its final name and only then replaces ``latest`` (temp
file, fsync, rename). A crash at any point leaves ``latest`` pointing at the previous complete
checkpoint. Re-saving an existing step moves the old directory aside first; if the crash came
between the two renames, ``latest`` falls back to the moved copy and the next save moves it back.

Only this format (``FORMAT``) is read; a checkpoint of another (the per-rank files of the first
versions) is refused with a message naming it.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch

LATEST = "latest"
FORMAT = "real-megatron/dist-v1"
STATE_DIR = "state"
RNG_DIR = "rng"

log = logging.getLogger("real_megatron")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as it is; the message names the file and the fix."""


def fsync_path(path: Path) -> None:
    """fsync a directory (or file) by path: makes a rename or a new entry durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    tracker = sys.modules.get("megatron.core.tensor_parallel.random")  # only if Megatron is in use
    if tracker is not None:
        state["megatron_tracker"] = tracker.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("megatron_tracker") is not None:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["megatron_tracker"])


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _files_with_sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def read_meta(path: Path) -> dict:
    meta_file = Path(path) / "meta.json"
    try:
        return json.loads(meta_file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{meta_file} cannot be read ({err}): the checkpoint is corrupt; point "
                              f"{Path(path).parent / LATEST} at an earlier step_* directory or delete {path}") from err


def check_complete(path: Path, meta: dict) -> None:
    """Every file the save recorded exists with its recorded size (a truncated or missing file is named)."""
    for rel, size in meta.get("files", {}).items():
        file = Path(path) / rel
        actual = file.stat().st_size if file.exists() else None
        if actual != size:
            found = "is missing" if actual is None else f"has {actual} bytes, the save wrote {size}"
            raise CheckpointError(f"{file} {found}: the checkpoint is incomplete or corrupt; point "
                                  f"{Path(path).parent / LATEST} at an earlier step_* directory or delete {path}")


def layout_changes(saved: dict, current: dict) -> dict:
    """{key: (saved, current)} for every layout entry that differs."""
    return {k: (saved.get(k), current.get(k)) for k in sorted({*saved, *current}) if saved.get(k) != current.get(k)}


class CheckpointManager:
    """Save/load training state for all ranks of a run. ``barrier`` synchronises ranks (no-op alone)."""

    def __init__(self, run_dir: str | Path, *, rank: int = 0, world_size: int = 1, barrier=None, broadcast=None):
        self.root = Path(run_dir) / "checkpoints"
        self.rank = rank
        self.world_size = world_size
        self._barrier = barrier or (lambda: None)
        # broadcast(obj) -> obj from rank 0: every rank must write into the same temp directory
        self._broadcast = broadcast or (lambda obj: obj)

    # ------------------------------------------------------------------ save
    def save(self, step: int, meta: dict, write_state, write_extra=None) -> Path:
        """Every rank calls: ``write_state(directory)`` writes the sharded model + optimizer state
        (collectively), each rank adds its RNG streams, rank 0 adds ``meta`` and, with ``write_extra(directory)``,
        files of its own (e.g. rollouts generated ahead of training); atomic for the set."""
        token = self._broadcast(uuid.uuid4().hex[:8] if self.rank == 0 else None)
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{final.name}-{token}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._clear_debris()
            (tmp / STATE_DIR).mkdir(parents=True)
            (tmp / RNG_DIR).mkdir()
        self._barrier()
        write_state(tmp / STATE_DIR)
        torch.save(rng_state(), tmp / RNG_DIR / f"rank_{self.rank:05d}.pt")
        self._barrier()
        if self.rank == 0:
            if write_extra is not None:
                write_extra(tmp)
            files = _files_with_sizes(tmp)
            for rel in files:  # the shard writers fsync theirs already; this covers the rest
                fsync_path(tmp / rel)
            for directory in (tmp / STATE_DIR, tmp / RNG_DIR):
                fsync_path(directory)
            meta = {**meta, "format": FORMAT, "step": step, "world_size": self.world_size,
                    "saved_at": time.time(), "files": files}
            atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1, default=str))
            fsync_path(tmp)
            old = None
            if final.exists():  # re-saving a step (a final save right after a periodic one, an upgrade)
                old = self.root / f".old-{final.name}-{token}"
                os.replace(final, old)
            os.replace(tmp, final)
            fsync_path(self.root)
            atomic_write_text(self.root / LATEST, final.name)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    def _clear_debris(self) -> None:
        """Remove what crashed saves left, except a moved-aside step whose replacement never arrived
        (a re-save killed between its two renames): that one goes back to its name."""
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for moved in self.root.glob(".old-*"):
            name = moved.name[len(".old-"):].rsplit("-", 1)[0]
            if not (self.root / name).exists() and (moved / "meta.json").exists():
                os.replace(moved, self.root / name)
            else:
                shutil.rmtree(moved, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None. A `latest` naming a missing directory is an error."""
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        name = pointer.read_text().strip()
        path = self.root / name
        if not (path / "meta.json").exists():
            moved = sorted(self.root.glob(f".old-{name}-*"))  # a re-save crashed between its two renames
            if moved and (moved[-1] / "meta.json").exists():
                return moved[-1]
            raise CheckpointError(f"{pointer} names {name!r}, but {path}/meta.json is missing: the checkpoint "
                                  "directory was modified by hand; point `latest` at a complete step_* directory "
                                  "or delete it")
        return path

    def load(self, path: Path, *, layout: dict, read_state) -> dict:
        """Load a reshardable checkpoint at this run's ``layout``; returns its meta.

        ``read_state(directory)`` loads the model + optimizer (collectively). Each rank's RNG streams
        are restored only when the layout is unchanged: they belong to a rank's place in the layout
        (Megatron's tracker seeds by TP/PP rank), which a different layout does not have.
        """
        meta = read_meta(path)
        if meta.get("format") != FORMAT:
            found = meta.get("format", "real-megatron/per-rank-v1 (no format entry)")
            raise CheckpointError(f"{path}/meta.json has format {found!r}; this version reads only {FORMAT!r}. "
                                  "Start a new run_dir (or resume it with the version that wrote it)")
        saved = meta.get("layout", {})
        for key in ("distributed_optimizer", "dtype"):
            if key in saved and key in layout and saved[key] != layout[key]:
                name = {"distributed_optimizer": "optim.use_distributed_optimizer", "dtype": "model.dtype"}[key]
                raise CheckpointError(f"{path} was saved with {name}={saved[key]}, this run has {layout[key]}: "
                                      f"the optimizer state is kept per kind; resume with {name}={saved[key]}")
        check_complete(path, meta)
        try:
            read_state(path / STATE_DIR)
        except Exception as err:
            raise CheckpointError(f"{path / STATE_DIR} could not be loaded: {type(err).__name__}: {err}") from err
        changes = layout_changes(saved, layout)
        if not changes:
            rng_file = path / RNG_DIR / f"rank_{self.rank:05d}.pt"
            try:
                set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
            except Exception as err:
                raise CheckpointError(f"{rng_file} could not be read ({type(err).__name__}: {err}); "
                                      "the checkpoint is corrupt") from err
        elif self.rank == 0:
            log.info("resharded resume from %s: layout %s; per-rank RNG streams start fresh from the seed",
                     path, ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()))
        return meta
