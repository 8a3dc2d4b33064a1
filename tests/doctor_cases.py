"""The seeded-bug suite: healthy configurations and injected bugs, each with the doctor rules
that count as catching it. Shared by tests/test_doctor.py and bench/doctor.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.doctor import Subject, default_step

N_CLASSES = 4
SIZE = 16  # small images keep the suite fast; the checks do not depend on size


def smooth_images(n_per_class: int, seed: int = 0, size: int = SIZE,
                  n_classes: int = N_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """Natural-looking learnable images: a smooth random background (neighbouring pixels
    correlate, as in photos) and a soft class-specific shape and colour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs, labels = [], []
    for k in range(n_classes):
        for _ in range(n_per_class):
            low = torch.from_numpy(rng.normal(0, 1, (1, 3, 4, 4))).float()
            bg = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)[0]
            bg = bg.permute(1, 2, 0).numpy() * 25 + 110
            cy, cx = rng.uniform(0.35, 0.65, 2)
            d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
            shape = [np.exp(-(d / 0.18) ** 2),
                     np.exp(-((yy - cy) / 0.08) ** 2),
                     np.exp(-((xx - cx) / 0.08) ** 2),
                     np.exp(-(np.maximum(abs(yy - cy), abs(xx - cx)) / 0.2) ** 6)][k % 4]
            color = np.array([[200, 60, 60], [60, 200, 60], [60, 60, 200], [200, 200, 60]])[k % 4]
            img = bg * (1 - shape[..., None]) + color * shape[..., None]
            img += rng.normal(0, 3, img.shape)
            imgs.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(k)
    return np.stack(imgs), np.array(labels, dtype=np.int64)


class SmallCNN(nn.Module):
    def __init__(self, c: int = N_CLASSES, softmax: bool = False, dropout_always: bool = False,
                 zero_init: bool = False, log_softmax: bool = False, norm_input: bool = False,
                 head_scale: float = 1.0, head_act: str = "", dropout: float = 0.0):
        super().__init__()
        self.head_act = head_act
        self.drop = nn.Dropout(dropout)
        self.norm_in = nn.BatchNorm2d(3) if norm_input else nn.Identity()
        self.log_softmax = log_softmax
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, c)
        self.softmax, self.dropout_always = softmax, dropout_always
        if zero_init:
            for p in self.parameters():
                nn.init.zeros_(p)
        if head_scale != 1.0:
            with torch.no_grad():
                self.fc.weight.mul_(head_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(self.norm_in(x)))), 2)
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.drop(F.adaptive_avg_pool2d(x, 1).flatten(1))
        if self.dropout_always:
            x = F.dropout(x, 0.5, training=True)
        x = self.fc(x)
        if self.head_act:
            x = {"relu": F.relu, "sigmoid": torch.sigmoid}[self.head_act](x)
        if self.log_softmax:
            return x.log_softmax(1)
        return x.softmax(1) if self.softmax else x


class MLP(nn.Module):
    def __init__(self, c: int = N_CLASSES, stacked: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(3 * SIZE * SIZE, 64)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(64, 64) if stacked else nn.Identity()
        self.fc3 = nn.Linear(64, c)
        self.stacked = stacked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x.flatten(1))
        if self.stacked:
            h = self.fc2(h)  # no nonlinearity between fc1 and fc2: the bug
            return self.fc3(self.act(h))
        return self.fc3(self.act(h))


@dataclass
class Case:
    name: str
    build: Callable[[], Subject]
    expect: set[str] = field(default_factory=set)  # rules that count as catching it; {} = healthy
    steps: int = 80  # monitored steps


def _data(seed: int = 0, n: int = 48):
    tr_x, tr_y = smooth_images(n, seed=seed)
    va_x, va_y = smooth_images(30, seed=seed + 100)
    te_x, te_y = smooth_images(10, seed=seed + 200)
    return tr_x, tr_y, va_x, va_y, te_x, te_y


def _norm(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 255
    return (x - torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)) / torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)


def subject(model_fn: Callable[[], nn.Module] = SmallCNN, opt: str = "sgd", lr: float = 0.05,
            wd: float = 5e-4, images_fn=None, labels_fn=None, feed_fn=None, step_fn=default_step,
            optimizer_params=None, test_leak: int = 0, mirrored_leak: int = 0,
            conflicting_copies: int = 0, loss_fn: Callable[..., torch.Tensor] | None = None,
            val_feed_fn=None, sorted_loader: bool | None = None, momentum: float = 0.9
            ) -> Subject:
    tr_x, tr_y, va_x, va_y, te_x, te_y = _data()
    if images_fn is not None:
        tr_x = images_fn(tr_x)
    if labels_fn is not None:
        tr_y = labels_fn(tr_y)
    if test_leak:
        tr_x = np.concatenate([tr_x, te_x[:test_leak]])
        tr_y = np.concatenate([tr_y, te_y[:test_leak]])
    if mirrored_leak:  # test images, mirrored, in training: the exact hash cannot see them
        tr_x = np.concatenate([tr_x, te_x[:mirrored_leak, :, ::-1]])
        tr_y = np.concatenate([tr_y, te_y[:mirrored_leak]])
    if conflicting_copies:  # a folder copied into another class
        tr_x = np.concatenate([tr_x, tr_x[:conflicting_copies]])
        tr_y = np.concatenate([tr_y, (tr_y[:conflicting_copies] + 1) % N_CLASSES])
    mean = tr_x.reshape(-1, 3).mean(0) / 255
    std = tr_x.reshape(-1, 3).std(0) / 255
    feed = feed_fn or (lambda imgs: _norm(imgs, mean, std))
    x, vx = feed(tr_x), (val_feed_fn or feed)(va_x)
    loader = None
    if sorted_loader is not None:  # the user's own loader, in stored (label) order or shuffled
        order = np.argsort(tr_y, kind="stable") if sorted_loader else \
            np.random.default_rng(2).permutation(len(tr_y))
        loader = [(x[order[i:i + 16]], torch.from_numpy(tr_y[order[i:i + 16]]))
                  for i in range(0, len(order), 16)]
    torch.manual_seed(0)
    template = model_fn()

    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return model_fn()

    params = optimizer_params(template) if optimizer_params else template.parameters()
    optimizer: torch.optim.Optimizer = (
        torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd) if opt == "sgd"
        else torch.optim.Adam(params, lr=lr, weight_decay=wd))
    return Subject(model=template, train_x=x, train_y=torch.from_numpy(tr_y), num_classes=N_CLASSES,
                   loss_fn=loss_fn or nn.CrossEntropyLoss(),
                   optimizer=optimizer, val_x=vx, val_y=torch.from_numpy(va_y),
                   make_model=make_model, step_fn=step_fn, images=tr_x, test_images=te_x,
                   labels_all=tr_y, test_labels=te_y, mean=mean.tolist(), std=std.tolist(),
                   loader=loader)


def _no_zero_grad(model, optimizer, loss_fn, x, y):
    model.train()
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _eval_mode_step(model, optimizer, loss_fn, x, y):
    model.eval()  # the bug: BatchNorm uses running statistics while training
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _blanking_step(model, optimizer, loss_fn, x, y):
    return default_step(model, optimizer, loss_fn, x * 0, y)  # "augmentation" that blanks


def _frozen_conv():
    m = SmallCNN()
    m.conv2.weight.requires_grad_(False)
    return m


def _per_batch_steplr():
    """A step function that steps StepLR(step_size=30) every batch: meant once an epoch."""
    scheds: dict[int, torch.optim.lr_scheduler.StepLR] = {}

    def step(model, optimizer, loss_fn, x, y):
        sched = scheds.setdefault(id(optimizer),
                                  torch.optim.lr_scheduler.StepLR(optimizer, 30, 0.1))
        loss = default_step(model, optimizer, loss_fn, x, y)
        sched.step()
        return loss
    return step


def _shuffle(y):
    return np.random.default_rng(1).permutation(y)


def _hwc_as_chw(mean, std):
    def feed(imgs):
        x = torch.from_numpy(imgs).float() / 255  # N×H×W×C
        x = x.reshape(len(imgs), 3, SIZE, SIZE)  # the bug: reshape instead of permute
        return (x - torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)) / torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return feed


def _nan_images(imgs):
    return imgs  # NaNs are injected after normalization (see cases)


def cases() -> list[Case]:
    tr_x, _, _, _, _, _ = _data()
    mean = tr_x.reshape(-1, 3).mean(0) / 255
    std = tr_x.reshape(-1, 3).std(0) / 255

    def nan_feed(imgs):
        x = _norm(imgs, mean, std)
        x[::7, :, 3, 3] = float("nan")
        return x

    return [
        # healthy
        Case("healthy-cnn-sgd", lambda: subject()),
        Case("healthy-cnn-adam", lambda: subject(opt="adam", lr=1e-3, wd=0.0)),
        Case("healthy-mlp", lambda: subject(MLP, lr=0.02)),
        Case("healthy-cnn-nowd", lambda: subject(wd=0.0, lr=0.03)),
        Case("healthy-cnn-adam-wd", lambda: subject(opt="adam", lr=1e-3, wd=5e-4)),
        Case("healthy-log-softmax-nll",
             lambda: subject(lambda: SmallCNN(log_softmax=True), loss_fn=nn.NLLLoss())),
        # log-softmax then cross-entropy: the same loss and gradients (log-softmax is
        # idempotent), so no alarm
        Case("healthy-log-softmax-ce", lambda: subject(lambda: SmallCNN(log_softmax=True))),
        # BatchNorm as the first layer standardizes inputs of any scale: [0, 1] is fine
        Case("healthy-bn-first-unit-range",
             lambda: subject(lambda: SmallCNN(norm_input=True),
                             feed_fn=lambda im: torch.from_numpy(im).float().permute(0, 3, 1, 2)
                             / 255)),
        # bugs
        Case("shuffled-labels", lambda: subject(labels_fn=_shuffle), {"no-label-signal"}),
        Case("unnormalized-inputs",
             lambda: subject(feed_fn=lambda im: torch.from_numpy(im).float().permute(0, 3, 1, 2)),
             {"input-unnormalized"}),
        Case("normalized-twice",
             lambda: subject(feed_fn=lambda im: torch.from_numpy(im).float().permute(0, 3, 1, 2)
                             / 255 / 255), {"input-scaled-twice"}),
        Case("hwc-as-chw", lambda: subject(feed_fn=_hwc_as_chw(mean, std)), {"channel-order"}),
        Case("softmax-before-ce", lambda: subject(lambda: SmallCNN(softmax=True)),
             {"softmax-before-ce"}),
        Case("lr-100x-high", lambda: subject(lr=5.0),
             {"lr-too-high", "nonfinite-loss", "exploding-gradients", "update-ratio",
              "plateau"}),
        Case("lr-100x-low", lambda: subject(lr=5e-4),
             {"lr-too-low", "cannot-overfit", "update-ratio", "plateau"}),
        Case("frozen-layer", lambda: subject(_frozen_conv), {"frozen-layer"}),
        Case("all-zero-init", lambda: subject(lambda: SmallCNN(zero_init=True)),
             {"cannot-overfit", "params-never-change", "dead-channels", "ignores-input"}),
        Case("missing-zero-grad", lambda: subject(step_fn=_no_zero_grad),
             {"grad-accumulation", "step-fn"}),
        Case("eval-mode-training", lambda: subject(step_fn=_eval_mode_step),
             {"wrong-mode", "step-fn"}),
        Case("test-leaked-into-train", lambda: subject(test_leak=20), {"train-test-leak"}),
        Case("class-missing", lambda: subject(labels_fn=lambda y: np.where(y == 3, 0, y)),
             {"class-missing"}),
        Case("nan-in-inputs", lambda: subject(feed_fn=nan_feed), {"input-nonfinite"}),
        Case("labels-off-by-one", lambda: subject(labels_fn=lambda y: y + 1), {"labels-range"}),
        Case("augmentation-blanks", lambda: subject(step_fn=_blanking_step),
             {"blank-images", "no-label-signal", "step-fn"}),
        Case("huge-weight-decay", lambda: subject(wd=5.0),
             {"weight-decay-high", "update-ratio", "cannot-overfit", "plateau"}),
        Case("stacked-linear", lambda: subject(lambda: MLP(stacked=True), lr=0.02),
             {"stacked-linear"}),
        Case("dropout-at-eval", lambda: subject(lambda: SmallCNN(dropout_always=True)),
             {"nondeterministic-eval"}),
        Case("healthy-shuffled-loader", lambda: subject(sorted_loader=False)),
        Case("unshuffled-loader", lambda: subject(sorted_loader=True), {"data-order"}),
        Case("val-not-normalized",
             lambda: subject(val_feed_fn=lambda im: torch.from_numpy(im).float()
                             .permute(0, 3, 1, 2) / 255), {"split-mismatch"}),
        Case("momentum-0.999", lambda: subject(momentum=0.999),
             {"momentum-high", "lr-too-high", "nonfinite-loss", "exploding-gradients",
              "update-ratio", "plateau", "cannot-overfit"}),
        Case("nll-on-raw-logits", lambda: subject(loss_fn=nn.NLLLoss()), {"nll-input"}),
        Case("softmax-then-nll", lambda: subject(lambda: SmallCNN(softmax=True),
                                                 loss_fn=nn.NLLLoss()), {"nll-input"}),
        Case("huge-head-init", lambda: subject(lambda: SmallCNN(head_scale=1e4)),
             {"initial-loss"}),
        Case("mirrored-test-in-train", lambda: subject(mirrored_leak=20), {"near-duplicates"}),
        Case("class-folder-copied", lambda: subject(conflicting_copies=24),
             {"label-conflict", "duplicates-within"}),
        Case("relu-on-logits", lambda: subject(lambda: SmallCNN(head_act="relu")),
             {"output-range"}),
        Case("sigmoid-on-logits", lambda: subject(lambda: SmallCNN(head_act="sigmoid")),
             {"output-range"}),
        Case("dropout-0.95", lambda: subject(lambda: SmallCNN(dropout=0.95)),
             {"dropout-high", "cannot-overfit"}),
        Case("steplr-stepped-per-batch", lambda: subject(step_fn=_per_batch_steplr()),
             {"lr-schedule", "step-fn"}),
        Case("class-weights-zero",
             lambda: subject(loss_fn=nn.CrossEntropyLoss(weight=torch.tensor([1.0, 1, 0, 0])))
             , {"loss-weights"}),
        Case("healthy-dropout-0.3", lambda: subject(lambda: SmallCNN(dropout=0.3))),
        Case("params-not-in-optimizer",
             lambda: subject(optimizer_params=lambda m: [p for n, p in m.named_parameters()
                                                         if not n.startswith("fc")]),
             {"params-not-in-optimizer", "params-never-change"}),
    ]
