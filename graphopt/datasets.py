"""Small real data sets that ship inside packages (nothing is downloaded), and a tiny trainer.

digits: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def digits(test_fraction: float = 0.25, seed: int = 0):
    """((x_train, y_train), (x_test, y_test)) as float32 (N,1,8,8) in [0,1] and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = int(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def batches(x: torch.Tensor, y: torch.Tensor | None, batch_size: int, *, shuffle: bool = False, seed: int = 0):
    """A list of (x, y) (or x) batches."""
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(x))
    out = []
    for i in range(0, len(x), batch_size):
        j = idx[i:i + batch_size]
        out.append((x[j], y[j]) if y is not None else x[j])
    return out


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits: conv(32)-conv(64)-pool-conv(64)-fc(128)-fc(10), with BatchNorm."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 16, 128), nn.ReLU(), nn.Dropout(0.2),
                                        nn.Linear(128, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def train_classifier(model: nn.Module, train: list, epochs: int = 10, lr: float = 2e-3) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return (model(x).argmax(-1) == y).float().mean().item() * 100.0
