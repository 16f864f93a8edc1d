"""Where the shared benchmark files are: ``../shared/data`` beside the repository (the layout of a
developer checkout and of CI), else ``/work/shared/data`` (a clone elsewhere on the same machine)."""
from pathlib import Path

_BESIDE = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_DATA = _BESIDE if _BESIDE.is_dir() else Path("/work/shared/data")
