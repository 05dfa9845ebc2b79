"""Optimizers whose update needs a whole tensor, on parameters sharded by FSDP2.

FSDP2 (``torch.distributed.fsdp.fully_shard``) gives every rank a shard of each parameter, its
gradient and, through ``zeros_like``, its optimizer state, all as DTensors. An element-wise update
(SGD, Adam ...) is then right on every shard by itself. An update that reads a whole matrix at
once is not: Muon's Newton–Schulz iteration of a shard of rows is not the shard of the whole
matrix's iteration, Shampoo's and SOAP's preconditioners are products of whole gradients, and
AdamW8bit's blocks of 256 numbers would fall otherwise on a shard than on the whole tensor.

Such an optimizer (``Optimizer.whole_tensors``) updates each tensor on one rank, its owner:
tensor i of a parameter group (in the group's order, the same on every rank) belongs to rank
i mod N, round robin, so that the work and the state are spread over the ranks. One step:

1. each parameter and its gradient are all-gathered (DTensor's ``full_tensor``); the owner keeps
   them, the other ranks drop them;
2. each rank updates the whole tensors it owns, with their state, which lives on the owner
   alone, whole, as plain tensors (a rank holds the state of its share, as in ZeRO);
3. each owner scatters the new values, and every rank keeps its own shard.

This is the owner-rank scheme of Keller Jordan's distributed Muon (each matrix orthogonalized by
one rank), where the Moonlight design (Liu et al., 2025) gathers every matrix on every rank and
orthogonalizes it there, each rank doing all the work. Under DistributedDataParallel, where every
rank holds every whole parameter, ``ZeroRedundancyOptimizer(optimizer_class=optlib.Muon)`` is the
same scheme: each rank updates its share of the tensors, whole, and broadcasts them.

Step 1 sends every tensor to every rank, where a gather to the owner would send it to one: DTensor's
all-gather handles shards of unequal size (3 rows on 2 ranks), and a gather does not. A rank holds
the whole tensors it owns during the step, about 1/N of the group's parameters and gradients.
"""

import torch

__all__ = ["step_whole_tensors"]


def step_whole_tensors(optimizer, group: dict, params: list, settings: dict) -> None:
    """One step of ``optimizer`` for the DTensor ``params`` (those of ``group`` with a gradient),
    each whole tensor updated by its owner (see the module's docstring)."""
    # imported here: torch.distributed.tensor takes half a second to import, and only a program
    # with DTensors needs it (and has imported it already)
    from torch.distributed.tensor import distribute_tensor

    mesh = params[0].device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(
            f"optlib.{type(optimizer).__name__} updates whole tensors on one rank each, on a "
            f"one-dimensional device mesh; this parameter's mesh has {mesh.ndim} dimensions"
        )
    rank, size = mesh.get_local_rank(), mesh.size()
    position = {id(p): i for i, p in enumerate(group["params"])}
    owners = [position[id(p)] % size for p in params]
    # 1. each parameter and gradient, whole, kept by its owner (collectives in the same order on every rank)
    owned = {}
    for param, owner in zip(params, owners):
        value, grad = param.full_tensor(), param.grad.full_tensor()
        if owner == rank:
            owned[param] = value, grad
    # 2. the owner's update, on whole tensors, with the state it keeps
    for param, (value, grad) in owned.items():
        value.grad = grad  # _init_state reads the gradient where torch keeps it
        state = optimizer.state[param]
        if not state:
            state.update(optimizer._init_state(value, settings))
        optimizer._step_tensor(value, grad, state, settings)
    # 3. each new value from its owner, a shard to every rank (the others send only the shape)
    for param, owner in zip(params, owners):
        if owner == rank:
            value = owned[param][0]
        else:
            value = torch.empty(param.shape, dtype=param.dtype, device=param.device)
        shards = distribute_tensor(value, mesh, param.placements, src_data_rank=owner)
        param.to_local().copy_(shards.to_local())
