"""Fixtures shared by several test files."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """The demo's tiny setup, built once: task files, a tokenizer trained on them, a random tiny Qwen2."""
    from real_megatron.demo import build_assets

    train, test, base = build_assets(tmp_path_factory.mktemp("assets"), seed=7)
    return {"train": train, "test": test, "base": base}
