"""What gets merged is what was trained: a layer held by two parents (or two layers sharing
one weight) is refused by name, and training refuses a model whose weights do not fill
its config, so no partly random model is merged and saved as final/."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import TINY, tiny_model

from molf import MoLFConfig, MolfError, get_molf_model, merge_and_unload, molf_modules
from molf.cli import main

CONFIG = MoLFConfig(lora_ranks=(2,), lora_alphas=(4.0,))
TOKENS = torch.arange(1, 17).unsqueeze(0)


def test_a_linear_layer_held_by_two_parents_is_refused_naming_both():
    model = tiny_model("llama")
    layers = model.model.layers
    layers[1].mlp.down_proj = layers[0].mlp.down_proj  # one module under two names
    with pytest.raises(MolfError) as e:
        get_molf_model(model, CONFIG)
    assert "'model.layers.0.mlp.down_proj'" in str(e.value)
    assert "'model.layers.1.mlp.down_proj'" in str(e.value)
    assert not list(molf_modules(model)) and not hasattr(model, "molf_config")
    # the way out the message names: leave the shared layer out of the targets
    config = MoLFConfig(target_modules=["q_proj", "v_proj"], lora_ranks=(2,), lora_alphas=(4.0,))
    model = get_molf_model(model, config)
    with torch.no_grad():
        for _, layer in molf_modules(model):
            for b in layer.lora_B:
                b.normal_()  # a nonzero update, so that merging matters
        trained = model(TOKENS).logits
        merged = merge_and_unload(model)(TOKENS).logits
    assert (merged - trained).abs().max() <= 1e-5


def test_two_linear_layers_sharing_one_weight_are_refused_naming_both():
    model = tiny_model("llama")
    layers = model.model.layers
    layers[1].mlp.up_proj.weight = layers[0].mlp.up_proj.weight
    with pytest.raises(MolfError, match=r"'model\.layers\.0\.mlp\.up_proj' and "
                       r"'model\.layers\.1\.mlp\.up_proj' share one weight"):  # fmt: skip
        get_molf_model(model, CONFIG)


def test_training_refuses_a_model_whose_weights_do_not_fill_its_config(
    tmp_path, tiny_model_dir, capsys
):
    edited = tmp_path / "edited"
    shutil.copytree(tiny_model_dir, edited)
    config = json.loads((edited / "config.json").read_text())
    layers = TINY["num_hidden_layers"]
    (edited / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers + 1}))
    out = tmp_path / "runs" / "run"
    argv = ["train", "--model", str(edited), "--output-dir", str(out), "--data",
            "builtin", "--max-train-samples",
            "4", "--max-eval-samples", "2", "--batch-size", "4", "--max-steps", "1",
            "--lora-ranks", "2", "--lora-alphas", "4"]  # fmt: skip
    assert main(argv) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith(f"molf: error: --model: the weights in {edited} do not fit"), line
    assert f"model.layers.{layers}.input_layernorm.weight is missing from the weights" in line
    assert not out.exists()
