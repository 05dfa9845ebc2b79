"""Adagrad, RMSprop, Adam and AdamW beyond the comparison with torch (test_twins.py): each against
its equations written out by hand, the equivalences between them, and convergence. float64."""

import pytest
import torch

import optlib
from optim_helpers import SHAPES, TOL, make_params, max_diff, run
from optlib.bench.compare import fixed_gradients
from optlib.bench.functions import quadratic, rosenbrock, trajectory

GRADS = fixed_gradients(SHAPES, 60)  # some entries ~1e-8, so eps matters


def _start():
    return [p.detach().clone() for p in make_params()]


# ---------------------------------------------------------------- 2. the equations, by hand


@pytest.mark.parametrize("eps", [1e-10, 1e-3])
def test_adagrad_written_by_hand(eps):
    lr, lr_decay, s0 = 0.1, 0.05, 0.1
    theta = _start()
    s = [torch.full_like(t, s0) for t in theta]
    for t, step in enumerate(GRADS, start=1):
        lr_t = lr / (1 + (t - 1) * lr_decay)
        s = [si + g**2 for si, g in zip(s, step)]
        theta = [th - lr_t * g / (si.sqrt() + eps) for th, g, si in zip(theta, step, s)]
    params = make_params()
    opt = optlib.Adagrad(params, lr=lr, lr_decay=lr_decay, initial_accumulator_value=s0, eps=eps)
    run(opt, params, GRADS)
    assert max_diff(params, theta) < TOL
    assert max_diff([opt.state[p]["sum"] for p in params], s) < TOL


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_rmsprop_written_by_hand(centered, momentum):
    lr, alpha, eps = 0.01, 0.9, 1e-8
    theta = _start()
    v = [torch.zeros_like(t) for t in theta]
    m = [torch.zeros_like(t) for t in theta]
    b = [torch.zeros_like(t) for t in theta]
    for step in GRADS:
        v = [alpha * vi + (1 - alpha) * g**2 for vi, g in zip(v, step)]
        m = [alpha * mi + (1 - alpha) * g for mi, g in zip(m, step)]
        scale = [(vi - mi**2 if centered else vi).sqrt() + eps for vi, mi in zip(v, m)]
        b = [momentum * bi + g / d for bi, g, d in zip(b, step, scale)]
        theta = [th - lr * bi for th, bi in zip(theta, b)]
    params = make_params()
    run(optlib.RMSprop(params, lr=lr, alpha=alpha, eps=eps, momentum=momentum, centered=centered), params, GRADS)
    assert max_diff(params, theta) < TOL


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_written_by_hand_as_in_the_paper(amsgrad):
    # Kingma and Ba's Algorithm 1 (with Reddi et al.'s maximum for AMSGrad), in its own order.
    lr, beta1, beta2, eps = 0.01, 0.8, 0.99, 1e-8
    theta = _start()
    m = [torch.zeros_like(t) for t in theta]
    v = [torch.zeros_like(t) for t in theta]
    v_max = [torch.zeros_like(t) for t in theta]
    for t, step in enumerate(GRADS, start=1):
        m = [beta1 * mi + (1 - beta1) * g for mi, g in zip(m, step)]
        v = [beta2 * vi + (1 - beta2) * g**2 for vi, g in zip(v, step)]
        v_max = [torch.maximum(a, b) for a, b in zip(v_max, v)]
        m_hat = [mi / (1 - beta1**t) for mi in m]
        v_hat = [vi / (1 - beta2**t) for vi in (v_max if amsgrad else v)]
        theta = [th - lr * mh / (vh.sqrt() + eps) for th, mh, vh in zip(theta, m_hat, v_hat)]
    params = make_params()
    opt = optlib.Adam(params, lr=lr, betas=(beta1, beta2), eps=eps, amsgrad=amsgrad)
    run(opt, params, GRADS)
    assert max_diff(params, theta) < TOL
    assert max_diff([opt.state[p]["exp_avg"] for p in params], m) < TOL
    if amsgrad:
        assert max_diff([opt.state[p]["max_exp_avg_sq"] for p in params], v_max) < TOL


def test_adamw_is_a_shrink_then_an_adam_step():
    lr, wd = 0.01, 0.1
    params, reference = make_params(), make_params()
    adamw = optlib.AdamW(params, lr=lr, weight_decay=wd)
    adam = optlib.Adam(reference, lr=lr)
    for step in GRADS:
        with torch.no_grad():
            for p in reference:
                p.mul_(1 - lr * wd)  # the decoupled decay, by hand
        run(adamw, params, [step])
        run(adam, reference, [step])
    assert max_diff(params, reference) == 0


# ---------------------------------------------------------------- 2. equivalences


def test_adamw_without_weight_decay_is_adam():
    a, b = make_params(), make_params()
    run(optlib.AdamW(a, lr=0.01, weight_decay=0.0), a, GRADS)
    run(optlib.Adam(b, lr=0.01), b, GRADS)
    assert max_diff(a, b) == 0


def test_adam_with_decoupled_weight_decay_is_adamw():
    a, b = make_params(), make_params()
    run(optlib.Adam(a, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True), a, GRADS)
    run(optlib.AdamW(b, lr=0.01, weight_decay=0.1), b, GRADS)
    assert max_diff(a, b) == 0


def test_adam_with_l2_is_adam_on_the_penalized_gradient():
    wd, a, b = 0.1, make_params(), make_params()
    run(optlib.Adam(a, lr=0.01, weight_decay=wd), a, GRADS)
    opt = optlib.Adam(b, lr=0.01)
    for step in GRADS:
        for p, g in zip(b, step):
            p.grad = g + wd * p.detach()
        opt.step()
    assert max_diff(a, b) < TOL


def test_rmsprop_and_adam_share_the_second_moment():
    a, b = make_params(), make_params()
    rmsprop, adam = optlib.RMSprop(a, alpha=0.99), optlib.Adam(b, betas=(0.9, 0.99))
    run(rmsprop, a, GRADS)
    run(adam, b, GRADS)
    same = [torch.equal(rmsprop.state[p]["square_avg"], adam.state[q]["exp_avg_sq"]) for p, q in zip(a, b)]
    assert all(same)


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_adam_is_invariant_to_scaling_the_gradient_with_eps(scale):
    # Scaling g by c scales m by c and sqrt(v) by c: with eps scaled too, the step is unchanged.
    a, b = make_params(), make_params()
    run(optlib.Adam(a, lr=0.01, eps=1e-8), a, GRADS)
    run(optlib.Adam(b, lr=0.01, eps=1e-8 * scale), b, [[g * scale for g in step] for step in GRADS])
    assert max_diff(a, b) < 1e-12


def test_amsgrad_keeps_the_running_maximum_of_the_second_moment():
    params = make_params()
    opt = optlib.Adam(params, betas=(0.9, 0.9), amsgrad=True)
    running = [torch.zeros_like(p) for p in params]
    for step in GRADS:
        run(opt, params, [step])
        running = [torch.maximum(r, opt.state[p]["exp_avg_sq"]) for r, p in zip(running, params)]
        assert all(torch.equal(r, opt.state[p]["max_exp_avg_sq"]) for r, p in zip(running, params))


def test_adagrad_first_step_is_about_lr_in_every_coordinate():
    params = make_params()
    start = [p.detach().clone() for p in params]
    run(optlib.Adagrad(params, lr=0.1), params, [[torch.randn(s, dtype=torch.float64) for s in SHAPES]])
    steps = torch.cat([(p.detach() - s).abs().flatten() for p, s in zip(params, start)])
    assert torch.allclose(steps, torch.full_like(steps, 0.1), rtol=1e-8)  # γ |g| / (|g| + ε)


# ---------------------------------------------------------------- 3. behaviour


CONVERGES = [
    ("Adagrad", dict(lr=0.5)),
    ("RMSprop", dict(lr=0.01, alpha=0.9)),
    ("RMSprop", dict(lr=0.01, momentum=0.5, centered=True)),
    ("Adam", dict(lr=0.05)),
    ("Adam", dict(lr=0.05, amsgrad=True)),
    ("AdamW", dict(lr=0.05, weight_decay=0.0)),
]


@pytest.mark.parametrize("name, kwargs", CONVERGES, ids=str)
def test_converges_on_an_ill_conditioned_quadratic(name, kwargs):
    cls = getattr(optlib, name)
    path = trajectory(quadratic(100.0), lambda ps: cls(ps, **kwargs), 3000)
    assert path[-1].norm() < 1e-2


@pytest.mark.parametrize(
    "name, kwargs",
    [("Adagrad", dict(lr=1.0)), ("RMSprop", dict(lr=1e-3)), ("Adam", dict(lr=0.02)), ("AdamW", dict(lr=0.02, weight_decay=0.0))],
    ids=str,
)
def test_converges_on_rosenbrock(name, kwargs):
    cls = getattr(optlib, name)
    path = trajectory(rosenbrock, lambda ps: cls(ps, **kwargs), 10_000)  # a long, flat valley
    assert (path[-1] - torch.tensor([1.0, 1.0], dtype=torch.float64)).abs().max() < 1e-2


def test_adamw_shrinks_weights_toward_zero_without_gradient_signal():
    p = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = optlib.AdamW([p], lr=0.1, weight_decay=0.5)
    for _ in range(100):
        p.grad = torch.zeros_like(p)
        opt.step()
    assert torch.allclose(p.detach(), torch.full_like(p, (1 - 0.1 * 0.5) ** 100))
