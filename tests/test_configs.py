"""The committed sweep configs: each loads, and where its summary is committed, the
summary covers every cell of the grid with the settings this code gives the cell (so the
results in docs/ are what the config and the code produce, and rerunning the sweep has
nothing left to do)."""

from __future__ import annotations

from pathlib import Path

import pytest

from molf.sweep.config import load_sweep
from molf.sweep.results import read_summary
from molf.sweep.runner import Runner

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("*.yaml"))
# Studies still running across sessions: their committed rows must match this code, but
# cells may be left to run. Remove a name once its study is finished.
IN_PROGRESS: set[str] = set()


def test_the_committed_configs_are_found():
    assert {"configs/study-cpu.yaml", "configs/ablation-equal-lr.yaml"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_a_committed_sweep_loads_and_its_summary_covers_the_grid(name, shared_data, monkeypatch):
    data = shared_data.resolve()
    monkeypatch.chdir(ROOT)  # output_dir and summary are relative to the repository
    monkeypatch.setenv("MOLF_DATA_DIR", str(data))
    sweep = load_sweep(name)
    assert sweep.groups
    if not Path(sweep.summary).is_file():  # the paper-scale recipes: GPU runs, not committed
        return
    # Runner with execute=False is --dry-run: it checks each finished cell's settings
    # hash against the settings built now (a mismatch raises) and lists what is left.
    runner = Runner(sweep, execute=False, rows=dict(read_summary(sweep.summary)))
    runner.walk()
    left = [f"{cell}: {state}" for cell, state, _ in runner.listing if state != "done"]
    assert not left or name in IN_PROGRESS, left[:5]
    assert runner.listing
