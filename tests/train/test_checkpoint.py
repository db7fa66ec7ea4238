"""Checkpoints (molf.train.checkpoint): listed by step, the newest N kept, restored
exactly into a fresh model, optimizer and schedule."""

from __future__ import annotations

import torch
from helpers import tiny_model
from transformers import get_scheduler

from molf import MoLFAdamW, MoLFConfig, get_molf_model
from molf.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint


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
