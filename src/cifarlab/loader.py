"""The on-device loader: the whole dataset as one uint8 tensor, augmented a batch at a time.

As in airbench: no per-sample Python and no worker processes. Each step gathers a batch of
uint8 images, normalizes it, and mirrors, translates and cuts out the whole batch at once.

The random numbers of an epoch (its order, each image's shift and cutout centre) are drawn on
the CPU from the run's seeded generator at the start of the epoch and reach the device in one
copy. So a step makes no host-to-device copy: on a GPU a copy from pageable memory waits for
every queued kernel, and one per step would serialize the CPU and the GPU.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from cifarlab.config import TrainConfig
from cifarlab.data import Dataset
from cifarlab.infer import Normalizer, to_device_images

__all__ = ["DeviceLoader"]


class DeviceLoader:
    """Iterates over augmented, normalized batches of a dataset held as one tensor on a device."""

    def __init__(self, ds: Dataset, cfg: TrainConfig, norm: Normalizer, device: torch.device):
        self.images = to_device_images(ds.images, device)
        self.labels = torch.from_numpy(ds.labels).to(device)
        self.norm, self.device, self.aug = norm, device, cfg.aug
        self.batch_size = min(cfg.optim.batch_size, len(ds))
        self.gen = torch.Generator().manual_seed(cfg.seed)
        # Alternating flip (airbench): a fixed random half of the images is mirrored on even
        # epochs and the other half on odd ones, so every image is seen both ways in 2 epochs.
        self.flip_base = (torch.rand(len(ds), generator=self.gen) < 0.5).to(device)
        self.epoch = 0
        self._draws: torch.Tensor | None = None  # 4×N: shift y, x and cutout centre y, x

    def __len__(self) -> int:
        return len(self.labels) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.epoch_order()
        for i in range(len(self)):
            yield self.batch(order, i)
        self.epoch += 1

    def epoch_order(self) -> torch.Tensor:
        """A fresh random order of the images for one epoch, and fresh augmentation draws."""
        n = len(self.labels)
        order = torch.randperm(n, generator=self.gen)
        both = torch.cat((order[None], self._draw(n))).to(self.device)  # one copy per epoch
        self._draws = both[1:]
        return both[0]

    def _draw(self, n: int) -> torch.Tensor:
        """Each image's translation (dy, dx) and cutout centre (cy, cx) for one epoch."""
        h, w = self.images.shape[-2:]
        r, zeros = self.aug.translate, torch.zeros(n, dtype=torch.int64)
        dy, dx = (torch.randint(0, 2 * r + 1, (2, n), generator=self.gen) if r > 0
                  else (zeros, zeros))
        cy, cx = ((torch.randint(0, h, (n,), generator=self.gen),
                   torch.randint(0, w, (n,), generator=self.gen)) if self.aug.cutout > 0
                  else (zeros, zeros))
        return torch.stack((dy, dx, cy, cx))

    def batch(self, order: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``i`` of an epoch in ``order``, augmented (random access, for loops that ask
        for batches by index)."""
        idx = order[i * self.batch_size : (i + 1) * self.batch_size]
        return self._augment(self.images[idx], idx), self.labels[idx]

    def _augment(self, x8: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        x = self.norm(x8)  # B×C×H×W float
        b, _, h, w = x.shape
        if self.aug.flip:
            mask = self.flip_base[idx] ^ bool(self.epoch % 2)
            x = torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)
        if self._draws is None:  # a batch asked for before any epoch_order()
            self._draws = self._draw(len(self.labels)).to(self.device)
        dy, dx, cy, cx = self._draws[:, idx].view(4, b, 1, 1).unbind(0)
        r = self.aug.translate
        if r > 0:
            xp = F.pad(x, (r, r, r, r), mode="reflect")
            dy, dx = dy.view(b), dx.view(b)
            rows = (dy[:, None] + torch.arange(h, device=self.device))[:, :, None]  # B×H×1
            cols = (dx[:, None] + torch.arange(w, device=self.device))[:, None, :]  # B×1×W
            bidx = torch.arange(b, device=self.device)[:, None, None]
            x = xp[bidx, :, rows, cols].permute(0, 3, 1, 2)  # B×H×W×C gathered -> B×C×H×W
        if self.aug.cutout > 0:
            s = self.aug.cutout
            ys = torch.arange(h, device=self.device).view(1, h, 1)
            xs = torch.arange(w, device=self.device).view(1, 1, w)
            hole = ((ys - cy).abs() * 2 < s) & ((xs - cx).abs() * 2 < s)  # B×H×W
            x = x * (~hole).unsqueeze(1)
        return x.contiguous(memory_format=torch.channels_last)
