"""Tests of the test functions added for the momentum chapter (imported from optlib.bench.functions)."""
import torch

from optlib.bench.functions import rastrigin


def test_rastrigin_gradient_matches_autograd():
    gen = torch.Generator().manual_seed(0)
    points = (4 * torch.randn(200, 2, dtype=torch.float64, generator=gen)).requires_grad_(True)
    rastrigin(points).sum().backward()
    torch.testing.assert_close(rastrigin.gradient(points.detach()), points.grad, rtol=1e-12, atol=1e-12)


def test_rastrigin_global_minimum_is_zero_and_stationary():
    minimum = torch.tensor(rastrigin.minimum, dtype=torch.float64)
    assert rastrigin(minimum).abs() < 1e-12
    assert rastrigin.gradient(minimum).abs().max() < 1e-12
    assert rastrigin(minimum) < rastrigin(torch.tensor(rastrigin.start, dtype=torch.float64))


def test_rastrigin_has_local_minima_near_the_integer_grid():
    # Gradient descent with a small step from just off each grid point stays next to it, at a
    # stationary point that is higher than the global minimum: a local minimum.
    grid = torch.tensor([[i, j] for i in range(-3, 4) for j in range(-3, 4)], dtype=torch.float64)
    point = grid + 0.05
    for _ in range(2000):
        point = point - 1e-3 * rastrigin.gradient(point)
    assert (point - grid).abs().max() < 0.1
    assert rastrigin.gradient(point).abs().max() < 1e-9
    values = rastrigin(point)
    assert (values[grid.norm(dim=1) > 0] > 0.9).all()
