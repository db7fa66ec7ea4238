"""Data parallelism with real processes (torchrun, gloo on CPU): DDP and FSDP2 route and
train exactly like one process reading the same global batches."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from molf.cli import main
from molf.ownership import claim

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


EVAL = ["--eval-steps", "2", "--max-eval-samples", "5"]  # an odd count over 2 ranks


def _eval_losses(run: Path) -> dict[int, float]:
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval_loss"] for r in log if "eval_loss" in r}


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
def single(tmp_path_factory, tiny_model_dir):
    """The one-process reference: global batch 4."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert (
        main(
            [
                "train",
                "--model",
                str(tiny_model_dir),
                "--output-dir",
                str(out),
                "--batch-size",
                "4",
                *COMMON,
                *EVAL,
            ]
        )
        == 0
    )
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_route_and_train_like_one(tmp_path, tiny_model_dir, single, mode):
    out = tmp_path / mode
    res = torchrun(
        [
            "--model",
            str(tiny_model_dir),
            "--output-dir",
            str(out),
            "--batch-size",
            "2",
            "--parallel",
            mode,
            "--check-routing",
            *COMMON,
            *EVAL,
        ]
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert _winners(out) == _winners(single)
    _assert_close(_weights(out), _weights(single))
    # every rank's slice of the eval pairs (5: one rank pads), all-reduced: one process's loss
    ours, one = _eval_losses(out), _eval_losses(single)
    assert list(ours) == list(one) == [2, 4]
    assert all(ours[s] == pytest.approx(one[s], rel=1e-4) for s in one), (ours, one)
    config = json.loads(json.dumps(__import__("yaml").safe_load((out / "config.yaml").read_text())))
    assert config["world_size"] == 2 and config["parallel_mode"] == mode


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_sharded_checkpoint_resume_reproduces_the_run(tmp_path, tiny_model_dir, mode):
    args = [
        "--model",
        str(tiny_model_dir),
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
    # A newer checkpoint whose shards are truncated is reported and skipped.
    broken = full / "checkpoint-3"
    claim(broken)  # written by molf (a checkpoint molf did not write is not its to load)
    shutil.copytree(full / "checkpoint-2", broken)
    for shard in broken.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    res = torchrun(["--output-dir", str(full), "--resume", *args])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skipping checkpoint-3" in res.stdout and "resumed from checkpoint-2" in res.stdout
    _assert_close(_weights(full), expected, rtol=1e-6)
    steps = [json.loads(x)["step"] for x in (full / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def _read_lines(stream, lines: list[tuple[float, str]]) -> None:
    """Collect a process's output lines with the time each arrived."""
    for line in stream:
        lines.append((time.monotonic(), line))


DIST_TIMEOUT = 20.0
# torchrun's agent sends SIGTERM to the remaining workers when one fails and SIGKILLs
# them 30 s later; a stopped worker ignores SIGTERM until then.
AGENT_GRACE = 30.0


def test_a_dead_rank_ends_the_run_with_an_error(tmp_path, tiny_model_dir):
    """A rank that stops answering (SIGSTOP: its sockets stay open and torchrun's agent
    sees a live process) must end the run through the survivors' collective timeout,
    ``--dist-timeout`` after it stopped: not before, and not never."""
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
        str(tiny_model_dir),
        "--output-dir",
        str(out),
        "--batch-size",
        "2",
        "--lora-ranks",
        "4",
        "--lora-alphas",
        "8",
        "--dist-timeout",
        str(DIST_TIMEOUT),
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
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True)
    reader.start()
    workers: list[psutil.Process] = []
    try:
        log = out / "train_log.jsonl"
        deadline = time.monotonic() + 180
        while not (log.exists() and log.read_text().count("\n") >= 2):
            assert proc.poll() is None, "the run ended before training: " + _text(lines)
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.5)
        workers = [
            c
            for c in psutil.Process(proc.pid).children(recursive=True)
            if "molf" in " ".join(c.cmdline())
        ]
        victim = next(w for w in workers if w.environ().get("RANK") == "1")
        stopped = time.monotonic()
        os.kill(victim.pid, signal.SIGSTOP)
        while victim.status() != psutil.STATUS_STOPPED:  # the signal lands asynchronously
            assert time.monotonic() < stopped + 5, victim.status()
            time.sleep(0.01)
        try:
            proc.wait(timeout=DIST_TIMEOUT + AGENT_GRACE + 90)
        except subprocess.TimeoutExpired:
            pytest.fail("the run hung on a stopped rank: " + _text(lines))
        ended = time.monotonic()
        reader.join(timeout=10)
        output = _text(lines)
        assert proc.returncode != 0, output
        # The survivor's collective timed out, after --dist-timeout and with a message
        # saying so, and that is what ended the run.
        ms = f"{DIST_TIMEOUT * 1000:.0f}ms"
        timed_out = [(t, line) for t, line in lines if "timed out" in line.lower()]
        assert timed_out, "no timeout error in the output: " + output
        first, message = timed_out[0]
        waited = first - stopped
        print(
            f"\nfirst timeout error {waited:.1f} s after SIGSTOP, run ended after "
            f"{ended - stopped:.1f} s (--dist-timeout {DIST_TIMEOUT:.0f}): {message.strip()}"
        )
        assert message.startswith("[rank0]") and ms in message, message
        assert waited >= DIST_TIMEOUT - 2, f"failed {waited:.1f} s after the stop: not by timeout"
        assert waited <= 1.5 * DIST_TIMEOUT, f"the timeout took {waited:.1f} s"
        assert ended - stopped <= DIST_TIMEOUT + AGENT_GRACE + 30, "torchrun did not stop"
        root_cause = output.partition("Root Cause")[2].split("====")[0]
        assert "rank      : 0" in root_cause, output  # torchrun blames the survivor
        assert not (out / "final").exists()
    finally:
        for w in workers:  # a stopped worker outlives its parent otherwise
            try:
                w.send_signal(signal.SIGKILL)
                w.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        reader.join(timeout=10)


def _text(lines: list[tuple[float, str]]) -> str:
    return "".join(line for _, line in lines)[-4000:]


def test_fsdp2_rebuilds_the_fused_weight_instead_of_keeping_it():
    """A kept W' would be a whole unsharded weight per layer, alive from forward to
    backward: under FSDP2 the MoLF layers left on ``auto`` rebuild it instead."""
    import torch.distributed as dist
    from helpers import tiny_model

    from molf import MoLFConfig, get_molf_model, molf_modules
    from molf.train.distributed import DistContext, wrap_model

    model = get_molf_model(tiny_model("qwen2"), MoLFConfig(lora_ranks=(4,), lora_alphas=(8,)))
    layers = [layer for _, layer in molf_modules(model)]
    layers[0].fused_weight = "keep"  # a choice the user made stays
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        wrap_model(model, DistContext("fsdp2"))
    finally:
        dist.destroy_process_group()
    assert layers[0].fused_weight == "keep"
    assert {layer.fused_weight for layer in layers[1:]} == {"recompute"}
