"""`molf train --task jsonl` on the user's own data: which rows are evaluated (eval.json,
the model card), the flags of the layouts and the split, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from molf.cli import main
from molf.errors import MolfError
from molf.tasks import get_task
from molf.tasks.jsonl import prompt_key
from molf.tasks.sources import hash_fraction
from molf.train.args import TrainArgs
from molf.train.evaluation import load_task

QUICK = [
    "--task", "jsonl", "--method", "lora", "--lora-ranks", "4", "--lora-alphas", "8",
    "--max-steps", "2", "--batch-size", "4", "--eval-batch-size", "8",
    "--max-new-tokens", "2", "--lr", "1e-3",
]  # fmt: skip


def write_rows(path: Path, n: int) -> Path:
    """``n`` question/answer rows under the columns ``q`` and ``a``."""
    rows = [{"q": f"{i} plus one is", "a": f" {i + 1}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_run_on_one_file_evaluates_its_held_out_rows_and_says_so(tmp_path, tiny_model_dir):
    data = write_rows(tmp_path / "mine.jsonl", 80)
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), *QUICK,
            "--prompt-field", "q", "--completion-field", "a", "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    held = [i for i in range(80) if 0.05 <= hash_fraction(f"{i} plus one is") < 0.1]
    evaluated = f"the test half of the held-out 10% of {data} (by prompt hash): {len(held)} pairs"
    record = json.loads((out / "eval.json").read_text())
    assert record["evaluated"] == evaluated and held
    predictions = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert {p["prompt"] for p in predictions} == {f"{i} plus one is" for i in held}
    card = (out / "final" / "README.md").read_text()
    assert f"- data: {data}; evaluated on {evaluated}" in card


def test_eval_on_train_warns_and_records_the_training_rows(tmp_path, tiny_model_dir):
    data = write_rows(tmp_path / "few.jsonl", 6)
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), *QUICK,
            "--prompt-field", "q", "--completion-field", "a", "--eval-on-train",
            "--no-eval-before", "--no-save-model", "--output-dir", str(out)]  # fmt: skip
    with pytest.warns(UserWarning, match="--eval-on-train: evaluating on the training rows"):
        assert main(argv) == 0
    record = json.loads((out / "eval.json").read_text())
    assert record["evaluated"] == "the training rows (--eval-on-train): 6 pairs"


def test_the_flags_reach_the_task(tmp_path):
    data = write_rows(tmp_path / "mine.jsonl", 200)
    args = TrainArgs(
        task="jsonl", data=str(data), prompt_field="q", completion_field="a", val_size=0.3
    )
    _, loaded = load_task(args)
    assert all(0.15 <= hash_fraction(prompt_key(e)) < 0.3 for e in loaded.eval)
    assert all(hash_fraction(prompt_key(e)) >= 0.3 for e in loaded.train)
    assert loaded.eval and "held-out 30%" in loaded.evaluated
    # --seed moves neither side
    _, again = load_task(TrainArgs(**{**args.to_dict(), "seed": 5, "lora_ranks": (128,)}))
    assert set(again.eval) == set(loaded.eval) and set(again.train) == set(loaded.train)
    plain = get_task("jsonl")  # without the mapping the rows have no known layout
    with pytest.raises(MolfError, match="no accepted layout has these keys \\('q', 'a'\\)"):
        plain.load(str(data))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"val_size": 0.0}, r"--val-size must be in \(0, 1\), got 0.0"),
        ({"val_size": 1.0}, r"--val-size must be in \(0, 1\), got 1.0"),
        ({"task": "fact", "prompt_field": "q"}, "--prompt-field: only the jsonl task reads"),
        ({"task": "med", "eval_on_train": True}, "--eval-on-train: only the jsonl task"),
        ({"chat_template": "missing.jinja"}, "'missing.jinja' is neither one of auto, none"),
    ],
)
def test_bad_own_data_settings_are_refused_before_any_work(settings, message):
    with pytest.raises(MolfError, match=message):
        TrainArgs(**{"task": "jsonl", **settings})


def test_a_chat_template_file_is_a_setting(tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert TrainArgs(task="jsonl", chat_template=str(template)).chat_template == str(template)
    assert TrainArgs(chat_template="none").chat_template == "none"
