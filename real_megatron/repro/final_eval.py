"""The final evaluation of ``real-megatron compare``: every held-out problem of every level, many samples.

The trainer's own evaluations (``eval.*``: 30 problems × 4 samples per level) stay small and cheap; they
give the curves and the "best" column. The comparison's numbers come from one larger evaluation of each
finished run's weights (``hf_final``) and, once, of the warm-up's: the first ``problems`` problems of each
level (0: all 100) with ``samples`` samples each, at the runs' ``eval.temperature`` / ``eval.top_p`` /
``eval.max_new_tokens``, with one sampling seed (``recipe.FINAL_EVAL_SEED``) for every model, so the start row
is one evaluation and carries no seed noise. Generation is the embedded engine's shared-prefill sampler
(``TransformersEngine(share_prompt_prefill=True)``); rewards are the training's math-verify workers.

Its standard error (``stats.eval_standard_error``) is ≤ 0.5 points of average pass@1 at the default
5 levels × 100 problems × 20 samples, for any pass rates.

The result is written atomically to ``<run dir>/final_eval_n<samples>_<p<problems>|all>.json`` (the protocol
in the name: another protocol is another file, never an overwrite) with every problem's correct count.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from real_megatron.repro import stats


def final_eval_path(run_dir: Path, samples: int, problems: int) -> Path:
    return Path(run_dir) / f"final_eval_n{samples}_{f'p{problems}' if problems else 'all'}.json"


def read_final_eval(path: Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def run_final_evaluation(model_dir: Path, eval_files, out_path: Path, *, samples: int, problems: int,
                         temperature: float, top_p: float, max_new_tokens: int, max_prompt_length: int,
                         seed: int, batch_rows: int = 512, reward_timeout_s: float = 5.0) -> dict:
    """Evaluate ``model_dir`` on each file of ``eval_files`` (one level each) and write ``out_path``."""
    from real_megatron.checkpoint import atomic_write_text
    from real_megatron.components import load_tokenizer, pad_id_of
    from real_megatron.data import encode_prompt, load_prompts
    from real_megatron.evaluate import evaluate_prompts
    from real_megatron.rewards import RewardPool
    from real_megatron.rollout import SamplingParams
    from real_megatron.rollout.transformers_engine import TransformersEngine

    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    tokenizer = load_tokenizer(model_dir)
    engine = TransformersEngine(str(model_dir), eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id_of(tokenizer),
                                batch_size=batch_rows, load_weights_from=str(model_dir), share_prompt_prefill=True)
    sampling = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    levels = {}
    try:
        with RewardPool(num_workers=1, timeout_s=reward_timeout_s) as pool:
            for f in eval_files:
                records = list(load_prompts(f, max_prompt_length=max_prompt_length, tokenizer=tokenizer,
                                            on_bad_row="error"))
                if problems:
                    records = records[:problems]
                ids = [encode_prompt(tokenizer, r.messages) for r in records]
                result = evaluate_prompts(engine, pool, tokenizer, records, ids, samples=samples, sampling=sampling,
                                          batch_prompts=len(records))
                levels[Path(f).stem] = {"problems": len(records), "pass@1": result["pass@1"],
                                        "correct_per_problem": result["correct_per_problem"],
                                        "response_length_mean": result["response_length_mean"],
                                        "reward_timeouts": result["reward_timeouts"]}
    finally:
        engine.close()
    correct = [lv["correct_per_problem"] for lv in levels.values()]
    payload = {
        "model": str(model_dir), "samples": samples, "problems_per_level": problems or "all", "seed": seed,
        "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
        "pass@1": sum(lv["pass@1"] for lv in levels.values()) / len(levels),
        "standard_error": stats.eval_standard_error(correct, samples),
        "standard_error_bound": stats.eval_standard_error_bound([len(c) for c in correct], samples),
        "levels": levels, "seconds": time.perf_counter() - t0,
    }
    atomic_write_text(Path(out_path), json.dumps(payload) + "\n")
    return payload


def level_rates(final_eval: dict) -> list[list[float]]:
    """Per level (file order), each problem's pass rate c / n: the input of ``stats.paired_difference``."""
    n = final_eval["samples"]
    return [[c / n for c in lv["correct_per_problem"]] for lv in final_eval["levels"].values()]
