"""Datasets that need no download: ones that ship inside scikit-learn, and ones generated from a seed.

Every dataset is built on the CPU from a seed, so it is the same on every machine, and then moved to
the device the caller asks for.
"""
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Dataset:
    """Train and test tensors. Inputs are float32; targets are class indices or float32 values."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    def to(self, device) -> "Dataset":
        return Dataset(*(t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test)))

    def double(self) -> "Dataset":
        """The same data with float64 inputs (and float targets); class indices stay int64.

        Small experiments that print results run in float64: another CPU rounds the last bit
        differently, and in float64 that moves a printed digit far more rarely than in float32."""
        tensors = (self.x_train, self.y_train, self.x_test, self.y_test)
        return Dataset(*(t.double() if t.is_floating_point() else t for t in tensors))

    def __repr__(self) -> str:
        return (
            f"Dataset(train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)}, "
            f"targets={self.y_train.dtype})"
        )


def _split(x: Tensor, y: Tensor, test_fraction: float, seed: int) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    n_test = round(test_fraction * len(x))
    test, train = order[:n_test], order[n_test:]
    # Standardize with the training statistics only, so the test set stays unseen.
    mean, std = x[train].mean(0), x[train].std(0)
    # A feature that is constant in the training set is only centred: dividing by a tiny std would
    # blow up any test value that differs (one digits pixel is 0 in every training image, 1 in a test one).
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    x = (x - mean) / std
    return Dataset(x[train], y[train], x[test], y[test])


def digits(*, test_fraction: float = 0.25, seed: int = 0, device="cpu") -> Dataset:
    """scikit-learn's handwritten digits: 1,797 images of 8x8 pixels (64 features), 10 classes."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.long)
    return _split(x, y, test_fraction, seed).to(device)


def breast_cancer(*, test_fraction: float = 0.25, seed: int = 0, device="cpu") -> Dataset:
    """scikit-learn's Wisconsin breast cancer data: 569 samples, 30 features, 2 classes."""
    from sklearn.datasets import load_breast_cancer

    features, labels = load_breast_cancer(return_X_y=True)
    x = torch.tensor(features, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.long)
    return _split(x, y, test_fraction, seed).to(device)


def linear_regression(
    n: int = 1000, dim: int = 20, *, noise: float = 0.1, test_fraction: float = 0.25, seed: int = 0, device="cpu"
) -> Dataset:
    """A synthetic least-squares task: y = x @ w_true + noise, with x and w_true drawn from a seed."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator)
    w_true = torch.randn(dim, 1, generator=generator)
    y = x @ w_true + noise * torch.randn(n, 1, generator=generator)
    order = torch.randperm(n, generator=generator)
    n_test = round(test_fraction * n)
    test, train = order[:n_test], order[n_test:]
    return Dataset(x[train], y[train], x[test], y[test]).to(device)


def rare_features(
    n: int = 2000,
    n_frequent: int = 10,
    n_rare: int = 90,
    *,
    rare_probability: float = 0.02,
    frequent_weight: float = 0.25,
    rare_weight: float = 3.0,
    test_fraction: float = 0.25,
    seed: int = 0,
    device="cpu",
) -> Dataset:
    r"""A binary classification task whose signal sits in rare features, like rare words in text.

    Each example has ``n_frequent + n_rare`` features. Columns ``[0, n_frequent)`` are **frequent**:
    standard normal, non-zero in every example, but weakly informative. Columns
    ``[n_frequent, n_frequent + n_rare)`` are **rare**: 1 with probability ``rare_probability`` and
    0 otherwise, and strongly informative. The true weights are fixed, so a chapter can compare a
    learned model with them: frequent feature ``j`` has weight ``frequent_weight * (-1)**j``, rare
    feature ``j`` (counted from 0 within the rare block) has weight ``rare_weight * (-1)**j``. The
    label is 1 with probability ``sigmoid(x @ w_true)``, drawn from the same seed; targets are class
    indices (int64), so ``mlp([n_frequent + n_rare, 2])`` is logistic regression on it.

    The inputs are not standardized: standardizing would scale every rare column up by about
    ``1 / sqrt(rare_probability)`` and hide the rarity that this task is about.
    """
    if not 0 < rare_probability <= 1:
        raise ValueError(f"rare_probability must be in (0, 1], got {rare_probability}")
    generator = torch.Generator().manual_seed(seed)
    frequent = torch.randn(n, n_frequent, generator=generator)
    rare = (torch.rand(n, n_rare, generator=generator) < rare_probability).float()
    x = torch.cat([frequent, rare], dim=1)
    w_true = torch.cat([frequent_weight * _alternating(n_frequent), rare_weight * _alternating(n_rare)])
    probability = torch.sigmoid(x @ w_true)
    y = (torch.rand(n, generator=generator) < probability).long()
    order = torch.randperm(n, generator=generator)
    n_test = round(test_fraction * n)
    test, train = order[:n_test], order[n_test:]
    return Dataset(x[train], y[train], x[test], y[test]).to(device)


def _alternating(k: int) -> Tensor:
    """+1, -1, +1, ... (k entries)."""
    return 1.0 - 2.0 * (torch.arange(k) % 2)
