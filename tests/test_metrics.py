"""metrics.jsonl on resume (rows after the checkpoint dropped) and on a fresh run (every row dropped)."""
from __future__ import annotations

import json

from real_megatron.metrics import MetricsLogger


def steps_in(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_keeps_rows_up_to_the_checkpoint_and_fresh_keeps_none(tmp_path):
    logger = MetricsLogger(tmp_path, total_steps=4, wandb_mode="disabled", progress_bar=False)
    for step in range(5):
        logger.log(step, {"train/loss": float("nan") if step == 3 else 0.5})
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "train/lo')  # a torn line from a killed run
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[3])["train/loss"] is None  # NaN -> null
    MetricsLogger(tmp_path, total_steps=4, start_step=2, wandb_mode="disabled", progress_bar=False).close()
    assert steps_in(tmp_path) == [0, 1, 2]
    MetricsLogger(tmp_path, total_steps=4, fresh=True, wandb_mode="disabled", progress_bar=False).close()
    assert steps_in(tmp_path) == []
