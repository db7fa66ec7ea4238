"""Data parallelism with real processes (torchrun, gloo on CPU): DDP and FSDP2 route and
train exactly like one process reading the same global batches."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from molf.cli import main

pytestmark = pytest.mark.distributed

COMMON = [
    "--data",
    "builtin",
    "--max-steps",
    "4",
    "--lora-ranks",
    "4,8",
    "--lora-alphas",
    "8,8",
    "--lr",
    "3e-3",
    "--max-new-tokens",
    "2",
    "--max-eval-samples",
    "4",
    "--no-eval-before",
    "--seed",
    "3",
]


def torchrun(args: list[str], nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--standalone",
        "-m",
        "molf",
        "train",
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _winners(run: Path) -> list:
    lines = [json.loads(x) for x in (run / "routing.jsonl").read_text().splitlines()]
    return [x["winners"] for x in lines[1:]]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def _assert_close(a: dict, b: dict, rtol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    worst = max(
        float((a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp_min(1e-12))
        for k in a
    )
    print(f"worst relative difference of final weights: {worst:.2e}")
    for k in a:
        err = (a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp_min(1e-12)
        assert err <= rtol, (k, float(err))


@pytest.fixture(scope="module")
def single(tmp_path_factory, shared_data):
    """The one-process reference: global batch 4."""
    out = tmp_path_factory.mktemp("single") / "run"
    stories = shared_data / "models" / "stories260k"
    assert (
        main(
            [
                "train",
                "--model",
                str(stories),
                "--output-dir",
                str(out),
                "--batch-size",
                "4",
                *COMMON,
            ]
        )
        == 0
    )
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_route_and_train_like_one(tmp_path, shared_data, single, mode):
    out = tmp_path / mode
    res = torchrun(
        [
            "--model",
            str(shared_data / "models" / "stories260k"),
            "--output-dir",
            str(out),
            "--batch-size",
            "2",
            "--parallel",
            mode,
            "--check-routing",
            *COMMON,
        ]
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert _winners(out) == _winners(single)
    _assert_close(_weights(out), _weights(single))
    config = json.loads(json.dumps(__import__("yaml").safe_load((out / "config.yaml").read_text())))
    assert config["world_size"] == 2 and config["parallel_mode"] == mode


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_sharded_checkpoint_resume_reproduces_the_run(tmp_path, shared_data, mode):
    args = [
        "--model",
        str(shared_data / "models" / "stories260k"),
        "--batch-size",
        "2",
        "--parallel",
        mode,
        "--save-steps",
        "2",
        *COMMON,
    ]
    full = tmp_path / "full"
    res = torchrun(["--output-dir", str(full), *args])
    assert res.returncode == 0, res.stderr[-3000:]
    expected = _weights(full)
    # Cut the run back to its step-2 checkpoint, as if it had died there.
    shutil.rmtree(full / "checkpoint-4")
    shutil.rmtree(full / "final")
    assert {p.name for p in full.glob("checkpoint-*")} == {"checkpoint-2"}
    res = torchrun(["--output-dir", str(full), "--resume", *args])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from checkpoint-2" in res.stdout
    _assert_close(_weights(full), expected, rtol=1e-6)
    steps = [json.loads(x)["step"] for x in (full / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_dead_rank_ends_the_run_with_an_error(tmp_path, shared_data):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "dead"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",
        "-m",
        "molf",
        "train",
        "--model",
        str(shared_data / "models" / "stories260k"),
        "--output-dir",
        str(out),
        "--batch-size",
        "2",
        "--lora-ranks",
        "4",
        "--lora-alphas",
        "8",
        "--dist-timeout",
        "30",
        *COMMON[:2],
        "--max-steps",
        "100000",
        "--no-eval-before",
        "--max-eval-samples",
        "2",
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    log = out / "train_log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, "the run never started"
        time.sleep(0.5)
    workers = [
        c
        for c in psutil.Process(proc.pid).children(recursive=True)
        if "molf" in " ".join(c.cmdline())
    ]
    victim = next(w for w in workers if w.environ().get("RANK") == "1")
    killed = time.time()
    os.kill(victim.pid, signal.SIGKILL)
    output, _ = proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert time.time() - killed < 60
    assert "molf" in output and (
        "Signal 9" in output or "SIGKILL" in output or "failed" in output.lower()
    ), output[-2000:]
