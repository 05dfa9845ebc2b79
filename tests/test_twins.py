"""Every optlib optimizer against its torch.optim twin, float64: the same iterates and state over a
grid covering every argument, the same signature, errors and checkpoints, and what torch code
expects of an optimizer (schedulers, parameter groups, closures, hooks)."""

import copy
import importlib
import inspect
import sys

import pytest
import torch

import optlib
from optim_helpers import TOL, TWINS, TYPICAL, clone_params, make_params, max_diff, run
from optim_helpers import checkpoint_continues, shapes_of, typical_pairs
from optlib.bench.compare import fixed_gradients, run_side_by_side

NAMES = list(TWINS)


def _label(kwargs):
    def show(v):
        if isinstance(v, torch.Tensor):
            return f"tensor({v.tolist()})"
        if isinstance(v, tuple):
            return "(" + ",".join(show(x) for x in v) + ")"
        return str(v)

    return "-".join(f"{k}={show(v)}" for k, v in kwargs.items())


CASES = [
    pytest.param(name, kwargs, id=f"{name}-{_label(kwargs)}")
    for name, (_, _, settings) in TWINS.items()
    for kwargs in settings
]


# ---------------------------------------------------------------- 1. against torch.optim


@pytest.mark.parametrize("name, kwargs", CASES)
def test_matches_torch_over_the_grid(name, kwargs):
    ours, theirs, _ = TWINS[name]
    result = run_side_by_side(
        lambda ps: ours(ps, **copy.deepcopy(kwargs)),
        lambda ps: theirs(ps, **copy.deepcopy(kwargs)),
        steps=60,
        shapes=shapes_of(name),
    )
    assert result.state_keys_match and result.state_types_match
    assert result.max_param_diff < TOL
    assert result.max_state_diff < TOL


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("impl", [dict(foreach=False), dict(foreach=True), dict(fused=True)], ids=str)
def test_matches_every_torch_implementation(name, impl):
    # The same flags on both sides: optlib's fast path against torch's foreach and fused code,
    # state dtypes included (a fused step counter is float32 on the parameter's device).
    ours, theirs, _ = TWINS[name]
    missing = [flag for flag in impl if flag not in inspect.signature(theirs).parameters]
    if missing:  # RMSprop has no fused implementation, Muon neither fused nor foreach
        pytest.skip(f"torch.optim.{name} has no {missing[0]} argument")
    result = run_side_by_side(
        lambda ps: ours(ps, **TYPICAL[name], **impl),
        lambda ps: theirs(ps, **TYPICAL[name], **impl),
        steps=60,
        shapes=shapes_of(name),
    )
    # torch's foreach ASGD computes its next step size from the float32 step counter in
    # float32, its single-tensor ASGD (and optlib, loop and fast path alike) in float64.
    tolerance = 1e-7 if name == "ASGD" and impl.get("foreach") else 1e-10
    assert result.agrees(tolerance)


def test_torch_asgd_foreach_and_single_tensor_differ_by_float32_rounding():
    # The reason for the looser tolerance above: torch's own two implementations differ.
    result = run_side_by_side(
        lambda ps: torch.optim.ASGD(ps, **TYPICAL["ASGD"], foreach=False),
        lambda ps: torch.optim.ASGD(ps, **TYPICAL["ASGD"], foreach=True),
        steps=60,
    )
    assert 1e-10 < result.max_param_diff < 1e-7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_matches_torch_on_cuda(name):
    # On CUDA torch defaults to its foreach implementation, which rounds a little differently.
    ours, theirs, _ = TWINS[name]
    result = run_side_by_side(
        lambda ps: ours(ps, **TYPICAL[name]),
        lambda ps: theirs(ps, **TYPICAL[name]),
        device="cuda",
        shapes=shapes_of(name),
    )
    assert result.device == "cuda" and result.agrees(1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_complex_parameters_like_torch(name):
    ours, theirs, _ = TWINS[name]
    if name in ("Muon", "Adafactor"):
        pytest.skip(f"torch.optim.{name} refuses complex parameters (tests/test_{name.lower()}.py)")
    result = run_side_by_side(
        lambda ps: ours(ps, **TYPICAL[name]),
        lambda ps: theirs(ps, **TYPICAL[name]),
        steps=60,
        shapes=shapes_of(name),
        dtype=torch.complex128,
    )
    assert result.agrees(TOL)


@pytest.mark.parametrize("name", NAMES)
def test_float32_tensor_hyperparameters_are_used_by_value(name):
    # A float32 tensor lr (and betas) holds a float32-rounded number; optlib reads that number and
    # computes in float64, torch's default loop does some arithmetic on it in float32 (Adagrad's
    # lr decay, Adam's bias-corrected step size, AdamW's factor 1 - lr * weight_decay, which float32
    # rounds by up to 6e-8 at every step). The two agree to that rounding, accumulated over 100 steps.
    ours, theirs, _ = TWINS[name]
    kwargs = dict(TYPICAL[name], lr=torch.tensor(TYPICAL[name]["lr"]))
    if "betas" in kwargs:
        kwargs["betas"] = tuple(torch.tensor(b) for b in kwargs["betas"])
    result = run_side_by_side(
        lambda ps: ours(ps, **copy.deepcopy(kwargs)),
        lambda ps: theirs(ps, **copy.deepcopy(kwargs)),
        shapes=shapes_of(name),
    )
    assert result.agrees(1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_same_signature_defaults_and_group_keys(name):
    ours, theirs, _ = TWINS[name]

    def described(cls):
        sig = inspect.signature(cls.__init__)
        return [(p.name, p.kind, p.default) for p in sig.parameters.values()]

    assert described(ours) == described(theirs)
    a, b = ours(make_params(shapes=shapes_of(name))), theirs(make_params(shapes=shapes_of(name)))
    assert a.defaults == b.defaults
    assert a.param_groups[0].keys() == b.param_groups[0].keys()


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_same_state_keys_dtypes_and_devices(name, default_dtype):
    ours, theirs, _ = TWINS[name]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)  # torch's step counter follows the default dtype
    try:
        described = []
        for cls in (ours, theirs):
            params = make_params(shapes=shapes_of(name), dtype=torch.float32)
            opt = cls(params, **TYPICAL[name])
            run(opt, params, fixed_gradients(shapes_of(name), 2, dtype=torch.float32))
            described.append(
                [(k, v.dtype, v.device, v.shape) for p in params for k, v in sorted(opt.state[p].items())]
            )
    finally:
        torch.set_default_dtype(previous)
    assert described[0] == described[1]


# ---------------------------------------------------------------- errors


def _invalid(name):
    """(kwargs, text the message must contain) for every invalid argument of the optimizer."""
    common = [
        (dict(lr=-0.1), "-0.1"),
        (dict(lr=torch.tensor(-0.1)), "-0.1"),
        (dict(lr=torch.tensor([0.1, 0.2])), "1-element"),
        (dict(weight_decay=-1e-4), "-0.0001"),
        (dict(params=[]), None),
        (dict(params=torch.zeros(2, requires_grad=True)), None),
        (dict(foreach=True, fused=True), "foreach"),
    ]
    specific = {
        "SGD": [
            (dict(momentum=-0.5), "-0.5"),
            (dict(nesterov=True), "momentum"),
            (dict(nesterov=True, momentum=0.9, dampening=0.1), "dampening"),
        ],
        "Adagrad": [
            (dict(lr_decay=-1.0), "-1.0"),
            (dict(initial_accumulator_value=-0.1), "-0.1"),
            (dict(eps=-1e-10), "-1e-10"),
        ],
        "RMSprop": [
            (dict(alpha=-0.9), "-0.9"),
            (dict(eps=-1e-8), "-1e-08"),
            (dict(momentum=-0.9), "-0.9"),
        ],
        "Muon": [  # ns_steps >= 100 and a wrong number of ns_coefficients fail at the step
            (dict(momentum=-0.5), "-0.5"),
            (dict(adjust_lr_fn="unknown"), "unknown"),
            (dict(params=[torch.zeros(3, requires_grad=True)]), "2D"),
            (dict(params=[torch.zeros(2, 3, 4, requires_grad=True)]), "2D"),
        ],
        "Adafactor": [
            (dict(beta2_decay=0.5), "beta2_decay should be <= 0 but is: 0.5"),
            (dict(eps=(-1e-3, 1e-3)), "epsilon1 should be >= 0 but is: -0.001"),
            (dict(eps=(None, -1e-3)), "epsilon2 should be >= 0 but is: -0.001"),
            (dict(d=0.5), "d should be >= 1 but is: 0.5"),
        ],
    }
    adam = [
        (dict(eps=-1e-8), "-1e-08"),
        (dict(betas=(1.0, 0.999)), "index 0"),
        (dict(betas=(-0.1, 0.999)), "index 0"),
        (dict(betas=(0.9, 1.0)), "index 1"),
        (dict(betas=(0.9, torch.tensor(0.999))), "both"),
        (dict(betas=(torch.tensor([0.9, 0.8]), torch.tensor([0.99, 0.9]))), None),
    ]
    betas = [c for c in adam if "both" not in (c[1] or "") and "tensor" not in repr(c[0])]
    specific["Adam"] = specific["AdamW"] = adam
    specific["Adamax"] = specific["RAdam"] = betas  # eps and betas, as Adam's (floats only)
    specific["NAdam"] = betas + [(dict(momentum_decay=-0.1), "-0.1")]
    specific["Adadelta"] = [
        (dict(rho=-0.1), "-0.1"),
        (dict(rho=1.5), "1.5"),
        (dict(eps=-1e-6), "-1e-06"),
    ]
    specific["Rprop"] = [
        (dict(etas=(1.5, 1.2)), "1.5, 1.2"),
        (dict(etas=(0.0, 1.2)), "0.0, 1.2"),
        (dict(etas=(0.5, 0.9)), "0.5, 0.9"),
    ]
    specific["ASGD"] = []  # torch checks only lr and weight_decay
    # Only the arguments the torch class has (RMSprop has no fused, Rprop no weight_decay ...).
    arguments = inspect.signature(TWINS[name][1]).parameters
    return [c for c in common + specific[name] if c[0].keys() <= arguments.keys()]


INVALID = [
    pytest.param(name, kwargs, text, id=f"{name}-{_label(kwargs)}")
    for name in NAMES
    for kwargs, text in _invalid(name)
]


@pytest.mark.parametrize("name, kwargs, text", INVALID)
def test_invalid_arguments_raise_like_torch(name, kwargs, text):
    ours, theirs, _ = TWINS[name]
    kwargs = dict(params=make_params(shapes=shapes_of(name))) | kwargs
    with pytest.raises(Exception) as torch_error:
        theirs(**kwargs)
    with pytest.raises(torch_error.type) as our_error:
        ours(**kwargs)
    if text is not None:
        assert text in str(our_error.value)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("flag", ["differentiable", "capturable"])
def test_differentiable_and_capturable_are_not_supported(name, flag):
    ours, theirs, _ = TWINS[name]
    if flag not in inspect.signature(theirs).parameters:
        pytest.skip(f"torch.optim.{name} has no {flag} argument")
    theirs(make_params(shapes=shapes_of(name)), **{flag: True})  # valid in torch ...
    with pytest.raises(NotImplementedError, match=flag):
        ours(make_params(shapes=shapes_of(name)), **{flag: True})  # ... not provided here


@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradients_like_torch(name):
    ours, theirs, _ = TWINS[name]
    arguments = inspect.signature(ours).parameters
    kwargs = dict(TYPICAL[name])
    if "weight_decay" in arguments:  # Rprop has none
        kwargs["weight_decay"] = 0.0
    if "maximize" in arguments:  # Muon has none
        kwargs["maximize"] = True
    results = []
    for cls in (ours, theirs):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(10, 3, sparse=True).double()
        opt = cls(emb.parameters(), **kwargs)
        try:
            for step in range(5):
                opt.zero_grad()
                emb(torch.tensor([step, 2, 7, 2])).pow(2).sum().backward()  # index 2 twice
                opt.step()
            results.append(emb.weight.detach())
        except RuntimeError as error:
            results.append(type(error))
    if name in ("SGD", "Adagrad"):
        assert max_diff([results[0]], [results[1]]) < TOL
    else:
        assert results == [RuntimeError, RuntimeError]


# ---------------------------------------------------------------- checkpoints and torch's machinery


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("direction", ["optlib->optlib", "torch->optlib", "optlib->torch"])
def test_state_dict_resumes_bit_for_bit(name, direction):
    ours, theirs, _ = TWINS[name]
    first, second = {"optlib->optlib": (ours, ours), "torch->optlib": (theirs, ours), "optlib->torch": (ours, theirs)}[direction]
    checkpoint_continues(first, second, theirs, TYPICAL[name], shapes_of(name))


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_from_an_older_torch_loads(name):
    # Older torch versions stored the step as a number and lacked some group settings.
    ours, theirs, _ = TWINS[name]
    params = make_params(shapes=shapes_of(name))
    opt = theirs(params, **TYPICAL[name])
    run(opt, params, fixed_gradients(shapes_of(name), 3))
    old = copy.deepcopy(opt.state_dict())
    for state in old["state"].values():
        if "step" in state:
            state["step"] = state["step"].item()
    for group in old["param_groups"]:
        for key in ours.checkpoint_defaults:
            group.pop(key, None)
    loaded = []
    for cls in (ours, theirs):
        fresh = cls(clone_params(params), **TYPICAL[name])
        fresh.load_state_dict(copy.deepcopy(old))
        loaded.append(fresh.state_dict())
    assert loaded[0]["param_groups"] == loaded[1]["param_groups"]
    for a, b in zip(loaded[0]["state"].values(), loaded[1]["state"].values()):
        assert a.keys() == b.keys()
        assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
        assert all(type(a[k]) is type(b[k]) for k in a)


@pytest.mark.parametrize("name", NAMES)
def test_lr_scheduler_like_torch(name):
    results = []
    for params, opt in typical_pairs(name):
        scheduler = optlib.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
        for step in fixed_gradients(shapes_of(name), 60):
            run(opt, params, [step])
            scheduler.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(TYPICAL[name]["lr"] * 0.5**6)
        results.append(params)
    assert all(torch.equal(p, q) for p, q in zip(*results))


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_with_different_hyperparameters(name):
    ours, theirs, settings = TWINS[name]
    first, last = dict(settings[-1]), dict(settings[0])  # two settings that differ in every option
    if name == "Adagrad":  # torch ignores a group's own value (see the next test)
        first.pop("initial_accumulator_value"), last.pop("initial_accumulator_value")

    def groups(cls):
        return lambda ps: cls([dict(params=ps[:1], **first), dict(params=ps[1:], **last)])

    result = run_side_by_side(groups(ours), groups(theirs), steps=60, shapes=shapes_of(name))
    assert result.agrees(TOL)


def test_adagrad_uses_each_groups_initial_accumulator_value():
    # A deliberate difference: torch.optim.Adagrad 2.13 starts every sum from the constructor's
    # initial_accumulator_value and silently ignores the value a parameter group sets.
    params = make_params()
    groups = [dict(params=params[:1], initial_accumulator_value=0.5), dict(params=params[1:])]
    ours = optlib.Adagrad(groups, initial_accumulator_value=0.1)
    theirs = torch.optim.Adagrad(groups, initial_accumulator_value=0.1)
    assert ours.state[params[0]]["sum"].eq(0.5).all() and ours.state[params[1]]["sum"].eq(0.1).all()
    assert theirs.state[params[0]]["sum"].eq(0.1).all()  # the group's 0.5 is ignored


@pytest.mark.parametrize("name", NAMES)
def test_a_parameter_whose_gradient_appears_later(name):
    # e.g. a layer unfrozen mid-training: it is skipped until then, then starts its own state.
    results = []
    for params, opt in typical_pairs(name):
        for t, step in enumerate(fixed_gradients(shapes_of(name), 6)):
            for p, g in zip(params, step):
                p.grad = g.clone() if t >= 3 or p is params[0] else None
            opt.step()
        results.append(params + [v for p in params for v in opt.state[p].values()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("name", NAMES)
def test_step_returns_the_closure_loss_and_hooks_run(name):
    ours = TWINS[name][0]
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64, requires_grad=True)  # a matrix, for Muon
    opt = ours([x], **TYPICAL[name])
    calls = []
    opt.register_step_pre_hook(lambda *args: calls.append("pre"))
    opt.register_step_post_hook(lambda *args: calls.append("post"))

    def closure():
        opt.zero_grad()
        loss = (x**2).sum()
        loss.backward()  # needs grad enabled inside step
        return loss

    assert opt.step(closure).item() == 5.0
    assert calls == ["pre", "post"]
    assert not torch.equal(x.detach(), torch.tensor([[1.0, 2.0]], dtype=torch.float64))


@pytest.mark.parametrize("name", NAMES)
def test_grad_is_not_modified(name):
    kwargs = dict(TYPICAL[name])
    if "maximize" in inspect.signature(TWINS[name][0]).parameters:  # Muon has none
        kwargs["maximize"] = True
    params = make_params(shapes=shapes_of(name))
    grads = [torch.randn(p.shape, dtype=p.dtype) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt = TWINS[name][0](params, **kwargs)
    for _ in range(3):  # later steps exercise the in-place updates of the state
        opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    for p in params:  # no state tensor is an alias of the gradient
        assert all(v.data_ptr() != p.grad.data_ptr() for v in opt.state[p].values())


def test_torch_code_runs_unchanged_with_optlib_as_optim():
    def train(optim):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        optimizer = optim.AdamW(model.parameters(), lr=1e-2)
        scheduler = optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
        x, y = torch.randn(32, 4), torch.randn(32, 1)
        for _ in range(20):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            scheduler.step()
        return list(model.parameters())

    assert max_diff(train(optlib), train(torch.optim)) < 1e-6


def test_import_optlib_needs_only_torch(monkeypatch):
    class Forbid:  # an import hook that refuses the experiment kit and its dependencies
        def find_spec(self, name, path=None, target=None):
            if name.startswith(("optlib.bench", "matplotlib", "sklearn", "lion_pytorch", "schedulefree", "prodigyopt")):
                raise ImportError(f"optlib imported {name}")

    kit = ("optlib", "matplotlib", "sklearn", "lion_pytorch", "schedulefree", "prodigyopt")
    for name in [n for n in sys.modules if n.partition(".")[0] in kit]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    monkeypatch.setattr(sys, "meta_path", [Forbid(), *sys.meta_path])
    fresh = importlib.import_module("optlib")
    assert {"SGD", "Adagrad", "RMSprop", "Adam", "AdamW"} <= set(fresh.__all__) and fresh is not optlib
