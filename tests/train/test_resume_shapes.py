"""`molf train --resume --allow-changed-settings` continues a run only with a checkpoint
that fits: settings that decide the trained parameters' shapes, and a run shorter than its
checkpoint, are refused with one line; settings that only scale (alphas) may change."""

from __future__ import annotations

from pathlib import Path

import yaml

from molf.cli import main

QUICK = [
    "--max-train-samples", "8", "--max-eval-samples", "4", "--batch-size", "4",
    "--eval-batch-size", "8", "--max-new-tokens", "4", "--lr", "1e-3", "--save-steps", "1",
    "--no-eval-before",
]  # fmt: skip
CHANGE = ["--resume", "--allow-changed-settings"]


def _train(out: Path, model: Path, *extra: str) -> list[str]:
    """The command line of a small run of ``model`` on the built-in edits in ``out`` (run
    it with ``main``)."""
    return ["train", "--output-dir", str(out), "--model", str(model), "--task", "fact",
            "--data", "builtin", *QUICK, *extra]  # fmt: skip


def _tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def _refused(capsys, argv: list[str], *needles: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.splitlines()[-1].startswith("molf: error: "), err
    line = err.splitlines()[-1]  # the message is this one line
    for needle in needles:
        assert needle in line, err
    return line


def test_resume_refuses_every_change_of_shape_even_when_changes_are_allowed(
    tmp_path, tiny_model_dir, tiny_dir, capsys
):
    out = tmp_path / "runs" / "molf"
    run = ("--method", "molf", "--lora-ranks", "1", "--lora-alphas", "8")
    assert main([*_train(out, tiny_model_dir, *run, "--max-steps", "2")]) == 0
    before = _tree(out)
    longer = [*_train(out, tiny_model_dir, *run, "--max-steps", "3"), *CHANGE]
    other_model = tiny_dir("qwen2")
    for change, needle in [
        (["--lora-ranks", "8"], "--lora-ranks [8] (the run used [1])"),
        (["--method", "molf-e"], "--method 'molf-e' (the run used 'molf')"),
        (["--target-modules", "q_proj,v_proj"], "--target-modules 'q_proj,v_proj'"),
        (["--no-train-non-linear"], "--train-non-linear False (the run used True)"),
        (["--model", str(other_model)], f"--model '{other_model}'"),
    ]:
        _refused(capsys, [*longer, *change], needle, "not even with --allow-changed-settings")
        assert _tree(out) == before, change
    # train_non_linear given as its default value changes no shape (only the setting)
    assert main([*longer, "--train-non-linear"]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["resume_changes"] == [
        {"step": 2, "changes": ["--max-steps 3 (the run used 2)",
                                "--train-non-linear True (the run used None)"]}
    ]  # fmt: skip


def test_resume_may_change_the_alphas_a_scale_not_a_shape(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "runs" / "lora"
    run = ("--method", "lora", "--lora-ranks", "2", "--max-steps", "2")
    assert main(_train(out, tiny_model_dir, *run, "--lora-alphas", "8")) == 0
    again = [*_train(out, tiny_model_dir, *run), *CHANGE]
    _refused(capsys, [*again, "--lora-ranks", "4"], "--lora-ranks [4] (the run used [2])")
    assert main([*again, "--lora-alphas", "16", "--max-steps", "3"]) == 0
    changes = yaml.safe_load((out / "config.yaml").read_text())["resume_changes"][0]["changes"]
    assert "--lora-alphas [16.0] (the run used [8.0])" in changes


def test_resume_refuses_to_end_before_its_checkpoint(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "runs" / "run"
    run = ("--lora-ranks", "2", "--lora-alphas", "8")
    assert main(_train(out, tiny_model_dir, *run, "--max-steps", "2")) == 0
    before = _tree(out)
    shorter = [*_train(out, tiny_model_dir, *run, "--max-steps", "1"), *CHANGE]
    _refused(
        capsys, shorter, "--max-steps 1", "checkpoint-2 (step 2)", "--max-steps 2 or more",
        "start a new run",
    )  # fmt: skip
    assert _tree(out) == before
    assert yaml.safe_load((out / "config.yaml").read_text())["max_steps"] == 2
