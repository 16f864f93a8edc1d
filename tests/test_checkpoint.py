"""Atomic checkpoints: a crash mid-save leaves the previous checkpoint loadable; RNG restored."""
from __future__ import annotations

import random

import pytest
import torch

from real_megatron import checkpoint as ckpt
from real_megatron.checkpoint import CheckpointManager


def test_save_load_roundtrip_restores_rng(tmp_path):
    mgr = CheckpointManager(tmp_path)
    torch.manual_seed(3)
    random.seed(4)
    mgr.save(5, {"model": {"w": torch.arange(4.0)}}, {"layout": {"tp": 1}})
    expected = (torch.rand(3), random.random())
    torch.manual_seed(99)
    random.seed(99)
    meta, state = mgr.load(mgr.latest(), expect_layout={"tp": 1})
    assert meta["step"] == 5 and torch.equal(state["model"]["w"], torch.arange(4.0))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    with pytest.raises(RuntimeError, match="saved with layout"):
        mgr.load(mgr.latest(), expect_layout={"tp": 2})


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"model": {"w": torch.ones(2)}}, {})
    real_save = torch.save

    def torn_save(obj, path, *a, **k):  # the process dies half-way through writing its shard
        with open(path, "wb") as fh:
            fh.write(b"PK\x03\x04 torn")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, {"model": {"w": torch.zeros(2)}}, {})
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert mgr.latest().name == "step_000001"
    _, state = mgr.load(mgr.latest())
    assert torch.equal(state["model"]["w"], torch.ones(2))
    assert any(p.name.startswith(".tmp-step_000002") for p in (tmp_path / "checkpoints").iterdir())
    mgr.save(3, {"model": {"w": torch.full((2,), 3.0)}}, {})  # the next save clears the debris
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())
    assert mgr.latest().name == "step_000003"


def test_latest_pointing_at_missing_dir_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_000007")
    with pytest.raises(RuntimeError, match="step_000007"):
        CheckpointManager(tmp_path).latest()
