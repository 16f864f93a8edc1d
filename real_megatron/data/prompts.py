"""Prompt datasets: verl-style parquet and ``problem``/``answer`` JSONL, checked row by row on load.

The parquet layout is the one DeepScaleR, DAPO-Math-17k and the REAL authors' benchmark files are
distributed in::

    data_source   str (often empty)
    prompt        list of {role, content} chat messages; the user message already ends with
                  the paper's instruction (PROMPT_SUFFIX)
    reward_model  {ground_truth, style}; ground_truth is str | int | float | list of str
    extra_info    optional struct (index, split, ...)

A JSONL file has one object per line with ``problem`` (str) and ``answer`` (str/int/float/list);
the problem becomes one user message with PROMPT_SUFFIX appended (unless it already ends with it).

Every row is validated. A bad row raises ``ValueError`` naming the file, the row and the field,
or with ``on_bad_row="skip"`` is dropped and counted in ``PromptSet.skipped`` (reason -> count),
which the trainer reports as metrics.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The paper's instruction (docs/method.md §4), appended to the problem text.
PROMPT_SUFFIX = "Let's think step by step and output the final answer within \\boxed{}."

# Reasons a row can be rejected; the keys of PromptSet.skipped.
BAD_ROW_REASONS = ("missing_answer", "empty_prompt", "prompt_too_long", "malformed_row")

_ON_BAD_ROW = ("error", "skip")


@dataclass
class PromptRecord:
    """One prompt with its verifiable answer.

    ``index`` is the record's position in its PromptSet (a stable prompt id); ``source_file`` and
    ``row`` point back at the input row (0-based; for JSONL the 0-based line index, so error messages
    say "line row+1"). ``ground_truth`` is normalised (see ``normalize_ground_truth``). Files that list several
    acceptable answers (Minerva) keep the first as ``ground_truth`` and every one, normalised, in
    ``accepted_answers``; ``extra_info`` is the row's ``extra_info`` struct (the synthetic task stores
    a reference ``solution`` there for supervised warm-up).
    """

    index: int
    messages: list
    ground_truth: str
    data_source: str
    source_file: str
    row: int
    accepted_answers: tuple = ()
    extra_info: dict = field(default_factory=dict)

    @property
    def answers(self):
        """What a response is verified against: every accepted answer, else the ground truth."""
        return list(self.accepted_answers) if self.accepted_answers else self.ground_truth


class PromptSet(list):
    """A list of PromptRecord plus ``skipped``: reason -> number of rows dropped with on_bad_row='skip'."""

    def __init__(self, records: Iterable[PromptRecord] = (), skipped: dict | None = None):
        super().__init__(records)
        self.skipped: dict[str, int] = dict(skipped or {})

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


class BadRow(ValueError):
    """A row that fails validation; ``reason`` is one of BAD_ROW_REASONS."""

    def __init__(self, reason: str, field_name: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.field_name = field_name
        self.detail = detail


# --------------------------------------------------------------------------------------- ground truth

_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def normalize_ground_truth(value: Any) -> str:
    """Turn a ground truth of any of the distributed types into one canonical string.

    - a list/tuple (Minerva, OlympiadBench) -> its first element (see ``ground_truth_candidates``)
    - an integral float (AMC: ``142.0``) -> ``"142"``; other numbers -> ``str``
    - unescaped ``$`` math delimiters are removed (OlympiadBench: ``$2n$`` -> ``2n``, ``$69$,$84$``
      -> ``69,84``); escaped dollars (MATH-500: ``\\$18.90``) are kept
    - surrounding whitespace (Minerva's trailing newlines) is stripped

    Returns ``""`` for a missing answer (None, NaN, empty list or blank string); callers decide
    whether that is an error. Idempotent.
    """
    candidates = ground_truth_candidates(value)
    return candidates[0] if candidates else ""


def ground_truth_candidates(value: Any) -> list[str]:
    """All acceptable answers, normalised, in order; empty when the answer is missing."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        out = []
        for item in value:
            if isinstance(item, (list, tuple)):  # answers are flat lists; deeper nesting is a data bug
                raise TypeError(f"ground truth {_short(value)} nests lists; expected str, int, float or a flat list")
            for text in ground_truth_candidates(item):
                if text not in out:  # Minerva lists the same answer twice ('11000', '11000\n')
                    out.append(text)
        return out
    if isinstance(value, bool):  # bool is an int subclass; a True/False answer is a data bug
        raise TypeError(f"ground truth {value!r} is a bool; expected str, int, float or a list of str")
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return []
        text = str(int(value)) if value.is_integer() else repr(value)
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, str):
        text = value
    else:
        raise TypeError(f"ground truth {value!r} has type {type(value).__name__}; expected str, int, float or list")
    text = _UNESCAPED_DOLLAR.sub("", text).strip()
    return [text] if text else []


# ------------------------------------------------------------------------------------- prompt encoding

def encode_prompt(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of a prompt, ready for generation.

    With a chat template (``tokenizer.chat_template`` set) the messages are rendered with
    ``add_generation_prompt=True`` and the rendered text is tokenised without adding special tokens
    again (templates put BOS themselves when the model wants one). Without a template the fallback is
    plain text: the message contents joined by blank lines, followed by a newline, tokenised with the
    tokenizer's default special tokens (BOS if it adds one).
    """
    if not messages:
        raise ValueError("encode_prompt: empty message list")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n\n".join(str(m["content"]) for m in messages) + "\n"
    return list(tokenizer(text)["input_ids"])


# ------------------------------------------------------------------------------------------- loading

def load_prompts(path, *, max_prompt_length: int | None = None, tokenizer=None,
                 on_bad_row: str = "error") -> PromptSet:
    """Load prompts from a ``.parquet`` or ``.jsonl`` file (or a list of them, concatenated).

    ``max_prompt_length`` (tokens, counted with ``encode_prompt``) is enforced only when a tokenizer
    is given. ``on_bad_row``: ``"error"`` raises ValueError naming file, row and field; ``"skip"``
    drops the row and counts it in ``PromptSet.skipped`` by reason.
    """
    if on_bad_row not in _ON_BAD_ROW:
        raise ValueError(f"on_bad_row={on_bad_row!r}; choose one of {_ON_BAD_ROW}")
    if max_prompt_length is not None and max_prompt_length <= 0:
        raise ValueError(f"max_prompt_length={max_prompt_length} must be positive")
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths:
        raise ValueError("load_prompts: no files given")
    result = PromptSet()
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"prompt file {p} does not exist")
        suffix = p.suffix.lower()
        if suffix == ".parquet":
            rows = _parquet_rows(p)
        elif suffix in (".jsonl", ".json"):
            rows = _jsonl_rows(p)
        else:
            raise ValueError(f"{p}: unknown prompt file type {p.suffix!r}; use .parquet (verl schema) or .jsonl "
                             "(problem/answer)")
        for row, raw in rows:
            try:
                if isinstance(raw, BadRow):
                    raise raw
                record = _validate(raw, p, row, len(result), tokenizer, max_prompt_length)
            except BadRow as bad:
                if on_bad_row == "skip":
                    result.skipped[bad.reason] = result.skipped.get(bad.reason, 0) + 1
                    continue
                where = f"line {row + 1}" if suffix != ".parquet" else f"row {row}"
                raise ValueError(f"{p}: {where}: field '{bad.field_name}': {bad.detail}. Fix the row, or set "
                                 f"data.on_bad_row=skip to drop such rows (they are counted).") from None
            result.append(record)
    return result


def _parquet_rows(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise ValueError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc})") from exc
    columns = set(table.column_names)
    missing = [c for c in ("prompt", "reward_model") if c not in columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {sorted(columns)}. Expected the verl schema: "
                         "prompt (list of {role, content}), reward_model ({ground_truth, style}), data_source, "
                         "extra_info")
    wanted = [c for c in ("data_source", "prompt", "reward_model", "extra_info") if c in columns]
    # to_pylist per batch keeps memory bounded and gives plain python types (no numpy scalars)
    row = 0
    for batch in table.select(wanted).to_batches(max_chunksize=4096):
        for item in batch.to_pylist():
            yield row, {"format": "parquet", **item}
            row += 1


def _jsonl_rows(path: Path):
    """(row, dict | BadRow) per non-blank line; ``row`` is the 0-based line index (errors say 'line row+1')."""
    with path.open("rb") as fh:  # bytes: an invalid UTF-8 line is one bad row, not an unreadable file
        for row, raw_line in enumerate(fh):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield row, BadRow("malformed_row", "<line>", f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield row, BadRow("malformed_row", "<line>", f"not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(obj, dict):
                yield row, BadRow("malformed_row", "<line>", f"a JSON {type(obj).__name__}, expected an object "
                                  "with 'problem' and 'answer'")
                continue
            yield row, {"format": "jsonl", **obj}


def _validate(raw: dict, path: Path, row: int, index: int, tokenizer, max_prompt_length) -> PromptRecord:
    if raw["format"] == "parquet":
        messages = _check_messages(raw.get("prompt"))
        reward_model = raw.get("reward_model")
        if reward_model is None:
            raise BadRow("missing_answer", "reward_model.ground_truth", "reward_model is missing (null)")
        if not isinstance(reward_model, dict):
            raise BadRow("malformed_row", "reward_model.ground_truth", f"reward_model is {reward_model!r}, expected "
                         "a struct with ground_truth")
        answer_field, answer = "reward_model.ground_truth", reward_model.get("ground_truth")
        data_source = raw.get("data_source") or ""
        extra_info = raw.get("extra_info") or {}
    else:
        problem = raw.get("problem")
        if not isinstance(problem, str) or not problem.strip():
            raise BadRow("empty_prompt", "problem", f"problem is {_short(problem)}, expected non-empty text")
        content = problem.strip()
        if not content.endswith(PROMPT_SUFFIX):
            content = f"{content} {PROMPT_SUFFIX}"
        messages = [{"role": "user", "content": content}]
        answer_field, answer = "answer", raw.get("answer")
        data_source = raw.get("data_source") or ""
        extra_info = {k: v for k, v in raw.items() if k not in ("format", "problem", "answer", "data_source")}
    if not isinstance(data_source, str):
        raise BadRow("malformed_row", "data_source", f"data_source is {_short(data_source)}, expected a string")
    try:
        candidates = ground_truth_candidates(answer)
    except TypeError as exc:
        raise BadRow("malformed_row", answer_field, str(exc)) from None
    if not candidates:
        raise BadRow("missing_answer", answer_field, f"no answer (got {_short(answer)})")
    if tokenizer is not None and max_prompt_length is not None:
        n_tokens = len(encode_prompt(tokenizer, messages))
        if n_tokens > max_prompt_length:
            raise BadRow("prompt_too_long", "prompt", f"prompt is {n_tokens} tokens, longer than "
                         f"max_prompt_length={max_prompt_length} (raise data.max_prompt_length or skip)")
    return PromptRecord(index=index, messages=messages, ground_truth=candidates[0], data_source=data_source,
                        source_file=str(path), row=row, accepted_answers=tuple(candidates),
                        extra_info=dict(extra_info) if isinstance(extra_info, dict) else {})


def _check_messages(prompt) -> list:
    if prompt is None or (isinstance(prompt, (list, tuple)) and len(prompt) == 0):
        raise BadRow("empty_prompt", "prompt", f"no chat messages (got {_short(prompt)})")
    if isinstance(prompt, str):
        raise BadRow("malformed_row", "prompt", "a plain string; expected a list of {role, content} chat messages")
    if not isinstance(prompt, (list, tuple)):
        raise BadRow("malformed_row", "prompt", f"{type(prompt).__name__}; expected a list of {{role, content}}")
    messages = []
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRow("malformed_row", f"prompt[{i}]", f"{_short(m)} is not a {{role: str, content: str}} message")
        messages.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise BadRow("empty_prompt", "prompt", "no user message with non-blank content")
    return messages


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"
