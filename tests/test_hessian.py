"""The Hessian power iteration of optlib.bench.hessian."""
import torch
from torch import nn

from optlib.bench import hessian


def test_top_eigenvalue_of_a_quadratic():
    h = torch.diag(torch.tensor([1.0, 3.0, 10.0], dtype=torch.float64))
    theta = torch.randn(3, dtype=torch.float64, requires_grad=True)
    before = theta.detach().clone()
    value = hessian.top_eigenvalue(lambda: 0.5 * theta @ h @ theta, [theta], tolerance=1e-12)
    assert abs(value - 10.0) < 1e-8
    assert torch.equal(theta.detach(), before)  # parameters untouched


def test_hessian_vector_product_matches_the_full_hessian():
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]
    hv = hessian.hessian_vector_product(lambda: ((model(x) - y) ** 2).mean(), params, v)
    flat = torch.cat([p.reshape(-1) for p in params]).detach().requires_grad_()

    def loss(theta):
        w, b = theta[:6].reshape(2, 3), theta[6:]
        return ((x @ w.T + b - y) ** 2).mean()

    full = torch.autograd.functional.hessian(loss, flat)
    expected = full @ torch.cat([t.reshape(-1) for t in v])
    assert torch.allclose(torch.cat([t.reshape(-1) for t in hv]), expected, atol=1e-12)


def test_sharpness_of_least_squares_is_twice_the_top_eigenvalue_of_the_covariance():
    x = torch.randn(50, 4, dtype=torch.float64)
    y = torch.randn(50, 1, dtype=torch.float64)
    model = nn.Linear(4, 1, bias=False).double()
    expected = torch.linalg.eigvalsh(2 * x.T @ x / 50).max().item()
    assert abs(hessian.sharpness(model, x, y, tolerance=1e-12, iterations=1000) - expected) < 1e-6 * expected
