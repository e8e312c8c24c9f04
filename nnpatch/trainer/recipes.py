"""Built-in offline scenarios (no downloads): data, models and domain shifts.

``digits`` -- scikit-learn's bundled 8x8 handwritten digits (1797 images, in the
scikit-learn wheel).  The images are split (stratified, fixed seed) into an
*old* training set (50 %), a *new* training set (25 %) and a test set (25 %).
M0 is trained on the old images as they are.  The update scenario is a domain
shift: the new training images and the test images are rotated by a random
angle of 15-35 degrees (random sign) and get Gaussian noise (sigma 0.15 on a
0..1 scale) -- a camera mounted at a slant with a noisier sensor.  The update
is trained on the shifted new images and evaluated on the shifted test images.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

__all__ = ["DigitsCNN", "load_digits_arrays", "split_indices", "rotate", "add_noise", "shift_domain",
           "digits_scenario", "DenoiseNet", "Video3D", "moving_clips", "RECIPES"]


class DigitsCNN(nn.Module):
    """Small CNN with BatchNorm for square grey images (8x8 digits, 28x28 MNIST)."""

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 1) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class DenoiseNet(nn.Module):
    """Small encoder-decoder (conv/BN/ReLU, stride-2 down, transposed-conv up, skip) for denoising."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * w), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w),
                                 nn.ReLU())
        self.up = nn.Sequential(nn.ConvTranspose2d(2 * w, w, 2, stride=2, bias=False), nn.BatchNorm2d(w),
                                nn.ReLU())
        self.dec = nn.Sequential(nn.Conv2d(2 * w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.out = nn.Conv2d(w, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        m = self.mid(self.enc2(e1))
        d = self.dec(torch.cat([self.up(m), e1], 1))
        return x + self.out(d)  # predict the residual


class Video3D(nn.Module):
    """Frame-wise 2-D conv features (as a (1,3,3) 3-D conv) + a temporal 3-D conv + pooling."""

    def __init__(self, num_classes: int = 20, width: int = 16) -> None:
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv3d(1, w, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), bias=False), nn.BatchNorm3d(w),
            nn.ReLU(),
            nn.Conv3d(w, 2 * w, (3, 3, 3), padding=1, bias=False), nn.BatchNorm3d(2 * w), nn.ReLU(),
            nn.Conv3d(2 * w, 4 * w, (3, 3, 3), padding=1, bias=False), nn.BatchNorm3d(4 * w), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.net(x)), 1))


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images float32 N x 1 x 8 x 8 in [0, 1], labels int64) from scikit-learn's bundled copy."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    return x, d.target.astype(np.int64)


def split_indices(labels: np.ndarray, fractions: tuple[float, ...], seed: int = 0) -> list[np.ndarray]:
    """Stratified split of range(len(labels)) into parts of the given fractions."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        cuts = np.round(np.cumsum(fractions) / sum(fractions) * len(idx)).astype(int)
        start = 0
        for i, stop in enumerate(cuts):
            parts[i].extend(idx[start:stop].tolist())
            start = stop
    return [np.array(sorted(p), dtype=np.int64) for p in parts]


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate N x C x H x W images by per-image angles (bilinear, zero fill)."""
    theta = degrees.float() * math.pi / 180.0
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(cos)
    mat = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(mat, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def add_noise(images: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    return images + sigma * torch.randn(images.shape, generator=gen)


def shift_domain(images: torch.Tensor, seed: int, *, min_deg: float = 15.0, max_deg: float = 35.0,
                 sigma: float = 0.15) -> torch.Tensor:
    """The recipe's domain shift: random rotation of +-[min_deg, max_deg] and Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    mag = min_deg + (max_deg - min_deg) * torch.rand(n, generator=gen)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    out = rotate(images, mag * sign)
    if sigma:
        out = add_noise(out, sigma, gen)
    return out


def digits_scenario(seed: int = 0) -> dict:
    """Datasets of the ``digits`` recipe: old (M0) train/test, new (update) train/test."""
    x, y = load_digits_arrays()
    old_idx, new_idx, test_idx = split_indices(y, (0.5, 0.25, 0.25), seed=seed)
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    return {
        "old_train": TensorDataset(xt[old_idx], yt[old_idx]),
        "old_test": TensorDataset(xt[test_idx], yt[test_idx]),
        "new_train": TensorDataset(shift_domain(xt[new_idx], seed + 1), yt[new_idx]),
        "new_test": TensorDataset(shift_domain(xt[test_idx], seed + 2), yt[test_idx]),
        "num_classes": 10,
    }


def moving_clips(images: torch.Tensor, labels: torch.Tensor, frames: int = 6, size: int = 16,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Short clips of a digit moving across a ``size`` x ``size`` canvas.

    Label = digit * 2 + direction (0: left-to-right, 1: right-to-left), so
    recognising a clip needs both appearance and motion (20 classes)."""
    gen = torch.Generator().manual_seed(seed)
    n, _, h, w = images.shape
    direction = (torch.rand(n, generator=gen) < 0.5).long()
    top = torch.randint(0, size - h + 1, (n,), generator=gen)
    clips = torch.zeros(n, 1, frames, size, size)
    span = size - w
    for t in range(frames):
        pos = torch.round(torch.tensor(t / max(1, frames - 1) * span)).long()
        for i in range(n):
            left = int(pos) if direction[i] == 0 else int(span - pos)
            clips[i, 0, t, top[i]:top[i] + h, left:left + w] = images[i, 0]
    return clips, labels * 2 + direction


RECIPES = ("digits",)
