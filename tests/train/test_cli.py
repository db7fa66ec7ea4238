"""End-to-end `molf train` / `molf eval` runs: every method, every task, resume, bad input."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import molf
import molf.layer
from molf.cli import main
from molf.tasks.sql.text import is_valid_sql, parse_trees
from molf.train import checkpoint as checkpoint_module
from molf.train.args import EVAL_FLAGS, FLAG_GROUPS, TrainArgs, choices

QUICK = [
    "--max-train-samples",
    "8",
    "--max-eval-samples",
    "6",
    "--batch-size",
    "4",
    "--eval-batch-size",
    "8",
    "--max-new-tokens",
    "4",
    "--lora-ranks",
    "4,8",
    "--lora-alphas",
    "8,8",
    "--lr",
    "1e-3",
]


def _train(tmp_path: Path, name: str, *extra: str) -> Path:
    out = tmp_path / "runs" / name
    assert main(["train", "--output-dir", str(out), *QUICK, *extra]) == 0
    return out


@pytest.mark.parametrize("method", ["fft", "lora", "dora", "adalora", "molf", "molf-e"])
def test_every_method_trains_and_writes_the_run_dir(tmp_path, tiny_model_dir, method):
    out = _train(
        tmp_path,
        method,
        "--model",
        str(tiny_model_dir),
        "--task",
        "fact",
        "--data",
        "builtin",
        "--method",
        method,
        "--max-steps",
        "3",
    )
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"] == method and config["lora_ranks"] == [4, 8]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", "step_time"} <= r.keys() for r in log)
    evals = json.loads((out / "eval.json").read_text())
    assert (
        set(evals["before"])
        == set(evals["after"])
        == {
            f"{metric}{variant}"
            for metric in ("efficacy", "generalization", "specificity")
            for variant in ("", "_first_token")
        }
        | {"efficacy_margin"}
    )
    final = out / "final"
    adapter = method in ("lora", "dora", "adalora", "molf-e")
    assert (final / "adapter_config.json").exists() == adapter
    assert (final / "config.json").exists() == (not adapter)
    assert (final / "tokenizer.json").exists()
    routing = out / "routing.jsonl"
    assert routing.exists() == method.startswith("molf")
    if routing.exists():
        lines = [json.loads(x) for x in routing.read_text().splitlines()]
        assert lines[0]["experts"] == (["fft"] if method == "molf" else []) + ["lora0", "lora1"]
        assert [x["step"] for x in lines[1:]] == [1, 2, 3]
        assert all(len(w) == 1 for w in lines[1]["winners"])
    rows = list(csv.DictReader(open(tmp_path / "runs" / "results.csv")))
    assert rows[-1]["method"] == method and rows[-1]["primary_metric"] == "efficacy"
    # the final artifact evaluates to the same metrics through `molf eval`
    assert (
        main(
            [
                "eval",
                "--model",
                str(final),
                "--task",
                "fact",
                "--data",
                "builtin",
                "--max-train-samples",
                "8",
                "--max-eval-samples",
                "6",
                "--output-dir",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    again = json.loads((tmp_path / "ev" / "eval.json").read_text())["after"]
    for k, v in evals["after"].items():  # shares exactly; a log-prob margin to rounding
        assert again[k] == pytest.approx(v, abs=1e-5 if k.endswith("_margin") else 1e-6), k


def test_the_model_card_records_method_routing_and_metrics(tmp_path, tiny_model_dir):
    data = "builtin"
    out = _train(
        tmp_path, "card", "--model", str(tiny_model_dir), "--data", data, "--method", "molf-e",
        "--max-steps", "3",
    )  # fmt: skip
    card = (out / "final" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == str(tiny_model_dir) and front["library_name"] == "peft"
    assert "MoLF-Efficient" in card and "4+8" in card
    routing = [json.loads(x) for x in (out / "routing.jsonl").read_text().splitlines()]
    wins = sum(len(w) for r in routing[1:] for w in r["winners"] if w == [0])
    share = wins / (len(routing[0]["modules"]) * 3)
    assert f"lora0 {share:.0%}" in card
    after = json.loads((out / "eval.json").read_text())["after"]
    assert "| efficacy | " in card and f"{after['efficacy']:.4f} |" in card


def test_eval_of_a_run_scores_the_runs_own_records(tmp_path, tiny_model_dir, capsys):
    data = "builtin"
    out = _train(
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


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_tiny_random_architectures(tmp_path, tiny_dir, arch):
    out = _train(
        tmp_path,
        arch,
        "--model",
        str(tiny_dir(arch)),
        "--data",
        "builtin",
        "--max-steps",
        "2",
        "--method",
        "molf",
        "--top-k",
        "2",
        "--lora-ranks",
        "4",
        "--lora-alphas",
        "8",
    )
    assert (out / "final" / "model.safetensors").exists()  # --max-length 512 > 256 positions


@pytest.mark.parametrize(
    ("task", "data", "metrics"),
    [
        ("med", "medmcqa/dev.jsonl", {"accuracy", "generation_accuracy"}),
        ("sql", "spider/dev.json", {"executes", "exact_match", "valid_sql"}),
    ],
)
def test_paper_tasks_on_local_files(tmp_path, stories, shared_data, task, data, metrics):
    out = _train(
        tmp_path,
        task,
        "--model",
        str(stories),
        "--task",
        task,
        "--data",
        str(shared_data / data),
        "--max-steps",
        "2",
        "--max-length",
        "256",
    )
    evals = json.loads((out / "eval.json").read_text())
    assert metrics <= set(evals["before"]) and metrics <= set(evals["after"])
    # Each metric is the share of the 6 evaluated records that their own lines in
    # predictions.jsonl count as hits, and those flags agree with the recorded outputs.
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    if task == "med":
        flags = {"accuracy": "correct", "generation_accuracy": "generation_correct"}
    else:
        flags = {"exact_match": "correct", "executes": "executes"}
    for stage in ("before", "after"):
        rows = [x for x in lines if x["stage"] == stage]
        assert len(rows) == 6, (stage, len(rows))
        for metric, flag in flags.items():
            share = sum(bool(r[flag]) for r in rows) / len(rows)
            assert evals[stage][metric] == pytest.approx(share), (stage, metric)
        for r in rows:
            if task == "med":  # the best-scored letter (ties: the first) is the answer
                best = max(r["scores"], key=r["scores"].get)
                assert r["correct"] == (best == r["reference"]), r
            else:
                assert r["correct"] <= is_valid_sql(r["sql"]), r  # a match is valid SQL
        if task == "sql":  # the parse-based shares, from each record's cleaned SQL
            valid = sum(is_valid_sql(r["sql"]) for r in rows) / len(rows)
            assert evals[stage]["valid_sql"] == pytest.approx(valid), stage
            unparsable = sum(parse_trees(r["sql"]) is None for r in rows) / len(rows)
            assert evals[stage]["unparsable"] == pytest.approx(unparsable), stage


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


class Crash(Exception):
    pass


@pytest.mark.parametrize("method", ["molf", "lora", "adalora"])
def test_resume_ends_with_the_uninterrupted_weights(tmp_path, tiny_model_dir, method, monkeypatch):
    args = [
        "--model",
        str(tiny_model_dir),
        "--data",
        "builtin",
        "--method",
        method,
        "--max-steps",
        "6",
        "--save-steps",
        "3",
        "--grad-accum",
        "2",
        "--lora-dropout",
        "0.1",
        "--eval-before",
    ]
    full = _train(tmp_path, "full", *args)

    real_save = checkpoint_module.save_checkpoint

    def save_then_crash(*a, **kw):
        real_save(*a, **kw)
        raise Crash  # the process dies right after writing checkpoint-3

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        _train(tmp_path, "cut", *args)
    monkeypatch.setattr(checkpoint_module, "save_checkpoint", real_save)
    cut = tmp_path / "runs" / "cut"
    assert (cut / "checkpoint-3").is_dir() and not (cut / "final").exists()
    assert main(["train", "--output-dir", str(cut), *QUICK, *args, "--resume"]) == 0
    name = "model.safetensors" if method == "molf" else "adapter_model.safetensors"
    a, b = load_file(full / "final" / name), load_file(cut / "final" / name)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(x)["step"] for x in (cut / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


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

    out = _train(
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


def test_chat_data_trains_on_the_reply_through_the_models_template(tmp_path, tiny_model_dir):
    """`{"messages": [...]}` rows with a model whose tokenizer has a chat template: the
    run trains and evaluates, and the template's text reaches the predictions."""
    model = tmp_path / "chat-model"
    model.mkdir()
    for f in tiny_model_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Say {w}."},
                {"role": "assistant", "content": w},
            ]
        }
        for w in ("cat", "dog", "sun", "tree")
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = _train(
        tmp_path, "chat", "--model", str(model), "--task", "jsonl", "--data", str(data),
        "--method", "lora", "--lora-ranks", "4", "--lora-alphas", "8", "--max-new-tokens", "2",
    )  # fmt: skip
    assert yaml.safe_load((out / "config.yaml").read_text())["chat_template"] == "auto"
    predictions = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert {p["reference"] for p in predictions} == {"cat", "dog", "sun", "tree"}
    assert all(p["prompt"][0]["role"] == "user" for p in predictions)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert log and all(math.isfinite(x["loss"]) for x in log)
    # without the template the same data is refused with one clear line
    assert main(["train", "--output-dir", str(tmp_path / "runs" / "plain"), *QUICK,
                 "--model", str(model), "--task", "jsonl", "--data", str(data),
                 "--chat-template", "none"]) == 2  # fmt: skip


def test_amp_bf16_keeps_every_small_update_that_pure_bf16_loses(tmp_path, tiny_model_dir, capsys):
    """At lr 5e-5 an Adam step moves a weight by about 5e-5, below bf16's resolution for
    most weights: pure bf16 drops those updates, amp-bf16 (fp32 weights, bf16 compute)
    keeps every one, and its forward really runs in bf16 (its loss differs from fp32's)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    common = ["--model", str(tiny_model_dir), "--data", "builtin", "--method", "fft",
              "--lr", "5e-5", "--max-steps", "3", "--no-eval-before",
              "--max-eval-samples", "2"]  # fmt: skip
    changed, first_loss = {}, {}
    for dtype in ("fp32", "bf16", "amp-bf16"):
        out = _train(tmp_path, dtype, *common, "--dtype", dtype)
        weight = load_file(out / "final" / "model.safetensors")[name]
        start = base[name].to(weight.dtype)
        changed[dtype] = (weight != start).float().mean().item()
        log = (out / "train_log.jsonl").read_text().splitlines()
        first_loss[dtype] = json.loads(log[0])["loss"]
    assert "--dtype amp-bf16" in capsys.readouterr().out  # pure bf16 warns
    assert changed["fp32"] == 1.0 and changed["amp-bf16"] == 1.0
    assert changed["bf16"] < 0.5, changed
    assert first_loss["amp-bf16"] != first_loss["fp32"]
    assert abs(first_loss["amp-bf16"] - first_loss["fp32"]) < 0.05 * first_loss["fp32"]


def test_compile_trains_without_graph_breaks_and_like_eager(tmp_path, tiny_model_dir):
    """`--compile`: dynamo traces every MoLF layer, forward and backward, in one graph
    per shape (the eager backend keeps the suite fast; inductor compiles the same
    graphs), and the weights match an eager run's."""
    import torch._dynamo

    args = ["--model", str(tiny_model_dir), "--data", "builtin", "--max-steps", "2",
            "--lora-ranks", "4,8", "--lora-alphas", "8,8", "--no-eval-before",
            "--max-eval-samples", "2"]  # fmt: skip
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    molf.layer._scratch.__dict__.clear()  # as in a fresh process: no CPU workspace yet
    compiled = _train(tmp_path, "compiled", *args, "--compile", "--compile-backend", "eager")
    eager = _train(tmp_path, "eager", *args)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert not torch._dynamo.utils.counters["graph_break"], dict(
        torch._dynamo.utils.counters["graph_break"]
    )
    a = load_file(eager / "final" / "model.safetensors")
    b = load_file(compiled / "final" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
