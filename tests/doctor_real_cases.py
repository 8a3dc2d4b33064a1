"""The real-image doctor suite: ordinary models on real 32×32 photos with 10 classes, healthy
recipes and bugs written after real reports, each case with its source.

Every case builds a :class:`cifarlab.doctor.Subject` the way a user of the library would (a model,
tensors as fed, a loss, an optimizer, a step function) and is run as
``diagnose(subject, steps=150)``. ``bench/doctor.py realsuite`` runs them on real CIFAR-10
(`../shared/datasets`); `tests/test_doctor_real.py` builds every case on small synthetic data
and runs a few, so the suite itself cannot rot.

``right`` lists the rules that count as catching the bug (its cause and the symptoms it
produces); ``cause`` lists the rules that name the cause itself: the top-ranked finding must be one
of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.doctor import Subject, default_step

C = 10

# Sources. Ivanov's checklist is cited by the reason's title; threads and pages by address.
IVANOV = "Ivanov, '37 Reasons why your Neural Network is not working' (2017)"
KARPATHY = "Karpathy, 'A Recipe for Training Neural Networks' (2019)"
AUTOTRAINER = "Zhang et al., 'AUTOTRAINER' (ICSE 2021), problem catalogue"
DEEPDIAG = "Wardat et al., 'DeepDiagnosis' (ICSE 2022), fault catalogue"
TUTORIAL = "PyTorch tutorial 'Training a Classifier' (CIFAR-10, SGD lr 0.001, momentum 0.9)"
SCHED = ("runebook.dev/en/docs/pytorch/generated/torch.optim.lr_scheduler.lrscheduler: "
         "'Calling scheduler.step() inside the batch loop when using epoch-based schedulers'")
ZERO_GRAD = "flisks.com/python-why-do-we-need-to-call-zero-grad-in-pytorch (Stack Overflow Q&A)"
SOFTMAX_CE = ("pythonkb.com/python-should-i-use-softmax-as-output-when-using-cross-entropy-loss-"
              "in-pytorch (Stack Overflow Q&A)")
SOFTMAX_NLL = "runebook.dev/en/articles/pytorch/generated/torch.nn.softmax (Softmax with NLLLoss)"
F_DROPOUT = "runebook.dev/en/docs/pytorch/generated/torch.nn.functional.dropout"
PERMUTE = "openillumi.com/?p=83529 ('The Real Reason view() Won't Work')"
BARZ = "Barz & Denzler, 'Do We Train on Test Data?' (ciFAIR, 2020)"
NORTHCUTT = "Northcutt et al., 'Confident Learning' (JAIR 2021); Zhang et al. 2017 (random labels)"
TF_KEEP = "TensorFlow 2 migration: tf.nn.dropout(keep_prob) became rate = 1 - keep_prob"


@dataclass
class SuiteData:
    """Images N×H×W×C uint8 and int64 labels for train, validation and test."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        return self.train_x.reshape(-1, 3).mean(0) / 255

    @property
    def std(self) -> np.ndarray:
        return self.train_x.reshape(-1, 3).std(0) / 255


@dataclass
class Case:
    name: str
    category: str  # data, model, loss, optimizer, schedule, loop, or healthy
    build: Callable[[SuiteData], Subject]
    right: set[str] = field(default_factory=set)
    cause: set[str] = field(default_factory=set)
    source: str = ""
    steps: int = 150


# ----------------------------------------------------------------------------------- models


class TutorialNet(nn.Module):
    """The PyTorch CIFAR-10 tutorial's network (functional activations)."""

    def __init__(self, head: str = "none"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, C)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = self.fc3(x)
        if self.head == "log_softmax":
            return F.log_softmax(x, dim=1)
        if self.head == "log_softmax_dim0":  # the bug: normalizes across the batch
            return F.log_softmax(x, dim=0)
        return x


class ConvNet(nn.Module):
    """Three conv blocks (conv, optional BatchNorm, activation, max-pool), global average
    pooling and a linear head: the ordinary small CNN."""

    def __init__(self, width: int = 32, bn: bool = True, act: Callable[[], nn.Module] = nn.ReLU,
                 head: str = "none", dropout: float = 0.0, relu_between: bool = True,
                 bias_init: float | None = None, init_std: float | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in (width, 2 * width, 4 * width):
            layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=not bn))
            if bn:
                layers.append(nn.BatchNorm2d(c_out))
            if relu_between:
                layers += [act(), nn.MaxPool2d(2)]
            else:  # the bug variant: only linear operations between the convolutions
                layers.append(nn.AvgPool2d(2))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(c_in, C)
        self.head = head
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if init_std is not None:
                    nn.init.normal_(m.weight, 0, init_std)
                if bias_init is not None and m.bias is not None and m is not self.fc:
                    nn.init.constant_(m.bias, bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean((2, 3))
        x = self.fc(self.drop(x))
        return {"none": x, "softmax": F.softmax(x, 1), "relu": F.relu(x),
                "sigmoid": torch.sigmoid(x), "tanh": torch.tanh(x),
                "log_softmax": F.log_softmax(x, 1)}[self.head]


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(c_out)
        self.c2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(c_out)
        self.short = nn.Sequential() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(out)) + self.short(x))


class ResNet8(nn.Module):
    """A ResNet for 32×32 inputs (He et al. 2016's CIFAR layout, one block per stage)."""

    def __init__(self, width: int = 16, detach_stem: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.Sequential(Block(width, width, 1), Block(width, 2 * width, 2),
                                    Block(2 * width, 4 * width, 2))
        self.fc = nn.Linear(4 * width, C)
        self.detach_stem = detach_stem

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.detach_stem:  # the bug: a .detach() left in from debugging cuts the graph
            x = x.detach()
        return self.fc(self.layers(x).mean((2, 3)))


class MLP(nn.Module):
    """Dense layers on the flattened image."""

    def __init__(self, hidden: tuple[int, ...] = (512, 256),
                 act: Callable[[], nn.Module] = nn.ReLU, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = 3 * 32 * 32
        for h in hidden:
            layers += [nn.Linear(d, h), act()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            d = h
        layers.append(nn.Linear(d, C))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class VGGish(nn.Module):
    """conv-conv-pool ×2, then a dropout classifier (dropout written functionally)."""

    def __init__(self, p: float = 0.5, always_drop: bool = False):
        super().__init__()
        self.f = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(64 * 8 * 8, 256)
        self.fc2 = nn.Linear(256, C)
        self.p, self.always_drop = p, always_drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.f(x), 1)
        x = F.gelu(self.fc1(x))
        # the bug variant forgets training=self.training, so dropout stays on in eval mode
        x = F.dropout(x, self.p, training=True if self.always_drop else self.training)
        return self.fc2(x)


class GeluNet(nn.Module):
    """A CNN written with functional GELU and SiLU and GroupNorm (no BatchNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.g1 = nn.GroupNorm(8, 32)
        self.c2 = nn.Conv2d(32, 64, 3, padding=1)
        self.g2 = nn.GroupNorm(8, 64)
        self.fc = nn.Linear(64, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.gelu(self.g1(self.c1(x))), 2)
        x = F.max_pool2d(F.silu(self.g2(self.c2(x))), 2)
        return self.fc(x.mean((2, 3)))


# ------------------------------------------------------------------------------ subjects


def _tensor(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).float().permute(0, 3, 1, 2) / 255
    return (x - torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)) / \
        torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)


def make_subject(d: SuiteData, model_fn: Callable[[], nn.Module], *,
                 opt: Callable[[list[dict]], torch.optim.Optimizer] | None = None,
                 loss_fn: Callable[..., torch.Tensor] | None = None, step_fn=default_step,
                 train: tuple[np.ndarray, np.ndarray] | None = None,
                 train_y: np.ndarray | None = None,
                 feed: Callable[[np.ndarray], torch.Tensor] | None = None,
                 val_feed: Callable[[np.ndarray], torch.Tensor] | None = None,
                 param_filter: Callable[[str], bool] | None = None,
                 loader_order: str | None = None, seed: int = 0) -> Subject:
    """A subject as a user would build it. ``opt`` gets the parameter groups; by default SGD
    lr 0.05, momentum 0.9, weight decay 5e-4."""
    tx, ty = train if train is not None else (d.train_x, d.train_y)
    ty = ty if train_y is None else train_y
    mean = tx.reshape(-1, 3).mean(0) / 255  # statistics of the images trained on
    std = tx.reshape(-1, 3).std(0) / 255
    feed = feed or (lambda im: _tensor(im, mean, std))
    x, vx = feed(tx), (val_feed or feed)(d.val_x)
    torch.manual_seed(seed)
    model = model_fn()

    def make_model() -> nn.Module:
        torch.manual_seed(seed)
        return model_fn()

    named = [(n, p) for n, p in model.named_parameters()
             if param_filter is None or param_filter(n)]
    groups = [{"params": [p for _, p in named]}]
    optimizer = opt(groups) if opt else torch.optim.SGD(groups, lr=0.05, momentum=0.9,
                                                        weight_decay=5e-4)
    loader = None
    if loader_order is not None:  # the user's own loader: label order, or shuffled
        order = np.argsort(ty, kind="stable") if loader_order == "sorted" else \
            np.random.default_rng(seed).permutation(len(ty))
        yt = torch.from_numpy(ty)
        loader = [(x[order[i:i + 64]], yt[order[i:i + 64]]) for i in range(0, 64 * 40, 64)]
    return Subject(model=model, train_x=x, train_y=torch.from_numpy(ty), num_classes=C,
                   loss_fn=loss_fn or nn.CrossEntropyLoss(), optimizer=optimizer, val_x=vx,
                   val_y=torch.from_numpy(d.val_y), make_model=make_model, step_fn=step_fn,
                   images=tx, labels_all=ty, test_images=d.test_x, test_labels=d.test_y,
                   mean=mean.tolist(), std=std.tolist(), loader=loader)


def sgd(lr: float, momentum: float = 0.9, wd: float = 5e-4, nesterov: bool = False):
    return lambda g: torch.optim.SGD(g, lr=lr, momentum=momentum, weight_decay=wd,
                                     nesterov=nesterov)


def adam(lr: float = 1e-3, wd: float = 0.0):
    return lambda g: torch.optim.Adam(g, lr=lr, weight_decay=wd)


def adamw(lr: float = 1e-3, wd: float = 0.05):
    return lambda g: torch.optim.AdamW(g, lr=lr, weight_decay=wd)


# ------------------------------------------------------------------------------- steps


def step_without_zero_grad(model, optimizer, loss_fn, x, y):
    model.train()
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def step_in_eval_mode(model, optimizer, loss_fn, x, y):
    model.eval()  # left over from a validation pass: BatchNorm and dropout in inference mode
    optimizer.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def step_before_backward(model, optimizer, loss_fn, x, y):
    model.train()
    optimizer.zero_grad()
    optimizer.step()  # the bug: stepping before the gradients exist
    loss = loss_fn(model(x), y)
    loss.backward()
    return loss.detach()


def step_without_backward(model, optimizer, loss_fn, x, y):
    model.train()
    optimizer.zero_grad()
    loss = loss_fn(model(x), y)  # the bug: loss.backward() was lost in a refactor
    optimizer.step()
    return loss.detach()


def step_zero_grad_after_backward(model, optimizer, loss_fn, x, y):
    model.train()
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.zero_grad()  # the bug: clears the gradients it is about to use
    optimizer.step()
    return loss.detach()


def step_shuffling_labels(model, optimizer, loss_fn, x, y):
    # the bug: images and labels come from two loaders that shuffle independently
    return default_step(model, optimizer, loss_fn, x, y[torch.randperm(len(y))])


def step_tiny_clip(model, optimizer, loss_fn, x, y):
    model.train()
    optimizer.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-4)  # meant 1.0
    optimizer.step()
    return loss.detach()


def step_blanking_augmentation(model, optimizer, loss_fn, x, y):
    # the bug: a brightness "augmentation" that multiplies by a factor drawn in [0, 0.01]
    return default_step(model, optimizer, loss_fn, x * 0 + x.mean((1, 2, 3), keepdim=True), y)


def step_augmented(model, optimizer, loss_fn, x, y):
    """Healthy: random crop (pad 4) and horizontal flip, as the classic CIFAR recipe."""
    n = len(x)
    flip = torch.rand(n) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    i, j = np.random.randint(0, 9, 2)
    return default_step(model, optimizer, loss_fn, padded[:, :, i:i + 32, j:j + 32], y)


def step_mixup(model, optimizer, loss_fn, x, y):
    """Healthy: mixup (Zhang et al. 2018) with alpha 0.2."""
    lam = float(np.random.beta(0.2, 0.2))
    perm = torch.randperm(len(x))
    model.train()
    optimizer.zero_grad()
    out = model(lam * x + (1 - lam) * x[perm])
    loss = lam * loss_fn(out, y) + (1 - lam) * loss_fn(out, y[perm])
    loss.backward()
    optimizer.step()
    return loss.detach()


def scheduled(make: Callable[[torch.optim.Optimizer], object], per_batch: bool,
              steps_per_epoch: int = 78) -> Callable:
    """A step function that steps a scheduler made for the optimizer it is given, per batch or
    once an epoch (``steps_per_epoch`` batches): what a user's loop does."""
    state: dict[int, list] = {}

    def step(model, optimizer, loss_fn, x, y):
        entry = state.setdefault(id(optimizer), [make(optimizer), 0, optimizer])
        loss = default_step(model, optimizer, loss_fn, x, y)
        entry[1] += 1
        if per_batch or entry[1] % steps_per_epoch == 0:
            entry[0].step()  # type: ignore[attr-defined]
        return loss

    return step


def _warmup_per_epoch(opt):  # warm-up meant in steps (1,000), stepped once per epoch
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda e: min(1.0, e / 1000))


# ------------------------------------------------------------------------------ helpers


def _permuted(d: SuiteData) -> np.ndarray:
    return np.random.default_rng(1).permutation(d.train_y)


def _noisy(d: SuiteData, rate: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(2)
    y = d.train_y.copy()
    flip = rng.random(len(y)) < rate
    y[flip] = rng.integers(0, C, int(flip.sum()))
    return y


def _hwc_reshape(d: SuiteData) -> Callable[[np.ndarray], torch.Tensor]:
    mean, std = d.mean, d.std

    def feed(im: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(im)).float() / 255
        x = x.reshape(len(im), 3, 32, 32)  # the bug: reshape where permute was meant
        return (x - torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)) / \
            torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return feed


def _nan_feed(d: SuiteData) -> Callable[[np.ndarray], torch.Tensor]:
    def feed(im: np.ndarray) -> torch.Tensor:
        x = _tensor(im, d.mean, d.std)
        x[::9, :, 5, 5] = float("nan")  # a corrupt file decoded to NaN pixels
        return x
    return feed


def _raw(im: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(im)).float().permute(0, 3, 1, 2)


def _unit(im: np.ndarray) -> torch.Tensor:
    return _raw(im) / 255


def _imbalanced(d: SuiteData) -> tuple[np.ndarray, np.ndarray]:
    keep = np.ones(len(d.train_y), bool)
    for k in range(1, C):  # class 0 keeps all; the others keep a twentieth
        idx = np.flatnonzero(d.train_y == k)
        keep[idx[len(idx) // 20:]] = False
    return d.train_x[keep], d.train_y[keep]


def _with(d: SuiteData, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([d.train_x, x]), np.concatenate([d.train_y, y])


def _frozen_resnet() -> nn.Module:
    m = ResNet8()
    for p in m.layers[1].parameters():  # left frozen after a fine-tuning experiment
        p.requires_grad_(False)
    return m


def _ce_weights_zero() -> nn.Module:
    w = torch.ones(C)
    w[5:] = 0.0  # class weights from counts of a subset that had only classes 0-4
    return nn.CrossEntropyLoss(weight=w)


def _sum_loss_subject(d: SuiteData, lr: float) -> Subject:
    return make_subject(d, ConvNet, opt=sgd(lr), loss_fn=nn.CrossEntropyLoss(reduction="sum"))


def _deep_sigmoid() -> nn.Module:
    return MLP(hidden=(256,) * 8, act=nn.Sigmoid)


# -------------------------------------------------------------------------------- cases


def cases() -> list[Case]:
    S = make_subject
    H = "healthy"
    return [
        # ---------------------------------------------------------------- healthy recipes
        Case("tutorial-published", H, lambda d: S(d, TutorialNet, opt=sgd(0.001, wd=0.0)),
             source=TUTORIAL),
        Case("tutorial-lr0.01", H, lambda d: S(d, TutorialNet, opt=sgd(0.01, wd=0.0)),
             source=TUTORIAL + ", lr raised to 0.01"),
        Case("convnet-bn-sgd-nesterov", H,
             lambda d: S(d, ConvNet, opt=sgd(0.05, nesterov=True)), source="common CIFAR recipe"),
        Case("convnet-nobn-sgd", H, lambda d: S(d, lambda: ConvNet(bn=False), opt=sgd(0.02)),
             source="common CIFAR recipe without normalization"),
        Case("resnet8-sgd-steplr-per-epoch", H,
             lambda d: S(d, ResNet8, opt=sgd(0.1), step_fn=scheduled(
                 lambda o: torch.optim.lr_scheduler.StepLR(o, 30, 0.1), per_batch=False)),
             source="He et al. 2016 CIFAR ResNet recipe (SGD 0.1, step decay per epoch)"),
        Case("resnet8-onecycle-per-batch", H,
             lambda d: S(d, ResNet8, opt=sgd(0.1), step_fn=scheduled(
                 lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.2, total_steps=20000),
                 per_batch=True)),
             source="Smith & Topin 2019 one-cycle, stepped per batch as documented"),
        Case("convnet-adam", H, lambda d: S(d, ConvNet, opt=adam(1e-3)),
             source="Kingma & Ba 2015 defaults"),
        Case("resnet8-adamw", H, lambda d: S(d, ResNet8, opt=adamw(1e-3, 0.05)),
             source="Loshchilov & Hutter 2019 AdamW"),
        Case("convnet-label-smoothing", H,
             lambda d: S(d, ConvNet, loss_fn=nn.CrossEntropyLoss(label_smoothing=0.1)),
             source="Szegedy et al. 2016 label smoothing 0.1"),
        Case("vggish-dropout", H, lambda d: S(d, VGGish, opt=sgd(0.02)),
             source="Srivastava et al. 2014 dropout 0.5"),
        Case("convnet-mixup", H, lambda d: S(d, ConvNet, step_fn=step_mixup),
             source="Zhang et al. 2018 mixup, alpha 0.2"),
        Case("mlp-dense", H, lambda d: S(d, MLP, opt=sgd(0.01)),
             source="Dense-layer MLP on flattened pixels"),
        Case("gelu-groupnorm-functional", H, lambda d: S(d, GeluNet, opt=adamw(2e-3, 0.01)),
             source="functional activations (F.gelu, F.silu), GroupNorm"),
        Case("convnet-augmented", H, lambda d: S(d, ConvNet, step_fn=step_augmented),
             source="random crop + flip, the classic CIFAR augmentation"),
        Case("tutorial-log-softmax-nll", H,
             lambda d: S(d, lambda: TutorialNet("log_softmax"), opt=sgd(0.01, wd=0.0),
                         loss_fn=nn.NLLLoss()), source="log_softmax + NLLLoss, PyTorch MNIST example"),
        Case("convnet-sum-loss-scaled-lr", H,
             lambda d: _sum_loss_subject(d, 0.05 / 64),
             source="reduction='sum' with the lr divided by the batch size"),
        Case("convnet-shuffled-loader", H, lambda d: S(d, ConvNet, loader_order="shuffled"),
             source="DataLoader(shuffle=True)"),
        Case("mlp-dropout-adam", H, lambda d: S(d, lambda: MLP(dropout=0.3), opt=adam(1e-3)),
             source="MLP with dropout 0.3, Adam"),
        # ----------------------------------------------------------------------- data bugs
        Case("labels-permuted", "data", lambda d: S(d, ConvNet, train_y=_permuted(d)),
             {"no-label-signal", "label-noise", "plateau"}, {"no-label-signal", "label-noise"},
             IVANOV + ": 'Is the relationship between input and output too random?'"),
        Case("labels-one-based", "data", lambda d: S(d, ConvNet, train_y=d.train_y + 1),
             {"labels-range"}, {"labels-range"}, IVANOV + ": 'Check your input data'"),
        Case("class-missing", "data",
             lambda d: S(d, ConvNet, train_y=np.where(d.train_y == 3, 5, d.train_y)),
             {"class-missing", "class-imbalance"}, {"class-missing"},
             "a class folder filtered out by an extension check"),
        Case("label-noise-60", "data", lambda d: S(d, ConvNet, train_y=_noisy(d)),
             {"label-noise"}, {"label-noise"},
             IVANOV + ": 'Is there too much noise in the dataset?'; " + NORTHCUTT),
        Case("unnormalized-0-255", "data", lambda d: S(d, ConvNet, feed=_raw),
             {"input-unnormalized"}, {"input-unnormalized"},
             IVANOV + ": 'Standardize the features'"),
        Case("divided-by-255-twice", "data",
             lambda d: S(d, ConvNet, feed=lambda im: _unit(im) / 255),
             {"input-scaled-twice"}, {"input-scaled-twice"},
             "ToTensor() already scales to [0, 1]; a second /255 follows"),
        Case("hwc-reshaped-not-permuted", "data", lambda d: S(d, ConvNet, feed=_hwc_reshape(d)),
             {"channel-order"}, {"channel-order"}, PERMUTE),
        Case("nan-pixels", "data", lambda d: S(d, ConvNet, feed=_nan_feed(d)),
             {"input-nonfinite", "nonfinite-loss"}, {"input-nonfinite"},
             IVANOV + ": 'Overcoming NaNs'"),
        Case("val-preprocessed-differently", "data",
             lambda d: S(d, ConvNet, val_feed=_unit),
             {"split-mismatch"}, {"split-mismatch"},
             IVANOV + ": 'Check the preprocessing for train/validation/test set'"),
        Case("test-images-in-train", "data",
             lambda d: S(d, ConvNet, train=_with(d, d.test_x[:300], d.test_y[:300])),
             {"train-test-leak"}, {"train-test-leak"}, BARZ),
        Case("mirrored-test-images-in-train", "data",
             lambda d: S(d, ConvNet, train=_with(
                 d, d.test_x[:300, :, ::-1], d.test_y[:300])),
             {"near-duplicates"}, {"near-duplicates"}, BARZ + " (near-duplicates)"),
        Case("class-folder-copied", "data",
             lambda d: S(d, ConvNet, train=_with(
                 d, d.train_x[d.train_y == 2][:300], np.full(300, 7))),
             {"label-conflict", "duplicates-within"}, {"label-conflict"},
             "a class folder copied into another class while reorganizing"),
        Case("loader-in-label-order", "data", lambda d: S(d, ConvNet, loader_order="sorted"),
             {"data-order"}, {"data-order"}, IVANOV + ": 'Shuffle the dataset'"),
        Case("imbalanced-20-to-1", "data",
             lambda d: S(d, ConvNet, train=_imbalanced(d)),
             {"class-imbalance"}, {"class-imbalance"}, IVANOV + ": 'Reduce class imbalance'"),
        # ---------------------------------------------------------------------- model bugs
        Case("relu-on-logits", "model", lambda d: S(d, lambda: ConvNet(head="relu")),
             {"output-range"}, {"output-range"},
             "a ReLU left after the last Linear (DeepDiagnosis: activation of the last layer)"),
        Case("sigmoid-on-logits", "model", lambda d: S(d, lambda: ConvNet(head="sigmoid")),
             {"output-range", "cannot-overfit"}, {"output-range"}, DEEPDIAG + ": last-layer activation"),
        Case("tanh-on-logits", "model", lambda d: S(d, lambda: ConvNet(head="tanh")),
             {"output-range", "cannot-overfit"}, {"output-range"}, DEEPDIAG + ": last-layer activation"),
        Case("dropout-keep-prob-as-rate", "model",
             lambda d: S(d, lambda: MLP(dropout=0.9), opt=adam(1e-3)),
             {"dropout-high", "cannot-overfit"}, {"dropout-high"}, TF_KEEP),
        Case("functional-dropout-keep-prob", "model",
             lambda d: S(d, lambda: VGGish(p=0.95), opt=adam(1e-3)),
             {"dropout-high", "cannot-overfit"}, {"dropout-high"},
             TF_KEEP + " (F.dropout in forward)"),
        Case("convs-without-activations", "model",
             lambda d: S(d, lambda: ConvNet(bn=False, relu_between=False), opt=sgd(0.01)),
             {"stacked-linear"}, {"stacked-linear"},
             IVANOV + ": 'Check for hidden dimension errors'; AUTOTRAINER: missing activation"),
        Case("huge-init-std10", "model", lambda d: S(d, lambda: ConvNet(bn=False, init_std=10.0),
                                                     opt=sgd(0.01)),
             {"initial-loss", "nonfinite-loss", "exploding-gradients", "lr-too-high"},
             {"initial-loss"}, KARPATHY + ": 'verify loss @ init'; " + IVANOV + ": 'Check weights initialization'"),
        Case("all-zero-init", "model", lambda d: S(d, lambda: ConvNet(bn=False, init_std=0.0,
                                                                      bias_init=0.0)),
             {"cannot-overfit", "params-never-change", "dead-channels", "ignores-input",
              "vanishing-gradients"}, {"ignores-input", "params-never-change", "cannot-overfit"},
             IVANOV + ": 'Check weights initialization'"),
        Case("deep-sigmoid-mlp", "model", lambda d: S(d, _deep_sigmoid, opt=sgd(0.01)),
             {"vanishing-gradients", "cannot-overfit", "plateau", "lr-too-low"},
             {"vanishing-gradients"}, AUTOTRAINER + ": vanishing gradient (sigmoid)"),
        Case("dead-relu-negative-bias", "model",
             lambda d: S(d, lambda: ConvNet(bn=False, bias_init=-5.0)),
             {"dead-channels", "ignores-input", "cannot-overfit", "params-never-change"},
             {"dead-channels", "ignores-input"}, AUTOTRAINER + ": dying ReLU"),
        Case("frozen-block", "model", lambda d: S(d, _frozen_resnet),
             {"frozen-layer"}, {"frozen-layer"}, IVANOV + ": \"Check for 'frozen' layers\""),
        Case("functional-dropout-in-eval", "model",
             lambda d: S(d, lambda: VGGish(always_drop=True), opt=sgd(0.02)),
             {"nondeterministic-eval"}, {"nondeterministic-eval"}, F_DROPOUT),
        Case("log-softmax-over-batch", "model",
             lambda d: S(d, lambda: TutorialNet("log_softmax_dim0"), opt=sgd(0.01, wd=0.0),
                         loss_fn=nn.NLLLoss()),
             {"batch-dependence", "nll-input"}, {"batch-dependence", "nll-input"},
             SOFTMAX_NLL + " ('Calculating Softmax across the batch dimension')"),
        Case("stem-detached", "model", lambda d: S(d, lambda: ResNet8(detach_stem=True)),
             {"params-never-change"}, {"params-never-change"},
             "a .detach() left in forward (DeepDiagnosis: unchanged weights)"),
        # ----------------------------------------------------------------------- loss bugs
        Case("softmax-into-cross-entropy", "loss", lambda d: S(d, lambda: ConvNet(head="softmax")),
             {"softmax-before-ce"}, {"softmax-before-ce"}, SOFTMAX_CE),
        Case("nll-on-raw-logits", "loss", lambda d: S(d, ConvNet, loss_fn=nn.NLLLoss()),
             {"nll-input"}, {"nll-input"}, SOFTMAX_NLL),
        Case("softmax-into-nll", "loss",
             lambda d: S(d, lambda: ConvNet(head="softmax"), loss_fn=nn.NLLLoss()),
             {"nll-input"}, {"nll-input"}, SOFTMAX_NLL),
        Case("sum-loss-with-mean-lr", "loss", lambda d: _sum_loss_subject(d, 0.05),
             {"lr-too-high", "nonfinite-loss", "exploding-gradients", "update-ratio"},
             {"lr-too-high", "nonfinite-loss"},
             "reduction='sum' with an lr tuned for the mean: the step is batch-size times larger"),
        Case("class-weights-zero", "loss", lambda d: S(d, ConvNet, loss_fn=_ce_weights_zero()),
             {"loss-weights"}, {"loss-weights"}, IVANOV + ": 'Adjust loss weights'"),
        # ------------------------------------------------------------------ optimizer bugs
        Case("sgd-lr-10", "optimizer", lambda d: S(d, ConvNet, opt=sgd(10.0)),
             {"lr-too-high", "nonfinite-loss", "exploding-gradients", "update-ratio"},
             {"lr-too-high", "nonfinite-loss"}, IVANOV + ": 'Increase/Decrease Learning Rate'"),
        Case("sgd-lr-1e-6", "optimizer", lambda d: S(d, ConvNet, opt=sgd(1e-6)),
             {"lr-too-low", "update-ratio", "cannot-overfit", "plateau"}, {"lr-too-low"},
             IVANOV + ": 'Increase/Decrease Learning Rate'"),
        Case("adam-with-sgd-lr", "optimizer", lambda d: S(d, ConvNet, opt=adam(1.0)),
             {"lr-too-high", "nonfinite-loss", "exploding-gradients", "update-ratio",
              "cannot-overfit"}, {"lr-too-high"}, "Adam given SGD's lr 1.0 (Karpathy: 3e-4)"),
        Case("momentum-0.999", "optimizer", lambda d: S(d, ConvNet, opt=sgd(0.05, 0.999)),
             {"momentum-high", "lr-too-high", "nonfinite-loss", "exploding-gradients"},
             {"momentum-high"}, "momentum 0.999 (Adam's beta2 given as SGD momentum)"),
        Case("weight-decay-1.0", "optimizer", lambda d: S(d, ConvNet, opt=sgd(0.05, wd=1.0)),
             {"weight-decay-high", "cannot-overfit", "update-ratio", "plateau"},
             {"weight-decay-high"}, IVANOV + ": 'Reduce regularization'"),
        Case("head-not-in-optimizer", "optimizer",
             lambda d: S(d, ConvNet, param_filter=lambda n: not n.startswith("fc")),
             {"params-not-in-optimizer", "params-never-change"}, {"params-not-in-optimizer"},
             "optimizer built before the head was replaced (transfer learning)"),
        # -------------------------------------------------------------------- schedule bugs
        Case("steplr-per-batch", "schedule", lambda d: S(d, ConvNet, step_fn=scheduled(
            lambda o: torch.optim.lr_scheduler.StepLR(o, 30, 0.1), per_batch=True)),
             {"lr-schedule", "step-fn"}, {"lr-schedule"}, SCHED),
        Case("exponentiallr-per-batch", "schedule", lambda d: S(d, ResNet8, opt=sgd(0.1),
                                                                step_fn=scheduled(
            lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.95), per_batch=True)),
             {"lr-schedule", "step-fn"}, {"lr-schedule"}, SCHED),
        Case("cosine-epochs-per-batch", "schedule", lambda d: S(d, ConvNet, step_fn=scheduled(
            lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=30), per_batch=True)),
             {"lr-schedule", "step-fn"}, {"lr-schedule"}, SCHED + " (T_max given in epochs)"),
        Case("warmup-steps-per-epoch", "schedule", lambda d: S(d, ConvNet, step_fn=scheduled(
            _warmup_per_epoch, per_batch=False)),
             {"lr-schedule", "lr-too-low", "params-never-change", "cannot-overfit", "step-fn"},
             {"lr-schedule"}, "a 1,000-step warm-up stepped once per epoch"),
        # ------------------------------------------------------------------------ loop bugs
        Case("missing-zero-grad", "loop", lambda d: S(d, ConvNet, step_fn=step_without_zero_grad),
             {"grad-accumulation", "step-fn"}, {"grad-accumulation", "step-fn"}, ZERO_GRAD),
        Case("trains-in-eval-mode", "loop", lambda d: S(d, ConvNet, step_fn=step_in_eval_mode),
             {"wrong-mode", "step-fn"}, {"wrong-mode", "step-fn"}, IVANOV + ": 'Switch from Train to Test mode'"),
        Case("step-before-backward", "loop", lambda d: S(d, ConvNet, step_fn=step_before_backward),
             {"params-never-change", "step-without-grad", "step-fn"},
             {"step-without-grad", "step-fn"},
             "optimizer.step() before loss.backward() (PyTorch docs: backward, then step)"),
        Case("backward-missing", "loop", lambda d: S(d, ConvNet, step_fn=step_without_backward),
             {"params-never-change", "step-without-grad", "step-fn"},
             {"step-without-grad", "step-fn"}, ZERO_GRAD),
        Case("zero-grad-after-backward", "loop",
             lambda d: S(d, ConvNet, step_fn=step_zero_grad_after_backward),
             {"params-never-change", "step-without-grad", "step-fn"},
             {"step-without-grad", "step-fn"},
             ZERO_GRAD),
        Case("labels-shuffled-per-batch", "loop",
             lambda d: S(d, ConvNet, step_fn=step_shuffling_labels),
             {"no-label-signal", "plateau", "cannot-overfit", "step-fn"},
             {"no-label-signal", "step-fn"},
             IVANOV + ": 'Check the data loader'"),
        Case("grad-clip-1e-4", "loop", lambda d: S(d, ConvNet, step_fn=step_tiny_clip),
             {"lr-too-low", "update-ratio", "cannot-overfit", "plateau", "step-fn"},
             {"lr-too-low", "step-fn"}, "clip_grad_norm_ with max_norm 1e-4 where 1.0 was meant"),
        Case("augmentation-blanks-images", "loop",
             lambda d: S(d, ConvNet, step_fn=step_blanking_augmentation),
             {"blank-images", "no-label-signal", "step-fn"},
             {"blank-images", "step-fn"},
             IVANOV + ": 'Do you have too much data augmentation?'"),
    ]


def category_counts() -> dict[str, int]:
    counts: dict[str, int] = {}
    for c in cases():
        counts[c.category] = counts.get(c.category, 0) + 1
    return counts

