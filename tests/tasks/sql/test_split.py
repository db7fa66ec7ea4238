"""Text-to-SQL splits: the --data PATH#MODE suffix, by-database and by-question sides."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from molf.errors import MolfError
from molf.tasks.sources import hash_fraction
from molf.tasks.sql.split import (
    HELD_OUT_MIN_DATABASES,
    HELD_OUT_MIN_SHARE,
    data_and_mode,
    database_sides,
    hub_test_side,
    question_side,
)


def test_data_and_mode(tmp_path: Path) -> None:
    assert data_and_mode("spider") == ("spider", None)
    assert data_and_mode("data/spider#by-question") == ("data/spider", "by-question")
    assert data_and_mode("dev.json#by-database") == ("dev.json", "by-database")
    odd = tmp_path / "a#by-row"
    odd.mkdir()
    assert data_and_mode(str(odd)) == (str(odd), None)  # an existing path is taken whole
    with pytest.raises(MolfError, match="unknown split mode 'by-row'.*by-database, by-question"):
        data_and_mode(str(tmp_path / "b#by-row"))


def test_question_and_hub_sides_are_hash_intervals() -> None:
    questions = [f"How many singers are older than {i}?" for i in range(2000)]
    for q in questions:
        h = hash_fraction(q)
        assert question_side(q) == ("train" if h < 0.6 else "val" if h < 0.8 else "test")
        assert hub_test_side(q) == ("val" if h < 0.5 else "test")
    shares = Counter(question_side(q) for q in questions)
    assert abs(shares["train"] / 2000 - 0.6) < 0.04 and abs(shares["test"] / 2000 - 0.2) < 0.04
    assert question_side("How  many SINGERS?") == question_side("how many singers?")


def reference_sides(counts: dict[str, int]) -> dict[str, str]:
    """The rule written out once more, plainly."""
    order = sorted(counts, key=hash_fraction)
    cap, total, sides = (len(counts) - 1) // 2, sum(counts.values()), {}
    for side in ("test", "val"):
        chosen: list[str] = []
        while len(chosen) < cap and (
            len(chosen) < HELD_OUT_MIN_DATABASES
            or sum(counts[d] for d in chosen) < HELD_OUT_MIN_SHARE * total
        ):
            chosen.append(order.pop(0))
        sides.update(dict.fromkeys(chosen, side))
    return {db: sides.get(db, "train") for db in counts}


@pytest.mark.parametrize("n", [3, 4, 5, 8, 20, 60])
def test_database_sides(n: int) -> None:
    rng = random.Random(n)
    counts = {f"db_{i}": rng.randint(1, 120) for i in range(n)}
    sides = database_sides(counts)
    assert sides == reference_sides(counts)
    assert database_sides(dict(reversed(list(counts.items())))) == sides  # order-free
    held = Counter(sides.values())
    assert held["train"] >= 1 and held["val"] >= 1 and held["test"] >= 1
    for side in ("val", "test"):
        share = sum(c for db, c in counts.items() if sides[db] == side) / sum(counts.values())
        full = held[side] == (n - 1) // 2
        assert full or (held[side] >= HELD_OUT_MIN_DATABASES and share >= HELD_OUT_MIN_SHARE)


def test_database_sides_need_three_databases() -> None:
    with pytest.raises(MolfError, match="3 or more databases"):
        database_sides({"a": 5, "b": 9})


def test_real_spider_database_sides(shared_data: Path) -> None:
    questions = json.loads((shared_data / "spider" / "dev.json").read_text())
    counts = Counter(q["db_id"] for q in questions)
    sides = database_sides(counts)
    per_side = {s: [db for db in counts if sides[db] == s] for s in ("train", "val", "test")}
    assert {s: len(dbs) for s, dbs in per_side.items()} == {"train": 11, "val": 5, "test": 4}
    assert {s: sum(counts[d] for d in dbs) for s, dbs in per_side.items()} == {
        "train": 685,
        "val": 170,
        "test": 179,
    }
