"""``molf sweep`` mixes nothing silently (issue 20, item 2).

- a cell's result is tied to the content of its data and model (``data_hash``,
  ``model_hash``): changed data or a changed model makes its row or run dir stale and
  refused, a moved copy of the same data does not, and a row from before the columns
  is accepted and gets them;
- summary.csv is read robustly (BOM, CRLF, quoted commas and line breaks) and a cell
  named twice is refused, not resolved;
- one sweep per output dir (``.molf.sweep.lock``): a second exits 2 naming the holder;
- killing the sweep (SIGTERM, SIGINT, even SIGKILL) stops its ``molf train`` child.

No model is trained: the sweep's launcher is a tiny Python script (:data:`FAKE`) that
either records a finished run through molf's own writers or sleeps until stopped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from molf.atomic import write_text_atomic
from molf.errors import MolfError
from molf.ownership import is_internal
from molf.sweep import inputs as inputs_mod
from molf.sweep import main
from molf.sweep.inputs import data_hash, model_hash, model_identity, template_hash
from molf.sweep.process import LOCK_FILE, SweepLock
from molf.sweep.results import read_summary, write_summary

CELL = "tiny/fact/lora/lr1e-03/test-s0"  # the one cell of the fake sweep
# `molf train --config D.yaml`, faked: "ok" records a finished run (config.yaml and
# eval.json, through molf's writers, as molf train does); "sleep" writes its pid and
# sleeps until SIGTERM, which it records before exiting.
FAKE = """\
import json, os, signal, sys, time
from pathlib import Path

import yaml

mode, state = sys.argv[1], Path(sys.argv[2])
settings = yaml.safe_load(Path(sys.argv[sys.argv.index("--config") + 1]).read_text())
if mode == "sleep":
    def stop(signum, frame):
        (state / "child.terminated").write_text(str(signum))
        sys.exit(143)

    signal.signal(signal.SIGTERM, stop)
    (state / "child.pid.tmp").write_text(str(os.getpid()))
    os.replace(state / "child.pid.tmp", state / "child.pid")
    while True:
        time.sleep(0.05)
from molf.atomic import write_text_atomic

run_dir = Path(settings["output_dir"])
write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(settings))
result = {"after": {"efficacy": settings["lr"]}, "train_seconds": 0.01}
write_text_atomic(run_dir / "eval.json", json.dumps(result))
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def world(tmp_path) -> Path:
    """A data file, a model directory and the fake launcher, all in ``tmp_path``."""
    (tmp_path / "facts.json").write_text('[{"fact": 1}]')
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "weights.bin").write_bytes(b"\0" * 1000)
    (tmp_path / "fake_train.py").write_text(FAKE)
    (tmp_path / "state").mkdir()
    return tmp_path


def _config(world: Path, mode: str = "ok", name: str = "sweep", **changes) -> Path:
    """A one-cell sweep (one model, task, lr and seed) run by the fake launcher."""
    launcher = [sys.executable, str(world / "fake_train.py"), mode, str(world / "state")]
    cfg = {
        "output_dir": str(world / "out"),
        "launcher": shlex.join(launcher),
        "settings": {"max_steps": 2, "save_model": False},
        "models": {"tiny": {"model": str(world / "model")}},
        "tasks": {"fact": {"data": str(world / "facts.json")}},
        "methods": {"lora": {"lr": 1e-3}},
        "seeds": [0],
        **changes,
    }
    path = world / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _attempts(world: Path) -> int:
    return json.loads((world / "out" / f"{CELL}.sweep.json").read_text())["attempts"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("molf: error: ") and len(err.strip().splitlines()) == 1, err
    return err


def _finished(world: Path, capsys) -> Path:
    """Run the one-cell sweep to the end; its config."""
    cfg = _config(world)
    assert main([str(cfg)]) == 0, capsys.readouterr()
    capsys.readouterr()
    return cfg


# --- data and model identity ----------------------------------------------------------


def test_data_hash_is_the_content_not_the_path(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "elsewhere" / "b.json"
    b.parent.mkdir()
    a.write_text("[1, 2]")
    b.write_text("[1, 2]")
    assert data_hash(str(a)) == data_hash(str(b))
    b.write_text("[1, 3]")
    assert data_hash(str(a)) != data_hash(str(b))
    assert len({data_hash(None), data_hash("builtin"), data_hash(str(a))}) == 3


def test_data_hash_of_a_directory_covers_names_sizes_contents_and_mode(tmp_path):
    def tree(root: Path) -> Path:
        (root / "sub").mkdir(parents=True)
        (root / "dev.json").write_text("[]")
        (root / "sub" / "tables.json").write_text("{}")
        return root

    one, two = tree(tmp_path / "one"), tree(tmp_path / "two")
    same = data_hash(str(one))
    assert data_hash(str(two)) == same  # another place (machine, checkout)
    os.utime(two / "dev.json", (0, 0))
    (two / ".molf-owned.json").write_text("{}")  # hidden entries do not count
    (two / ".git").mkdir()
    (two / ".git" / "HEAD").write_text("x")
    assert data_hash(str(two)) == same
    assert data_hash(f"{one}#by-question") != same  # the split mode is a setting
    (two / "sub" / "tables.json").write_text("{ }")
    assert data_hash(str(two)) != same
    (two / "sub" / "tables.json").write_text("{}")
    (two / "sub" / "tables.json").rename(two / "sub" / "schema.json")
    assert data_hash(str(two)) != same


def test_large_files_are_hashed_by_size_and_ends_once_per_process(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs_mod, "LARGE", 100)
    monkeypatch.setattr(inputs_mod, "EDGE", 10)
    calls = []
    real = inputs_mod._hash_file
    monkeypatch.setattr(inputs_mod, "_hash_file", lambda p, n: calls.append(p) or real(p, n))
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(200)))
    first = data_hash(str(path))
    assert data_hash(str(path)) == first and len(calls) == 1  # cached
    path.write_bytes(bytes(range(100)) + b"\xff" + bytes(range(101, 200)))
    assert data_hash(str(path)) == first  # the middle is not read: size and both ends
    assert len(calls) == 2
    path.write_bytes(bytes(range(199)) + b"\xff")
    assert data_hash(str(path)) != first
    path.write_bytes(bytes(range(201)))
    assert data_hash(str(path)) != first


def test_model_hash_names_packaged_models_and_hashes_local_ones(world):
    identity = model_identity("smollm2-135m", None)
    assert identity[0] in ("packaged", "hub") and (
        identity[1] == "smollm2-135m" or identity[1].startswith("HuggingFaceTB/")
    )
    assert model_hash(None, None) == model_hash("smollm2-135m", None)  # the default model
    assert model_hash("org/name", None) != model_hash("org/other", None)
    assert model_identity(str(world / "no-such-model"), None) == ["missing"]
    local = model_hash(str(world / "model"), None)
    (world / "model" / "weights.bin").write_bytes(b"\1" * 1000)
    assert model_hash(str(world / "model"), None) != local
    (world / "model" / "m.gguf").write_bytes(b"gguf")
    gguf = model_hash(str(world / "model"), "m.gguf")
    (world / "model" / "weights.bin").write_bytes(b"\2" * 1000)  # not the GGUF: no change
    assert model_hash(str(world / "model"), "m.gguf") == gguf


# --- stale rows and run dirs -----------------------------------------------------------


@pytest.mark.slow
def test_changed_data_or_model_makes_finished_results_stale(world, capsys):
    cfg = _finished(world, capsys)
    row = read_summary(world / "out" / "summary.csv")[CELL]
    assert row["data_hash"] == data_hash(str(world / "facts.json"))
    assert row["model_hash"] == model_hash(str(world / "model"), None)
    assert (
        json.loads((world / "out" / f"{CELL}.sweep.json").read_text())["data_hash"]
        == (row["data_hash"])
    )

    moved = world / "moved" / "facts.json"  # the same data elsewhere: still done
    moved.parent.mkdir()
    moved.write_text((world / "facts.json").read_text())
    tasks = {"fact": {"data": str(moved)}}
    assert main([str(_config(world, name="moved", tasks=tasks))]) == 0
    assert _attempts(world) == 1

    (world / "facts.json").write_text('[{"fact": 2}]')  # other data, same path: stale row
    assert main([str(cfg)]) == 2
    err = _one_line_error(capsys)
    assert CELL in err and "other data" in err and "data_hash" in err
    elsewhere = ["--summary", str(world / "elsewhere" / "summary.csv")]
    assert main([str(cfg), *elsewhere]) == 2  # no row: the run dir is refused too
    assert "the run in" in _one_line_error(capsys)
    assert _attempts(world) == 1 and not (world / "elsewhere").exists()

    (world / "facts.json").write_text('[{"fact": 1}]')
    (world / "model" / "weights.bin").write_bytes(b"\1" * 1000)  # another model
    assert main([str(cfg)]) == 2
    assert "other model" in _one_line_error(capsys)
    (world / "model" / "weights.bin").write_bytes(b"\0" * 1000)
    assert main([str(cfg)]) == 0 and _attempts(world) == 1  # restored: done again


@pytest.mark.slow
def test_a_chat_template_file_is_identified_by_its_content_not_its_path(world, capsys):
    template = world / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    settings = {"max_steps": 2, "save_model": False, "chat_template": str(template)}
    cfg = _config(world, settings=settings)
    assert main([str(cfg)]) == 0, capsys.readouterr()
    row = read_summary(world / "out" / "summary.csv")[CELL]
    assert row["template_hash"] == template_hash(str(template))

    moved = world / "moved.jinja"  # the same template elsewhere: still done
    moved.write_text(template.read_text())
    elsewhere = {**settings, "chat_template": str(moved)}
    assert main([str(_config(world, name="moved", settings=elsewhere))]) == 0
    assert _attempts(world) == 1

    template.write_text("{{ messages[0]['content'] }}")  # other template, same path
    assert main([str(cfg)]) == 2
    err = _one_line_error(capsys)
    assert CELL in err and "other chat template" in err and "template_hash" in err
    assert _attempts(world) == 1


def test_template_hash_is_none_for_the_named_templates(tmp_path):
    assert template_hash("auto") is None and template_hash("none") is None
    a, b = tmp_path / "a.jinja", tmp_path / "b.jinja"
    a.write_text("{{ x }}")
    b.write_text("{{ x }}")
    assert template_hash(str(a)) == template_hash(str(b))
    b.write_text("{{ y }}")
    assert template_hash(str(a)) != template_hash(str(b))


@pytest.mark.slow
def test_rows_without_hash_columns_are_accepted_and_get_them(world, capsys):
    """Rows from before data_hash/model_hash (the committed studies) count as done; the
    next rewrite of the summary fills the columns in."""
    cfg = _finished(world, capsys)
    summary = world / "out" / "summary.csv"
    row = read_summary(summary)[CELL]
    legacy = {k: v for k, v in row.items() if k not in ("data_hash", "model_hash")}
    header = ",".join(legacy)
    write_text_atomic(summary, header + "\r\n" + ",".join(legacy.values()) + "\r\n")
    assert "data_hash" not in read_summary(summary)[CELL]
    assert main([str(cfg), "--summary", str(summary)]) == 0
    assert _attempts(world) == 1  # nothing ran
    assert read_summary(summary)[CELL] == row
    assert row["data_hash"] == data_hash(str(world / "facts.json"))


# --- reading summary.csv ---------------------------------------------------------------


def test_read_summary_reads_bom_crlf_and_quoted_fields(tmp_path):
    path = tmp_path / "summary.csv"
    text = (
        "cell,status,run_dir,note\r\n"
        'a/b,ok,"runs/x, y","two\r\nlines"\r\n'
        '"c/d",failed,runs/z,"say ""hi"""\r\n'
        "\r\n"
    )
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    rows = read_summary(path)
    assert list(rows) == ["a/b", "c/d"]
    assert rows["a/b"] == {
        "cell": "a/b",
        "status": "ok",
        "run_dir": "runs/x, y",
        "note": "two\r\nlines",
    }
    assert rows["c/d"]["note"] == 'say "hi"'
    write_summary(tmp_path / "again.csv", rows)  # molf's own writer reads back the same
    again = read_summary(tmp_path / "again.csv")
    assert {name: {k: again[name][k] for k in row} for name, row in rows.items()} == rows


def test_read_summary_refuses_a_duplicated_cell(tmp_path):
    path = tmp_path / "summary.csv"
    path.write_text('cell,status,note\na/b,ok,\nc/d,ok,"two\nlines"\na/b,failed,\n', newline="")
    with pytest.raises(MolfError) as e:
        read_summary(path)
    assert str(e.value).startswith(f"{path}:5: cell a/b appears twice (first on line 2)")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("cell,status\na/b,ok,extra\n", ":2: 3 fields where the header has 2"),
        ("cell,status\na/b\n", ":2: 1 fields where the header has 2"),
        ("name,status\na/b,ok\n", ":1: the header has no 'cell' column"),
        ("cell,lr,lr\na/b,1,2\n", ":1: column 'lr' appears twice"),
        ("cell,status\n,ok\n", ":2: a row without a cell name"),
    ],
)
def test_read_summary_refuses_what_it_cannot_read_unambiguously(tmp_path, text, problem):
    path = tmp_path / "summary.csv"
    path.write_text(text)
    with pytest.raises(MolfError, match="^" + re.escape(f"{path}{problem}")):
        read_summary(path)


def test_read_summary_refuses_text_that_is_not_utf8(tmp_path):
    path = tmp_path / "summary.csv"
    path.write_bytes(b"cell,status\nd\xe9j\xe0,ok\n")
    with pytest.raises(MolfError, match="not UTF-8"):
        read_summary(path)


def test_a_sweep_refuses_a_summary_with_a_duplicated_cell(world, capsys):
    cfg = _config(world)
    summary = world / "out" / "summary.csv"
    write_text_atomic(summary, f"cell,status\n{CELL},ok\n{CELL},failed\n")
    assert main([str(cfg)]) == 2
    err = _one_line_error(capsys)
    assert f"{summary}:3: cell {CELL} appears twice" in err
    assert not (world / "out" / f"{CELL}.sweep.json").exists()  # nothing ran


# --- one sweep at a time, and no cell outliving its sweep --------------------------------


def test_sweep_lock_is_exclusive_internal_and_released(tmp_path):
    assert LOCK_FILE.startswith(".molf.") and is_internal(LOCK_FILE)
    with SweepLock(tmp_path / "out"):
        with pytest.raises(MolfError, match=rf"in use by another molf sweep \(pid {os.getpid()}\)"):
            SweepLock(tmp_path / "out").acquire()
    with SweepLock(tmp_path / "out"):  # released
        pass


@pytest.fixture
def started():
    """Sweeps started as subprocesses (each in its own process group), killed at the end
    with everything in their group, whatever the test did."""
    procs: list[subprocess.Popen] = []

    def start(cfg: Path, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "molf.sweep", str(cfg), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie no longer does)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _child_pid(world: Path, sweep: subprocess.Popen, timeout: float = 60.0) -> int:
    """The pid of the sleeping fake ``molf train`` once it runs."""
    path = world / "state" / "child.pid"
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert sweep.poll() is None, sweep.communicate()
        assert time.monotonic() < deadline, "the sweep started no cell"
        time.sleep(0.05)
    return int(path.read_text())


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_second_sweep_on_the_same_output_dir_exits_2_naming_the_holder(world, started, capsys):
    cfg = _config(world, "sleep")
    first = started(cfg)
    child = _child_pid(world, first)
    second = started(cfg)
    try:
        out, err = second.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the second sweep ran instead of stopping")
    assert second.returncode == 2, out + err
    assert err.strip() == (
        f"molf: error: output_dir: {world / 'out'} is in use by another molf sweep "
        f"(pid {first.pid}); wait for it to end, or stop it and rerun"
    )
    assert main([str(cfg), "--dry-run"]) == 0  # takes no lock
    assert CELL in capsys.readouterr().out
    assert not (world / "out" / "summary.csv").exists()  # no false "failed" row
    assert _alive(child) and first.poll() is None  # the first goes on
    os.kill(first.pid, signal.SIGTERM)
    first.communicate(timeout=60)
    assert not _alive(child)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_killing_the_sweep_stops_its_cell(world, started, sig):
    """SIGTERM and Ctrl-C are passed on to the cell and waited for (it checkpoints and
    exits before the sweep does); a SIGKILLed sweep's cell gets SIGTERM from the kernel."""
    sweep = started(_config(world, "sleep"))
    child = _child_pid(world, sweep)
    os.kill(sweep.pid, sig)  # the sweep only, not its process group
    out, err = sweep.communicate(timeout=90)
    if sig == signal.SIGKILL:
        assert sweep.returncode == -signal.SIGKILL
        deadline = time.monotonic() + 30
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        assert sweep.returncode == 130, out + err
        assert "rerun the same command to continue" in err
    assert not _alive(child), "the cell outlived its sweep"
    assert (world / "state" / "child.terminated").read_text() == str(int(signal.SIGTERM))
    with SweepLock(world / "out"):  # the kernel released the sweep's lock
        pass
