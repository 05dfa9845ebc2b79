"""Tests of the experiment kit: what the chapters' figures and numbers rest on."""
import math

import matplotlib

matplotlib.use("Agg")  # no display in CI

import pytest
import torch

import optlib
from optlib import bench

FUNCTIONS = [bench.quadratic(1), bench.quadratic(25), bench.rosenbrock, bench.beale, bench.saddle]


@pytest.mark.parametrize("function", FUNCTIONS, ids=lambda f: f.name)
def test_gradient_matches_autograd(function):
    points = torch.randn(200, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    points.requires_grad_(True)
    function(points).sum().backward()
    torch.testing.assert_close(function.gradient(points.detach()), points.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("function", FUNCTIONS, ids=lambda f: f.name)
def test_minimum_is_a_stationary_point_below_the_start(function):
    minimum = torch.tensor(function.minimum, dtype=torch.float64)
    start = torch.tensor(function.start, dtype=torch.float64)
    assert function.gradient(minimum).abs().max() < 1e-12
    assert function(minimum) < function(start)


def test_quadratic_rejects_condition_number_below_one():
    with pytest.raises(ValueError, match="0.5"):
        bench.quadratic(0.5)


def test_trajectory_records_every_step_and_converges():
    path = bench.trajectory(bench.quadratic(4), lambda p: optlib.SGD(p, lr=0.2), steps=200)
    assert path.shape == (201, 2)
    assert path[0].tolist() == list(bench.quadratic(4).start)
    assert path[-1].norm() < 1e-6


def test_trajectory_stops_at_the_last_finite_point_when_diverging():
    path = bench.trajectory(bench.quadratic(10), lambda p: optlib.SGD(p, lr=1.0), steps=2000)
    assert len(path) < 2001
    assert torch.isfinite(path).all()


@pytest.mark.parametrize("make", [bench.digits, bench.breast_cancer], ids=["digits", "breast_cancer"])
def test_classification_data_are_standardized_with_training_statistics(make):
    data = make()
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.long
    assert len(data.x_test) == round(0.25 * (len(data.x_train) + len(data.x_test)))
    # Constant pixels have std 0 and stay 0; every other feature has mean 0 and std 1 on the train set.
    varying = data.x_train.std(0) > 0
    assert data.x_train.mean(0).abs().max() < 1e-5
    torch.testing.assert_close(data.x_train.std(0)[varying], torch.ones(int(varying.sum())), rtol=1e-4, atol=1e-4)


def test_data_are_the_same_for_the_same_seed_and_differ_for_another():
    a, b, c = bench.digits(seed=0), bench.digits(seed=0), bench.digits(seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)


def test_linear_regression_is_nearly_solved_by_least_squares():
    data = bench.linear_regression(n=500, dim=5, noise=0.1)
    solution = torch.linalg.lstsq(data.x_train, data.y_train).solution
    residual = ((data.x_test @ solution - data.y_test) ** 2).mean()
    assert 0.005 < residual < 0.02  # the noise variance is 0.01


def test_mlp_is_seeded_and_has_the_requested_shape():
    a, b = bench.mlp([64, 32, 10], seed=3), bench.mlp([64, 32, 10], seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a(torch.zeros(5, 64)).shape == (5, 10)
    assert len(bench.mlp([64, 10])) == 1  # no hidden layer: logistic regression


def _train(lr=0.1, seed=0, epochs=3):
    model = bench.mlp([64, 16, 10], seed=0)
    return bench.train(model, optlib.SGD(model.parameters(), lr=lr), bench.digits(), epochs=epochs, seed=seed)


def test_train_is_deterministic_and_learns():
    first, second = _train(), _train()
    assert first.train_loss == second.train_loss and first.test_accuracy == second.test_accuracy
    assert len(first.epoch_train_loss) == len(first.test_loss) == len(first.test_accuracy) == 4
    assert len(first.train_loss) == 3 * math.ceil(1348 / 64)
    assert first.epoch_train_loss[-1] < 0.5 * first.epoch_train_loss[0]
    assert first.test_accuracy[-1] > 0.8
    assert not first.diverged


def test_train_batch_order_follows_the_seed():
    assert _train(seed=0).train_loss != _train(seed=1).train_loss


def test_train_marks_and_stops_a_diverging_run():
    history = _train(lr=100.0, epochs=5)
    assert history.diverged
    assert not math.isfinite(history.train_loss[-1])
    assert len(history.train_loss) < 5 * math.ceil(1348 / 64)


def test_train_steps_the_scheduler_once_per_epoch():
    model = bench.mlp([64, 10])
    optimizer = optlib.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    bench.train(model, optimizer, bench.digits(), epochs=3, scheduler=scheduler)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 8)


def test_plots_draw_what_they_are_given():
    fig, (left, right) = bench.subplots(1, 2)
    path = bench.trajectory(bench.rosenbrock, lambda p: optlib.SGD(p, lr=1e-3), steps=10)
    bench.trajectories(bench.rosenbrock, {"sgd": path}, ax=left)
    assert [line.get_label() for line in left.get_lines()][-1] == "sgd"
    bench.loss_curves({"a": _train(epochs=1)}, ax=right)
    assert right.get_yscale() == "log" and len(right.get_lines()) == 1
    matplotlib.pyplot.close(fig)
