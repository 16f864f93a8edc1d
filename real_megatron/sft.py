"""Supervised warm-up on the same Megatron stack: token cross-entropy on reference solutions.

    real-megatron sft --config FILE [section.key=value ...]

Reads the same config as ``train``: ``model.hf_dir`` (start weights + tokenizer),
``data.train_files`` (each row's ``extra_info.solution`` is the target response),
``train.steps`` optimizer steps of ``train.mini_batch_prompts`` prompts, ``optim.*``, and
``data.eval_files`` for a pass@1 before and after (``eval.*`` sampling). The loss is the mean
cross-entropy over response tokens (EOS included), computed by the same loss hook as REAL
(``losses.SFTLoss``), so the warm-up exercises the exact code path RL training uses.

Writes ``<run_dir>/metrics.jsonl`` and the trained model as a HF directory ``<run_dir>/hf``.
SFT runs are short: they do not checkpoint or resume (rerun to redo).
"""
from __future__ import annotations

import time

from real_megatron.config import ConfigError
from real_megatron.distributed import broadcast_object
from real_megatron.job_runner import JobFailed, run_job
from real_megatron.parts import EngineSyncError, build_parts


def _solution(record) -> str:
    solution = (record.extra_info or {}).get("solution")
    if not isinstance(solution, str) or not solution.strip():
        raise ConfigError(f"{record.source_file} row {record.row}: extra_info.solution is missing or empty; SFT "
                          "needs a reference solution per training row")
    return solution


def run_sft(cfg) -> int:
    """``real-megatron sft`` on a loaded config: the run's parts with the cross-entropy loss, then the loop."""
    from real_megatron.losses import SFTLoss

    parts = build_parts(cfg, SFTLoss(), job="sft", sampler_batch=cfg.train.mini_batch_prompts)
    try:
        return _sft_loop(cfg, parts)
    except EngineSyncError as err:  # the engine only evaluates here; nothing is lost but the run
        raise JobFailed(f"the rollout engine did not take the weights for an evaluation: {err}") from err
    finally:
        parts.close()


def _sft_loop(cfg, parts) -> int:
    """``train.steps`` optimizer steps on reference solutions, evaluations as ``train.eval_every`` says, the HF export."""
    from real_megatron.megatron.batch import Sample

    if parts.rank == 0:
        eos = parts.tokenizer.eos_token_id
        targets = [parts.tokenizer.encode(_solution(r), add_special_tokens=False) + [eos] for r in parts.train_records]
        parts.open_metrics(cfg.train.steps, fresh=True)  # SFT does not resume: the metrics file starts afresh
    parts.sync_weights()
    if parts.rank == 0 and parts.eval_records:
        parts.logger.log(0, parts.evaluate())
    for step in range(1, cfg.train.steps + 1):
        samples = None
        if parts.rank == 0:
            batch = parts.sampler.next_batch()
            samples = [Sample(parts.train_ids[r.index], targets[r.index], 1.0, i) for i, r in enumerate(batch)]
        samples = broadcast_object(samples)
        t0 = time.perf_counter()
        result = parts.policy.train_step(samples)
        row = {"train/loss": result["loss"], "train/grad_norm": result["grad_norm"],
               "train/skipped": result["skipped"], "time/update_s": time.perf_counter() - t0}
        if step == cfg.train.steps or (cfg.train.eval_every and step % cfg.train.eval_every == 0):
            row["time/sync_s"] = parts.sync_weights()
            if parts.rank == 0 and parts.eval_records:
                row.update(parts.evaluate())
        if parts.rank == 0:
            parts.logger.log(step, row)
    out = parts.export_hf(parts.run_dir / "hf")
    if parts.rank == 0:
        print(f"SFT model (HF): {out}\nmetrics: {parts.run_dir / 'metrics.jsonl'}", flush=True)
    return 0


def main(argv=None) -> int:
    return run_job(argv, "real-megatron sft", "supervised warm-up (cross-entropy on reference solutions)", run_sft)
