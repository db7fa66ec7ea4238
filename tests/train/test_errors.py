"""Bad input and hostile conditions are one MolfError line, never a traceback (unit
level: the functions that read settings, logs and templates, and the atomic writers).

End-to-end cases through ``molf train`` are in ``tests/adversarial/test_errors.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tracemalloc
from pathlib import Path

import pytest

from molf.atomic import Terminated, atomic_directory, interrupt, replace_dir
from molf.errors import MolfError
from molf.ownership import claim
from molf.train.args import resolve_args
from molf.train.evaluation import write_predictions
from molf.train.export import check_hub_token
from molf.train.logs import RunLogger
from molf.train.stop import SigtermStop
from molf.yamlfile import MAX_NODES, load_yaml


def _bomb(levels: int = 9) -> str:
    """A "billion laughs" YAML document: each anchor repeats the previous one 9 times."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


def _refused(path: Path, *needles: str) -> str:
    with pytest.raises(MolfError) as info:
        load_yaml(path, "--config")
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_yaml_that_is_not_utf8_is_refused_naming_its_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"lr: 1e-3\ntask: caf\xe9\n")
    _refused(path, f"{path}:2", "not UTF-8", "0xe9", "save the file as UTF-8")


def test_deeply_nested_yaml_is_refused_before_python_recursion_runs_out(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("task: " + "[" * 100_000 + "]" * 100_000 + "\n")
    _refused(path, f"{path}:1", "nested more than 20 levels")


def test_an_alias_bomb_is_refused_without_growing_memory(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb())
    tracemalloc.start()
    try:
        message = _refused(path, "aliases expand to more than", str(MAX_NODES))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, peak  # the expanded document would take gigabytes
    line = int(message.split(f"{path}:")[1].split(":")[0])
    assert 1 < line <= 9  # the anchor whose expansion crosses the limit


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("lr: 1\ndata: &d [1, *d]\n")
    _refused(path, f"{path}:2", "refers to the anchor it is inside")


@pytest.mark.parametrize(
    "text, needles",
    [
        ("lr: 1\nseed: [1, 2\nmax_steps: 3\n", [":3:", "not valid YAML"]),
        ("lr: 1\ntask: a\x07b\n", [":2:", "#x0007"]),
        ("seed: " + "1" * 5000 + "\n", [":1:", "cannot read", "correct the value"]),
        ("seed: 2001-13-45\n", [":1:", "month must be in 1..12"]),
        ("- lr\n- seed\n", ["must hold a mapping of settings"]),
    ],
)
def test_other_broken_yaml_is_one_line_naming_the_file(tmp_path, text, needles):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    _refused(path, str(path), *needles)


def test_a_file_over_the_size_limit_is_not_read(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("# " + "x" * 1_100_000 + "\n")
    _refused(path, str(path), "over 1 MB")


def test_anchors_within_the_budget_and_empty_files_still_work(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("base: &b {lr: 1.0e-3, seed: 2}\nrun:\n  <<: *b\n  seed: 3\nother: *b\n")
    assert load_yaml(path, "sweep") == {
        "base": {"lr": 1e-3, "seed": 2},
        "run": {"lr": 1e-3, "seed": 3},
        "other": {"lr": 1e-3, "seed": 2},
    }
    (tmp_path / "empty.yaml").write_text("# nothing set\n")
    assert load_yaml(tmp_path / "empty.yaml", "--config") == {}


def test_a_home_relative_path_is_expanded_from_yaml_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = tmp_path / "run.yaml"
    config.write_text("output_dir: ~/runs/x\ndata: ~/facts.json\nmodel: ~/models/m\n")
    args = resolve_args(str(config), {})
    home = tmp_path / "home"
    assert args.output_dir == str(home / "runs" / "x")
    assert args.data == str(home / "facts.json")
    assert args.model == str(home / "models" / "m")
    args = resolve_args(None, {"output_dir": "~/flag-run", "data": "builtin"})
    assert args.output_dir == str(home / "flag-run") and args.data == "builtin"
    (home).mkdir()
    (home / "c.yaml").write_text("lr: 0.5\n")
    assert resolve_args("~/c.yaml", {}).lr == 0.5  # --config=~/c.yaml: no shell expands it


@pytest.mark.parametrize("seed", [-1, 2**32, 2**40])
def test_a_seed_outside_what_every_rng_accepts_is_refused(seed):
    with pytest.raises(MolfError, match=r"--seed must be in \[0, 4294967295\]"):
        resolve_args(None, {"seed": str(seed)})
    assert resolve_args(None, {"seed": str(2**32 - 1)}).seed == 2**32 - 1


@pytest.mark.parametrize("repo_id", ["nobody", "a/b/c", "/name", "me/bad name", "me/-x-"])
def test_a_malformed_hub_repo_id_is_refused_before_any_work(repo_id, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    with pytest.raises(MolfError, match="not a Hub repo id.*OWNER/NAME"):
        check_hub_token(repo_id)
    check_hub_token("me/smollm2-molf-facts")


def test_sigterm_while_a_directory_is_renamed_into_place_waits_for_the_rename(
    tmp_path, monkeypatch
):
    """A real SIGTERM arriving between replace_dir's renames is raised once the new
    directory is in place: never a moment without final/."""
    final = tmp_path / "final"
    with atomic_directory(final) as tmp:
        (tmp / "v").write_text("1")
    new = tmp_path / ".molf-tmp-final-new"
    new.mkdir()
    (new / "v").write_text("2")
    stop = SigtermStop(tmp_path)
    real_replace = os.replace

    def replace_then_signal(src, dst):
        real_replace(src, dst)
        if Path(dst).name.startswith(".molf-tmp-final-old"):  # the old one moved aside
            signal.raise_signal(signal.SIGTERM)
            assert not final.exists()  # still inside the window: nothing raised yet

    with stop.installed(), monkeypatch.context() as patch:
        patch.setattr(os, "replace", replace_then_signal)
        with pytest.raises(Terminated, match="SIGTERM"):
            replace_dir(new, final)
    assert stop.requested()
    assert (final / "v").read_text() == "2"
    assert not any(p.name.startswith(".molf-tmp") for p in tmp_path.iterdir())


def test_interrupt_outside_a_rename_is_raised_at_once():
    with pytest.raises(Terminated):
        interrupt(lambda: Terminated("now"))


def _log(tmp_path: Path, data: bytes) -> Path:
    log = tmp_path / "train_log.jsonl"
    claim(log)  # a log molf wrote
    log.write_bytes(data)
    return log


def test_log_truncation_names_a_damaged_line_that_is_not_utf8(tmp_path):
    log = _log(tmp_path, b'{"step": 1}\n{"step": 2, "x": "\xff\xfe"}\n{"step": 3}\n')
    with pytest.raises(MolfError, match=rf"{log}:2: not UTF-8 text \(byte 0xff\)"):
        RunLogger(tmp_path, "none", {}).truncate(3)
    log.write_bytes(b'{"step": 1}\n[1, 2]\n{"step": 3}\n')
    with pytest.raises(MolfError, match=rf"{log}:2: not a JSON object"):
        RunLogger(tmp_path, "none", {}).truncate(3)


def test_log_truncation_drops_a_torn_last_line_that_is_not_utf8(tmp_path, capsys):
    log = _log(tmp_path, b'{"step": 1}\n{"step": 2}\n{"step": 3, "x": "\xe2\x82')
    RunLogger(tmp_path, "none", {}).truncate(5)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2]
    assert f"{log}:3: dropping a torn last line" in capsys.readouterr().err


def test_a_predictions_file_that_is_not_jsonl_is_named_with_its_line(tmp_path):
    path = tmp_path / "predictions.jsonl"
    write_predictions(path, "before", [{"prompt": "p", "correct": True}])
    with open(path, "ab") as f:
        f.write(b"not json\n")
    with pytest.raises(MolfError, match=rf"{path}:2: not valid JSON .*move the file away"):
        write_predictions(path, "after", [{"prompt": "p", "correct": False}])
    path.write_bytes(b'{"stage": "before"}\n\xff\n')
    with pytest.raises(MolfError, match=rf"{path}:2: not UTF-8"):
        write_predictions(path, "after", [])


def test_a_predictions_file_molf_did_not_write_is_refused_unread(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text("my own notes\n")
    with pytest.raises(MolfError, match="not written by molf"):
        write_predictions(path, "after", [])
    assert path.read_text() == "my own notes\n"


def _template_model(tmp_path: Path, model: Path, template: str, jinja: bool) -> Path:
    """A copy of the model directory ``model`` with ``template`` as its tokenizer's chat
    template (in tokenizer_config.json, or as chat_template.jinja)."""
    out = tmp_path / "templated"
    shutil.copytree(model, out)
    if jinja:
        (out / "chat_template.jinja").write_text(template)
    else:
        config = json.loads((out / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    "template, jinja, needles",
    [
        (
            "{% for m in messages %}{{ m['content'] }}{% endfor %}\n{{ raise_exception('no') }}",
            False,
            ["tokenizer_config.json, chat_template line 2", "TemplateError: no"],
        ),
        ("line one\n{% if %}\n", True, ["chat_template.jinja:2", "TemplateSyntaxError"]),
        ("a\nb\n{{ messages[7]['content'] }}\n", True, ["chat_template.jinja:3", "Undefined"]),
    ],
)
def test_a_chat_template_that_fails_is_one_line_with_its_error_and_line(
    tmp_path, tiny_model_dir, template, jinja, needles
):
    from molf.tasks.encoding import use_chat_template
    from molf.train.modeling import load_tokenizer

    model = _template_model(tmp_path, tiny_model_dir, template, jinja)
    tokenizer = load_tokenizer(str(model), None)
    with pytest.raises(MolfError) as info:
        use_chat_template(tokenizer, "auto")
    message = str(info.value)
    assert "\n" not in message and "--chat-template none" in message, message
    for needle in needles:
        assert needle in message, message
    assert use_chat_template(tokenizer, "none") is False  # the way out works
