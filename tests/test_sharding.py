"""The kit behind the chapter "Optimizer state across machines" (optlib.bench.sharding): the pure
helpers that derive what each rank holds, checked against torch, and one run on two processes in
which the measured bytes equal the derived ones."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import optlib
from optlib.bench import distributed, sharding
from optlib.muon import EPS, NS_COEFFICIENTS, zeropower_via_newtonschulz


def test_the_network_has_the_parameters_the_chapter_counts():
    shapes = [tuple(p.shape) for p in sharding.mlp().parameters()]
    assert shapes == [(256, 128), (256,), (256, 256), (256,), (128, 256), (128,)]
    assert sum(math.prod(s) for s in shapes) == 131_712
    assert all(p.ndim == 2 for p in sharding.mlp(bias=False).parameters())
    first, second = sharding.mlp(), sharding.mlp()  # the same network on every rank
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), second.parameters()))


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 128, 257])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_rows_are_torch_chunks(rows, world_size):
    chunks = [len(c) for c in torch.arange(rows).chunk(world_size)]
    expected = chunks + [0] * (world_size - len(chunks))  # torch.chunk may return fewer chunks
    assert sharding.shard_rows(rows, world_size) == expected


def test_fsdp_shares_add_up_and_split_evenly_here():
    shapes = [(256, 128), (256,), (3, 5)]
    assert sharding.fsdp_shares(shapes, 2) == [128 * 128 + 128 + 2 * 5, 128 * 128 + 128 + 5]
    shapes = [tuple(p.shape) for p in sharding.mlp().parameters()]
    assert sharding.fsdp_shares(shapes, 2) == [131_712 // 2] * 2


def test_zero_shares_are_sorted_greedy():
    # largest first, each to the rank with the fewest numbers so far, ties to the lowest rank
    assert sharding.zero_shares([10, 30, 20], 2) == [30, 30]
    assert sharding.zero_shares([5, 5, 5], 2) == [10, 5]
    assert sharding.zero_shares([4], 3) == [4, 0, 0]


def test_derived_bytes_follow_the_stages():
    shapes = [(4, 2), (4,)]  # 12 parameters, even shards of 6
    derived = {setup: sharding.derived_bytes(shapes, setup, 2)[0] for setup in sharding.SETUPS}
    assert derived["DDP"] == dict(weights=48, gradients=48, state=96)
    assert derived["ZeroRedundancy"] == dict(weights=48, gradients=48, state=8 * 8)  # the 4×2 matrix
    assert derived["FSDP2, no reshard"] == dict(weights=48, gradients=24, state=48)
    assert derived["FSDP2"] == dict(weights=24, gradients=24, state=48)
    with pytest.raises(ValueError, match="unknown setup"):
        sharding.derived_bytes(shapes, "FSDP1", 2)


def test_zero_bytes_per_rank_gives_the_papers_figure():
    # Rajbhandari et al. (2020), figure 1: 7.5B parameters, 64 ranks, mixed-precision Adam
    mixed = dict(weight_bytes=2, gradient_bytes=2, state_bytes=12)
    gigabytes = [sharding.zero_bytes_per_rank(7.5e9, 64, stage, **mixed) / 1e9 for stage in range(4)]
    assert [round(g, 1) for g in gigabytes] == [120.0, 31.4, 16.6, 1.9]


def test_owners_are_round_robin():
    assert sharding.owners(5, 2) == [0, 1, 0, 1, 0]
    assert sharding.owners(2, 4) == [0, 1]


@pytest.mark.parametrize("shape", [(8, 8), (16, 4), (4, 16)])
def test_newton_schulz_flops_are_those_torch_counts(shape):
    with FlopCounterMode(display=False) as counter:
        zeropower_via_newtonschulz(torch.randn(shape), NS_COEFFICIENTS, 5, EPS)
    assert counter.get_total_flops() == sharding.newton_schulz_flops(shape, steps=5)


def test_state_bytes_counts_lists_and_shared_tensors_once():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(64, 32))
    param.grad = torch.randn(64, 32)
    adamw8bit = optlib.AdamW8bit([param], min_8bit_size=1)
    adamw8bit.step()
    blocks = 64 * 32 // 256
    # two uint8 moments, a float32 scale per block each, two quantization maps of 256 numbers
    assert sharding.state_bytes(adamw8bit) == 2 * 64 * 32 + 2 * 4 * blocks + 2 * 4 * 256
    soap = optlib.SOAP([param])
    soap.step()
    # exp_avg and exp_avg_sq, and the lists GG and Q of a 64×64 and a 32×32 matrix each
    assert sharding.state_bytes(soap) == 4 * (2 * 64 * 32 + 2 * (64 * 64 + 32 * 32))
    adamw = optlib.AdamW([param])
    adamw.step()
    assert sharding.state_bytes(adamw) == 8 * 64 * 32  # the step counter is left out


def test_two_processes_hold_and_send_what_is_derived():
    setups = ("ZeroRedundancy", "FSDP2")
    ranks = distributed.run(sharding.measure, "cpu", 1, setups, ())
    shapes = ranks[0]["shapes"]
    model_bytes = 4 * sum(math.prod(s) for s in shapes)
    for rank, result in enumerate(ranks):
        for setup in setups:
            assert result["setups"][setup]["held"] == sharding.derived_bytes(shapes, setup, 2)[rank]
        sent = {setup: result["setups"][setup]["sent"] for setup in setups}
        assert sent["ZeroRedundancy"] == {"all-reduce": model_bytes, "broadcast": model_bytes}
        assert sent["FSDP2"] == {"all-gather": 2 * model_bytes, "reduce-scatter": model_bytes}
        matrices = [s for s in shapes if len(s) == 2]
        owned = [i for i, owner in enumerate(sharding.owners(len(matrices), 2)) if owner == rank]
        assert result["owners"] == dict(state=sum(4 * math.prod(matrices[i]) for i in owned), owned=owned)
        assert result["agreement"] == {}
