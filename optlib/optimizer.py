"""What every optlib optimizer shares, and nothing specific to one algorithm.

``torch.optim.Optimizer`` already keeps parameter groups, ``zero_grad``, ``state_dict`` and the hooks
that schedulers use. This module adds what each of torch's optimizers writes again for itself:

- the step loop: call the closure, walk over groups and parameters, skip parameters without a
  gradient, create a parameter's state on its first step and count steps;
- the rules torch follows for every optimizer: hyperparameters given as tensors are used by their
  value, complex parameters are updated as real tensors of twice the size, the step count is a
  float tensor, and sparse gradients are refused unless the optimizer handles them;
- the checks of arguments, with torch's exception types and messages.

An optimizer file then holds only its algorithm: a docstring, a pure update function of tensors,
and a subclass that names its defaults, creates its state (``_init_state``) and calls the update
(``_update``).
"""

import functools
import sys
import warnings

import torch
from torch import Tensor

from optlib.fast import compiled_update
from optlib.sharded import step_whole_tensors

__all__ = [
    "Optimizer",
    "check_betas",
    "check_non_negative",
    "check_tensor_lr",
    "hyperparameters",
    "any_sharded",
    "refuse_zero_redundancy",
    "real",
    "settings_for",
    "step_counter",
]

# torch's messages name most hyperparameters as "Invalid <name> value: ..."; these two differ.
_LABELS = {"lr": "learning rate", "eps": "epsilon value"}


def check_non_negative(**hyperparameters: float | Tensor) -> None:
    """Raise torch's ValueError for any hyperparameter that is negative (or NaN)."""
    for name, value in hyperparameters.items():
        if not 0.0 <= value:
            raise ValueError(f"Invalid {_LABELS.get(name, f'{name} value')}: {value}")


def check_betas(betas: tuple) -> None:
    """torch's check of Adam-style decay rates: each of the two in [0, 1), or ValueError naming
    its index (and IndexError, as in torch, if there are fewer than two)."""
    for index in (0, 1):
        if not 0.0 <= betas[index] < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {betas[index]}")


def check_tensor_lr(lr: float | Tensor) -> None:
    """A learning rate given as a tensor must hold one number, as in torch."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")


def refuse_zero_redundancy(name: str, needs: str) -> None:
    """Called by the constructor of the optimizer ``name``: raise if what constructs it is a
    ZeroRedundancyOptimizer, which builds one optimizer per rank over that rank's share of the
    parameters. That is wrong for an optimizer that ``needs`` all of them at once (torch.optim's
    L-BFGS there silently returns another model than on one process)."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.optim import ZeroRedundancyOptimizer

    caller = sys._getframe(2).f_locals.get("self")  # 1 is the optimizer's __init__, 2 its caller
    if isinstance(caller, ZeroRedundancyOptimizer):
        raise RuntimeError(
            f"optlib.{name} cannot run under ZeroRedundancyOptimizer: each rank would update only "
            f"its share of the parameters, and {name} needs {needs}. Run {name} itself on every "
            "rank (under DistributedDataParallel), unsharded."
        )


def hyperparameters(arguments: dict) -> dict:
    """A constructor's arguments, ``locals()``, as the defaults that torch keeps in every parameter
    group: everything but ``self`` and ``params``."""
    return {k: v for k, v in arguments.items() if k not in ("self", "params", "__class__")}


def settings_for(update, group: dict) -> dict:
    """The settings of a parameter group that an update function takes: its keyword-only
    arguments (those after ``*``), by their names. Read from the function's code object, which
    is fast, and constant to torch.compile."""
    code = update.__code__
    names = code.co_varnames[code.co_argcount : code.co_argcount + code.co_kwonlyargcount]
    return {k: group[k] for k in names if k in group}


def step_counter(param: Tensor | None = None, fused: bool | None = False) -> Tensor:
    """A new ``state["step"]`` as torch makes it, so that a checkpoint moves between torch and
    optlib unchanged: a float tensor on the CPU, float64 only when the default dtype is float64;
    with ``fused=True``, float32 on the parameter's device, where torch's fused kernels keep it."""
    if fused:
        return torch.zeros((), dtype=torch.float32, device=param.device)
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(0.0, dtype=dtype)


def real(tensor: Tensor | None) -> Tensor | None:
    """A complex tensor as a real view with a trailing dimension of 2 (real and imaginary parts),
    as torch updates complex parameters; writing to the view writes to the tensor."""
    if tensor is not None and tensor.is_complex():
        return torch.view_as_real(tensor)
    return tensor


def _value(hyperparameter):
    """A tensor hyperparameter (lr, betas ...) is used by its value, like torch's default
    implementation does; tuples such as betas are converted entry by entry."""
    if isinstance(hyperparameter, Tensor):
        return hyperparameter.item()
    if isinstance(hyperparameter, tuple):
        return tuple(_value(h) for h in hyperparameter)
    return hyperparameter


def any_sharded(params: list[Tensor]) -> bool:
    """True if a parameter is a DTensor (FSDP2's shards). The check does not import
    torch.distributed.tensor (half a second): no tensor is a DTensor before it is imported."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and any(isinstance(p, dtensor.DTensor) for p in params)


def _fast_path_refused(optimizer, params: list[Tensor]) -> bool:
    """True for DTensor parameters (FSDP2's shards), which the fast path does not take (it packs and
    views plain tensors): the readable update runs instead, with a warning the first time."""
    refused = any_sharded(params)
    if refused:
        _warn_fast_path_refused(type(optimizer).__name__)
    return refused


@functools.cache  # once per optimizer class
def _warn_fast_path_refused(name: str) -> None:
    warnings.warn(
        f"optlib.{name}: the fast path (foreach=True or fused=True) does not run on DTensor "
        "parameters (FSDP2); the readable update runs instead, with the same results",
        stacklevel=6,  # the caller of step (through torch's hooks and no_grad)
    )


class Optimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` with the step loop every optlib optimizer shares.

    A subclass implements ``_update(param, grad, state, group)``, one step for one tensor, and,
    if it keeps state, ``_init_state(param, group)``, which returns the state of a parameter
    before its first step. ``group`` holds the hyperparameters as plain numbers and, for an
    optimizer that counts steps, ``step``: t for this tensor.

    With ``foreach=True`` or ``fused=True`` the same ``_update`` runs compiled, on many tensors
    at once (`optlib.fast`); the results agree with the loop here to float rounding.
    """

    # torch.optim.SGD and Adagrad accept sparse gradients; the other optimizers refuse them.
    accepts_sparse_gradients = False
    # True when the update treats every number of a tensor alike and keeps one state number per
    # number of the tensor, so that the fast path may update tensors as flat vectors, several
    # packed into one. False for an update that reduces over a tensor (a norm, a matrix
    # product) or keeps other state (a 0-dim tensor): the fast path then compiles it per tensor.
    elementwise = True
    # Group settings that checkpoints from older torch versions may lack, with their defaults.
    checkpoint_defaults: dict = {}
    # Settings besides lr that change from step to step (Schedule-Free's averaging weight): the
    # fast path passes them to the compiled update as tensors, so that a new value does not
    # compile it again.
    per_step_settings: tuple = ()
    # True when the update reads a whole tensor at once (matrix products, eigenbases, blocks that
    # span rows): on parameters sharded by FSDP2, each tensor is then updated by one rank
    # (`optlib.sharded`), as a shard alone would give another update.
    whole_tensors = False

    def __init__(self, params, defaults: dict) -> None:
        super().__init__(params, defaults)
        if defaults.get("fused") and defaults.get("differentiable"):
            raise RuntimeError("`fused` does not support `differentiable`")
        if defaults.get("fused") and defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        # These are valid for torch (autograd through step(), CUDA graphs) but not provided here:
        # NotImplementedError says so, where a ValueError would call the value wrong.
        for flag in ("differentiable", "capturable"):
            if defaults.get(flag):
                raise NotImplementedError(f"optlib.{type(self).__name__} does not support {flag}=True")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.checkpoint_defaults.items():
                group.setdefault(key, value)
        # Old checkpoints stored numbers where torch now keeps 0-dim tensors (the step count,
        # NAdam's mu_product, ASGD's eta and mu): make those tensors as a fresh state would.
        for group in self.param_groups:
            for param in group["params"]:
                param_state = self.state.get(param, {})
                numbers = [k for k, v in param_state.items() if isinstance(v, (int, float))]
                if numbers:
                    fresh = self._init_state(param, group)
                    for key in numbers:
                        if torch.is_tensor(fresh.get(key)):
                            param_state[key] = fresh[key].fill_(param_state[key])

    def _init_state(self, param: Tensor, group: dict) -> dict:
        return {}

    def _settings(self, group: dict) -> dict:
        """A group's hyperparameters as the update takes them: tensors by their value. An
        optimizer that keeps a setting on itself rather than in its groups (as some reference
        packages do) adds it here."""
        return {k: _value(v) for k, v in group.items() if k != "params"}

    @staticmethod
    def _update(param: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        raise NotImplementedError

    def _step_tensor(self, param: Tensor, grad: Tensor, state: dict, settings: dict) -> None:
        """The readable step of one tensor: count the step, then update."""
        if "step" in state:
            state["step"] += 1  # t counts from 1
            settings["step"] = float(state["step"])  # t, for _update
        self._update(param, grad, state, settings)

    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step; returns the closure's loss, or None."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            settings = self._settings(group)
            params = [p for p in group["params"] if p.grad is not None]
            for param in params:
                if param.grad.is_sparse and not self.accepts_sparse_gradients:
                    name = type(self).__name__
                    raise RuntimeError(f"{name} does not support sparse gradients")
            if self.whole_tensors and any_sharded(params):
                step_whole_tensors(self, group, params, settings)  # optlib.sharded: a rank per tensor
                continue
            for param in params:
                if not self.state[param]:
                    self.state[param].update(self._init_state(param, settings))
            if (settings.get("foreach") or settings.get("fused")) and not _fast_path_refused(self, params):
                compiled_update(self, params, settings)  # optlib.fast
            else:
                for param in params:
                    self._step_tensor(param, param.grad, self.state[param], settings)
            for param in params:
                if not self.state[param]:  # no empty entries, as in torch
                    del self.state[param]
        return loss
