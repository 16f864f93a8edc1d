"""Per-step metrics: one JSON object per line in ``<run_dir>/metrics.jsonl``, the same dict to wandb
(offline by default), and a progress bar with the key numbers. Only rank 0 logs."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

PROGRESS_KEYS = ("train/loss", "train/reward_mean", "train/entropy", "eval/pass@1")


def _clean(value):
    """JSON-safe floats: NaN/inf become None rather than invalid JSON tokens."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _run_id(run_dir) -> str:
    """A stable wandb run id per run directory, so a resumed run continues the same wandb run."""
    import hashlib

    resolved = str(Path(run_dir).resolve())
    return f"{Path(resolved).name}-{hashlib.sha1(resolved.encode()).hexdigest()[:10]}"


class MetricsLogger:
    """Appends one row per ``log(step, metrics)``. An existing ``metrics.jsonl`` keeps its rows up to
    ``start_step`` (a resumed run logs the later ones again); ``fresh=True`` starts it empty (a run that
    never resumes, such as ``sft``)."""

    def __init__(self, run_dir: str | Path, *, total_steps: int, start_step: int = 0, fresh: bool = False,
                 wandb_mode: str = "offline", wandb_project: str = "real-megatron", config: dict | None = None,
                 progress_bar: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_rows_after(-1 if fresh else start_step)
        if wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(project=wandb_project, dir=str(Path(run_dir)), mode=wandb_mode,
                                     config=config or {}, name=Path(run_dir).name, resume="allow",
                                     id=_run_id(run_dir))
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def _drop_rows_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (on resume: after the checkpoint; they will be produced again)."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line from a killed run
            if row.get("step", 0) <= step:
                keep.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in sorted(metrics.items())}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if v is not None}, step=step)
        if self._bar is not None:
            shown = {k.split("/")[-1]: f"{row[k]:.3g}" for k in PROGRESS_KEYS if row.get(k) is not None}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
