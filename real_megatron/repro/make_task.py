"""`real-megatron make-task chains --out DIR`: write a synthetic task's parquet files (and its tokenizer).

Writes DIR/train.parquet (the --train-levels, shuffled together) and DIR/level1.parquet ..
DIR/level5.parquet (held-out, one per level), all deterministic in --seed; with --tokenizer also
DIR/tokenizer (a byte-level BPE trained on the task's text) and a per-level table of reference
response lengths in its tokens.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path


def _levels(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated level numbers, e.g. 1,2") from None


def main(argv=None) -> int:
    from real_megatron.repro.chains import CHAIN_LEVELS

    parser = argparse.ArgumentParser(prog="real-megatron make-task", description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=("chains",), help="the task to write")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-levels", type=_levels, default=list(CHAIN_LEVELS),
                        help="comma-separated levels in the train file (default: all)")
    parser.add_argument("--train-per-level", type=int, default=2500,
                        help="train problems per level (a smaller level gives all its non-test problems)")
    parser.add_argument("--test-per-level", type=int, default=100, help="held-out problems per level file")
    parser.add_argument("--train-name", default="train.parquet", help="file name of the train file")
    parser.add_argument("--tokenizer", action="store_true", help="also train DIR/tokenizer on the task's text")
    args = parser.parse_args(argv)

    from real_megatron.repro.chains import chain_splits, chain_texts, write_chain_task

    out = Path(args.out)
    try:
        train, tests = write_chain_task(out, seed=args.seed, train_levels=args.train_levels,
                                        n_train_per_level=args.train_per_level, n_test_per_level=args.test_per_level,
                                        train_name=args.train_name)
    except ValueError as err:
        print(f"error: {err}", flush=True)
        return 2
    import pyarrow.parquet as pq

    print(f"wrote {train} ({pq.read_metadata(train).num_rows} problems, levels "
          f"{sorted(set(args.train_levels))})")
    for path in tests.values():
        print(f"wrote {path} ({args.test_per_level} problems)")
    if args.tokenizer:
        from real_megatron.repro.tokenizer import train_task_tokenizer

        tokenizer = train_task_tokenizer(chain_texts(seed=args.seed), out / "tokenizer")
        print(f"wrote {out / 'tokenizer'} ({len(tokenizer)} tokens)\n\n| level | response tokens min | mean | max |\n"
              "|---|---|---|---|")
        splits = chain_splits(seed=args.seed, n_train_per_level=args.train_per_level,
                              n_test_per_level=args.test_per_level)
        for level, (train_problems, test_problems) in splits.items():
            lengths = [len(tokenizer.encode(p.solution(), add_special_tokens=False))
                       for p in train_problems + test_problems]
            print(f"| {level} | {min(lengths)} | {statistics.mean(lengths):.1f} | {max(lengths)} |")
    return 0
