"""Sample rows in each task's layouts, and helpers for writing test data files."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path, value: object) -> Path:
    path.write_text(json.dumps(value, indent=1), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# CounterFact in the EasyEdit layout (the shared data's), and the hub/ROME layout
EASYEDIT = {
    "case_id": 1,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "ground_truth": "French",
    "subject": "Danielle Darrieux",
    "rephrase_prompt": "Danielle Darrieux spoke the language",
    "locality_prompt": "The mother tongue of Michel Rocard is",
    "locality_ground_truth": "French",
}
ROME = {
    "case_id": 0,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "subject": "Danielle Darrieux",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
    },
    "paraphrase_prompts": ["Danielle Darrieux spoke the language", "Darrieux's first language is"],
    "neighborhood_prompts": ["Michel Rocard's mother tongue is", "Jean Moulin speaks"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}

# a text-to-SQL context with data, as in the hub set
SINGERS = (
    "CREATE TABLE singer (id INT, name TEXT, age INT);"
    " INSERT INTO singer VALUES (1, 'Ann', 30), (2, 'Bob', 20), (3, 'Cy', 40);"
)


def medmcqa_row(i: int, cop: int) -> dict:
    """A MedMCQA row; ``cop`` as given (1-based locally, 0-based on the hub)."""
    return {
        "id": f"q{i}",
        "question": f"Which vitamin is question {i} about?",
        "opa": "Vitamin A",
        "opb": "Vitamin B12",
        "opc": "Vitamin C",
        "opd": "Vitamin D",
        "cop": cop,
        "choice_type": "single",
        "exp": None,
        "subject_name": "Biochemistry",
        "topic_name": None,
    }
