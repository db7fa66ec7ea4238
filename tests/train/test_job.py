"""Whole training runs (molf.train.job.TrainJob through `molf train`): every method and
architecture writes its run directory and model, the paper tasks run end to end, a
resumed run ends with the uninterrupted weights, chat data, dtypes and --compile."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

import molf
import molf.layer
from molf.cli import main
from molf.tasks.sql.text import is_valid_sql, parse_trees
from molf.train import checkpoint as checkpoint_module

from .conftest import QUICK, train_run


@pytest.mark.parametrize("method", ["fft", "lora", "dora", "adalora", "molf", "molf-e"])
def test_every_method_trains_and_writes_the_run_dir(tmp_path, tiny_model_dir, method):
    out = train_run(
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
    out = train_run(
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


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_tiny_random_architectures(tmp_path, tiny_dir, arch):
    out = train_run(
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
    out = train_run(
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
    full = train_run(tmp_path, "full", *args)

    real_save = checkpoint_module.save_checkpoint

    def save_then_crash(*a, **kw):
        real_save(*a, **kw)
        raise Crash  # the process dies right after writing checkpoint-3

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        train_run(tmp_path, "cut", *args)
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


def test_chat_data_trains_on_the_reply_through_the_models_template(
    tmp_path, tiny_model_dir, capsys
):
    """`{"messages": [...]}` rows with a model whose tokenizer has a chat template: the
    run trains and evaluates (on its four training rows: --eval-on-train), and the
    template's text reaches the predictions."""
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
    out = train_run(
        tmp_path, "chat", "--model", str(model), "--task", "jsonl", "--data", str(data),
        "--method", "lora", "--lora-ranks", "4", "--lora-alphas", "8", "--max-new-tokens", "2",
        "--eval-on-train",
    )  # fmt: skip
    assert yaml.safe_load((out / "config.yaml").read_text())["chat_template"] == "auto"
    predictions = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert {p["reference"] for p in predictions} == {"cat", "dog", "sun", "tree"}
    assert all(p["prompt"][0]["role"] == "user" for p in predictions)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert log and all(math.isfinite(x["loss"]) for x in log)
    # without the template the same data is refused with one clear line
    capsys.readouterr()
    assert main(["train", "--output-dir", str(tmp_path / "runs" / "plain"), *QUICK,
                 "--model", str(model), "--task", "jsonl", "--data", str(data),
                 "--eval-on-train", "--chat-template", "none"]) == 2  # fmt: skip
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "needs the model's chat template" in line and "--chat-template none" in line, line


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
        out = train_run(tmp_path, dtype, *common, "--dtype", dtype)
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
    compiled = train_run(tmp_path, "compiled", *args, "--compile", "--compile-backend", "eager")
    eager = train_run(tmp_path, "eager", *args)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert not torch._dynamo.utils.counters["graph_break"], dict(
        torch._dynamo.utils.counters["graph_break"]
    )
    a = load_file(eager / "final" / "model.safetensors")
    b = load_file(compiled / "final" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
