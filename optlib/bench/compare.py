"""Step an optlib optimizer and its reference side by side on identical gradients.

Used twice: by the unit tests (float64, strict tolerances) and by the chapters, which print a
one-line verdict that is the same on every machine. Works for any ``torch.optim.Optimizer``:
the state is compared key by key, whatever the keys are.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Shapes = Sequence[Sequence[int]]
Factory = Callable[[list[Tensor]], torch.optim.Optimizer]

DEFAULT_SHAPES: Shapes = ((4, 3), (3,), (1,))


def fixed_gradients(
    shapes: Shapes, steps: int, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> list[list[Tensor]]:
    """Reproducible gradients: ``grads[step][i]`` has shape ``shapes[i]``, on the CPU.

    Every step and every tensor gets fresh normal values. The first entry of every tensor and
    about a quarter of the others are scaled down to ~1e-8 at every step, so that eps-type terms
    (Adam's, RMSprop's ...) matter in the update instead of vanishing next to the gradient.
    """
    gen = torch.Generator().manual_seed(seed)
    tiny = []
    for shape in shapes:
        mask = torch.rand(shape, generator=gen) < 0.25
        mask.view(-1)[:1] = True
        tiny.append(mask)
    grads = []
    for _ in range(steps):
        step = []
        for shape, mask in zip(shapes, tiny):
            g = torch.randn(shape, generator=gen, dtype=dtype)
            step.append(torch.where(mask, g * 1e-8, g))
        grads.append(step)
    return grads


@dataclass
class SideBySide:
    """What :func:`run_side_by_side` measured, the largest over all entries and all steps:
    absolute differences, and differences in ulps of the tensor's scale (see :func:`_max_ulps`)."""

    max_param_diff: float
    max_state_diff: float
    state_keys_match: bool
    state_types_match: bool  # every state tensor has the same dtype and device type in both
    steps: int
    device: str
    dtype: torch.dtype
    max_ulps: float = 0.0  # parameters and state together

    def agrees(self, tolerance: float) -> bool:
        return (
            self.state_keys_match
            and self.state_types_match
            and self.max_param_diff < tolerance
            and self.max_state_diff < tolerance
        )

    @property
    def identical(self) -> bool:
        """Bit for bit: every parameter and state entry equal after every step."""
        return self.agrees(math.inf) and self.max_param_diff == 0 and self.max_state_diff == 0

    def within_ulps(self, ulps: float) -> bool:
        return self.agrees(math.inf) and self.max_ulps <= ulps


def _max_abs_diff(a, b) -> float:
    """Largest |a - b| between two state values (tensors or numbers); inf if incomparable.

    A number and a one-element tensor compare by value (torch keeps Adam's ``step`` as a
    tensor, a from-scratch version may keep an int). NaN or inf in the same place in both
    counts as agreement; anywhere else as an infinite difference.
    """
    if isinstance(a, list) and isinstance(b, list):  # one matrix per dimension (SOAP), [] for none
        if len(a) != len(b):
            return math.inf
        return max((_max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0)
    if not isinstance(a, (Tensor, int, float)) or not isinstance(b, (Tensor, int, float)):
        return 0.0 if a == b else math.inf
    a, b = (torch.as_tensor(x).detach().cpu() for x in (a, b))
    # A complex tensor compares as its real and imaginary parts (a cast would drop the latter).
    a, b = (torch.view_as_real(x) if x.is_complex() else x for x in (a, b))
    a, b = a.to(torch.float64), b.to(torch.float64)
    if a.numel() == 1 and b.numel() == 1:
        a, b = a.reshape(()), b.reshape(())
    if a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    same = (a == b) | (a.isnan() & b.isnan())
    diff = torch.where(same, 0.0, (a - b).abs()).nan_to_num(nan=math.inf)
    return diff.max().item()


def _max_ulps(a, b) -> float:
    """Largest |a - b| in units of the last place of the tensor's scale: |a - b| / (eps * s),
    where eps is the machine epsilon of b's dtype and s is the largest |b| in the tensor.

    Measuring against the tensor's scale rather than each entry keeps the measure meaningful for
    entries that pass through zero, and for state whose entries span many orders of magnitude
    (a tiny gradient's second moment next to a large one's): a kernel that rounds differently is
    off by a few ulps of the scale, a different formula by thousands. Numbers (a step count kept
    as an int) must be equal; a difference there is infinite.
    """
    absolute = _max_abs_diff(a, b)
    if absolute == 0 or math.isinf(absolute):
        return absolute
    if isinstance(a, list):
        return max(_max_ulps(x, y) for x, y in zip(a, b))
    if not isinstance(b, Tensor) or not b.is_floating_point() and not b.is_complex():
        return math.inf
    real = torch.view_as_real(b) if b.is_complex() else b
    scale = real.detach().abs().nan_to_num(posinf=0.0).max().item()
    finfo = torch.finfo(real.dtype)
    return absolute / (finfo.eps * max(scale, finfo.tiny))


def _type(value) -> tuple:
    """What a checkpoint needs to match besides the values: dtype and device of a tensor."""
    if isinstance(value, Tensor):
        return (value.dtype, value.device.type)
    if isinstance(value, list):
        return tuple(_type(v) for v in value)
    return (type(value),)


def run_side_by_side(
    make_ours: Factory,
    make_theirs: Factory,
    *,
    steps: int = 60,
    shapes: Shapes = DEFAULT_SHAPES,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> SideBySide:
    """Build two identical parameter lists, one optimizer on each, step both ``steps`` times,
    and return the largest differences in parameters and state seen after any step.

    ``make_ours`` and ``make_theirs`` take the list of parameters and return an optimizer
    (build parameter groups from the list if you need them). Parameters and gradients are
    drawn on the CPU from ``seed`` and then moved to ``device``; each side gets its own copy
    of every gradient, so an optimizer that modified ``p.grad`` could not affect the other.
    """
    gen = torch.Generator().manual_seed(seed)
    start = [torch.randn(shape, generator=gen, dtype=dtype) for shape in shapes]
    ours = [t.clone().to(device).requires_grad_() for t in start]
    theirs = [t.clone().to(device).requires_grad_() for t in start]
    opt_ours, opt_theirs = make_ours(ours), make_theirs(theirs)

    # Compare after every step, not only the last: a difference that appears and later decays
    # (a state entry that is reset, say) is still a difference.
    max_param_diff, max_state_diff, state_keys_match, state_types_match = 0.0, 0.0, True, True
    max_ulps = 0.0
    for grads in fixed_gradients(shapes, steps, seed=seed + 1, dtype=dtype):
        for p, q, g in zip(ours, theirs, grads):
            p.grad = g.to(device)
            q.grad = g.to(device).clone()
        opt_ours.step()
        opt_theirs.step()
        for p, q in zip(ours, theirs):
            max_param_diff = max(max_param_diff, _max_abs_diff(p, q))
            max_ulps = max(max_ulps, _max_ulps(p, q))
            state_ours, state_theirs = opt_ours.state.get(p, {}), opt_theirs.state.get(q, {})
            state_keys_match &= set(state_ours) == set(state_theirs)
            for key in set(state_ours) & set(state_theirs):
                diff = _max_abs_diff(state_ours[key], state_theirs[key])
                max_state_diff = max(max_state_diff, diff)
                max_ulps = max(max_ulps, _max_ulps(state_ours[key], state_theirs[key]))
                state_types_match &= _type(state_ours[key]) == _type(state_theirs[key])
    return SideBySide(
        max_param_diff,
        max_state_diff,
        state_keys_match,
        state_types_match,
        steps,
        str(device),
        dtype,
        max_ulps,
    )


def compare_with_torch(
    make_ours: Factory,
    make_theirs: Factory,
    *,
    steps: int = 100,
    ulps: float = 64,
    shapes: Shapes = DEFAULT_SHAPES,
    seed: int = 0,
    reference: str = "torch.optim",
) -> list[SideBySide]:
    """Run :func:`run_side_by_side` in float32 on every available device; print a verdict per device.

    On the CPU optlib's loop and torch's single-tensor loop do the same float operations in the
    same order, so the verdict there is "bit-identical". Elsewhere (torch's foreach kernels on CUDA,
    which fuse and reorder) the check is that no parameter or state entry differs by more than
    ``ulps`` units in the last place of its tensor's scale (see :func:`_max_ulps`): a few ulps is
    rounding, a wrong formula is thousands. A failed check prints only the order of magnitude of
    the largest difference, whose digits would move with the machine's last bits. The CPU line is
    the same on every machine; a GPU adds a line of its own.
    ``reference`` names what ``make_theirs`` builds, for the verdict (``"lion-pytorch"`` for an
    optimizer that torch.optim lacks). Returns the results, one per device, for a closer look.
    """
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    for device in devices:
        result = run_side_by_side(
            make_ours,
            make_theirs,
            steps=steps,
            shapes=shapes,
            dtype=torch.float32,
            device=device,
            seed=seed,
        )
        results.append(result)
        print(verdict(result, ulps, reference))
    return results


def verdict(result: SideBySide, ulps: float = 64, reference: str = "torch.optim") -> str:
    """One line, short enough for the book's output boxes, that says how close the two were."""
    where = f"{result.device}, {result.steps} steps"
    if result.identical:
        return f"{where}: bit-identical to {reference} (parameters and state)"
    if not result.state_keys_match or not result.state_types_match:
        return f"{where}: state keys or dtypes differ from {reference}: False"
    if result.max_ulps <= ulps:
        return f"{where}: within {ulps:g} ulps of {reference}: True"
    if math.isinf(result.max_ulps):  # a step count or another integer differs
        return f"{where}: within {ulps:g} ulps of {reference}: False (counts differ)"
    # Only the order of magnitude of a failure: its digits move with the machine's last bits.
    magnitude = 10.0 ** math.floor(math.log10(result.max_ulps))
    return f"{where}: within {ulps:g} ulps of {reference}: False (more than {magnitude:.0e} ulps)"
