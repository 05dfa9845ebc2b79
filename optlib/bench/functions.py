"""Two-dimensional test functions with their gradients, for watching optimizers move.

Each function takes points as a tensor whose last dimension holds (x, y), so the same code evaluates
one point for an optimizer and a whole grid for a contour plot. Gradients are written out by hand
(the tests check them against autograd), so a trajectory needs no autograd graph.
"""
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass(frozen=True)
class TestFunction:
    """A 2D objective: its value, its gradient, where its minimum is and how to draw it."""

    __test__ = False  # the name starts with "Test"; this tells pytest it is not a test class

    name: str
    value: Callable[[Tensor], Tensor]  # (..., 2) -> (...)
    gradient: Callable[[Tensor], Tensor]  # (..., 2) -> (..., 2)
    minimum: tuple[float, float]
    start: tuple[float, float]  # a start point where the function is instructive
    xlim: tuple[float, float]
    ylim: tuple[float, float]

    def __call__(self, xy: Tensor) -> Tensor:
        return self.value(xy)


def quadratic(condition_number: float = 10.0) -> TestFunction:
    r"""The ill-conditioned quadratic $f(x, y) = \tfrac12 (x^2 + \kappa y^2)$.

    Its Hessian is diag(1, kappa): the smallest curvature is l = 1, the largest is L = kappa, and the
    condition number L / l is kappa (the book writes l as $\ell$; mu is momentum).
    """
    if condition_number < 1:
        raise ValueError(f"condition_number must be at least 1, got {condition_number}")
    kappa = float(condition_number)

    def value(xy: Tensor) -> Tensor:
        x, y = xy[..., 0], xy[..., 1]
        return 0.5 * (x**2 + kappa * y**2)

    def gradient(xy: Tensor) -> Tensor:
        x, y = xy[..., 0], xy[..., 1]
        return torch.stack([x, kappa * y], dim=-1)

    name = f"quadratic (kappa={kappa:g})"
    return TestFunction(name, value, gradient, (0.0, 0.0), (-4.0, 1.5), (-4.5, 4.5), (-2.0, 2.0))


def _rosenbrock_value(xy: Tensor) -> Tensor:
    x, y = xy[..., 0], xy[..., 1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def _rosenbrock_gradient(xy: Tensor) -> Tensor:
    x, y = xy[..., 0], xy[..., 1]
    return torch.stack([-2 * (1 - x) - 400 * x * (y - x**2), 200 * (y - x**2)], dim=-1)


rosenbrock = TestFunction(
    "rosenbrock", _rosenbrock_value, _rosenbrock_gradient,
    minimum=(1.0, 1.0), start=(-1.5, 2.0), xlim=(-2.0, 2.0), ylim=(-1.0, 3.0),
)
"""Rosenbrock's banana $(1 - x)^2 + 100 (y - x^2)^2$: a curved, flat-bottomed valley to (1, 1)."""


def _beale_terms(xy: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    x, y = xy[..., 0], xy[..., 1]
    t1 = 1.5 - x + x * y
    t2 = 2.25 - x + x * y**2
    t3 = 2.625 - x + x * y**3
    return x, y, t1, t2, t3


def _beale_value(xy: Tensor) -> Tensor:
    _, _, t1, t2, t3 = _beale_terms(xy)
    return t1**2 + t2**2 + t3**2


def _beale_gradient(xy: Tensor) -> Tensor:
    x, y, t1, t2, t3 = _beale_terms(xy)
    dx = 2 * t1 * (y - 1) + 2 * t2 * (y**2 - 1) + 2 * t3 * (y**3 - 1)
    dy = 2 * t1 * x + 2 * t2 * 2 * x * y + 2 * t3 * 3 * x * y**2
    return torch.stack([dx, dy], dim=-1)


beale = TestFunction(
    "beale", _beale_value, _beale_gradient,
    minimum=(3.0, 0.5), start=(1.0, 1.5), xlim=(-0.5, 4.0), ylim=(-1.5, 2.0),
)
"""Beale's function: flat plateaus and steep ridges, minimum at (3, 0.5)."""


def _saddle_value(xy: Tensor) -> Tensor:
    x, y = xy[..., 0], xy[..., 1]
    return 0.5 * x**2 + 0.25 * y**4 - 0.5 * y**2


def _saddle_gradient(xy: Tensor) -> Tensor:
    x, y = xy[..., 0], xy[..., 1]
    return torch.stack([x, y**3 - y], dim=-1)


saddle = TestFunction(
    "saddle", _saddle_value, _saddle_gradient,
    minimum=(0.0, 1.0), start=(2.0, 1e-3), xlim=(-2.5, 2.5), ylim=(-1.8, 1.8),
)
"""$\\tfrac12 x^2 + \\tfrac14 y^4 - \\tfrac12 y^2$: a saddle point at the origin between minima
at (0, +-1). The minimum listed is the one a start with y > 0 falls into."""


def trajectory(function: TestFunction, make_optimizer, steps: int, start=None) -> Tensor:
    """Run an optimizer on a test function; return the visited points, shape (steps + 1, 2).

    `make_optimizer` takes the list of parameters (one float64 tensor of shape (2,)) and
    returns an optimizer. A run that overflows stops at the last finite point, so
    divergence shows as a short path.
    """
    start = function.start if start is None else start
    point = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    optimizer = make_optimizer([point])
    path = [point.detach().clone()]
    for _ in range(steps):
        optimizer.zero_grad()
        point.grad = function.gradient(point.detach())
        optimizer.step()
        if not torch.isfinite(point).all():
            break
        path.append(point.detach().clone())
    return torch.stack(path)


def _rastrigin_value(xy: Tensor) -> Tensor:
    x, y = xy[..., 0], xy[..., 1]
    return 20 + x**2 + y**2 - 10 * (torch.cos(2 * torch.pi * x) + torch.cos(2 * torch.pi * y))


def _rastrigin_gradient(xy: Tensor) -> Tensor:
    return 2 * xy + 20 * torch.pi * torch.sin(2 * torch.pi * xy)


rastrigin = TestFunction(
    "rastrigin", _rastrigin_value, _rastrigin_gradient,
    minimum=(0.0, 0.0), start=(2.2, -1.6), xlim=(-4.5, 4.5), ylim=(-4.5, 4.5),
)
"""Rastrigin's function $20 + x^2 + y^2 - 10 (\\cos 2\\pi x + \\cos 2\\pi y)$: a bowl covered in
ripples, with a local minimum near every point of the integer grid and the global one at (0, 0)."""
