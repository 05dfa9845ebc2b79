"""Muon beyond the generic comparison with torch (test_twins.py): the Newton-Schulz iteration against
the polynomial applied to singular values, the step written by hand, the learning-rate adjustments,
the dtypes, torch's rules on what it refuses and when, and convergence."""

import copy
import math

import pytest
import torch

import optlib
from optim_helpers import TOL, clone_params, make_params, max_diff, run, shapes_of
from optlib.bench.compare import fixed_gradients, run_side_by_side
from optlib.muon import NS_COEFFICIENTS, adjusted_lr, zeropower_via_newtonschulz

SHAPES = shapes_of("Muon")  # a tall, a wide and a square matrix
GRADS = fixed_gradients(SHAPES, 60)


def _polynomial_on_singular_values(G, coefficients, steps, eps):
    """What the iteration should compute, in float64 from an SVD: U p^k(Σ / ‖G‖_F) Vᵀ."""
    a, b, c = coefficients
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    S = S / max(G.double().norm().item(), eps)
    for _ in range(steps):
        S = a * S + b * S**3 + c * S**5
    return U @ torch.diag(S) @ Vh


# ---------------------------------------------------------------- the Newton-Schulz iteration


@pytest.mark.parametrize("shape", [(8, 5), (5, 8), (6, 6)])
@pytest.mark.parametrize("steps", [1, 3, 5])
def test_newton_schulz_is_the_polynomial_applied_to_the_singular_values(shape, steps):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    O = zeropower_via_newtonschulz(G, NS_COEFFICIENTS, steps, 1e-7)
    assert O.dtype == torch.bfloat16 and O.shape == G.shape
    expected = _polynomial_on_singular_values(G, NS_COEFFICIENTS, steps, 1e-7)
    assert (O.double() - expected).abs().max() < 0.05  # bfloat16 carries 8 bits


def test_newton_schulz_nearly_orthogonalizes():
    # Five steps bring every singular value of a well-conditioned matrix into Jordan et al.'s
    # band around 1, and the result points along U Vᵀ.
    G = torch.randn(64, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    O = zeropower_via_newtonschulz(G, NS_COEFFICIENTS, 5, 1e-7).double()
    sigma = torch.linalg.svdvals(O)
    assert 0.6 < sigma.min() and sigma.max() < 1.25
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    cosine = (O * (U @ Vh)).sum() / (O.norm() * (U @ Vh).norm())
    assert cosine > 0.98


def test_a_tall_matrix_is_orthogonalized_as_its_transpose():
    G = torch.randn(7, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    O, O_of_transpose = (zeropower_via_newtonschulz(M, NS_COEFFICIENTS, 5, 1e-7) for M in (G, G.T))
    assert torch.equal(O, O_of_transpose.T)


def test_newton_schulz_does_not_modify_its_input():
    for dtype in (torch.float64, torch.bfloat16):
        G = torch.randn(4, 6, dtype=dtype)
        before = G.clone()
        zeropower_via_newtonschulz(G, NS_COEFFICIENTS, 5, 1e-7)
        assert torch.equal(G, before)


def test_the_step_does_not_depend_on_the_scale_of_the_gradient():
    # The division by the norm removes any factor; a power of two is exact even in bfloat16,
    # so the iterates agree bit for bit (which is also why the sum form of the momentum in the
    # blog post, (1 - μ)⁻¹ times PyTorch's average, takes the same steps up to rounding).
    results = []
    for scale in (1.0, 8.0):
        params = make_params(shapes=SHAPES)
        opt = optlib.Muon(params, lr=0.02, weight_decay=0.1)
        run(opt, params, [[g * scale for g in step] for step in GRADS])
        results.append(params)
    assert all(torch.equal(p, q) for p, q in zip(*results))


# ---------------------------------------------------------------- the step, by hand


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
def test_muon_written_by_hand(nesterov, adjust_lr_fn):
    lr, wd, mu = 0.02, 0.1, 0.9
    theta = [p.detach().clone() for p in make_params(shapes=SHAPES)]
    M = [torch.zeros_like(t) for t in theta]
    for step in GRADS:
        M = [mu * m + (1 - mu) * g for m, g in zip(M, step)]  # torch's lerp, to rounding
        look = [mu * m + (1 - mu) * g for m, g in zip(M, step)] if nesterov else M
        for i, (t, m) in enumerate(zip(theta, look)):
            O = zeropower_via_newtonschulz(m, NS_COEFFICIENTS, 5, 1e-7).double()
            rows, cols = t.shape
            if adjust_lr_fn == "match_rms_adamw":
                step_size = lr * 0.2 * math.sqrt(max(rows, cols))
            else:
                step_size = lr * math.sqrt(max(1, rows / cols))
            theta[i] = (1 - lr * wd) * t - step_size * O
    params = make_params(shapes=SHAPES)
    opt = optlib.Muon(
        params, lr=lr, weight_decay=wd, momentum=mu, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn
    )
    run(opt, params, GRADS)
    # (M by hand differs from torch's lerp in the last bit, which could flip a bfloat16 rounding
    # in the iteration, 2⁻⁸ of a step; with these gradients none flips.)
    assert max_diff(params, theta) < TOL
    assert max_diff([opt.state[p]["momentum_buffer"] for p in params], M) < TOL


def test_adjusted_learning_rates():
    assert adjusted_lr(0.1, None, torch.Size([8, 2])) == 0.1 * 2.0  # sqrt(8 / 2)
    assert adjusted_lr(0.1, "original", torch.Size([8, 2])) == 0.1 * 2.0
    assert adjusted_lr(0.1, "original", torch.Size([2, 8])) == 0.1  # wide: max(1, 1/4) = 1
    assert adjusted_lr(0.1, "match_rms_adamw", torch.Size([2, 8])) == pytest.approx(0.1 * 0.2 * 8**0.5)


def test_match_rms_adamw_gives_steps_of_rms_about_0_2_lr():
    # Liu et al.: U Vᵀ of a (d_out, d_in) matrix has RMS 1/sqrt(max(d_out, d_in)), so the factor
    # 0.2 sqrt(max(d_out, d_in)) makes the step's RMS 0.2 lr, like a typical AdamW step.
    for shape in [(64, 16), (16, 64), (32, 32)]:
        p = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
        p.grad = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        optlib.Muon([p], lr=1.0, weight_decay=0.0, adjust_lr_fn="match_rms_adamw").step()
        rms = p.detach().pow(2).mean().sqrt().item()
        assert 0.15 < rms < 0.25


# ---------------------------------------------------------------- dtypes and torch's rules


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_as_torch_bit_for_bit_in_float32_and_bfloat16(dtype):
    result = run_side_by_side(
        lambda ps: optlib.Muon(ps, lr=0.02, momentum=0.9),
        lambda ps: torch.optim.Muon(ps, lr=0.02, momentum=0.9),
        shapes=SHAPES,
        dtype=dtype,
    )
    assert result.state_keys_match and result.state_types_match
    assert result.max_param_diff == 0 and result.max_state_diff == 0


def test_bfloat16_without_nesterov_keeps_the_momentum_average():
    # A deliberate difference from torch 2.13 and 2.14: they normalize a bfloat16 momentum buffer
    # in place when nesterov=False (its .bfloat16() is the buffer itself, then div_), so the
    # buffer loses the average. optlib's buffer is the average: (1 - μ) g after one step, as
    # torch's is from 2.15 on.
    g = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).bfloat16()
    buffers = []
    for cls in (optlib.Muon, torch.optim.Muon):
        p = torch.zeros(4, 3, dtype=torch.bfloat16, requires_grad=True)
        p.grad = g.clone()
        opt = cls([p], nesterov=False)
        opt.step()
        buffers.append(opt.state[p]["momentum_buffer"])
    ours, theirs = buffers
    assert torch.equal(ours, g.lerp(torch.zeros_like(g), 0.95))
    if torch.__version__ < "2.15":
        assert theirs.float().norm().item() == pytest.approx(1.0, abs=1e-2)  # normalized
    else:
        assert torch.equal(theirs, ours)


def test_complex_parameters_are_refused_at_the_step_like_torch():
    for cls in (optlib.Muon, torch.optim.Muon):
        p = torch.zeros(3, 2, dtype=torch.complex128, requires_grad=True)
        opt = cls([p])  # accepted here ...
        p.grad = torch.ones_like(p)
        with pytest.raises(RuntimeError, match="complex"):
            opt.step()  # ... refused here


@pytest.mark.parametrize("kwargs", [dict(ns_steps=100), dict(ns_coefficients=(3.4445, -4.775))])
def test_ns_steps_and_coefficients_are_checked_at_the_step_like_torch(kwargs):
    states = []
    for cls in (optlib.Muon, torch.optim.Muon):
        params = make_params(shapes=SHAPES)
        opt = cls(params, **kwargs)  # accepted here ...
        for p, g in zip(params, GRADS[0]):
            p.grad = g.clone()
        with pytest.raises(ValueError):
            opt.step()  # ... refused here, after the first buffer was updated, as in torch
        states.append([opt.state[p].get("momentum_buffer") for p in params])
    for a, b in zip(*states):
        assert (a is None and b is None) or torch.equal(a, b)


def test_a_vector_added_later_is_refused_at_the_step_like_torch():
    # torch checks the shapes in the constructor only; add_param_group lets a vector in, and the
    # step then refuses its gradient.
    for cls in (optlib.Muon, torch.optim.Muon):
        params = make_params(shapes=SHAPES)
        opt = cls(params)
        bias = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        opt.add_param_group(dict(params=[bias]))
        for p, g in zip(params, GRADS[0]):
            p.grad = g.clone()
        bias.grad = torch.ones(3, dtype=torch.float64)
        with pytest.raises(ValueError, match="2D"):
            opt.step()


def test_no_foreach_or_fused_and_the_readable_loop_only():
    with pytest.raises(TypeError):
        optlib.Muon(make_params(shapes=SHAPES), foreach=True)
    assert optlib.Muon.elementwise is False  # were a fast path added: never packed flat


# ---------------------------------------------------------------- behaviour


def test_converges_on_a_matrix_least_squares_problem():
    # f(W) = ½‖X W - Y‖² / n with a solution W*; the step has a fixed spectral size, so the
    # learning rate decays to reach the minimum.
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    W_star = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    Y = X @ W_star
    W = torch.zeros(8, 4, dtype=torch.float64, requires_grad=True)
    opt = optlib.Muon([W], lr=0.1, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.98)

    def loss():
        return 0.5 * (X @ W - Y).pow(2).sum() / len(X)

    start = loss().item()
    for _ in range(300):
        opt.zero_grad()
        loss().backward()
        opt.step()
        scheduler.step()
    assert loss().item() < 1e-4 * start
    assert (W.detach() - W_star).abs().max() < 1e-2


def test_a_checkpoint_moves_from_optlib_to_torch_in_bfloat16():
    # (float64 in both directions: test_twins.py)
    params = make_params(shapes=SHAPES, dtype=torch.bfloat16)
    grads = fixed_gradients(SHAPES, 20, dtype=torch.bfloat16)
    ours = optlib.Muon(params, lr=0.02)
    run(ours, params, grads[:10])
    resumed = clone_params(params)
    theirs = torch.optim.Muon(resumed)
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))  # not shared
    run(ours, params, grads[10:])
    run(theirs, resumed, grads[10:])
    assert all(torch.equal(p, q) for p, q in zip(params, resumed))
