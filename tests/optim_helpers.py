"""What the optimizer tests share: float64 parameters, stepping on given gradients, and the
optimizer pairs (optlib, torch.optim) with a grid of settings that covers every argument."""

import copy
import itertools

import torch

import optlib
from optlib.bench.compare import fixed_gradients

TOL = 1e-12
SHAPES = ((4, 3), (3,), (1,))
# Optimizers that take only some shapes get their own (Muon: matrices only; a tall, a wide and a
# square one, since it treats them differently).
SHAPES_FOR = {"Muon": ((4, 3), (3, 5), (2, 2))}


def shapes_of(name):
    return SHAPES_FOR.get(name, SHAPES)


def make_params(seed=0, shapes=SHAPES, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def run(opt, params, grads):
    """Set each step's gradients (copies) and step; returns the params."""
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    return params


def max_diff(xs, ys):
    return max((x - y).abs().max().item() for x, y in zip(xs, ys))


def grid(**options):
    """Every combination of the options, as kwargs dicts."""
    names = list(options)
    return [dict(zip(names, values)) for values in itertools.product(*options.values())]


def lr_options(value):
    # A float64 tensor lr is used by its value in both libraries (see test_tensor_hyperparameters).
    return [value, torch.tensor(value / 2, dtype=torch.float64)]


def _sgd_grid():
    return [
        kw
        for kw in grid(
            lr=lr_options(0.1), momentum=[0.0, 0.9], dampening=[0.0, 0.5], nesterov=[False, True],
            weight_decay=[0.0, 1e-2], maximize=[False, True],
        )
        if not (kw["nesterov"] and (kw["momentum"] <= 0 or kw["dampening"] != 0))
    ]


def _adam_betas():
    return [(0.9, 0.999), (0.5, 0.9), (torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.99, dtype=torch.float64))]


# name: (optlib class, torch class, settings covering every argument of the constructor)
TWINS = {
    "SGD": (optlib.SGD, torch.optim.SGD, _sgd_grid()),
    "Adagrad": (
        optlib.Adagrad,
        torch.optim.Adagrad,
        grid(
            lr=lr_options(0.1), lr_decay=[0.0, 0.05], weight_decay=[0.0, 1e-2],
            initial_accumulator_value=[0.0, 0.1], eps=[1e-10, 1e-3], maximize=[False, True],
        ),
    ),
    "RMSprop": (
        optlib.RMSprop,
        torch.optim.RMSprop,
        grid(
            lr=lr_options(0.01), alpha=[0.99, 0.9], eps=[1e-8, 1e-3], weight_decay=[0.0, 1e-2],
            momentum=[0.0, 0.9], centered=[False, True], maximize=[False, True],
        ),
    ),
    "Adam": (
        optlib.Adam,
        torch.optim.Adam,
        grid(
            lr=lr_options(0.01), betas=_adam_betas(), eps=[1e-8, 1e-3], weight_decay=[0.0, 0.1],
            amsgrad=[False, True], maximize=[False, True], decoupled_weight_decay=[False, True],
        ),
    ),
    "AdamW": (
        optlib.AdamW,
        torch.optim.AdamW,
        grid(
            lr=lr_options(0.01), betas=_adam_betas(), eps=[1e-8, 1e-3], weight_decay=[0.0, 0.1],
            amsgrad=[False, True], maximize=[False, True],
        ),
    ),
    "Adadelta": (
        optlib.Adadelta,
        torch.optim.Adadelta,
        grid(
            lr=lr_options(1.0), rho=[0.9, 0.5], eps=[1e-6, 1e-2], weight_decay=[0.0, 1e-2],
            maximize=[False, True],
        ),
    ),
    "Adamax": (
        optlib.Adamax,
        torch.optim.Adamax,
        grid(
            lr=lr_options(0.01), betas=[(0.9, 0.999), (0.5, 0.9)], eps=[1e-8, 1e-3],
            weight_decay=[0.0, 1e-2], maximize=[False, True],
        ),
    ),
    "NAdam": (
        optlib.NAdam,
        torch.optim.NAdam,
        grid(
            lr=lr_options(0.01), betas=[(0.9, 0.999), (0.5, 0.9)], eps=[1e-8, 1e-3],
            weight_decay=[0.0, 0.1], momentum_decay=[4e-3, 0.1], decoupled_weight_decay=[False, True],
            maximize=[False, True],
        ),
    ),
    "RAdam": (
        optlib.RAdam,
        torch.optim.RAdam,
        # beta2 = 0.999 and 0.9: the first steps unrectified, then rectified
        grid(
            lr=lr_options(0.01), betas=[(0.9, 0.999), (0.5, 0.9)], eps=[1e-8, 1e-3],
            weight_decay=[0.0, 0.1], decoupled_weight_decay=[False, True], maximize=[False, True],
        ),
    ),
    "Rprop": (
        optlib.Rprop,
        torch.optim.Rprop,
        grid(
            lr=lr_options(0.01), etas=[(0.5, 1.2), (0.3, 1.5)], step_sizes=[(1e-6, 50), (1e-3, 0.05)],
            maximize=[False, True],
        ),
    ),
    "ASGD": (
        optlib.ASGD,
        torch.optim.ASGD,
        # t0 = 10: the average starts within the 60 steps of a test
        grid(
            lr=lr_options(0.01), lambd=[1e-4, 0.1], alpha=[0.75, 0.5], t0=[1e6, 10.0],
            weight_decay=[0.0, 1e-2], maximize=[False, True],
        ),
    ),
    "Muon": (
        optlib.Muon,
        torch.optim.Muon,
        # every adjust_lr_fn against the momentum options; then the Newton-Schulz options (the
        # classic quintic, an eps larger than the norm, 1 and 10 steps), 36 settings. The last
        # differs from the first in every option (test_param_groups_with_different_...).
        grid(
            lr=lr_options(0.02), weight_decay=[0.0, 0.1], momentum=[0.5],
            nesterov=[True, False], adjust_lr_fn=[None, "original", "match_rms_adamw"],
        )
        + grid(
            lr=[0.05], weight_decay=[0.01], momentum=[0.8], nesterov=[False],
            ns_coefficients=[(3.4445, -4.775, 2.0315), (1.875, -1.25, 0.375)], eps=[1e-7, 1.0],
            ns_steps=[5, 1, 10], adjust_lr_fn=["match_rms_adamw"],
        ),
    ),
    "Adafactor": (
        optlib.Adafactor,
        torch.optim.Adafactor,
        # lr 0.4 and 0.2: γ_t = min(γ, 1/√t) switches to 1/√t within the 60 steps; eps1 = 1e-3
        # bounds the tiny gradients' v̂, eps2 = 2 exceeds RMS(θ); d = 1 and 1.5 both clip
        grid(
            lr=lr_options(0.4), beta2_decay=[-0.8, -0.5], eps=[(None, 1e-3), (1e-3, 2.0)],
            d=[1.0, 1.5], weight_decay=[0.0, 0.1], maximize=[False, True],
        ),
    ),
}

def typical_pairs(name):
    """(params, optimizer) for optlib's and for torch's class, both at the TYPICAL setting."""
    for cls in TWINS[name][:2]:
        params = make_params(shapes=shapes_of(name))
        yield params, cls(params, **TYPICAL[name])


# A setting of each that switches on its state and options, for the tests that need just one.
TYPICAL = {
    "SGD": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2),
    "Adagrad": dict(lr=0.1, lr_decay=0.01, weight_decay=1e-2, initial_accumulator_value=0.1),
    "RMSprop": dict(lr=0.01, momentum=0.9, centered=True, weight_decay=1e-2),
    "Adam": dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True),
    "AdamW": dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True),
    "Adadelta": dict(lr=1.0, rho=0.8, weight_decay=1e-2),
    "Adamax": dict(lr=0.01, betas=(0.8, 0.99), weight_decay=1e-2),
    "NAdam": dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, momentum_decay=0.01),
    "RAdam": dict(lr=0.01, betas=(0.8, 0.9), weight_decay=0.1),
    "Rprop": dict(lr=0.01, etas=(0.4, 1.3), step_sizes=(1e-4, 1.0)),
    "ASGD": dict(lr=0.01, lambd=0.01, alpha=0.6, t0=5.0, weight_decay=1e-2),
    "Muon": dict(lr=0.02, momentum=0.9, weight_decay=0.1, ns_steps=4, adjust_lr_fn="match_rms_adamw"),
    "Adafactor": dict(lr=0.2, beta2_decay=-0.7, eps=(1e-6, 1e-2), d=1.2, weight_decay=0.1),
}


def same_run(params, opt, other_params, other_opt, tolerance):
    """Parameters and state of two runs agree: bit for bit when tolerance is 0."""
    pairs = list(zip(params, other_params))
    for p, q in pairs:
        assert opt.state[p].keys() == other_opt.state[q].keys()
    entries = [(opt.state[p][k], other_opt.state[q][k]) for p, q in pairs for k in opt.state[p]]
    for a, b in [(a, b) for a, b in entries if isinstance(a, list)]:  # SOAP: a matrix per dimension
        assert len(a) == len(b)
        entries += [(x, y) for x, y in zip(a, b) if torch.is_tensor(x)]
    tensors = [(p, q) for p, q in pairs] + [(a, b) for a, b in entries if not isinstance(a, list)]
    numbers = [(a, b) for a, b in tensors if not torch.is_tensor(a)]  # Prodigy's int step
    tensors = [(a, b) for a, b in tensors if torch.is_tensor(a)]
    assert all(a == b for a, b in numbers)
    if tolerance == 0:
        assert all(torch.equal(a, b) for a, b in tensors)
    else:
        assert max((a - b).abs().max().item() for a, b in tensors) < tolerance


def checkpoint_continues(make_first, make_second, reference, kwargs, shapes):
    """30 steps with make_first; its state_dict into make_second and into the torch class
    (reference); 30 more steps on all three. The resumed run continues bit for bit as torch's
    does from the same checkpoint, and as the first run did. Loading casts a state tensor to
    its parameter's dtype, so where a float32 counter meets float64 parameters (NAdam's
    mu_product, ASGD's eta and mu) the first run goes on in float32 and the resumed ones in
    float64: those agree with the first run to rounding."""
    grads = fixed_gradients(shapes, 60)
    params = make_params(shapes=shapes)
    first = make_first(params, **kwargs)
    run(first, params, grads[:30])
    checkpoint = first.state_dict()

    resumed, witnessed = clone_params(params), clone_params(params)
    second = make_second(resumed, lr=1.0)  # the hyperparameters come from the state_dict
    witness = reference(witnessed, lr=1.0)
    for opt in (second, witness):
        opt.load_state_dict(copy.deepcopy(checkpoint))
    cast = any(
        getattr(v, "dtype", None) != getattr(second.state[q][k], "dtype", None)
        for p, q in zip(params, resumed)
        for k, v in first.state[p].items()
    )
    run(first, params, grads[30:])
    run(second, resumed, grads[30:])
    run(witness, witnessed, grads[30:])
    same_run(resumed, second, witnessed, witness, tolerance=0)
    same_run(params, first, resumed, second, tolerance=TOL if cast else 0)
