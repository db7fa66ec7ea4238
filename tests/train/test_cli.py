"""The `molf train` / `molf eval` command line: settings from flags and YAML, its help,
bad input as one message and exit 2, and `molf eval` of a finished run."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import yaml

import molf
from molf.cli import main
from molf.train.args import EVAL_FLAGS, FLAG_GROUPS, TrainArgs, choices

from .conftest import train_run


def test_eval_of_a_run_scores_the_runs_own_records(tmp_path, tiny_model_dir, capsys):
    data = "builtin"
    out = train_run(
        tmp_path, "run", "--model", str(tiny_model_dir), "--data", data, "--max-steps", "2"
    )
    evals = json.loads((out / "eval.json").read_text())
    # predictions.jsonl: one line per contest, its correct flags average to each metric
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    for stage in ("before", "after"):
        for metric, value in evals[stage].items():
            flags = [x["correct"] for x in lines if x["stage"] == stage and x["metric"] == metric]
            if flags:  # first-token variants share the lines of their metric
                assert sum(flags) / len(flags) == pytest.approx(value), (stage, metric)
    assert main(["eval", "--run", str(out), "--output-dir", str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "eval.json").read_text())["after"]
    assert again == pytest.approx(evals["after"], abs=1e-6)
    capsys.readouterr()
    # the run's model on edits it never saw: efficacy is not what it measures, say so
    assert main(["eval", "--model", str(out / "final"), "--task", "fact", "--data", data,
                 "--max-eval-samples", "20"]) == 0  # fmt: skip
    assert "trained on other edits" in capsys.readouterr().out


def test_jsonl_task_and_yaml_config(tmp_path, tiny_model_dir):
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Tom has {i} cats. Tom has", "completion": f" {i} cats."}) + "\n"
            for i in range(6)
        )
    )
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_model_dir),
                "task": "jsonl",
                "data": str(data),
                "method": "molf-e",
                "max_steps": 2,
                "lr": 0.5,
                "eval_on_train": True,  # 6 rows: too few to hold some out reliably
            }
        )
    )
    out = tmp_path / "runs" / "j"
    assert (
        main(
            [
                "train",
                "--config",
                str(cfg),
                "--lr",
                "1e-3",
                "--output-dir",
                str(out),
                "--lora-ranks",
                "4",
                "--lora-alphas",
                "8",
            ]
        )
        == 0
    )
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["lr"] == 1e-3 and config["method"] == "molf-e"  # flags win over YAML
    assert {"exact_match", "mean_logprob"} <= set(
        json.loads((out / "eval.json").read_text())["after"]
    )


def _fails(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_input_is_one_clear_message_and_exit_2(tmp_path, tiny_model_dir, capsys):
    base = ["train", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "r")]
    _fails(capsys, [*base, "--task", "poems"], "--task", "poems", "fact, med, sql, jsonl")
    _fails(capsys, [*base, "--method", "qlora"], "--method", "qlora")
    _fails(
        capsys,
        ["train", "--model", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "r")],
        "--model",
        "does not exist",
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    _fails(capsys, [*base, "--task", "jsonl", "--data", str(bad)], f"{bad}:2", "completion")
    _fails(capsys, [*base, "--max-train-samples", "0", "--data", "builtin"], "--max-train-samples")
    ctx = tmp_path / "sql.jsonl"
    good = {"sql_prompt": "How many?", "sql_context": "CREATE TABLE t (a INT);", "sql": "SELECT 1"}
    rows = [good] * 4 + [{**good, "sql_context": "CREATE TABLE t ("}] * 6
    ctx.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _fails(capsys, [*base, "--task", "sql", "--data", str(ctx)], "sql.jsonl:", "context")
    err = _fails(capsys, [*base, "--data", "builtin", "--lora-ranks", "128"], "--lora-ranks [128]")
    assert "lora_ranks" not in err and "--target-modules" in err
    _fails(capsys, [*base, "--lora-ranks", "4,x"], "--lora-ranks")
    # method settings are checked before the model loads, in the flags' words
    err = _fails(
        capsys, [*base, "--data", "builtin", "--top-k", "3", "--lora-ranks", "4"], "--top-k"
    )
    assert "top_k" not in err
    _fails(
        capsys,
        [*base, "--data", "builtin", "--method", "lora", "--target-modules", "nope_proj"],
        "--method lora",
        "nope_proj",
    )
    _fails(capsys, [*base, "--data", "builtin", "--method", "lora", "--lora-dropout", "1.5"],
           "--lora-dropout")  # fmt: skip
    for bad_value in (["--lr", "nan"], ["--epochs", "inf"], ["--max-grad-norm", "nan"]):
        _fails(capsys, [*base, "--data", "builtin", *bad_value], bad_value[0], "finite")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in tiny_model_dir.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes())
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _fails(capsys, ["train", "--model", str(truncated), "--output-dir", str(tmp_path / "r"),
                    "--data", "builtin"], "truncated or corrupt")  # fmt: skip
    yaml_steps = tmp_path / "steps.yaml"
    yaml_steps.write_text("max_steps: 2.7\n")
    _fails(capsys, [*base, "--config", str(yaml_steps)], "--max-steps", "2.7")
    assert not (tmp_path / "r").exists(), "a failed run left a half-written directory"

    out = train_run(
        tmp_path, "taken", "--model", str(tiny_model_dir), "--data", "builtin", "--max-steps", "1"
    )
    _fails(
        capsys,
        ["train", "--model", str(tiny_model_dir), "--data", "builtin", "--output-dir", str(out)],
        "already holds a run",
        "--resume",
        "--overwrite",
    )
    _fails(
        capsys,
        [
            "train",
            "--model",
            str(tiny_model_dir),
            "--data",
            "builtin",
            "--output-dir",
            str(out),
            "--resume",
        ],
        "no checkpoint",
    )


def _help_entries(text: str) -> dict[str, str]:
    """``--help`` output as {flag: its help text}, each option line with the lines that
    continue it (argparse indents options by two spaces and their help further)."""
    entries: dict[str, str] = {}
    flags: list[str] = []
    for line in text.splitlines():
        if re.match(r"  -", line):  # a new option: its flags, maybe its help's first words
            options, *first = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            flags = re.findall(r"(?<![\w-])--?[a-z][a-z0-9-]*", options)
            for flag in flags:
                entries[flag] = " ".join(first)
        elif flags and line.startswith("   "):
            for flag in flags:
                entries[flag] += " " + line.strip()
        else:
            flags = []
    return entries


def test_help_explains_every_flag(capsys):
    """Every TrainArgs field is a flag of `molf train --help`, in one topic group, shown
    with its own help text (from the field's metadata, which must not be empty), its
    choices, and its default at most once (always, when it has one)."""
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    entries = _help_entries(text)
    fields = dataclasses.fields(TrainArgs)
    flags = {f.name: "--" + f.name.replace("_", "-") for f in fields}
    negated = {"--no-" + flags[f.name][2:] for f in fields if str(f.type).startswith("bool")}
    assert set(entries) == {*flags.values(), *negated, "--config", "-h", "--help"}
    grouped = [name for names in FLAG_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(flags), "every field in exactly one group"
    for title in FLAG_GROUPS:
        assert f"\n{title}:\n" in text, title
    squash = lambda text: "".join(text.split())  # noqa: E731  (argparse re-wraps the text)
    allowed = choices()
    for f in fields:
        flag, explained = flags[f.name], f.metadata.get("help", "").strip()
        assert len(explained.split()) >= 2, f"{flag}: no help text in TrainArgs.{f.name}"
        assert squash(explained) in squash(entries[flag]), (flag, entries[flag])
        assert entries[flag].count("default") <= 1, (flag, entries[flag])
        if f.default is not None:
            assert "(default:" in entries[flag], (flag, entries[flag])
        if f.name in allowed:
            assert f"{flag} {{{','.join(allowed[f.name])}}}" in text, flag
    assert squash("flags win over it") in squash(entries["--config"])


def test_eval_help_lists_only_evaluation_flags_and_version_is_printed(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    entries = _help_entries(capsys.readouterr().out)
    wanted = {"--" + name.replace("_", "-") for name in EVAL_FLAGS}
    assert {e for e in entries if not e.startswith("--no-")} == {
        *wanted,
        "--run",
        "--config",
        "-h",
        "--help",
    }
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"molf {molf.__version__}"
