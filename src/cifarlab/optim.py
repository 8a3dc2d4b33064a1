"""The optimizer, its schedule and the weight averaging the trainer uses.

Nesterov SGD in airbench's decoupled parametrization, so that each hyperparameter can be tuned
on its own: ``lr`` is the step per 1024 examples independent of momentum, ``weight_decay`` the
decay per 1024 examples independent of ``lr``.
"""

from __future__ import annotations

import torch
from torch import nn

from cifarlab.config import TrainConfig

__all__ = ["Lookahead", "build_optimizer", "triangle_schedule"]


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Nesterov SGD in airbench's decoupled parametrization, and the triangular schedule.

    With a summed loss and Nesterov momentum m, plain SGD steps are about (1 + 1/(1-m)) times the
    gradient; dividing by that (per 1024 examples) makes ``lr`` independent of momentum, and
    setting PyTorch's weight_decay to wd/lr makes the decay independent of ``lr``.
    """
    o = cfg.optim
    kilostep = 1024 * (1 + 1 / (1 - o.momentum))
    lr = o.lr / kilostep
    wd = o.weight_decay * o.batch_size / kilostep
    norm_biases = [
        m.bias for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None
    ]
    ids = {id(p) for p in norm_biases}
    others = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    groups = [dict(params=others, lr=lr, weight_decay=wd / lr)]
    if norm_biases:
        lr_b = lr * o.bias_scaler
        groups.append(dict(params=norm_biases, lr=lr_b, weight_decay=wd / lr_b))
    opt = torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.momentum > 0)
    return opt, triangle_schedule(opt, cfg, total_steps)


def triangle_schedule(
    opt: torch.optim.Optimizer, cfg: TrainConfig, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from ``lr_start`` to 1 over ``warmup_frac``, then linear to ``lr_end``."""
    o = cfg.optim
    peak = max(1, int(o.warmup_frac * total))

    def factor(step: int) -> float:
        if step < peak:
            return o.lr_start + (1 - o.lr_start) * step / peak
        return 1 + (o.lr_end - 1) * min(1.0, (step - peak) / max(1, total - peak))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Lookahead:
    """Weight averaging that is copied back into the net (airbench's lookahead-EMA)."""

    def __init__(self, model: nn.Module):
        self.avg = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        for (_, avg), cur in zip(self.avg.items(), model.state_dict().values(), strict=True):
            if cur.dtype.is_floating_point:
                avg.lerp_(cur, 1 - decay)
                cur.copy_(avg)
