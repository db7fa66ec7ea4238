"""MoLF in the Hugging Face stack: Trainer, TRL's SFTTrainer, accelerate."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import cpu_training_arguments, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback

from molf import MoLFAdamW, MoLFConfig, MolfError, get_molf_model, merge_and_unload, molf_modules
from molf.integrations.hf import (
    MoLFAdamWFactory,
    MoLFRoutingCallback,
    MoLFTrainer,
    MoLFTrainerMixin,
    find_molf_optimizer,
    merged_state_dict,
    routing_of,
)

CFG = MoLFConfig(lora_ranks=(4,), lora_alphas=(8,))
VOCAB = 96  # conftest.TINY


def _molf(arch="llama", cfg=CFG, seed=0):
    return get_molf_model(tiny_model(arch, seed=seed), cfg)


def _data(n=16, seq=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, seq), generator=g)
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def _args(out, **overrides):
    """helpers.cpu_training_arguments with this file's schedule: 6 steps, weight decay,
    a checkpoint every 3 steps."""
    kw = dict(max_steps=6, weight_decay=0.01, logging_steps=2, save_strategy="steps")
    return cpu_training_arguments(out, **{**kw, "save_steps": 3, **overrides})


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


class _Tracker(TrainerCallback):
    """Stands for a `report_to` integration: Trainer puts those before user callbacks."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """6 steps of MoLFTrainer on a tiny llama, checkpoints at 3 and 6, then save_model."""
    out = tmp_path_factory.mktemp("trainer")
    model = _molf()
    trainer = MoLFTrainer(
        model=model, args=_args(out), train_dataset=_data(), lora_lr=2e-2, routing_logs=False
    )
    tracker = _Tracker()
    trainer.callback_handler.callbacks.insert(1, tracker)  # where report_to callbacks sit
    MoLFRoutingCallback.attach(trainer)
    trainer.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.save_model(str(out / "final"))
    return dict(out=out, model=model, trainer=trainer, tracker=tracker, before=before)


def test_trainer_logs_routing_shares(run):
    train_logs = [h for h in run["trainer"].state.log_history if "loss" in h]
    assert [h["step"] for h in train_logs] == [2, 4, 6]
    experts = CFG.expert_names
    for h in train_logs:
        shares = [h[f"routing/{e}"] for e in experts]
        assert sum(shares) == pytest.approx(CFG.top_k)  # no skipped step
        for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            per_type = [h[f"routing/{t}/{e}"] for e in experts]
            assert all(0.0 <= s <= 1.0 for s in per_type)
            assert sum(per_type) == pytest.approx(CFG.top_k)
    # A tracker (placed as Trainer places report_to callbacks) got them in the same record.
    seen = [x for x in run["tracker"].logs if "loss" in x]
    assert [x["routing/fft"] for x in seen] == [h["routing/fft"] for h in train_logs]
    assert routing_of(run["trainer"]) is not None
    assert routing_of(run["trainer"].optimizer).experts == experts


def test_final_save_is_the_merged_model_and_training_model_untouched(run, monkeypatch):
    model = run["model"]
    assert len(list(molf_modules(model))) == 14
    assert all(torch.equal(v, run["before"][k]) for k, v in model.state_dict().items())
    loaded, info = AutoModelForCausalLM.from_pretrained(
        run["out"] / "final", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not list(molf_modules(loaded))
    assert not (run["out"] / "final" / "molf_config.json").exists()
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    got = _logits(loaded, ids)
    torch.testing.assert_close(got, _logits(model, ids), rtol=1e-5, atol=1e-5)
    assert torch.equal(got, _logits(merge_and_unload(copy.deepcopy(model)), ids))
    # push_to_hub uploads what save_model(_internal_call=True) writes: the merged model too.
    monkeypatch.setattr(Trainer, "push_to_hub", lambda self: self.save_model(_internal_call=True))
    run["trainer"].push_to_hub()
    pushed = load_file(str(run["out"] / "model.safetensors"))
    assert pushed.keys() == load_file(str(run["out"] / "final" / "model.safetensors")).keys()


def test_checkpoint_resumes_exactly_and_loads_plainly(run, tmp_path):
    ckpt = run["out"] / "checkpoint-3"
    assert json.loads((ckpt / "molf_config.json").read_text()) == CFG.to_dict()
    # Resume from step 3 in a new trainer: bit-identical to the uninterrupted run.
    model = _molf()
    trainer = MoLFTrainer(model=model, args=_args(tmp_path), train_dataset=_data(), lora_lr=2e-2)
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert _same_weights(model, run["model"])
    # The checkpoint loaded as a plain model is the model at step 3, not a re-initialised one.
    plain, info = AutoModelForCausalLM.from_pretrained(ckpt, output_loading_info=True)
    assert not info["missing_keys"]
    at3 = _molf()
    result = at3.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
    assert not result.missing_keys
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    assert torch.equal(_logits(plain, ids), _logits(merge_and_unload(at3), ids))


def test_optimizer_cls_and_kwargs_with_model_init(tmp_path, caplog):
    made = []

    def model_init():
        made.append(_molf(seed=len(made)))
        return made[-1]

    trainer = Trainer(
        model_init=model_init,
        args=_args(tmp_path, max_steps=3, logging_steps=2, save_strategy="no"),
        train_dataset=_data(8),
        optimizer_cls_and_kwargs=(MoLFAdamWFactory, {"lr": 1e-2, "lora_lr": 2e-2}),
    )
    with caplog.at_level("WARNING", logger="molf"):
        MoLFRoutingCallback.attach(trainer)
        trainer.train()
    assert "not MoLFAdamW" not in caplog.text  # the factory built MoLFAdamW: no warning
    opt = find_molf_optimizer(trainer)
    assert opt is not None and opt.state  # it stepped
    # Built from the model of this train() call (model_init ran again), not a stale one.
    assert len(made) == 2 and trainer.model is made[-1]
    ours = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ours == {id(p) for p in made[-1].parameters() if p.requires_grad}
    assert {g["name"]: g["initial_lr"] for g in opt.param_groups}["lora0"] == 2e-2
    # Steps 1-2 in the log of step 2, step 3 in the summary at the end.
    step2, summary = trainer.state.log_history
    assert step2["step"] == 2 and "train_loss" in summary
    assert step2["routing/fft"] + step2["routing/lora0"] == pytest.approx(1.0)
    assert summary["routing/fft"] + summary["routing/lora0"] == pytest.approx(1.0)


def test_factory_call_conventions():
    model = _molf()
    # transformers >= 5: cls()(model, **kwargs); older: cls(model) via the "model" kwarg.
    assert isinstance(MoLFAdamWFactory()(model, lr=1e-3), MoLFAdamW)
    assert isinstance(MoLFAdamWFactory(model, lr=1e-3, lora_lr=1e-2), MoLFAdamW)
    # A "model" kwarg (for older transformers) yields to the model Trainer passes.
    opt = MoLFAdamWFactory()(model, model=_molf(seed=1), lr=1e-3)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters()
    }
    groups = [{"params": [p for p in model.parameters()], "weight_decay": 0.0}]
    with pytest.raises(MolfError, match="parameter groups, not the model"):
        MoLFAdamWFactory(groups, lr=1e-3)
    with pytest.raises(MolfError, match="needs lr"):
        MoLFAdamWFactory()(model)
    with pytest.raises(MolfError, match="unknown keyword"):
        MoLFAdamWFactory()(model, lr=1e-3, momentum=0.9)
    with pytest.raises(MolfError, match="holds no MoLF layers"):
        MoLFAdamWFactory()(tiny_model(), lr=1e-3)


def test_factory_refuses_parameters_replaced_after_it_was_built():
    # What accelerate's FSDP2 prepare does to an optimizer Trainer built before sharding.
    model = _molf()
    opt = MoLFAdamWFactory()(model, lr=1e-3)
    for g in opt.param_groups:
        g["params"] = [torch.nn.Parameter(p.detach().clone()) for p in g["params"]]
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    with pytest.raises(MolfError, match="were replaced after it was built"):
        opt.step()


def test_merged_state_dict_is_merge_and_unload_without_merging():
    cfg = MoLFConfig(lora_ranks=(2, 4), lora_alphas=(4, 8))
    model = _molf("qwen2", cfg)  # q/k/v have biases
    torch.manual_seed(5)
    for _, layer in molf_modules(model):
        for b in layer.lora_B:
            torch.nn.init.normal_(b, std=0.1)
    before = copy.deepcopy(model.state_dict())
    merged = merged_state_dict(model)
    reference = merge_and_unload(copy.deepcopy(model)).state_dict()
    assert list(merged) == list(reference)
    assert all(torch.equal(merged[k], reference[k]) for k in reference)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    both = merged_state_dict(model, keep_experts=True)
    again = merged_state_dict(model, both)  # a dict merged before is left as it is
    assert list(again) == list(both) and all(again[k] is both[k] for k in both)
    result = model.load_state_dict(both, strict=False)
    # The MoLF model's load hook drops the merged weights of layers whose MoLF tensors came
    # too (a checkpoint); loading the merged dict alone reports both sides.
    assert not result.missing_keys and not result.unexpected_keys
    result = model.load_state_dict(merged, strict=False)
    assert set(result.unexpected_keys) == set(reference) - set(before)
    assert set(result.missing_keys) == set(before) - set(reference)


def test_merged_state_dict_refuses_a_layer_with_missing_tensors():
    model = _molf("qwen2")
    name, layer = next(iter(molf_modules(model)))
    keys = layer.state_keys(f"{name}.")
    state = model.state_dict()
    del state[keys.lora_b[0]]
    with pytest.raises(MolfError, match=rf"lacks \['{keys.lora_b[0]}'\]"):
        merged_state_dict(model, state)


def test_accelerate_gradient_accumulation_matches_manual_loop():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    batches = [torch.stack([d["input_ids"] for d in _data(16)[i : i + 4]]) for i in (0, 4, 8, 12)]
    accum = 2

    manual = _molf()
    opt = MoLFAdamW(manual, lr=1e-2, lora_lr=2e-2)
    for i, ids in enumerate(batches):
        (manual(ids, labels=ids).loss / accum).backward()
        if (i + 1) % accum == 0:
            opt.step()
            opt.zero_grad()

    try:
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accum)
        model = _molf()
        model, prepared = accelerator.prepare(model, MoLFAdamW(model, lr=1e-2, lora_lr=2e-2))
        routings = []
        for ids in batches:
            with accelerator.accumulate(model):
                accelerator.backward(model(ids, labels=ids).loss)
                prepared.step()
                prepared.zero_grad()
            routings.append(routing_of(prepared))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert find_molf_optimizer(prepared) is prepared.optimizer
    assert routings[0] is None and routings[1] is not None  # a step every `accum` batches
    assert routings[1] is routings[2] and routings[3] is not routings[1]
    assert torch.equal(routings[3].selected, opt.last_routing.selected)
    assert _same_weights(accelerator.unwrap_model(model), manual)


def test_trl_sft_trainer_prompt_completion(shared_data, tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'molf[hf]')")
    from datasets import Dataset
    from transformers import AutoTokenizer

    path = shared_data / "models" / "stories260k"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = get_molf_model(AutoModelForCausalLM.from_pretrained(path), CFG)
    pairs = [("Once upon a time, Lily saw a", " big red ball."), ("Tom liked to", " play.")]
    data = Dataset.from_list([{"prompt": p, "completion": c} for p, c in pairs * 4])

    class MoLFSFTTrainer(MoLFTrainerMixin, trl.SFTTrainer):
        pass

    # SFTConfig checkpoints activations by default; older transformers name it gradient_*.
    no_ac = "activation_checkpointing"
    if no_ac not in trl.SFTConfig.__dataclass_fields__:
        no_ac = "gradient_checkpointing"
    config = trl.SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=3e-3,
        logging_steps=1,
        save_steps=3,
        report_to="none",
        use_cpu=True,
        bf16=False,
        max_length=32,
        disable_tqdm=True,
        **{no_ac: False},
    )
    trainer = MoLFSFTTrainer(
        model=model, args=config, train_dataset=data, processing_class=tokenizer, lora_lr=3e-3
    )
    assert isinstance(trainer.callback_handler.callbacks[1], MoLFRoutingCallback)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all("routing/fft" in h and "routing/lora0" in h for h in logs)
    trainer.save_model(str(tmp_path / "final"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    ids = tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=1e-4, atol=1e-4)
    # The checkpoint of the last step (tied embeddings: saved once) loads as the same model.
    ckpt, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "checkpoint-3", output_loading_info=True
    )
    assert not info["missing_keys"]
    assert torch.equal(_logits(ckpt, ids), _logits(loaded, ids))
