"""tools/prepare_data.py: local JSON / JSONL / parquet -> the project's verl-style parquet, validated."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shared_data import shared_file  # tests/ is on sys.path under pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("prepare_data", REPO / "tools" / "prepare_data.py")
prep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prep)

SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_with_common_field_names(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"problem": "1+1?", "answer": "2"},
        {"question": "Area?", "final_answer": 142.0},           # float -> "142"
        {"prompt": "Largest?", "ground_truth": ["$x=3$\n"]},    # list of one, $ and newline stripped
        {"problem": "Sum?", "solution": "We add: \\boxed{\\frac{1}{2}} so done."},
    ])
    out = tmp_path / "out.parquet"
    assert prep.main([str(src), str(out), "--split", "test", "--data-source", "mine"]) == 0
    rows = pq.read_table(out).to_pylist()
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["2", "142", "x=3", "\\frac{1}{2}"]
    assert rows[0]["prompt"] == [{"role": "user", "content": "1+1?" + SUFFIX}]
    assert all(r["reward_model"]["style"] == "rule" and r["data_source"] == "mine" for r in rows)
    assert [r["extra_info"] for r in rows] == [{"index": i, "split": "test"} for i in range(4)]
    # the project's own loader reads the result, row by row validated
    from real_megatron.data.prompts import PROMPT_SUFFIX, load_prompts
    assert rows[1]["prompt"][0]["content"].endswith(PROMPT_SUFFIX)
    loaded = load_prompts(out)
    assert [r.ground_truth for r in loaded] == ["2", "142", "x=3", "\\frac{1}{2}"]


def test_json_list_and_object_inputs(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"problem": "p", "answer": 3}]))
    (tmp_path / "b.json").write_text(json.dumps({"data": [{"problem": "q", "answer": "x"}]}))
    out = tmp_path / "o.parquet"
    summary = prep.prepare([tmp_path / "a.json", tmp_path / "b.json"], out)
    rows = pq.read_table(out).to_pylist()
    assert summary["rows"] == 2 and [r["extra_info"]["index"] for r in rows] == [0, 1]
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["3", "x"]
    (tmp_path / "c.json").write_text(json.dumps({"items": []}))
    with pytest.raises(ValueError, match="under one of"):
        prep.prepare([tmp_path / "c.json"], out)


def test_missing_answer_names_file_row_and_field(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": ""},
                                               {"problem": "c"}])
    out = tmp_path / "out.parquet"
    with pytest.raises(ValueError, match=r"bad\.jsonl row 1: field 'answer' is empty.*--skip-bad-rows"):
        prep.prepare([src], out)
    assert not out.exists()  # nothing half-written
    assert list(tmp_path.glob(".out.parquet.*")) == []


def test_skip_bad_rows_counts_reasons(tmp_path, capsys):
    src = write_jsonl(tmp_path / "mixed.jsonl", [
        {"problem": "a", "answer": "1"}, {"problem": "b"}, {"answer": "2"},
        {"problem": "c", "solution": "no boxed answer here"}, {"problem": "d", "answer": [None]}])
    out = tmp_path / "out.parquet"
    assert prep.main([str(src), str(out), "--skip-bad-rows"]) == 0
    assert "missing_answer=3" in capsys.readouterr().out
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 1 and rows[0]["extra_info"]["index"] == 0
    summary = prep.prepare([src], out, skip_bad_rows=True)
    assert summary["skipped"] == {"missing_answer": 3, "missing_problem": 1}


def test_existing_output_survives_a_failed_run(tmp_path):
    out = tmp_path / "out.parquet"
    prep.prepare([write_jsonl(tmp_path / "good.jsonl", [{"problem": "p", "answer": "1"}])], out)
    before = out.read_bytes()
    with pytest.raises(ValueError):
        prep.prepare([write_jsonl(tmp_path / "bad.jsonl", [{"problem": "p"}])], out)
    assert out.read_bytes() == before


def test_verl_parquet_round_trip_does_not_double_the_instruction(tmp_path):
    src = shared_file("amc23.parquet")
    out = tmp_path / "amc.parquet"
    prep.prepare([src], out, split="test")
    orig = pq.read_table(src).to_pylist()
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == len(orig) == 83
    assert rows[0]["prompt"][0]["content"].count("Let's think step by step") == 1
    gt = orig[0]["reward_model"]["ground_truth"]
    expected = str(int(gt)) if isinstance(gt, float) and gt.is_integer() else str(gt)
    assert rows[0]["reward_model"]["ground_truth"] == expected and "." not in expected


def test_parquet_input_with_plain_columns(tmp_path):
    src = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"question": ["q1", "q2"], "answer": ["5", "6"], "data_source": ["s", "s"]}), src)
    out = tmp_path / "out.parquet"
    prep.prepare([src], out, limit=1)
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 1 and rows[0]["data_source"] == "s" and rows[0]["reward_model"]["ground_truth"] == "5"


def test_bad_inputs_are_clear(tmp_path, capsys):
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"problem": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: not valid JSON"):
        prep.read_rows(bad)
    assert prep.main([str(tmp_path / "missing.json"), str(tmp_path / "o.parquet")]) == 2
    assert "nothing is downloaded" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unsupported suffix"):
        prep.read_rows(tmp_path / "x.csv") if (tmp_path / "x.csv").write_text("a") else None
    # a worked solution's answer is found by the reward's own rule: the last box, \\fbox included
    assert prep.normalize_answer("a \\boxed{x^{2}} b \\boxed{ {3} }", "solution", "w") == "{3}"
    assert prep.normalize_answer("so \\fbox{$12$}", "solution", "w") == "12"
