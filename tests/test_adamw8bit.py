"""optlib.AdamW8bit against bitsandbytes.optim.AdamW8bit (0.50.2, its CPU kernels): the same maps,
the same quantization, the same steps bit for bit over a grid of every argument, checkpoints that
move between the two packages; and against float32 AdamW, what 8 bits cost and save.

bitsandbytes steps float32 and float64 parameters alike in float32, so these tests run in float32
(and one float64 case); there is no float64 arithmetic to compare."""

import copy
import inspect
import os

import pytest
import torch
from optim_helpers import grid


def _import_bitsandbytes():
    """bitsandbytes' CPU kernels run on their own OpenMP runtime (the system's libgomp, not
    torch's), whose threads spin after each kernel and starve torch's when cores are few
    (measured on 2 cores: 30 ms a step for 1 ms). Its runtime reads the wait policy once, when
    the import loads it; the environment is restored for everything else."""
    policy = os.environ.get("OMP_WAIT_POLICY")
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        import bitsandbytes.functional
    finally:
        if policy is None:
            del os.environ["OMP_WAIT_POLICY"]
        else:
            os.environ["OMP_WAIT_POLICY"] = policy
    return bitsandbytes


bitsandbytes = _import_bitsandbytes()

import optlib  # noqa: E402
from optlib.adamw8bit import (  # noqa: E402
    BLOCK_SIZE,
    dequantize_blockwise,
    dynamic_map,
    quantize_blockwise,
    rounding_table,
)
from optlib.bench.compare import fixed_gradients  # noqa: E402

Reference = bitsandbytes.optim.AdamW8bit
# A matrix of 20 whole blocks, a vector of 17 blocks whose last holds 3 numbers, and three tensors
# below min_8bit_size = 4096, which keep 32-bit moments unless min_8bit_size says otherwise.
SHAPES = ((64, 80), (4099,), (10,), (3, 4), (1,))
GRID = grid(
    lr=[1e-3, 3e-2],
    betas=[(0.9, 0.999), (0.5, 0.9)],
    eps=[1e-8, 1e-3],
    weight_decay=[1e-2, 0.0, 0.1],
) + [
    dict(min_8bit_size=1),  # every tensor quantized, a one-number block included
    dict(min_8bit_size=10**9, weight_decay=0.1),  # none: the 32-bit kernel only
    dict(betas=(0.0, 0.0), eps=1e-3),
]


def _params(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in SHAPES]


def _step(opts_and_params, grads):
    for opt, params in opts_and_params:
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype).clone()
        opt.step()


def _assert_same(ours, params, theirs, reference_params):
    """Parameters and every state entry equal, bit for bit, with the same keys in the same order."""
    for p, q in zip(params, reference_params):
        assert torch.equal(p, q)
        assert list(ours.state[p]) == list(theirs.state[q])
        for key, value in ours.state[p].items():
            other = theirs.state[q][key]
            if torch.is_tensor(value):
                assert value.dtype == other.dtype and torch.equal(value, other), key
            else:
                assert type(value) is type(other) and value == other, key


# ---------------------------------------------------------------- the quantization


@pytest.mark.parametrize("signed", [True, False])
def test_the_maps_are_the_reference_s(signed):
    code = dynamic_map(signed)
    assert torch.equal(code, bitsandbytes.functional.create_dynamic_map(signed=signed))
    assert code.dtype == torch.float32 and code.numel() == 256 and code.unique().numel() == 256
    assert code[-1] == 1.0 and (code == 0).any() and (code.min() < 0) == signed


def _hard_inputs(signed):
    """Heavy-tailed numbers over ten decades, sizes that are not multiples of the block, an
    all-zero block, and numbers at the edges of the rounding table's bins."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40 * BLOCK_SIZE + 77, generator=gen) * torch.exp(3 * torch.randn(40 * BLOCK_SIZE + 77, generator=gen))
    x[BLOCK_SIZE : 2 * BLOCK_SIZE] = 0.0
    k = torch.arange(1, 65535, dtype=torch.float64)
    edges = ((k - 0.5) / 65535 * 2 - 1).float()  # where (x + 1) / 2 · 65535 + 0.5 is a whole number
    edges = torch.cat([edges, edges.nextafter(torch.tensor(2.0)), edges.nextafter(torch.tensor(-2.0))])
    edges = edges[torch.randperm(edges.numel(), generator=gen)][: 255 * 700].view(700, 255)
    edges = torch.cat([torch.ones(700, 1), edges], dim=1).flatten()  # absmax 1: normalized as given
    inputs = [x, edges, x[:1], x[:255], x[: BLOCK_SIZE + 1]]
    return inputs if signed else [t.abs() for t in inputs]


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_and_dequantize_match_the_reference_s_functions(signed):
    code = dynamic_map(signed)
    table = rounding_table(code)
    for x in _hard_inputs(signed):
        indices, absmax = quantize_blockwise(x, code, table=table)
        ref_indices, ref_absmax = torch.ops.bitsandbytes.quantize_blockwise(x, code, BLOCK_SIZE)
        # Measured: 0 indices differ, of 250 000 (bins' edges included), and absmax equal.
        assert torch.equal(indices, ref_indices) and torch.equal(absmax, ref_absmax)
        ref_values = torch.ops.bitsandbytes.dequantize_blockwise(indices, absmax, code, BLOCK_SIZE, torch.float32)
        assert torch.equal(dequantize_blockwise(indices, absmax, code), ref_values)


@pytest.mark.parametrize("signed", [True, False])
def test_exact_rounding_is_the_nearest_entry_and_the_table_is_within_a_bin_of_it(signed):
    """Without a table, each number gets the index of its nearest entry (the paper). The
    reference's table rounds the nearest of 65536 points instead: its error exceeds the nearest
    entry's by at most the spacing of the points, 2 / 65535."""
    code = dynamic_map(signed)
    for x in _hard_inputs(signed)[:2]:
        exact, absmax = quantize_blockwise(x, code)
        table, _ = quantize_blockwise(x, code, table=rounding_table(code))
        blocks = torch.nn.functional.pad(x, (0, -x.numel() % BLOCK_SIZE)).view(-1, BLOCK_SIZE)
        scaled = (blocks * torch.where(absmax > 0, 1 / absmax, 0.0)[:, None]).flatten()[: x.numel()]
        live = (absmax > 0).repeat_interleave(BLOCK_SIZE)[: x.numel()]  # all-zero blocks store 0
        distance = (scaled[live, None] - code[None, :]).abs()
        nearest = distance.min(dim=1).values
        assert torch.equal(distance.gather(1, exact[live].long()[:, None]).squeeze(1), nearest)
        table_error = distance.gather(1, table[live].long()[:, None]).squeeze(1)
        assert (table_error - nearest).max() <= 2 / 65535
        assert (table != exact).any()  # they do differ: see the next test


def test_the_table_cannot_store_zero_and_floors_small_numbers():
    """bitsandbytes' CPU table cannot tell apart the entries of the map below its spacing: a 0 in
    a block that is not all zero comes back as +2.1e-5·absmax (m) or 1.6e-5·absmax (v), which
    floors v and so shortens the steps of coordinates whose gradients are ~1e-3 of their block's
    largest. The exact rounding keeps 0."""
    for signed, floor in [(True, 2.125e-5), (False, 1.5625e-5)]:
        code = dynamic_map(signed)
        x = torch.zeros(BLOCK_SIZE)
        x[0] = 1.0
        via_table = dequantize_blockwise(*quantize_blockwise(x, code, table=rounding_table(code)), code)
        exact = dequantize_blockwise(*quantize_blockwise(x, code), code)
        assert torch.allclose(via_table[1:], torch.tensor(floor), rtol=1e-6) and torch.equal(exact, x)


def test_blocks_keep_an_outlier_from_flattening_the_rest():
    """The paper's reason for blocks: one large number normalizes only its own block. With one
    scale for the whole tensor, numbers 1e4 times smaller than the outlier lose ~10x more."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=gen) * 1e-3
    x[7] = 10.0
    code = dynamic_map()
    table = rounding_table(code)
    errors = {}
    for block_size in (BLOCK_SIZE, x.numel()):
        restored = dequantize_blockwise(*quantize_blockwise(x, code, block_size, table), code, block_size)
        errors[block_size] = ((restored - x).abs() / x.abs())[BLOCK_SIZE:].median().item()
    assert errors[BLOCK_SIZE] < 0.02 and errors[x.numel()] > 5 * errors[BLOCK_SIZE]  # measured: 0.012, 0.17


# ---------------------------------------------------------------- the optimizer against bitsandbytes


def _label(kwargs):
    return ",".join(f"{k}={v}" for k, v in kwargs.items())


@pytest.mark.parametrize("kwargs", GRID, ids=[_label(kw) for kw in GRID])
def test_matches_the_reference_over_the_grid(kwargs):
    """60 steps on gradients that differ per step and per tensor, a quarter of them ~1e-8 (so
    that eps matters, and the 8-bit state meets numbers far below its block's absmax). The same
    float32 operations in the same order, and the same rounding table: parameters and every
    state entry equal bit for bit (measured over the grid: 0 differing indices, largest
    parameter difference 0)."""
    params, reference_params = _params(), _params()
    ours, theirs = optlib.AdamW8bit(params, **kwargs), Reference(reference_params, **kwargs)
    for grads in fixed_gradients(SHAPES, 60, seed=1, dtype=torch.float32):
        _step([(ours, params), (theirs, reference_params)], grads)
        _assert_same(ours, params, theirs, reference_params)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_parameter_dtypes_are_stepped_in_float32_like_the_reference(dtype):
    params, reference_params = _params(dtype=dtype), _params(dtype=dtype)
    ours, theirs = optlib.AdamW8bit(params, lr=1e-2), Reference(reference_params, lr=1e-2)
    for grads in fixed_gradients(SHAPES, 20, seed=1, dtype=torch.float32):
        _step([(ours, params), (theirs, reference_params)], grads)
        _assert_same(ours, params, theirs, reference_params)


def test_same_signature_defaults_group_keys_and_state():
    def arguments(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls).parameters.values()]

    assert arguments(optlib.AdamW8bit) == arguments(Reference)
    params, reference_params = _params(), _params()
    ours, theirs = optlib.AdamW8bit(params), Reference(reference_params)
    assert ours.param_groups[0].keys() == theirs.param_groups[0].keys()
    _step([(ours, params), (theirs, reference_params)], fixed_gradients(SHAPES, 1, dtype=torch.float32)[0])
    _assert_same(ours, params, theirs, reference_params)  # keys, dtypes, shapes and values
    assert list(ours.state[params[0]]) == ["step", "state1", "qmap1", "state2", "qmap2", "absmax1", "absmax2"]
    assert list(ours.state[params[2]]) == ["step", "state1", "state2"]  # 32-bit: 10 < 4096 numbers


def test_the_state_is_two_bytes_per_parameter_and_eight_per_block():
    """The memory claim: m and v take one byte each per number, and each block of 256 numbers
    one float32 absmax for each; AdamW keeps 8 bytes per number. The two 1 KiB maps are shared
    by all tensors of the optimizer."""
    params = _params()
    opt = optlib.AdamW8bit(params)
    _step([(opt, params)], fixed_gradients(SHAPES, 1, dtype=torch.float32)[0])
    big = params[1]  # 4099 numbers: 17 blocks
    state = opt.state[big]
    blocks = -(-big.numel() // BLOCK_SIZE)
    per_tensor = sum(v.numel() * v.element_size() for k, v in state.items() if k in ("state1", "state2", "absmax1", "absmax2"))
    assert per_tensor == 2 * big.numel() + 8 * blocks == 8334  # AdamW: 8 * 4099 = 32 792
    assert state["qmap1"] is opt.state[params[0]]["qmap1"] and state["qmap2"] is opt.state[params[0]]["qmap2"]


@pytest.mark.numerics
def test_tracks_float32_adamw_on_a_quadratic():
    """On a quadratic whose curvatures spread over a factor ~5 either way, 8-bit states change
    little: after 100 steps the parameters are within 5% (measured 4.0%) of float32 AdamW's
    path length of them, and the loss within 1% (measured 0.2%). The coordinates that differ most
    are those whose gradient is small next to its block's largest, whose v the table floors."""
    gen = torch.Generator().manual_seed(0)
    curvature = torch.exp(0.5 * torch.randn(64, 80, generator=gen))
    center, start = torch.randn(64, 80, generator=gen), torch.randn(64, 80, generator=gen)
    ends = []
    for cls in (optlib.AdamW8bit, optlib.AdamW):
        x = start.clone().requires_grad_()
        opt = cls([x], lr=1e-2, weight_decay=1e-2)
        for _ in range(100):
            x.grad = curvature * (x.detach() - center)
            opt.step()
        ends.append(x.detach())

    def loss(x):
        return 0.5 * (curvature * (x - center) ** 2).sum()

    eight, full = ends
    assert (eight - full).norm() < 0.08 * (full - start).norm()
    assert abs(loss(eight) / loss(full) - 1) < 0.01


# ---------------------------------------------------------------- errors


INVALID = [
    dict(lr=-1e-3),
    dict(eps=-1e-8),
    dict(betas=(1.0, 0.999)),
    dict(betas=(0.9, -0.1)),
    dict(weight_decay=-0.1),
    dict(amsgrad=True),
    dict(optim_bits=8),
    dict(params=[]),
]


@pytest.mark.parametrize("kwargs", INVALID, ids=[_label(kw) for kw in INVALID])
def test_invalid_arguments_raise_like_the_reference(kwargs):
    kwargs = dict(params=_params()) | kwargs
    with pytest.raises(Exception) as reference_error:
        Reference(**kwargs)
    with pytest.raises(reference_error.type) as our_error:
        optlib.AdamW8bit(**kwargs)
    assert str(our_error.value) == str(reference_error.value)


def test_the_reference_s_args_object_is_refused():
    with pytest.raises(NotImplementedError, match="args"):
        optlib.AdamW8bit(_params(), args=object())


def test_grad_is_not_modified():
    params = _params()
    grads = fixed_gradients(SHAPES, 1, dtype=torch.float32)[0]
    opt = optlib.AdamW8bit(params, min_8bit_size=1)
    for _ in range(3):
        _step([(opt, params)], grads)
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("direction", ["optlib->optlib", "reference->optlib", "optlib->reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_dict_resumes_bit_for_bit(direction, dtype):
    """10 steps, a state_dict, 10 more in a fresh optimizer: the same as 20 steps in one. The
    quantized state is nested under the reference's key, and keeps float32 absmax and maps for
    float64 parameters (torch's loading would cast them to the parameter's dtype)."""
    first_cls, second_cls = {
        "optlib->optlib": (optlib.AdamW8bit, optlib.AdamW8bit),
        "reference->optlib": (Reference, optlib.AdamW8bit),
        "optlib->reference": (optlib.AdamW8bit, Reference),
    }[direction]
    grads = fixed_gradients(SHAPES, 20, seed=1, dtype=torch.float32)
    kwargs = dict(lr=1e-2, weight_decay=0.1)
    params, witness_params = _params(dtype=dtype), _params(dtype=dtype)
    first, witness = first_cls(params, **kwargs), second_cls(witness_params, **kwargs)
    for step in grads[:10]:
        _step([(first, params), (witness, witness_params)], step)
    checkpoint = first.state_dict()
    assert "__bnb_optimizer_quant_state__" in checkpoint["state"][0]
    resumed = [p.detach().clone().requires_grad_() for p in params]
    second = second_cls(resumed, lr=1.0)  # the hyperparameters come from the state_dict
    second.load_state_dict(copy.deepcopy(checkpoint))
    assert second.state[resumed[0]]["absmax1"].dtype == torch.float32
    for step in grads[10:]:
        _step([(second, resumed), (witness, witness_params)], step)
    _assert_same(second, resumed, witness, witness_params)
