"""train/ in pieces, with no shared data: the batch plan across ranks, flag/YAML
precedence, checkpoint listing and keep-N."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, get_scheduler

from molf import MoLFAdamW, MoLFConfig, get_molf_model
from molf.errors import MolfError
from molf.tasks import Example
from molf.train.args import resolve_args
from molf.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from molf.train.data import Batches

WORDS = ["<unk>", "<pad>", "</s>", *(f"w{i}" for i in range(40))]


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def _examples(n: int) -> list[Example]:
    """Pairs of different lengths, so padding and token counts differ between them."""
    return [
        Example(" ".join(f"w{(i + j) % 40}" for j in range(1 + i % 5)), f" w{i % 40} w{i % 7}")
        for i in range(n)
    ]


def _rows(micro: list[dict[str, torch.Tensor]]) -> list[tuple[int, ...]]:
    """The unpadded token ids of every example in a list of micro-batches."""
    return [
        tuple(ids[mask.bool()].tolist())
        for mb in micro
        for ids, mask in zip(mb["input_ids"], mb["attention_mask"])
    ]


@pytest.mark.parametrize(("world", "accum"), [(2, 1), (3, 2), (4, 4)])
def test_ranks_and_micro_batches_read_exactly_the_one_rank_global_batch(tokenizer, world, accum):
    examples = _examples(37)  # not a multiple of any global batch: a short last step
    per_device = 2
    one = Batches(examples, tokenizer, 32, 1, per_device * world * accum, 1, seed=5)
    ranks = [
        Batches(examples, tokenizer, 32, 1, per_device, accum, seed=5, rank=r, world_size=world)
        for r in range(world)
    ]
    assert all(b.plan == one.plan for b in ranks)
    for step in range(one.plan.steps_per_epoch + 1):  # into the second epoch
        whole, targets = one.step(step)
        parts = [b.step(step) for b in ranks]
        assert all(t == targets for _, t in parts)  # every rank divides by the global count
        assert sorted(r for micro, _ in parts for r in _rows(micro)) == sorted(_rows(whole))
        assert all(len(micro) <= accum for micro, _ in parts)


def test_flags_win_over_yaml_which_wins_over_a_runs_own_settings(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("lr: 1e-3\nmax-steps: 7\nlora_ranks: [8, 32]\n")
    base = {"lr": 1e-4, "task": "med", "seed": 3}
    args = resolve_args(str(config), {"lr": "2e-3", "batch_size": None}, base)
    assert args.lr == 2e-3  # flag over YAML over base
    assert args.max_steps == 7 and args.lora_ranks == (8, 32)  # YAML (dashes too)
    assert args.task == "med" and args.seed == 3  # base where nothing else says
    assert args.batch_size == 8  # a flag not given (None) keeps the default
    config.write_text("learning_rate: 1e-3\n")
    with pytest.raises(MolfError, match="unknown setting 'learning_rate'"):
        resolve_args(str(config), {})


def _molf(seed: int):
    model = get_molf_model(tiny_model(seed=seed), MoLFConfig(lora_ranks=(4,), lora_alphas=(8,)))
    opt = MoLFAdamW(model, lr=1e-2)
    sched = get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=10)
    return model, opt, sched


def test_checkpoints_are_listed_by_step_keep_the_newest_n_and_restore(tmp_path):
    model, opt, sched = _molf(0)
    x = torch.randint(0, 96, (2, 8))
    for step in (1, 2, 3, 10):
        model(x, labels=x).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        save_checkpoint(tmp_path, step, model, opt, sched, keep=2)
    (tmp_path / "checkpoint-99").mkdir()  # no meta.json: an incomplete one does not count
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-10"]
    fresh, fresh_opt, fresh_sched = _molf(1)
    step, _ = load_checkpoint(tmp_path / "checkpoint-10", fresh, fresh_opt, fresh_sched)
    assert step == 10 and fresh_sched.last_epoch == sched.last_epoch
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_target_logits_loss_equals_the_models_loss_from_labels(tokenizer, arch):
    """Logits only where a label is read: the same loss and gradients as transformers'
    loss over every position, on a batch whose rows have targets at other positions."""
    from molf.train.loop import target_loss, target_positions

    examples = [  # long prompts of different lengths, short answers
        Example(" ".join(f"w{j}" for j in range(8 + i % 3)), f" w{i} w{i + 9}") for i in range(6)
    ]
    batches = Batches(examples, tokenizer, 64, 1, 6, 1, seed=0, rank=0, world_size=1)
    (batch,), num_targets = batches.step(0)
    positions = target_positions(batch["labels"])
    assert 0 < len(positions) < batch["labels"].shape[1] - 1  # the prompts are left out
    model = tiny_model(arch).train()
    model(**batch, num_items_in_batch=num_targets).loss.backward()
    expected_loss = model(**batch, num_items_in_batch=num_targets).loss.detach()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = target_loss(model, batch, positions, num_targets)
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=1e-6, atol=0)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("method", "compile_", "expected"),
    [("fft", False, True), ("lora", False, True), ("adalora", False, False), ("fft", True, False)],
)
def test_target_logits_only_where_the_loop_owns_the_loss(method, compile_, expected):
    """AdaLoRA adds its regularizer to the loss the model computes from labels, and a
    compiled forward would recompile for every new number of positions."""
    from molf.train.args import TrainArgs
    from molf.train.loop import keeps_target_logits

    model = tiny_model()
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    args = TrainArgs(method=method, compile=compile_)
    assert keeps_target_logits(model, args) is expected
