"""Training checkpoints: atomic, multi-rank, with a `latest` pointer.

Layout of ``<run_dir>/checkpoints/``::

    step_000012/            one finished checkpoint
        meta.json           step, config, layout (tp/pp/cp/dp, world size), sampler state, time
        rank_00000.pt       per-rank: model + optimizer + RNG states (python, numpy, torch)
        ...
    latest                  text file: "step_000012"
    .tmp-step_000016-<id>/  a save in progress (ignored on load, removed on the next save)

A save writes every rank's file into a temp directory, fsyncs each file, waits for all ranks,
then rank 0 writes ``meta.json``, renames the directory to its final name and only then replaces
``latest`` (write a temp file, fsync, rename). A crash at any point leaves ``latest`` pointing at
the previous complete checkpoint. Per-rank files hold the rank's own shards, so a run resumes at
the layout it was saved with (the layout is checked on load); to change TP/PP, convert the
weights with ``real-megatron convert`` and start a new run from them.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import torch

LATEST = "latest"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


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
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


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
    def save(self, step: int, rank_state: dict, meta: dict) -> Path:
        """Write this rank's ``rank_state`` (torch-saveable) and, on rank 0, ``meta``; atomic for the set."""
        token = self._broadcast(uuid.uuid4().hex[:8] if self.rank == 0 else None)
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{final.name}-{token}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):  # debris of a save that crashed
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        self._barrier()
        rank_file = tmp / f"rank_{self.rank:05d}.pt"
        torch.save({**rank_state, "rng": rng_state()}, rank_file)
        _fsync_file(rank_file)
        self._barrier()
        if self.rank == 0:
            meta = {**meta, "step": step, "world_size": self.world_size, "saved_at": time.time()}
            atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1, default=str))
            fsync_path(tmp)
            if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_path(self.root)
            atomic_write_text(self.root / LATEST, final.name)
        self._barrier()
        return final

    # ------------------------------------------------------------------ load
    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None. A `latest` naming a missing directory is an error."""
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        name = pointer.read_text().strip()
        path = self.root / name
        if not (path / "meta.json").exists():
            raise RuntimeError(f"{pointer} names {name!r}, but {path}/meta.json is missing: the checkpoint directory "
                               "was modified by hand; point `latest` at a complete step_* directory or delete it")
        return path

    def load(self, path: Path, *, expect_layout: dict | None = None) -> tuple[dict, dict]:
        """Return ``(meta, this rank's state)``; RNG states are restored as a side effect."""
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("world_size") != self.world_size:
            raise RuntimeError(f"{path} was saved with world size {meta.get('world_size')}, this run has "
                               f"{self.world_size}; resume with the same number of processes")
        if expect_layout is not None and meta.get("layout") not in (None, expect_layout):
            raise RuntimeError(f"{path} was saved with layout {meta['layout']}, this run uses {expect_layout}; "
                               "resume with the same parallel.* settings")
        rank_file = path / f"rank_{self.rank:05d}.pt"
        if not rank_file.exists():
            raise RuntimeError(f"{rank_file} is missing: the checkpoint is incomplete")
        state = torch.load(rank_file, map_location="cpu", weights_only=False)
        set_rng_state(state.pop("rng"))
        return meta, state
