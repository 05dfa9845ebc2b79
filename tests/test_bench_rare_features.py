"""Tests of bench.data.rare_features, the task with rare, informative features (Adagrad chapter)."""
import pytest
import torch

from optlib.bench.data import rare_features


def test_shapes_and_targets():
    data = rare_features(n=400, n_frequent=5, n_rare=30, test_fraction=0.25, seed=0)
    assert data.x_train.shape == (300, 35) and data.x_test.shape == (100, 35)
    assert data.y_train.shape == (300,) and data.y_train.dtype == torch.long
    assert data.x_train.dtype == torch.float32
    assert set(data.y_train.tolist()) == {0, 1}  # both classes occur


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = rare_features(seed=3), rare_features(seed=3), rare_features(seed=4)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.x_train, c.x_train)


def test_sparsity_pattern():
    n_frequent, n_rare, p = 10, 90, 0.02
    data = rare_features(n=20_000, n_frequent=n_frequent, n_rare=n_rare, rare_probability=p, seed=0)
    x = torch.cat([data.x_train, data.x_test])
    frequent, rare = x[:, :n_frequent], x[:, n_frequent:]
    assert (frequent != 0).all()  # dense: non-zero in every example
    assert set(rare.unique().tolist()) == {0.0, 1.0}  # binary indicators
    rate = (rare != 0).float().mean(0)  # how often each rare feature is on
    assert rate.mean().item() == pytest.approx(p, rel=0.05)
    assert (rate > p / 2).all() and (rate < 2 * p).all()


def test_the_rare_features_carry_the_signal():
    # The documented true weights classify well; the frequent features alone barely do.
    n_frequent, n_rare = 10, 90
    data = rare_features(n=20_000, n_frequent=n_frequent, n_rare=n_rare, seed=0)
    signs = lambda k: 1.0 - 2.0 * (torch.arange(k) % 2)  # noqa: E731
    w_true = torch.cat([0.25 * signs(n_frequent), 3.0 * signs(n_rare)])
    x, y = data.x_train, data.y_train
    accuracy = ((x @ w_true > 0).long() == y).float().mean()
    frequent_only = ((x[:, :n_frequent] @ w_true[:n_frequent] > 0).long() == y).float().mean()
    assert accuracy > 0.8
    assert frequent_only < 0.7


def test_rejects_a_bad_probability():
    with pytest.raises(ValueError, match="rare_probability"):
        rare_features(rare_probability=0.0)
