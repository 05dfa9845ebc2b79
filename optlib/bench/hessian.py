"""The sharpness of a loss: the largest eigenvalue of its Hessian, by power iteration.

Gradient descent with learning rate ``lr`` is stable along a direction of curvature ``h`` only if
``lr * h < 2`` (the SGD chapter derives this on a quadratic). For a network the curvature is not
known in advance, but its largest value can be measured: the Hessian is never formed, only its
products with a vector, ``H v``, which autograd gives as the gradient of ``<grad f, v>`` (Pearlmutter's
trick), at the cost of about two backward passes. Power iteration on these products converges to the
eigenvalue of largest magnitude.

Use float64 (``model.double()``, ``data.double()``): the products are then accurate to many digits and
the iteration's result does not depend on the machine beyond the digits it controls.
"""
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Loss = Callable[[], Tensor]


def hessian_vector_product(loss: Loss, params: Sequence[Tensor], vector: Sequence[Tensor]) -> list[Tensor]:
    """``H v`` for the Hessian ``H`` of ``loss()`` with respect to ``params``; ``vector`` has one
    tensor per parameter, of the same shapes. ``loss`` is called once, with autograd enabled."""
    params = list(params)
    with torch.enable_grad():
        grads = torch.autograd.grad(loss(), params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vector))
        return [h.detach() for h in torch.autograd.grad(dot, params)]


def top_eigenvalue(
    loss: Loss,
    params: Sequence[Tensor],
    *,
    iterations: int = 200,
    tolerance: float = 1e-6,
    seed: int = 0,
) -> float:
    """The eigenvalue of largest magnitude of the Hessian of ``loss()`` at ``params``, by power
    iteration from a random unit vector drawn from ``seed`` (on the CPU).

    Stops when the Rayleigh quotient changes by less than ``tolerance`` (relative) between two
    iterations, or after ``iterations``. The parameters are not changed.
    """
    params = [p for p in params if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    vector = _normalized(vector)
    estimate = math.nan
    for _ in range(iterations):
        product = hessian_vector_product(loss, params, vector)
        new = sum((h * v).sum() for h, v in zip(product, vector)).item()  # v^T H v, |v| = 1
        converged = math.isfinite(estimate) and abs(new - estimate) <= tolerance * abs(new)
        estimate = new
        if converged:
            break
        vector = _normalized(product)
    return estimate


def sharpness(model: nn.Module, x: Tensor, y: Tensor, loss_fn=None, **kwargs) -> float:
    """The top Hessian eigenvalue of ``loss_fn(model(x), y)`` (by default the cross-entropy for class
    labels, else the mean squared error) with respect to the model's parameters; ``kwargs`` go to
    :func:`top_eigenvalue`."""
    loss_fn = loss_fn or (F.cross_entropy if y.dtype == torch.long else F.mse_loss)
    return top_eigenvalue(lambda: loss_fn(model(x), y), list(model.parameters()), **kwargs)


def _normalized(vector: Sequence[Tensor]) -> list[Tensor]:
    norm = math.sqrt(sum((v * v).sum().item() for v in vector))
    return [v / norm for v in vector]
