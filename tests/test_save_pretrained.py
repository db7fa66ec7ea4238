"""A MoLF model saved through any route loads as the trained model: the model's own
``save_pretrained`` (installed by ``get_molf_model``) writes the merged weights under the
plain names, for a plain ``Trainer`` with ``optimizers=``, TRL's ``SFTTrainer``,
accelerate and direct calls; Trainer checkpoints also keep the MoLF tensors (exact
resume)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import cpu_training_arguments, tiny_model, tiny_tokenizer, token_rows
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from molf import MoLFAdamW, MoLFConfig, get_molf_model, merge_and_unload, molf_modules
from molf.model import MergedSavePretrained

MOLF = MoLFConfig(lora_ranks=(4,), lora_alphas=(8,))
MOLF_E = MoLFConfig(lora_ranks=(2, 4), lora_alphas=(8, 8), train_base=False)
CONFIGS = pytest.mark.parametrize("cfg", [MOLF, MOLF_E], ids=["molf", "molf-e"])
VOCAB = 96  # helpers.TINY
# float32 merge rounding: W' = W + sum_i s_i B_i A_i is rounded once, the layer's
# W x + sum_i s_i B_i (A_i x) on every product; the logits differ by about 1e-7.
ATOL = 1e-5


def _molf(cfg: MoLFConfig = MOLF, **overrides) -> torch.nn.Module:
    return get_molf_model(tiny_model(**overrides), cfg)


def _args(out, **overrides) -> TrainingArguments:
    """Checkpoints every 2 of the 4 steps."""
    return cpu_training_arguments(out, **{"save_strategy": "steps", "save_steps": 2, **overrides})


def _plain_trainer(model: torch.nn.Module, out, **overrides) -> Trainer:
    """transformers.Trainer given MoLFAdamW through ``optimizers=``: the usual way to plug
    in a custom optimizer."""
    opt = MoLFAdamW(model, lr=1e-2, lora_lr=2e-2)
    return Trainer(
        model=model,
        args=_args(out, **overrides),
        train_dataset=token_rows(),
        optimizers=(opt, None),
    )


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def _assert_loads_as(model: torch.nn.Module, directory, vocab: int = VOCAB) -> float:
    """``AutoModelForCausalLM.from_pretrained(directory)`` is a plain model, loaded with no
    missing or unexpected key, holding ``merge_and_unload(model)``'s weights to the bit and
    giving ``model``'s logits; returns their largest difference."""
    loaded, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not list(molf_modules(loaded))
    merged, got_sd = merge_and_unload(copy.deepcopy(model)).state_dict(), loaded.state_dict()
    assert merged.keys() == got_sd.keys()
    assert all(torch.equal(got_sd[k], v) for k, v in merged.items())
    ids = torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(3))
    got, want = _logits(loaded, ids), _logits(model, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    return float((got - want).abs().max())


def _train(model: torch.nn.Module, steps: int = 3) -> torch.nn.Module:
    opt = MoLFAdamW(model, lr=1e-2, lora_lr=2e-2)
    batch = torch.stack([d["input_ids"] for d in token_rows(4)])
    for _ in range(steps):
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """4 steps of a plain Trainer with optimizers=(MoLFAdamW, None), checkpoints at 2 and
    4, then trainer.save_model()."""
    out = tmp_path_factory.mktemp("plain")
    model = _molf()
    trainer = _plain_trainer(model, out)
    trainer.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.save_model(str(out / "final"))
    return dict(out=out, model=model, before=before)


def test_plain_trainer_save_model_loads_the_trained_model(plain_run):
    model = plain_run["model"]
    diff = _assert_loads_as(model, plain_run["out"] / "final")
    print(f"plain Trainer save_model: max |logits difference| {diff:.2e}")
    assert not (plain_run["out"] / "final" / "molf_config.json").exists()
    # The model being trained is still the MoLF model, unchanged by saving.
    assert len(list(molf_modules(model))) == 14
    assert all(torch.equal(v, plain_run["before"][k]) for k, v in model.state_dict().items())


def test_plain_trainer_checkpoint_resumes_exactly_and_loads_plainly(plain_run, tmp_path):
    ckpt = plain_run["out"] / "checkpoint-2"
    assert json.loads((ckpt / "molf_config.json").read_text()) == MOLF.to_dict()
    # A new plain Trainer resumed from step 2 is bit-identical to the uninterrupted run.
    model = _molf()
    _plain_trainer(model, tmp_path).train(resume_from_checkpoint=str(ckpt))
    want = plain_run["model"].state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    # The checkpoint loaded as a plain model is the model at step 2.
    plain, info = AutoModelForCausalLM.from_pretrained(ckpt, output_loading_info=True)
    assert not info["missing_keys"]
    at2 = _molf()
    at2.load_state_dict(load_file(str(ckpt / "model.safetensors")))  # strict: all there
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    assert torch.equal(_logits(plain, ids), _logits(merge_and_unload(at2), ids))


def test_plain_trainer_save_model_molf_e(tmp_path):
    model = _molf(MOLF_E)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any("embed_tokens" in n for n in frozen)  # MoLF-E freezes non-linear parameters
    trainer = _plain_trainer(model, tmp_path, save_strategy="no")
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    diff = _assert_loads_as(model, tmp_path / "final")
    print(f"plain Trainer save_model, MoLF-E: max |logits difference| {diff:.2e}")
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@CONFIGS
def test_direct_save_pretrained(cfg, tmp_path):
    model = _train(_molf(cfg))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "merged")
    diff = _assert_loads_as(model, tmp_path / "merged")
    print(f"model.save_pretrained ({cfg.expert_names}): max |logits difference| {diff:.2e}")
    assert not (tmp_path / "merged" / "molf_config.json").exists()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # keep_experts=True also keeps the MoLF tensors: a fresh MoLF model takes them exactly.
    model.save_pretrained(tmp_path / "both", keep_experts=True)
    cfg_saved = json.loads((tmp_path / "both" / "molf_config.json").read_text())
    fresh = get_molf_model(tiny_model(seed=7), MoLFConfig.from_dict(cfg_saved))
    fresh.load_state_dict(load_file(str(tmp_path / "both" / "model.safetensors")))
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_accelerate_unwrapped_save_pretrained(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    try:
        accelerator = Accelerator(cpu=True)
        model = _molf()
        model, opt = accelerator.prepare(model, MoLFAdamW(model, lr=1e-2, lora_lr=2e-2))
        batch = torch.stack([d["input_ids"] for d in token_rows(4)])
        for _ in range(2):
            accelerator.backward(model(batch, labels=batch).loss)
            opt.step()
            opt.zero_grad()
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(tmp_path, state_dict=accelerator.get_state_dict(model))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    _assert_loads_as(unwrapped, tmp_path)


def test_sft_trainer_save_model(tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'molf[hf]')")
    from datasets import Dataset

    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    vocab = len(tokenizer)
    model = get_molf_model(tiny_model(vocab_size=vocab, tie_word_embeddings=True), MOLF)
    pairs = [("The capital of france is", " paris"), ("Tom has", " two cats")]
    data = Dataset.from_list([{"prompt": p, "completion": c} for p, c in pairs * 4])
    no_ac = "activation_checkpointing"  # older transformers: gradient_checkpointing
    if no_ac not in trl.SFTConfig.__dataclass_fields__:
        no_ac = "gradient_checkpointing"
    config = trl.SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        max_length=32,
        disable_tqdm=True,
        **{no_ac: False},
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        optimizers=(MoLFAdamW(model, lr=1e-2, lora_lr=2e-2), None),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    _assert_loads_as(model, tmp_path / "final", vocab=vocab)


def test_merge_and_unload_restores_the_class_save_pretrained():
    model = _molf()
    assert isinstance(model.save_pretrained, MergedSavePretrained)
    copied = copy.deepcopy(model)
    assert copied.save_pretrained.model is copied  # a copy saves itself, not the original
    merge_and_unload(model)
    assert "save_pretrained" not in vars(model)
    assert model.save_pretrained.__func__ is type(model).save_pretrained


def test_save_pretrained_merges_through_activation_checkpoint_wrappers(tmp_path):
    """torch's checkpoint_wrapper (what accelerate and FSDP insert for activation
    checkpointing) adds a segment to module names that state_dict keys do not carry."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )

    model = _train(_molf())
    layers = type(model.model.layers[0])
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, layers))
    names = [n for n, _ in molf_modules(model)]
    assert all("_checkpoint_wrapped_module" in n for n in names)  # the renamed paths
    model.save_pretrained(tmp_path / "merged")
    assert _assert_loads_as(model, tmp_path / "merged") < ATOL


def test_a_layer_under_a_name_it_cannot_be_found_by_is_refused(tmp_path):
    from molf import MolfError
    from molf.model import merged_state

    model = _molf()
    renamed = {k.replace("layers.0.", "blocks.0."): v for k, v in model.state_dict().items()}
    with pytest.raises(MolfError, match="blocks.0.self_attn.q_proj.lora_A.0 belongs to no"):
        merged_state(model, renamed)
