"""Where the tests find the shared benchmark files (AIME 2024/2025, AMC 2023, MATH-500, Minerva,
OlympiadBench, DAPO-Math-17k as verl-style parquet).

One setting: the environment variable ``REAL_MEGATRON_SHARED_DATA`` names the directory; unset, it is
``../shared/data`` beside the repository root (``<repo>/../shared/data``). A test that needs a file calls
``shared_file(name)``, which fails, never skips, with a message saying where to put the files.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ENV_VAR = "REAL_MEGATRON_SHARED_DATA"
REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get(ENV_VAR) or REPO_ROOT.parent / "shared" / "data")


def shared_file(name: str) -> Path:
    """The path of the shared file ``name`` (e.g. ``"aime24.parquet"``); a test failure if it is absent."""
    path = SHARED_DATA / name
    if not path.is_file():
        source = f"${ENV_VAR}" if os.environ.get(ENV_VAR) else f"the default (${ENV_VAR} is unset)"
        pytest.fail(f"shared benchmark file {path} is missing ({source}). Put the benchmark parquet files "
                    f"(aime24, aime25, amc23, math500, minerva, olympiad_bench, dapo-math-17k) in "
                    f"{REPO_ROOT.parent / 'shared' / 'data'}, or set {ENV_VAR} to the directory holding them.",
                    pytrace=False)
    return path
