"""final/ in the dtype asked for, and its upload to the Hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from molf.cli import main
from molf.train.export import cast_saved_weights

QUICK = [
    "--data", "builtin", "--max-train-samples", "8", "--max-eval-samples", "4",
    "--batch-size", "4", "--lora-ranks", "4", "--lora-alphas", "8", "--max-steps", "2",
    "--no-eval-before",
]  # fmt: skip


def _run(tmp_path: Path, model: Path, name: str, *extra: str) -> Path:
    out = tmp_path / "runs" / name
    argv = ["train", "--model", str(model), "--output-dir", str(out), *QUICK, *extra]
    assert main(argv) == 0
    return out / "final"


def test_cast_saved_weights_halves_floats_keeps_integers_and_records_the_dtype(
    tmp_path, tiny_model_dir
):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.save_pretrained(tmp_path, max_shard_size="40KB")  # several shards and an index
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) > 1
    before = {k: v for p in shards for k, v in load_file(p).items()}
    size = sum(p.stat().st_size for p in shards)
    cast_saved_weights(tmp_path, torch.bfloat16)
    after = {k: v for p in shards for k, v in load_file(p).items()}
    assert after.keys() == before.keys()
    for k, v in before.items():
        want = v.to(torch.bfloat16) if v.is_floating_point() else v
        assert after[k].dtype == want.dtype and torch.equal(after[k], want), k
    assert sum(p.stat().st_size for p in shards) < 0.6 * size
    config = json.loads((tmp_path / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in after.values())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert next(loaded.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("method", ["molf", "lora"])
def test_save_dtype_bf16_writes_the_trained_weights_in_bf16(tmp_path, tiny_model_dir, method):
    full = _run(tmp_path, tiny_model_dir, "fp32", "--method", method)
    half = _run(tmp_path, tiny_model_dir, "bf16", "--method", method, "--save-dtype", "bf16")
    name = "model.safetensors" if method == "molf" else "adapter_model.safetensors"
    a, b = load_file(full / name), load_file(half / name)
    assert a.keys() == b.keys()
    for k in a:  # the same training, only the saved copy is cast
        assert b[k].dtype == torch.bfloat16 and torch.equal(b[k], a[k].to(torch.bfloat16)), k


def test_push_to_hub_uploads_final_and_a_missing_token_fails_before_training(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "runs" / "pushed"
    argv = ["train", "--model", str(tiny_model_dir), "--output-dir", str(out), *QUICK,
            "--push-to-hub", "me/molf-facts"]  # fmt: skip
    assert main(argv) == 2
    assert "HF_TOKEN" in capsys.readouterr().err and not out.exists()
    assert main([*argv[:-1], "not-a-repo-id"]) == 2

    calls: list[tuple[str, dict]] = []

    class Commit:
        commit_url = "https://huggingface.co/me/molf-facts/commit/abc"

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", {"repo_id": repo_id, **kw}))

    def upload_folder(self, **kw):
        # the upload sees a finished final/: the model, its card and tokenizer
        names = {p.name for p in Path(kw["folder_path"]).iterdir()}
        calls.append(("upload_folder", {**kw, "files": names}))
        return Commit()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert main(argv) == 0
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1]["repo_id"] == "me/molf-facts" and calls[0][1]["exist_ok"]
    upload = calls[1][1]
    assert upload["repo_id"] == "me/molf-facts"
    assert Path(upload["folder_path"]) == out / "final"
    assert {"model.safetensors", "config.json", "README.md"} <= upload["files"]
    assert Commit.commit_url in capsys.readouterr().out
