"""One line instead of a traceback, end to end: ``molf train`` / ``eval`` / ``report`` /
``push`` on a tiny model (tests/conftest.py) meeting hostile settings files, out-of-range
seeds, a full or read-only disk, damaged logs and predictions, a broken chat template,
SIGTERM after training and a Hub that cannot be reached.

Each case fails with one ``molf: ...`` line, the exit code the README gives, and no
half-written file; where the run can go on, the line says how, and that works.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import write_fact_file

from molf.cli import main

from .conftest import train_args, tree

pytestmark = pytest.mark.slow


def _last_line(capsys) -> str:
    """The last line molf wrote to stderr (its error or interruption line)."""
    return capsys.readouterr().err.strip().splitlines()[-1]


def _leftovers(run: Path) -> list[str]:
    """molf's temporaries left in ``run`` (there must be none after a failure)."""
    return [p.name for p in run.iterdir() if p.name.startswith(".molf-tmp")]


def _molf(*argv: str, env: dict[str, str] | None = None, limit_mb: int | None = None):
    """``molf ARGV`` as a real subprocess (optionally under an address-space limit)."""

    def cap() -> None:
        if limit_mb is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit_mb * 2**20, limit_mb * 2**20))

    return subprocess.run(
        [sys.executable, "-m", "molf", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        preexec_fn=cap,
    )


# --- 1. settings files --------------------------------------------------------------


def test_a_hostile_config_file_is_one_line_and_exit_2(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"lr: 1.0e-3\nmethod: caf\xe9\n")
    deep = tmp_path / "deep.yaml"
    deep.write_text("wandb_project: " + "[" * 50_000 + "]" * 50_000 + "\n")
    for config, needle in [(latin1, f"{latin1}:2: not UTF-8"), (deep, f"{deep}:1: nested")]:
        assert main(train_args(out, tiny_model_dir, "--config", str(config))) == 2
        line = _last_line(capsys)
        assert line.startswith("molf: error: --config: ") and needle in line, line
    assert not out.exists()


def test_an_alias_bomb_config_is_refused_without_growing_memory(tmp_path, tiny_model_dir):
    """Nine lines of anchors on real settings, each repeating the one before nine times:
    9**9 strings once expanded. Refused from the file alone, in a process capped far
    below what the expansion would take."""
    keys = ["wandb_project", "compile_backend", "target_modules", "gguf_file",
            "wandb_run_name", "push_to_hub", "score", "scheduler", "dtype"]  # fmt: skip
    lines = [f'{keys[0]}: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{k}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i, k in enumerate(keys) if i]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    started = time.perf_counter()
    done = _molf(*train_args(out, tiny_model_dir, "--config", str(bomb)), limit_mb=1500)
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"molf: error: --config: {bomb}:") and "alias" in line, line
    assert time.perf_counter() - started < 120 and not out.exists()


# --- 9. ~ in path settings ----------------------------------------------------------


def test_a_home_relative_output_dir_in_yaml_is_under_home(tmp_path, tiny_model_dir, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    config = home / "run.yaml"
    config.write_text("output_dir: ~/runs/tilde\n")
    argv = train_args(tmp_path / "unused", tiny_model_dir)
    argv = argv[:1] + argv[3:]  # no --output-dir flag: the YAML's applies
    assert main([*argv, "--config=~/run.yaml"]) == 0
    assert (home / "runs" / "tilde" / "final").is_dir()
    assert not (tmp_path / "~").exists()
    assert main(["report", "~/runs/tilde", "--out", "~/report"]) == 0
    assert (home / "report" / "index.html").is_file() and not (tmp_path / "~").exists()


# --- 2. seeds -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", ["-1", str(2**40)])
def test_an_out_of_range_seed_is_refused_before_any_work(tmp_path, tiny_model_dir, capsys, seed):
    out = tmp_path / "run"
    assert main(train_args(out, tiny_model_dir, f"--seed={seed}")) == 2
    assert _last_line(capsys) == (
        "molf: error: --seed must be in [0, 4294967295] (the range numpy, torch and random "
        f"all accept), got {seed}"
    )
    assert not out.exists()


# --- 8. SIGTERM after training ------------------------------------------------------


def _logged_last_step(run: Path, step: int) -> bool:
    try:
        lines = (run / "train_log.jsonl").read_text().splitlines()
    except OSError:
        return False
    return any(f'"step": {step},' in line for line in lines)


def test_sigterm_during_the_final_evaluation_exits_130_and_resume_finishes(
    tmp_path, tiny_model_dir
):
    """The last step is logged, the run evaluates 400 edits: SIGTERM then used to kill
    it (exit 143, no hint). Now it stops with exit 130 and the resume hint, keeps its
    checkpoint, leaves no temporary, and --resume finishes it."""
    run = tmp_path / "run"
    facts = write_fact_file(tmp_path / "facts.json", 1000)  # about 500 are val edits
    argv = train_args(run, tiny_model_dir, "--data", str(facts), "--max-train-samples", "400",
                      "--max-eval-samples", "400", "--save-steps", "1")  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "molf", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not _logged_last_step(run, 2) and proc.poll() is None:
            assert time.monotonic() < deadline, "the run never logged its last step"
            time.sleep(0.05)
        time.sleep(0.5)  # into the final checkpoint or evaluation
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    line = err.strip().splitlines()[-1]
    assert proc.returncode == 130, err[-3000:]
    # after 0.5 s it evaluates; on a slow machine it may still be writing checkpoint-2
    stages = ("the evaluation after training", "the checkpoint of the last step")
    assert any(f"molf: interrupted (SIGTERM) during {s}; " in line for s in stages), line
    assert "; continue with --resume (from checkpoint-" in line, line
    assert not (run / "final").exists()
    assert not _leftovers(run)
    assert main([*argv, "--resume"]) == 0
    assert (run / "final").is_dir() and "after" in json.loads((run / "eval.json").read_text())


# --- 10. the Hub --------------------------------------------------------------------


def test_a_malformed_repo_id_is_refused_before_training(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token either: the id
    monkeypatch.delenv("HF_TOKEN", raising=False)  # is checked first
    out = tmp_path / "run"
    assert main(train_args(out, tiny_model_dir, "--push-to-hub", "me/not a name")) == 2
    line = _last_line(capsys)
    assert "--push-to-hub 'me/not a name': not a Hub repo id" in line, line
    assert not out.exists()


def _offline_hub_env(tmp_path: Path) -> dict[str, str]:
    """The real Hub client pointed at a closed local port, with a dummy token: every
    request fails at once, and nothing can reach the internet."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(
        HF_ENDPOINT="http://127.0.0.1:9",
        HF_TOKEN="hf_dummy",
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    return env


def test_an_upload_that_fails_is_one_line_and_molf_push_retries(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    env = _offline_hub_env(tmp_path)
    done = _molf(*train_args(run, tiny_model_dir, "--push-to-hub", "me/molf-facts"), env=env)
    assert done.returncode == 1, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("molf: error: --push-to-hub me/molf-facts: upload failed ("), line
    assert f"the model is saved in {run / 'final'}" in line
    assert f"retry with molf push {run} --push-to-hub me/molf-facts" in line, line
    assert (run / "final" / "model.safetensors").is_file()
    before = {k: v for k, v in tree(run).items() if k != ".molf.lock"}  # holds a pid

    again = _molf("push", str(run), env=env)  # the run's own repo id, from its config.yaml
    assert again.returncode == 1 and again.stderr.strip().splitlines()[-1] == line
    other = _molf("push", str(run), "--push-to-hub", "me/other", env=env)
    assert other.returncode == 1 and "retry with molf push" in other.stderr
    bad = _molf("push", str(run), "--push-to-hub", "nobody", env=env)
    assert bad.returncode == 2 and "not a Hub repo id" in bad.stderr
    missing = _molf("push", str(tmp_path / "nope"), env=env)
    assert missing.returncode == 2 and "is not a run directory" in missing.stderr
    after = {k: v for k, v in tree(run).items() if k != ".molf.lock"}
    assert after == before  # pushing never changes the run


# --- 4. a full or read-only disk ----------------------------------------------------


def test_a_full_disk_during_a_checkpoint_says_how_to_go_on(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    """torch.save fills the disk while writing checkpoint-2: one line naming it, exit 1,
    nothing half-written; the earlier checkpoint is kept and --resume finishes."""
    run = tmp_path / "run"
    argv = train_args(run, tiny_model_dir, "--save-steps", "1")
    real_save = torch.save

    def fill_disk(obj, f, *a, **kw):
        if "checkpoint-2" in str(f):
            Path(f).write_bytes(b"\0" * 4096)  # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", fill_disk)
    assert main(argv) == 1
    line = _last_line(capsys)
    assert line == (
        f"molf: error: No space left on device while writing {run / 'checkpoint-2'}; nothing "
        "half-written was kept: free some space, then continue with --resume (from "
        "checkpoint-1)"
    )
    assert not _leftovers(run) and not (run / "checkpoint-2").exists()
    monkeypatch.undo()
    assert main([*argv, "--resume"]) == 0 and (run / "final").is_dir()


def test_a_read_only_disk_during_the_final_save_is_exit_2_naming_the_path(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    """The file system turns read-only while final/ is written (safetensors, inside
    save_pretrained): exit 2 naming final/, the checkpoint kept, --resume finishes."""
    import transformers.modeling_utils

    run = tmp_path / "run"

    def read_only(tensors, filename, *a, **kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), filename)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", read_only)
    assert main(train_args(run, tiny_model_dir, "--method", "fft")) == 2
    assert _last_line(capsys) == (
        f"molf: error: --output-dir: cannot write {run / 'final'}: read-only file system; "
        "make it writable and continue with --resume (from checkpoint-2), or give a "
        "writable --output-dir"
    )
    assert not _leftovers(run) and not (run / "final").exists()
    monkeypatch.undo()
    assert main(train_args(run, tiny_model_dir, "--method", "fft", "--resume")) == 0


def _mount_tmpfs(path: Path, size: str) -> bool:
    """A tiny real file system at ``path`` (needs root and mount; False otherwise)."""
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)  # fmt: skip
    return done.returncode == 0


def test_a_really_full_disk_is_one_line_whichever_writer_hits_it(tmp_path, tiny_model_dir, capsys):
    """On a real 256 KB file system (less than one checkpoint of the tiny model: its
    weights and two Adam moments, 128 KB each) torch.save fails with its own
    RuntimeError (no errno): still one line, exit 1, naming the checkpoint, nothing left
    behind."""
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "256k"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        run = small / "run"
        assert main(train_args(run, tiny_model_dir)) == 1
        line = _last_line(capsys)
        assert line.startswith("molf: error: No space left on device while writing "), line
        assert str(run / "checkpoint-2") in line and "start the run again" in line, line
        assert not _leftovers(run)
    finally:
        gc.collect()  # torch's writer, kept alive by the failure's traceback, holds a file
        subprocess.run(["umount", "--lazy", str(small)], check=True)


# --- 6, 5. damaged predictions and logs ---------------------------------------------


def test_a_predictions_file_that_is_not_jsonl_is_named_with_its_line(
    tmp_path, tiny_model_dir, capsys
):
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(tiny_model_dir), "--task", "fact", "--data", "builtin",
            "--max-eval-samples", "4", "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    predictions = out / "predictions.jsonl"
    lines = predictions.read_text().splitlines()
    predictions.write_text("\n".join([lines[0], lines[1][:-9], *lines[2:]]) + "\n")
    assert main(argv) == 2
    line = _last_line(capsys)
    assert line.startswith(f"molf: error: {predictions}:2: not valid JSON ("), line


def test_a_log_that_is_not_utf8_is_named_by_resume_and_report(tmp_path, tiny_model_dir, capsys):
    run = tmp_path / "run"
    argv = train_args(run, tiny_model_dir, "--max-steps", "3", "--save-steps", "1")
    assert main(argv) == 0
    log = run / "train_log.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(lines[0] + lines[1].replace(b'"loss"', b'"lo\xffss"') + lines[2])
    assert main(["report", str(run)]) == 2
    assert _last_line(capsys).startswith(f"molf: error: {log}:2: not UTF-8 text (byte 0xff)")
    shutil.rmtree(run / "checkpoint-3")  # resume from checkpoint-2: the log is truncated
    (run / "final").rename(tmp_path / "final")
    assert main([*argv, "--resume"]) == 2
    line = _last_line(capsys)
    assert line.startswith(f"molf: error: {log}:2: not UTF-8 text (byte 0xff); "), line


# --- 7. a broken chat template ------------------------------------------------------


def test_a_chat_template_that_raises_is_one_line_before_training(tmp_path, tiny_model_dir, capsys):
    model = tmp_path / "templated"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('needs a system turn') }}"
        "{% endif %}\n"
    )
    out = tmp_path / "run"
    argv = train_args(out, tiny_model_dir)
    argv[argv.index("--model") + 1] = str(model)
    assert main(argv) == 2
    assert _last_line(capsys) == (
        f"molf: error: the chat template of {model} fails ({model}/chat_template.jinja:2: "
        "TemplateError: needs a system turn); fix the template, or use raw text with "
        "--chat-template none"
    )
    assert main([*argv, "--chat-template", "none"]) == 0


def test_a_sweep_file_alias_bomb_and_a_missing_launcher_are_one_line(tmp_path, capsys):
    from molf.sweep import main as sweep_main

    bomb = tmp_path / "bomb.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb.write_text("\n".join(lines) + "\n")
    assert sweep_main([str(bomb), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "alias" in err[0]
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(
        f"output_dir: {tmp_path / 'runs'}\nlauncher: no-such-launcher-molf\n"
        "models: {tiny: {model: smollm2-135m}}\ntasks: {fact: {data: builtin}}\n"
        "methods: {fft: {lr: [1e-4]}}\nseeds: [0]\n"
    )
    assert sweep_main([str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "launcher: cannot run 'no-such-launcher-molf'" in err[-1]
