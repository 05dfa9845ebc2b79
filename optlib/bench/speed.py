"""How fast is an optimizer step? Step times of torch.optim and optlib, side by side.

Run it as ``python -m optlib.bench.speed`` (``--help`` for the options). For each optimizer it
times one step of torch's default, ``foreach`` and ``fused`` implementations (where torch has
them) and of optlib's default loop and fast path, on few large tensors and on many small ones,
on every available device. Next to each time it puts

- the memory traffic of a step: every parameter and gradient is read, every parameter written,
  and every state tensor read and written once, so a step moves at least
  (3 + 2 x state tensors) x bytes per element for each parameter;
- the bandwidth floor: that traffic divided by the bandwidth this machine measures for an
  in-place add on tensors as large as the benchmark's (``measure_bandwidth``);
- the peak memory a step allocates beyond the tensors it updates (temporaries);
- for the fast path, the time its first steps spend compiling (after a warm-up that pays
  torch.compile's start-up, once per process, which is printed separately).

The table goes to the terminal, and all numbers to a JSON file with ``--json``.
"""

import argparse
import dataclasses
import functools
import importlib
import inspect
import json
import os
import platform
import statistics
import time

import torch
from tqdm.auto import tqdm

import optlib

# The CPU memory profiler behind peak_extra_bytes logs every start and stop to the terminal
# (and into notebooks) unless told not to, before its first use.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

__all__ = [
    "CASES",
    "OPTIMIZERS",
    "Timing",
    "available_devices",
    "bytes_per_parameter",
    "measure_bandwidth",
    "run",
    "table",
    "warm_up",
]

# name: (settings used for every implementation, the flag that selects optlib's fast path; None
# where torch has neither foreach nor fused, and optlib, whose signatures are torch's, no flag)
OPTIMIZERS = {
    "SGD": (dict(lr=0.01, momentum=0.9), "fused"),
    "Adagrad": (dict(lr=0.01), "fused"),
    "RMSprop": (dict(lr=0.01), "foreach"),  # torch.optim.RMSprop has no fused argument
    "Adam": (dict(lr=1e-3), "fused"),
    "AdamW": (dict(lr=1e-3, weight_decay=0.01), "fused"),
    "Adadelta": (dict(lr=1.0), "foreach"),
    "Adamax": (dict(lr=2e-3), "foreach"),
    "NAdam": (dict(lr=2e-3), "foreach"),
    "RAdam": (dict(lr=1e-3), "foreach"),
    "Rprop": (dict(lr=0.01), "foreach"),
    "ASGD": (dict(lr=0.01), "foreach"),
    "Adafactor": (dict(lr=0.01), "foreach"),
    "Muon": (dict(lr=0.02), None),
    "SparseAdam": (dict(lr=1e-3), None),
    "LBFGS": (dict(lr=1.0, max_iter=1, history_size=10), None),
    "Lion": (dict(lr=1e-4), "use_triton"),
    "SGDScheduleFree": (dict(lr=1.0), "foreach"),
    "AdamWScheduleFree": (dict(lr=2.5e-3), "foreach"),
    "Prodigy": (dict(lr=1.0), None),
    "AdEMAMix": (dict(lr=1e-3), "foreach"),
    "Lamb": (dict(lr=1e-3), None),
    "LARS": (dict(lr=1e-3), None),
    "SOAP": (dict(lr=3e-3), None),
    "Shampoo": (dict(lr=1e-3), None),
    "AdamW8bit": (dict(lr=1e-3), None),
}
# The optimizers that torch.optim lacks, timed against the package optlib's twin follows
# (module, label in the table); the others against torch.optim.
REFERENCE_PACKAGES = {
    "Lion": ("lion_pytorch", "lion-pytorch"),
    "SGDScheduleFree": ("schedulefree", "schedulefree"),
    "AdamWScheduleFree": ("schedulefree", "schedulefree"),
    "Prodigy": ("prodigyopt", "prodigyopt"),
    "AdEMAMix": ("pytorch_optimizer", "pytorch-optimizer"),
    "Lamb": ("pytorch_optimizer", "pytorch-optimizer"),
    "LARS": ("pytorch_optimizer", "pytorch-optimizer"),
    "SOAP": ("pytorch_optimizer", "pytorch-optimizer"),
    "Shampoo": ("pytorch_optimizer", "pytorch-optimizer"),
    "AdamW8bit": ("bitsandbytes.optim", "bitsandbytes"),
}
# The optimizers that need other parameters or gradients than the rest: Muon takes matrices
# only (the other tensors of a case are left out), SparseAdam sparse gradients (one row in 8 of
# each tensor), and L-BFGS a closure (the gradient of a quadratic, computed without autograd).
SPECIAL_PARAMETERS = {"Muon": "matrices", "SparseAdam": "sparse rows", "LBFGS": "closure"}
# Where the bytes model of `bytes_per_parameter` (one pass over parameter, gradient and state of
# the parameter's shape) does not describe a step: those three, Prodigy, which passes over
# the tensors twice and keeps flattened statistics, LAMB and LARS, which read each tensor once
# more for its norm before they update it, and SOAP and Shampoo, whose matrix products, roots and
# eigenbases cost far more than the memory traffic (an m × n matrix: O(mn(m + n)) per step), and
# 8-bit AdamW, whose state is one byte per number and a scale per block, dequantized and
# quantized again in passes of their own (and tensors below 4096 numbers keep 32-bit moments).
NOT_ONE_PASS = {*SPECIAL_PARAMETERS, "Prodigy", "Lamb", "LARS", "SOAP", "Shampoo", "AdamW8bit"}

# Shapes of the parameters: a few large matrices, and many small tensors (the weights and biases
# of a deep network of narrow layers). ``scale`` divides the sizes, for a quick run.
CASES = {
    "few large": lambda scale: [(4096 // scale, 1024)] * 4,
    "many small": lambda scale: [(64, 64), (64,)] * (400 // scale),
}


@dataclasses.dataclass
class Timing:
    """One implementation of one optimizer on one case and device."""

    optimizer: str
    case: str
    device: str
    implementation: str  # "torch", "torch foreach", "torch fused", "optlib", "optlib fast"
    seconds_per_step: float
    parameters: int
    tensors: int
    bytes_per_parameter: int
    bandwidth_floor_seconds: float  # the traffic at the measured bandwidth
    peak_extra_bytes: int  # allocated during a step beyond the tensors it updates
    # The fast path's first two steps less two ordinary ones, in a process that has compiled
    # before (see warm_up); other variants of the same update compile faster.
    compile_seconds: float | None = None

    @property
    def fraction_of_floor(self) -> float:
        return self.bandwidth_floor_seconds / self.seconds_per_step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _seconds(fn, device: str, repeats: int = 5, number: int = 10) -> float:
    """Median over ``repeats`` of the mean time of ``number`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(number):
            fn()
        _sync(device)
        times.append((time.perf_counter() - start) / number)
    return statistics.median(times)


def measure_bandwidth(elements: int, device: str, dtype=torch.float32):
    """Bytes per second that torch's in-place add, ``a.add_(b)``, moves on
    tensors of ``elements`` numbers: it reads two tensors and writes one in
    place, the traffic of a plain SGD step, with one addition per element. A
    step that moved its bytes at this rate and did no slower arithmetic would
    sit at the floor."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(elements, generator=gen, dtype=dtype).to(device)
            for _ in range(2))
    seconds = _seconds(lambda: a.add_(b), device)
    return 3 * a.element_size() * elements / seconds


def _peak_extra_bytes(step, device: str) -> int:
    """The most memory allocated at any moment of ``step()`` beyond what was allocated before."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def bytes_per_parameter(optimizer: torch.optim.Optimizer) -> int:
    """The least memory traffic of one step, per parameter, for an optimizer
    that has stepped: read the parameter and its gradient, write the
    parameter, read and write each state tensor of the parameter's shape
    (moments, sums, buffers; not the step counter)."""
    param = optimizer.param_groups[0]["params"][0]
    state = optimizer.state.get(param, {})
    state_tensors = sum(
        1
        for k, v in state.items()
        if k != "step" and torch.is_tensor(v) and v.shape == param.shape
    )
    return (3 + 2 * state_tensors) * param.element_size()


def _implementations(name: str, fast_flag: str | None) -> dict:
    """The reference's implementations (torch.optim's, or the package's for an optimizer torch
    lacks: its default loop first, then its foreach and fused variants), then optlib's."""
    module, label = REFERENCE_PACKAGES.get(name, ("torch.optim", "torch"))
    reference, optlib_cls = getattr(importlib.import_module(module), name), getattr(optlib, name)
    flags = inspect.signature(reference).parameters
    implementations = {label: (reference, dict(foreach=False) if "foreach" in flags else {})}
    if "foreach" in flags:
        implementations[f"{label} foreach"] = (reference, dict(foreach=True))
    if "fused" in flags:
        implementations[f"{label} fused"] = (reference, dict(fused=True))
    implementations["optlib"] = (optlib_cls, {})
    if fast_flag is not None:
        implementations["optlib fast"] = (optlib_cls, {fast_flag: True})
    return implementations


def _parameters(shapes, device: str, kind: str = "dense"):
    """Parameters of the given shapes with gradients; see SPECIAL_PARAMETERS for the kinds."""
    if kind == "matrices":
        shapes = [s for s in shapes if len(s) == 2]
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
        if kind == "sparse rows":  # the rows a batch of an embedding would touch
            p.grad[torch.arange(len(p)) % 8 != 0] = 0
            p.grad = p.grad.to_sparse(1)
    return params


def _time_one(name, cls, flags, settings, shapes, device, bandwidth) -> dict | None:
    kind = SPECIAL_PARAMETERS.get(name, "dense")
    params = _parameters(shapes, device, kind)
    try:
        opt = cls(params, **settings, **flags)
        if hasattr(opt, "train"):  # Schedule-Free steps only in train mode
            opt.train()
        step = opt.step
        if kind == "closure":  # L-BFGS evaluates the objective itself: ½ Σ θ²
            def closure():
                for p in params:
                    p.grad = p.detach().clone()
                return sum(0.5 * p.detach().pow(2).sum() for p in params)

            step = functools.partial(opt.step, closure)
        start = time.perf_counter()
        step()
        step()
        _sync(device)
        first_two = time.perf_counter() - start
    except RuntimeError:  # an implementation torch lacks on this device (fused Adagrad on CUDA)
        return None
    seconds = _seconds(step, device)
    count = sum(p.numel() for p in params)
    traffic = bytes_per_parameter(opt)
    return dict(
        seconds_per_step=seconds,
        parameters=count,
        tensors=len(params),
        bytes_per_parameter=traffic,
        bandwidth_floor_seconds=traffic * count / bandwidth,
        peak_extra_bytes=_peak_extra_bytes(step, device),
        compile_seconds=max(first_two - 2 * seconds, 0.0),
    )


def warm_up() -> float:
    """Seconds that the first compiled step of this process takes: torch.compile's start-up
    (importing its compiler, a first C++ or Triton build), paid once per process, so that it is
    not counted in the first optimizer's compile time."""
    param = torch.zeros(8, requires_grad=True)
    param.grad = torch.ones(8)
    start = time.perf_counter()
    optlib.SGD([param], lr=0.1, fused=True).step()
    return time.perf_counter() - start


def available_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def run(
    optimizers=tuple(OPTIMIZERS), cases=tuple(CASES), devices=None, scale: int = 1, progress=True
) -> tuple[list[Timing], dict]:
    """Time every implementation of every optimizer on every case and device. Returns the
    timings and the measured bandwidth of each device (bytes per second)."""
    devices = devices or available_devices()
    warm_up()
    largest = max(sum(torch.Size(s).numel() for s in CASES[c](scale)) for c in cases)
    bandwidth = {d: measure_bandwidth(largest, d) for d in devices}
    jobs = [
        (name, case, device, label, cls, flags)
        for device in devices
        for case in cases
        for name in optimizers
        for label, (cls, flags) in _implementations(name, OPTIMIZERS[name][1]).items()
    ]
    timings = []
    for name, case, device, label, cls, flags in tqdm(jobs, disable=not progress, desc="steps"):
        measured = _time_one(
            name, cls, flags, OPTIMIZERS[name][0], CASES[case](scale), device, bandwidth[device]
        )
        if measured is not None:
            if not label.endswith("fast"):
                measured["compile_seconds"] = None
            timings.append(Timing(name, case, device, label, **measured))
    return timings, bandwidth


def table(timings: list[Timing]) -> str:
    """The timings as a text table, one row per optimizer, case, device and implementation,
    with each time relative to the reference's default implementation (``vs torch``:
    torch.optim's, or for an optimizer torch lacks its package's, see REFERENCE_PACKAGES) and to
    the reference's fastest variant (``vs best``)."""
    rows = [
        f"{'optimizer':10} {'case':10} {'device':6} {'implementation':14} {'ms/step':>8} "
        f"{'vs torch':>8} {'vs best':>7} {'floor':>5} {'B/param':>7} {'extra MB':>8} {'compile s':>9}"
    ]
    for t in timings:
        same = [u for u in timings if (u.optimizer, u.case, u.device) == (t.optimizer, t.case, t.device)]
        references = [u for u in same if not u.implementation.startswith("optlib")]
        torch_default = references[0].seconds_per_step  # the reference's default loop
        torch_best = min(u.seconds_per_step for u in references)
        compile_s = "" if t.compile_seconds is None else f"{t.compile_seconds:.1f}"
        if t.optimizer in NOT_ONE_PASS:  # the bytes model does not apply
            floor, bytes_per_parameter = "n/a", "n/a"
        else:
            floor, bytes_per_parameter = f"{t.fraction_of_floor:.2f}", f"{t.bytes_per_parameter:d}"
        rows.append(
            f"{t.optimizer:10} {t.case:10} {t.device:6} {t.implementation:14} "
            f"{1e3 * t.seconds_per_step:8.2f} {t.seconds_per_step / torch_default:8.2f} "
            f"{t.seconds_per_step / torch_best:7.2f} {floor:>5} "
            f"{bytes_per_parameter:>7} {t.peak_extra_bytes / 2**20:8.1f} {compile_s:>9}"
        )
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated")
    parser.add_argument("--devices", default=",".join(available_devices()), help="comma-separated")
    parser.add_argument("--scale", type=int, default=1, help="divide the sizes, for a quick run")
    parser.add_argument("--json", help="write every number to this file")
    args = parser.parse_args(argv)
    startup = warm_up()
    timings, bandwidth = run(
        args.optimizers.split(","), args.cases.split(","), args.devices.split(","), args.scale
    )
    print(f"torch.compile start-up in this process (first compiled step): {startup:.1f} s")
    for device, rate in bandwidth.items():
        print(f"{device}: measured bandwidth {rate / 1e9:.1f} GB/s")
    print("floor: the bandwidth floor as a fraction of the step time (1 = at the floor)")
    print(table(timings))
    if args.json:
        record = dict(
            torch=torch.__version__,
            machine=platform.processor() or platform.machine(),
            threads=torch.get_num_threads(),
            bandwidth_bytes_per_second=bandwidth,
            compile_startup_seconds=startup,
            timings=[dataclasses.asdict(t) for t in timings],
        )
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
