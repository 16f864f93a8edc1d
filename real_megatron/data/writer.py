"""Writing prompt files: the one atomic parquet writer (tasks, ``tools/prepare_data.py``).

A reader, or a rerun after a crash, sees the old file or the whole new one, never half a file.
"""
from __future__ import annotations

import os
from pathlib import Path


def write_table_atomic(table, path) -> Path:
    """Write a pyarrow ``table`` to the parquet file ``path`` atomically; returns the path.

    The bytes go to a temporary sibling, are fsynced and renamed into place, so a reader (or a rerun
    after a crash) sees the old file or the whole new one, never half a file. The same table gives
    the same bytes (parquet stores no timestamp).
    """
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")  # opened normally: the file gets the umask's mode
    try:
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
