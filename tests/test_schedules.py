"""The kit's learning-rate schedules (optlib.bench.schedules) against torch.optim.lr_scheduler."""
import pytest
import torch

import optlib
from optlib.bench import schedules

TOTAL, WARMUP = 40, 5


def torch_rates(make_scheduler, steps=TOTAL):
    """The rate of every step, base rate 1, under a torch scheduler stepped after every step."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def kit_rates(multiplier, steps=TOTAL):
    return [multiplier(t) for t in range(steps)]


def test_cosine_is_torchs_cosine_annealing():
    expected = torch_rates(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=TOTAL))
    assert kit_rates(schedules.cosine(TOTAL)) == pytest.approx(expected, abs=1e-12)


def test_warmup_then_cosine_is_linear_lr_then_cosine_annealing_in_sequence():
    def sequence(o):
        warm = torch.optim.lr_scheduler.LinearLR(o, start_factor=1 / WARMUP, total_iters=WARMUP - 1)
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=TOTAL - WARMUP)
        return torch.optim.lr_scheduler.SequentialLR(o, [warm, decay], milestones=[WARMUP])

    assert kit_rates(schedules.cosine(TOTAL, warmup=WARMUP)) == pytest.approx(torch_rates(sequence), abs=1e-12)


def test_linear_decay_is_torchs_linear_lr_to_zero():
    expected = torch_rates(lambda o: torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.0, total_iters=TOTAL))
    assert kit_rates(schedules.linear(TOTAL)) == pytest.approx(expected, abs=1e-12)


def test_step_decay_is_torchs_multi_step_lr():
    expected = torch_rates(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[10, 30], gamma=0.1))
    assert kit_rates(schedules.step_decay([10, 30])) == pytest.approx(expected, rel=1e-12)


def test_warmup_starts_above_zero_and_reaches_one():
    for make in (schedules.constant, schedules.cosine, schedules.linear, schedules.wsd, schedules.inverse_sqrt):
        rates = kit_rates(make(TOTAL, warmup=WARMUP))
        assert rates[:WARMUP] == pytest.approx([(t + 1) / WARMUP for t in range(WARMUP)])
        assert max(rates) == pytest.approx(1.0)


def test_wsd_holds_then_decays_linearly_over_its_last_fraction():
    rates = kit_rates(schedules.wsd(TOTAL, warmup=WARMUP, decay=0.25))
    assert rates[WARMUP : TOTAL - 10] == [1.0] * (TOTAL - 10 - WARMUP)
    assert rates[TOTAL - 10 :] == pytest.approx([(10 - i) / 10 for i in range(10)])


def test_inverse_sqrt_halves_when_the_step_count_quadruples():
    multiplier = schedules.inverse_sqrt(warmup=WARMUP)
    assert multiplier(4 * WARMUP - 1) == pytest.approx(multiplier(WARMUP - 1) / 2)


def test_every_step_runs_the_schedule_on_an_optlib_optimizer():
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = optlib.AdamW([param], lr=0.1)
    schedules.every_step(optimizer, schedules.cosine(TOTAL, warmup=WARMUP))
    seen = []
    for _ in range(TOTAL):
        seen.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones(3)
        optimizer.step()
    assert seen == pytest.approx([0.1 * r for r in kit_rates(schedules.cosine(TOTAL, warmup=WARMUP))])
