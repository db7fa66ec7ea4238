"""``molf sweep``: a real grid of ``molf train`` subprocesses on stories260k.

Checked: the lr is chosen on val (the best val primary metric, ties to the smaller lr),
summary.csv / selection.json / results.md are written, a sweep killed mid-cell resumes
to the same numbers with every cell run to completion once, a committed summary lets a
sweep continue with its run dirs gone, a failing cell is recorded and the sweep goes on,
bad configs exit 2 before anything runs, and --dry-run runs nothing.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from molf.atomic import atomic_directory, write_text_atomic
from molf.routing_log import routing_matrix
from molf.sweep import main
from molf.sweep.grid import format_lr

pytestmark = pytest.mark.slow

SETTINGS = {
    "max_steps": 16,
    "batch_size": 4,
    "save_steps": 4,
    "lora_ranks": [4],
    "lora_alphas": [8],
    "eval_batch_size": 8,
}
# a tiny lr barely moves the model; a large one injects the edits: val should tell them apart
METHODS = {"molf": {"lr": ["1e-6", "1e-2"]}, "lora": {"lr": ["1e-6", "3e-2"]}}


def _config(tmp: Path, out: Path, facts: Path, **changes) -> Path:
    cfg = {
        "output_dir": str(out),
        "settings": dict(SETTINGS),
        "models": {"stories": {"model": "${MOLF_DATA_DIR}/models/stories260k"}},
        "tasks": {"fact": {"data": str(facts)}},
        "methods": METHODS,
        "seeds": [0],
        **changes,
    }
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# one thread per cell: the model is tiny, and on a shared machine two spinning threads
# per process cost several times the time
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _sweep(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "molf.sweep", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {r["cell"]: r for r in csv.DictReader(f)}


def _listing(text: str) -> dict[str, str]:
    """--dry-run's lines as cell name -> the rest (state, then cost)."""
    return {
        line.split()[0]: line.split(maxsplit=1)[1]
        for line in text.splitlines()
        if line and not line.startswith("[sweep]")
    }


def _numbers(row: dict[str, str]) -> dict[str, str]:
    """What must not depend on interruptions: the settings and every metric."""
    keep = ("lr", "lora_lr", "ranks", "seed", "split", "settings_hash")
    return {k: v for k, v in row.items() if k in keep or k.startswith(("val_", "test_"))}


@pytest.fixture(scope="module")
def facts(tmp_path_factory, shared_data) -> Path:
    """Eight real CounterFact edits (the fact task splits them into val and test)."""
    rows = json.loads((shared_data / "counterfact" / "counterfact-val.json").read_text())
    path = tmp_path_factory.mktemp("data") / "facts.json"
    path.write_text(json.dumps(rows[:8]))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, facts) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted sweep: 2 methods x 2 lrs on val, then each chosen lr on test."""
    tmp = tmp_path_factory.mktemp("sweep")
    out = tmp / "full"
    result = _sweep(_config(tmp, out, facts))
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result


def test_format_lr_is_short_and_lossless():
    assert [format_lr(x) for x in (1e-5, 3.5e-5, 2e-4, 0.1)] == [
        "1e-05",
        "3.5e-05",
        "2e-04",
        "1e-01",
    ]


def test_sweep_chooses_lr_on_val_and_writes_summary(finished):
    out, result = finished
    rows = _rows(out / "summary.csv")
    assert all(r["status"] == "ok" for r in rows.values())
    selection = json.loads((out / "selection.json").read_text())
    assert set(selection) == {"stories/fact/molf", "stories/fact/lora"}
    for method, grid in METHODS.items():
        lrs = [float(x) for x in grid["lr"]]
        val = {
            lr: float(rows[f"stories/fact/{method}/lr{format_lr(lr)}/val-s0"]["val_efficacy"])
            for lr in lrs
        }
        best = max(lrs, key=lambda lr: (val[lr], -lr))  # ties: the smaller lr
        assert selection[f"stories/fact/{method}"]["lr"] == best, (method, val)
        test = rows[f"stories/fact/{method}/lr{format_lr(best)}/test-s0"]
        assert test["split"] == "test" and test["method_label"] == method
        assert float(test["lr"]) == best and test["ranks"] == "4"
        assert test["test_efficacy"] != "" and test["test_efficacy_before"] != ""
        assert float(test["train_seconds"]) > 0 and float(test["wall_seconds"]) > 0
        # only the chosen lr was run on test
        assert sorted(n for n in rows if n.startswith(f"stories/fact/{method}/")) == sorted(
            [f"stories/fact/{method}/lr{format_lr(lr)}/val-s0" for lr in lrs]
            + [f"stories/fact/{method}/lr{format_lr(best)}/test-s0"]
        )
        cell_dir = out / test["cell"]
        assert (cell_dir / "final").is_dir() and (cell_dir / "config.yaml").is_file()
        assert yaml.safe_load((cell_dir / "config.yaml").read_text())["eval_split"] == "test"
        for lr in lrs:  # val cells keep their metrics, not their model (disk)
            val_dir = out / f"stories/fact/{method}/lr{format_lr(lr)}/val-s0"
            assert (val_dir / "eval.json").is_file() and not (val_dir / "final").exists()
    md = (out / "results.md").read_text()
    assert "| molf |" in md and "| lora |" in md and "test_efficacy" in md
    assert not (out / "failed.json").exists()
    if importlib.util.find_spec("molf.report") is not None:  # the report hook
        assert (out / "report" / "index.html").is_file()


def test_each_finished_cell_keeps_its_per_example_outcomes(finished):
    out, _ = finished
    rows = _rows(out / "summary.csv")
    outcomes = {
        o["cell"]: o for o in map(json.loads, (out / "outcomes.jsonl").read_text().splitlines())
    }
    assert set(outcomes) == set(rows)
    for name, row in rows.items():
        bits = outcomes[name]["correct"]
        metric = float(row[f"{row['split']}_efficacy"])
        assert outcomes[name]["metric"] == "efficacy" and set(bits) <= {"0", "1"}
        assert bits.count("1") / len(bits) == pytest.approx(metric)  # the same examples
    prompts = {o["prompts"] for n, o in outcomes.items() if n.endswith("test-s0")}
    assert len(prompts) == 1  # every method scored the same test edits
    for name, outcome in outcomes.items():  # molf cells keep where they routed
        if "/molf/" in name:
            counts = routing_matrix(out / name).counts()
            assert outcome["routing"]["all"] == [round(float(v), 4) for v in counts.expert_shares()]
        else:
            assert "routing" not in outcome


def test_killed_sweep_resumes_to_the_same_numbers(tmp_path, facts, finished):
    reference = _rows(finished[0] / "summary.csv")
    out = tmp_path / "killed"
    cfg = _config(tmp_path, out, facts, methods={"molf": METHODS["molf"]})
    first = out / "stories/fact/molf/lr1e-06/val-s0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "molf.sweep", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ENV,
        start_new_session=True,  # its own process group: the kill takes the cell with it
    )
    deadline = time.monotonic() + 300
    while not list(first.glob("checkpoint-*/meta.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (first / "final").exists()  # 12 of its 16 steps were still to go

    result = _sweep(cfg)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lr1e-06/val-s0: resume run (attempt 2)" in result.stdout
    rows = _rows(out / "summary.csv")
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows.values())
    for name, row in rows.items():
        assert _numbers(row) == _numbers(reference[name]), name
        record = json.loads((out / f"{name}.sweep.json").read_text())
        assert record["attempts"] == (2 if name.endswith("lr1e-06/val-s0") else 1)
    # each cell finished once: one results.csv row per run directory
    finals = [
        r["output_dir"]
        for f in out.rglob("results.csv")
        for r in csv.DictReader(open(f, newline=""))
    ]
    assert sorted(finals) == sorted(str(out / n) for n in rows)

    again = _sweep(cfg)  # nothing left: nothing runs, same summary
    assert again.returncode == 0 and "run (attempt" not in again.stdout
    assert _rows(out / "summary.csv") == rows


def test_committed_summary_continues_without_run_dirs(tmp_path, facts, finished, capsys):
    summary = tmp_path / "committed" / "summary.csv"
    # as a checkout holds it: written by molf (the sweep replaces only its own files)
    write_text_atomic(summary, (finished[0] / "summary.csv").read_text())
    outcomes = (finished[0] / "outcomes.jsonl").read_text()  # committed beside it
    write_text_atomic(summary.parent / "outcomes.jsonl", outcomes)
    out = tmp_path / "later"
    cfg = _config(tmp_path, out, facts, summary=str(summary))
    assert main([str(cfg), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "6 cells: 6 done, 0 to run" in listing and not out.exists()
    assert main([str(cfg)]) == 0
    # no cell ran (the sweep dir holds only its lock); the results are beside the summary
    assert [p.name for p in out.iterdir()] == [".molf.sweep.lock"]
    before = json.loads((finished[0] / "selection.json").read_text())
    after = json.loads((summary.parent / "selection.json").read_text())
    tables = [
        (d / "results.md").read_text().splitlines()[1:] for d in (summary.parent, finished[0])
    ]
    assert tables[0] == tables[1]  # the same comparison, from the summary alone
    assert {k: v["lr"] for k, v in after.items()} == {k: v["lr"] for k, v in before.items()}
    assert _rows(summary) == _rows(finished[0] / "summary.csv")
    # a changed setting makes the committed results stale: refused, nothing run
    stale = _config(
        tmp_path, out, facts, summary=str(summary), settings={**SETTINGS, "max_steps": 8}
    )
    assert main([str(stale)]) == 2
    assert "other settings" in capsys.readouterr().err


def test_dry_run_runs_nothing_and_estimates_from_finished_cells(tmp_path, facts, finished, capsys):
    fresh = tmp_path / "fresh"
    assert main([str(_config(tmp_path, fresh, facts)), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "stories/fact/molf/lr1e-06/val-s0" in listing and "16 x 4" in listing
    assert "stories/fact/molf/lr?/test-s0" in listing and "pending" in listing
    assert "6 cells: 0 done, 6 to run" in listing
    assert not fresh.exists()

    # the finished sweep with one more seed: seed 1 is estimated from the timed cells;
    # a cell dir with a checkpoint resumes, one holding anything else restarts
    out = finished[0]
    cfg = _config(tmp_path, out, facts, seeds=[0, 1])
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main([str(cfg), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "8 cells: 6 done, 2 to run" in listing
    states = _listing(listing)
    seed1 = [n for n in states if n.endswith("/test-s1")]
    assert len(seed1) == 2 and all(states[n].startswith("new") for n in seed1)
    assert all(" s (train ~" in states[n] for n in seed1)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    # its run dirs were made with 16 steps: a file now asking for 8 is refused, not mixed in
    changed = _config(tmp_path, out, facts, settings={**SETTINGS, "max_steps": 8})
    assert main([str(changed), "--summary", str(tmp_path / "elsewhere.csv")]) == 2
    assert "other settings" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before

    partial = tmp_path / "partial"
    cfg = _config(tmp_path, partial, facts)
    # a checkpoint and a log as molf train leaves them: written through molf's writers
    with atomic_directory(partial / "stories/fact/molf/lr1e-06/val-s0/checkpoint-4") as tmp:
        (tmp / "meta.json").write_text("{}")
    write_text_atomic(partial / "stories/fact/molf/lr1e-02/val-s0/train_log.jsonl", "")
    assert main([str(cfg), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    states = _listing(listing)
    assert states["stories/fact/molf/lr1e-06/val-s0"].startswith("resume")
    assert states["stories/fact/molf/lr1e-02/val-s0"].startswith("restart")
    assert states["stories/fact/lora/lr1e-06/val-s0"].startswith("new")


def test_failed_cell_is_recorded_and_the_sweep_goes_on(tmp_path, facts):
    out = tmp_path / "failing"
    cfg = _config(
        tmp_path,
        out,
        facts,
        models={"missing": {"model": str(tmp_path / "no-such-model")}},
        methods={"lora": {"lr": 1e-3}, "fft": {"lr": 1e-4}},  # one lr each: test cells only
    )
    result = _sweep(cfg)
    assert result.returncode == 1
    assert "failed cells: missing/fact/lora/lr1e-03/test-s0, missing/fact/fft/lr1e-04/test-s0" in (
        result.stdout
    )
    rows = _rows(out / "summary.csv")
    assert [r["status"] for r in rows.values()] == ["failed", "failed"]
    assert all(r["returncode"] == "2" for r in rows.values())
    assert json.loads((out / "failed.json").read_text())["failed"] == list(rows)


def _bad(case: str, tmp: Path, facts: Path) -> dict:
    cfg = {
        "output_dir": str(tmp / "bad"),
        "settings": dict(SETTINGS),
        "models": {"stories": {"model": "${MOLF_DATA_DIR}/models/stories260k"}},
        "tasks": {"fact": {"data": str(facts)}},
        "methods": {"molf": {"lr": [1e-3]}},
    }
    if case == "unknown top-level key":
        cfg["seed"] = 0
    elif case == "unknown method":
        cfg["methods"] = {"molf2": {"lr": 1e-3}}
    elif case == "unknown task":
        cfg["tasks"] = {"chess": {"data": str(facts)}}
    elif case == "unknown model setting":
        cfg["models"]["stories"]["learning_rate"] = 1e-3
    elif case == "lr in a model entry":
        cfg["models"]["stories"]["lr"] = 1e-3
    elif case == "sweep-owned setting":
        cfg["settings"]["eval_split"] = "test"
    elif case == "empty grid":
        cfg["methods"] = {}
    elif case == "no seeds":
        cfg["seeds"] = []
    elif case == "duplicated cell":
        cfg["methods"] = {"molf": {"lr": ["1e-3", 0.001]}}
    elif case == "lr not a number":
        cfg["methods"] = {"molf": {"lr": ["fast"]}}
    elif case == "negative lr":
        cfg["methods"] = {"molf": {"lr": [-1e-3]}}
    elif case == "empty lr list":
        cfg["methods"] = {"molf": {"lr": []}}
    elif case == "lr and lora_lr lengths":
        cfg["methods"] = {"molf": {"lr": [1e-3, 1e-4], "lora_lr": [1e-3, 1e-4, 1e-5]}}
    elif case == "bad TrainArgs value":
        cfg["settings"]["batch_size"] = 0
    elif case == "unset env var":
        cfg["tasks"]["fact"]["data"] = "${MOLF_SWEEP_TEST_UNSET}/facts.json"
    elif case == "missing data":
        cfg["tasks"]["fact"]["data"] = str(tmp / "nothing.json")
    elif case == "missing data with a mode":
        cfg["tasks"] = {"sql": {"data": str(tmp / "nothing") + "#by-question"}}
    elif case == "unknown data mode":
        cfg["tasks"] = {"sql": {"data": str(tmp) + "#by-table"}}
    elif case == "name with a slash":
        cfg["models"] = {"org/model": {}}
    return cfg


BAD = [
    "unknown top-level key",
    "unknown method",
    "unknown task",
    "unknown model setting",
    "lr in a model entry",
    "sweep-owned setting",
    "empty grid",
    "no seeds",
    "duplicated cell",
    "lr not a number",
    "negative lr",
    "empty lr list",
    "lr and lora_lr lengths",
    "bad TrainArgs value",
    "unset env var",
    "missing data",
    "missing data with a mode",
    "unknown data mode",
    "name with a slash",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_config_exits_2_and_runs_nothing(tmp_path, facts, capsys, monkeypatch, case):
    monkeypatch.delenv("MOLF_SWEEP_TEST_UNSET", raising=False)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_bad(case, tmp_path, facts)))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("molf: error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()


def test_data_with_a_split_mode_is_checked_by_its_directory(tmp_path, facts, capsys):
    """Spider's ``DIR#by-question`` names a split of DIR: the sweep accepts it."""
    tasks = {"sql-q": {"task": "sql", "data": "${MOLF_DATA_DIR}/spider#by-question"}}
    path = _config(tmp_path, tmp_path / "mode", facts, tasks=tasks)
    assert main([str(path), "--dry-run"]) == 0
    assert "stories/sql-q/molf/" in capsys.readouterr().out


def test_only_runs_nothing_when_nothing_matches(tmp_path, facts, capsys):
    out = tmp_path / "only"
    assert main([str(_config(tmp_path, out, facts)), "--only", "nope/*"]) == 2
    assert "no cell left to run matches" in capsys.readouterr().err
    assert not out.exists()


def test_collect_rebuilds_the_summary_from_finished_run_dirs(tmp_path, facts, finished):
    """Several sweeps may share a grid, each with its own --only and --summary; --collect
    gathers their finished cells into one summary without running anything."""
    sweep_dir = finished[0]
    config = _config(tmp_path, sweep_dir, facts)
    rebuilt = tmp_path / "collected" / "summary.csv"
    before = {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("eval.json")}
    assert main([str(config), "--collect", "--summary", str(rebuilt)]) == 0
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("eval.json")} == before
    want, got = _rows(sweep_dir / "summary.csv"), _rows(rebuilt)
    assert got.keys() == want.keys()
    assert all(_numbers(got[name]) == _numbers(want[name]) for name in want)
    assert (rebuilt.parent / "results.md").read_text().splitlines()[1:] == (
        (sweep_dir / "results.md").read_text().splitlines()[1:]
    )
