"""Atomic output directories: build in a temp dir beside the target, fsync, rename; on error remove it."""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from real_megatron.checkpoint import fsync_path
from real_megatron.convert.mapping import ConversionError


def check_output(out: Path, overwrite: bool, inputs: tuple[Path, ...] = ()) -> Path:
    out = Path(out).absolute()
    for src in inputs:
        src = Path(src).absolute()
        if out == src or src in out.parents or out in src.parents:
            raise ConversionError(f"output {out} overlaps the input {src}; choose a separate output directory")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ConversionError(f"output {out} already exists; remove it, choose another path or pass --overwrite")
        if not out.is_dir():
            raise ConversionError(f"output {out} exists and is not a directory; remove it first")
    return out


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False, inputs: tuple[Path, ...] = (), fsync: bool = True):
    """Yield a temp directory; on normal exit it becomes ``out`` (replacing it if ``overwrite``).

    The temp dir sits next to ``out`` (same filesystem, so the rename is atomic). With
    ``overwrite`` the old directory is first renamed aside and deleted only after the new one is in
    place: a crash in between leaves either the old or the new directory at ``out``, plus a hidden
    ``.…old-…`` leftover, never a half-written ``out``. ``fsync=False`` skips the fsyncs: the rename
    still happens only after everything was written, so a failed or killed process leaves nothing at
    ``out``, but after a power loss or OS crash ``out`` may hold truncated files (which the readers
    report: every file's size is checked against its header).
    """
    out = check_output(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if fsync:
            for root, _dirs, files in os.walk(tmp):
                for f in files:
                    fsync_path(Path(root) / f)
                fsync_path(Path(root))
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{tag}"
            os.replace(out, old)
        os.replace(tmp, out)
        if fsync:
            fsync_path(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
