"""Building the CPU kernel: "no compiler" falls back (and says so), while a compiler that
fails is an error carrying its output, never a skip or a silent foreach fallback. CI sets
MOLF_REQUIRE_CPU_KERNEL=1, which turns "no compiler" into a failure too."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from helpers import tiny_model

from molf import MoLFAdamW, MoLFConfig, MolfError, get_molf_model
from molf.optim import cpu_kernel

REQUIRED = os.environ.get("MOLF_REQUIRE_CPU_KERNEL") == "1"


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A loader that has not tried yet and builds into this test's own directories."""
    for name, value in (("_kernel", None), ("_tried", False), ("_error", None)):
        monkeypatch.setattr(cpu_kernel, name, value)
    monkeypatch.setattr(cpu_kernel, "unavailable_reason", None)
    monkeypatch.setenv("MOLF_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the fallback directory
    for var in ("CC", "MOLF_CPU_KERNEL", "MOLF_REQUIRE_CPU_KERNEL"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def _need_compiler() -> None:
    if cpu_kernel._find_compiler() is None:
        reason = "no C compiler: cc/gcc on PATH or $CC"
        if REQUIRED:
            pytest.fail(f"MOLF_REQUIRE_CPU_KERNEL=1 but {reason}")
        pytest.skip(reason)


def _model():
    return get_molf_model(tiny_model(), MoLFConfig(lora_ranks=(4,), lora_alphas=(8,)))


def _one_step(opt, model) -> None:
    x = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    model(x, labels=x).loss.backward()
    opt.step()


def test_the_kernel_builds_and_runs_where_there_is_a_compiler(fresh, monkeypatch):
    if REQUIRED:
        monkeypatch.setenv("MOLF_REQUIRE_CPU_KERNEL", "1")
    _need_compiler()
    kernel = cpu_kernel.load()  # compiles the current source: raises if it is broken
    assert kernel is not None, cpu_kernel.unavailable_reason
    assert list((fresh / "cache").glob("molf_adamw_*.so")), "not built into $MOLF_CACHE_DIR"
    grads = [torch.ones(5), torch.zeros(40000)]
    assert float(kernel.nonfinite(grads)) == 0.0
    grads[1][33333] = float("inf")
    assert float(kernel.nonfinite(grads)) == 1.0
    model = _model()
    opt = MoLFAdamW(model, lr=1e-3)
    _one_step(opt, model)
    assert opt.last_implementation == "cpu_kernel"


def test_a_compiler_that_fails_is_an_error_with_its_message(fresh, monkeypatch):
    monkeypatch.setenv("CC", "false")  # found on PATH, exits 1 without a word
    with pytest.raises(cpu_kernel.CpuKernelBuildError) as e:
        cpu_kernel.load()
    message = str(e.value)
    assert "false" in message and "status 1" in message and "MOLF_CPU_KERNEL=0" in message
    assert "with OpenMP" in message and "without OpenMP" in message  # both were tried
    assert cpu_kernel.unavailable_reason is None  # not mistaken for "no compiler"

    def never(*_a, **_k):
        raise AssertionError("built again after a failed build")

    monkeypatch.setattr(cpu_kernel, "_build", never)
    with pytest.raises(cpu_kernel.CpuKernelBuildError, match="status 1"):
        cpu_kernel.load()  # every later call fails the same way, without rebuilding
    with pytest.raises(cpu_kernel.CpuKernelBuildError):
        MoLFAdamW(_model(), lr=1e-3)  # "auto" does not hide it behind foreach
    model = _model()
    opt = MoLFAdamW(model, lr=1e-3, implementation="foreach")  # the way around it
    _one_step(opt, model)
    assert opt.last_implementation == "foreach"


def test_a_broken_c_source_fails_with_the_compiler_output(fresh, monkeypatch):
    _need_compiler()
    broken = cpu_kernel._SOURCE + "\n#error molf-test-broken-source\n"
    monkeypatch.setattr(cpu_kernel, "_SOURCE", broken)
    with pytest.raises(cpu_kernel.CpuKernelBuildError) as e:
        cpu_kernel.load()
    assert "molf-test-broken-source" in str(e.value), str(e.value)  # the compiler's words
    assert not list((fresh / "cache").glob("*.so")), "a failed build left a library behind"


def test_no_compiler_falls_back_to_foreach_and_says_why(fresh, monkeypatch):
    monkeypatch.setenv("CC", str(fresh / "no-such-cc"))
    assert cpu_kernel.load() is None
    assert "no C compiler" in cpu_kernel.unavailable_reason
    assert "no-such-cc" in cpu_kernel.unavailable_reason
    model = _model()
    opt = MoLFAdamW(model, lr=1e-3)
    _one_step(opt, model)
    assert opt.last_implementation == "foreach"
    with pytest.raises(MolfError):
        MoLFAdamW(_model(), lr=1e-3, implementation="cpu_kernel")


def test_no_compiler_on_path(fresh, monkeypatch):
    monkeypatch.setenv("PATH", str(fresh / "empty"))
    assert cpu_kernel.load() is None
    assert cpu_kernel.unavailable_reason.startswith("no C compiler")


@pytest.mark.parametrize(
    ("var", "value"), [("CC", "/nonexistent/cc"), ("MOLF_CPU_KERNEL", "0")], ids=["no-cc", "off"]
)
def test_a_required_kernel_turns_the_fallback_into_an_error(fresh, monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    monkeypatch.setenv("MOLF_REQUIRE_CPU_KERNEL", "1")
    with pytest.raises(cpu_kernel.CpuKernelUnavailable, match="MOLF_REQUIRE_CPU_KERNEL=1"):
        cpu_kernel.load()
    with pytest.raises(cpu_kernel.CpuKernelUnavailable):
        MoLFAdamW(_model(), lr=1e-3)
    monkeypatch.delenv("MOLF_REQUIRE_CPU_KERNEL")
    assert cpu_kernel.load() is None  # without the requirement: the foreach fallback
