"""`molf eval` never costs a run its record, never reads a run that training is changing,
and never scores a model whose weights do not fill its config (one line, exit 2)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import TINY

from molf.cli import main
from molf.train.rundir import LOCK_FILE, RunLock

QUICK = [
    "--max-train-samples", "8", "--max-eval-samples", "4", "--batch-size", "4",
    "--eval-batch-size", "8", "--max-new-tokens", "4", "--lora-ranks", "2",
    "--lora-alphas", "8", "--lr", "1e-3", "--max-steps", "1",
]  # fmt: skip


# the shapes of the tiny model directory (helpers.save_tiny_model_dir) the tests edit
LAYERS, HIDDEN, MLP = TINY["num_hidden_layers"], TINY["hidden_size"], TINY["intermediate_size"]


@pytest.fixture
def run(tmp_path, tiny_model_dir) -> Path:
    """A finished molf run (merged final/, eval.json with before and after)."""
    out = tmp_path / "runs" / "run"
    argv = ["train", "--output-dir", str(out), "--model", str(tiny_model_dir), "--data",
            "builtin", *QUICK]  # fmt: skip
    assert main(argv) == 0
    return out


def _refused(capsys, argv: list[str], *needles: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    line = err.splitlines()[-1] if err else ""
    assert line.startswith("molf: error: "), err  # the message is this one line
    for needle in needles:
        assert needle in line, err
    return line


def _record(run: Path) -> dict[str, bytes]:
    return {n: (run / n).read_bytes() for n in ("eval.json", "predictions.jsonl", "config.yaml")}


def _eval(model: Path, *extra: str) -> list[str]:
    return ["eval", "--model", str(model), "--task", "fact", "--data", "builtin",
            "--max-train-samples", "8", "--max-eval-samples", "4", *extra]  # fmt: skip


def test_eval_refuses_to_write_into_a_training_run(run, tmp_path, capsys):
    record = _record(run)
    assert {"before", "after", "train_seconds"} <= json.loads(record["eval.json"]).keys()
    for argv in (
        ["eval", "--run", str(run), "--output-dir", str(run)],
        _eval(run / "final", "--output-dir", str(run)),
    ):
        _refused(capsys, argv, f"--output-dir: {run} holds a molf training run",
                 "choose another --output-dir")  # fmt: skip
        assert _record(run) == record
    # a fresh directory, and then the same one again (an earlier evaluation is replaced)
    fresh = tmp_path / "ev"
    for _ in range(2):
        assert main(["eval", "--run", str(run), "--output-dir", str(fresh)]) == 0
        written = json.loads((fresh / "eval.json").read_text()).keys()
        assert written == {"after", "baselines", "evaluated"}
    assert _record(run) == record


def test_eval_of_a_run_holds_the_runs_lock(run, tiny_model_dir, capsys):
    from molf.train.rundir import holding_run

    training = RunLock(run)  # the lock a training process holds on its run directory
    training.acquire()
    try:
        _refused(capsys, ["eval", "--run", str(run)], f"--run: {run} is in use",
                 f"pid {os.getpid()}")  # fmt: skip
    finally:
        training.release()
    record, final = _record(run), (run / "final" / "model.safetensors").read_bytes()
    with holding_run(run):  # what `molf eval --run` holds while it reads the run
        overwrite = ["train", "--output-dir", str(run), "--model", str(tiny_model_dir),
                     "--data", "builtin", *QUICK, "--overwrite"]  # fmt: skip
        _refused(capsys, overwrite, "in use")
    assert _record(run) == record
    assert (run / "final" / "model.safetensors").read_bytes() == final
    assert main(["eval", "--run", str(run)]) == 0  # released
    assert (run / LOCK_FILE).is_file()


def _copy_with_config(src: Path, dst: Path, name: str, **changes) -> Path:
    """A copy of the model or adapter directory ``src`` whose ``name`` (a JSON config)
    has ``changes``."""
    shutil.copytree(src, dst)
    config = json.loads((dst / name).read_text())
    config.update(changes)
    (dst / name).write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "changes, needle",
    [
        (
            {"num_hidden_layers": LAYERS + 1},
            f"model.layers.{LAYERS}.input_layernorm.weight is missing",
        ),
        (
            {"num_hidden_layers": LAYERS - 1},
            f"model.layers.{LAYERS - 1}.input_layernorm.weight is in the weights but",
        ),
        (
            {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
            "model.layers.0.self_attn.k_proj.bias is missing",
        ),
        (
            {"intermediate_size": 2 * MLP},
            f"model.layers.0.mlp.down_proj.weight has shape [{HIDDEN}, {MLP}] in the weights "
            f"but [{HIDDEN}, {2 * MLP}]",
        ),
    ],
)
def test_a_model_whose_weights_do_not_fill_its_config_is_refused(
    tmp_path, tiny_model_dir, capsys, changes, needle
):
    edited = _copy_with_config(tiny_model_dir, tmp_path / "edited", "config.json", **changes)
    _refused(capsys, _eval(edited), f"--model: the weights in {edited}", needle,
             "restore the one the weights were saved with")  # fmt: skip


def test_a_runs_final_model_with_an_edited_config_is_refused(run, tmp_path, capsys):
    assert main(["eval", "--run", str(run)]) == 0  # as saved, it loads
    config = json.loads((run / "final" / "config.json").read_text())
    edited = {**config, "num_hidden_layers": LAYERS + 1}
    (run / "final" / "config.json").write_text(json.dumps(edited))
    missing = (
        f"model.layers.{LAYERS}.input_layernorm.weight is missing from the weights "
        "(9 keys in all)"  # a layer's two norms, four attention and three MLP weights
    )
    _refused(capsys, ["eval", "--run", str(run), "--output-dir", str(tmp_path / "ev")], missing)
    assert not (tmp_path / "ev").exists()


def test_an_adapter_whose_weights_do_not_fill_its_config_is_refused(
    tmp_path, tiny_model_dir, capsys
):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapter = tmp_path / "adapter"
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(adapter)
    shutil.copy(tiny_model_dir / "tokenizer.json", adapter)
    shutil.copy(tiny_model_dir / "tokenizer_config.json", adapter)
    assert main(_eval(adapter)) == 0  # as saved, it loads
    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A"
    for changes, needle in [
        (
            {"r": 4},
            f"{q_a}.default.weight has shape [2, {HIDDEN}] in the weights but [4, {HIDDEN}]",
        ),
        ({"target_modules": ["v_proj"]}, f"{q_a}.weight is in the weights but not in the"),
        ({"target_modules": ["q_proj", "v_proj", "k_proj"]}, "k_proj.lora_A.weight is missing"),
    ]:
        edited = tmp_path / f"edited-{len(str(changes))}"
        _copy_with_config(adapter, edited, "adapter_config.json", **changes)
        _refused(capsys, _eval(edited), f"the adapter weights in {edited}", needle)
