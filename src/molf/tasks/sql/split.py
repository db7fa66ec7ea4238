"""Which text-to-SQL records are trained on, and which are held out as val or test.

Every split here is fixed by sha256 hashes with the fixed salt (``hash_fraction`` of
:mod:`molf.tasks.sources`), never by ``--seed``: the test set is the same for every
run. Two modes for Spider, chosen by a suffix of ``--data`` (``PATH#MODE``):

- ``by-database`` (the default): whole databases are held out, so a val or test
  question is always about a database no training question was on. Databases are put
  in the order of ``hash_fraction(db_id)``; test takes databases from the front of
  that order until it holds at least ``HELD_OUT_MIN_DATABASES`` databases and
  ``HELD_OUT_MIN_SHARE`` of the questions, then val takes the following ones by the
  same rule, and the rest are trained on (each held-out split takes at most
  ``(n - 1) // 2`` of the ``n`` databases, so training keeps one). Spider's dev set
  has only 20 databases of 4 to 120 questions each: a fixed share of *databases*
  would leave val or test with a handful of databases and a lopsided number of
  questions; this rule gives each at least 3 databases and 15% of the questions.
- ``by-question``: every database is on every side; a question goes by
  ``h = hash_fraction(question)``: train when ``h < QUESTION_TRAIN``, val when
  ``h < QUESTION_TRAIN + QUESTION_VAL``, test otherwise (60/20/20). Identical
  questions (after ``normalised``) stay together. This measures a model on databases
  it was trained on: an easier, different question than ``by-database``.

Hub-layout rows (gretel ``sql_prompt``/``sql_context``/``sql``) have no databases to
hold out: a local file is split by question like ``by-question``; the hub dataset
trains on its train split and cuts its test split in two halves by
``hash_fraction(sql_prompt)``: val below ``HUB_VAL_FRACTION``, test above.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from molf.errors import MolfError
from molf.tasks.sources import hash_fraction

BY_DATABASE = "by-database"
BY_QUESTION = "by-question"
MODES = (BY_DATABASE, BY_QUESTION)
MODE_SEPARATOR = "#"  # --data PATH#MODE
HELD_OUT_MIN_DATABASES = 3
HELD_OUT_MIN_SHARE = 0.15
QUESTION_TRAIN = 0.6
QUESTION_VAL = 0.2  # the remaining 0.2 is test
HUB_VAL_FRACTION = 0.5
SIDES = ("train", "val", "test")


def data_and_mode(data: str) -> tuple[str, str | None]:
    """``--data`` as (path, mode): ``"dir#by-question"`` -> ("dir", "by-question");
    a string naming an existing path (even one holding '#') is a path without mode."""
    path, sep, mode = data.rpartition(MODE_SEPARATOR)
    if not sep or Path(data).expanduser().exists():
        return data, None
    if mode not in MODES:
        raise MolfError(
            f"--data {data}: unknown split mode {mode!r} after '{MODE_SEPARATOR}'; "
            f"choose one of {', '.join(MODES)} (or pass an existing path)"
        )
    return path, mode


def question_side(question: str) -> str:
    """ "train", "val" or "test" for a question, by its hash (``by-question``)."""
    h = hash_fraction(question)
    if h < QUESTION_TRAIN:
        return "train"
    return "val" if h < QUESTION_TRAIN + QUESTION_VAL else "test"


def hub_test_side(question: str) -> str:
    """ "val" or "test" for a row of the hub's test split, by its question's hash."""
    return "val" if hash_fraction(question) < HUB_VAL_FRACTION else "test"


def database_sides(question_counts: Mapping[str, int]) -> dict[str, str]:
    """Each database's side ("train", "val" or "test") under ``by-database``, from the
    number of questions on each; needs 3 or more databases."""
    if len(question_counts) < 3:
        raise MolfError(
            "a split by database needs questions on 3 or more databases (train, val, "
            f"test), got {sorted(question_counts)}; use {MODE_SEPARATOR}{BY_QUESTION}"
        )
    order = sorted(question_counts, key=lambda db: (hash_fraction(db), db))
    total = sum(question_counts.values())
    cap = (len(order) - 1) // 2
    sides: dict[str, str] = {}
    pos = 0
    for side in ("test", "val"):
        taken, questions = 0, 0
        while taken < cap and (
            taken < HELD_OUT_MIN_DATABASES or questions < HELD_OUT_MIN_SHARE * total
        ):
            sides[order[pos]] = side
            questions += question_counts[order[pos]]
            taken, pos = taken + 1, pos + 1
    return {db: sides.get(db, "train") for db in question_counts}
