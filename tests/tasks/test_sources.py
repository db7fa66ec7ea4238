"""Reading rows from files, the field accessors, and seeded sampling."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest

from molf.errors import DataError, MolfError
from molf.tasks.sources import (
    SPLIT_SALT,
    Origin,
    check_split,
    existing_path,
    hash_fraction,
    hash_part,
    hub_rows,
    normalised,
    parse_rows,
    read_rows,
    shuffled,
    split,
    take,
    text,
    text_list,
)


def test_json_list_rows_carry_the_line_each_item_starts_on(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"a": 1},\n\n  {"a": 2,\n   "b": 3}, {"a": 4}\n]\n')
    rows = read_rows(path)
    assert [(o.line, r["a"]) for o, r in rows] == [(2, 1), (4, 2), (5, 4)]
    assert all(o.path == str(path) for o, _ in rows)


def test_empty_json_list_has_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(" [ ] ")
    assert read_rows(path) == []


def test_jsonl_rows_skip_blank_lines_and_keep_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert [(o.line, r["a"]) for o, r in read_rows(path)] == [(1, 1), (3, 2)]


def test_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataError, match=r"rows\.jsonl:2: field '<json>': invalid JSON") as e:
        read_rows(path)
    assert (e.value.path, e.value.line) == (str(path), 2)


def test_bad_json_list_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text('[\n {"a": 1},\n {"a" 2}\n]')
    with pytest.raises(DataError, match=r"rows\.json:3: field '<json>'"):
        read_rows(path)


def test_missing_comma_in_json_list_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text('[\n {"a": 1}\n {"a": 2}\n]')
    with pytest.raises(DataError, match=r"rows\.json:3: .*expected ',' or ']'"):
        read_rows(path)


def test_row_that_is_not_an_object_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"rows\.jsonl:2: field '<row>': expected a JSON object"):
        read_rows(path)


def test_missing_path_is_a_molf_error(tmp_path: Path) -> None:
    with pytest.raises(MolfError, match="no such file or directory"):
        existing_path(str(tmp_path / "nope.json"))


def test_text_fields_follow_dots_and_reject_missing_empty_and_non_strings() -> None:
    origin = Origin("f.json", 7)
    row = {"a": {"b": "x"}, "empty": " ", "num": 3, "none": None}
    assert text(row, "a.b", origin) == "x"
    with pytest.raises(DataError, match=r"f\.json:7: field 'a\.c': missing"):
        text(row, "a.c", origin)
    with pytest.raises(DataError, match=r"field 'none': missing"):
        text(row, "none", origin)
    with pytest.raises(DataError, match=r"field 'empty': must be a non-empty string"):
        text(row, "empty", origin)
    with pytest.raises(DataError, match=r"field 'num': must be a non-empty string"):
        text(row, "num", origin)


def test_text_list_needs_non_empty_strings() -> None:
    origin = Origin("f.json", 1)
    assert text_list({"p": ["a", "b"]}, "p", origin) == ("a", "b")
    for bad in ([], "a", ["a", ""], ["a", 1]):
        with pytest.raises(DataError, match="field 'p'"):
            text_list({"p": bad}, "p", origin)


def parse_x(row: dict, origin: Origin) -> str:
    return text(row, "x", origin)


def test_parse_rows_raises_on_local_rows_and_counts_skipped_hub_rows() -> None:
    rows = [(Origin("hub:d[train]", 1), {"x": "a"}), (Origin("hub:d[train]", 2), {"y": "b"})]
    assert parse_rows(rows, parse_x, skip_bad=True) == (["a"], 1)
    with pytest.raises(DataError, match=r"hub:d\[train\]:2: field 'x'"):
        parse_rows(rows, parse_x, skip_bad=False)


def test_take_is_a_seeded_shuffle_then_a_cap() -> None:
    items = list(range(50))
    assert take(items, 5, 3, "n") == take(items, 5, 3, "n") == shuffled(items, 3)[:5]
    assert take(items, 5, 3, "n") != take(items, 5, 4, "n")
    assert sorted(take(items, None, 3, "n")) == items
    assert sorted(take(items, 500, 3, "n")) == items
    for bad in (0, -1, 1.5, True):
        with pytest.raises(MolfError, match="max_eval_samples must be a positive integer"):
            take(items, bad, 0, "max_eval_samples")


def test_split_is_disjoint_complete_and_deterministic() -> None:
    items = list(range(10))
    train, evals = split(items, 0.2, seed=1)
    assert len(evals) == 2 and sorted(train + evals) == items
    assert (train, evals) == split(items, 0.2, seed=1)
    assert split(["a", "b"], 0.01, 0) in ((["a"], ["b"]), (["b"], ["a"]))


def test_hash_fraction_is_the_documented_sha256_number() -> None:
    assert SPLIT_SALT == "molf-split-v1"  # changing it would move every split
    digest = hashlib.sha256(b"molf-split-v1\x00what is x?").digest()
    assert hash_fraction("What  is\tx? ") == int.from_bytes(digest[:8], "big") / 2**64
    assert hash_fraction("what is x?") == pytest.approx(0.507138, abs=1e-6)  # pinned
    assert hash_fraction("what is x?", salt="other") != hash_fraction("what is x?")
    values = [hash_fraction(f"question {i}") for i in range(2000)]
    assert all(0 <= v < 1 for v in values)
    assert 0.45 < sum(v < 0.5 for v in values) / 2000 < 0.55  # about uniform


def test_normalised_folds_case_and_whitespace() -> None:
    assert normalised("  The\tQuick \n brown  ") == "the quick brown"


def test_hash_part_partitions_by_interval_and_keeps_order() -> None:
    items = [f"item {i}" for i in range(300)]
    cuts = [0.0, 0.7, 0.85, 1.0]
    parts = [hash_part(items, str, lo, hi) for lo, hi in zip(cuts, cuts[1:], strict=False)]
    assert sorted(sum(parts, [])) == sorted(items)  # disjoint and complete
    assert all(part == [x for x in items if x in part] for part in parts)
    assert parts[1] == [x for x in items if 0.7 <= hash_fraction(x) < 0.85]
    assert hash_part(items[::-1], str, 0.7, 0.85) == parts[1][::-1]


def test_check_split_accepts_val_and_test_only() -> None:
    assert check_split("val") == "val" and check_split("test") == "test"
    for bad in ("train", "Test", ""):
        with pytest.raises(MolfError, match="split must be one of val, test"):
            check_split(bad)


@pytest.mark.skipif(
    importlib.util.find_spec("datasets") is not None,
    reason="datasets is installed; this checks the message shown when it is not",
)
def test_hub_loading_without_datasets_says_how_to_install_it() -> None:
    with pytest.raises(MolfError, match="pip install datasets"):
        hub_rows("openlifescienceai/medmcqa", "train")
