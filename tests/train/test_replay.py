"""A run's own config.yaml is a valid ``--config`` that reproduces the run."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from molf.cli import main
from molf.errors import MolfError
from molf.train.args import RECORDED_KEYS, TrainArgs, resolve_args

RUN = [
    "--task", "fact", "--data", "builtin", "--max-steps", "3", "--batch-size", "4",
    "--max-eval-samples", "4", "--lora-ranks", "4,8", "--lora-alphas", "8,8",
    "--lr", "1e-3", "--no-eval-before",
]  # fmt: skip


@pytest.mark.parametrize("method", ["molf", "lora"])
def test_replaying_a_runs_config_yaml_gives_bit_identical_weights(tmp_path, tiny_model_dir, method):
    first = tmp_path / "first"
    args = ["train", "--model", str(tiny_model_dir), "--method", method, *RUN]
    assert main([*args, "--output-dir", str(first)]) == 0
    config = first / "config.yaml"
    recorded = set(yaml.safe_load(config.read_text()))
    fields = {f for f in TrainArgs.__dataclass_fields__}
    assert recorded - fields == RECORDED_KEYS - {"resume_changes"}  # the records, no more
    again = tmp_path / "again"
    assert main(["train", "--config", str(config), "--output-dir", str(again)]) == 0
    weights = [p for p in (first / "final").iterdir() if p.suffix == ".safetensors"]
    assert weights
    for path in weights:
        a, b = load_file(path), load_file(again / "final" / path.name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_config_key_that_is_neither_setting_nor_record_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lr": 1e-4, "resolved_model": "x", "lr_typo": 1}))
    with pytest.raises(MolfError, match="unknown setting 'lr_typo'"):
        resolve_args(str(path), {})
    path.write_text(yaml.safe_dump({"lr": 1e-4, "resolved_model": "x", "world_size": 2}))
    assert resolve_args(str(path), {}).lr == 1e-4
