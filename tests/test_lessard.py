"""Lessard et al.'s function: its gradient, its curvature bounds, and the heavy ball's cycle."""
import torch

import optlib
from optlib.bench import lessard


def test_gradient_matches_autograd_and_pieces_join():
    x = torch.linspace(-4, 5, 901, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(lessard.value(x).sum(), x)
    assert torch.allclose(grad, lessard.gradient(x.detach()), atol=1e-12)
    for knot in (1.0, 2.0):  # value and gradient are continuous at the knots
        left, right = torch.tensor([knot - 1e-9, knot], dtype=torch.float64)
        assert abs(lessard.value(left) - lessard.value(right)) < 1e-6
        assert abs(lessard.gradient(left) - lessard.gradient(right)) < 1e-6


def test_settings():
    assert lessard.heavy_ball_settings() == (4 / 36, (4 / 6) ** 2)
    assert lessard.nesterov_settings() == (1 / 25, 4 / 6)


def _run(settings, nesterov, steps=600):
    x = torch.tensor([lessard.START], dtype=torch.float64, requires_grad=True)
    optimizer = optlib.SGD([x], lr=settings[0], momentum=settings[1], nesterov=nesterov)
    path = []
    for _ in range(steps):
        x.grad = lessard.gradient(x.detach())
        optimizer.step()
        path.append(x.item())
    return path


def test_heavy_ball_cycles_and_nesterov_converges():
    path = _run(lessard.heavy_ball_settings(), nesterov=False)
    assert min(abs(v) for v in path[-30:]) > 0.5
    assert abs(path[-1] - path[-4]) < 1e-9  # a cycle of period 3
    assert max(abs(v) for v in _run(lessard.nesterov_settings(), nesterov=True)[-30:]) < 1e-9
