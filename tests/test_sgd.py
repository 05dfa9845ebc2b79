"""optlib.SGD beyond what every optimizer is tested for in test_twins.py (against torch over a
grid, errors, checkpoints, schedulers ...): its state, equivalences with hand-written updates,
and convergence. float64."""

import pytest
import torch

import optlib
from optim_helpers import SHAPES, TOL, make_params as _params, max_diff as _max_diff, run as _run
from optlib.bench.compare import fixed_gradients


def test_momentum_buffer_only_with_momentum():
    for momentum in (0.0, 0.9):
        params = _params()
        opt = optlib.SGD(params, lr=0.1, momentum=momentum)
        _run(opt, params, fixed_gradients(SHAPES, 2))
        keys = [set(s) for s in opt.state_dict()["state"].values()]
        assert keys == ([] if momentum == 0 else [{"momentum_buffer"}] * len(params))


# ---------------------------------------------------------------- 2. internal equivalences


def test_momentum_zero_is_plain_gradient_descent():
    params, grads = _params(), fixed_gradients(SHAPES, 60)
    expected = [p.detach().clone() for p in params]
    for step in grads:
        expected = [p - 0.1 * g for p, g in zip(expected, step)]
    _run(optlib.SGD(params, lr=0.1), params, grads)
    assert _max_diff(params, expected) < TOL


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_written_by_hand(nesterov):
    lr, mu, tau = 0.05, 0.9, 0.0 if nesterov else 0.3
    params, grads = _params(), fixed_gradients(SHAPES, 60)
    expected, bufs = [p.detach().clone() for p in params], None
    for t, step in enumerate(grads, start=1):
        bufs = list(step) if t == 1 else [mu * b + (1 - tau) * g for b, g in zip(bufs, step)]
        updates = [g + mu * b for g, b in zip(step, bufs)] if nesterov else bufs
        expected = [p - lr * u for p, u in zip(expected, updates)]
    opt = optlib.SGD(params, lr=lr, momentum=mu, dampening=tau, nesterov=nesterov)
    _run(opt, params, grads)
    assert _max_diff(params, expected) < TOL
    assert _max_diff([opt.state[p]["momentum_buffer"] for p in params], bufs) < TOL


def test_pytorch_momentum_equals_sutskever_with_constant_lr():
    # The docstring's note: v = mu v - lr g; p += v gives the same iterates as torch's form.
    lr, mu = 0.05, 0.9
    params, grads = _params(), fixed_gradients(SHAPES, 60)
    expected = [p.detach().clone() for p in params]
    velocity = [torch.zeros_like(p) for p in expected]
    for step in grads:
        velocity = [mu * v - lr * g for v, g in zip(velocity, step)]
        expected = [p + v for p, v in zip(expected, velocity)]
    _run(optlib.SGD(params, lr=lr, momentum=mu), params, grads)
    assert _max_diff(params, expected) < TOL


def test_dampening_without_momentum_has_no_effect():
    a, b, grads = _params(), _params(), fixed_gradients(SHAPES, 60)
    _run(optlib.SGD(a, lr=0.1, dampening=0.5), a, grads)
    _run(optlib.SGD(b, lr=0.1), b, grads)
    assert _max_diff(a, b) == 0


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_weight_decay_is_adding_wd_times_param_to_the_gradient(momentum):
    wd, grads = 1e-2, fixed_gradients(SHAPES, 60)
    a, b = _params(), _params()
    _run(optlib.SGD(a, lr=0.1, momentum=momentum, weight_decay=wd), a, grads)
    opt = optlib.SGD(b, lr=0.1, momentum=momentum)
    for step in grads:
        for p, g in zip(b, step):
            p.grad = g + wd * p.detach()
        opt.step()
    assert _max_diff(a, b) < TOL


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_maximize_is_negating_the_gradient(momentum):
    grads = fixed_gradients(SHAPES, 60)
    a, b = _params(), _params()
    _run(optlib.SGD(a, lr=0.1, momentum=momentum, weight_decay=1e-2, maximize=True), a, grads)
    negated = [[-g for g in step] for step in grads]
    _run(optlib.SGD(b, lr=0.1, momentum=momentum, weight_decay=1e-2), b, negated)
    assert _max_diff(a, b) < TOL


# ---------------------------------------------------------------- 3. behaviour


def _minimize(f, start, steps, **kwargs):
    x = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt = optlib.SGD([x], **kwargs)

    def closure():
        opt.zero_grad()
        loss = f(x)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return x.detach()


@pytest.mark.parametrize("kwargs", [dict(lr=0.09), dict(lr=0.02, momentum=0.9, nesterov=True)])
def test_converges_on_a_quadratic(kwargs):
    scales = torch.tensor([1.0, 10.0], dtype=torch.float64)  # condition number 10
    x = _minimize(lambda x: 0.5 * (scales * x**2).sum(), [3.0, -2.0], 300, **kwargs)
    assert x.abs().max() < 1e-6


def test_converges_on_rosenbrock():
    x = torch.tensor([-1.5, 2.0], dtype=torch.float64, requires_grad=True)
    opt = optlib.SGD([x], lr=2e-3, momentum=0.9)
    for _ in range(1500):  # gradient of (1 - a)^2 + 100 (b - a^2)^2, by hand: faster than autograd
        a, b = x.detach()
        x.grad = torch.stack([-2 * (1 - a) - 400 * a * (b - a**2), 200 * (b - a**2)])
        opt.step()
    assert (x.detach() - 1).abs().max() < 1e-4


def test_params_without_grad_are_skipped():
    params = _params()
    before = params[1].detach().clone()
    opt = optlib.SGD(params, lr=0.1, momentum=0.9)
    for step in fixed_gradients(SHAPES, 3):
        params[0].grad, params[2].grad = step[0], step[2]
        opt.step()
    assert torch.equal(params[1], before) and params[1] not in opt.state
    assert "momentum_buffer" in opt.state[params[0]]


