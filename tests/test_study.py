"""The optimizer study (optlib.bench.study) and its stored results (optlib/bench/results/study.json)."""
import json
import math

import pytest
import torch

import optlib
from optlib.bench import lm, schedules, study

RESULTS = study.RESULTS


@pytest.fixture(scope="module")
def stored():
    return json.loads(RESULTS.read_text())


# The stored file ------------------------------------------------------------------------------


def test_stored_results_were_made_with_this_configuration(stored):
    # If this fails, the study's configuration changed after the results file was written:
    # run `make study` and commit the new file.
    assert stored["config"] == study.config()


def test_stored_results_cover_every_task_arm_setting_and_seed(stored):
    assert list(stored["tasks"]) == list(study.TASKS)
    for task_name, task in study.TASKS.items():
        rows = stored["tasks"][task_name]["arms"]
        assert list(rows) == [f"{name} | {arm}" for name, arm in study.arms(task)]
        for key, row in rows.items():
            name = key.split(" | ")[0]
            assert [(s["lr"], s["weight_decay"]) for s in row["sweep"]] == study.settings(task, name)
            assert all(len(s["val_losses"]) == len(study.TUNING_SEEDS) for s in row["sweep"])
            assert list(row["test"]) == [str(s) for s in study.TEST_SEEDS]
            assert all(len(c) == study.CURVE_POINTS for c in row["validation_curves"].values() if c)


def test_stored_choice_is_the_lowest_mean_validation_loss(stored):
    for entry in stored["tasks"].values():
        for row in entry["arms"].values():
            best = study.choose(row["sweep"])
            assert (row["chosen"]["lr"], row["chosen"]["weight_decay"]) == (best["lr"], best["weight_decay"])


def test_every_transformer_arm_was_timed(stored):
    timed = stored["tasks"]["lm"]["seconds_per_step"]
    assert list(timed) == list(stored["tasks"]["lm"]["arms"])
    assert all(seconds > 0 for seconds in timed.values())


@pytest.mark.numerics
def test_a_stored_row_is_reproduced(stored):
    # float64; another CPU, thread count or torch rounds the last bits differently, which moves
    # these numbers by far less than the tolerance, and a change of the code by far more.
    row = stored["tasks"]["quadratic"]["arms"]["Momentum | warm-up + cosine"]
    seed = study.TEST_SEEDS[0]
    again = study.run("quadratic", "Momentum", "warm-up + cosine", row["chosen"]["lr"], seed, "test",
                      row["chosen"]["weight_decay"], trace=True)
    assert again["metrics"] == pytest.approx(row["test"][str(seed)], rel=1e-7)
    assert again["curve"] == pytest.approx(row["curves"][str(seed)], rel=1e-7)
    assert again["validation"] == pytest.approx(row["validation_curves"][str(seed)], rel=1e-7)


@pytest.mark.parametrize("task_name", ["quadratic", "lm"])
def test_stored_memory_is_what_the_state_holds(stored, task_name):
    task = study.TASKS[task_name]
    for key, row in stored["tasks"][task_name]["arms"].items():
        name, arm = key.split(" | ")
        model = task.model(0)
        optimizer = study.make_optimizer(name, model, 1e-3, arm=arm, steps=task.steps)
        x, y = next(task.batches(0))
        task.loss(model(x), y).backward()
        optimizer.step()
        parameters = sum(p.numel() for p in model.parameters())
        assert row["state_bytes_per_parameter"] == study.state_bytes(optimizer) / parameters, key


# The pieces -----------------------------------------------------------------------------------

# Buffers of the parameter's shape that each classic optimizer keeps, and whether it counts steps.
BUFFERS = {
    "SGD": (0, False),
    "Momentum": (1, False),
    "Nesterov": (1, False),
    "Adagrad": (1, True),
    "RMSprop": (1, True),
    "Adam": (2, True),
    "AdamW": (2, True),
}


@pytest.mark.parametrize("name", list(BUFFERS))
def test_memory_per_parameter_is_measured_from_the_state(name):
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3)).double()
    optimizer = study.make_optimizer(name, model, 1e-2, arm="constant", steps=10)
    model(torch.randn(4, 5, dtype=torch.float64)).sum().backward()
    optimizer.step()
    d, tensors = 5 * 7 + 7 + 7 * 3 + 3, 4
    buffers, counts_steps = BUFFERS[name]
    step_bytes = torch.tensor(0.0).element_size() if counts_steps else 0  # a float32 scalar per tensor
    assert study.state_bytes(optimizer) == buffers * 8 * d + tensors * step_bytes
    # torch.optim's optimizer with the same settings holds exactly as many bytes.
    class_name, kwargs = study.OPTIMIZERS[name]
    twin = getattr(torch.optim, class_name)(model.parameters(), lr=1e-2, **kwargs)
    model(torch.randn(4, 5, dtype=torch.float64)).sum().backward()
    twin.step()
    assert study.state_bytes(twin) == study.state_bytes(optimizer)


def test_grid_has_factors_of_about_three():
    assert study.grid(1e-3, 7) == [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]
    assert study.grid(3e-4, 3) == [3e-4, 1e-3, 3e-3]
    with pytest.raises(ValueError):
        study.grid(2e-3, 3)


def test_weight_decay_is_tuned_for_adamw_and_lion_only():
    task = study.TASKS["digits"]
    assert study.settings(task, "AdamW") == [(lr, wd) for wd in (0.0, 0.1, 1.0) for lr in task.grids["AdamW"]]
    assert study.settings(task, "Adam") == [(lr, None) for lr in task.grids["Adam"]]


def test_choose_leaves_out_diverged_settings_and_takes_the_lowest_mean():
    sweep = [{"lr": 0.1, "weight_decay": None, "mean_val_loss": 0.5},
             {"lr": 0.3, "weight_decay": None, "mean_val_loss": 0.2},
             {"lr": 1.0, "weight_decay": None, "mean_val_loss": None}]
    assert study.choose(sweep)["lr"] == 0.3
    with pytest.raises(ValueError):
        study.choose(sweep[2:])


def test_excess_loss_is_the_fraction_of_the_gap_left():
    assert study.excess(2.0, start=4.0, best=1.0) == pytest.approx(1 / 3)
    assert study.excess(1.0, start=4.0, best=1.0) == 0.0
    assert study.excess(None, start=4.0, best=1.0) == math.inf


def test_the_setting_is_chosen_on_validation_and_reported_on_test(monkeypatch):
    # A fake run whose validation loss is best at lr = 0.01 and whose test loss is best at the grid's
    # top: the study must choose 0.01, must not evaluate the test split while tuning, and must run
    # every test seed at the chosen rate on the test split.
    calls = []

    def fake_run(task, name, arm, lr, seed, split, weight_decay=None, trace=False):
        calls.append((lr, seed, split))
        loss = abs(math.log10(lr) + 2) if split == "val" else abs(math.log10(lr))
        return {"metrics": {"loss": loss}, "curve": [], "validation": [], "state_bytes_per_parameter": 0.0}

    monkeypatch.setattr(study, "run", fake_run)
    row = study.tune_and_test("quadratic", "SGD", "constant")
    assert row["chosen"]["lr"] == 0.01
    grid = study.TASKS["quadratic"].grids["SGD"]
    tuning = calls[: len(grid) * len(study.TUNING_SEEDS)]
    assert all(split == "val" and seed in study.TUNING_SEEDS for _, seed, split in tuning)
    assert calls[len(tuning) :] == [(0.01, s, "test") for s in study.TEST_SEEDS]
    assert row["test"][str(study.TEST_SEEDS[0])]["loss"] == 2.0


def test_runs_are_seeded_and_report_divergence():
    a = study.run("digits", "Adam", "warm-up + cosine", 1e-3, 1, "val")
    b = study.run("digits", "Adam", "warm-up + cosine", 1e-3, 1, "val")
    assert a["metrics"] == b["metrics"] and a["curve"] == b["curve"]
    assert len(a["curve"]) == study.CURVE_POINTS
    assert study.run("quadratic", "SGD", "constant", 100.0, 0, "val")["metrics"] is None


def test_an_arm_runs_its_schedule_set_for_the_run():
    model = torch.nn.Linear(3, 1)
    optimizer = study.make_optimizer("Adam", model, 0.1, arm="warm-up + cosine", steps=50)
    multiplier = schedules.cosine(50, warmup=5)
    rates = []
    for _ in range(50):
        rates.append(optimizer.param_groups[0]["lr"])
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
    assert rates == pytest.approx([0.1 * multiplier(t) for t in range(50)])
    constant = study.make_optimizer("Adam", model, 0.1, arm="constant", steps=50)
    assert constant.param_groups[0]["lr"] == 0.1 and not constant._optimizer_step_post_hooks


def test_schedule_free_warms_up_over_a_tenth_and_is_scored_at_its_average():
    model = torch.nn.Linear(3, 1)
    optimizer = study.make_optimizer("SF-AdamW", model, 0.01, arm=study.SCHEDULE_FREE, steps=400)
    assert isinstance(optimizer, optlib.AdamWScheduleFree)
    assert optimizer.param_groups[0]["warmup_steps"] == 40
    task = study.TASKS["quadratic"]
    model = task.model(0)
    optimizer = study.make_optimizer("SF-AdamW", model, 0.01, arm=study.SCHEDULE_FREE, steps=10)
    for x, y in [next(task.batches(0)) for _ in range(10)]:
        optimizer.zero_grad()
        task.loss(model(x), y).backward()
        optimizer.step()
    optimizer.eval()
    at_x = task.evaluate(model, "val")
    optimizer.train()
    assert study._evaluate(task, model, optimizer, "val") == at_x != task.evaluate(model, "val")


def test_fast_path_is_turned_on_where_there_is_one():
    model = torch.nn.Linear(3, 1)
    for name, flag in study.FAST_PATH.items():
        arm = study.SCHEDULE_FREE if name == "SF-AdamW" else "constant"
        optimizer = study.make_optimizer(name, model, 0.01, arm=arm, steps=10, fast=True)
        settings = optimizer.defaults if flag == "foreach" else {"use_triton": optimizer.use_triton}
        assert settings[flag] is True, name


def test_text_record_and_vocabulary():
    text, record = lm.corpus()
    assert record["characters"] == len(text) > 100_000
    assert lm.decode(lm.encode("def f(x):\n    return x")) == "def f(x):\n    return x"
    assert lm.decode(lm.encode("é")) == "~"


def test_char_transformer_is_causal():
    model = lm.char_transformer(context=16, width=16, layers=1, heads=2, seed=0).double()
    tokens = torch.randint(len(lm.VOCABULARY), (2, 16), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % len(lm.VOCABULARY)  # change the future only
    before, after = model(tokens), model(changed)
    assert torch.equal(before[:, :10], after[:, :10])
    assert not torch.equal(before[:, 10:], after[:, 10:])
