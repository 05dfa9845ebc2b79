"""The speed benchmark: its traffic model, and a tiny run of every implementation."""

import pytest
import torch

import optlib
from optlib.bench import speed


def _stepped(cls, dtype=torch.float32, **kwargs):
    param = torch.zeros(3, 2, dtype=dtype, requires_grad=True)
    param.grad = torch.ones_like(param)
    opt = cls([param], **kwargs)
    opt.step()
    return opt


@pytest.mark.parametrize(
    "cls, kwargs, tensors",
    [
        # parameter read and written, gradient read: 3; each state tensor read and written: 2
        (optlib.SGD, dict(lr=0.1), 3),
        (optlib.SGD, dict(lr=0.1, momentum=0.9), 5),
        (optlib.Adagrad, {}, 5),
        (optlib.RMSprop, {}, 5),
        (optlib.RMSprop, dict(momentum=0.9, centered=True), 9),
        (optlib.Adam, {}, 7),
        (optlib.Adam, dict(amsgrad=True), 9),
        (optlib.AdamW, {}, 7),
        (torch.optim.Adam, dict(fused=True), 7),  # the step counter is not counted
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bytes_per_parameter(cls, kwargs, tensors, dtype):
    opt = _stepped(cls, dtype, **kwargs)
    assert speed.bytes_per_parameter(opt) == tensors * (4 if dtype == torch.float32 else 8)


def test_a_small_run_times_every_implementation():
    timings, bandwidth = speed.run(["Adam", "RMSprop"], scale=64, devices=["cpu"], progress=False)
    assert bandwidth["cpu"] > 0
    labels = {(t.optimizer, t.case, t.implementation) for t in timings}
    for case in speed.CASES:
        for label in ("torch", "torch foreach", "torch fused", "optlib", "optlib fast"):
            assert ("Adam", case, label) in labels
        assert ("RMSprop", case, "torch fused") not in labels  # torch has none
        assert ("RMSprop", case, "optlib fast") in labels
    for t in timings:
        assert t.seconds_per_step > 0 and t.bandwidth_floor_seconds > 0
        assert (t.compile_seconds is not None) == (t.implementation == "optlib fast")
    fused = next(t for t in timings if t.implementation == "torch fused" and t.case == "few large")
    assert fused.peak_extra_bytes < 4096  # a fused kernel allocates no temporaries
    lines = speed.table(timings).splitlines()
    assert len(lines) == len(timings) + 1 and "ms/step" in lines[0]


def test_every_optimizer_of_optlib_is_benchmarked():
    assert set(speed.OPTIMIZERS) == {n for n in optlib.__all__ if n[0].isupper()} - {"Optimizer"}
    assert {n for n in torch.optim.__all__ if n[0].isupper()} - {"Optimizer"} <= set(speed.OPTIMIZERS)


def test_the_optimizers_torch_lacks_are_timed_against_their_packages():
    names = ["Lion", "SGDScheduleFree", "Prodigy"]
    timings, _ = speed.run(names, cases=["many small"], scale=64, devices=["cpu"], progress=False)
    labels = {(t.optimizer, t.implementation) for t in timings}
    assert labels == {
        ("Lion", "lion-pytorch"), ("Lion", "optlib"), ("Lion", "optlib fast"),
        ("SGDScheduleFree", "schedulefree"), ("SGDScheduleFree", "schedulefree foreach"),
        ("SGDScheduleFree", "optlib"), ("SGDScheduleFree", "optlib fast"),
        ("Prodigy", "prodigyopt"), ("Prodigy", "optlib"),
    }  # fmt: skip
    rows = speed.table(timings).splitlines()[1:]
    assert all(("n/a" in row) == row.startswith("Prodigy") for row in rows)


def test_the_optimizers_with_special_parameters_are_timed():
    # Muon on the matrices of a case, SparseAdam on sparse rows, L-BFGS with a closure; none has
    # a foreach or fused variant in torch, so none has optlib's fast path either.
    names = ["Muon", "SparseAdam", "LBFGS", "Adadelta"]
    timings, _ = speed.run(names, cases=["many small"], scale=64, devices=["cpu"], progress=False)
    labels = {(t.optimizer, t.implementation) for t in timings}
    assert labels == {(n, i) for n in names[:3] for i in ("torch", "optlib")} | {
        ("Adadelta", i) for i in ("torch", "torch foreach", "optlib", "optlib fast")
    }
    muon = next(t for t in timings if t.optimizer == "Muon")
    assert muon.tensors == len(speed.CASES["many small"](64)) // 2  # the matrices only
    # The bytes model is for element-wise updates: the table gives no floor or bytes for these.
    for line in speed.table(timings).splitlines()[1:]:
        special = line.split()[0] in speed.NOT_ONE_PASS
        assert ("n/a" in line) == special, line
