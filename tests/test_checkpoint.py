"""Atomic checkpoints: a crash mid-save leaves the previous checkpoint loadable; RNG restored at the
same layout; incomplete or corrupt files are errors naming the file. (The state writer here is a
plain file; the real Megatron state and resharding are tests/test_checkpoint_reshard.py.)"""
from __future__ import annotations

import json
import os
import random

import pytest
import torch

from real_megatron.checkpoint import CheckpointError, CheckpointManager, rng_state

LAYOUT = {"tp": 1, "pp": 1, "cp": 1, "dp": 1, "world_size": 1, "distributed_optimizer": False, "dtype": "float32"}


def writer(value: float):
    return lambda d: torch.save({"w": torch.full((4,), value)}, d / "w.pt")


def reader(box: dict):
    return lambda d: box.update(torch.load(d / "w.pt"))


def test_save_load_roundtrip_restores_rng_at_the_same_layout_only(tmp_path):
    mgr = CheckpointManager(tmp_path)
    torch.manual_seed(3)
    random.seed(4)
    mgr.save(5, {"layout": LAYOUT, "sampler": {"epoch": 1}}, writer(2.0))
    expected = (torch.rand(3), random.random())
    torch.manual_seed(99)
    random.seed(99)
    box = {}
    meta = mgr.load(mgr.latest(), layout=LAYOUT, read_state=reader(box))
    assert meta["step"] == 5 and meta["sampler"] == {"epoch": 1} and torch.equal(box["w"], torch.full((4,), 2.0))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    torch.manual_seed(99)
    mgr.load(mgr.latest(), layout={**LAYOUT, "tp": 2, "world_size": 2}, read_state=reader(box))  # resharded
    after_load = torch.rand(3)
    torch.manual_seed(99)
    assert torch.equal(after_load, torch.rand(3))  # the streams were left as the new layout seeded them


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"layout": LAYOUT}, writer(1.0))

    def torn(d):  # the process dies half-way through writing its shard
        (d / "w.pt").write_bytes(b"PK\x03\x04 torn")
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, {"layout": LAYOUT}, torn)
    assert mgr.latest().name == "step_000001"
    box = {}
    mgr.load(mgr.latest(), layout=LAYOUT, read_state=reader(box))
    assert torch.equal(box["w"], torch.ones(4))
    assert any(p.name.startswith(".tmp-step_000002") for p in (tmp_path / "checkpoints").iterdir())
    mgr.save(3, {"layout": LAYOUT}, writer(3.0))  # the next save clears the debris
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())
    assert mgr.latest().name == "step_000003"


def test_resave_of_a_step_interrupted_between_renames_falls_back_to_the_old_copy(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path)
    mgr.save(4, {"layout": LAYOUT}, writer(4.0))
    real_replace = os.replace

    def crash_on_second_rename(src, dst):
        real_replace(src, dst)
        if ".old-" in str(dst):
            raise KeyboardInterrupt("killed between the renames")

    monkeypatch.setattr(os, "replace", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(4, {"layout": LAYOUT}, writer(5.0))
    monkeypatch.setattr(os, "replace", real_replace)
    box = {}
    mgr.load(mgr.latest(), layout=LAYOUT, read_state=reader(box))
    assert torch.equal(box["w"], torch.full((4,), 4.0))
    mgr.save(5, {"layout": LAYOUT}, writer(6.0))  # the next save puts the moved-aside step back, not away
    assert (tmp_path / "checkpoints" / "step_000004" / "meta.json").exists()
    assert not list((tmp_path / "checkpoints").glob(".old-*"))


def test_latest_pointing_at_missing_dir_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_000007")
    with pytest.raises(RuntimeError, match="step_000007"):
        CheckpointManager(tmp_path).latest()


def test_truncated_missing_or_corrupt_files_are_errors_naming_the_file(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(1, {"layout": LAYOUT}, writer(1.0))
    rng_file = path / "rng" / "rank_00000.pt"
    rng_file.write_bytes(b"\0" * rng_file.stat().st_size)  # same size: only reading it can tell
    with pytest.raises(CheckpointError, match=f"{rng_file} could not be read"):
        mgr.load(path, layout=LAYOUT, read_state=reader({}))
    with open(path / "state" / "w.pt", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(CheckpointError, match=r"w\.pt has 10 bytes, the save wrote \d+"):
        mgr.load(path, layout=LAYOUT, read_state=reader({}))
    (path / "state" / "w.pt").unlink()
    with pytest.raises(CheckpointError, match=r"w\.pt is missing"):
        mgr.load(path, layout=LAYOUT, read_state=reader({}))
    (path / "meta.json").write_text('{"step": 1, "lay')
    with pytest.raises(CheckpointError, match="meta.json cannot be read"):
        mgr.load(path, layout=LAYOUT, read_state=reader({}))


def test_state_reader_failure_names_the_state_directory(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(1, {"layout": LAYOUT}, writer(1.0))

    def broken(d):
        raise ValueError("unexpected key optimizer.state.exp_avg")

    with pytest.raises(CheckpointError, match=f"{path / 'state'} could not be loaded: ValueError: unexpected key"):
        mgr.load(path, layout=LAYOUT, read_state=broken)


def test_a_checkpoint_of_another_format_is_refused_naming_it(tmp_path):
    """The per-rank format of the first versions (meta.json without "format", one rank_*.pt per rank) is no
    longer read: the load says which format it found and what to do, before touching the state."""
    step = tmp_path / "checkpoints" / "step_000003"
    step.mkdir(parents=True)
    torch.save({"model": [{"w": torch.ones(2)}], "optimizer": {}, "rng": rng_state()}, step / "rank_00000.pt")
    (step / "meta.json").write_text(json.dumps({"step": 3, "world_size": 1, "rollout_step": 3,
                                                "layout": {"tp": 1, "pp": 1, "cp": 1, "world_size": 1}}))
    (tmp_path / "checkpoints" / "latest").write_text("step_000003")
    mgr = CheckpointManager(tmp_path)

    def never(d):
        raise AssertionError("the state must not be read")

    with pytest.raises(CheckpointError, match=r"format 'real-megatron/per-rank-v1 \(no format entry\)'; this version "
                                              r"reads only 'real-megatron/dist-v1'\. Start a new run_dir"):
        mgr.load(mgr.latest(), layout=LAYOUT, read_state=never)
