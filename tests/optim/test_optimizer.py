"""MoLFAdamW against a slow, per-parameter re-implementation of the paper's equations."""

from __future__ import annotations

import copy
import io
import logging
import math

import pytest
import torch
from helpers import tiny_model

from molf import MoLFAdamW, MoLFConfig, MolfError, get_molf_model, molf_modules

BETAS, EPS = (0.9, 0.999), 1e-8


class ReferenceMoLF:
    """The equations, written out one parameter at a time, in float64."""

    def __init__(self, model, lr, lora_lr, wd, lora_wd):
        cfg = model.molf_config
        self.k, self.score = cfg.top_k, cfg.score
        self.experts = []  # per module: list of (expert params, lr, weight decays)
        self.params = {}  # name -> float64 copy
        self.state = {}
        named = {id(p): n for n, p in model.named_parameters()}
        inside = set()
        for _, layer in molf_modules(model):
            row = []
            if cfg.train_base:
                b = layer.base_layer
                ps = [(named[id(b.weight)], wd)] + (
                    [(named[id(b.bias)], 0.0)] if b.bias is not None else []
                )
                row.append((ps, "lr"))
            for a, bb in zip(layer.lora_A, layer.lora_B):
                row.append(([(named[id(a)], lora_wd), (named[id(bb)], lora_wd)], "lora_lr"))
            self.experts.append(row)
            inside |= {id(p) for p in layer.parameters()}
        self.others = [
            (n, wd if p.ndim >= 2 else 0.0)
            for n, p in model.named_parameters()
            if p.requires_grad and id(p) not in inside
        ]
        self.lrs = {"lr": lr, "lora_lr": lora_lr}
        for n, p in model.named_parameters():
            if p.requires_grad:
                self.params[n] = p.detach().double().clone()
                self.state[n] = [
                    torch.zeros_like(self.params[n]),
                    torch.zeros_like(self.params[n]),
                    0,
                ]

    def _moments(self, n, g):
        m, v, t = self.state[n]
        m.mul_(BETAS[0]).add_(g, alpha=1 - BETAS[0])
        v.mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
        self.state[n][2] = t + 1

    def _adamw(self, n, lr, wd):
        m, v, t = self.state[n]
        p = self.params[n]
        p.mul_(1 - lr * wd)
        m_hat = m / (1 - BETAS[0] ** t)
        v_hat = v / (1 - BETAS[1] ** t)
        p.sub_(lr * m_hat / (v_hat.sqrt() + EPS))

    def step(self, grads, lr_scale=1.0):
        for n, g in grads.items():
            self._moments(n, g.double())
        selections, scores = [], []
        for row in self.experts:
            s = []
            for ps, lr_key in row:
                lr = self.lrs[lr_key] * lr_scale
                total, count = 0.0, 0
                for n, _ in ps:
                    m, v, _ = self.state[n]
                    if self.score == "epd":
                        total += float((m * m / (v.sqrt() + EPS)).sum()) * lr
                    else:
                        total += float(((m / (v.sqrt() + EPS)) ** 2).sum())
                    count += m.numel()
                s.append(total / count if self.score == "epd" else math.sqrt(total / count))
            order = sorted(range(len(s)), key=lambda e: (-s[e], e))
            winners = set(order[: self.k])
            for e, (ps, lr_key) in enumerate(row):
                if e in winners:
                    for n, wd in ps:
                        self._adamw(n, self.lrs[lr_key] * lr_scale, wd)
            selections.append([e in winners for e in range(len(s))])
            scores.append(s)
        for n, wd in self.others:
            self._adamw(n, self.lrs["lr"] * lr_scale, wd)
        return torch.tensor(selections), torch.tensor(scores, dtype=torch.float64)


def _batch(step: int, vocab: int = 96) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, vocab, (2, 12), generator=g)


def _grads(model, step):
    model.zero_grad(set_to_none=True)
    x = _batch(step)
    model(x, labels=x).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


CASES = {
    "epd-k1-molf": dict(lora_ranks=(4,), lora_alphas=(8,), top_k=1, score="epd"),
    "pfn-k1-molf": dict(lora_ranks=(4,), lora_alphas=(8,), top_k=1, score="pfn"),
    "epd-k2-three": dict(lora_ranks=(4, 8), lora_alphas=(8, 32), top_k=2, score="epd"),
    "pfn-k2-three": dict(lora_ranks=(4, 8), lora_alphas=(8, 32), top_k=2, score="pfn"),
    "epd-molf-e": dict(
        lora_ranks=(2, 8), lora_alphas=(10, 16), top_k=1, score="epd", train_base=False
    ),
    "pfn-molf-e": dict(
        lora_ranks=(2, 8),
        lora_alphas=(10, 16),
        top_k=1,
        score="pfn",
        train_base=False,
        train_non_linear=False,
    ),
}


def _against_reference(
    model, implementation, scheduled, steps=22, tol=(1e-6, 1e-7), score_rtol=1e-4
):
    """Train ``model`` with MoLFAdamW and with the float64 reference side by side on the
    same gradients; every step, the same routing, scores and weights. Returns the
    optimizer and the set of routing rows seen."""
    lr, lora_lr, wd, lora_wd = 1e-2, 8e-3, 0.1, 0.01
    ref = ReferenceMoLF(model, lr, lora_lr, wd, lora_wd)
    opt = MoLFAdamW(
        model,
        lr=lr,
        lora_lr=lora_lr,
        weight_decay=wd,
        lora_weight_decay=lora_wd,
        betas=BETAS,
        eps=EPS,
        implementation=implementation,
    )
    warm = lambda s: min(1.0, (s + 1) / 5) * (0.5 if s > 12 else 1.0)  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warm) if scheduled else None
    names = dict(model.named_parameters())
    winners_seen = set()
    for step in range(steps):
        grads = _grads(model, step)
        scale = warm(step) if scheduled else 1.0
        ref_sel, ref_scores = ref.step(grads, scale)
        opt.step()
        if sched is not None:
            sched.step()
        routing = opt.last_routing
        assert torch.equal(routing.selected.cpu(), ref_sel), f"step {step}"
        torch.testing.assert_close(routing.scores.double(), ref_scores, rtol=score_rtol, atol=1e-30)
        winners_seen |= {tuple(r) for r in ref_sel.tolist()}
        for n, p_ref in ref.params.items():
            torch.testing.assert_close(
                names[n].detach().double(),
                p_ref,
                rtol=tol[0],
                atol=tol[1],
                msg=lambda m, n=n, step=step: f"{n} at step {step}: {m}",
            )
    return opt, winners_seen


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("scheduled", [False, True])
# auto: the CPU kernel if built; reference: molf.optim.reference, the library's own spec
@pytest.mark.parametrize("implementation", ["auto", "foreach", "reference"])
def test_matches_reference(case, scheduled, implementation):
    arch = "qwen2" if "three" in case else "llama"  # qwen2: FFT experts with biases
    model = get_molf_model(tiny_model(arch), MoLFConfig(**CASES[case]))
    opt, winners_seen = _against_reference(model, implementation, scheduled)
    from molf.optim import cpu_kernel

    # "auto" is the CPU kernel wherever it can be built: load() raises when a compiler
    # fails, and CI (MOLF_REQUIRE_CPU_KERNEL=1) also fails without one, so a broken
    # kernel cannot pass here as a silent foreach run.
    built = implementation == "auto" and cpu_kernel.load() is not None
    expected = "cpu_kernel" if built else "foreach" if implementation == "auto" else implementation
    assert opt.last_implementation == expected
    if case != "pfn-k1-molf":  # PFN is scale-free and always picks FFT on this model
        assert len(winners_seen) > 1, "routing never changed: the test would not catch a mix-up"


@pytest.mark.parametrize("case", ["epd-k2-three", "pfn-k2-three", "epd-molf-e"])
@pytest.mark.parametrize("implementation", ["auto", "reference"])
def test_float64_model_matches_reference(case, implementation):
    """float64 models (what numerics are checked in) train with float64 moments,
    updates and scores: the reference's weights to ~1e-12, not float32's 1e-6."""
    arch = "qwen2" if "three" in case else "llama"
    model = get_molf_model(tiny_model(arch).double(), MoLFConfig(**CASES[case]))
    assert all(p.dtype == torch.float64 for p in model.parameters())
    opt, winners_seen = _against_reference(
        model, implementation, scheduled=True, steps=12, tol=(1e-10, 1e-12), score_rtol=1e-9
    )
    # auto: foreach, since the CPU kernel takes float32 only
    assert opt.last_implementation == ("foreach" if implementation == "auto" else implementation)
    assert opt.last_routing.scores.dtype == torch.float64
    assert all(st["exp_avg_sq"].dtype == torch.float64 for st in opt.state.values())
    if case != "pfn-k2-three":
        assert len(winners_seen) > 1


def test_top_k_all_experts_is_adamw():
    model = get_molf_model(
        tiny_model("qwen2"), MoLFConfig(lora_ranks=(4, 8), lora_alphas=(8, 8), top_k=3)
    )
    twin = copy.deepcopy(model)
    opt = MoLFAdamW(model, lr=1e-2, lora_lr=3e-3, weight_decay=0.1, lora_weight_decay=0.02)
    groups = [
        {
            "params": [dict(twin.named_parameters())[n] for n in _names(model, g["params"])],
            "lr": g["lr"],
            "weight_decay": g["weight_decay"],
        }
        for g in opt.param_groups
    ]
    ref = torch.optim.AdamW(groups, betas=BETAS, eps=EPS, foreach=False)
    tw = dict(twin.named_parameters())
    for step in range(15):
        model.zero_grad()
        x = _batch(step)
        model(x, labels=x).loss.backward()
        for n, p in model.named_parameters():  # the same gradients for both optimizers
            tw[n].grad = p.grad.clone()
        opt.step()
        ref.step()
        assert opt.last_routing.selected.all()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)


def _names(model, params):
    ids = {id(p): n for n, p in model.named_parameters()}
    return [ids[id(p)] for p in params]


def test_param_groups_and_epd_scores_use_the_scheduled_lr():
    """EPD's lr_e is each group's lr at the time of the step, as a scheduler set it: fed
    the same gradients (so the same moments), a scheduled optimizer's FFT and LoRA scores
    are an unscheduled twin's times that step's factor of their own group."""
    model = get_molf_model(tiny_model("qwen2"), MoLFConfig(lora_ranks=(4,), lora_alphas=(8,)))
    twin = copy.deepcopy(model)
    kw = dict(lr=1e-3, lora_lr=5e-3, weight_decay=0.1, lora_weight_decay=0.01)
    opt, plain = MoLFAdamW(model, **kw), MoLFAdamW(twin, **kw)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert list(by_name) == ["fft", "fft_bias", "lora0", "other", "other_no_decay"]
    assert (
        by_name["fft_bias"]["weight_decay"] == 0.0
        and by_name["other_no_decay"]["weight_decay"] == 0.0
    )
    assert by_name["lora0"]["lr"] == 5e-3 and by_name["lora0"]["weight_decay"] == 0.01
    assert opt.score == "epd" and opt.last_routing is None
    fft_factor = [1.0, 0.5, 0.25, 3.0, 0.01]
    lora_factor = [1.0, 2.0, 0.1, 0.5, 40.0]
    factors = {name: lora_factor if name == "lora0" else fft_factor for name in by_name}
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, [lambda s, f=factors[g["name"]]: f[s % len(f)] for g in opt.param_groups]
    )
    twin_params = dict(twin.named_parameters())
    for step in range(len(fft_factor)):
        assert by_name["fft"]["lr"] == pytest.approx(1e-3 * fft_factor[step])
        assert by_name["fft_bias"]["lr"] == pytest.approx(1e-3 * fft_factor[step])
        assert by_name["lora0"]["lr"] == pytest.approx(5e-3 * lora_factor[step])
        for n, g in _grads(model, step).items():
            twin_params[n].grad = g
        opt.step()
        plain.step()
        sched.step()
        got, want = opt.last_routing.scores, plain.last_routing.scores
        assert opt.last_routing.experts == ["fft", "lora0"]
        for e, f in ((0, fft_factor[step]), (1, lora_factor[step])):
            where = f"step {step}, expert {e}"
            torch.testing.assert_close(
                got[:, e], want[:, e] * f, rtol=1e-5, atol=0, msg=lambda m, w=where: f"{w}: {m}"
            )
        winners = (want * torch.tensor([fft_factor[step], lora_factor[step]])).argmax(1)
        assert torch.equal(opt.last_routing.selected.float().argmax(1), winners), step


def _train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        model.zero_grad()
        x = _batch(step)
        model(x, labels=x).loss.backward()
        opt.step()


def test_resume_is_bit_identical():
    cfg = MoLFConfig(lora_ranks=(4, 8), lora_alphas=(8, 8), top_k=1)
    model = get_molf_model(tiny_model(), cfg)
    opt = MoLFAdamW(model, lr=1e-2, lora_lr=2e-2, weight_decay=0.1)
    _train(model, opt, 5)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    sd = opt.state_dict()
    assert all(not isinstance(v, torch.Tensor) for g in sd["param_groups"] for v in g.values())
    assert not any(isinstance(v, torch.Tensor) for k, v in sd.items() if k != "state")
    _train(model, opt, 10, start=5)

    buf.seek(0)
    saved = torch.load(buf)
    fresh = get_molf_model(tiny_model(seed=7), cfg)
    fresh.load_state_dict(saved["model"])
    fresh_opt = MoLFAdamW(fresh, lr=1e-2, lora_lr=2e-2, weight_decay=0.1)
    fresh_opt.load_state_dict(saved["opt"])
    _train(fresh, fresh_opt, 10, start=5)
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n


def test_non_finite_gradient_skips_the_whole_step(caplog):
    model = get_molf_model(tiny_model(), MoLFConfig(lora_ranks=(4,), lora_alphas=(8,)))
    opt = MoLFAdamW(model, lr=1e-2)
    _train(model, opt, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = copy.deepcopy(opt.state_dict()["state"])
    model.zero_grad()
    x = _batch(9)
    model(x, labels=x).loss.backward()
    next(iter(dict(molf_modules(model)).values())).lora_B[0].grad[0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="molf"):
        opt.step()
    assert opt.skipped_steps == 1
    assert "non-finite" in caplog.text
    assert not opt.last_routing.selected.any()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            assert torch.equal(v, state[i][k]), (i, k)
    model.zero_grad()
    model(x, labels=x).loss.backward()
    opt.step()
    assert opt.skipped_steps == 1 and opt.last_routing.selected.any()


def test_expert_without_gradient_takes_no_part():
    model = get_molf_model(
        tiny_model(), MoLFConfig(lora_ranks=(4, 4), lora_alphas=(64, 64), top_k=2)
    )
    opt = MoLFAdamW(model, lr=1e-6, lora_lr=1e-1)
    frozen = [layer.lora_A[1] for _, layer in molf_modules(model)] + [
        layer.lora_B[1] for _, layer in molf_modules(model)
    ]
    for step in range(3):
        model.zero_grad()
        x = _batch(step)
        model(x, labels=x).loss.backward()
        for p in frozen:
            p.grad = None
        opt.step()
        sel = opt.last_routing.selected
        assert not sel[:, 2].any() and sel[:, :2].all()
    assert all(p not in opt.state for p in frozen)


def test_ties_go_to_the_lower_index():
    from molf.optim import select_top_k

    scores = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 2.0], [3.0, 1.0, 3.0]])
    every = torch.ones_like(scores, dtype=torch.bool)
    assert select_top_k(scores, every, 1).tolist() == [
        [True, False, False],
        [False, True, False],
        [True, False, False],
    ]
    assert select_top_k(scores, every, 2).tolist() == [
        [True, True, False],
        [False, True, True],
        [True, False, True],
    ]
    part = torch.tensor([[False, True, True]] * 3)
    assert select_top_k(scores, part, 1).tolist() == [
        [False, True, False],
        [False, True, False],
        [False, False, True],
    ]


def test_rejects_a_model_without_molf_layers():
    with pytest.raises(MolfError, match="get_molf_model"):
        MoLFAdamW(tiny_model(), lr=1e-3)


# ---------------------------------------------------------------- non-finite scores

NAN, INF = float("nan"), float("inf")


def test_select_top_k_never_picks_a_non_finite_score():
    from molf.optim import select_top_k

    scores = torch.tensor(
        [
            [NAN, 1.0, 2.0],
            [INF, 1.0, 2.0],
            [-INF, NAN, 0.0],
            [NAN, NAN, NAN],
            [INF, -INF, NAN],
            [1.0, NAN, 1.0],
        ]
    )
    every = torch.ones_like(scores, dtype=torch.bool)
    assert select_top_k(scores, every, 1).tolist() == [
        [False, False, True],
        [False, False, True],
        [False, False, True],
        [False, False, False],
        [False, False, False],
        [True, False, False],
    ]
    assert select_top_k(scores, every, 2).tolist() == [
        [False, True, True],
        [False, True, True],
        [False, False, True],
        [False, False, False],
        [False, False, False],
        [True, False, True],
    ]
    part = torch.tensor([[True, True, False]] * 6)
    assert select_top_k(scores, part, 1)[:, 2].sum() == 0


def _implementations():
    from molf.optim import cpu_kernel

    kernel = cpu_kernel.load() is not None
    return [
        "foreach",
        pytest.param("cpu_kernel", marks=pytest.mark.skipif(not kernel, reason="no C compiler")),
    ]


def _snapshot(model, opt):
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {
        n: {k: v.clone() for k, v in opt.state[p].items()}
        for n, p in model.named_parameters()
        if p in opt.state
    }
    return weights, state


@pytest.mark.parametrize("implementation", _implementations())
def test_non_finite_scores_never_win(implementation):
    """A NaN or infinite EPD score (here from a NaN or infinite learning rate) never
    wins; a layer whose experts all score NaN updates none of them, while their moments
    and step counts move as usual and the parameters outside MoLF layers still train."""
    model = get_molf_model(
        tiny_model("qwen2"), MoLFConfig(lora_ranks=(4,), lora_alphas=(8,), top_k=1)
    )
    opt = MoLFAdamW(model, lr=1e-2, lora_lr=1e-2, implementation=implementation)
    groups = {g["name"]: g for g in opt.param_groups}
    inside = {n for n, _ in model.named_parameters() if ".lora_" in n or ".base_layer." in n}
    lora = {n for n in inside if ".lora_" in n}
    _train(model, opt, 2)
    num_modules = len(opt.last_routing.modules)

    for bad in (NAN, INF):  # LoRA scores non-finite: FFT wins every layer
        groups["lora0"]["lr"] = bad
        before, _ = _snapshot(model, opt)
        _train(model, opt, 1, start=2)
        assert opt.last_implementation == implementation
        assert opt.last_routing.selected.tolist() == [[True, False]] * num_modules, bad
        for n, p in model.named_parameters():
            assert torch.isfinite(p).all(), n
            assert torch.equal(p, before[n]) == (n in lora), n

    for key in ("fft", "fft_bias", "lora0"):  # every expert of every layer scores NaN
        groups[key]["lr"] = NAN
    before, state = _snapshot(model, opt)
    model.zero_grad()
    x = _batch(3)
    model(x, labels=x).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    assert opt.last_routing.scores.isnan().all()
    assert not opt.last_routing.selected.any()
    assert opt.skipped_steps == 0
    b1, b2 = BETAS
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in inside), n  # others: plain AdamW at lr
        st, old, g = opt.state[p], state[n], grads[n]
        assert st["step"].item() == old["step"].item() + 1, n
        torch.testing.assert_close(st["exp_avg"], b1 * old["exp_avg"] + (1 - b1) * g, msg=n)
        torch.testing.assert_close(
            st["exp_avg_sq"], b2 * old["exp_avg_sq"] + (1 - b2) * g * g, msg=n
        )

    for key in ("fft", "fft_bias", "lora0"):
        groups[key]["lr"] = 1e-2
    _train(model, opt, 1, start=4)
    assert opt.last_routing.selected.sum(1).tolist() == [1] * num_modules
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- betas and eps


@pytest.mark.parametrize("implementation", _implementations())
def test_betas_and_eps_set_in_every_group_take_effect(implementation):
    """Changing betas and eps in every group (as a momentum schedule does) is the same
    as constructing the optimizer with them."""
    cfg = MoLFConfig(lora_ranks=(4, 8), lora_alphas=(8, 32), top_k=1)
    model = get_molf_model(tiny_model("qwen2"), cfg)
    twin = copy.deepcopy(model)
    kw = dict(lr=1e-2, lora_lr=8e-3, implementation=implementation)
    opt = MoLFAdamW(model, **kw)
    ref = MoLFAdamW(twin, betas=(0.8, 0.99), eps=1e-6, **kw)
    for g in opt.param_groups:
        g["betas"], g["eps"] = (0.8, 0.99), 1e-6
    for step in range(6):
        _train(model, opt, 1, start=step)
        _train(twin, ref, 1, start=step)
        assert torch.equal(opt.last_routing.selected, ref.last_routing.selected)
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n


def test_groups_with_different_betas_or_eps_are_refused():
    model = get_molf_model(tiny_model(), MoLFConfig(lora_ranks=(4,), lora_alphas=(8,)))
    opt = MoLFAdamW(model, lr=1e-2)
    _train(model, opt, 1)
    before, state = _snapshot(model, opt)
    groups = {g["name"]: g for g in opt.param_groups}
    for key, value in (("betas", (0.5, 0.999)), ("eps", 1e-6)):
        old = groups["lora0"][key]
        groups["lora0"][key] = value
        model.zero_grad()
        x = _batch(1)
        model(x, labels=x).loss.backward()
        with pytest.raises(MolfError, match="same betas and eps"):
            opt.step()
        groups["lora0"][key] = old
    for n, p in model.named_parameters():  # nothing moved
        assert torch.equal(p, before[n]), n
        for k, v in state.get(n, {}).items():
            assert torch.equal(opt.state[p][k], v), (n, k)

    extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(MolfError, match="same betas and eps"):
        opt.add_param_group({"params": [extra], "betas": (0.5, 0.9)})
    assert len(opt.param_groups) == len(groups)
    opt.add_param_group({"params": [extra], "name": "extra"})  # the shared betas: fine
    assert opt.param_groups[-1]["betas"] == BETAS
    for g in opt.param_groups:  # out-of-range values set after construction
        g["betas"] = (1.0, 0.999)
    with pytest.raises(MolfError, match=r"betas must be"):
        opt.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to move to")
def test_built_before_the_model_moves_to_cuda_it_steps_there_like_one_built_after():
    """The Trainer pattern: the optimizer is built on the CPU model, then the model moves."""
    cfg = MoLFConfig(lora_ranks=(4, 8), lora_alphas=(8, 8))
    early = get_molf_model(tiny_model(), cfg)
    early_opt = MoLFAdamW(early, lr=1e-2, lora_lr=2e-2)
    early.cuda()
    late = get_molf_model(tiny_model(), cfg).cuda()
    late_opt = MoLFAdamW(late, lr=1e-2, lora_lr=2e-2)
    for model, opt in ((early, early_opt), (late, late_opt)):
        for step in range(3):
            model.zero_grad()
            x = _batch(step).cuda()
            model(x, labels=x).loss.backward()
            opt.step()
    assert early_opt.last_implementation == late_opt.last_implementation
    assert early_opt.skipped_steps == 0
    for (n, p), q in zip(early.named_parameters(), late.parameters()):
        assert p.device.type == "cuda" and torch.equal(p, q), n


def test_state_loaded_into_a_used_optimizer_and_changing_gradient_sets_are_picked_up():
    """The step keeps its gathered tensors between steps: a state loaded into an
    optimizer that already stepped, and an expert whose gradient comes and goes, must
    give what a fresh optimizer gives."""
    cfg = MoLFConfig(lora_ranks=(4, 8), lora_alphas=(8, 8), top_k=1)
    model = get_molf_model(tiny_model(), cfg)
    opt = MoLFAdamW(model, lr=1e-2, lora_lr=2e-2)
    _train(model, opt, 2)
    snapshot = copy.deepcopy((model.state_dict(), opt.state_dict()))
    _train(model, opt, 3, start=2)  # moves on with the gathered state
    model.load_state_dict(snapshot[0])
    opt.load_state_dict(copy.deepcopy(snapshot[1]))  # (loading keeps the tensors given)
    fresh = get_molf_model(tiny_model(seed=5), cfg)
    fresh.load_state_dict(snapshot[0])
    fresh_opt = MoLFAdamW(fresh, lr=1e-2, lora_lr=2e-2)
    fresh_opt.load_state_dict(copy.deepcopy(snapshot[1]))
    dropped = {id(layer.lora_B[1]) for _, layer in molf_modules(model)}
    dropped |= {id(layer.lora_B[1]) for _, layer in molf_modules(fresh)}
    for step in range(2, 6):
        for m, o in ((model, opt), (fresh, fresh_opt)):
            m.zero_grad()
            x = _batch(step)
            m(x, labels=x).loss.backward()
            if step == 3:  # one expert's B has no gradient for one step
                for p in m.parameters():
                    if id(p) in dropped:
                        p.grad = None
            o.step()
        assert torch.equal(opt.last_routing.selected, fresh_opt.last_routing.selected)
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n
