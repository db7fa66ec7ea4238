"""The lr choice on val: the best primary metric, a tie broken by the task's margin of
the same examples when the rows record it, then by the smaller lr; the rule is recorded."""

from __future__ import annotations

import json

import yaml

from molf.sweep.config import load_sweep
from molf.sweep.results import choose_lr, selection_json


def _sweep(tmp_path, shared_data):
    cfg = {
        "output_dir": str(tmp_path / "runs"),
        "models": {"stories": {"model": str(shared_data / "models" / "stories260k")}},
        "tasks": {"med": {"data": str(shared_data / "medmcqa" / "dev.jsonl")}},
        "methods": {"lora": {"lr": [1e-4, 3e-4, 1e-3]}},
        "seeds": [0],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    sweep = load_sweep(path)
    return sweep, sweep.groups[0]


def _rows(sweep, group, accuracy, margin=None):
    rows = {}
    for i, cell in enumerate(sweep.stage1(group)):
        row = {"cell": cell.name, "status": "ok", "val_accuracy": str(accuracy[i])}
        if margin is not None:
            row["val_accuracy_margin"] = str(margin[i])
        rows[cell.name] = row
    return rows


def test_a_tie_is_broken_by_the_margin_then_by_the_smaller_lr(tmp_path, shared_data):
    sweep, group = _sweep(tmp_path, shared_data)
    point, table = choose_lr(sweep, group, _rows(sweep, group, [0.5, 0.25, 0.5]))
    assert point.lr == 1e-4 and table[0]["chosen_by"] == "2 tied on val_accuracy; the smaller lr"
    rows = _rows(sweep, group, [0.5, 0.25, 0.5], margin=[-0.4, 0.9, 0.1])
    point, table = choose_lr(sweep, group, rows)
    assert point.lr == 1e-3  # tied with 1e-4 on accuracy, ahead on the margin
    assert table[2]["chosen_by"] == "2 tied on val_accuracy; the best val_accuracy_margin"
    rows = _rows(sweep, group, [0.25, 0.75, 0.5], margin=[0.9, -1.0, 0.1])
    point, table = choose_lr(sweep, group, rows)
    assert point.lr == 3e-4 and table[1]["chosen_by"] == "best val_accuracy"  # margin unused
    chosen = json.loads(selection_json({group.key: (point, table)}))[group.key]
    assert chosen["chosen_by"] == "best val_accuracy" and chosen["lr"] == 3e-4
