"""Optimizers across processes: a launcher for torch.distributed, and the book's check that an
optimizer under a distributed wrapper reproduces the single-process run.

A notebook cannot be imported by the processes it starts, so what they run lives here:
:func:`run` starts the processes, each with a process group (gloo on one machine), calls a
function of this or another importable module in each, and returns what every rank returned.
If one rank fails, the others are stopped and the error is raised: a failing rank never leaves
the caller waiting for the others.
"""
import datetime
import functools
import multiprocessing
import os
import socket
import time
import traceback
import warnings
from collections.abc import Callable, Sequence

import numpy as np
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
    result of every rank, in rank order. ``fn`` and ``args`` must be importable and picklable, and
    so must what ``fn`` returns, by value: NumPy arrays, not tensors (torch sends a tensor through
    a queue as shared memory, which ends with the process that made it)."""
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


MODELS = ("network", "matrices", "embedding")
"""The models :func:`compare` trains: a small network (two linear layers, with biases), the same
without biases (for Muon, which updates matrices only), and an embedding with sparse gradients
(for SparseAdam)."""


def _model(name: str) -> nn.Module:
    """One of :data:`MODELS`, the same on every rank (weights drawn from a fixed seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name == "embedding":
            return nn.Embedding(10, 3, sparse=True).double()
        bias = name == "network"
        return nn.Sequential(nn.Linear(6, 8, bias=bias), nn.Tanh(), nn.Linear(8, 3, bias=bias)).double()


def _batches(steps: int, model_name: str, size: int = 8):
    generator = torch.Generator().manual_seed(1)
    if model_name == "embedding":  # rows of the table, some in both ranks' shares
        inputs = [torch.randint(10, (size,), generator=generator) for _ in range(steps)]
    else:
        inputs = [torch.randn(size, 6, generator=generator, dtype=torch.float64) for _ in range(steps)]
    return [(x, torch.randn(size, 3, generator=generator, dtype=torch.float64)) for x in inputs]


def _train(model, optimizer, batches, shards: list[slice], world_size: int) -> None:
    """Train on ``batches``, each split into ``world_size`` shards; this process computes the
    losses of ``shards`` (a rank: its own; the single process: all of them).

    The gradient is the mean of the shards' gradients, as a wrapper averages the ranks': the
    single process scales each shard's loss by 1 / N before summing gradients, the wrapper
    divides the ranks' sum by N, and both give the same numbers to the last bit (the scale is a
    power of 2, and a sum of two numbers does not depend on their order). So does the loss an
    optimizer's closure returns (L-BFGS's), the same on every rank. What the check then compares
    is the optimizer's step on shards against its step on whole tensors.
    """
    local = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer's optimizer of this rank
    if hasattr(local, "train"):  # Schedule-Free: gradients are taken at y
        local.train()
    scale = 1 / world_size if len(shards) > 1 else 1.0  # a wrapper averages the ranks' gradients
    for x, y in batches:
        def closure():
            optimizer.zero_grad()
            loss = torch.zeros((), dtype=y.dtype)
            for shard in shards:
                shard_loss = F.mse_loss(model(x[shard]), y[shard]) * scale
                shard_loss.backward()
                loss += shard_loss.detach()
            if len(shards) == 1 and world_size > 1:  # a rank: the mean over the ranks
                dist.all_reduce(loss)
                loss /= world_size
            return loss

        optimizer.step(closure)


def _shards(size: int, world_size: int) -> list[slice]:
    """The ranks' shares of a batch of ``size`` examples."""
    share = size // world_size
    return [slice(rank * share, (rank + 1) * share) for rank in range(world_size)]


def _single_process(optimizer_class, kwargs, model_name, steps, world_size) -> list[torch.Tensor]:
    model = _model(model_name)
    optimizer = optimizer_class(model.parameters(), **kwargs)
    batches = _batches(steps, model_name)
    _train(model, optimizer, batches, _shards(len(batches[0][0]), world_size), world_size)
    return [p.detach() for p in model.parameters()]


def _fully_sharded(model_name: str) -> nn.Module:
    """The model, its parameters sharded over the process group's ranks by FSDP2."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    return fully_shard(_model(model_name), mesh=init_device_mesh("cpu", (dist.get_world_size(),)))


def compare(optimizer_class, kwargs: dict, wrapper: str, *, model_name: str = "network",
            steps: int = 3, reference: dict | None = None) -> tuple[float, float, list[str]]:
    """Run on every rank of a process group: ``steps`` steps of the optimizer under ``wrapper``,
    each rank on its share of every batch, against the single-process run on whole batches with
    the same mean gradient (see `_train`), made with the arguments ``reference`` (by default
    ``kwargs``). Returns the largest difference of a parameter, the seconds the distributed steps
    took and the messages of the warnings they gave."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    rank, world_size = dist.get_rank(), dist.get_world_size()
    batches = _batches(steps, model_name)
    if wrapper == "DDP":
        model = DistributedDataParallel(_model(model_name))
        optimizer = optimizer_class(model.parameters(), **kwargs)
    elif wrapper == "ZeRO":
        model = DistributedDataParallel(_model(model_name))
        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=optimizer_class, **kwargs)
    elif wrapper == "FSDP2":
        model = _fully_sharded(model_name)
        optimizer = optimizer_class(model.parameters(), **kwargs)
    else:
        raise ValueError(f"unknown wrapper {wrapper!r}; one of {WRAPPERS}")
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, optimizer, batches, _shards(len(batches[0][0]), world_size)[rank : rank + 1], world_size)
    seconds = time.perf_counter() - start
    expected = _single_process(optimizer_class, kwargs if reference is None else reference, model_name,
                               steps, world_size)
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]  # DTensors
    difference = max((p.detach() - q).abs().max().item() for p, q in zip(params, expected))
    return difference, seconds, [str(w.message) for w in caught]


def save_and_continue(optimizer_class, kwargs: dict, directory: str, model_name: str = "network",
                      steps: int = 3) -> list[np.ndarray]:
    """Run on every rank of a process group: ``steps - 1`` steps under FSDP2, the model's and the
    optimizer's sharded state saved with torch.distributed.checkpoint to ``directory``, one step
    more; returns the parameters after it, whole, as NumPy arrays. :func:`load_and_continue`
    takes the last step on one process from the checkpoint, to be compared with these."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = _fully_sharded(model_name)
    optimizer = optimizer_class(model.parameters(), **kwargs)
    batches = _batches(steps, model_name)
    shard = _shards(len(batches[0][0]), world_size)[rank : rank + 1]
    _train(model, optimizer, batches[:-1], shard, world_size)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)
    _train(model, optimizer, batches[-1:], shard, world_size)
    return [p.full_tensor().detach().numpy() for p in model.parameters()]


def load_and_continue(optimizer_class, kwargs: dict, directory: str, model_name: str = "network",
                      steps: int = 3, world_size: int = 2, restore_optimizer: bool = True) -> list[torch.Tensor]:
    """On one process, without a process group: the model and a new optimizer loaded from the
    checkpoint that :func:`save_and_continue` wrote, then its last step, on whole batches. With
    ``restore_optimizer=False`` only the model is loaded (a check that the state matters)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _model(model_name)
    optimizer = optimizer_class(model.parameters(), **kwargs)
    model_state, optimizer_state = get_state_dict(model, optimizer)  # tensors to load into
    dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    if not restore_optimizer:  # (the state was loaded into the optimizer's own tensors)
        optimizer = optimizer_class(model.parameters(), **kwargs)
    batches = _batches(steps, model_name)
    _train(model, optimizer, batches[-1:], _shards(len(batches[0][0]), world_size), world_size)
    return [p.detach() for p in model.parameters()]


def compare_all(cases: Sequence[tuple], checkpoints: Sequence[tuple] = (), directory: str = "") -> dict:
    """:func:`compare` for every case ``(name, optimizer_class, kwargs, wrapper, model_name)`` (and,
    optionally, the arguments of the single-process reference),
    then :func:`save_and_continue` for every case ``(name, optimizer_class, kwargs, model_name)``
    of ``checkpoints`` (into ``directory``/name; its result under the key ``(name, "checkpoint")``),
    in one process group. A case that raises is reported as its error message, and the ranks agree
    on that before going on, so that one failing case does not stop the others."""
    runs = [(name, wrapper, functools.partial(compare, optimizer_class, kwargs, wrapper, model_name=model_name,
                                              reference=reference[0] if reference else None))
            for name, optimizer_class, kwargs, wrapper, model_name, *reference in cases]
    runs += [(name, "checkpoint", functools.partial(save_and_continue, optimizer_class, kwargs,
                                                    os.path.join(directory, name), model_name))
             for name, optimizer_class, kwargs, model_name in checkpoints]
    results = {}
    for name, wrapper, case in runs:
        try:
            outcome = case()
        except Exception as error:  # noqa: BLE001 - the test that owns the case reports it
            outcome = f"{type(error).__name__}: {error}"
        outcomes = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, outcome)
        errors = [o for o in outcomes if isinstance(o, str)]
        results[name, wrapper] = errors[0] if errors else outcomes[0]  # rank 0 reports
    return results
