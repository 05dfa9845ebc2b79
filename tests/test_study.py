"""The optimizer study (optlib.bench.study) and its stored results (optlib/bench/results/study.json)."""
import json
import math

import pytest
import torch

from optlib.bench import lm, study

RESULTS = study.RESULTS


@pytest.fixture(scope="module")
def stored():
    return json.loads(RESULTS.read_text())


# The stored file ------------------------------------------------------------------------------


def test_stored_results_were_made_with_this_configuration(stored):
    # If this fails, the study's configuration changed after the results file was written:
    # run `make study` and commit the new file.
    assert stored["config"] == json.loads(json.dumps(study.config()))


def test_stored_results_cover_every_task_optimizer_rate_and_seed(stored):
    assert set(stored["tasks"]) == set(study.TASKS)
    for task_name, task in study.TASKS.items():
        rows = stored["tasks"][task_name]["optimizers"]
        assert set(rows) == set(study.OPTIMIZERS)
        for name, row in rows.items():
            assert [lr for lr, _ in row["sweep"]] == task.grids[name]
            assert set(row["seeds"]) == {str(s) for s in study.SEEDS}
            assert set(row["curves"]) == {str(s) for s in study.SEEDS}


def test_stored_rate_is_the_best_on_validation(stored):
    for entry in stored["tasks"].values():
        for row in entry["optimizers"].values():
            sweep = {lr: loss for lr, loss in row["sweep"]}
            assert row["chosen_lr"] == study.choose(sweep)
            assert row["good_lrs"] == study.good_rates(sweep, entry["best_val_loss"])


def test_stored_text_is_the_shipped_corpus(stored):
    assert lm.corpus()[1] == stored["tasks"]["lm"]["text"]


@pytest.mark.numerics
def test_a_stored_row_is_reproduced(stored):
    # Another CPU, thread count or torch rounds the last bits differently. The run is float64, but
    # its initial weights are drawn in float32 (nn.Linear's default) and cast: ATen's scalar
    # kernels (ATEN_CPU_CAPABILITY=default) draw 14 of these 20 weights a few float32 ulps apart
    # from its vector kernels, which moves the curve by 5e-9 relative (by 1e-15 under the other
    # kernels and thread counts). The tolerance leaves room for that, and a change of the code
    # moves these numbers by far more.
    row = stored["tasks"]["quadratic"]["optimizers"]["Momentum"]
    again = study.run("quadratic", "Momentum", row["chosen_lr"], study.SEEDS[0], "test")
    expected = row["seeds"][str(study.SEEDS[0])]
    assert again["metrics"] == pytest.approx(expected, rel=1e-7)
    curve = row["curves"][str(study.SEEDS[0])]["train_loss"]
    assert again["curve"]["train_loss"] == pytest.approx(curve, rel=1e-7)


@pytest.mark.parametrize("task_name", list(study.TASKS))
def test_stored_memory_is_what_the_state_holds(stored, task_name):
    task = study.TASKS[task_name]
    for name, row in stored["tasks"][task_name]["optimizers"].items():
        model = task.model(0)
        optimizer = study.make_optimizer(name, model.parameters(), 1e-3)
        x, y = next(task.batches(0))
        task.loss(model(x), y).backward()
        optimizer.step()
        assert row["state_bytes_per_parameter"] == study.state_bytes(optimizer) / study.parameter_count(optimizer)


# The pieces -----------------------------------------------------------------------------------

# Buffers of the parameter's shape that each optimizer keeps, and whether it counts steps.
BUFFERS = {
    "SGD": (0, False),
    "Momentum": (1, False),
    "Nesterov": (1, False),
    "Adagrad": (1, True),
    "RMSprop": (1, True),
    "Adam": (2, True),
    "AdamW": (2, True),
}


@pytest.mark.parametrize("name", list(study.OPTIMIZERS))
def test_memory_per_parameter_is_measured_from_the_state(name):
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3)).double()
    optimizer = study.make_optimizer(name, model.parameters(), 1e-2)
    model(torch.randn(4, 5, dtype=torch.float64)).sum().backward()
    optimizer.step()
    d, tensors = 5 * 7 + 7 + 7 * 3 + 3, 4
    buffers, counts_steps = BUFFERS[name]
    step_bytes = torch.tensor(0.0).element_size() if counts_steps else 0  # a float32 scalar per tensor
    expected = (buffers * 8 * d + tensors * step_bytes) / d
    assert study.state_bytes(optimizer) / study.parameter_count(optimizer) == expected
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


def test_choose_ignores_diverged_runs_and_takes_the_lowest_loss():
    assert study.choose({0.1: 0.5, 0.3: 0.2, 1.0: None}) == 0.3
    assert study.good_rates({0.1: 0.5, 0.3: 0.2, 1.0: None}, 0.2) == [0.3]
    assert study.good_rates({0.1: 0.21, 0.3: 0.2, 1.0: 0.23}, 0.2) == [0.1, 0.3]


def test_the_rate_is_chosen_on_validation_and_reported_on_test(monkeypatch):
    # A fake run whose validation loss is best at lr = 0.01 and whose test loss is best at 1.0:
    # the study must choose 0.01, must not evaluate the test split during the sweep, and must run
    # every seed at the chosen rate on the test split.
    calls = []

    def fake_run(task, optimizer, lr, seed, split):
        calls.append((lr, seed, split))
        loss = abs(math.log10(lr) + 2) if split == "val" else abs(math.log10(lr))
        return {
            "metrics": {"loss": loss},
            "curve": {"step": [], "train_loss": [], "seconds": []},
            "state_bytes_per_parameter": 0.0,
            "parameter_bytes": 8,
        }

    monkeypatch.setattr(study, "run", fake_run)
    results = study.study(["quadratic"], ["SGD"], progress=False)
    row = results["tasks"]["quadratic"]["optimizers"]["SGD"]
    assert row["chosen_lr"] == 0.01
    sweep_calls = calls[: len(study.TASKS["quadratic"].grids["SGD"])]
    assert all(split == "val" and seed == study.TUNING_SEED for _, seed, split in sweep_calls)
    assert calls[len(sweep_calls) :] == [(0.01, s, "test") for s in study.SEEDS]
    assert row["test_loss_mean"] == 2.0


def test_runs_are_seeded_and_report_divergence():
    a = study.run("digits", "Adam", 1e-3, 1, "val")
    b = study.run("digits", "Adam", 1e-3, 1, "val")
    assert a["metrics"] == b["metrics"] and a["curve"]["train_loss"] == b["curve"]["train_loss"]
    assert len(a["curve"]["step"]) == study.CURVE_POINTS
    assert study.run("quadratic", "SGD", 100.0, 0, "val")["metrics"] is None


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
