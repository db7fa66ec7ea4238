"""molf replaces or deletes only what it wrote itself: a user's files beside or under
molf's output paths survive every command, and the refusal is one line naming the path.

End to end on a tiny model (tests/conftest.py), each case as a careful user would meet it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from molf.cli import main
from molf.ownership import MANIFEST, claim, owns, remove_owned

from .conftest import train_args, tree

pytestmark = pytest.mark.slow


def _hf_trainer_output(root: Path) -> Path:
    """The layout a Hugging Face Trainer (or MoLFTrainer) leaves in its output_dir."""
    ckpt = root / "checkpoint-500"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text('{"global_step": 500}')
    (ckpt / "config.json").write_text("{}")
    (root / "runs").mkdir()
    (root / "config.json").write_text("{}")
    return root


def test_train_into_a_hugging_face_trainer_output_is_refused_untouched(
    tmp_path, tiny_model_dir, capsys
):
    out = _hf_trainer_output(tmp_path / "hf")
    before = tree(out)
    assert main(train_args(out, tiny_model_dir, "--method", "lora")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "checkpoint-500" in err and "not written by molf" in err
    assert tree(out) == before
    assert main(train_args(out, tiny_model_dir, "--method", "lora", "--overwrite")) == 2
    assert tree(out) == before


def test_a_user_file_named_like_molfs_temporaries_is_not_swept_away(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".eval.json-notes").write_text("mine")  # matched molf's old temporary names
    (out / ".final-backup").mkdir()
    assert main(train_args(out, tiny_model_dir, "--method", "fft")) == 0
    assert main(train_args(out, tiny_model_dir, "--method", "fft", "--overwrite")) == 2  # foreign
    assert (out / ".eval.json-notes").read_text() == "mine"
    assert (out / ".final-backup").is_dir()


def test_results_csv_that_molf_did_not_write_is_refused(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "results.csv").write_text("my,own,table\n1,2,3\n")
    out = tmp_path / "run"
    assert main(train_args(out, tiny_model_dir, "--method", "fft")) == 2
    assert "results.csv" in capsys.readouterr().err
    assert (tmp_path / "results.csv").read_text() == "my,own,table\n1,2,3\n"


def test_report_never_replaces_a_users_files(molf_run, tmp_path, capsys, monkeypatch):
    mine = tmp_path / "site"
    mine.mkdir()
    (mine / "index.html").write_text("<p>my page</p>")
    (mine / "training.png").write_bytes(b"my picture")
    before = tree(mine)
    assert main(["report", str(molf_run), "--out", str(mine)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "not written by molf" in err and "--out" in err
    assert tree(mine) == before
    # the default ./report of several runs: the same rule
    monkeypatch.chdir(mine.parent)
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "summary.md").write_text("# my notes")
    assert main(["report", str(molf_run), str(molf_run)]) == 2
    assert (tmp_path / "report" / "summary.md").read_text() == "# my notes"
    # a report molf wrote is replaced without a word, and molf's files are recorded
    assert main(["report", str(molf_run), "--out", str(tmp_path / "fresh")]) == 0
    assert main(["report", str(molf_run), "--out", str(tmp_path / "fresh")]) == 0
    assert owns(tmp_path / "fresh" / "index.html") and owns(tmp_path / "fresh" / "training.png")


def test_report_out_naming_a_file_is_one_line(molf_run, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert main(["report", str(molf_run), "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file" in err[0]
    assert target.read_text() == "mine"


def test_eval_never_replaces_a_users_eval_json(molf_run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "eval.json").write_text('{"my": "numbers"}')
    argv = ["eval", "--model", str(molf_run / "final"), "--task", "fact", "--data", "builtin",
            "--max-eval-samples", "2", "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 2
    assert "eval.json" in capsys.readouterr().err
    assert json.loads((out / "eval.json").read_text()) == {"my": "numbers"}


def test_remove_owned_deletes_only_what_molf_recorded(tmp_path):
    (tmp_path / "failed.json").write_text("the user's")
    assert not remove_owned(tmp_path / "failed.json")
    assert (tmp_path / "failed.json").read_text() == "the user's"
    claim(tmp_path / "ours.json")
    (tmp_path / "ours.json").write_text("{}")
    assert remove_owned(tmp_path / "ours.json")
    assert not (tmp_path / "ours.json").exists()
    assert "ours.json" not in (tmp_path / MANIFEST).read_text()
