"""The optimizers: Muon's orthogonalized update against a direct SVD computation, and its SGD
groups against torch.optim.SGD."""

from __future__ import annotations

import pytest
import torch

from cifarlab.optim import Muon, orthogonalize

CUBIC = (1.5, -0.5, 0.0)  # the classic Newton–Schulz iteration: converges to U·Vᵀ exactly


def _polar(g: torch.Tensor) -> torch.Tensor:
    """U·Vᵀ of the thin SVD: the reference."""
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    return u @ vh


@pytest.mark.parametrize("shape", [(8, 5), (5, 8), (6, 6), (16, 27)])
def test_converged_newton_schulz_is_the_svd_polar_factor(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = orthogonalize(g, steps=60, coefficients=CUBIC)
    assert torch.allclose(x, _polar(g), atol=1e-6)


@pytest.mark.parametrize("shape", [(64, 27), (27, 64), (32, 32)])
def test_fast_quintic_keeps_singular_vectors_and_squeezes_singular_values(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    x = orthogonalize(g)  # 5 quintic steps, as Muon uses
    core = u.T @ x @ vh.T  # diagonal when x shares g's singular vectors
    diag = torch.diagonal(core)
    assert (core - torch.diag(diag)).abs().max() < 1e-3
    assert diag.min() > 0.55 and diag.max() < 1.25, diag  # every direction moves about equally
    assert s.max() / s.min() > 3  # while the gradient's did not


def test_muon_step_equals_the_direct_computation():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, bias=False).double()
    w0 = conv.weight.detach().clone()
    grads = [torch.randn_like(w0) for _ in range(2)]
    lr, m, wd = 0.1, 0.6, 0.01
    opt = Muon(conv.parameters(), lr=lr, momentum=m, weight_decay=wd, ns_steps=60,
               ns_coefficients=CUBIC)
    w, buf = w0.clone(), torch.zeros_like(w0)
    for g in grads:
        conv.weight.grad = g.clone()
        opt.step()
        buf = m * buf + g
        look = (g + m * buf).reshape(8, -1)  # Nesterov, as a matrix: 8 × 27
        w = w * (1 - lr * wd) - lr * _polar(look).view_as(w)  # wide: no √(rows/cols) scale
    assert torch.allclose(conv.weight.detach(), w, atol=1e-6)


def test_tall_updates_are_scaled_by_sqrt_rows_over_cols():
    p = torch.nn.Parameter(torch.zeros(32, 8, dtype=torch.float64))
    p.grad = torch.randn(32, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    Muon([p], lr=1.0, momentum=0.0, ns_steps=60, ns_coefficients=CUBIC).step()
    assert torch.allclose(-p.detach(), _polar(p.grad) * 2.0, atol=1e-6)  # √(32/8) = 2


@pytest.mark.parametrize("join_late", [False, True])
def test_sgd_groups_match_torch_sgd(join_late):
    """Exactly with every gradient present; with ``join_late`` the bias has no gradient for two
    steps (frozen, then trained): it starts its momentum when it joins, the weight keeps its."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    mine = Muon(a.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01, muon=False)
    ref = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                          weight_decay=0.01)
    x = torch.randn(16, 5)
    for step in range(4):
        for model, opt in ((a, mine), (b, ref)):
            opt.zero_grad()
            model(x).square().sum().backward()
            if join_late and step < 2:
                model.bias.grad = None
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb) if not join_late else torch.allclose(pa, pb, atol=1e-7)


def test_muon_refuses_vectors():
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    with pytest.raises(ValueError, match="muon=False"):
        Muon([p]).step()


def test_muon_recipe_puts_filters_under_muon_and_the_rest_under_sgd():
    from cifarlab.models import create_model, default_config
    from cifarlab.optim import build_optimizer

    cfg = default_config("airnet", "airbench94-muon")
    model = create_model("airnet", 10, 0.25)
    opt, sched = build_optimizer(model, cfg, total_steps=10)
    assert isinstance(opt, Muon)
    groups = {g["muon"]: g for g in opt.param_groups if g["muon"]}
    filters = [p for p in model.parameters() if p.ndim == 4 and p.requires_grad]
    assert [id(p) for p in groups[True]["params"]] == [id(p) for p in filters]
    assert groups[True]["normalize"] and groups[True]["weight_decay"] == 0
    sgd = [g for g in opt.param_groups if not g["muon"]]
    assert {id(p) for g in sgd for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad and p.ndim != 4}
    assert sched.get_last_lr()[0] == pytest.approx(cfg.optim.muon_lr)  # no warm-up
    for _ in range(10):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.0)  # linear decay to zero at the end


def test_muon_recipe_trains(learnable):
    from cifarlab.config import DataConfig
    from cifarlab.models import default_config
    from cifarlab.trainer import train

    cfg = default_config("airnet", "airbench94-muon").with_values(
        {"width": 0.25, "precision": "fp32", "batch_size": 64, "epochs": 6.0, "tta": 0})
    cfg.data = DataConfig(source=str(learnable), val_size=40)
    result = train(cfg, progress=False)
    assert result.test_acc is not None and result.test_acc >= 0.9, result.history


def test_a_stack_of_matrices_is_orthogonalized_matrix_by_matrix():
    g = torch.randn(3, 16, 27, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    batched = orthogonalize(g)
    for i in range(3):
        assert torch.allclose(batched[i], orthogonalize(g[i]), atol=1e-12)
    tall = orthogonalize(g.mT)
    assert torch.allclose(tall, batched.mT, atol=1e-12)


def test_filter_banks_of_one_shape_step_as_if_each_were_alone():
    """Muon orthogonalizes same-shaped banks in one batched iteration: each bank's step is
    the one it would take alone."""
    torch.manual_seed(4)
    convs = [torch.nn.Conv2d(4, 8, 3, bias=False) for _ in range(3)]
    alone = [torch.nn.Conv2d(4, 8, 3, bias=False) for _ in range(3)]
    for a, c in zip(alone, convs, strict=True):
        a.load_state_dict(c.state_dict())
    together = Muon([c.weight for c in convs], lr=0.1, momentum=0.6, normalize=True)
    singles = [Muon([a.weight], lr=0.1, momentum=0.6, normalize=True) for a in alone]
    for _ in range(3):
        for c, a in zip(convs, alone, strict=True):
            c.weight.grad = torch.randn_like(c.weight)
            a.weight.grad = c.weight.grad.clone()
        together.step()
        for opt in singles:
            opt.step()
    for c, a in zip(convs, alone, strict=True):
        assert torch.allclose(c.weight, a.weight, atol=1e-5)


def test_bf16_newton_schulz_takes_nearly_the_fp32_step():
    """ns_precision "bf16" (airbench94_muon's arithmetic) runs the iteration in bf16: the step
    stays within bf16's rounding of the fp32 one, in the parameter's own dtype."""
    torch.manual_seed(5)
    w0 = torch.randn(16, 8, 3, 3)
    grad = torch.randn_like(w0)
    steps = {}
    for precision in ("fp32", "bf16"):
        w = torch.nn.Parameter(w0.clone())
        w.grad = grad.clone()
        Muon([w], lr=1.0, momentum=0.6, ns_steps=3, ns_precision=precision).step()
        assert w.dtype == torch.float32
        steps[precision] = (w0 - w.detach()).reshape(16, -1)
    rel = (steps["bf16"] - steps["fp32"]).norm() / steps["fp32"].norm()
    assert 0 < rel < 0.05, rel
    with pytest.raises(ValueError, match="ns_precision"):
        Muon([torch.nn.Parameter(w0.clone())], ns_precision="fp16")


def test_muon_state_saved_before_ns_precision_still_steps():
    """A checkpoint written before ns_precision existed has groups without it: loading one
    steps in fp32, as it did when it was saved."""
    w = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    opt = Muon([w], lr=0.1)
    old = opt.state_dict()
    del old["param_groups"][0]["ns_precision"]
    fresh = Muon([w], lr=0.1, ns_precision="bf16")
    fresh.load_state_dict(old)
    w.grad = torch.randn_like(w)
    fresh.step()
    assert torch.isfinite(w).all()


def test_muon_recipe_passes_ns_precision_to_the_filter_group():
    from cifarlab.models import create_model, default_config
    from cifarlab.optim import build_optimizer

    cfg = default_config("airnet", "airbench94-muon").with_values({"muon_ns_precision": "bf16"})
    opt, _ = build_optimizer(create_model("airnet", 10, 0.25), cfg, total_steps=10)
    assert [g["ns_precision"] for g in opt.param_groups if g["muon"]] == ["bf16"]
