"""Convert local copies of math training/benchmark sets into the project's verl-style parquet.

    python tools/prepare_data.py deepscaler.json data/deepscaler.parquet --split train
    python tools/prepare_data.py aime_2025.jsonl data/aime25.parquet --data-source aime25 --split test
    python tools/prepare_data.py dapo_raw.parquet data/dapo.parquet --skip-bad-rows

Nothing is downloaded: the input is a file the user already has (JSON list, JSON object with a
list under ``data``/``rows``/``problems``, JSONL, or parquet). Each row's problem text is taken
from the first present of ``problem``, ``question``, ``prompt`` (a string, or a verl-style list
of chat messages whose user content is taken), and its answer from ``answer``, ``ground_truth``,
``final_answer``, ``solution`` (or ``reward_model.ground_truth``). Output rows::

    data_source   str
    prompt        [{"role": "user", "content": problem + " " + INSTRUCTION}]
    ability       "math"
    reward_model  {"ground_truth": str, "style": "rule"}
    extra_info    {"index": i, "split": split}

A row without a usable problem or answer is an error naming the file, the row and the field;
``--skip-bad-rows`` drops such rows instead and prints how many, by reason. The output is
written to a temporary file, fsynced and renamed, so a failed run leaves no half-written file.

``solution`` is last among answer fields because it often holds a full worked solution: only its
final ``\\boxed{...}`` is used, and a solution without one is a bad row (never a whole essay as
the ground truth).
"""
from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path

from real_megatron.arguments import ArgumentParser, count
from real_megatron.data import PROMPT_SUFFIX as INSTRUCTION  # the package's prompt form, written once
from real_megatron.data import normalize_ground_truth, write_table_atomic
from real_megatron.rewards.math_reward import last_boxed_answer

PROBLEM_FIELDS = ("problem", "question", "prompt")
ANSWER_FIELDS = ("answer", "ground_truth", "final_answer", "solution")
LIST_KEYS = ("data", "rows", "problems", "examples")


class BadRow(ValueError):
    """One input row cannot be converted; ``reason`` is the --skip-bad-rows counter key."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------- reading


def read_rows(path: Path) -> list[dict]:
    """All rows of a JSON / JSONL / parquet file as dicts (errors name the file and line)."""
    suffix = path.suffix.lower()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (nothing is downloaded; give a local copy)")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); JSON Lines files need a .jsonl "
                             "suffix") from err
        if isinstance(data, dict):
            key = next((k for k in LIST_KEYS if isinstance(data.get(k), list)), None)
            if key is None:
                raise ValueError(f"{path}: a JSON object needs the rows as a list under one of {list(LIST_KEYS)}")
            data = data[key]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        return data
    raise ValueError(f"{path}: unsupported suffix {suffix!r}; use .json, .jsonl or .parquet")


# ----------------------------------------------------------------------------- one row


def normalize_answer(value, field: str, where: str) -> str:
    """A field's answer as the string the verifier compares: the package's ``normalize_ground_truth`` (lists,
    integral floats, ``$`` delimiters), after the reward's own ``\\boxed`` rule for a worked ``solution``."""
    if isinstance(value, bool):
        raise BadRow(f"{where}: field {field!r} is {value!r}, not an answer", "missing_answer")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRow(f"{where}: field {field!r} is {value}", "missing_answer")
    if field == "solution" and isinstance(value, str):
        boxed = last_boxed_answer(value)
        if boxed is None:
            raise BadRow(f"{where}: field 'solution' has no \\boxed{{...}} final answer; add an 'answer' field",
                         "missing_answer")
        value = boxed
    text = normalize_ground_truth(value)
    if not text:
        raise BadRow(f"{where}: field {field!r} is empty", "missing_answer")
    return text


def problem_text(row: dict, where: str) -> str:
    for field in PROBLEM_FIELDS:
        value = row.get(field)
        if value is None:
            continue
        if isinstance(value, (list, tuple)):  # verl-style chat messages: take the (last) user turn
            users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
            value = users[-1] if users else None
            if not isinstance(value, str):
                raise BadRow(f"{where}: field {field!r} has no user message with string content", "missing_problem")
        if not isinstance(value, str):
            raise BadRow(f"{where}: field {field!r} must be a string, got {type(value).__name__}", "missing_problem")
        text = value.strip()
        if text.endswith(INSTRUCTION):  # already in the project's form: do not append twice
            text = text[: -len(INSTRUCTION)].rstrip()
        if not text:
            raise BadRow(f"{where}: field {field!r} is empty", "missing_problem")
        return text
    raise BadRow(f"{where}: no problem field (looked for {list(PROBLEM_FIELDS)})", "missing_problem")


def answer_text(row: dict, where: str) -> str:
    for field in ANSWER_FIELDS:
        if field in row and row[field] is not None:
            return normalize_answer(row[field], field, where)
    rm = row.get("reward_model")
    if isinstance(rm, dict) and rm.get("ground_truth") is not None:
        return normalize_answer(rm["ground_truth"], "reward_model.ground_truth", where)
    raise BadRow(f"{where}: no answer field (looked for {list(ANSWER_FIELDS)} and reward_model.ground_truth)",
                 "missing_answer")


def convert_rows(rows, *, source: str, data_source: str, split: str, skip_bad_rows: bool):
    """Return (output rows, skipped counts by reason)."""
    out, skipped = [], Counter()
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        try:
            if not isinstance(row, dict):
                raise BadRow(f"{where}: expected an object, got {type(row).__name__}", "malformed_row")
            problem = problem_text(row, where)
            answer = answer_text(row, where)
        except BadRow as err:
            if not skip_bad_rows:
                raise ValueError(f"{err} (or pass --skip-bad-rows to drop such rows)") from None
            skipped[err.reason] += 1
            continue
        ds = data_source or (row.get("data_source") if isinstance(row.get("data_source"), str) else "") or ""
        out.append({
            "data_source": ds,
            "prompt": [{"role": "user", "content": f"{problem} {INSTRUCTION}"}],
            "ability": "math",
            "reward_model": {"ground_truth": answer, "style": "rule"},
            "extra_info": {"index": len(out), "split": split},
        })
    return out, skipped


# ----------------------------------------------------------------------------- writing


def write_parquet_atomic(rows: list[dict], path: Path) -> None:
    import pyarrow as pa

    schema = pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string())])),
    ])
    write_table_atomic(pa.Table.from_pylist(rows, schema=schema), path)


def prepare(inputs, output, *, data_source: str = "", split: str = "train", skip_bad_rows: bool = False,
            limit: int = 0) -> dict:
    """Convert ``inputs`` (one or more files) into one parquet at ``output``; returns a summary dict.
    ``limit``: keep the first rows only (0: all)."""
    if limit < 0:
        raise ValueError(f"limit must be >= 0 (0: all), got {limit}")
    all_rows, skipped = [], Counter()
    for inp in inputs:
        inp = Path(inp)
        rows, sk = convert_rows(read_rows(inp), source=str(inp), data_source=data_source, split=split,
                                skip_bad_rows=skip_bad_rows)
        all_rows += rows
        skipped += sk
    if limit:
        all_rows = all_rows[:limit]
    for i, row in enumerate(all_rows):  # indices run over the whole output, files concatenated
        row["extra_info"]["index"] = i
    if not all_rows:
        raise ValueError(f"no usable rows in {', '.join(map(str, inputs))} (skipped: {dict(skipped)})")
    write_parquet_atomic(all_rows, Path(output))
    return {"rows": len(all_rows), "skipped": dict(skipped), "output": str(output)}


def main(argv=None) -> int:
    p = ArgumentParser(prog="prepare_data.py", description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+", help="input files (.json, .jsonl, .parquet); the last positional is the output")
    p.add_argument("--data-source", default="", help="data_source for every row (default: the row's own, else '')")
    p.add_argument("--split", default="train", help="extra_info.split (train / test)")
    p.add_argument("--skip-bad-rows", action="store_true", help="drop rows without a problem/answer and count them")
    p.add_argument("--limit", type=count, default=0, help="keep at most this many rows (0: all)")
    args = p.parse_args(argv)
    if len(args.inputs) < 2:
        p.error("give at least one input file and the output .parquet")
    *inputs, output = args.inputs
    if not output.endswith(".parquet"):
        p.error(f"output {output!r} must end in .parquet")
    try:
        summary = prepare(inputs, output, data_source=args.data_source, split=args.split,
                          skip_bad_rows=args.skip_bad_rows, limit=args.limit)
    except (ValueError, FileNotFoundError) as err:
        print(f"prepare_data: {err}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{k}={v}" for k, v in summary["skipped"].items()) or "none"
    print(f"wrote {summary['rows']} rows to {summary['output']} (skipped: {skipped})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
