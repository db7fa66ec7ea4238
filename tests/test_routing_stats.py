"""Routing statistics: shares without ties, collapse detection and its warning, against
slow re-implementations; end to end in `molf train`, the Trainer callback and the report."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from helpers import tiny_model
from transformers import TrainingArguments

from molf import MoLFConfig, get_molf_model
from molf.cli import main
from molf.integrations.hf import MoLFTrainer
from molf.routing_log import TIE, routing_matrix
from molf.routing_stats import (
    Collapse,
    CollapseWatch,
    LoraExpert,
    RoutingCounts,
    RoutingSetup,
    collapse_warning,
)
from molf.train.model_card import routing_summary

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
           "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]  # fmt: skip
EXPERTS = ["fft", "lora0"]


def test_counts_leave_ties_out_of_every_share():
    rng = np.random.default_rng(0)
    counts = RoutingCounts(MODULES, EXPERTS)
    steps = []
    for step in range(1, 31):
        winner = rng.integers(0, 2, size=len(MODULES))
        selected = np.eye(2, dtype=bool)[winner]
        scores = rng.random((len(MODULES), 2))
        scores[rng.random(len(MODULES)) < 0.3] = 0.0  # these modules compared nothing
        counts.add(step, selected, scores)
        steps.append((selected, scores))
    # slow: loop over every module-step, skip the all-zero ones
    wins, decided = np.zeros((4, 2)), np.zeros(4)
    ties = 0
    for selected, scores in steps:
        for m in range(4):
            if all(s == 0 for s in scores[m]):
                ties += 1
                continue
            decided[m] += 1
            wins[m] += selected[m]
    assert counts.ties == ties > 0
    np.testing.assert_allclose(counts.expert_shares(), wins.sum(0) / decided.sum())
    by_type = counts.type_shares()
    np.testing.assert_allclose(by_type["q_proj"], wins[[0, 2]].sum(0) / decided[[0, 2]].sum())
    np.testing.assert_allclose(by_type["down_proj"], wins[[1, 3]].sum(0) / decided[[1, 3]].sum())
    scalars = counts.scalars()
    assert scalars["routing/ties"] == pytest.approx(ties / 120)
    assert scalars["routing/fft"] + scalars["routing/lora0"] == pytest.approx(1.0)


def _watch(winners_per_step, warmup=0, top_k=1):
    """Feed steps (each: the winning expert of every module) to a CollapseWatch."""
    watch, fired = CollapseWatch(EXPERTS, top_k, warmup), []
    for step, winners in enumerate(winners_per_step, start=1):
        wins = np.bincount(winners, minlength=2)
        found = watch.add(step, wins, len(winners))
        if found is not None:
            fired.append((step, found))
    return watch, fired


def test_collapse_fires_once_after_the_window_and_names_its_start():
    warm = [[0, 0, 0, 0]] * 4  # warm-up steps: never counted
    _, fired = _watch(warm + [[1, 1, 1, 1]] * 30, warmup=4)
    assert [step for step, _ in fired] == [14]  # 10 steps after the warm-up
    assert fired[0][1] == Collapse("lora0", 5, 1.0)


def test_routing_that_moves_never_warns():
    rng = np.random.default_rng(1)
    moving = [list(rng.integers(0, 2, size=4)) for _ in range(200)]
    watch, fired = _watch(moving)
    assert fired == [] and watch.current() is None
    # 97.5% one way in every window is still routing (the rule is >= 99%)
    mostly = [[0, 1, 1, 1]] + [[1, 1, 1, 1]] * 9
    assert _watch(mostly * 20)[1] == []


def test_collapse_rearms_when_routing_changes_and_top_k_all_never_collapses():
    steps = [[1, 1, 1, 1]] * 20 + [[0, 1, 0, 1]] * 20 + [[0, 0, 0, 0]] * 20
    _, fired = _watch(steps)
    assert [(s, c.expert) for s, c in fired] == [(10, "lora0"), (50, "fft")]
    assert _watch([[1, 1, 1, 1]] * 50, top_k=2)[1] == []


def test_the_warning_names_the_rates_their_ratio_and_the_fix():
    c = Collapse("lora0", 2, 1.0)
    cli = collapse_warning(c, RoutingSetup(1e-4, 1e-3, [LoraExpert(128, 32)]))
    assert cli.startswith("warning: routing collapsed: lora0 won 100% of layer-steps since step 2")
    assert "--lora-lr (0.001) is 10x --lr (0.0001)" in cli and "training as LoRA" in cli
    assert "(--lora-lr = --lr)" in cli and "docs/tuning.md" in cli
    lib = collapse_warning(c, RoutingSetup(1e-4, 1e-3, [LoraExpert(128, 32)], library=True))
    assert "lora_lr= (0.001) is 10x lr= (0.0001)" in lib
    fft = collapse_warning(Collapse("fft", 3, 1.0), RoutingSetup(1e-4, 1e-5, [LoraExpert(8, 16)]))
    assert "0.1x" in fft and "training as full fine-tuning" in fft
    equal = collapse_warning(c, RoutingSetup(5e-5, 5e-5, [LoraExpert(128, 32)]))
    assert "equals --lr" in equal and "32/sqrt(128) = 2.83" in equal and "--score pfn" in equal
    pfn = RoutingSetup(5e-5, 1e-3, [LoraExpert(128, 32)], score="pfn")
    pfn_text = collapse_warning(Collapse("fft", 5, 1.0), pfn)
    assert "PFN compares" in pfn_text and "--score epd" in pfn_text and "20x" not in pfn_text
    e = RoutingSetup(2e-4, 2e-4, [LoraExpert(8, 16), LoraExpert(32, 16)], has_fft=False)
    molf_e = collapse_warning(Collapse("lora0", 2, 1.0), e)
    assert "16/sqrt(8) = 5.66" in molf_e and "16/sqrt(32) = 2.83" in molf_e
    assert "--lora-alphas" in molf_e


# ------------------------------------------------------------------ end to end (stories260k)


def _train(tmp_path, shared_data, name, lr, lora_lr):
    out = tmp_path / name
    argv = ["train", "--model", str(shared_data / "models" / "stories260k"),
            "--data", str(shared_data / "counterfact" / "counterfact-val.json"),
            "--max-train-samples", "64", "--max-eval-samples", "2", "--no-eval-before",
            "--batch-size", "8", "--max-steps", "40", "--lr", lr, "--lora-lr", lora_lr,
            "--warmup-ratio", "0.1", "--lora-ranks", "8", "--lora-alphas", "16",
            "--no-save-model", "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, shared_data):
    """The same run with the LoRA lr 10x the dense one, and with equal rates."""
    root = tmp_path_factory.mktemp("routing")
    return {
        "10x": _train(root, shared_data, "ten", "1e-4", "1e-3"),
        "equal": _train(root, shared_data, "equal", "1e-3", "1e-3"),
    }


@pytest.mark.slow
def test_molf_train_warns_at_10x_and_not_when_routing_moves(tmp_path, shared_data, capsys):
    _train(tmp_path, shared_data, "ten", "1e-4", "1e-3")
    out = capsys.readouterr().out
    warnings = [x for x in out.splitlines() if "routing collapsed" in x]
    assert len(warnings) == 2 and warnings[1].startswith("[molf] at the end: ")
    assert "--lora-lr (0.001) is 10x --lr (0.0001)" in warnings[0]
    _train(tmp_path, shared_data, "equal", "1e-3", "1e-3")
    out = capsys.readouterr().out
    assert "routing collapsed" not in out
    shares = re.findall(r"fft (\d+)% of layer-steps", out)
    assert shares and all(0 < int(s) < 99 for s in shares)  # it does route


@pytest.mark.slow
def test_the_zero_lr_step_is_marked_and_left_out(two_runs):
    run = two_runs["equal"]
    records = [json.loads(x) for x in (run / "routing.jsonl").read_text().splitlines()]
    first, rest = records[1], records[2:]
    assert first["step"] == 1 and first["ties"] == list(range(len(records[0]["modules"])))
    assert all("ties" not in r for r in rest)  # every later step decided every module
    matrix = routing_matrix(run)
    assert (matrix.winners[:, 0] == TIE).all() and (matrix.winners[:, 1:] != TIE).all()
    # the optimizer still selected by its tie rule (fft) at step 1: the oracle's choice
    assert all(w == [0] for w in first["winners"])
    counts = matrix.counts()
    fft = sum(w == [0] for r in rest for w in r["winners"]) / sum(len(r["winners"]) for r in rest)
    assert counts.expert_shares()[0] == pytest.approx(fft)
    card = routing_summary(run)
    assert f"fft {fft:.0%}" in card and "without a decision left out" in card


@pytest.mark.slow
def test_report_badges_the_collapsed_run_only(two_runs, tmp_path):
    out = tmp_path / "report"
    assert main(["report", str(two_runs["10x"]), str(two_runs["equal"]), "--out", str(out)]) == 0
    md = (out / "summary.md").read_text()
    html = (out / "index.html").read_text()
    assert md.count("**routing collapsed**") == 1 and "ten: lora0 won 100%" in md
    assert html.count("<b>routing collapsed</b>") == 1 and "--lora-lr (0.001)" in html


def test_trainer_callback_warns_with_library_names(tmp_path, caplog):
    torch.manual_seed(0)
    model = get_molf_model(tiny_model("llama"), MoLFConfig(lora_ranks=(4,), lora_alphas=(8,)))
    g = torch.Generator().manual_seed(1)
    data = [
        {"input_ids": x, "labels": x.clone()} for x in torch.randint(0, 96, (64, 12), generator=g)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=30,
        learning_rate=1e-4, logging_steps=5, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = MoLFTrainer(model=model, args=args, train_dataset=data, lora_lr=1e-2)
    with caplog.at_level(logging.WARNING, logger="molf"):
        trainer.train()
    found = [r.getMessage() for r in caplog.records if "routing collapsed" in r.getMessage()]
    assert found and "lora_lr= (0.01) is 100x lr= (0.0001)" in found[0]
