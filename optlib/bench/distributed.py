"""Optimizers across processes: a launcher for torch.distributed, and the book's check that an
optimizer under a distributed wrapper reproduces the single-process run.

A notebook cannot be imported by the processes it starts, so what they run lives here:
:func:`run` starts the processes, each with a process group (gloo on one machine), calls a
function of this or another importable module in each, and returns what every rank returned.
If one rank fails, the others are stopped and the error is raised: a failing rank never leaves
the caller waiting for the others.
"""
import datetime
import multiprocessing
import socket
import time
import traceback
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

WRAPPERS = ("DDP", "ZeRO", "FSDP2")
"""DistributedDataParallel with the optimizer on every rank; ZeroRedundancyOptimizer (ZeRO
stage 1: each rank keeps the state of its share of the parameters and updates only those);
FSDP2's fully_shard (parameters, gradients and state sharded, as DTensors)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, backend, timeout, fn, args, results):
    torch.set_num_threads(1)  # two processes on two cores
    try:
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        results.put((rank, True, fn(*args)))
    except BaseException:  # noqa: BLE001 - reported to the caller, with its traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(fn: Callable, *args, world_size: int = 2, backend: str = "gloo", timeout: float = 120) -> list:
    """``fn(*args)`` in ``world_size`` new processes, each in one process group; returns the
    result of every rank, in rank order. ``fn`` and ``args`` must be importable and picklable."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [
        context.Process(target=_rank_main, args=(rank, world_size, port, backend, timeout, fn, args, results))
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    returned = {}
    try:
        while len(returned) < world_size:
            rank, ok, value = results.get(timeout=timeout)
            if not ok:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
            returned[rank] = value
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return [returned[rank] for rank in range(world_size)]


def _model(matrices_only: bool) -> nn.Module:
    """A small network, the same on every rank (weights drawn from a fixed seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bias = not matrices_only  # Muon updates matrices only
        return nn.Sequential(nn.Linear(6, 8, bias=bias), nn.Tanh(), nn.Linear(8, 3, bias=bias)).double()


def _batches(steps: int, size: int = 8):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 6, generator=generator, dtype=torch.float64),
             torch.randn(size, 3, generator=generator, dtype=torch.float64)) for _ in range(steps)]


def _train(model, optimizer, batches, shard: slice) -> None:
    local = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer's optimizer of this rank
    if hasattr(local, "train"):  # Schedule-Free: gradients are taken at y
        local.train()
    for x, y in batches:
        optimizer.zero_grad()
        F.mse_loss(model(x[shard]), y[shard]).backward()
        optimizer.step()


def _single_process(optimizer_class, kwargs, matrices_only, steps) -> list[torch.Tensor]:
    model = _model(matrices_only)
    optimizer = optimizer_class(model.parameters(), **kwargs)
    _train(model, optimizer, _batches(steps), slice(None))
    return [p.detach() for p in model.parameters()]


def compare(optimizer_class, kwargs: dict, wrapper: str, *, matrices_only: bool = False,
            steps: int = 3) -> tuple[float, float]:
    """Run on every rank of a process group: ``steps`` steps of the optimizer under ``wrapper``,
    each rank on its half of every batch, against the single-process run on whole batches.
    Returns the largest difference of a parameter and the seconds the distributed steps took."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    rank, world_size = dist.get_rank(), dist.get_world_size()
    batches = _batches(steps)
    size = len(batches[0][0]) // world_size
    if wrapper == "DDP":
        model = DistributedDataParallel(_model(matrices_only))
        optimizer = optimizer_class(model.parameters(), **kwargs)
    elif wrapper == "ZeRO":
        model = DistributedDataParallel(_model(matrices_only))
        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=optimizer_class, **kwargs)
    elif wrapper == "FSDP2":
        model = fully_shard(_model(matrices_only), mesh=init_device_mesh("cpu", (world_size,)))
        optimizer = optimizer_class(model.parameters(), **kwargs)
    else:
        raise ValueError(f"unknown wrapper {wrapper!r}; one of {WRAPPERS}")
    start = time.perf_counter()
    _train(model, optimizer, batches, slice(rank * size, (rank + 1) * size))
    seconds = time.perf_counter() - start
    expected = _single_process(optimizer_class, kwargs, matrices_only, steps)
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]  # DTensors
    difference = max((p.detach() - q).abs().max().item() for p, q in zip(params, expected))
    return difference, seconds


def compare_all(cases: Sequence[tuple]) -> dict:
    """:func:`compare` for every case ``(name, optimizer_class, kwargs, wrapper, matrices_only)``,
    in one process group; a case that raises is reported as its error message, and the ranks
    agree on that before going on, so that one failing case does not stop the others."""
    results = {}
    for name, optimizer_class, kwargs, wrapper, matrices_only in cases:
        try:
            outcome = compare(optimizer_class, kwargs, wrapper, matrices_only=matrices_only)
        except Exception as error:  # noqa: BLE001 - the test that owns the case reports it
            outcome = f"{type(error).__name__}: {error}"
        outcomes = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, outcome)
        errors = [o for o in outcomes if isinstance(o, str)]
        results[name, wrapper] = errors[0] if errors else outcomes[0]  # rank 0 reports
    return results
