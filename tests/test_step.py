"""cuda_graphs: the optimizer reads its learning rates from tensors (checked on the CPU), and a
replayed CUDA graph takes the eager trainer's steps (checked where CUDA is, skipped here)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cifarlab.config import DataConfig
from cifarlab.errors import ConfigError
from cifarlab.hardware import cudnn_mode
from cifarlab.models import create_model, default_config
from cifarlab.optim import Muon, build_optimizer
from cifarlab.step import GraphedStep
from cifarlab.trainer import train

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("recipe", ["airbench94", "airbench94-muon"])
def test_lr_from_tensors_takes_the_steps_of_float_lrs(recipe):
    """The capturable optimizer, reading each group's lr from a tensor the schedule's value is
    copied into, takes the steps it takes with float lrs (the schedule moving every step)."""
    cfg = default_config("airnet", recipe)
    torch.manual_seed(0)
    a = create_model("airnet", 10, 0.25)
    b = create_model("airnet", 10, 0.25)
    b.load_state_dict(a.state_dict())
    opt_a, sched_a = build_optimizer(a, cfg, total_steps=6, capturable=True)
    opt_b, sched_b = build_optimizer(b, cfg, total_steps=6, capturable=True)
    assert isinstance(opt_a, Muon) and isinstance(opt_b, Muon)
    opt_b.lr_from_tensors(torch.device("cpu"))
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for _ in range(6):
        for model, opt, sched in ((a, opt_a, sched_a), (b, opt_b, sched_b)):
            if opt is opt_b:
                opt_b.load_lr()
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
            sched.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, rtol=1e-5, atol=1e-6), name
    assert not torch.equal(a.head.weight, create_model("airnet", 10, 0.25).head.weight)


def test_capturable_sgd_is_torch_sgd_on_the_trainer(learnable):
    """cuda_graphs builds cifarlab's SGD (the capturable one) on every device, with
    torch.optim.SGD's arithmetic: on the CPU, where no graph is captured, it trains the same
    net to the same accuracy."""
    cfg = default_config("airnet").with_values(
        {"width": 0.25, "precision": "fp32", "batch_size": 64, "epochs": 2.0, "tta": 0,
         "device": "cpu"})
    cfg.data = DataConfig(source=str(learnable), val_size=40)
    plain = train(cfg, progress=False)
    graphed = train(cfg.with_values({"cuda_graphs": True}), progress=False)
    for (name, pa), pb in zip(plain.model.state_dict().items(),
                              graphed.model.state_dict().values(), strict=True):
        assert torch.allclose(pa.float(), pb.float(), rtol=1e-4, atol=1e-5), name
    assert graphed.test_acc == plain.test_acc


def test_a_graph_needs_cuda():
    model = create_model("airnet", 10, 0.25)
    opt, _ = build_optimizer(model, default_config("airnet"), 4, capturable=True)
    with pytest.raises(ValueError, match="CUDA"):
        GraphedStep(model, opt, torch.nn.CrossEntropyLoss(), torch.device("cpu"), "fp32")


def _steps(recipe: str, warmup: int, steps: int = 12, freeze_at: int = 7,
           compiled: bool = False) -> nn.Module:
    """``steps`` training steps of a small airnet through a GraphedStep on CUDA, with the
    whitening bias frozen before step ``freeze_at``; ``warmup`` larger than ``steps`` never
    captures (every step eager, with the same arithmetic). ``compiled``: torch.compile the
    model first."""
    device = torch.device("cuda")
    cfg = default_config("airnet", recipe)
    torch.manual_seed(0)
    model = create_model("airnet", 10, 0.5).to(device).to(memory_format=torch.channels_last)
    if compiled:
        model.compile()
    opt, sched = build_optimizer(model, cfg, total_steps=steps, capturable=True)
    assert isinstance(opt, Muon)
    opt.lr_from_tensors(device)
    step = GraphedStep(model, opt, nn.CrossEntropyLoss(label_smoothing=0.2, reduction="sum"),
                       device, "bf16", warmup=warmup)
    gen = torch.Generator(device=device).manual_seed(1)
    for i in range(steps):
        if i == freeze_at:
            model.whiten.bias.requires_grad = False
        x = torch.randn(64, 3, 32, 32, device=device, generator=gen)
        y = torch.randint(0, 10, (64,), device=device, generator=gen)
        step(x.contiguous(memory_format=torch.channels_last), y)
        sched.step()
    torch.cuda.synchronize()
    assert step.captures == (2 if warmup < freeze_at else 0)
    return model


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("recipe", ["airbench94", "airbench94-muon"])
def test_a_replayed_graph_computes_the_eager_step(recipe):
    """Captured, replayed, captured again when a parameter freezes: the same weights as the
    same steps taken eagerly, with deterministic kernels."""
    with cudnn_mode(torch.device("cuda"), deterministic=True):
        graphed, eager = _steps(recipe, warmup=2), _steps(recipe, warmup=10**6)
    for (name, pa), pb in zip(eager.state_dict().items(), graphed.state_dict().values(),
                              strict=True):
        assert torch.allclose(pa.float(), pb.float(), rtol=1e-5, atol=1e-6), name


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_a_compiled_model_is_captured_with_its_generated_kernels():
    """compile: true with cuda_graphs: true: the warm-up compiles (again after the freeze), the
    capture replays the compiled kernels, and the weights are those of the same compiled steps
    taken eagerly."""
    with cudnn_mode(torch.device("cuda"), deterministic=True):
        graphed = _steps("airbench94-muon", warmup=2, compiled=True)
        eager = _steps("airbench94-muon", warmup=10**6, compiled=True)
    for (name, pa), pb in zip(eager.state_dict().items(), graphed.state_dict().values(),
                              strict=True):
        assert torch.allclose(pa.float(), pb.float(), rtol=1e-5, atol=1e-6), name


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("recipe", ["airbench94", "airbench94-muon"])
def test_graphed_run_takes_the_eager_runs_steps(learnable, recipe):
    """On CUDA the trainer with cuda_graphs (captured again when airnet's whitening bias
    freezes) trains as well as without: the two runs differ in rounding only (torch.optim.SGD
    or a float lr against an lr read from a tensor), which bf16 training amplifies, so they are
    compared on what they learn, not weight by weight."""
    cfg = default_config("airnet", recipe).with_values(
        {"width": 0.5, "batch_size": 32, "epochs": 4.0, "tta": 0, "device": "cuda",
         "deterministic": True})
    cfg.data = DataConfig(source=str(learnable), val_size=40)
    eager = train(cfg, progress=False)
    for extra in ({}, {"compile": True}):
        graphed = train(cfg.with_values({"cuda_graphs": True} | extra), progress=False)
        assert graphed.extras["cuda_graph_captures"] == 2  # the whitening bias froze between
        assert graphed.history[-1]["train_loss"] == pytest.approx(
            eager.history[-1]["train_loss"], rel=0.2), extra
        assert eager.test_acc is not None and graphed.test_acc is not None
        assert graphed.test_acc >= eager.test_acc - 0.1, extra


class _Syncs(nn.Module):
    """A net whose forward branches on a value, which waits for the GPU: not capturable."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x.flatten(1))
        return out if out.sum().item() < 1e30 else -out


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_a_step_that_waits_for_the_cpu_is_refused_with_what_to_do():
    """(last in the file: a failed capture is the end of a process's graph work)"""
    device = torch.device("cuda")
    model = _Syncs().to(device)
    opt, _ = build_optimizer(model, default_config("airnet", "airbench94"), 4, capturable=True)
    assert isinstance(opt, Muon)
    opt.lr_from_tensors(device)
    step = GraphedStep(model, opt, nn.CrossEntropyLoss(), device, "fp32", warmup=1)
    x, y = torch.randn(8, 3, 32, 32, device=device), torch.zeros(8, dtype=torch.long,
                                                                 device=device)
    step(x, y)  # the eager warm-up step
    with pytest.raises(ConfigError, match="_Syncs.*cuda_graphs: false"):
        step(x, y)
