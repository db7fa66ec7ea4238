"""GPU checks and benchmarks for a device machine (one CUDA GPU), in one short run.

Sections (each in its own try/except: an error is recorded and the run goes on):

1. ``layer``: MoLFLinear's fused (gradient-from-dW) path against the dual path on the
   GPU, fp32 and bf16 autocast, at Qwen2.5-1.5B MLP shapes;
2. ``optimizer``: MoLFAdamW on the GPU against ``implementation="reference"`` (the
   slow float64 spec, one tensor at a time) for a few steps (EPD, PFN, MoLF-E);
3. ``sync``: ``torch.cuda.set_sync_debug_mode("error")`` around ``MoLFAdamW.step()``
   after warm-up (also a step with a NaN gradient, and with a scheduler);
4. ``b1``: B1 at Qwen2.5-1.5B shapes (r=128 on every linear layer): MoLFAdamW vs
   AdamW(fused=True) / AdamW(foreach=True), FFT and LoRA winning everywhere;
5. ``b2``: B2 training steps with bf16 autocast: MoLF / FFT and MoLF-E / PEFT LoRA;
6. ``b3``: peak ``torch.cuda.max_memory_allocated`` of a few training steps per config.

Random weights from configs only: nothing is downloaded. Prints a markdown summary and
writes ``gpu_check.json`` and ``gpu_check.md`` to ``$OUT`` if set, else
``benchmarks/out``. ``--smoke`` runs every section at toy shapes on whatever device
there is (the CPU here), to prove the script has no Python errors.

    PYTHONPATH=src python3 -m benchmarks.gpu_check            # on the GPU machine, ~2-4 min
    python -m benchmarks.gpu_check --smoke                     # anywhere, ~1 min
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a script (python benchmarks/gpu_check.py): find benchmarks.*
    sys.path.insert(0, str(ROOT))
try:
    import molf  # noqa: F401
except ImportError:  # not installed on the device machine: use the source tree
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from benchmarks.common import interleaved, ms, table  # noqa: E402
from molf import MoLFAdamW, MoLFConfig, MoLFLinear, get_molf_model  # noqa: E402

SHAPES = {
    # Qwen2.5-1.5B: hidden 1536, MLP 8960, 12 heads, 2 KV heads, vocab 151936, tied.
    "full": dict(
        hidden=1536,
        inter=8960,
        heads=12,
        kv=2,
        vocab=151936,
        layers=28,
        rank=128,
        e_ranks=(32, 128),
        tokens=(4, 1024),
    ),
    "smoke": dict(
        hidden=128,
        inter=384,
        heads=2,
        kv=1,
        vocab=512,
        layers=2,
        rank=32,
        e_ranks=(8, 32),
        tokens=(2, 64),
    ),
}


def implementations(device: torch.device) -> list[str]:
    """MoLFAdamW's implementations worth checking on ``device``."""
    impls = ["foreach"]
    if device.type == "cpu":
        impls.append("cpu_kernel")
    try:
        import triton  # noqa: F401

        if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            impls.append("triton")
    except ImportError:
        pass
    return impls


class Ctx:
    def __init__(self, args):
        self.smoke = args.smoke
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.shape = dict(SHAPES["smoke" if args.smoke else "full"])
        if args.layers:
            self.shape["layers"] = args.layers
        self.cuda = self.device.type == "cuda"
        self.reps = 3 if args.smoke else args.reps
        self.impls = implementations(self.device)

    def config(self, layers=None):
        from transformers import Qwen2Config

        s = self.shape
        return Qwen2Config(
            vocab_size=s["vocab"],
            hidden_size=s["hidden"],
            intermediate_size=s["inter"],
            num_hidden_layers=layers or s["layers"],
            num_attention_heads=s["heads"],
            num_key_value_heads=s["kv"],
            max_position_embeddings=4096,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            use_cache=False,
        )

    def model(self, layers=None, seed=0):
        from transformers import Qwen2ForCausalLM

        torch.manual_seed(seed)
        with torch.device(self.device):
            return Qwen2ForCausalLM(self.config(layers)).train()


def cleanup(ctx: Ctx) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- 1. layer paths


def section_layer(ctx: Ctx) -> dict:
    s = ctx.shape
    out = {}
    for name, d_in, d_out in (
        ("up_proj", s["hidden"], s["inter"]),
        ("down_proj", s["inter"], s["hidden"]),
    ):
        for autocast in (False, True):
            grads = {}
            for path in ("dual", "fused"):
                torch.manual_seed(0)
                base = torch.nn.Linear(d_in, d_out, device=ctx.device)
                layer = MoLFLinear(base, (s["rank"],), (32 / s["rank"] ** 0.5,), grad_path=path)
                with torch.no_grad():
                    layer.lora_B[0].normal_(0, 0.02)
                g = torch.Generator(device=ctx.device).manual_seed(1)
                x = torch.randn(2, 256, d_in, device=ctx.device, generator=g, requires_grad=True)
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=autocast):
                    y = layer(x)
                    (y.float().sin() * 0.01).sum().backward()
                grads[path] = {
                    "y": y.detach().float(),
                    "x": x.grad.float(),
                    **{n: p.grad.float() for n, p in layer.named_parameters()},
                }
            errs = {
                k: float((grads["fused"][k] - v).norm() / v.norm().clamp_min(1e-30))
                for k, v in grads["dual"].items()
            }
            tol = 2e-2 if autocast else 1e-4
            out[f"{name}-{'bf16-autocast' if autocast else 'fp32'}"] = {
                "max_rel_err": max(errs.values()),
                "errors": errs,
                "tolerance": tol,
                "ok": max(errs.values()) <= tol,
            }
    return {"ok": all(v["ok"] for v in out.values()), "cases": out}


# ---------------------------------------------------------------- 2. optimizer


def section_optimizer(ctx: Ctx) -> dict:
    """Each implementation against ``implementation="reference"`` (float64, one tensor
    at a time) on twin models fed the same gradients: same routing, weights to 1e-5."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tiny = Qwen2Config(  # q/k/v carry biases: FFT experts of two tensors
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    cases = {
        "epd-k1": dict(lora_ranks=(4,), lora_alphas=(8,), score="epd"),
        "pfn-k2-three": dict(lora_ranks=(4, 8), lora_alphas=(8, 32), top_k=2, score="pfn"),
        "molf-e": dict(lora_ranks=(2, 8), lora_alphas=(10, 16), train_base=False),
    }
    hyper = dict(lr=1e-2, lora_lr=8e-3, weight_decay=0.1, lora_weight_decay=0.01)
    out = {}
    for impl, (case, kw) in ((i, c) for i in ctx.impls for c in cases.items()):
        torch.manual_seed(0)
        model = get_molf_model(Qwen2ForCausalLM(tiny).to(ctx.device), MoLFConfig(**kw))
        twin = copy.deepcopy(model)
        opt = MoLFAdamW(model, implementation=impl, **hyper)
        ref = MoLFAdamW(twin, implementation="reference", **hyper)
        worst, routing_ok, seen = 0.0, True, set()
        for step in range(8):
            g = torch.Generator().manual_seed(1000 + step)
            x = torch.randint(0, 96, (2, 12), generator=g).to(ctx.device)
            model.zero_grad(set_to_none=True)
            model(x, labels=x).loss.backward()
            for p, p_ref in zip(model.parameters(), twin.parameters()):  # the same gradients
                p_ref.grad = None if p.grad is None else p.grad.clone()
            opt.step()
            ref.step()
            ref_sel = ref.last_routing.selected
            routing_ok &= torch.equal(opt.last_routing.selected, ref_sel)
            seen |= {tuple(r) for r in ref_sel.tolist()}
            for p, p_ref in zip(model.parameters(), twin.parameters()):
                err = (p.detach() - p_ref.detach()).abs().max() / p_ref.detach().abs().max()
                worst = max(worst, float(err))
        out[f"{impl}/{case}"] = {
            "max_rel_err": worst,
            "routing_equal": bool(routing_ok),
            "routings_seen": len(seen),
            "implementation": opt.last_implementation,
            "ok": bool(routing_ok) and worst <= 1e-5 and opt.last_implementation == impl,
        }
    return {"ok": all(v["ok"] for v in out.values()), "cases": out}


# ---------------------------------------------------------------- 3. sync


def section_sync(ctx: Ctx) -> dict:
    """On the CPU (--smoke) the same steps run, unguarded: only the code is exercised."""
    out = {}
    configs = {
        "molf-epd": dict(lora_ranks=(ctx.shape["rank"],), lora_alphas=(32,)),
        "molf-pfn-k2": dict(lora_ranks=(16, 64), lora_alphas=(16, 64), top_k=2, score="pfn"),
        "molf-e": dict(lora_ranks=ctx.shape["e_ranks"], lora_alphas=(32, 32), train_base=False),
    }
    for impl, (name, kw) in ((i, c) for i in ctx.impls for c in configs.items()):
        name = f"{impl}/{name}"
        model = get_molf_model(ctx.model(layers=2), MoLFConfig(**kw))
        opt = MoLFAdamW(model, lr=1e-4, implementation=impl)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        x = torch.randint(0, ctx.shape["vocab"], (2, 64), device=ctx.device)
        result = {}
        for step in range(5):
            model.zero_grad(set_to_none=True)
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
                model(input_ids=x, labels=x).loss.backward()
            if step == 4:  # a non-finite gradient: the step is skipped, still sync-free
                next(p for p in model.parameters() if p.grad is not None).grad[0].fill_(
                    float("nan")
                )
            if ctx.cuda:
                torch.cuda.synchronize()
                if step >= 2:
                    torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
                routing = opt.last_routing  # reading the routing object must not sync either
                _ = (routing.scores, routing.selected)
                result[f"step{step}"] = "ok"
            except RuntimeError as exc:
                result[f"step{step}"] = f"SYNC: {exc}"
            finally:
                if ctx.cuda:
                    torch.cuda.set_sync_debug_mode(0)
            sched.step()
        result["skipped_steps"] = opt.skipped_steps  # reading it syncs: outside the guard
        result["implementation"] = opt.last_implementation
        result["ok"] = all(v == "ok" for k, v in result.items() if k.startswith("step")) and (
            result["skipped_steps"] == 1
        )
        out[name] = result
        del model, opt
        cleanup(ctx)
    res = {"ok": all(v["ok"] for v in out.values()), "cases": out}
    if not ctx.cuda:
        res["skipped"] = "no CUDA device: steps ran, but unguarded by the sync debug mode"
    return res


# ---------------------------------------------------------------- 4. B1


def section_b1(ctx: Ctx) -> dict:
    s = ctx.shape
    model = get_molf_model(ctx.model(), MoLFConfig(lora_ranks=(s["rank"],), lora_alphas=(32,)))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p).mul_(1e-3)
    out = {
        "params": sum(p.numel() for p in params),
        "tensors": len(params),
        "layers": s["layers"],
        "routings": {},
    }
    for routing, (lr, lora_lr) in {
        "fft-everywhere": (1e-4, 1e-12),
        "lora-everywhere": (1e-12, 1e-4),
    }.items():
        molfs = {i: MoLFAdamW(model, lr=lr, lora_lr=lora_lr, implementation=i) for i in ctx.impls}
        variants = {f"molf-{i}": opt.step for i, opt in molfs.items()}
        variants["adamw-fused"] = torch.optim.AdamW(params, lr=lr, fused=True).step
        variants["adamw-foreach"] = torch.optim.AdamW(params, lr=lr, foreach=True).step
        stats = interleaved(
            variants, reps=ctx.reps, warmup=2, device=ctx.device, baseline="adamw-fused"
        )
        for v in stats.values():
            v.pop("samples_s")
        last = molfs[ctx.impls[-1]].last_routing
        out["routings"][routing] = {
            "stats": stats,
            "implementations": {i: o.last_implementation for i, o in molfs.items()},
            "winner_fraction": dict(zip(last.experts, last.selected.float().mean(0).tolist())),
        }
        del variants, molfs
        cleanup(ctx)
    return out


# ---------------------------------------------------------------- 5./6. B2, B3


def _variant(ctx: Ctx, kind: str, base, impl: str = "auto", fresh: bool = True):
    """(model, optimizer) for ``kind``; from a copy of ``base`` unless not ``fresh``."""
    s = ctx.shape
    model = copy.deepcopy(base) if fresh else base
    if kind == "fft":
        model.requires_grad_(True)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    if kind == "molf":
        model = get_molf_model(model, MoLFConfig(lora_ranks=(s["rank"],), lora_alphas=(32,)))
        return model, MoLFAdamW(model, lr=1e-5, lora_lr=1e-4, implementation=impl)
    if kind == "molf-e":
        cfg = MoLFConfig(
            lora_ranks=s["e_ranks"],
            lora_alphas=s["e_ranks"],
            train_base=False,
            train_non_linear=False,
        )
        model = get_molf_model(model, cfg)
        return model, MoLFAdamW(model, lr=1e-4, implementation=impl)
    from peft import LoraConfig, get_peft_model

    r = sum(s["e_ranks"])
    model = get_peft_model(
        model,
        LoraConfig(
            r=r, lora_alpha=r, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"
        ),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4, fused=True)


def _step_fn(ctx: Ctx, model, opt, ids):
    def step():
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _with_fused_weight(model, mode: str, step):
    """``step`` with every MoLF layer's ``fused_weight`` set to ``mode`` for its duration."""
    layers = [m for m in model.modules() if isinstance(m, MoLFLinear)]

    def run():
        before = [layer.fused_weight for layer in layers]
        for layer in layers:
            layer.fused_weight = mode
        try:
            step()
        finally:
            for layer, value in zip(layers, before):
                layer.fused_weight = value

    return run


def _ids(ctx: Ctx):
    b, t = ctx.shape["tokens"]
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, ctx.shape["vocab"], (b, t), generator=g).to(ctx.device)


def section_b2(ctx: Ctx) -> dict:
    """Each pair on one base model; MoLF's model gets one MoLFAdamW per implementation
    (each with its own moments), all timed side by side against the baseline."""
    ids = _ids(ctx)
    out = {"tokens_per_step": ids.numel(), "layers": ctx.shape["layers"], "pairs": {}}
    for kind, baseline in (("molf", "fft"), ("molf-e", "lora")):
        base = ctx.model()
        variants = {baseline: _step_fn(ctx, *_variant(ctx, baseline, base), ids)}
        model, opt = _variant(ctx, kind, base, ctx.impls[0])
        del base
        cleanup(ctx)
        for impl in ctx.impls:
            if impl != ctx.impls[0]:
                opt = MoLFAdamW(model, lr=opt.defaults["lr"], implementation=impl)
            variants[f"{kind}-{impl}"] = _step_fn(ctx, model, opt, ids)
        if kind == "molf":  # the default keeps W' under autocast; the other way beside it
            step = _step_fn(ctx, model, opt, ids)
            variants[f"{kind}-{impl}-recompute"] = _with_fused_weight(model, "recompute", step)
        stats = interleaved(variants, reps=ctx.reps, warmup=2, device=ctx.device, baseline=baseline)
        for v in stats.values():
            v.pop("samples_s")
        out["pairs"][f"{kind}/{baseline}"] = stats
        del variants, model, opt
        cleanup(ctx)
    return out


def section_b3(ctx: Ctx) -> dict:
    """On the CPU (--smoke) the same steps run and every peak reads 0: for B3 on the CPU
    use ``python -m benchmarks.b3_memory``."""
    ids = _ids(ctx)
    cuda = ctx.cuda
    out = {"tokens_per_step": ids.numel(), "configs": {}}
    kinds = [
        ("fft", "auto"),
        *[("molf", i) for i in ctx.impls],
        ("molf-e", "auto"),
        ("lora", "auto"),
    ]
    for kind, impl in kinds:
        cleanup(ctx)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() if cuda else 0
        model, opt = _variant(ctx, kind, ctx.model(), impl, fresh=False)
        step = _step_fn(ctx, model, opt, ids)
        for _ in range(3):
            step()
        peak = torch.cuda.max_memory_allocated() if cuda else 0
        lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        out["configs"][kind if kind != "molf" else f"molf-{impl}"] = {
            "peak_gib": (peak - start) / 2**30,
            "lora_params": lora,
        }
        del model, opt, step
    c = out["configs"]
    lora_states = c[f"molf-{ctx.impls[0]}"]["lora_params"] * 16 / 2**30  # fp32 p, g, m, v
    out["lora_states_gib"] = lora_states
    if not cuda:
        out["skipped"] = "no CUDA device: steps ran, memory not measured"
        return out
    out["molf_ratios"] = {
        i: c[f"molf-{i}"]["peak_gib"] / (c["fft"]["peak_gib"] + lora_states) for i in ctx.impls
    }
    out["molf_e_ratio"] = c["molf-e"]["peak_gib"] / c["lora"]["peak_gib"]
    return out


SECTIONS = {
    "layer": section_layer,
    "optimizer": section_optimizer,
    "sync": section_sync,
    "b1": section_b1,
    "b2": section_b2,
    "b3": section_b3,
}


def summary(result: dict) -> str:
    lines = [
        f"## gpu_check ({result['mode']}) on {result['device']}",
        "",
        f"torch {result['torch']}, {result.get('gpu', 'no GPU')}; "
        f"{result['seconds']:.0f} s in all.",
        "",
    ]
    rows = []
    for name, sec in result["sections"].items():
        r = sec.get("result") or {}
        detail = ""
        if sec["status"] == "error":
            detail = sec["error"].strip().splitlines()[-1][:160]
        elif sec["status"] == "skipped":
            detail = sec.get("error", "")
        elif r.get("skipped"):
            detail = r["skipped"]
        elif name in ("layer", "optimizer", "sync"):
            bad = [k for k, v in r.get("cases", {}).items() if not v.get("ok")]
            detail = f"all {len(r.get('cases', {}))} ok" if r.get("ok") else f"FAILED: {bad}"
        elif name == "b1":
            parts = []
            for routing, x in r["routings"].items():
                st = x["stats"]
                ratios = ", ".join(
                    f"{k} {v['ratio']:.2f}x" for k, v in st.items() if k != "adamw-fused"
                )
                parts.append(f"{routing}: {ratios} (fused {ms(st['adamw-fused']['median_s'])} ms)")
            detail = f"{r['params'] / 1e9:.2f}B params, / AdamW(fused): " + "; ".join(parts)
        elif name == "b2":
            parts = []
            for pair, st in r["pairs"].items():
                base = pair.split("/")[1]
                ratios = ", ".join(
                    f"{k} {v['ratio']:.3f} ({ms(v['median_s'])} ms)"
                    for k, v in st.items()
                    if k != base
                )
                parts.append(f"vs {base} ({ms(st[base]['median_s'])} ms): {ratios}")
            detail = f"{r['tokens_per_step']} tokens, {r['layers']} layers; " + "; ".join(parts)
        elif name == "b3":
            ratios = ", ".join(f"{i} {x:.3f}" for i, x in r["molf_ratios"].items())
            detail = (
                ", ".join(f"{k} {v['peak_gib']:.2f} GiB" for k, v in r["configs"].items())
                + f"; molf / (fft + lora states): {ratios}; molf-e / lora {r['molf_e_ratio']:.3f}"
            )
        rows.append([name, sec["status"], f"{sec['seconds']:.1f}", detail])
    lines.append(table(["section", "status", "s", "result"], rows))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="toy shapes, any device")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (default: all 28)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument(
        "--budget",
        type=float,
        default=270.0,
        help="seconds after which the remaining sections are skipped",
    )
    args = ap.parse_args(argv)
    ctx = Ctx(args)
    if not ctx.cuda and not args.smoke:
        print("no CUDA device: running the --smoke shapes on the CPU instead", file=sys.stderr)
        ctx = Ctx(argparse.Namespace(**{**vars(args), "smoke": True}))
    started = time.perf_counter()
    result = {
        "mode": "smoke" if ctx.smoke else "full",
        "device": str(ctx.device),
        "torch": torch.__version__,
        "shape": {k: list(v) if isinstance(v, tuple) else v for k, v in ctx.shape.items()},
        "sections": {},
    }
    if ctx.cuda:
        result["gpu"] = torch.cuda.get_device_name()
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks stay fp32
    for name in args.sections:
        t0 = time.perf_counter()
        if t0 - started > args.budget:
            result["sections"][name] = {
                "status": "skipped",
                "seconds": 0.0,
                "error": "time budget spent",
            }
            continue
        entry: dict = {}
        try:
            res = SECTIONS[name](ctx)
            entry = {
                "status": "ok" if (res or {}).get("ok", True) is not False else "FAILED",
                "result": res,
            }
        except Exception:  # record and go on: one broken section must not hide the rest
            entry = {"status": "error", "error": traceback.format_exc()}
        finally:
            if ctx.cuda:
                torch.cuda.set_sync_debug_mode(0)
            cleanup(ctx)
        entry["seconds"] = time.perf_counter() - t0
        result["sections"][name] = entry
        print(f"[gpu_check] {name}: {entry['status']} ({entry['seconds']:.1f} s)", flush=True)
    result["seconds"] = time.perf_counter() - started
    md = summary(result)
    out_dir = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / "gpu_check.md").write_text(md + "\n")
    print(md)
    for name, sec in result["sections"].items():
        if sec["status"] == "error":
            print(f"\n--- {name} error ---\n{sec['error']}", file=sys.stderr)
    return 0 if all(s["status"] in ("ok", "skipped") for s in result["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
