"""The fast path (foreach=True or fused=True): the same update as the readable loop, compiled and
run on buckets of tensors. It must give the loop's results, for every optimizer and argument, in
float64 to 1e-12 and in float32 to rounding, and stay compiled when the learning rate changes."""

import copy
import inspect
import subprocess
import sys

import pytest
import torch
from optim_helpers import TWINS, TYPICAL

import optlib
from optlib.bench import run_side_by_side
from optlib.fast import SMALL


def _fast_flag(name):
    """fused=True where torch has a fused implementation, else foreach=True; None for the
    optimizers torch gives neither (Muon)."""
    arguments = inspect.signature(TWINS[name][1]).parameters
    for flag in ("fused", "foreach"):
        if flag in arguments:
            return {flag: True}
    return None


NAMES = [name for name in TWINS if _fast_flag(name)]
# Small tensors that are packed together, a scalar, and one tensor large enough to be updated
# where it lies: both kinds of bucket.
SHAPES = ((4, 3), (3,), (), (SMALL + 7,))


@pytest.fixture(autouse=True)
def fresh_compiler():
    # Each test compiles its own variants; a fresh cache keeps the count under the limit.
    torch._dynamo.reset()
    yield




def _valid(name, kwargs):
    try:
        TWINS[name][0]([torch.zeros(2, 2, requires_grad=True)], **kwargs)
        return True
    except ValueError:  # e.g. SGD's nesterov with dampening
        return False


def _covering(name):
    """TYPICAL, then as few variants as it takes to compile every value of every argument in
    the grid at least once: each variant changes several arguments of TYPICAL at once (a
    compilation costs seconds; one argument at a time would cost one per value)."""
    _, _, settings = TWINS[name]
    variants = [dict(TYPICAL[name])]
    for kwargs in settings:
        for key, value in kwargs.items():
            if any(key in v and v[key] is value for v in variants):
                continue  # compiled already
            for variant in variants[1:]:  # join a variant that leaves this argument as TYPICAL's
                joined = dict(variant, **{key: value})
                if variant.get(key) is TYPICAL[name].get(key) and _valid(name, joined):
                    variant[key] = value
                    break
            else:  # a new variant; the grid's own setting where TYPICAL's does not fit
                variant = dict(TYPICAL[name], **{key: value})
                variants.append(variant if _valid(name, variant) else dict(kwargs))
    return variants


def _loop_against_fast(name, kwargs, **options):
    """The readable loop and the fast path of one optimizer, stepped side by side."""
    cls = TWINS[name][0]
    return run_side_by_side(
        lambda ps: cls(ps, **copy.deepcopy(kwargs)),
        lambda ps: cls(ps, **copy.deepcopy(kwargs), **_fast_flag(name)),
        shapes=SHAPES,
        **options,
    )


CASES = [
    pytest.param(name, kwargs, id=f"{name}-{i}")
    for name in NAMES
    for i, kwargs in enumerate(_covering(name))
]


@pytest.mark.parametrize("name, kwargs", CASES)
def test_fast_path_matches_the_loop_in_float64(name, kwargs):
    result = _loop_against_fast(name, kwargs, steps=50)
    # Adamax's steps are nearly sign steps (m_t / u_t with u_t ≈ |g_t|): where g_t + λθ is near
    # 0 they amplify one rounding difference by about 2 every few steps (measured with
    # betas=(0.5, 0.9): 2e-16 at step 1, 1e-14 at step 30, 5e-12 at step 50).
    assert result.agrees(1e-10 if name == "Adamax" else 1e-12), result


@pytest.mark.numerics
@pytest.mark.parametrize("name", NAMES)
def test_fast_path_matches_the_loop_in_float32(name):
    # The compiled kernel fuses multiply-adds and computes the step size once in float32: it
    # rounds differently from the loop, by a few float32 units over 50 steps.
    kwargs = dict(TYPICAL[name])
    if name == "NAdam":
        # Weight decay holds some weights near 0, where NAdam's steps of about ±γ turn a float32
        # rounding difference into a different step (5e-3 apart after 50 steps, as far apart as
        # torch's own foreach and single-tensor NAdam, by an amount that changes with the CPU).
        # That is chaos, not a bound; the float64 test above covers weight decay exactly.
        kwargs["weight_decay"] = 0.0
    result = _loop_against_fast(name, kwargs, steps=50, dtype=torch.float32)
    assert result.state_keys_match and result.state_types_match
    assert result.max_param_diff < 1e-5 and result.max_state_diff < 1e-4, result


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_complex_parameters(name):
    result = _loop_against_fast(name, TYPICAL[name], steps=20, dtype=torch.complex128)
    assert result.agrees(1e-12), result


def _compiled_graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _train(opt, params, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()


def test_a_scheduler_changes_the_learning_rate_without_recompiling():
    params = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in SHAPES]
    opt = optlib.AdamW(params, lr=0.1, fused=True)
    scheduler = optlib.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    _train(opt, params, steps=3, seed=0)  # steps 1 and 2 compile (the step count becomes a symbol)
    compiled = _compiled_graphs()
    for _ in range(10):
        _train(opt, params, steps=1, seed=1)
        scheduler.step()
    assert opt.param_groups[0]["lr"] < 0.1
    assert _compiled_graphs() == compiled
    assert not torch._dynamo.utils.counters["graph_break"]


@pytest.mark.parametrize("name", NAMES)
def test_later_steps_do_not_recompile(name):
    # ASGD's averaging weight 1 / max(1, t - t0), made a tensor by torch.as_tensor, was a constant
    # of the compiled code: every step past t0 (5 here) compiled again, a second each.
    # The first steps compile: step 1, then the step count as a symbol, and RAdam once more
    # when its rectification starts (step 6 here).
    params = [torch.zeros(s, requires_grad=True) for s in SHAPES]
    opt = TWINS[name][0](params, **TYPICAL[name], **_fast_flag(name))
    _train(opt, params, steps=10, seed=0)
    compiled = _compiled_graphs()
    _train(opt, params, steps=10, seed=1)
    assert _compiled_graphs() == compiled
    assert not torch._dynamo.utils.counters["graph_break"]


def test_parameter_groups_state_dicts_and_schedulers():
    # Two groups with their own settings, trained by the fast path; the state_dict then moves
    # to torch's fused AdamW and to optlib's loop, and all three continue alike.
    def make(cls, **flags):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in SHAPES]
        groups = [dict(params=params[:2], lr=0.05), dict(params=params[2:], weight_decay=0.2)]
        return params, cls(groups, lr=0.01, **flags)

    params, fast = make(optlib.AdamW, fused=True)
    scheduler = optlib.lr_scheduler.StepLR(fast, step_size=3, gamma=0.5)
    for _ in range(7):
        _train(fast, params, steps=1, seed=2)
        scheduler.step()
    continuations = [
        make(optlib.AdamW, fused=True), make(torch.optim.AdamW, fused=True), make(optlib.AdamW)
    ]
    for other_params, other in continuations:
        with torch.no_grad():
            for p, q in zip(other_params, params):
                p.copy_(q)
        other.load_state_dict(copy.deepcopy(fast.state_dict()))  # loading keeps the tensors
    for group in continuations[2][1].param_groups:  # loading set fused=True: back to the loop
        group["fused"] = None
    for other_params, other in continuations:
        _train(other, other_params, steps=5, seed=3)
    reference = continuations[0][0]
    for other_params, _ in continuations[1:]:
        assert max((p - q).abs().max().item() for p, q in zip(reference, other_params)) < 1e-12


@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_sparse_gradients_take_the_loop(name):
    kwargs = dict(lr=0.1) if name == "SGD" else dict(lr=0.1, lr_decay=0.01)
    result = []
    for flags in ({}, dict(fused=True)):
        embedding = torch.nn.Embedding(10, 3, sparse=True, dtype=torch.float64)
        dense = torch.nn.Linear(3, 1, dtype=torch.float64)
        torch.manual_seed(0)
        for module in (embedding, dense):
            for p in module.parameters():
                torch.nn.init.normal_(p, generator=torch.Generator().manual_seed(1))
        opt = TWINS[name][0]([*embedding.parameters(), *dense.parameters()], **kwargs, **flags)
        for step in range(5):
            opt.zero_grad()
            dense(embedding(torch.tensor([step % 10, 3]))).sum().backward()
            opt.step()
        result.append(torch.cat([p.detach().flatten() for p in (*embedding.parameters(), *dense.parameters())]))
    assert (result[0] - result[1]).abs().max().item() < 1e-12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_fast_path_on_cuda(name):
    result = _loop_against_fast(name, TYPICAL[name], steps=20, device="cuda")
    assert result.device == "cuda" and result.agrees(1e-12), result


def test_state_lives_in_the_pack_and_a_loaded_state_is_taken_in():
    # Small tensors keep their state as views into one flat buffer; a state_dict loaded later
    # replaces those tensors, and the next step must use the loaded values, not the old buffer.
    params = [torch.ones(s, dtype=torch.float64, requires_grad=True) for s in ((2, 3), (4,))]
    opt = optlib.Adam(params, lr=0.1, fused=True)
    _train(opt, params, steps=2, seed=0)
    assert opt.state[params[0]]["exp_avg"]._base is opt.state[params[1]]["exp_avg"]._base
    saved = copy.deepcopy(opt.state_dict())
    snapshot = [p.detach().clone() for p in params]
    _train(opt, params, steps=3, seed=1)
    after_three = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, snapshot):
            p.copy_(s)
    opt.load_state_dict(saved)
    _train(opt, params, steps=3, seed=1)
    assert max((p - q).abs().max().item() for p, q in zip(params, after_three)) == 0


def test_importing_optlib_does_not_import_the_compiler():
    # torch.compile is built at the first compiled step: importing it costs a second or more (2.5 s
    # of a notebook's 4.5 s of imports, measured), which a program without the fast path should not pay.
    code = "import sys, optlib; print('torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
