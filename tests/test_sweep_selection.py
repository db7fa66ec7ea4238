"""The lr choice on val: the best primary metric, a tie broken by the task's margin of
the same examples when the rows record it, then by the smaller lr; the rule is recorded."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from molf.errors import MolfError
from molf.sweep.config import load_sweep
from molf.sweep.results import base_row, choose_lr
from molf.sweep.runner import Runner, _args
from molf.sweep.stats import method_interval, paired_difference
from molf.sweep.tables import results_markdown, selection_json


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
    chosen = json.loads(selection_json(sweep, {group.key: (point, table)}))[group.key]
    assert chosen["chosen_by"] == "best val_accuracy" and chosen["lr"] == 3e-4


def _two_task_sweep(tmp_path, shared_data, select_with="small"):
    data = str(shared_data / "medmcqa" / "dev.jsonl")
    cfg = {
        "output_dir": str(tmp_path / "runs"),
        "models": {"stories": {"model": str(shared_data / "models" / "stories260k")}},
        "tasks": {
            "small": {"task": "med", "data": data, "max_train_samples": 8},
            "large": {"task": "med", "data": data, "select_with": select_with},
        },
        "methods": {"lora": {"lr": [1e-4, 3e-4, 1e-3]}},
        "seeds": [0, 1],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return load_sweep(path)


def test_select_with_reuses_the_named_tasks_choice_and_runs_no_val_cells(tmp_path, shared_data):
    sweep = _two_task_sweep(tmp_path, shared_data)
    small, large = sweep.groups
    assert large.select_with == small.key and sweep.chooser(large) is small
    assert sweep.stage1(large) == [] and len(sweep.stage1(small)) == 3
    runner = Runner(sweep, execute=False)
    for cell, accuracy in zip(sweep.stage1(small), [0.25, 0.75, 0.5]):
        runner.rows[cell.name] = {
            **base_row(cell, _args(cell, sweep), "ok"),
            "val_accuracy": str(accuracy),
        }
    runner.walk()
    assert {k: v[0].lr for k, v in runner.choices.items()} == {small.key: 3e-4, large.key: 3e-4}
    to_run = [name for name, state, _ in runner.listing if state != "done"]
    assert to_run == [f"{g.key}/lr3e-04/test-s{s}" for g in (small, large) for s in (0, 1)]
    chosen = json.loads(selection_json(sweep, runner.choices))
    assert chosen[large.key]["note"] == f"the lr chosen on val for {small.key}"
    assert chosen[large.key]["val"] == [] and len(chosen[small.key]["val"]) == 3
    assert "| lora | 3e-04 (chosen on small) |" in results_markdown(
        sweep, runner.rows, runner.choices
    )


def test_select_with_waits_for_the_choice(tmp_path, shared_data):
    sweep = _two_task_sweep(tmp_path, shared_data)
    runner = Runner(sweep, execute=False)
    runner.walk()
    assert runner.choices == {}
    pending = [name for name, state, _ in runner.listing if state == "pending"]
    tasks = ("small", "large")
    assert pending == [f"stories/{t}/lora/lr?/test-s{s}" for t in tasks for s in (0, 1)]


@pytest.mark.parametrize(
    ("select_with", "message"),
    [("nope", "'nope' is not another task"), ("large", "'large' is not another task")],
)
def test_select_with_must_name_another_task(tmp_path, shared_data, select_with, message):
    with pytest.raises(MolfError, match=message):
        _two_task_sweep(tmp_path, shared_data, select_with=select_with)


def test_results_md_gives_intervals_molf_minus_the_better_baseline_and_fft_minus_lora(
    tmp_path, shared_data
):
    cfg = {
        "output_dir": str(tmp_path / "runs"),
        "models": {"stories": {"model": str(shared_data / "models" / "stories260k")}},
        "tasks": {"med": {"data": str(shared_data / "medmcqa" / "dev.jsonl")}},
        "methods": {m: {"lr": 1e-4} for m in ("fft", "lora", "molf")},
        "seeds": [0, 1],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    sweep = load_sweep(path)
    rng = random.Random(0)
    hits = {"fft": 0.5, "lora": 0.7, "molf": 0.65}
    runner = Runner(sweep, execute=False)
    for group in sweep.groups:
        for cell in sweep.stage2(group, group.points[0]):
            bits = "".join("1" if rng.random() < hits[group.method] else "0" for _ in range(60))
            runner.rows[cell.name] = {
                **base_row(cell, _args(cell, sweep), "ok"),
                "test_accuracy": str(bits.count("1") / 60),
            }
            runner.outcomes[cell.name] = {"cell": cell.name, "prompts": "p", "correct": bits}
            if group.method == "molf":  # where it routed: fft 0.2 / 0.3 by seed
                fft = 0.2 + 0.1 * cell.seed
                runner.outcomes[cell.name]["routing"] = {
                    "experts": ["fft", "lora0"],
                    "all": [fft, 1 - fft],
                    "by_type": {"q_proj": [fft / 2, 1 - fft / 2], "down_proj": [fft, 1 - fft]},
                }
    runner.walk()
    md = results_markdown(sweep, runner.rows, runner.choices, runner.outcomes)
    pooled = {
        g.method: [runner.outcomes[c.name]["correct"] for c in sweep.stage2(g, g.points[0])]
        for g in sweep.groups
    }
    assert "| molf | fft | 2 | 0.250 | 0.125 | 0.250 |" in md  # means over the two seeds
    assert "| molf | lora0 | 2 | 0.750 | 0.875 | 0.750 |" in md
    lora = method_interval(pooled["lora"])
    assert f"{lora.mean:.4f} [{lora.low:.4f}, {lora.high:.4f}]" in md
    assert method_interval(pooled["fft"]).mean < lora.mean  # lora is the better baseline
    diff = paired_difference(pooled["molf"], pooled["lora"])
    reading = {"above": "lies above", "below": "lies below", "straddles": "straddles"}
    assert f"- molf − lora: {diff.points()} points; the interval {reading[diff.verdict()]}" in md
    fft_minus_lora = paired_difference(pooled["fft"], pooled["lora"])
    assert fft_minus_lora.high < 0  # lora wins by 20 points on 60 examples x 2 seeds
    assert f"- fft − lora: {fft_minus_lora.points()} points; the interval lies below 0" in md
    assert "- fft − molf" not in md and "- lora − " not in md  # only FFT minus adapters
    kept = runner.outcomes.pop("stories/med/fft/lr1e-04/test-s1")  # a seed without outcomes
    md = results_markdown(sweep, runner.rows, runner.choices, runner.outcomes)
    assert "molf − lora" not in md and "- not yet: some of these methods' test cells" in md
    runner.outcomes[kept["cell"]] = kept
    runner.outcomes["stories/med/fft/lr1e-04/test-s0"]["prompts"] = "other examples"
    md = results_markdown(sweep, runner.rows, runner.choices, runner.outcomes)
    assert "molf − lora" not in md  # not the same examples: nothing is paired
    assert "fft − lora" not in md
