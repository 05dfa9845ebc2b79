"""The transformer comparisons the chapters read (optlib.bench.lm_study) and their stored results."""
import json
import math

import pytest
import torch

from optlib.bench import lm, lm_study, schedules, validation_split
from optlib.bench.protocol import SEEDS


@pytest.fixture(scope="module")
def stored():
    return json.loads(lm_study.RESULTS.read_text())


def test_stored_results_were_made_with_this_configuration(stored):
    # If this fails, an arm, a protocol or the task changed after the file was written:
    # run `make lm-study` (or `.venv/bin/python -m optlib.bench.lm_study --protocols NAME`) and
    # commit the new file.
    assert list(stored["protocols"]) == list(lm_study.ARMS)
    for protocol, entry in stored["protocols"].items():
        assert entry["config"] == lm_study.config(protocol), protocol


def test_stored_results_cover_every_arm_rate_and_seed(stored):
    for protocol, arms in lm_study.ARMS.items():
        rows = stored["protocols"][protocol]["arms"]
        assert list(rows) == list(arms)
        for arm, spec in arms.items():
            assert [float(lr) for lr in rows[arm]["runs"]] == spec["rates"]
            assert all(len(runs) == len(SEEDS) for runs in rows[arm]["runs"].values())
            assert len(rows[arm]["test_loss"]) == len(SEEDS)


def test_loaded_tunings_choose_the_stored_rate_and_keep_the_curves(stored):
    for protocol, arms in lm_study.ARMS.items():
        for arm, tuning in lm_study.load(protocol, list(arms)).items():
            row = stored["protocols"][protocol]["arms"][arm]
            assert tuning.lr == row["chosen_lr"]
            assert tuning.test["loss"] == row["test_loss"]
            for run in tuning.chosen_runs():  # a run that did not diverge has every point
                assert len(run.curve) == lm_study.CURVE_POINTS
                assert math.isclose(run.curve[-1], run.curve[-1])  # not nan


def test_prodigy_arms_store_d_after_every_step(stored):
    tuning = lm_study.load("3 epochs", ["Prodigy"])["Prodigy"]
    assert [len(e) for e in tuning.estimates] == [lm_study.steps("3 epochs")] * len(SEEDS)
    assert "estimates" not in stored["protocols"]["3 epochs"]["arms"]["AdamW"]


def test_curve_is_the_mean_of_equal_chunks():
    losses = [float(i) for i in range(300)]
    curve = lm_study._curve(losses, 300)
    assert curve == [sum(losses[i * 25 : (i + 1) * 25]) / 25 for i in range(12)]
    assert lm_study._curve(losses[:100], 300) == curve[:4]  # a diverged run: its complete chunks


def test_steps_are_the_runs_number_of_steps():
    for protocol, options in lm_study.PROTOCOLS.items():
        fit = validation_split(lm.windows(count=options.get("windows", 1000))).x_train
        assert lm_study.steps(protocol) == options["epochs"] * math.ceil(len(fit) / options["batch_size"])
    assert lm_study.steps("1 pass") == lm_study.steps("6 epochs")  # as many steps, on data never repeated


def fake_arm(protocol, spec):
    """The optimizer of an arm added for the test, on one parameter whose gradient is all ones."""
    lm_study.ARMS[protocol]["test arm"] = spec
    try:
        param = torch.nn.Parameter(torch.ones(2))
        return param, lm_study.make_optimizer(protocol, "test arm")([param], spec["rates"][0])
    finally:
        del lm_study.ARMS[protocol]["test arm"]


def test_a_scheduled_arm_runs_its_schedule_over_the_whole_run():
    # AdamW with linear decay to zero after a warm-up of a tenth of the run, set for the protocol's
    # steps: its rate at every step must be the schedule's, i.e. the schedule saw exactly `steps` steps.
    protocol = "1 epoch"
    spec = {"optimizer": "AdamW", "options": {}, "rates": [0.01], "schedule": ("linear", {"warmup": 0.1})}
    param, optimizer = fake_arm(protocol, spec)
    total = lm_study.steps(protocol)
    multiplier = schedules.linear(total, warmup=round(0.1 * total))
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones(2)
        optimizer.step()
    assert rates == pytest.approx([0.01 * multiplier(t) for t in range(total)], rel=1e-12)
    assert rates[0] == pytest.approx(0.01 / 5) and rates[4] == pytest.approx(0.01)  # 5 steps of warm-up


@pytest.mark.parametrize("kind, threshold, expected", [("norm", 0.5, 0.5 / 2**0.5), ("value", 0.25, 0.25)])
def test_a_clipped_arm_clips_the_gradient_before_the_step(kind, threshold, expected):
    spec = {"optimizer": "SGD", "options": {}, "rates": [1.0], "clip": (kind, threshold)}
    param, optimizer = fake_arm("1 epoch", spec)
    param.grad = torch.ones(2)  # norm sqrt(2)
    optimizer.step()
    assert param.grad.tolist() == pytest.approx([expected, expected])
    assert param.tolist() == pytest.approx([1 - expected, 1 - expected])


@pytest.mark.numerics
def test_a_stored_run_is_reproduced(stored):
    # float32 over 50 steps: another CPU moves the loss in its last digits, far less than TOLERANCE;
    # a change of the code or the data moves it by more.
    tuning = lm_study.load("1 epoch", ["AdamW8bit"])["AdamW8bit"]
    again = lm_study.rerun("1 epoch", "AdamW8bit", tuning.lr, SEEDS[0])
    assert again == pytest.approx(tuning.runs[tuning.lr][0].val_loss, abs=lm_study.TOLERANCE)
