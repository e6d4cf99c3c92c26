"""Loading problems: JSONL/Parquet, column layouts, bad rows named by line, the integer filter, splits."""

from __future__ import annotations

import json

import pytest

from training.data import (
    DataConfig,
    DataError,
    Problem,
    integer_answer,
    load_dataset,
    load_problems,
    load_train_eval,
    split_problems,
)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_jsonl_problem_answer(tmp_path):
    spec = write_jsonl(tmp_path / "d.jsonl", [{"problem": "1+1?", "answer": "2"}, {"id": "x", "problem": "2+2?", "answer": 4}])
    assert load_problems(spec) == [Problem("d:1", "1+1?", "2"), Problem("x", "2+2?", "4")]


def test_parquet_problem_answer(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"problem": ["a?", "b?"], "answer": ["7", "-3"]}), path)
    assert load_problems(str(path)) == [Problem("d:1", "a?", "7"), Problem("d:2", "b?", "-3")]


def test_parquet_bad_rows_named_by_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"problem": ["a?", None, "c?"], "answer": ["7", "1", ""]}), path)
    with pytest.raises(DataError) as e:
        load_problems(str(path))
    assert [i.where for i in e.value.issues] == [f"{path}:row 2", f"{path}:row 3"]
    assert "answer is empty" in str(e.value)


def test_verl_layout_dapo_original(tmp_path):
    row = {
        "prompt": [{"role": "user", "content": "Find x."}],
        "reward_model": {"ground_truth": "34", "style": "rule"},
    }
    assert load_problems(write_jsonl(tmp_path / "v.jsonl", [row])) == [Problem("v:1", "Find x.", "34")]


def test_solution_needs_explicit_field(tmp_path):
    spec = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Find x.", "solution": "34"}])
    with pytest.raises(DataError, match="answer_field"):
        load_problems(spec)
    assert load_problems(spec, DataConfig(answer_field="solution"))[0].answer == "34"


def test_bad_rows_listed_with_line_and_reason(tmp_path):
    spec = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"problem": "ok?", "answer": "1"},
            "{not json",
            {"problem": "", "answer": "1"},
            "",  # blank line: not a row, not an error
            {"problem": "no answer"},
            "[1, 2]",
            {"id": "d", "problem": "p", "answer": "1"},
            {"id": "d", "problem": "q", "answer": "2"},
        ],
    )
    with pytest.raises(DataError) as e:
        load_problems(spec)
    got = [(i.where.rsplit(":", 1)[1], i.reason) for i in e.value.issues]
    assert [g[0] for g in got] == ["2", "3", "5", "6", "8"]
    assert "not valid JSON" in got[0][1]
    assert "problem is empty" in got[1][1]
    assert "no answer column" in got[2][1]
    assert "JSON object" in got[3][1]
    assert "duplicate id 'd'" in got[4][1] and "bad.jsonl:7" in got[4][1]
    assert f"{spec}:2" in str(e.value)  # the message itself names file:line


def test_skip_mode_reports_instead_of_raising(tmp_path):
    spec = write_jsonl(tmp_path / "d.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b"}])
    ds = load_dataset(spec, DataConfig(on_bad_row="skip"))
    assert [p.problem for p in ds.problems] == ["a"]
    assert [str(i) for i in ds.rejected] == [f"{spec}:2: no answer column: looked for ['answer', 'ground_truth', 'reward_model.ground_truth'], found ['problem']; set answer_field to the right column"]


@pytest.mark.parametrize(
    "text,value",
    [("42", 42), (" -7 ", -7), ("+3", 3), ("$12$", 12), ("\\boxed{100}", 100), ("1,000", 1000), ("0", 0)],
)
def test_integer_answer_accepts(text, value):
    assert integer_answer(text) == value


@pytest.mark.parametrize("text", ["3.0", "1/2", "\\frac{1}{2}", "2\\sqrt{3}", "x=3", "1,00", "", "12a"])
def test_integer_answer_rejects(text):
    assert integer_answer(text) is None


def test_integer_filter_reports_what_it_removed(tmp_path):
    spec = write_jsonl(
        tmp_path / "d.jsonl",
        [{"problem": "a", "answer": "12"}, {"problem": "b", "answer": "\\frac{1}{2}"}, {"problem": "c", "answer": 5}],
    )
    ds = load_dataset(spec, DataConfig(integer_answers_only=True))
    assert [p.answer for p in ds.problems] == ["12", "5"]
    assert [i.where for i in ds.filtered_out] == [f"{spec}:2"]
    assert len(load_problems(spec)) == 3  # filter off by default


def test_nothing_left_is_an_error(tmp_path):
    spec = write_jsonl(tmp_path / "d.jsonl", [{"problem": "b", "answer": "1/2"}])
    with pytest.raises(DataError, match="no problems left"):
        load_problems(spec, DataConfig(integer_answers_only=True))


def test_file_level_errors_name_the_input(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_problems(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.csv").write_text("problem,answer\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_problems(str(tmp_path / "d.csv"))
    with pytest.raises(DataError, match="builtin:demo-train"):
        load_problems("builtin:nope")


def test_builtin_demo_splits_are_disjoint_and_deterministic():
    from training.demo_tasks import DemoConfig

    demo = DemoConfig(n_train=100, n_eval=20)
    train = load_problems("builtin:demo-train", demo=demo)
    held = load_problems("builtin:demo-eval", demo=demo)
    assert len(train) == 100 and len(held) == 20
    assert not {p.problem for p in train} & {p.problem for p in held}
    assert train == load_problems("builtin:demo-train", demo=demo)
    assert all(integer_answer(p.answer) is not None for p in train + held)


def test_split_is_deterministic_and_order_independent():
    problems = [Problem(f"p{i}", f"q{i}", str(i)) for i in range(50)]
    tr, ev = split_problems(problems, 10, seed=3)
    assert len(tr) == 40 and len(ev) == 10 and not {p.id for p in tr} & {p.id for p in ev}
    tr2, ev2 = split_problems(list(reversed(problems)), 10, seed=3)
    assert {p.id for p in ev} == {p.id for p in ev2}
    assert {p.id for p in split_problems(problems, 10, seed=4)[1]} != {p.id for p in ev}
    with pytest.raises(ValueError, match="eval_size"):
        split_problems(problems, 50)


def test_load_train_eval_splits_one_file(tmp_path):
    spec = write_jsonl(tmp_path / "d.jsonl", [{"problem": f"q{i}", "answer": str(i)} for i in range(30)])
    train, held = load_train_eval(DataConfig(train=spec, eval=None, eval_size=5))
    assert len(train) == 25 and len(held) == 5


def test_config_rejects_unknown_fields():
    with pytest.raises(ValueError):
        DataConfig(integer_only=True)
