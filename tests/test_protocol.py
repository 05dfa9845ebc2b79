"""The book's protocol for comparing optimizers (optlib.bench.protocol)."""
import math

import pytest
import torch

import optlib
from optlib import bench
from optlib.bench import protocol


def _small_digits():
    data = bench.digits()
    return bench.Dataset(data.x_train[:400], data.y_train[:400], data.x_test[:200], data.y_test[:200])


def test_validation_split_holds_out_part_of_training_and_never_the_test_set():
    data = _small_digits()
    split = protocol.validation_split(data, fraction=0.25)
    assert len(split.x_train) == 300 and len(split.x_test) == 100
    rows = {tuple(r.tolist()) for r in data.x_train}
    assert all(tuple(r.tolist()) in rows for r in split.x_test)  # validation comes from training
    assert torch.equal(split.x_test, protocol.validation_split(data, fraction=0.25).x_test)


def test_divergence_rule():
    history = bench.History(epoch_train_loss=[1.0, 0.5, 2.5])
    assert protocol.diverged(history)  # above DIVERGENCE_FACTOR times the start
    assert not protocol.diverged(bench.History(epoch_train_loss=[1.0, 1.5]))
    assert protocol.diverged(bench.History(epoch_train_loss=[1.0, math.nan]))
    assert protocol.diverged(bench.History(epoch_train_loss=[1.0], diverged=True))


def test_tune_chooses_on_validation_and_reports_test_for_every_seed():
    data = _small_digits()
    tuning = protocol.tune(
        "SGD", lambda ps, lr: optlib.SGD(ps, lr=lr), [0.01, 0.3, 1e3], data,
        lambda seed: bench.mlp([64, 10], seed=seed), seeds=(0, 1), epochs=2,
    )
    assert tuning.seeds == [0, 1]
    assert all(r.diverged for r in tuning.runs[1e3])
    val = {lr: tuning.mean_val_loss(lr) for lr in tuning.runs}
    assert tuning.lr == min(val, key=val.get) == 0.3
    assert tuning.margin == pytest.approx((val[0.01] - val[0.3]) / val[0.3])
    # Test results are those of the chosen rate's models, one per seed.
    for run, loss in zip(tuning.chosen_runs(), tuning.test["loss"]):
        assert loss == bench.evaluate(run.model, data.x_test, data.y_test)[0]
    assert len(tuning.test["accuracy"]) == 2
    assert "<- chosen" in tuning.table() and "diverged (2 of 2 seeds)" in tuning.table()
    assert tuning.summary().startswith("SGD: lr 0.3 (runner-up")
    assert "better on" in protocol.paired(tuning, tuning)


def test_a_tuning_that_evaluates_only_at_the_ends_chooses_the_same():
    data = _small_digits()
    tunings = [
        protocol.tune(
            "SGD", lambda ps, lr: optlib.SGD(ps, lr=lr), [0.01, 0.3, 3.0, 1e3], data,
            lambda seed: bench.mlp([64, 10], seed=seed), seeds=(0, 1), epochs=3, every_epoch=every_epoch,
        )
        for every_epoch in (True, False)
    ]
    every, ends = tunings
    assert ends.table() == every.table() and ends.test == every.test
    for lr in every.runs:
        for a, b in zip(every.runs[lr], ends.runs[lr]):
            assert (b.val_loss, b.diverged) == (a.val_loss, a.diverged)
            assert b.history.train_loss == a.history.train_loss
            if not a.history.diverged:
                assert len(a.history.epoch_train_loss) == 4 and len(b.history.epoch_train_loss) == 2
                assert b.history.epoch_train_loss == a.history.epoch_train_loss[::3]
                assert b.history.test_loss == a.history.test_loss[::3]


def test_every_rate_diverging_is_an_error():
    data = _small_digits()
    with pytest.raises(ValueError, match="every learning rate diverged"):
        protocol.tune(
            "SGD", lambda ps, lr: optlib.SGD(ps, lr=lr), [1e3], data,
            lambda seed: bench.mlp([64, 10], seed=seed), seeds=(0,), epochs=1,
        )
