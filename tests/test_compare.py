"""The side-by-side kit (optlib.bench.compare): it measures what it claims and it can fail."""

import math

import pytest
import torch

import optlib
from optlib.bench.compare import _max_ulps, compare_with_torch, fixed_gradients, run_side_by_side

SHAPES = ((4, 3), (3,), (1,))


def test_fixed_gradients_shapes_dtype_and_reproducibility():
    grads = fixed_gradients(SHAPES, 5, seed=3, dtype=torch.float32)
    assert len(grads) == 5
    assert [tuple(g.shape) for g in grads[0]] == [tuple(s) for s in SHAPES]
    assert all(g.dtype == torch.float32 and g.device.type == "cpu" for s in grads for g in s)
    again = fixed_gradients(SHAPES, 5, seed=3, dtype=torch.float32)
    assert all(torch.equal(a, b) for s, t in zip(grads, again) for a, b in zip(s, t))
    other = fixed_gradients(SHAPES, 5, seed=4, dtype=torch.float32)
    assert not torch.equal(grads[0][0], other[0][0])


def test_fixed_gradients_differ_per_step_and_per_tensor_and_some_are_tiny():
    grads = fixed_gradients(((3, 3), (3, 3)), 4)
    assert not torch.equal(grads[0][0], grads[1][0])  # per step
    assert not torch.equal(grads[0][0], grads[0][1])  # per tensor
    for step in grads:
        for g in step:
            magnitudes = g.abs().flatten()
            assert magnitudes[0] < 1e-7  # the first entry of every tensor is tiny
            assert (magnitudes > 1e-3).any()  # and the others mostly are not


def _sgd(cls, **kwargs):
    return lambda params: cls(params, **kwargs)


def test_identical_optimizers_agree_exactly():
    result = run_side_by_side(
        _sgd(torch.optim.SGD, lr=0.1, momentum=0.9), _sgd(torch.optim.SGD, lr=0.1, momentum=0.9)
    )
    assert result.max_param_diff == 0 and result.max_state_diff == 0
    assert result.state_keys_match and result.agrees(1e-12)
    assert (result.steps, result.device, result.dtype) == (60, "cpu", torch.float64)


def test_a_different_lr_is_caught():
    result = run_side_by_side(_sgd(optlib.SGD, lr=0.1), _sgd(torch.optim.SGD, lr=0.11))
    assert result.max_param_diff > 1e-3
    assert not result.agrees(1e-6)


def test_a_different_dampening_is_caught_in_the_state():
    result = run_side_by_side(
        _sgd(torch.optim.SGD, lr=0.1, momentum=0.9, dampening=0.1),
        _sgd(torch.optim.SGD, lr=0.1, momentum=0.9),
        steps=2,  # dampening acts from step 2, on the buffer first
    )
    assert result.max_state_diff > 1e-3 and not result.agrees(1e-6)


def test_missing_state_keys_are_caught():
    result = run_side_by_side(_sgd(optlib.SGD, lr=0.1, momentum=0.9), _sgd(optlib.SGD, lr=0.1))
    assert not result.state_keys_match and not result.agrees(math.inf)


class _Counter(torch.optim.Optimizer):
    """Plain SGD that counts its steps, as a number or as a tensor (like torch's Adam)."""

    def __init__(self, params, step_as_tensor, lr=0.1, poison=False):
        super().__init__(params, dict(lr=lr))
        self.step_as_tensor, self.poison = step_as_tensor, poison

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                count = state.get("step", 0) + 1
                state["step"] = torch.tensor(float(count)) if self.step_as_tensor else count
                p.add_(p.grad, alpha=-group["lr"])
                if self.poison:
                    p.view(-1)[0] = float("nan")


def test_step_as_tensor_and_as_number_have_the_same_value_but_not_the_same_type():
    # The values agree, but a checkpoint would not move between the two: that is a mismatch.
    result = run_side_by_side(
        lambda ps: _Counter(ps, step_as_tensor=True), lambda ps: _Counter(ps, step_as_tensor=False)
    )
    assert result.state_keys_match and result.max_state_diff == 0
    assert not result.state_types_match and not result.agrees(1e-12)


def test_a_state_dtype_mismatch_is_caught():
    class Float64Buffer(torch.optim.SGD):  # same values, buffer kept in float64
        def step(self):
            super().step()
            for state in self.state.values():
                state["momentum_buffer"] = state["momentum_buffer"].double()

    result = run_side_by_side(
        _sgd(Float64Buffer, lr=0.1, momentum=0.9), _sgd(torch.optim.SGD, lr=0.1, momentum=0.9),
        dtype=torch.float32, steps=1,
    )
    assert result.max_state_diff == 0 and not result.state_types_match and not result.agrees(1)


def test_nan_is_a_failure_not_a_silent_pass():
    result = run_side_by_side(
        lambda ps: _Counter(ps, step_as_tensor=False, poison=True),
        lambda ps: _Counter(ps, step_as_tensor=False),
    )
    assert result.max_param_diff == math.inf and not result.agrees(1e-6)
    both = run_side_by_side(
        lambda ps: _Counter(ps, step_as_tensor=False, poison=True),
        lambda ps: _Counter(ps, step_as_tensor=False, poison=True),
    )
    assert both.max_param_diff == 0  # NaN in the same places in both: they agree


def test_compare_with_torch_says_bit_identical_on_the_cpu(capsys):
    results = compare_with_torch(
        _sgd(optlib.SGD, lr=0.1, momentum=0.9), _sgd(torch.optim.SGD, lr=0.1, momentum=0.9)
    )
    assert capsys.readouterr().out.splitlines()[0] == (
        "cpu, 100 steps: bit-identical to torch.optim (parameters and state)"
    )
    assert len(results) == 1 + torch.cuda.is_available()
    assert all(r.dtype == torch.float32 and r.steps == 100 for r in results)
    assert results[0].identical and results[0].max_ulps == 0


def test_compare_with_torch_reports_a_disagreement_in_ulps(capsys):
    [cpu, *_] = compare_with_torch(_sgd(optlib.SGD, lr=0.1), _sgd(torch.optim.SGD, lr=0.2), steps=10)
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("cpu, 10 steps: within 64 ulps of torch.optim: False (more than 1e+")
    assert not cpu.identical and cpu.max_ulps > 1e5
    assert line.endswith(f"(more than {10 ** math.floor(math.log10(cpu.max_ulps)):.0e} ulps)")


def test_ulps_are_measured_against_the_tensor_s_scale():
    # One ulp of the largest entry is one ulp, even where it lands on an entry near zero.
    b = torch.tensor([1.0, 1e-30, -0.5])
    a = b.clone()
    a[1] += torch.finfo(torch.float32).eps
    assert _max_ulps(a, b) == 1.0
    assert _max_ulps(b, b) == 0.0
    assert _max_ulps(3, 4) == math.inf  # a step count is compared exactly


def test_a_rounding_difference_is_within_a_few_ulps_and_a_wrong_eps_is_not():
    # A different but correct order of operations: torch's Adam against a copy that computes
    # the bias-corrected step as lr * m_hat / (sqrt(v_hat) + eps) instead of torch's grouping.
    close = run_side_by_side(
        lambda ps: optlib.Adam(ps, lr=0.01), lambda ps: _RegroupedAdam(ps, lr=0.01), dtype=torch.float32
    )
    assert 0 < close.max_ulps <= 64 and close.within_ulps(64)
    wrong = run_side_by_side(
        lambda ps: optlib.Adam(ps, lr=0.01, eps=1e-7), lambda ps: torch.optim.Adam(ps, lr=0.01),
        dtype=torch.float32,
    )
    assert wrong.max_ulps > 1e4 and not wrong.within_ulps(64)


class _RegroupedAdam(torch.optim.Optimizer):
    """Adam written with another grouping of the same arithmetic (same state keys as torch)."""

    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr, betas=(0.9, 0.999), eps=1e-8))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"].item()
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = state["exp_avg"] / (1 - beta1**t)
                v_hat = state["exp_avg_sq"] / (1 - beta2**t)
                p.sub_(group["lr"] * m_hat / (v_hat.sqrt() + group["eps"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_run_side_by_side_on_cuda():
    kwargs = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)
    result = run_side_by_side(
        _sgd(optlib.SGD, **kwargs), _sgd(torch.optim.SGD, **kwargs), device="cuda"
    )
    assert result.device == "cuda" and result.agrees(1e-12) and result.state_keys_match


def test_compare_with_torch_names_another_reference(capsys):
    import lion_pytorch

    compare_with_torch(
        lambda ps: optlib.Lion(ps, lr=0.01), lambda ps: lion_pytorch.Lion(ps, lr=0.01), steps=10,
        reference="lion-pytorch",
    )
    line = capsys.readouterr().out.splitlines()[0]
    assert line == "cpu, 10 steps: bit-identical to lion-pytorch (parameters and state)"
