"""The run directory keeps the user's files and finished models safe (no data loss)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from molf.atomic import atomic_directory, recover_dir, write_text_atomic
from molf.cli import main
from molf.errors import MolfError
from molf.ownership import MANIFEST, TEMP_PREFIX, claim
from molf.train import job as job_module
from molf.train.args import resolve_args
from molf.train.rundir import LOCK_FILE, start_run_dir

QUICK = [
    "--max-train-samples", "8", "--max-eval-samples", "4", "--batch-size", "4",
    "--eval-batch-size", "8", "--lora-ranks", "4", "--lora-alphas", "8", "--lr", "1e-3",
    "--max-steps", "2",
]  # fmt: skip


def _args(out: Path, model: Path, *extra: str) -> list[str]:
    """``molf train`` of a two-step run of ``model`` on the built-in edits into ``out``."""
    return ["train", "--output-dir", str(out), "--model", str(model), "--task", "fact",
            "--data", "builtin", *QUICK, *extra]  # fmt: skip


def _tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


@pytest.fixture
def finished(tmp_path, tiny_model_dir) -> Path:
    out = tmp_path / "runs" / "run"
    assert main(_args(out, tiny_model_dir, "--method", "fft")) == 0
    return out


@pytest.mark.slow
def test_overwrite_refuses_a_directory_holding_other_files(finished, tiny_model_dir):
    (finished / "train.jsonl").write_text('{"prompt": "mine", "completion": "keep"}\n')
    before = _tree(finished)
    assert main(_args(finished, tiny_model_dir, "--overwrite")) == 2
    assert _tree(finished) == before


def test_overwrite_of_the_working_directory_touches_nothing(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "config.yaml").write_text("not molf's: a user file with a run file's name\n")
    (tmp_path / "final").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--output-dir", ".", "--overwrite", "--task", "fact"]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "final", "notes.txt"]


def test_a_run_never_replaces_a_users_file_named_like_its_own(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "config.yaml").write_text("the user's own config\n")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--output-dir", ".", "--task", "fact", "--data", "builtin"]) == 2
    assert "config.yaml" in capsys.readouterr().err
    assert (tmp_path / "config.yaml").read_text() == "the user's own config\n"


@pytest.mark.slow
def test_overwrite_replaces_only_the_old_run(finished, tiny_model_dir):
    claim(finished / "checkpoint-9")  # as molf's writers do before writing
    (finished / "checkpoint-9").mkdir()
    (finished / "checkpoint-9" / "meta.json").write_text('{"step": 9}')
    assert main(_args(finished, tiny_model_dir, "--overwrite", "--method", "lora")) == 0
    assert not (finished / "checkpoint-9").exists()
    assert (finished / "final" / "adapter_config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    "bad", [["--lr=-1e-3"], ["--lr", "nan"], ["--report-to", "wandb"], ["--max-grad-norm", "nan"]]
)
def test_a_late_error_never_costs_the_previous_run(finished, tiny_model_dir, bad):
    if bad == ["--report-to", "wandb"] and __import__("importlib").util.find_spec("wandb"):
        pytest.skip("wandb is installed here, so that input is not an error")
    before = _tree(finished)
    assert main(_args(finished, tiny_model_dir, "--overwrite", *bad)) == 2
    assert _tree(finished) == before


@pytest.mark.slow
def test_a_failed_setup_does_not_block_the_corrected_rerun(tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "run"

    def crash(*_, **__):
        raise RuntimeError("simulated crash during the first evaluation")

    monkeypatch.setattr(job_module, "evaluate", crash)
    with pytest.raises(RuntimeError):
        main(_args(out, tiny_model_dir))
    monkeypatch.undo()
    assert main(_args(out, tiny_model_dir)) == 0  # no --overwrite needed
    assert (out / "final").is_dir()


@pytest.mark.slow
def test_molf_e_with_tied_embeddings_exports_an_adapter_that_reproduces_the_model(
    tmp_path, tiny_model_dir
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    args = _args(out, tiny_model_dir, "--method", "molf-e", "--train-non-linear")
    assert main([*args, "--save-merged"]) == 0
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert original.config.tie_word_embeddings  # the case under test
    merged = AutoModelForCausalLM.from_pretrained(out / "final" / "merged").eval()
    # training changed the (tied) embeddings, so the adapter must carry them
    assert not torch.equal(
        merged.get_input_embeddings().weight, original.get_input_embeddings().weight
    )
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "final"
    ).eval()
    ids = torch.arange(1, 40).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(adapter(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_a_failed_final_save_is_redone_with_resume(tmp_path, tiny_model_dir, monkeypatch, capsys):
    reference = tmp_path / "reference"
    assert main(_args(reference, tiny_model_dir, "--method", "molf")) == 0
    assert not list(reference.glob("checkpoint-*"))  # --save-steps 0: removed once final/ is safe

    out = tmp_path / "run"

    def disk_full(*_, **__):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(job_module, "save_final", disk_full)
    assert main(_args(out, tiny_model_dir, "--method", "molf")) == 1
    assert "No space left on device" in capsys.readouterr().err
    monkeypatch.undo()
    assert (out / "checkpoint-2" / "meta.json").is_file() and not (out / "final").exists()
    assert main(_args(out, tiny_model_dir, "--method", "molf", "--resume")) == 0
    got = load_file(out / "final" / "model.safetensors")
    want = load_file(reference / "final" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.slow
def test_resuming_a_finished_run_changes_nothing(tmp_path, tiny_model_dir):
    out = tmp_path / "runs" / "run"
    assert main(_args(out, tiny_model_dir, "--save-steps", "1")) == 0
    before = _tree(out)
    csv_before = (out.parent / "results.csv").read_text()
    assert main(_args(out, tiny_model_dir, "--save-steps", "1", "--resume")) == 0
    assert _tree(out) == before
    assert (out.parent / "results.csv").read_text() == csv_before


def test_a_run_without_its_model_keeps_metrics_logs_and_routing(tmp_path, tiny_model_dir, capsys):
    """--no-save-model (what a sweep's val cells get): eval.json, logs and routing, no
    final/ and no checkpoint left. It counts as finished: a new run there needs
    --overwrite (which trains it again, here with its model), --resume says why not."""
    from molf.train.rundir import RunDir

    out = tmp_path / "runs" / "run"
    assert main(_args(out, tiny_model_dir, "--method", "molf", "--no-save-model")) == 0
    assert "after" in json.loads((out / "eval.json").read_text())
    assert (out / "routing.jsonl").is_file() and (out / "train_log.jsonl").is_file()
    assert not (out / "final").exists() and not list(out.glob("checkpoint-*"))
    assert yaml.safe_load((out / "config.yaml").read_text())["save_model"] is False
    assert RunDir(out).complete
    capsys.readouterr()
    assert main(["eval", "--run", str(out)]) == 2
    assert "save_model off" in capsys.readouterr().err
    before = _tree(out)
    for extra in ((), ("--resume",)):
        assert main(_args(out, tiny_model_dir, "--method", "molf", *extra)) == 2
        assert _tree(out) == before
    assert "finished without saving its model" in capsys.readouterr().err
    assert main(_args(out, tiny_model_dir, "--method", "molf", "--overwrite")) == 0
    assert (out / "final" / "model.safetensors").is_file()
    with pytest.raises(MolfError, match="--push-to-hub"):
        resolve_args(None, {"save_model": False, "push_to_hub": "me/model"})


def test_resume_adds_or_drops_only_the_missing_model(tmp_path, tiny_model_dir, monkeypatch):
    """A finished record is never redone: resuming a run that kept checkpoints but not
    its model saves final/ (one results.csv row, config.yaml says so); a run whose final
    save failed, resumed with --no-save-model, is finished as such (and complete for a
    sweep)."""
    from molf.train.rundir import RunDir

    def rows(run: Path) -> list[str]:
        lines = (run.parent / "results.csv").read_text().splitlines()[1:]
        return [line for line in lines if str(run) in line]

    kept = tmp_path / "kept" / "run"
    common = ("--method", "molf", "--save-steps", "1")
    assert main(_args(kept, tiny_model_dir, *common, "--no-save-model")) == 0
    record = (kept / "eval.json").read_text()
    assert main(_args(kept, tiny_model_dir, *common, "--resume")) == 0
    assert (kept / "final" / "model.safetensors").is_file()
    assert (kept / "eval.json").read_text() == record and len(rows(kept)) == 1
    assert yaml.safe_load((kept / "config.yaml").read_text())["save_model"] is True

    failed = tmp_path / "failed" / "run"

    def disk_full(*_, **__):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(job_module, "save_final", disk_full)
    assert main(_args(failed, tiny_model_dir, "--method", "molf")) == 1
    monkeypatch.undo()
    assert not RunDir(failed).complete and len(rows(failed)) == 1
    resume = ("--method", "molf", "--resume", "--no-save-model")
    assert main(_args(failed, tiny_model_dir, *resume)) == 0
    assert RunDir(failed).complete and not (failed / "final").exists()
    assert not list(failed.glob("checkpoint-*")) and len(rows(failed)) == 1


@pytest.mark.slow
def test_resume_refuses_changed_settings_unless_asked_and_records_them(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    out = tmp_path / "runs" / "run"
    assert main(_args(out, tiny_model_dir, "--save-steps", "1")) == 0
    first_seconds = json.loads((out / "eval.json").read_text())["train_seconds"]
    before = _tree(out)
    assert main(_args(out, tiny_model_dir, "--save-steps", "1", "--resume", "--lr", "5e-3")) == 2
    err = capsys.readouterr().err
    assert "--lr 0.005 (the run used 0.001)" in err and "--allow-changed-settings" in err
    assert _tree(out) == before
    # the same files spelled another way (from another directory) are the same settings
    monkeypatch.chdir(tmp_path)
    model = Path(os.path.relpath(tiny_model_dir, tmp_path))
    same = _args(out, model, "--save-steps", "1", "--resume")
    assert main(same) == 0
    assert _tree(out) == before

    more = [*_args(out, model, "--save-steps", "1", "--resume"), "--max-steps", "3"]
    assert main([*more, "--allow-changed-settings"]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["max_steps"] == 3
    assert config["resume_changes"] == [{"step": 2, "changes": ["--max-steps 3 (the run used 2)"]}]
    steps = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    # the time of the first attempt is carried through its checkpoint
    assert json.loads((out / "eval.json").read_text())["train_seconds"] > first_seconds


def test_replacing_a_directory_keeps_the_old_one_until_the_new_one_is_in_place(tmp_path):
    final = tmp_path / "final"
    with atomic_directory(final) as tmp:
        (tmp / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed while writing")
    assert (final / "weights").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir() if p.name != MANIFEST] == ["final"]  # no temp

    # A crash between "old renamed aside" and "new renamed in": recovery restores the old.
    aside = tmp_path / f"{TEMP_PREFIX}final-old-abc123"
    os.replace(final, aside)
    (tmp_path / f"{TEMP_PREFIX}final-xyz").mkdir()  # the new one, never renamed in
    (tmp_path / ".final-mine").mkdir()  # a user's dot-directory is not a temporary
    recover_dir(final)
    assert (final / "weights").read_text() == "old"
    names = sorted(p.name for p in tmp_path.iterdir() if p.name != MANIFEST)
    assert names == [".final-mine", "final"]


def test_outputs_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
        write_text_atomic(tmp_path / "g.txt", "y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "d" / "f").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "g.txt").stat().st_mode) == 0o644


@pytest.mark.slow
def test_resume_cleans_crash_leftovers_and_skips_a_corrupt_checkpoint(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    args = _args(out, tiny_model_dir, "--save-steps", "1", "--max-steps", "3")
    reference = tmp_path / "reference"
    assert main(_args(reference, tiny_model_dir, "--save-steps", "1", "--max-steps", "3")) == 0
    assert main(args) == 0
    (out / f"{TEMP_PREFIX}checkpoint-7-abcd1234").mkdir()
    (out / f"{TEMP_PREFIX}final-zz9").mkdir()
    (out / f"{TEMP_PREFIX}eval.json-q1").write_text("{")
    (out / "final").rename(out / f"{TEMP_PREFIX}final-old-k2")  # crash between final/'s renames
    newest = out / "checkpoint-3" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated by a crash or a full disk
    assert main([*args, "--resume"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".") and n not in (LOCK_FILE, MANIFEST)], names
    got = load_file(out / "final" / "model.safetensors")
    want = load_file(reference / "final" / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_second_run_in_a_locked_directory_is_refused_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import time
                from pathlib import Path
                from molf.train.rundir import start_run_dir
                lock = start_run_dir(Path({str(run_dir)!r}), resume=False, overwrite=False)
                print("locked", flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(MolfError, match=f"pid {holder.pid}"):
            start_run_dir(run_dir, resume=False, overwrite=False)
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    start_run_dir(run_dir, resume=False, overwrite=False).release()  # freed when it died


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_resume_ends_exactly(tmp_path, tiny_model_dir):
    reference = tmp_path / "reference"
    steps = ["--max-steps", "40", "--method", "molf"]
    assert main(_args(reference, tiny_model_dir, *steps)) == 0
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "molf", *_args(out, tiny_model_dir, *steps)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    log = out / "train_log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and log.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(15)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    (stopped,) = list(out.glob("checkpoint-*"))  # --save-steps 0, yet the step was saved
    step = int(stopped.name.split("-")[1])
    assert 2 <= step < 40 and f"interrupted after step {step}" in err and "Traceback" not in err
    assert not (out / "final").exists()
    assert main([*_args(out, tiny_model_dir, *steps), "--resume"]) == 0
    got = load_file(out / "final" / "model.safetensors")
    want = load_file(reference / "final" / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
