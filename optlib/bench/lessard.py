"""Lessard, Recht and Packard's one-dimensional function on which the heavy ball fails.

The function is strongly convex and smooth, with curvature between ``ELL = 1`` and ``L = 25``
(condition number 25), but it is not a quadratic: it is made of three quadratic pieces,

    f(x) = 25/2 x^2                  for x < 1,
           1/2 x^2 + 24 x - 12       for 1 <= x < 2,
           25/2 x^2 - 24 x + 36      for x >= 2,

joined so that f and its gradient are continuous (Lessard et al. 2016, section 4.6). Its only
minimum is at 0. With the settings that are optimal for quadratics with curvatures in [1, 25],
gamma = 4 / (sqrt(L) + sqrt(ELL))^2 = 1/9 and mu = ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^2 = 4/9,
the heavy ball started at x = 3.3 does not converge: it settles on a cycle. Nesterov's method with
its classic settings (gamma = 1/L, mu = (sqrt(kappa) - 1) / (sqrt(kappa) + 1)) converges.

Values and gradients work elementwise on a tensor of any shape, so one optimizer can run many
starts at once, and need no autograd graph (the tests check the gradient against autograd).
"""
import math

import torch
from torch import Tensor

ELL = 1.0
"""The smallest curvature of the function (the book writes it as ell)."""
L = 25.0
"""The largest curvature of the function."""
START = 3.3
"""Lessard et al.'s start, from which the heavy ball cycles."""
MINIMUM = 0.0


def value(x: Tensor) -> Tensor:
    """f(x), elementwise."""
    return torch.where(
        x < 1,
        12.5 * x**2,
        torch.where(x < 2, 0.5 * x**2 + 24 * x - 12, 12.5 * x**2 - 24 * x + 36),
    )


def gradient(x: Tensor) -> Tensor:
    """f'(x), elementwise: 25 x, then x + 24, then 25 x - 24."""
    return torch.where(x < 1, 25 * x, torch.where(x < 2, x + 24, 25 * x - 24))


def heavy_ball_settings(ell: float = ELL, big_l: float = L) -> tuple[float, float]:
    """(gamma, mu) optimal for the heavy ball on quadratics with curvatures in [ell, L]."""
    kappa = big_l / ell
    gamma = 4 / (math.sqrt(big_l) + math.sqrt(ell)) ** 2
    mu = ((math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)) ** 2
    return gamma, mu


def nesterov_settings(ell: float = ELL, big_l: float = L) -> tuple[float, float]:
    """Nesterov's classic (gamma, mu) for smooth strongly convex functions: 1/L and
    (sqrt(kappa) - 1) / (sqrt(kappa) + 1)."""
    kappa = big_l / ell
    return 1 / big_l, (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)
