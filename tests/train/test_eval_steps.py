"""Evaluation during training (--eval-steps, --eval-metrics, --early-stopping-patience) and
what a finished run's adapter and card say about its base model."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from molf.cli import main
from molf.tasks import get_task
from molf.tasks.encoding import IGNORE_INDEX, encode_example
from molf.train.args import TrainArgs
from molf.train.eval_steps import EarlyStopping
from molf.train.logs import RunLogger
from molf.train.model_card import model_card
from molf.train.modeling import ModelRef

from .conftest import QUICK, train_run

MAX_LENGTH = 256  # the tiny model's positions: --max-length 512 is cut to it


def _log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]


def _evals(run: Path, key: str = "eval_loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in _log(run) if key in r}


def direct_loss(model, tokenizer, examples) -> float:
    """The loss of ``model`` on ``examples``, one unpadded row at a time, all logits."""
    total, count = 0.0, 0
    for example in examples:
        item = encode_example(tokenizer, example.prompt, example.completion, MAX_LENGTH)
        targets = torch.tensor(item["labels"][1:])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([item["input_ids"]])).logits[0, :-1]
        keep = targets != IGNORE_INDEX
        total += F.cross_entropy(logits[keep].double(), targets[keep], reduction="sum").item()
        count += int(keep.sum())
    return total / count


def _scalars(run: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


FACT = ["--data", "builtin", "--max-steps", "4", "--no-eval-before", "--lora-dropout", "0.1"]


def test_eval_loss_every_n_steps_is_the_models_loss_and_changes_no_weight(tmp_path, tiny_model_dir):
    model = ["--model", str(tiny_model_dir), *FACT]
    run = train_run(
        tmp_path, "eval", *model, "--eval-steps", "2", "--eval-metrics", "--report-to",
        "tensorboard",
    )  # fmt: skip
    assert [r["step"] for r in _log(run)] == [1, 2, 3, 4]  # one record a step
    losses = _evals(run)
    assert list(losses) == [2, 4]
    assert list(_evals(run, "eval_efficacy")) == [2, 4]
    # the last one is the final model's loss on the evaluated edits' pairs
    data = get_task("fact").load("builtin", max_train_samples=8, max_eval_samples=6)
    assert len(data.eval_examples) == len(data.eval) == 6
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert losses[4] == pytest.approx(direct_loss(final, tokenizer, data.eval_examples), rel=1e-5)
    # the trackers get the same values as eval/...
    for tag, key in (("eval/loss", "eval_loss"), ("eval/efficacy", "eval_efficacy")):
        assert _scalars(run, tag) == pytest.approx(_evals(run, key), rel=1e-6), tag
    assert 4 in _scalars(run, "train/loss")
    # evaluating changes nothing the run trains (dropout's random numbers included)
    plain = train_run(tmp_path, "plain", *model)
    assert "eval_loss" not in _log(plain)[-1]
    a, b = (
        load_file(run / "final" / "model.safetensors"),
        load_file(plain / "final" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_checkpoints_and_finishes_at_the_step(tmp_path, tiny_model_dir, capsys):
    # bf16 weights and lr 1e-12: no update is representable, so the eval loss never improves
    args = [
        "--model", str(tiny_model_dir), "--data", "builtin", "--method", "fft", "--dtype",
        "bf16", "--lr", "1e-12", "--max-steps", "8", "--eval-steps", "2",
        "--early-stopping-patience", "2", "--no-eval-before", "--save-steps", "4",
    ]  # fmt: skip
    run = train_run(tmp_path, "early", *args)
    assert list(_evals(run)) == [2, 4, 6]
    assert len(set(_evals(run).values())) == 1
    assert [r["step"] for r in _log(run)] == list(range(1, 7))
    evals = json.loads((run / "eval.json").read_text())
    assert evals["early_stopping"] == {
        "patience": 2,
        "best_eval_loss": _evals(run)[2],
        "best_step": 2,
        "evaluations_without_improvement": 2,
        "stopped_at": 6,
    }
    assert "after" in evals and (run / "final" / "model.safetensors").is_file()
    assert "early stopping at step 6" in capsys.readouterr().out
    assert "6 steps of" in (run / "final" / "README.md").read_text()
    assert (run / "checkpoint-6").is_dir()  # the stop's checkpoint (kept: --save-steps)
    # a resume from it finds the run finished (its record complete, its model saved)
    assert main(["train", "--output-dir", str(run), *QUICK, *args, "--resume"]) == 0
    assert "already finished" in capsys.readouterr().out


def test_early_stopping_rule():
    early = EarlyStopping(patience=2)
    assert not early.add(1, 3.0) and not early.add(2, 2.0) and not early.add(3, 2.5)
    assert not early.add(4, 1.0)  # improved: the count starts again
    assert not early.add(5, 1.0) and early.add(6, 1.5)  # equal is no improvement
    assert (early.best_step, early.stopped_at) == (4, 6)
    assert not EarlyStopping(patience=1).add(1, 1.0)
    last = EarlyStopping(patience=1)
    last.add(1, 1.0)
    assert not last.add(2, 2.0, last=True) and last.stopped_at is None  # the end anyway


class Crash(Exception):
    pass


def test_a_resumed_run_keeps_one_eval_record_per_step(tmp_path, tiny_model_dir, monkeypatch):
    args = ["--model", str(tiny_model_dir), *FACT, "--max-steps", "6", "--eval-steps", "2",
            "--save-steps", "2"]  # fmt: skip
    real = RunLogger.log_train

    def log_then_crash(self, record):
        real(self, record)
        if record["step"] == 5:
            raise Crash  # the process dies after step 5, one step past checkpoint-4

    monkeypatch.setattr(RunLogger, "log_train", log_then_crash)
    with pytest.raises(Crash):
        train_run(tmp_path, "cut", *args)
    monkeypatch.setattr(RunLogger, "log_train", real)
    cut = tmp_path / "runs" / "cut"
    before = _evals(cut)
    assert list(before) == [2, 4] and (cut / "checkpoint-4").is_dir()
    assert main(["train", "--output-dir", str(cut), *QUICK, *args, "--resume"]) == 0
    assert [r["step"] for r in _log(cut)] == [1, 2, 3, 4, 5, 6]
    after = _evals(cut)
    assert list(after) == [2, 4, 6] and after[2] == before[2] and after[4] == before[4]


@pytest.mark.parametrize("method", ["lora", "molf-e"])
def test_an_adapter_names_its_base_by_absolute_path_and_loads_from_anywhere(
    tmp_path, tiny_model_dir, method, monkeypatch
):
    from peft import PeftModel

    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(tiny_model_dir)  # --model ../x, as people write it
    run = train_run(
        tmp_path, method, "--model", relative, "--data", "builtin", "--method", method,
        "--max-steps", "2", "--no-eval-before",
    )  # fmt: skip
    final = run / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == os.path.abspath(relative)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    card = (final / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(snippet.replace("path/to/final", str(final)), namespace)  # the card's own code
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = PeftModel.from_pretrained(base, final)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(namespace["model"](ids).logits, reference(ids).logits)


def test_the_card_names_the_gguf_the_weights_were_dequantized_from(tmp_path):
    hub = "HuggingFaceTB/SmolLM2-135M-Instruct"
    ref = ModelRef("/models/smollm2", "smollm2-135m-instruct-q4_k_m.gguf", hub)
    card = model_card(TrainArgs(method="molf"), hub, {}, tmp_path, ref)
    line = next(x for x in card.splitlines() if "GGUF" in x)
    assert "dequantized" in line and ref.gguf_file in line and f"export of {hub}" in line
    assert yaml.safe_load(card.split("---")[1])["base_model"] == hub
    plain = model_card(TrainArgs(method="molf"), "x", {}, tmp_path, ModelRef("x", None, None))
    assert "GGUF" not in plain


def test_the_fact_evaluation_shows_one_progress_bar_on_a_terminal(tiny_model_dir, monkeypatch):
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, replica = pty.openpty()
    fcntl.ioctl(replica, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 120 columns
    terminal = os.fdopen(replica, "w")
    monkeypatch.setattr(sys, "stderr", terminal)  # tqdm's default file, a terminal now
    task = get_task("fact")
    records = task.load("builtin", max_eval_samples=4).eval
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    task.evaluate(model, AutoTokenizer.from_pretrained(tiny_model_dir), records, batch_size=2)
    terminal.flush()
    shown = b""
    while select.select([master], [], [], 0.5)[0]:
        shown += os.read(master, 65536)
    terminal.close()
    os.close(master)
    text = shown.decode()
    answers = 2 * 3 * len(records)  # a built-in edit: its prompt, a paraphrase, a neighbour
    assert "evaluating" in text and f"{answers}/{answers}" in text
    assert "scoring" not in text  # one bar for the whole evaluation
