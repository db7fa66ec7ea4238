"""Routing while training: the tally behind the one-line summary and the tracker scalars."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from molf.cli import main
from molf.optim import Routing
from molf.ownership import claim
from molf.routing_stats import RoutingCounts
from molf.train.logs import RunLogger

MODULES = [
    f"model.layers.{i}.{kind}" for i in range(2) for kind in ("self_attn.k_proj", "mlp.down_proj")
]
EXPERTS = ["fft", "lora0"]
# winners per step, one per module in MODULES order (k0, down0, k1, down1)
WINNERS = [[0, 0, 1, 1], [1, 0, 1, 1], [1, 0, 1, 0], [1, 1, 1, 1]]


def _routing(winners: list[int]) -> Routing:
    selected = torch.zeros(len(MODULES), len(EXPERTS), dtype=torch.bool)
    selected[torch.arange(len(MODULES)), torch.tensor(winners)] = True
    scores = torch.rand(len(MODULES), len(EXPERTS))
    return Routing(list(MODULES), list(EXPERTS), scores, selected)


def _counts() -> RoutingCounts:
    return RoutingCounts(list(MODULES), list(EXPERTS))


def test_tally_shares_and_summary():
    tally = _counts()
    for step, winners in enumerate(WINNERS, start=1):
        r = _routing(winners)
        tally.add(step, r.selected.numpy(), r.scores.numpy())
    # fft won 4 of 16 layer-steps: down_proj 4 of 8, k_proj 1 of 8
    np.testing.assert_allclose(tally.expert_shares(), [5 / 16, 11 / 16])
    scalars = tally.scalars()
    assert scalars["routing/fft"] == pytest.approx(5 / 16)
    assert scalars["routing/down_proj/fft"] == pytest.approx(4 / 8)
    assert scalars["routing/k_proj/fft"] == pytest.approx(1 / 8)
    assert scalars["routing/k_proj/lora0"] == pytest.approx(7 / 8)
    assert tally.summary() == (
        "routing, steps 1-4: lora0 69%, fft 31% of layer-steps; fft: down_proj 50%, k_proj 12%"
    )
    quiet = _counts()
    r = _routing([1, 1, 1, 1])
    quiet.add(9, r.selected.numpy(), r.scores.numpy())
    assert quiet.summary() == "routing, step 9: lora0 100%, fft 0% of layer-steps; fft: all < 10%"
    assert _counts().summary() == "routing: no steps yet" and _counts().scalars() == {}


def test_logger_sends_window_shares_to_tensorboard_and_keeps_routing_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = RunLogger(tmp_path, "tensorboard", {})
    for step, winners in enumerate(WINNERS, start=1):
        logger.log_routing(step, _routing(winners))
        if step % 2 == 0:
            logger.log_train({"step": step, "loss": 1.0 / step})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    # each logged point covers the steps since the previous one: 1-2, then 3-4
    fft = [(e.step, e.value) for e in events.Scalars("routing/fft")]
    assert fft == [(2, pytest.approx(3 / 8)), (4, pytest.approx(2 / 8))]
    k_proj = [e.value for e in events.Scalars("routing/k_proj/fft")]
    assert k_proj == [pytest.approx(1 / 4), 0.0]
    assert [e.value for e in events.Scalars("train/loss")] == [0.5, 0.25]
    # the whole run for the printed summary
    assert logger.routing_total.steps == 4
    lines = [json.loads(x) for x in (tmp_path / "routing.jsonl").read_text().splitlines()]
    assert lines[0] == {"modules": MODULES, "experts": EXPERTS}
    assert [sorted(x) for x in lines[1:]] == [["scores", "step", "winners"]] * 4
    assert [[w[0] for w in x["winners"]] for x in lines[1:]] == WINNERS


@pytest.mark.slow
def test_training_prints_a_short_routing_summary(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{i} plus one is", "completion": f" {i + 1}"}) + "\n"
                for i in range(8))
    )  # fmt: skip
    out = tmp_path / "run"
    argv = [
        "train", "--model", str(tiny_model_dir), "--task", "jsonl", "--data", str(data),
        "--method", "molf", "--lora-ranks", "4", "--lora-alphas", "8", "--batch-size", "2",
        "--max-steps", "20", "--lr", "1e-3", "--output-dir", str(out), "--no-eval-before",
        "--max-new-tokens", "2", "--eval-on-train",
    ]  # fmt: skip
    assert main(argv) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[molf] routing")]
    steps = [int(re.search(r"steps 1-(\d+)", x).group(1)) for x in lines]
    routing = [json.loads(x) for x in (out / "routing.jsonl").read_text().splitlines()[1:]]

    def fft_share(upto: int) -> float:  # over decided module-steps (no tie: no warm-up)
        winners = [r["winners"] for r in routing[:upto]]
        return sum(w == [0] for step in winners for w in step) / sum(len(s) for s in winners)

    # a line is considered every 20 // 10 = 2 steps and printed when a share moved by more
    # than a point since the last printed line
    expected, last = [], None
    for step in range(2, 21, 2):
        if last is None or abs(fft_share(step) - last) > 0.01:
            expected.append(step)
            last = fft_share(step)
    assert steps == expected and steps[0] == 2
    fft = fft_share(steps[-1])
    shares = dict(re.findall(r"(fft|lora0) (\d+)%", lines[-1].split(";")[0]))
    assert int(shares["fft"]) == round(100 * fft) and int(shares["lora0"]) == round(100 * (1 - fft))


def test_concurrent_result_appends_lose_no_row(tmp_path):
    """Eight processes append 40 rows each to one results.csv: all 320 arrive."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from molf.train.logs import append_result\n"
        "for i in range(40):\n"
        "    append_result(Path(sys.argv[1]), {'output_dir': f'{sys.argv[2]}-{i}'})\n"
    )
    path = tmp_path / "results.csv"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), f"p{n}"]) for n in range(8)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    rows = list(csv.DictReader(path.open()))
    assert sorted(r["output_dir"] for r in rows) == sorted(
        f"p{n}-{i}" for n in range(8) for i in range(40)
    )


def test_a_torn_last_log_line_does_not_block_truncation(tmp_path):
    log = tmp_path / "train_log.jsonl"
    claim(log)  # a log molf wrote
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    RunLogger(tmp_path, "none", {}).truncate(2)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2]


def test_a_run_sends_lora_lr_and_its_results_to_tensorboard(tmp_path, tiny_model_dir):
    """The LoRA lr as a scalar, and metrics before/after with the settings as hparams."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--data", "builtin",
            "--output-dir", str(out), "--max-steps", "3", "--batch-size", "4",
            "--max-train-samples", "8", "--max-eval-samples", "4", "--lora-ranks", "4",
            "--lora-alphas", "8", "--lr", "1e-4", "--lora-lr", "1e-3",
            "--scheduler", "constant", "--report-to", "tensorboard"]  # fmt: skip
    assert main(argv) == 0
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["lr_lora"] / r["lr"] for r in log] == pytest.approx([10.0] * 3)
    runs = [p.parent for p in (out / "tensorboard").rglob("events.out.tfevents.*")]
    tags = {}
    for run in runs:
        events = EventAccumulator(str(run))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            tags[tag] = [e.value for e in events.Scalars(tag)]
    assert tags["train/lr_lora"] == pytest.approx([r["lr_lora"] for r in log])
    results = json.loads((out / "eval.json").read_text())
    for stage in ("before", "after"):
        for name, value in results[stage].items():
            assert tags[f"{stage}/{name}"] == pytest.approx([value]), (stage, name)
