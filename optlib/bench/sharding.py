"""Optimizer state across processes: what each rank holds, and what it sends, under
DistributedDataParallel, ZeroRedundancyOptimizer and FSDP2's ``fully_shard``.

The chapter "Optimizer state across machines" starts its processes once, with
``distributed.run(sharding.measure)``: what the processes run lives here (a notebook cannot be
imported by the processes it starts), beside the pure helpers that derive, without running
anything, what the processes measure.

Bytes are counted from tensors, never from an allocator: the bytes of every parameter, gradient
and state tensor a rank holds (for a DTensor, the bytes of its local shard), and the bytes of
every buffer handed to a collective.
"""
import contextlib
import math
import time
from collections import Counter

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import optlib
from optlib.bench import distributed

WIDTHS = (128, 256, 256, 128)
"""The layers of the chapter's network: three linear layers, 131,712 parameters with biases."""

SETUPS = ("DDP", "ZeroRedundancy", "FSDP2, no reshard", "FSDP2")
"""DistributedDataParallel (every rank holds everything); ZeroRedundancyOptimizer (ZeRO stage 1:
each rank keeps the state of its share of the tensors); ``fully_shard`` with
``reshard_after_forward=False`` (close to stage 2: the full parameters from the forward to the
backward pass, gradients and state sharded); ``fully_shard`` (stage 3: all three sharded)."""

STAGE = {"DDP": "0", "ZeroRedundancy": "1", "FSDP2, no reshard": "≈2", "FSDP2": "3"}


# --- pure helpers: what the processes should measure, derived ---------------------------------

def mlp(widths=WIDTHS, *, bias: bool = True, dtype=torch.float32, seed: int = 0) -> nn.Sequential:
    """Linear layers of the given widths with tanh between them, drawn from a fixed seed (the
    same network on every rank)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(fan_in, fan_out, bias=bias, dtype=dtype), nn.Tanh()]
        return nn.Sequential(*layers[:-1])


def local_bytes(tensor: torch.Tensor) -> int:
    """The bytes of ``tensor`` held by this process: for a DTensor, those of its local shard."""
    if hasattr(tensor, "to_local"):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def state_tensors(optimizer) -> list[torch.Tensor]:
    """Every tensor of an optimizer's state that has a size (not the 0-dim step counters, one
    number per parameter tensor), lists of tensors included, each storage once (AdamW8bit's
    quantization maps are shared by all its parameters). For a ZeroRedundancyOptimizer, the
    state of this rank's local optimizer."""
    optimizer = getattr(optimizer, "optim", optimizer)
    found, seen = [], set()
    for state in optimizer.state.values():
        for value in state.values():
            for tensor in value if isinstance(value, (list, tuple)) else [value]:
                if not torch.is_tensor(tensor) or tensor.ndim == 0:
                    continue
                local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
                key = local.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    found.append(tensor)
    return found


def state_bytes(optimizer) -> int:
    """The bytes of :func:`state_tensors` held by this process."""
    return sum(local_bytes(t) for t in state_tensors(optimizer))


def shard_rows(rows: int, world_size: int) -> list[int]:
    """The rows of a tensor that each rank holds under FSDP2, which shards dimension 0 the way
    ``torch.chunk`` does: chunks of ``ceil(rows / world_size)`` rows, the last ones shorter or
    empty."""
    chunk = -(-rows // world_size)
    return [max(0, min(chunk, rows - rank * chunk)) for rank in range(world_size)]


def fsdp_shares(shapes, world_size: int) -> list[int]:
    """The numbers each rank holds of tensors of ``shapes`` sharded by FSDP2."""
    shares = [0] * world_size
    for shape in shapes:
        for rank, rows in enumerate(shard_rows(shape[0], world_size)):
            shares[rank] += rows * math.prod(shape[1:])
    return shares


def zero_shares(sizes, world_size: int) -> list[int]:
    """The numbers of parameters whose state each rank keeps under ZeroRedundancyOptimizer, for
    tensors of ``sizes`` numbers in one parameter group: it hands out whole tensors, largest
    first, each to the rank with the fewest numbers so far (the lowest rank on a tie)."""
    shares = [0] * world_size
    for size in sorted(sizes, reverse=True):
        shares[shares.index(min(shares))] += size
    return shares


def derived_bytes(shapes, setup: str, world_size: int, *, number_bytes: int = 4,
                  state_per_number: int = 8) -> list[dict]:
    """Per rank, the bytes of weights (as the model computes with them, between the forward and
    the backward pass), gradients (after the backward pass) and optimizer state (after the step)
    that ``setup`` holds, for parameters of ``shapes`` stored in ``number_bytes`` bytes and an
    optimizer with ``state_per_number`` bytes of state per parameter."""
    psi = sum(math.prod(shape) for shape in shapes)
    full = [psi] * world_size
    if setup == "DDP":
        weights, gradients, state = full, full, full
    elif setup == "ZeroRedundancy":
        weights, gradients, state = full, full, zero_shares([math.prod(s) for s in shapes], world_size)
    elif setup == "FSDP2, no reshard":
        weights, gradients, state = full, fsdp_shares(shapes, world_size), fsdp_shares(shapes, world_size)
    elif setup == "FSDP2":
        weights = gradients = state = fsdp_shares(shapes, world_size)
    else:
        raise ValueError(f"unknown setup {setup!r}; one of {SETUPS}")
    return [dict(weights=number_bytes * w, gradients=number_bytes * g, state=state_per_number * s)
            for w, g, s in zip(weights, gradients, state)]


def zero_bytes_per_rank(psi: float, world_size: int, stage: int, *, weight_bytes: float = 4,
                        gradient_bytes: float = 4, state_bytes: float = 8) -> float:
    """Bytes per rank for ``psi`` parameters on ``world_size`` ranks at ZeRO ``stage`` (0: plain
    data parallelism), the model states of Rajbhandari et al. (2020): stage 1 divides the
    optimizer state by the number of ranks, stage 2 the gradients too, stage 3 the weights too.
    Their mixed-precision Adam is ``weight_bytes=2, gradient_bytes=2, state_bytes=12``."""
    weights = psi * weight_bytes / (world_size if stage >= 3 else 1)
    gradients = psi * gradient_bytes / (world_size if stage >= 2 else 1)
    state = psi * state_bytes / (world_size if stage >= 1 else 1)
    return weights + gradients + state


def owners(count: int, world_size: int) -> list[int]:
    """The rank that orthogonalizes each of ``count`` matrices of a parameter group in the
    owner-rank scheme: round robin, matrix ``i`` on rank ``i % world_size``."""
    return [i % world_size for i in range(count)]


def newton_schulz_flops(shape, steps: int = 5) -> int:
    """Floating-point operations of ``steps`` Newton–Schulz steps on a matrix of ``shape``:
    with m ≤ n its sides, 2m²n for X Xᵀ, 2m³ for A², 2m²n for B X per step."""
    m, n = sorted(shape)
    return steps * (4 * m * m * n + 2 * m**3)


# --- what the processes run -------------------------------------------------------------------

class _CountingAllGather:
    """FSDP2's all-gather (``FSDPModule.set_custom_all_gather``), counting the bytes gathered."""

    def __init__(self, counts: Counter):
        self.counts = counts

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        self.counts["all-gather"] += local_bytes(output_tensor)
        return dist.all_gather_single(output_tensor, input_tensor, group=group, async_op=async_op)


class _CountingReduceScatter(_CountingAllGather):
    """FSDP2's reduce-scatter (``set_custom_reduce_scatter``), counting the bytes reduced."""

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self.counts["reduce-scatter"] += local_bytes(input_tensor)
        return dist.reduce_scatter_single(output_tensor, input_tensor, op=op, group=group,
                                          async_op=async_op)


def _counting_all_reduce(counts: Counter, bucket):
    """A DDP communication hook: DDP's own all-reduce of a bucket of gradients, counted."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    counts["all-reduce"] += local_bytes(bucket.buffer())
    return allreduce_hook(None, bucket)


@contextlib.contextmanager
def _counting_broadcasts(counts: Counter):
    """Count the bytes handed to ``torch.distributed.broadcast`` (which ZeroRedundancyOptimizer
    calls, once per parameter, to send each updated parameter from its owner to the others)."""
    original = dist.broadcast

    def broadcast(tensor, *args, **kwargs):
        counts["broadcast"] += local_bytes(tensor)
        return original(tensor, *args, **kwargs)

    dist.broadcast = broadcast
    try:
        yield
    finally:
        dist.broadcast = original


def _fully_sharded(model: nn.Module, device: torch.device, reshard: bool = True,
                   counts: Counter | None = None) -> nn.Module:
    """``fully_shard`` on each linear layer of ``model``, then on the whole, with the
    collectives counted in ``counts``. Each layer is a unit of its own, as one wraps each block
    of a transformer: the root's own parameters are never resharded after the forward pass (the
    backward pass needs them first)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
            if counts is not None:
                layer.set_custom_all_gather(_CountingAllGather(counts))
                layer.set_custom_reduce_scatter(_CountingReduceScatter(counts))
    return fully_shard(model, mesh=mesh, reshard_after_forward=reshard)


def _wrapped(setup: str, device: torch.device, counts: Counter):
    """The chapter's network and AdamW under ``setup``, with its collectives counted."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    model = mlp().to(device)
    if setup in ("DDP", "ZeroRedundancy"):
        # The gradients are views into DDP's buckets (by default DDP keeps both, twice the bytes).
        model = DistributedDataParallel(model, gradient_as_bucket_view=True,
                                        device_ids=[device.index] if device.type == "cuda" else None)
        model.register_comm_hook(counts, _counting_all_reduce)
    if setup == "DDP":
        return model, optlib.AdamW(model.parameters())
    if setup == "ZeroRedundancy":
        return model, ZeroRedundancyOptimizer(model.parameters(), optimizer_class=optlib.AdamW)
    if setup not in SETUPS:
        raise ValueError(f"unknown setup {setup!r}; one of {SETUPS}")
    model = _fully_sharded(model, device, reshard=setup == "FSDP2", counts=counts)
    return model, optlib.AdamW(model.parameters())


def _batch(step: int, device: torch.device, size: int = 16):
    """This rank's half of the batch of ``step`` (the same batches on every rank)."""
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(size, WIDTHS[0], generator=generator)
    y = torch.randn(size, WIDTHS[-1], generator=generator)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    share = slice(rank * size // world_size, (rank + 1) * size // world_size)
    return x[share].to(device), y[share].to(device)


def _step(model, optimizer, x, y) -> dict:
    """One training step; the bytes of weights the model computes with after the forward pass,
    of gradients after the backward pass and of optimizer state after the step."""
    loss = F.mse_loss(model(x), y)
    held = dict(weights=sum(local_bytes(p) for p in model.parameters()))
    loss.backward()
    held["gradients"] = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    optimizer.step()
    optimizer.zero_grad()
    held["state"] = state_bytes(optimizer)
    return held


def measure_setup(setup: str, device: torch.device, timed_steps: int = 5) -> dict:
    """On this rank: the bytes held and sent in one training step under ``setup`` (the second
    step, when the state exists), and the seconds per step of ``timed_steps`` more."""
    counts = Counter()
    model, optimizer = _wrapped(setup, device, counts)
    _step(model, optimizer, *_batch(0, device))  # creates the state
    counts.clear()
    with _counting_broadcasts(counts):
        held = _step(model, optimizer, *_batch(1, device))
    sent = dict(counts)
    dist.barrier()
    start = time.perf_counter()
    for step in range(timed_steps):
        _step(model, optimizer, *_batch(2 + step, device))
    dist.barrier()
    seconds = (time.perf_counter() - start) / timed_steps
    return dict(held=held, sent=sent, seconds=seconds)


def measure_owners(device: torch.device) -> dict:
    """On this rank: Muon on the matrices of the chapter's network (no biases) under FSDP2, two
    steps; the bytes of state this rank keeps and the positions, in the parameter group, of the
    matrices it keeps state for (the matrices it orthogonalizes)."""
    model = _fully_sharded(mlp(bias=False).to(device), device)
    optimizer = optlib.Muon(model.parameters())
    for step in range(2):
        _step(model, optimizer, *_batch(step, device))
    owned = [i for i, p in enumerate(optimizer.param_groups[0]["params"]) if optimizer.state.get(p)]
    return dict(state=state_bytes(optimizer), owned=owned)


AGREEMENT_CASES = [
    ("AdamW", optlib.AdamW, {}, "DDP", "network"),
    ("AdamW", optlib.AdamW, {}, "ZeRO", "network"),
    ("AdamW", optlib.AdamW, {}, "FSDP2", "network"),
    ("SGD", optlib.SGD, dict(lr=0.1, momentum=0.9), "FSDP2", "network"),
    ("Muon", optlib.Muon, {}, "DDP", "matrices"),
    ("Muon", optlib.Muon, {}, "ZeRO", "matrices"),
    ("Muon", optlib.Muon, {}, "FSDP2", "matrices"),
]
"""Optimizers under a wrapper against the single-process run (:func:`distributed.compare`)."""


def measure(device: str = "cpu", timed_steps: int = 5, setups=SETUPS, cases=AGREEMENT_CASES) -> dict:
    """Everything the chapter measures across processes, on this rank: the shapes of the
    network's parameters; for every setup of ``setups``, the bytes held and sent and the seconds
    per step (:func:`measure_setup`); the state Muon keeps on this rank under FSDP2
    (:func:`measure_owners`); and on the CPU, on every rank, rank 0's verdicts of
    :func:`distributed.compare` for ``cases`` (it runs on the CPU only): the largest difference
    to the single process, or the error a case raised. With ``device="cuda"`` (and the backend
    ``"nccl"``), each process takes the GPU of its rank."""
    if device == "cuda":
        torch.cuda.set_device(dist.get_rank())
        where = torch.device("cuda", dist.get_rank())
    else:
        where = torch.device(device)
    measured = {setup: measure_setup(setup, where, timed_steps) for setup in setups}
    agreement = {}
    if where.type == "cpu" and cases:
        for case, outcome in distributed.compare_all(cases).items():
            agreement[case] = outcome if isinstance(outcome, str) else outcome[0]
    return dict(shapes=[tuple(p.shape) for p in mlp().parameters()], setups=measured,
                owners=measure_owners(where), agreement=agreement)
