"""What the optimizer tests share: float64 parameters, stepping on given gradients, and the
optimizer pairs (optlib, torch.optim) with a grid of settings that covers every argument."""

import itertools

import torch

import optlib

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
}
