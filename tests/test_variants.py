"""Adadelta, Adamax, NAdam, RAdam, Rprop and ASGD beyond the comparison with torch (test_twins.py):
each against its equations written out by hand or against an optimizer it reduces to, and
convergence. float64."""

import contextlib

import pytest
import torch

import optlib
from optim_helpers import SHAPES, TOL, make_params, max_diff, run
from optlib.bench.compare import fixed_gradients
from optlib.bench.functions import quadratic, rosenbrock, trajectory
from optlib.nadam import momentum_schedule
from optlib.radam import rectification

GRADS = fixed_gradients(SHAPES, 60)  # some entries ~1e-8, so eps matters


def _start():
    return [p.detach().clone() for p in make_params()]


@contextlib.contextmanager
def _default_dtype(dtype):
    # NAdam's and ASGD's 0-dim state (like torch's step counters) takes the default dtype.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _stepped(cls, grads=GRADS, **kwargs):
    params = make_params()
    opt = cls(params, **kwargs)
    run(opt, params, grads)
    return params, opt


# ---------------------------------------------------------------- 2. the equations, by hand


def test_adadelta_written_by_hand_as_in_the_paper():
    # Zeiler's Algorithm 1: E[g²], Δx = -RMS[Δx]_{t-1} / RMS[g]_t g, E[Δx²], x += Δx.
    rho, eps = 0.95, 1e-6
    theta = _start()
    eg2 = [torch.zeros_like(t) for t in theta]
    edx2 = [torch.zeros_like(t) for t in theta]
    for step in GRADS:
        eg2 = [rho * e + (1 - rho) * g**2 for e, g in zip(eg2, step)]
        dx = [-(d + eps).sqrt() / (e + eps).sqrt() * g for d, e, g in zip(edx2, eg2, step)]
        edx2 = [rho * d + (1 - rho) * x**2 for d, x in zip(edx2, dx)]
        theta = [th + x for th, x in zip(theta, dx)]
    params, _ = _stepped(optlib.Adadelta, rho=rho, eps=eps)  # lr = 1: the paper's update
    assert max_diff(params, theta) < TOL


def test_adadelta_steps_do_not_depend_on_the_scale_of_the_loss():
    # Δθ has the units of θ: multiplying the loss (the gradients) by 1000 leaves the steps as
    # they are, up to ε, which is small next to these squared gradients.
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in range(30)]
    big = [[1000 * g for g in step] for step in grads]
    a, _ = _stepped(optlib.Adadelta, grads)
    b, _ = _stepped(optlib.Adadelta, big)
    moved = max_diff(a, _start())
    assert moved > 1e-3 and max_diff(a, b) < 1e-3 * moved


def test_adamax_with_no_memory_is_sign_descent():
    # β1 = β2 = 0, ε = 0: u_t = |g_t|, so each step is -γ sign(g_t).
    lr = 0.01
    theta = _start()
    for step in GRADS:
        theta = [th - lr * g.sign() for th, g in zip(theta, step)]
    params, _ = _stepped(optlib.Adamax, lr=lr, betas=(0.0, 0.0), eps=0.0)
    assert max_diff(params, theta) < TOL


def test_adamax_is_adam_as_the_norm_goes_to_infinity():
    # Kingma and Ba, Section 7.1: u_t = lim_{p→∞} (v_t)^(1/p) with v_t = β2^p v_{t-1} + (1-β2^p)|g_t|^p.
    # Large p, in float64 on a short positive sequence: the p-norm average approaches the max.
    beta2, g = 0.9, torch.tensor([0.5, 2.0, 1.0, 0.1], dtype=torch.float64)
    p = 400.0
    terms = torch.stack([(beta2 ** (len(g) - 1 - i)) * g[i] for i in range(len(g))])
    u_limit = terms.max()
    u_p = ((1 - beta2**p) * (terms**p).sum()) ** (1 / p)
    param = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = optlib.Adamax([param], betas=(0.9, beta2), eps=0.0)
    for gi in g:
        param.grad = gi.reshape(1)
        opt.step()
    assert torch.allclose(opt.state[param]["exp_inf"], u_limit.reshape(1), atol=0, rtol=1e-15)
    assert abs(u_p - u_limit) / u_limit < 1e-2


def test_nadam_without_momentum_is_adam_without_momentum():
    # β1 = 0: μ_t = 0, the look-ahead term vanishes and NAdam is Adam with β1 = 0.
    kwargs = dict(lr=0.01, betas=(0.0, 0.99), eps=1e-8, weight_decay=0.1)
    a, _ = _stepped(optlib.NAdam, **kwargs)
    b, _ = _stepped(optlib.Adam, **kwargs)
    assert max_diff(a, b) < TOL


def test_nadam_written_by_hand():
    lr, beta1, beta2, eps, psi = 0.01, 0.9, 0.99, 1e-8, 0.004
    theta = _start()
    m = [torch.zeros_like(t) for t in theta]
    v = [torch.zeros_like(t) for t in theta]
    product = 1.0
    for t, step in enumerate(GRADS, start=1):
        mu, mu_next = (beta1 * (1 - 0.5 * 0.96 ** (i * psi)) for i in (t, t + 1))
        product *= mu
        m = [beta1 * mi + (1 - beta1) * g for mi, g in zip(m, step)]
        v = [beta2 * vi + (1 - beta2) * g**2 for vi, g in zip(v, step)]
        m_hat = [
            mu_next * mi / (1 - product * mu_next) + (1 - mu) * g / (1 - product)
            for mi, g in zip(m, step)
        ]
        theta = [
            th - lr * mh / ((vi / (1 - beta2**t)).sqrt() + eps)
            for th, mh, vi in zip(theta, m_hat, v)
        ]
    with _default_dtype(torch.float64):  # mu_product in float64, as the product above
        params, opt = _stepped(optlib.NAdam, lr=lr, betas=(beta1, beta2), eps=eps, momentum_decay=psi)
    assert max_diff(params, theta) < TOL
    assert opt.state[params[0]]["mu_product"].item() == pytest.approx(product, rel=1e-14)


def test_nadam_momentum_schedule_warms_up_from_half_of_beta1():
    mus = [momentum_schedule(t, 0.9, 0.004) for t in (0, 1, 250, 10**6)]
    assert mus[0] == pytest.approx(0.45) and mus == sorted(mus) and mus[-1] == pytest.approx(0.9, abs=1e-6)


def test_radam_starts_as_momentum_sgd_and_then_rectifies():
    # β1 = 0: the first steps (ρ_t ≤ 5) are plain SGD steps -γ g_t, the later ones Adam-like.
    lr, beta2 = 0.01, 0.999
    unrectified = [t for t in range(1, 60) if rectification(t, beta2) is None]
    assert unrectified == [1, 2, 3, 4, 5]
    a, _ = _stepped(optlib.RAdam, GRADS[:5], lr=lr, betas=(0.0, beta2))
    b, _ = _stepped(optlib.SGD, GRADS[:5], lr=lr)
    assert max_diff(a, b) < TOL
    # the rectification term grows towards 1
    terms = [rectification(t, beta2) for t in (6, 100, 10_000, 10**6)]
    assert terms == sorted(terms) and 0 < terms[0] < 0.1 and terms[-1] == pytest.approx(1, abs=1e-3)


def test_radam_written_by_hand_as_in_the_paper():
    lr, beta1, beta2, eps = 0.01, 0.9, 0.9, 1e-8
    rho_inf = 2 / (1 - beta2) - 1
    theta = _start()
    m = [torch.zeros_like(t) for t in theta]
    v = [torch.zeros_like(t) for t in theta]
    for t, step in enumerate(GRADS, start=1):
        m = [beta1 * mi + (1 - beta1) * g for mi, g in zip(m, step)]
        v = [beta2 * vi + (1 - beta2) * g**2 for vi, g in zip(v, step)]
        m_hat = [mi / (1 - beta1**t) for mi in m]
        rho = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
        if rho > 5:
            r = ((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho)) ** 0.5
            theta = [
                th - lr * r * mh * (1 - beta2**t) ** 0.5 / (vi.sqrt() + eps)
                for th, mh, vi in zip(theta, m_hat, v)
            ]
        else:
            theta = [th - lr * mh for th, mh in zip(theta, m_hat)]
    params, _ = _stepped(optlib.RAdam, lr=lr, betas=(beta1, beta2), eps=eps)
    assert max_diff(params, theta) < TOL


def test_rprop_step_sizes_grow_while_the_sign_holds_and_shrink_when_it_flips():
    param = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = optlib.Rprop([param], lr=0.1, etas=(0.5, 1.2), step_sizes=(1e-6, 1.0))
    for g in [[1.0, 1.0]] * 4 + [[1.0, -1.0]]:
        param.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    sizes = opt.state[param]["step_size"]
    # first weight: 0.1 × 1.2⁴; second: 0.1 × 1.2³ × 0.5, and it did not move on the flip
    assert torch.allclose(sizes, torch.tensor([0.1 * 1.2**4, 0.1 * 1.2**3 * 0.5], dtype=torch.float64))
    moved = -(0.1 * (1 + 1.2 + 1.2**2 + 1.2**3))
    assert param[1].item() == pytest.approx(moved) and opt.state[param]["prev"][1] == 0
    for _ in range(40):  # the bound Γ_max
        param.grad = torch.ones(2, dtype=torch.float64)
        opt.step()
    assert opt.state[param]["step_size"].max().item() == 1.0


def test_rprop_ignores_the_size_of_the_gradient():
    grads = fixed_gradients(SHAPES, 30, seed=2)
    scaled = [[g * torch.rand(g.shape, dtype=g.dtype) * 100 for g in step] for step in grads]
    a, _ = _stepped(optlib.Rprop, grads)
    b, _ = _stepped(optlib.Rprop, scaled)
    assert max_diff(a, b) == 0


def test_asgd_without_decay_is_sgd():
    # λ_a = 0, α = 0: η_t = γ, and the weights are not shrunk; the iterates are SGD's. (η is
    # kept in the default dtype, float32: γ = 2^-7 is exact there.)
    a, _ = _stepped(optlib.ASGD, lr=2**-7, lambd=0.0, alpha=0.0, weight_decay=0.01)
    b, _ = _stepped(optlib.SGD, lr=2**-7, weight_decay=0.01)
    assert max_diff(a, b) == 0


def test_asgd_average_is_the_mean_of_the_iterates_after_t0():
    t0 = 10
    params = make_params()
    with _default_dtype(torch.float64):  # μ = 1/k in float64, as the mean below
        opt = optlib.ASGD(params, lr=0.01, t0=float(t0))
        iterates = []
        for step in GRADS:
            run(opt, params, [step])
            iterates.append([p.detach().clone() for p in params])
    mean = [torch.stack([it[i] for it in iterates[t0 + 1 :]]).mean(0) for i in range(len(params))]
    assert max_diff([opt.state[p]["ax"] for p in params], mean) < TOL  # θ_{t0+2} ... θ_60
    eta = opt.state[params[0]]["eta"].item()
    assert eta == pytest.approx(0.01 / (1 + 1e-4 * 0.01 * 60) ** 0.75, rel=1e-6)


# ---------------------------------------------------------------- 3. behaviour

CONVERGES = [
    ("Adamax", dict(lr=0.05)),
    ("NAdam", dict(lr=0.05)),
    ("RAdam", dict(lr=0.05)),
    ("Rprop", dict(lr=0.01)),
    ("ASGD", dict(lr=0.005)),
]


@pytest.mark.parametrize("name, kwargs", CONVERGES, ids=str)
def test_converges_on_an_ill_conditioned_quadratic(name, kwargs):
    cls = getattr(optlib, name)
    path = trajectory(quadratic(100.0), lambda ps: cls(ps, **kwargs), 3000)
    assert path[-1].norm() < 1e-2


def test_radam_first_steps_diverge_on_rosenbrock_with_a_rate_fit_for_adam():
    # ρ_t ≤ 5 for t ≤ 5: five SGD steps of size γ g_t, from |g| = 163 (the RAdam chapter shows it)
    path = trajectory(rosenbrock, lambda ps: optlib.RAdam(ps, lr=0.02), 5)
    assert path[-1].abs().max() > 1e20


def test_adadelta_approaches_the_minimum_of_a_quadratic_but_does_not_settle():
    # Its step RMS[Δθ]_{t-1} / RMS[g]_t follows its own past steps instead of shrinking: across
    # the steep direction of this quadratic it keeps oscillating, a few hundredths wide.
    path = trajectory(quadratic(100.0), lambda ps: optlib.Adadelta(ps, lr=1.0), 3000)
    assert path[-1][0].abs() < 1e-6 and 1e-3 < path[-1][1].abs() < 0.1


@pytest.mark.parametrize(
    "name, kwargs",
    # RAdam's first five steps are SGD steps of size γ g_t, and |g| = 163 at the start: it needs
    # a learning rate that is safe for SGD (0.02 diverges).
    [("Adamax", dict(lr=0.02)), ("NAdam", dict(lr=0.02)), ("RAdam", dict(lr=0.002)), ("Rprop", dict(lr=0.01))],
    ids=str,
)
def test_converges_on_rosenbrock(name, kwargs):
    cls = getattr(optlib, name)
    path = trajectory(rosenbrock, lambda ps: cls(ps, **kwargs), 10_000)  # a long, flat valley
    assert (path[-1] - torch.tensor([1.0, 1.0], dtype=torch.float64)).abs().max() < 1e-2
