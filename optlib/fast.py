"""The fast path: the optimizer's own ``_update``, compiled, on many tensors at once.

An optimizer step reads and writes every parameter and every state tensor and does a few
operations on each number, so its time goes to memory traffic and, for small tensors, to the
fixed cost of each operation. The readable loop pays both: every operation of the update is a
pass over memory, and every tensor pays that fixed cost once per operation. PyTorch answers with
two more copies of each optimizer's math (``foreach`` over lists of tensors, and ``fused``
kernels); optlib derives its fast path from the one update it has:

- **vertical fusion**: ``torch.compile`` turns the update's element-wise operations into one
  kernel that reads each input once and writes each output once;
- **horizontal fusion**: tensors are updated in buckets. A large contiguous tensor is its own
  bucket, seen as one flat vector (a view, no copy). Small tensors with the same dtype, device,
  state and step count are packed into one flat vector each step, updated by one kernel, and
  copied back: copying a small tensor costs less than the fixed cost of one more operation.
  An update that is not element-wise (``Optimizer.elementwise`` is False: Adafactor's norms,
  NAdam's and ASGD's 0-dim state) is compiled for each tensor alone, in its own shape.

The compiled function takes vectors of any length, the learning rate as a tensor and the step
count as an integer it reads at run time, so new tensor sizes, a scheduler changing the learning
rate, or the next step do not compile it again (the second step compiles once more, for any
step count). The other hyperparameters are compiled in as constants: a new value of ``betas`` or
``momentum`` compiles a new version. Compiling costs seconds on the first steps;
``python -m optlib.bench.speed`` measures it.

In float32 and float64 the results agree with the loop to rounding. In float16 and bfloat16 the
compiled kernel computes in float32 and rounds once, as torch's fused kernels do, while the loop
rounds every intermediate to the parameter's dtype: the two differ by more than a last digit
there (the loop's float16 Adam, whose eps of 1e-8 rounds to 0, can divide by zero).
"""

import functools

import torch
from torch import Tensor
from torch._utils import _unflatten_dense_tensors
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["compiled_update", "SMALL"]

# A tensor with fewer elements than this is packed with others; a larger one is updated where
# it lies, by a kernel of its own.
SMALL = 2**16


class _TensorScalars(TorchFunctionMode):
    """Lets ``x.add_(y, alpha=a)``, ``x.addcdiv_(y, z, value=a)`` and their kin take a tensor
    ``a``, as ``x.add_(y * a)``: the compiled kernel is the same, and the readable update keeps
    the one-pass forms it uses with numbers."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        for name in ("alpha", "value"):
            if isinstance(kwargs.get(name), Tensor):
                args = (args[0], args[1] * kwargs.pop(name), *args[2:])
        return func(*args, **kwargs)


def _update_bucket(update, param: Tensor, grad: Tensor, state: dict, settings: dict) -> None:
    with _TensorScalars():
        update(param, grad, state, settings)


# realize_opcount_threshold=0: the numbers computed from lr and t (Adam's bias corrections) get
# a buffer of their own, computed once per call; inlined into the element loop they would cost a
# pow() per 16 elements.
# dynamic=True: one compiled version for vectors of every length (and any step count).
# Built at the first compiled step, not at import: torch.compile imports the compiler, a second or
# more that a program which never takes the fast path (most of the book's notebooks) should not pay.
@functools.cache
def _compiler():
    return torch.compile(_update_bucket, dynamic=True, options={"realize_opcount_threshold": 0})


def _compiled_bucket(update, param: Tensor, grad: Tensor, state: dict, settings: dict) -> None:
    """``_update_bucket``, compiled."""
    _compiler()(update, param, grad, state, settings)
_COMPILE_OPTIONS = dict(
    # Floats other than lr are constants of the compiled code: torch 2.13 can specialize a
    # symbolic float without a guard, and then silently reuses a stale step size.
    specialize_float=True,
    # One version per optimizer class, dtype and set of options; past torch's default of 8,
    # a new variant would run the readable loop, uncompiled.
    recompile_limit=64,
    # A number read from a 0-dim state tensor (NAdam's product of momenta, ASGD's step size)
    # stays in the compiled graph instead of breaking it.
    capture_scalar_outputs=True,
)


def _scalar(value: float, like: Tensor) -> Tensor:
    """A number as a 0-dim tensor on ``like``'s device, in float64 for float64 (and complex128)
    tensors and in float32 otherwise, the precision the eager kernels compute in."""
    dtype = torch.float64 if like.dtype in (torch.float64, torch.complex128) else torch.float32
    return torch.as_tensor(value, dtype=dtype).to(like.device)


def compiled_update(optimizer, params: list[Tensor], settings: dict) -> None:
    """One step of ``optimizer._update`` for ``params`` (all with a gradient,
    all with their state created), on buckets of tensors, compiled."""
    states = [optimizer.state[p] for p in params]
    steps = [s["step"] for s in states if "step" in s]
    if steps:
        torch._foreach_add_(steps, 1)  # one call for all counters: t from 1
        if len({s.device for s in steps}) > 1:
            steps = [s.cpu() for s in steps]
        # one copy to the host for all counters, not one each
        step_values = iter(torch.stack(steps).tolist())

    buckets: dict = {}
    for param, state in zip(params, states):
        t = next(step_values) if "step" in state else None
        if param.grad.is_sparse:  # rows of an embedding: the readable update
            sparse_settings = {**settings, "step": t}
            optimizer._update(param, param.grad, state, sparse_settings)
            continue
        tensors = (param, param.grad, *state.values())
        contiguous = all(x.is_contiguous() for x in tensors)
        if not optimizer.elementwise:  # norms, matrix products, 0-dim state
            key = ("as it is", id(param))
        elif param.numel() >= SMALL and contiguous:
            key = ("flat", id(param))  # updated where it lies, alone
        else:
            key = ("packed", param.device, param.dtype, t, tuple(state))
        bucket = buckets.setdefault(key, ([], [], t))
        bucket[0].append(param)
        bucket[1].append(state)

    update = type(optimizer)._update
    with torch._dynamo.config.patch(**_COMPILE_OPTIONS):
        for key, (bucket, states, t) in buckets.items():
            bucket_settings = dict(settings)
            for name in ("lr", *optimizer.per_step_settings):
                bucket_settings[name] = _scalar(settings[name], bucket[0])
            if t is not None:  # an integer: a symbol, not a constant
                bucket_settings["step"] = int(t)
            if key[0] == "as it is":
                _step_as_it_is(update, bucket[0], states[0], bucket_settings)
            elif key[0] == "flat":
                _step_in_place(update, bucket[0], states[0], bucket_settings)
            else:
                _step_packed(update, bucket, states, bucket_settings)


def _at_least_1d(tensor: Tensor) -> Tensor:
    # torch 2.13 silently drops in-place writes to 0-dim (float64) tensors in
    # compiled code; a 1-element view of one is written.
    return tensor.view(1) if tensor.dim() == 0 else tensor


def _step_as_it_is(update, param: Tensor, state: dict, settings: dict):
    """One tensor in its own shape, with its state as it is."""
    views = {k: _at_least_1d(v) for k, v in state.items() if k != "step"}
    grad = _at_least_1d(param.grad)
    _compiled_bucket(update, _at_least_1d(param.detach()), grad, views, settings)


def _step_in_place(update, param: Tensor, state: dict, settings: dict):
    """One large tensor: flat views of it and of its state, so that the
    kernel writes where they lie."""
    flat_state = {k: v.view(-1) for k, v in state.items() if k != "step"}
    flat_param, flat_grad = param.detach().view(-1), param.grad.view(-1)
    _compiled_bucket(update, flat_param, flat_grad, flat_state, settings)
    # state made on this step (SGD's buffer)
    for k in flat_state.keys() - state.keys():
        state[k] = flat_state[k].view_as(param)


class _Pack:
    """Small tensors updated as one vector. Their parameters and gradients
    are copied into flat buffers each step (one ``_foreach_copy_`` each), and
    their state lives in flat buffers between steps: each state entry is a
    view into one. A state entry that is not such a view (a new optimizer, or
    one that loaded a state_dict) is copied in and replaced by the view."""

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self.param, self.param_views = self._buffer()
        self.grad, self.grad_views = self._buffer()
        self.state, self.state_views = {}, {}

    def _buffer(self) -> tuple[Tensor, list[Tensor]]:
        first = self.params[0]
        flat = first.new_empty(sum(p.numel() for p in self.params))
        return flat, _unflatten_dense_tensors(flat, self.params)

    def hold(self, states: list[dict], key: str, flat: Tensor | None = None):
        """Make every ``state[key]`` a view into this pack: of ``flat`` when
        the update has just made it, else of a new buffer that the present
        values are copied into."""
        views = self.state_views.get(key)
        if flat is None and views is not None:
            if all(s[key] is v for s, v in zip(states, views)):
                return
        if flat is None:
            flat, views = self._buffer()
            torch._foreach_copy_(views, [s[key] for s in states])
        else:
            views = _unflatten_dense_tensors(flat, self.params)
        self.state[key], self.state_views[key] = flat, views
        for state, view in zip(states, views):
            state[key] = view


# The packs of small tensors, each kept with the first parameter it holds (and
# dropped with it).
_PACKS = WeakIdKeyDictionary()


def _step_packed(update, params: list[Tensor], states: list[dict], settings):
    # the per-element state: moments, sums ...
    keys = tuple(k for k in states[0] if k != "step")
    identity = (keys, tuple(map(id, params)), tuple(p.shape for p in params))
    pack = _PACKS.get(params[0])
    if pack is None or pack[0] != identity:
        pack = _PACKS[params[0]] = (identity, _Pack(params))
    pack = pack[1]
    torch._foreach_copy_(pack.param_views, params)
    torch._foreach_copy_(pack.grad_views, [p.grad for p in params])
    for key in keys:
        pack.hold(states, key)
    flat_state = dict(pack.state)
    _compiled_bucket(update, pack.param, pack.grad, flat_state, settings)
    torch._foreach_copy_(params, pack.param_views)
    # state made on this step (SGD's buffer)
    for key in flat_state.keys() - pack.state.keys():
        pack.hold(states, key, flat_state[key])
