"""optlib.Adafactor beyond what every optimizer is tested for in test_twins.py (against torch over a
grid, errors, checkpoints, schedulers ...): its state on tensors of every rank, the factored second
moment against the full one, the paper's form of the update, its invariances and bounds, and
convergence. float64."""

import math

import pytest
import torch

import optlib
from optim_helpers import TOL, make_params, max_diff, run
from optlib.bench.compare import fixed_gradients, run_side_by_side

# a batch of matrices, a scalar, a column, a 1 x 1 and a row matrix, a vector
SHAPES = ((2, 3, 5), (), (5, 1), (1, 1), (1, 5), (7,))


def _randn(shapes, steps, seed=1):
    """Gradients without tiny entries: eps1 then plays no part, as in the paper's analysis."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(steps)]


# ---------------------------------------------------------------- 1. against torch, every rank


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(lr=0.4, weight_decay=0.1, maximize=True), dict(eps=(1e-3, 2.0), d=1.5)],
    ids=["defaults", "decay-maximize", "eps-d"],
)
def test_matches_torch_on_tensors_of_every_rank(kwargs):
    result = run_side_by_side(
        lambda ps: optlib.Adafactor(ps, **kwargs),
        lambda ps: torch.optim.Adafactor(ps, **kwargs),
        steps=60,
        shapes=SHAPES,
    )
    assert result.agrees(TOL), result


def test_state_shapes_follow_torch():
    params = make_params(shapes=SHAPES)
    opt = optlib.Adafactor(params)
    run(opt, params, fixed_gradients(SHAPES, 1))
    shapes = {tuple(p.shape): {k: tuple(v.shape) for k, v in opt.state[p].items()} for p in params}
    assert shapes[(2, 3, 5)] == dict(step=(), row_var=(2, 3, 1), col_var=(2, 1, 5))
    assert shapes[(5, 1)] == dict(step=(), row_var=(5, 1), col_var=(1, 1))
    assert shapes[(1, 1)] == dict(step=(), row_var=(1, 1), col_var=(1, 1))
    assert shapes[()] == dict(step=(), variance=())
    assert shapes[(7,)] == dict(step=(), variance=(7,))


def test_complex_parameters_are_refused_like_torch():
    errors = []
    for cls in (optlib.Adafactor, torch.optim.Adafactor):
        param = torch.zeros(3, dtype=torch.complex128, requires_grad=True)
        param.grad = torch.ones_like(param)
        with pytest.raises(RuntimeError, match="complex") as error:
            cls([param]).step()
        errors.append(str(error.value))
    assert errors[0] == errors[1]


def test_eps1_none_is_the_machine_epsilon_of_each_parameter():
    # A deliberate difference: with eps1=None torch 2.13 takes the epsilon of the first
    # parameter's dtype for the whole group; optlib takes each parameter's own. A float64
    # vector with gradients of 1e-10 after a float32 one shows it: float32's eps (1.2e-7)
    # bounds sqrt(v̂) = 1e-10 from below, float64's (2.2e-16) does not.
    def second_after_one_step(cls, alone=False):
        first = torch.ones(3, dtype=torch.float32, requires_grad=True)
        second = torch.ones(3, dtype=torch.float64, requires_grad=True)
        first.grad, second.grad = torch.ones_like(first), torch.full_like(second, 1e-10)
        cls([second] if alone else [first, second]).step()
        return second.detach()

    ours, theirs = second_after_one_step(optlib.Adafactor), second_after_one_step(torch.optim.Adafactor)
    alone = second_after_one_step(torch.optim.Adafactor, alone=True)
    assert torch.equal(ours, alone)  # u_1 = sign(g_1): a step of γ RMS(θ) = 0.01
    assert max_diff([ours], [torch.full((3,), 0.99, dtype=torch.float64)]) < TOL
    assert (1 - theirs).max() < 1e-4  # u_1 = g_1 / eps(float32): a step 1e-3 times smaller


# ---------------------------------------------------------------- 2. internal equivalences


def test_factored_state_is_the_row_and_column_means_of_the_full_second_moment():
    # Averaging is linear: the running mean of each row of g² is the row mean of the running
    # average of g², which Adam would keep in full. v̂ is then that full matrix's rank-1
    # reconstruction V 1 1ᵀ V / (1ᵀ V 1), and the update divides by its root.
    shape, lr, beta2_decay = (6, 4), 0.01, -0.8
    params = make_params(shapes=(shape,))
    opt = optlib.Adafactor(params, lr=lr, beta2_decay=beta2_decay)
    theta, full = params[0].detach().clone(), torch.zeros(shape, dtype=torch.float64)
    for t, (g,) in enumerate(_randn((shape,), 50), start=1):
        params[0].grad = g
        opt.step()
        full.lerp_(g * g, t**beta2_decay)  # V_t = β̂ V_{t-1} + (1 - β̂) g_t², β̂ = 1 - t^ω
        state = opt.state[params[0]]
        assert max_diff([state["row_var"], state["col_var"]], [full.mean(1, True), full.mean(0, True)]) < TOL
        v_hat = full.sum(1, True) @ full.sum(0, True) / full.sum()  # the rank-1 reconstruction
        u = g / v_hat.sqrt()
        u = u / max(1.0, u.pow(2).mean().sqrt().item())  # clipped at d = 1
        rms = theta.pow(2).mean().sqrt().item()
        theta = theta - min(lr, 1 / math.sqrt(t)) * max(1e-3, rms) * u
        assert max_diff(params, [theta]) < TOL


def _paper_adafactor(X, gradients, rho_max=1e-2, eps2=1e-3, d=1.0, c=0.8):
    """Shazeer and Stern's Algorithm 4 (a matrix) written as printed, with sums R and C, for
    ε1 = 0: β̂_t = 1 - t^-c, ρ_t = min(ρ_max, 1/√t), α_t = max(ε2, RMS(X)) ρ_t."""
    rms = lambda x: x.pow(2).mean().sqrt()  # noqa: E731
    R = torch.zeros(X.shape[0], 1, dtype=X.dtype)
    C = torch.zeros(1, X.shape[1], dtype=X.dtype)
    for t, G in enumerate(gradients, start=1):
        beta = 1 - t**-c
        R = beta * R + (1 - beta) * (G * G).sum(1, keepdim=True)  # row sums
        C = beta * C + (1 - beta) * (G * G).sum(0, keepdim=True)  # column sums
        V = R @ C / R.sum()
        U = G / V.sqrt()
        U = U / torch.clamp(rms(U) / d, min=1)
        alpha = torch.clamp(rms(X), min=eps2) * min(rho_max, 1 / math.sqrt(t))
        X = X - alpha * U
    return X


@pytest.mark.parametrize("d", [1.0, 2.0])
def test_torchs_form_is_the_papers_algorithm_with_lr_as_the_largest_relative_step(d):
    # lr takes the place of the paper's constant 10^-2; means in place of sums change nothing.
    shape, steps = (5, 3), 60
    grads = [g for (g,) in _randn((shape,), steps)]
    params = make_params(shapes=(shape,))
    expected = _paper_adafactor(params[0].detach().clone(), grads, d=d)
    run(optlib.Adafactor(params, d=d), params, [[g] for g in grads])
    assert max_diff(params, [expected]) < TOL


def test_first_step_is_the_sign_of_the_gradient_times_the_relative_step():
    # β̂_1 = 1 - 1^ω = 0, so v_1 = g_1² with no bias correction: u_1 = sign(g_1), RMS 1.
    params = make_params(shapes=((7,),))
    before = params[0].detach().clone()
    grads = fixed_gradients(((7,),), 1)  # some entries tiny: only their sign counts
    run(optlib.Adafactor(params, lr=0.05), params, grads)
    rms = before.pow(2).mean().sqrt()
    assert max_diff(params, [before - 0.05 * rms * grads[0][0].sign()]) < TOL


def test_beta2_decay_zero_keeps_no_memory():
    # ω = 0: β̂_t = 0 at every step, v̂_t = g_t², and every step is the sign of g_t.
    params = make_params(shapes=((4,),))
    opt = optlib.Adafactor(params, beta2_decay=0.0)
    for (g,) in fixed_gradients(((4,),), 5):
        params[0].grad = g
        opt.step()
        assert torch.equal(opt.state[params[0]]["variance"], g * g)


def test_the_step_scales_with_the_parameter_not_with_the_gradient():
    # θ → cθ with g → kg: u_t is unchanged (the scale of g cancels against sqrt(v̂)) and the
    # step size is proportional to RMS(θ), so the whole run is c times the original.
    shapes, c, k = ((4, 3), (3,)), 100.0, 1e-3
    grads = _randn(shapes, 60)
    a, b = make_params(shapes=shapes), make_params(shapes=shapes)
    with torch.no_grad():
        for p in b:
            p.mul_(c)
    run(optlib.Adafactor(a, lr=0.05), a, grads)
    run(optlib.Adafactor(b, lr=0.05), b, [[k * g for g in step] for step in grads])
    assert max_diff([p / c for p in b], a) < TOL


def test_every_step_is_at_most_d_times_the_relative_step_size():
    # RMS(û_t) = min(RMS(u_t), d), so RMS(θ_t - θ_{t-1}) <= γ_t max(ε2, RMS(θ_{t-1})) d, with
    # equality on the steps that are clipped.
    shapes, lr, d = ((6, 4), (5,)), 0.3, 1.0
    params = make_params(shapes=shapes)
    opt = optlib.Adafactor(params, lr=lr, d=d)
    clipped = 0
    for t, step in enumerate(fixed_gradients(shapes, 60), start=1):
        before = [p.detach().clone() for p in params]
        run(opt, params, [step])
        for p, p0 in zip(params, before):
            bound = min(lr, 1 / math.sqrt(t)) * max(1e-3, p0.pow(2).mean().sqrt().item()) * d
            size = (p.detach() - p0).pow(2).mean().sqrt().item()
            assert size <= bound * (1 + 1e-12)
            clipped += size > bound * (1 - 1e-12)
    assert clipped > 10


def test_weight_decay_is_decoupled_and_uses_lr_not_the_relative_step():
    # With zero gradients v̂ = 0 and u = 0 (v̂ is bounded below by ε1²): only the decay acts,
    # by (1 - γλ) per step, also once γ_t = 1/√t has fallen below γ.
    params = make_params(shapes=((4, 3), (3,)))
    start = [p.detach().clone() for p in params]
    zeros = [[torch.zeros_like(p) for p in params]] * 10
    run(optlib.Adafactor(params, lr=0.5, weight_decay=0.1), params, zeros)
    assert max_diff(params, [0.95**10 * p for p in start]) < TOL


def test_maximize_is_negating_the_gradient():
    shapes = ((4, 3), (3,))
    grads = fixed_gradients(shapes, 60)
    a, b = make_params(shapes=shapes), make_params(shapes=shapes)
    run(optlib.Adafactor(a, lr=0.1, weight_decay=0.1, maximize=True), a, grads)
    run(optlib.Adafactor(b, lr=0.1, weight_decay=0.1), b, [[-g for g in step] for step in grads])
    assert max_diff(a, b) == 0


# ---------------------------------------------------------------- 3. behaviour


def test_converges_on_a_quadratic():
    # The step is relative to RMS(θ) until RMS(θ) < ε2 = 1e-3, then ε2 γ_t: it reaches 0.
    scales = torch.tensor([1.0, 10.0], dtype=torch.float64)  # condition number 10
    x = torch.tensor([3.0, -2.0], dtype=torch.float64, requires_grad=True)
    opt = optlib.Adafactor([x], lr=0.1)
    for _ in range(3000):
        x.grad = scales * x.detach()
        opt.step()
    assert x.detach().abs().max() < 1e-6


def test_converges_on_rosenbrock():
    # No momentum and steps of γ_t RMS(θ): slow along the valley, but it gets there.
    x = torch.tensor([-1.5, 2.0], dtype=torch.float64, requires_grad=True)
    opt = optlib.Adafactor([x], lr=0.1)
    for _ in range(5000):  # gradient of (1 - a)^2 + 100 (b - a^2)^2, by hand
        a, b = x.detach()
        x.grad = torch.stack([-2 * (1 - a) - 400 * a * (b - a**2), 200 * (b - a**2)])
        opt.step()
    a, b = x.detach()
    assert (1 - a) ** 2 + 100 * (b - a**2) ** 2 < 0.05  # from 12.5
    assert (x.detach() - 1).abs().max() < 0.1


def test_fits_a_matrix_least_squares_problem():
    # A matrix parameter, so the factored second moment is what drives the steps.
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(20, 8, generator=gen, dtype=torch.float64)
    B = A @ torch.randn(8, 4, generator=gen, dtype=torch.float64)
    X = torch.randn(8, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    opt = optlib.Adafactor([X], lr=0.1)
    losses = []
    for _ in range(1000):
        opt.zero_grad()
        loss = 0.5 * (A @ X - B).pow(2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 1000
