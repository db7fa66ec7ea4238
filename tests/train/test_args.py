"""Settings (molf.train.args): which source wins, flags over YAML over a run's own."""

from __future__ import annotations

import pytest

from molf.errors import MolfError
from molf.train.args import resolve_args


def test_flags_win_over_yaml_which_wins_over_a_runs_own_settings(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("lr: 1e-3\nmax-steps: 7\nlora_ranks: [8, 32]\n")
    base = {"lr": 1e-4, "task": "med", "seed": 3}
    args = resolve_args(str(config), {"lr": "2e-3", "batch_size": None}, base)
    assert args.lr == 2e-3  # flag over YAML over base
    assert args.max_steps == 7 and args.lora_ranks == (8, 32)  # YAML (dashes too)
    assert args.task == "med" and args.seed == 3  # base where nothing else says
    assert args.batch_size == 8  # a flag not given (None) keeps the default
    config.write_text("learning_rate: 1e-3\n")
    with pytest.raises(MolfError, match="unknown setting 'learning_rate'"):
        resolve_args(str(config), {})
