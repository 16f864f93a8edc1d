"""Prompt data: the shipped parquet files, ground-truth normalisation, JSONL, malformed rows, the synthetic
task, the task tokenizer and its chat template, and the resumable sampler."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shared_data import shared_file  # tests/ is on sys.path under pytest

from real_megatron.data import (
    PROMPT_SUFFIX,
    PromptSampler,
    encode_prompt,
    ground_truth_candidates,
    load_prompts,
    normalize_ground_truth,
)
from real_megatron.repro.arithmetic import arithmetic_problems, arithmetic_texts, write_arithmetic_task
from real_megatron.repro.tokenizer import train_task_tokenizer

ROWS = {"aime24": 30, "aime25": 30, "amc23": 83, "math500": 500, "minerva": 272, "olympiad_bench": 675,
        "dapo-math-17k": 17398}


# ------------------------------------------------------------------------------------ shipped files

@pytest.mark.parametrize("name", list(ROWS))
def test_shipped_file_loads_as_is(name):
    records = load_prompts(shared_file(f"{name}.parquet"))
    assert len(records) == ROWS[name] and records.skipped == {}
    assert [r.index for r in records] == list(range(len(records)))
    for r in records:
        assert r.messages[-1]["role"] == "user" and r.messages[-1]["content"].rstrip().endswith(PROMPT_SUFFIX)
        assert r.ground_truth and r.ground_truth == r.accepted_answers[0]
        for a in r.accepted_answers:  # normalised: no $ delimiters, no surrounding whitespace, no "142.0"
            assert a == a.strip() and "$" not in a.replace("\\$", ""), (name, r.row, a)
        assert r.source_file.endswith(f"{name}.parquet")


def test_shipped_ground_truth_types_are_normalised():
    amc = load_prompts(shared_file("amc23.parquet"))
    assert amc[0].ground_truth == "142" and all(not r.ground_truth.endswith(".0") for r in amc)
    aime25 = load_prompts(shared_file("aime25.parquet"))
    assert aime25[0].ground_truth == "70"
    olympiad = load_prompts(shared_file("olympiad_bench.parquet"))
    assert olympiad[1].ground_truth == "\\frac{1}{2 n+2}"
    minerva = load_prompts(shared_file("minerva.parquet"))
    assert minerva[0].ground_truth == "9.6"
    multi = [r for r in minerva if len(r.accepted_answers) > 1]
    # 75 rows list 2-3 answers; after merging duplicates ('11000' / '11000\n') 40 keep 2+, 42 extra answers in all
    assert len(multi) == 40 and sum(len(r.accepted_answers) - 1 for r in minerva) == 42
    assert any(r.accepted_answers == ("0.01", "0.02") for r in multi)
    math500 = load_prompts(shared_file("math500.parquet"))
    assert math500[0].ground_truth == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert math500[459].ground_truth == "\\$18.90"  # an escaped dollar is a currency sign: kept


# ----------------------------------------------------------------------------------- normalisation

@pytest.mark.parametrize("raw,expected", [
    ("204", ["204"]),
    ("025", ["025"]),                       # AIME: kept; math-verify compares values
    (70, ["70"]),
    (142.0, ["142"]),
    (3.0, ["3"]),
    (-2.0, ["-2"]),
    (0.5, ["0.5"]),
    (["9.6\n"], ["9.6"]),
    (["$2^{1009}$"], ["2^{1009}"]),
    (["$69$,$84$"], ["69,84"]),
    ("  $x+1$ ", ["x+1"]),
    ("\\$18.90", ["\\$18.90"]),             # an escaped dollar is a currency sign, not a delimiter
    (["6630.65\n", "6630\n"], ["6630.65", "6630"]),
    (["11000\n", "11000"], ["11000"]),      # duplicates merged, order kept
    ([], []), (None, []), ("  ", []), ("$$", []), (float("nan"), []),
])
def test_ground_truth_normalisation(raw, expected):
    assert ground_truth_candidates(raw) == expected
    assert normalize_ground_truth(raw) == (expected[0] if expected else "")
    assert ground_truth_candidates(expected) == expected  # idempotent


@pytest.mark.parametrize("raw", [True, {"a": 1}, [["1"]], b"7"])
def test_ground_truth_bad_types(raw):
    with pytest.raises(TypeError, match="ground truth"):
        ground_truth_candidates(raw)


# --------------------------------------------------------------------------------------------- JSONL

def test_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [json.dumps({"problem": "What is 2+2?", "answer": 4}), "",
             json.dumps({"problem": f"Sum? {PROMPT_SUFFIX}", "answer": ["$5$"], "level": 3})]
    path.write_text("\n".join(lines) + "\n")
    records = load_prompts(path)
    assert [r.ground_truth for r in records] == ["4", "5"]
    assert records[0].messages == [{"role": "user", "content": f"What is 2+2? {PROMPT_SUFFIX}"}]
    assert records[1].messages[0]["content"].count(PROMPT_SUFFIX) == 1  # not appended twice
    assert records[1].extra_info == {"level": 3} and records[1].row == 2


@pytest.mark.parametrize("bad_line,field,reason", [
    (b'{"problem": "x", "answer": 1', "<line>", "malformed_row"),
    (b'{"problem": "x"}', "answer", "missing_answer"),
    (b'{"problem": "  ", "answer": 1}', "problem", "empty_prompt"),
    (b'{"problem": "x", "answer": true}', "answer", "malformed_row"),
    (b'["x", 1]', "<line>", "malformed_row"),
    (b'{"problem": "\xff\xfe", "answer": 1}', "<line>", "malformed_row"),
])
def test_jsonl_bad_lines(tmp_path, bad_line, field, reason):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"problem": "1+1", "answer": 2}).encode()
    path.write_bytes(good + b"\n" + bad_line + b"\n" + good + b"\n")
    with pytest.raises(ValueError) as err:
        load_prompts(path)
    assert f"{path}: line 2: field '{field}'" in str(err.value)
    skipped = load_prompts(path, on_bad_row="skip")
    assert len(skipped) == 2 and skipped.skipped == {reason: 1}


# ----------------------------------------------------------------------------------- bad parquet rows

def _row(content="Compute 1+1. " + PROMPT_SUFFIX, answer="2"):
    return {"data_source": "t", "prompt": [{"role": "user", "content": content}], "ability": "math",
            "reward_model": {"ground_truth": answer, "style": "rule"}, "extra_info": {"index": 0, "split": "x"}}


def _write(path, rows, schema=None):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


BAD_ROWS = {
    # name: (bad row, field named in the error, skip reason)
    "missing answer": ({**_row(), "reward_model": {"ground_truth": None, "style": "rule"}},
                       "reward_model.ground_truth", "missing_answer"),
    "blank answer": ({**_row(answer="  $ $ ")}, "reward_model.ground_truth", "missing_answer"),
    "null reward_model": ({**_row(), "reward_model": None}, "reward_model.ground_truth", "missing_answer"),
    "empty prompt list": ({**_row(), "prompt": []}, "prompt", "empty_prompt"),
    "null prompt": ({**_row(), "prompt": None}, "prompt", "empty_prompt"),
    "blank user message": ({**_row(content="   ")}, "prompt", "empty_prompt"),
    "message without content": ({**_row(), "prompt": [{"role": "user", "content": None}]}, "prompt[0]",
                                "malformed_row"),
}


@pytest.mark.parametrize("name", list(BAD_ROWS))
def test_bad_parquet_row_names_file_row_and_field(tmp_path, name):
    bad, field, reason = BAD_ROWS[name]
    rows = [_row(), _row(), bad, _row()]
    # the schema of the good rows, so a null in a struct field is a null value, not a missing column
    schema = pa.Table.from_pylist([_row()]).schema
    path = _write(tmp_path / "bad.parquet", rows, schema)
    with pytest.raises(ValueError) as err:
        load_prompts(path)
    message = str(err.value)
    assert f"{path}: row 2: field '{field}'" in message and "on_bad_row=skip" in message
    kept = load_prompts(path, on_bad_row="skip")
    assert len(kept) == 3 and kept.skipped == {reason: 1} and kept.num_skipped == 1
    assert [r.row for r in kept] == [0, 1, 3] and [r.index for r in kept] == [0, 1, 2]


def test_prompt_too_long_needs_a_tokenizer(tmp_path, task_tokenizer):
    long_row = _row(content="1+2+3+4+5+6+7+8+9 " * 10 + PROMPT_SUFFIX)
    path = _write(tmp_path / "long.parquet", [_row(), long_row, _row(), long_row])
    assert len(load_prompts(path, max_prompt_length=64)) == 4  # no tokenizer: lengths are not checked
    n_short = len(encode_prompt(task_tokenizer, load_prompts(path)[0].messages))
    with pytest.raises(ValueError, match=r"long\.parquet: row 1: field 'prompt': prompt is \d+ tokens, longer than "
                                         r"max_prompt_length=64"):
        load_prompts(path, max_prompt_length=64, tokenizer=task_tokenizer)
    kept = load_prompts(path, max_prompt_length=64, tokenizer=task_tokenizer, on_bad_row="skip")
    assert len(kept) == 2 and kept.skipped == {"prompt_too_long": 2}
    assert len(load_prompts(path, max_prompt_length=n_short, tokenizer=task_tokenizer, on_bad_row="skip")) == 2
    with pytest.raises(ValueError, match="row 0"):
        load_prompts(path, max_prompt_length=n_short - 1, tokenizer=task_tokenizer)


def test_wrongly_typed_columns(tmp_path):
    path = _write(tmp_path / "strprompt.parquet", [{**_row(), "prompt": "Compute 1+1."}])
    with pytest.raises(ValueError, match=r"strprompt\.parquet: row 0: field 'prompt': a plain string"):
        load_prompts(path)
    path = _write(tmp_path / "strrm.parquet", [{**_row(), "reward_model": "2"}])
    with pytest.raises(ValueError, match=r"strrm\.parquet: row 0: field 'reward_model.ground_truth'"):
        load_prompts(path)
    assert load_prompts(path, on_bad_row="skip").skipped == {"malformed_row": 1}


def test_unreadable_files(tmp_path):
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet\n" * 10)
    with pytest.raises(ValueError, match=r"garbage\.parquet: not a readable parquet file"):
        load_prompts(garbage)
    no_columns = _write(tmp_path / "cols.parquet", [{"question": "1+1", "answer": "2"}])
    with pytest.raises(ValueError, match=r"cols\.parquet: missing column\(s\) \['prompt', 'reward_model'\]"):
        load_prompts(no_columns)
    csv = tmp_path / "p.csv"
    csv.write_text("problem,answer\n1+1,2\n")
    with pytest.raises(ValueError, match=r"p\.csv: unknown prompt file type"):
        load_prompts(csv)
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_prompts(tmp_path / "nope.parquet")
    with pytest.raises(ValueError, match="on_bad_row"):
        load_prompts(garbage, on_bad_row="ignore")


# ------------------------------------------------------------------------------------ synthetic task

def test_synthetic_task_is_seeded_and_disjoint(tmp_path):
    a_train, a_test = write_arithmetic_task(tmp_path / "a", n_train=100, n_test=40, seed=3)
    b_train, b_test = write_arithmetic_task(tmp_path / "b", n_train=100, n_test=40, seed=3)
    c_train, _ = write_arithmetic_task(tmp_path / "c", n_train=100, n_test=40, seed=4)
    assert pq.read_table(a_train).equals(pq.read_table(b_train)) and pq.read_table(a_test).equals(pq.read_table(b_test))
    assert not pq.read_table(a_train).equals(pq.read_table(c_train))
    train, test = load_prompts(a_train), load_prompts(a_test)
    assert len(train) == 100 and len(test) == 40
    train_q = {r.messages[0]["content"] for r in train}
    test_q = {r.messages[0]["content"] for r in test}
    assert len(train_q) == 100 and len(test_q) == 40 and not train_q & test_q
    for r in list(train) + list(test):
        question = r.messages[0]["content"].split("=?")[0]
        assert r.messages[0]["content"] == f"{question}=? {PROMPT_SUFFIX}"
        assert int(r.ground_truth) == eval(question) >= 0  # noqa: S307 - digits and +/- written by the test subject
        assert r.extra_info["solution"] == f"\\boxed{{{r.ground_truth}}}"
        assert r.data_source == "synthetic_arithmetic"
    from real_megatron.rewards import math_reward

    assert all(math_reward(r.extra_info["solution"], r.ground_truth) == 1.0 for r in test)
    with pytest.raises(ValueError, match="only 187 distinct problems"):
        write_arithmetic_task(tmp_path / "d", n_train=180, n_test=40)
    assert len(arithmetic_problems()) == 187


# ----------------------------------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def task_tokenizer(tmp_path_factory):
    return train_task_tokenizer(arithmetic_texts(), tmp_path_factory.mktemp("tok") / "tokenizer")


def test_tokenizer_round_trip_and_chat_template(tmp_path, task_tokenizer):
    from transformers import AutoTokenizer

    out = tmp_path / "tok"
    train_task_tokenizer(arithmetic_texts(), out, vocab_size=320)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) <= 320 and tok.chat_template
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<|pad|>", "<|bos|>", "<|eos|>")
    for text in arithmetic_texts()[:50] + ["\\boxed{17}", "unseen words: Ωμέγα 12345 {}\\"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text  # byte-level: exact, even for text it never saw
    assert tok.convert_ids_to_tokens(tok.encode("123", add_special_tokens=False)) == ["1", "2", "3"]

    messages = [{"role": "user", "content": f"3+4=? {PROMPT_SUFFIX}"}]
    ids = encode_prompt(tok, messages)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids) == f"<|bos|><|user|>3+4=? {PROMPT_SUFFIX}<|assistant|>"
    assert len(ids) < 32  # short enough for the tiny CPU model's context
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": "\\boxed{7}"}], tokenize=False)
    assert full == f"<|bos|><|user|>3+4=? {PROMPT_SUFFIX}<|assistant|>\\boxed{{7}}<|eos|>"
    assert ids == encode_prompt(task_tokenizer, messages)  # training is deterministic


def test_encode_prompt_without_chat_template(task_tokenizer, tmp_path):
    task_tokenizer.save_pretrained(tmp_path / "t")
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tmp_path / "t")
    plain.chat_template = None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1=?"}]
    assert plain.decode(encode_prompt(plain, messages)) == "Be brief.\n\n1+1=?\n"
    with pytest.raises(ValueError, match="empty message list"):
        encode_prompt(plain, [])


def test_train_task_tokenizer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no non-empty texts"):
        train_task_tokenizer(["", None], tmp_path / "x")
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_task_tokenizer(["a b"], tmp_path / "x", vocab_size=100)


# ------------------------------------------------------------------------------------------- sampler

def test_sampler_resume_equals_uninterrupted():
    prompts = list(range(23))
    straight = PromptSampler(prompts, batch_size=5, seed=9)
    expected = [straight.next_batch() for _ in range(12)]  # crosses several epoch boundaries mid-batch
    first = PromptSampler(prompts, batch_size=5, seed=9)
    got = [first.next_batch() for _ in range(7)]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = PromptSampler(prompts, batch_size=5, seed=9)
    resumed.load_state_dict(state)
    got += [resumed.next_batch() for _ in range(5)]
    assert got == expected
    flat = [p for b in expected for p in b]
    # each epoch is a permutation: every prompt once per 23 draws, in a different order each epoch
    assert sorted(flat[:23]) == prompts and sorted(flat[23:46]) == prompts and flat[:23] != flat[23:46]
    assert expected != [PromptSampler(prompts, batch_size=5, seed=10).next_batch() for _ in range(12)]


def test_sampler_refuses_mismatched_state():
    s = PromptSampler(list(range(10)), batch_size=3, seed=1)
    with pytest.raises(ValueError, match="same data files"):
        PromptSampler(list(range(11)), batch_size=3, seed=1).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="same data files"):
        PromptSampler(list(range(10)), batch_size=3, seed=2).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="larger than the prompt set"):
        PromptSampler(list(range(2)), batch_size=3)
    with pytest.raises(ValueError, match="empty"):
        PromptSampler([], batch_size=1)
