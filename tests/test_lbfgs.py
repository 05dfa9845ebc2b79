"""optlib.LBFGS against torch.optim.LBFGS, in float64.

L-BFGS steps with a closure that it calls itself (a line search calls it several times per
iteration), so it does not fit the generic tests of test_twins.py, which set gradients and step
without one. Here: (1) both optimizers run side by side on three problems (a quadratic,
Rosenbrock in 20 dimensions, softmax regression), over a grid covering every argument, with and
without the line search, for at least 50 closure calls each: parameters, the whole state and the
number of closure calls agree; the line search alone agrees with torch's on lines chosen to reach
its branches; (2) the two-loop recursion is the explicit BFGS inverse Hessian, the cubic step is a
cubic's minimizer, an accepted line-search step satisfies the strong Wolfe conditions;
(3) convergence, checkpoints in both directions, errors like torch's.
"""

import copy
import inspect

import pytest
import torch
from torch.optim.lbfgs import _strong_wolfe as torch_strong_wolfe

import optlib
from optim_helpers import TOL, grid
from optlib.lbfgs import cubic_minimizer, strong_wolfe, two_loop_recursion

SHAPES = ((4, 3), (5,), (3,))  # 20 numbers in three tensors: L-BFGS sees one flat vector
CALLS = 50  # closure calls per run, at least


def _flat(params):
    return torch.cat([p.reshape(-1) for p in params])


def _quadratic():
    """½ xᵀAx - bᵀx with condition number 100, on the 20 numbers of SHAPES."""
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.logspace(0, 2, 20, dtype=torch.float64)) @ q.T
    b = torch.randn(20, generator=gen, dtype=torch.float64)

    def loss(params):
        x = _flat(params)
        return 0.5 * x @ a @ x - b @ x

    return loss


def _rosenbrock(params):
    """The chained Rosenbrock function in 20 dimensions, minimum 0 at (1, ..., 1)."""
    x = _flat(params)
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def _logistic():
    """Softmax regression, 4 features and 3 classes: the weight (4, 3) and the bias (3,) of SHAPES
    (the (5,) tensor gets a small L2 penalty only, so it still has a gradient)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(60, 4, generator=gen, dtype=torch.float64)
    labels = (x @ torch.randn(4, 3, generator=gen, dtype=torch.float64)).argmax(1)

    def loss(params):
        weight, extra, bias = params
        logits = x @ weight + bias
        return torch.nn.functional.cross_entropy(logits, labels) + 1e-2 * (extra**2).sum()

    return loss


PROBLEMS = {"quadratic": _quadratic(), "rosenbrock": _rosenbrock, "logistic": _logistic()}


def _start(seed=0, shapes=SHAPES, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


class Run:
    """One optimizer on one problem, with a closure that counts its calls."""

    def __init__(self, cls, problem, kwargs, params=None):
        self.params = _start() if params is None else params
        self.loss = PROBLEMS[problem] if isinstance(problem, str) else problem
        self.opt = cls(self.params, **copy.deepcopy(kwargs))
        self.calls = 0

    def closure(self):
        self.calls += 1
        self.opt.zero_grad()
        loss = self.loss(self.params)
        loss.backward()
        return loss

    def step(self):
        return self.opt.step(self.closure)

    @property
    def state(self):
        return self.opt.state[self.params[0]]


def _difference(a, b):
    """Largest |a - b| between two state values of any kind; inf if they differ in kind, type,
    dtype, device or length. Lists (the history) are compared entry by entry."""
    if type(a) is not type(b):
        return float("inf")
    if isinstance(a, list):
        if len(a) != len(b):
            return float("inf")
        return max([_difference(x, y) for x, y in zip(a, b)], default=0.0)
    if isinstance(a, torch.Tensor):
        if (a.dtype, a.device, a.shape) != (b.dtype, b.device, b.shape):
            return float("inf")
        return 0.0 if a.numel() == 0 else (a - b).abs().max().item()
    if a is None:
        return 0.0
    return abs(a - b)


def _state_difference(ours, theirs):
    assert ours.keys() == theirs.keys()
    return max([_difference(ours[k], theirs[k]) for k in ours], default=0.0)


def _side_by_side(problem, kwargs, calls=CALLS):
    """Step both until each has called its closure at least ``calls`` times; compare after every
    call of step. Returns (closure calls, largest difference in parameters and state)."""
    ours, theirs = Run(optlib.LBFGS, problem, kwargs), Run(torch.optim.LBFGS, problem, kwargs)
    worst = 0.0
    while ours.calls < calls:
        loss_ours, loss_theirs = ours.step(), theirs.step()
        assert ours.calls == theirs.calls  # the same number of evaluations, step by step
        assert loss_ours.item() == loss_theirs.item()
        worst = max(worst, *(_difference(p, q) for p, q in zip(ours.params, theirs.params)))
        worst = max(worst, _state_difference(ours.state, theirs.state))
    assert ours.state["func_evals"] == theirs.state["func_evals"] == ours.calls
    assert ours.state["n_iter"] == theirs.state["n_iter"]
    return ours.calls, worst


# ---------------------------------------------------------------- 1. against torch.optim.LBFGS

# Each argument away from its default, alone, then a grid of the ones that interact most.
ONE_AT_A_TIME = [
    dict(),
    dict(lr=0.5),
    dict(lr=torch.tensor(0.8, dtype=torch.float64)),
    dict(max_iter=1),
    dict(max_eval=3),
    dict(max_eval=40),
    dict(tolerance_grad=1e-3),
    dict(tolerance_change=1e-3),
    dict(history_size=1),
]
COMBINED = grid(lr=[1, 0.3], max_iter=[20, 3], history_size=[100, 2])


def _label(kwargs):
    return "-".join(f"{k}={v.item() if torch.is_tensor(v) else v}" for k, v in kwargs.items())


CASES = [
    pytest.param(problem, dict(kwargs, line_search_fn=ls), id=f"{problem}-{ls}-{_label(kwargs)}")
    for problems, settings in [(PROBLEMS, ONE_AT_A_TIME), (["rosenbrock"], COMBINED)]
    for problem in problems
    for ls in [None, "strong_wolfe"]
    for kwargs in settings
]


@pytest.mark.parametrize("problem, kwargs", CASES)
def test_matches_torch_over_the_grid(problem, kwargs):
    calls, worst = _side_by_side(problem, kwargs)
    assert calls >= CALLS
    assert worst < TOL


def test_matches_torch_with_complex_sparse_and_missing_gradients():
    # torch's L-BFGS treats a complex number as two reals, densifies a sparse gradient and reads
    # a missing gradient as zeros; optlib does the same.
    def loss(params):
        z, emb, unused = params
        rows = torch.nn.functional.embedding(torch.tensor([0, 2, 2]), emb, sparse=True)
        return (z.abs() ** 2 - z.real).sum() + (rows - 1).pow(2).sum() + 0.5 * (rows**4).sum()

    worst = 0.0
    runs = []
    for cls in (optlib.LBFGS, torch.optim.LBFGS):
        gen = torch.Generator().manual_seed(3)
        params = [
            torch.randn(3, generator=gen, dtype=torch.complex128).requires_grad_(),
            torch.randn(4, 2, generator=gen, dtype=torch.float64).requires_grad_(),
            torch.randn(2, generator=gen, dtype=torch.float64).requires_grad_(),
        ]
        run = Run(cls, loss, dict(line_search_fn="strong_wolfe", history_size=3), params)
        for _ in range(3):
            run.step()
        runs.append(run)
    assert runs[0].calls == runs[1].calls
    worst = max(_difference(p, q) for p, q in zip(runs[0].params, runs[1].params))
    assert worst < TOL and _state_difference(runs[0].state, runs[1].state) < TOL
    assert runs[0].params[1].grad.is_sparse  # the gradient was sparse, and was used


# torch.optim.LBFGS takes `maximize` from torch 2.15 on; optlib.LBFGS takes it on every torch.
TORCH_HAS_MAXIMIZE = "maximize" in inspect.signature(torch.optim.LBFGS).parameters


def test_same_signature_defaults_and_group_keys():
    def described(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls).parameters.values()]

    ours, theirs = optlib.LBFGS(_start()), torch.optim.LBFGS(_start())
    ours_defaults, ours_keys = dict(ours.defaults), list(ours.param_groups[0])
    maximize = ("maximize", inspect.Parameter.KEYWORD_ONLY, False)
    if TORCH_HAS_MAXIMIZE:
        assert described(optlib.LBFGS) == described(torch.optim.LBFGS)
    else:  # the same, with maximize last
        assert described(optlib.LBFGS) == described(torch.optim.LBFGS) + [maximize]
        assert ours_defaults.pop("maximize") is False
        ours_keys.remove("maximize")
    assert ours_defaults == theirs.defaults and ours.defaults["max_eval"] == 25  # 20 * 5 // 4
    assert ours_keys == list(theirs.param_groups[0])


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize("problem", ["quadratic", "logistic"])
def test_maximizing_the_negated_loss_is_minimizing_the_loss(problem, line_search_fn):
    # On every torch, and bit for bit: the negation is exact, and maximize only negates.
    def negated(params):
        return -PROBLEMS[problem](params)

    maximizing = Run(optlib.LBFGS, negated, dict(line_search_fn=line_search_fn, maximize=True))
    minimizing = Run(optlib.LBFGS, problem, dict(line_search_fn=line_search_fn))
    while minimizing.calls < CALLS:
        assert maximizing.step().item() == -minimizing.step().item()
        assert maximizing.calls == minimizing.calls
        assert all(torch.equal(p, q) for p, q in zip(maximizing.params, minimizing.params))
    assert _state_difference(maximizing.state, minimizing.state) == 0


@pytest.mark.skipif(not TORCH_HAS_MAXIMIZE, reason="torch.optim.LBFGS has maximize from 2.15")
@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_maximize_matches_torch(line_search_fn):
    calls, worst = _side_by_side(
        lambda params: -_rosenbrock(params), dict(line_search_fn=line_search_fn, maximize=True)
    )
    assert calls >= CALLS and worst < TOL


# ---------------------------------------------------------------- 2. internal equivalences


def _pairs(dim=6, count=4, seed=0):
    """Pairs (s_i, y_i = A s_i) of a positive definite A, so that every yᵀs > 0."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    a = m @ m.T + torch.eye(dim, dtype=torch.float64)
    s = [torch.randn(dim, generator=gen, dtype=torch.float64) for _ in range(count)]
    y = [a @ si for si in s]
    g = torch.randn(dim, generator=gen, dtype=torch.float64)
    return s, y, g, a


def test_two_loop_recursion_is_the_bfgs_inverse_hessian():
    s, y, g, _ = _pairs()
    rho = [1.0 / yi.dot(si) for si, yi in zip(s, y)]
    scale = s[-1].dot(y[-1]) / y[-1].dot(y[-1])
    h = scale * torch.eye(len(g), dtype=torch.float64)  # H^0 = ω I
    for si, yi, r in zip(s, y, rho):  # H ← (I - ρ s yᵀ) H (I - ρ y sᵀ) + ρ s sᵀ, oldest first
        v = torch.eye(len(g), dtype=torch.float64) - r * torch.outer(yi, si)
        h = v.T @ h @ v + r * torch.outer(si, si)
    direction, alphas = two_loop_recursion(g, s, y, rho, scale)
    assert (direction - (-h @ g)).abs().max() < TOL
    assert len(alphas) == len(s)
    # H satisfies the secant equation of the newest pair, H y = s, and is positive definite.
    assert (h @ y[-1] - s[-1]).abs().max() < 1e-10
    assert torch.linalg.eigvalsh((h + h.T) / 2).min() > 0


def test_two_loop_recursion_leaves_the_gradient_alone():
    s, y, g, _ = _pairs()
    before = g.clone()
    two_loop_recursion(g, s, y, [1.0 / yi.dot(si) for si, yi in zip(s, y)], 1.0)
    assert torch.equal(g, before)


def test_cubic_minimizer_finds_the_minimum_of_a_cubic():
    def c(x):  # a cubic with a local minimum at x = 2: c'(x) = 3(x - 2)(x + 1)
        return x**3 - 1.5 * x**2 - 6 * x

    def dc(x):
        return 3 * x**2 - 3 * x - 6

    for x1, x2 in [(0.0, 3.0), (3.0, 0.5), (1.0, 2.5)]:
        x1, x2 = torch.tensor(x1, dtype=torch.float64), torch.tensor(x2, dtype=torch.float64)
        assert abs(cubic_minimizer(x1, c(x1), dc(x1), x2, c(x2), dc(x2)) - 2.0) < TOL
    # Clipped to the bounds, and the middle of them when the cubic has no minimizer.
    x1, x2 = torch.tensor(0.0, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)
    assert cubic_minimizer(x1, c(x1), dc(x1), x2, c(x2), dc(x2), bounds=(0.0, 1.5)) == 1.5
    one = torch.tensor(1.0, dtype=torch.float64)
    assert cubic_minimizer(0.0, 0.0, one, 1.0, 0.9, one) == 0.5  # this cubic only increases


# Line functions for the line search alone: smooth, non-convex, nearly linear, with a wall.
LINES = {
    "rosenbrock": _rosenbrock,
    "wavy": lambda x: torch.sin(3 * x).sum() + 0.1 * (x**2).sum(),
    "quartic": lambda x: ((x - 2) ** 4).sum() - x.sum(),
    "logcosh": lambda x: torch.log(torch.cosh(3 * x)).sum() + 0.5 * x.sum(),
    "softplus": lambda x: torch.nn.functional.softplus(x).sum() + 0.01 * (x**4).sum(),
    "wall": lambda x: -x.sum() + torch.exp(8 * (x.sum() - 2)),
}


def _loss_and_grad(function, point):
    point = point.clone().requires_grad_()
    with torch.enable_grad():
        loss = function(point)
        loss.backward()
    return loss.item(), point.grad


def _same(a, b):
    """Equal, NaN counting as equal to NaN (a line search can run into an overflow)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("name", LINES)
def test_line_search_matches_torch(name):
    # optlib's strong_wolfe against torch's _strong_wolfe on the same line: the same step, loss,
    # gradient and number of evaluations, from short and long first trials, with the default
    # budget and a tiny one (max_ls=2), and with a large tolerance_change that ends the zoom.
    function = LINES[name]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = 1.5 * torch.randn(4, generator=gen, dtype=torch.float64)
        loss, grad = _loss_and_grad(function, x)
        direction = -grad * torch.rand(4, generator=gen, dtype=torch.float64)
        slope = grad.dot(direction)
        for first_step in [1e-2, 1.0, 100.0]:
            for max_ls, tolerance_change in [(25, 1e-9), (2, 1e-9), (25, 1e-2)]:
                options = dict(max_ls=max_ls, tolerance_change=tolerance_change)
                ours = strong_wolfe(
                    lambda t: _loss_and_grad(function, x.clone().add_(direction, alpha=t)),
                    first_step, direction, loss, grad, slope, **options,
                )
                theirs = torch_strong_wolfe(
                    lambda x0, t, d: _loss_and_grad(function, x0.clone().add_(d, alpha=t)),
                    x, first_step, direction, loss, grad, slope, **options,
                )
                assert all(_same(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("first_step", [1e-4, 1.0, 30.0])
def test_an_accepted_step_satisfies_the_strong_wolfe_conditions(first_step):
    # Along the steepest descent direction of Rosenbrock, from a short, a unit and a long trial.
    x = torch.tensor([-1.2, 1.0, -0.5, 0.8], dtype=torch.float64)

    def f_and_grad(point):
        return _loss_and_grad(_rosenbrock, point)

    loss, grad = f_and_grad(x)
    direction = -grad / grad.norm()
    slope = grad.dot(direction)
    phi, new_grad, step, evaluations = strong_wolfe(
        lambda t: f_and_grad(x + t * direction), first_step, direction, loss, grad, slope
    )
    assert phi <= loss + 1e-4 * step * slope  # sufficient decrease, c1 = 1e-4
    assert abs(new_grad.dot(direction)) <= 0.9 * abs(slope)  # curvature, c2 = 0.9
    assert 1 <= evaluations <= 26


# ---------------------------------------------------------------- 3. behaviour


def test_converges_on_rosenbrock_in_20_dimensions():
    run = Run(optlib.LBFGS, "rosenbrock", dict(line_search_fn="strong_wolfe", max_iter=200))
    for _ in range(5):
        run.step()
    assert (_flat(run.params) - 1).abs().max() < 1e-6
    assert run.calls < 400


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_solves_a_quadratic_with_one_pair_or_a_hundred(line_search_fn):
    # history_size=1 keeps a single pair and still converges; a longer memory gets there sooner.
    calls = {}
    for history_size in [1, 100]:
        kwargs = dict(history_size=history_size, max_iter=500, max_eval=1000,
                      tolerance_grad=1e-9, tolerance_change=0, line_search_fn=line_search_fn)
        run = Run(optlib.LBFGS, "quadratic", kwargs)
        run.step()
        calls[history_size] = run.calls
        run.closure()  # the gradient at the final point
        assert _flat([p.grad for p in run.params]).abs().max() < 1e-6
        assert 1 <= len(run.state["old_dirs"]) <= history_size
    assert calls[100] < calls[1] / 3


def _checkpoint_continues(first_cls, second_cls, kwargs):
    """Three calls of step with first_cls, its state_dict into a fresh second_cls, three more on
    both: the two must agree bit for bit, in parameters, state and closure calls."""
    first = Run(first_cls, "rosenbrock", kwargs)
    for _ in range(3):
        first.step()
    second = Run(second_cls, "rosenbrock", dict(lr=0.01),  # the settings come from the state_dict
                 [p.detach().clone().requires_grad_() for p in first.params])
    second.opt.load_state_dict(copy.deepcopy(first.opt.state_dict()))
    first.calls = 0
    for _ in range(3):
        first.step()
        second.step()
    assert first.calls == second.calls
    assert all(torch.equal(p, q) for p, q in zip(first.params, second.params))
    assert _state_difference(first.state, second.state) == 0.0


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize("direction", ["optlib->optlib", "torch->optlib", "optlib->torch"])
def test_state_dict_resumes_bit_for_bit(direction, line_search_fn):
    classes = {"optlib": optlib.LBFGS, "torch": torch.optim.LBFGS}
    first, second = (classes[name] for name in direction.split("->"))
    kwargs = dict(lr=0.5, max_iter=4, history_size=3, line_search_fn=line_search_fn)
    _checkpoint_continues(first, second, kwargs)


def test_step_returns_the_first_loss_and_hooks_run():
    run = Run(optlib.LBFGS, "quadratic", dict(max_iter=3))
    calls = []
    run.opt.register_step_pre_hook(lambda *args: calls.append("pre"))
    run.opt.register_step_post_hook(lambda *args: calls.append("post"))
    start = PROBLEMS["quadratic"](run.params).item()
    assert run.step().item() == start
    assert calls == ["pre", "post"] and run.calls == 3


def test_stops_at_once_at_a_stationary_point():
    run = Run(optlib.LBFGS, lambda params: (_flat(params) ** 2).sum(), dict(),
              [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in SHAPES])
    run.step()
    assert run.calls == 1 and run.state == {"func_evals": 1, "n_iter": 0}


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(lr=-0.1), "-0.1"),
        (dict(lr=torch.tensor(-0.1)), "-0.1"),
        (dict(lr=torch.tensor([0.1, 0.2])), "1-element"),
        (dict(params=[]), None),
        (dict(params=torch.zeros(2, requires_grad=True)), None),
        (dict(params=[dict(params=[torch.zeros(2, requires_grad=True)]),
                      dict(params=[torch.zeros(2, requires_grad=True)])]), "parameter groups"),
    ],
    ids=str,
)
def test_invalid_arguments_raise_like_torch(kwargs, text):
    kwargs = dict(params=_start()) | kwargs
    with pytest.raises(Exception) as torch_error:
        torch.optim.LBFGS(**kwargs)
    with pytest.raises(torch_error.type) as our_error:
        optlib.LBFGS(**kwargs)
    if text is not None:
        assert text in str(our_error.value)


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(line_search_fn="armijo"), "armijo"),  # accepted by the constructor, as in torch
        (dict(history_size=0), None),  # torch pops from an empty history: IndexError
    ],
    ids=str,
)
def test_invalid_arguments_that_fail_in_step_raise_like_torch(kwargs, text):
    errors = []
    for cls in (torch.optim.LBFGS, optlib.LBFGS):
        run = Run(cls, "quadratic", kwargs)
        with pytest.raises(Exception) as error:
            for _ in range(3):
                run.step()
        errors.append(error)
    assert errors[0].type is errors[1].type
    if text is not None:
        assert text in str(errors[1].value)


def test_a_second_parameter_group_fails_in_step_like_torch():
    errors = []
    for cls in (torch.optim.LBFGS, optlib.LBFGS):
        run = Run(cls, "quadratic", dict())
        run.opt.add_param_group(dict(params=[torch.zeros(2, requires_grad=True)]))
        with pytest.raises(Exception) as error:
            run.step()
        errors.append(error.type)
    assert errors[0] is errors[1]


def test_max_eval_zero_with_the_line_search_does_not_crash():
    # A deliberate difference: torch 2.13's line search reads an unset variable when it may
    # evaluate nothing (max_eval < 1) and raises UnboundLocalError; optlib takes the first trial
    # step (one evaluation) and stops.
    with pytest.raises(UnboundLocalError):
        Run(torch.optim.LBFGS, "quadratic", dict(max_eval=0, line_search_fn="strong_wolfe")).step()
    run = Run(optlib.LBFGS, "quadratic", dict(max_eval=0, line_search_fn="strong_wolfe"))
    run.step()
    assert run.calls == 2 and run.state["n_iter"] == 1
