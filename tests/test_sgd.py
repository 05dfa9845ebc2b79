"""optlib.SGD: (1) against torch.optim.SGD, (2) internal equivalences, (3) behaviour. float64."""

import copy
import importlib
import inspect
import itertools
import sys

import pytest
import torch

import optlib
from optlib.bench.compare import fixed_gradients, run_side_by_side

TOL = 1e-12
SHAPES = ((4, 3), (3,), (1,))


def _params(seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]


def _clone(params):
    return [p.detach().clone().requires_grad_() for p in params]


def _run(opt, params, grads):
    """Set each step's gradients and step; returns the params."""
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    return params


def _max_diff(xs, ys):
    return max((x - y).abs().max().item() for x, y in zip(xs, ys))


# ---------------------------------------------------------------- 1. against torch.optim.SGD


def _grid():
    lrs = [("0.1", lambda: 0.1), ("tensor(0.05)", lambda: torch.tensor(0.05))]
    for (lr_name, lr), momentum, dampening, nesterov, wd, maximize in itertools.product(
        lrs, [0.0, 0.9], [0.0, 0.5], [False, True], [0.0, 1e-2], [False, True]
    ):
        if nesterov and (momentum <= 0 or dampening != 0):
            continue  # torch rejects these (tested below)
        kwargs = dict(
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=wd,
            maximize=maximize,
        )
        label = f"lr={lr_name}-" + "-".join(f"{k}={v}" for k, v in kwargs.items())
        yield pytest.param(lr, kwargs, id=label)


@pytest.mark.parametrize("lr, kwargs", list(_grid()))
def test_matches_torch(lr, kwargs):
    result = run_side_by_side(
        lambda ps: optlib.SGD(ps, lr=lr(), **kwargs),
        lambda ps: torch.optim.SGD(ps, lr=lr(), **kwargs),
        steps=60,
    )
    assert result.state_keys_match
    assert result.max_param_diff < TOL
    assert result.max_state_diff < TOL


@pytest.mark.parametrize(
    "torch_impl", [dict(foreach=False), dict(foreach=True), dict(fused=True)], ids=str
)
def test_matches_every_torch_implementation(torch_impl):
    kwargs = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)
    result = run_side_by_side(
        lambda ps: optlib.SGD(ps, **kwargs),
        lambda ps: torch.optim.SGD(ps, **kwargs, **torch_impl),
        steps=60,
    )
    assert result.agrees(TOL) and result.state_keys_match


def test_same_signature_defaults_and_group_keys():
    def described(cls):
        sig = inspect.signature(cls.__init__)
        return [(p.name, p.kind, p.default) for p in sig.parameters.values()]

    assert described(optlib.SGD) == described(torch.optim.SGD)
    ours, theirs = optlib.SGD(_params()), torch.optim.SGD(_params())
    assert ours.defaults == theirs.defaults
    assert ours.param_groups[0].keys() == theirs.param_groups[0].keys()


def test_momentum_buffer_only_with_momentum():
    for momentum in (0.0, 0.9):
        params = _params()
        opt = optlib.SGD(params, lr=0.1, momentum=momentum)
        _run(opt, params, fixed_gradients(SHAPES, 2))
        keys = [set(s) for s in opt.state_dict()["state"].values()]
        assert keys == ([] if momentum == 0 else [{"momentum_buffer"}] * len(params))


def test_sparse_gradients_like_torch():
    results = []
    for cls in (optlib.SGD, torch.optim.SGD):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(10, 3, sparse=True).double()
        opt = cls(emb.parameters(), lr=0.1, momentum=0.9, nesterov=True, maximize=True)
        for step in range(5):
            opt.zero_grad()
            emb(torch.tensor([step, 2, 7])).pow(2).sum().backward()
            assert emb.weight.grad.is_sparse
            opt.step()
        results.append(emb.weight.detach())
    assert torch.equal(*results)


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


def _checkpoint_continues(make_first, make_second, momentum=0.9):
    """Run 30 steps with make_first, move its state_dict into make_second, run 30 more
    steps on both: the two must agree bit for bit."""
    grads = fixed_gradients(SHAPES, 60)
    kwargs = dict(lr=0.05, momentum=momentum, dampening=0.1, weight_decay=1e-2)
    params = _params()
    first = make_first(params, **kwargs)
    _run(first, params, grads[:30])

    resumed = _clone(params)
    second = make_second(resumed, lr=1.0)  # hyperparameters come from the state_dict
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    _run(first, params, grads[30:])
    _run(second, resumed, grads[30:])
    assert all(torch.equal(p, q) for p, q in zip(params, resumed))
    for p, q in zip(params, resumed):
        assert first.state[p].keys() == second.state[q].keys()
        for key in first.state[p]:
            assert torch.equal(first.state[p][key], second.state[q][key])


def test_state_dict_resumes_bit_for_bit():
    _checkpoint_continues(optlib.SGD, optlib.SGD)


@pytest.mark.parametrize("direction", ["torch->optlib", "optlib->torch"])
def test_state_dict_moves_between_torch_and_optlib(direction):
    pair = (torch.optim.SGD, optlib.SGD)
    _checkpoint_continues(*(pair if direction == "torch->optlib" else pair[::-1]))


def test_lr_scheduler_like_torch():
    results = []
    for cls in (optlib.SGD, torch.optim.SGD):
        params = _params()
        opt = cls(params, lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
        for step in fixed_gradients(SHAPES, 60):
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
            scheduler.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**6)
        results.append(params)
    assert all(torch.equal(p, q) for p, q in zip(*results))


def test_param_groups_with_different_hyperparameters():
    def groups(cls):
        def make(ps):
            return cls(
                [
                    dict(params=ps[:1], lr=0.2, momentum=0.9, nesterov=True),
                    dict(params=ps[1:], weight_decay=0.1, maximize=True),
                ],
                lr=0.05,
            )

        return make

    result = run_side_by_side(groups(optlib.SGD), groups(torch.optim.SGD), steps=60)
    assert result.agrees(TOL) and result.state_keys_match
    ours, theirs = groups(optlib.SGD)(_params()), groups(torch.optim.SGD)(_params())
    for a, b in zip(ours.param_groups, theirs.param_groups):
        assert {k: v for k, v in a.items() if k != "params"} == {
            k: v for k, v in b.items() if k != "params"
        }


def test_params_without_grad_are_skipped():
    params = _params()
    before = params[1].detach().clone()
    opt = optlib.SGD(params, lr=0.1, momentum=0.9)
    for step in fixed_gradients(SHAPES, 3):
        params[0].grad, params[2].grad = step[0], step[2]
        opt.step()
    assert torch.equal(params[1], before) and params[1] not in opt.state
    assert "momentum_buffer" in opt.state[params[0]]


def test_a_gradient_that_appears_later_starts_its_own_buffer():
    # e.g. a layer unfrozen mid-training. (torch 2.13's fused=True path raises a TypeError here.)
    results = []
    for cls in (optlib.SGD, torch.optim.SGD):
        params = _params()
        opt = cls(params, lr=0.1, momentum=0.9, dampening=0.5, foreach=False)
        for t, step in enumerate(fixed_gradients(SHAPES, 6)):
            for p, g in zip(params, step):
                p.grad = g.clone() if t >= 3 or p is params[0] else None
            opt.step()
        results.append(params + [opt.state[p]["momentum_buffer"] for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_step_returns_the_closure_loss():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    opt = optlib.SGD([x], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (x**2).sum()
        loss.backward()  # needs grad enabled inside step
        return loss

    assert opt.step(closure).item() == 5.0
    assert torch.allclose(x.detach(), torch.tensor([0.8, 1.6], dtype=torch.float64))
    assert opt.step() is None


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(maximize=True),
        dict(weight_decay=0.1),
        dict(momentum=0.9),
        dict(momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True),
    ],
    ids=str,
)
def test_grad_is_not_modified(kwargs):
    params = _params()
    grads = [torch.randn(p.shape, dtype=p.dtype) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt = optlib.SGD(params, lr=0.1, **kwargs)
    for _ in range(3):  # the second step exercises the buffer's in-place update
        opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    if "momentum" in kwargs:  # the buffer is not an alias of p.grad
        assert all(opt.state[p]["momentum_buffer"].data_ptr() != p.grad.data_ptr() for p in params)


@pytest.mark.parametrize(
    "kwargs, value",
    [
        (dict(lr=-0.1), "-0.1"),
        (dict(lr=torch.tensor(-0.1)), "-0.1"),
        (dict(lr=torch.tensor([0.1, 0.2])), "(2,)"),
        (dict(momentum=-0.5), "-0.5"),
        (dict(weight_decay=-1e-4), "-0.0001"),
        (dict(nesterov=True), "momentum=0"),
        (dict(nesterov=True, momentum=0.9, dampening=0.1), "dampening=0.1"),
        (dict(foreach=True, fused=True), "foreach"),
        (dict(params=[]), None),
        (dict(params=torch.zeros(2, requires_grad=True)), None),
    ],
    ids=str,
)
def test_invalid_arguments_raise_like_torch(kwargs, value):
    kwargs = dict(params=_params(), lr=0.1) | kwargs
    with pytest.raises(Exception) as theirs:
        torch.optim.SGD(**kwargs)
    with pytest.raises(theirs.type) as ours:
        optlib.SGD(**kwargs)
    if value is not None:
        assert value in str(ours.value)


def test_differentiable_is_not_supported():
    torch.optim.SGD(_params(), differentiable=True)  # valid in torch ...
    with pytest.raises(NotImplementedError, match="differentiable"):
        optlib.SGD(_params(), differentiable=True)  # ... not provided here


def test_import_optlib_needs_only_torch(monkeypatch):
    class Forbid:  # an import hook that refuses the experiment kit and its dependencies
        def find_spec(self, name, path=None, target=None):
            if name.startswith(("optlib.bench", "matplotlib", "sklearn")):
                raise ImportError(f"optlib imported {name}")

    kit = ("optlib", "matplotlib", "sklearn")
    for name in [n for n in sys.modules if n.partition(".")[0] in kit]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    monkeypatch.setattr(sys, "meta_path", [Forbid(), *sys.meta_path])
    fresh = importlib.import_module("optlib")
    assert fresh.__all__ == ["SGD"] and fresh is not optlib
