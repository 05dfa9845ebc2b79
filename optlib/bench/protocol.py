"""The book's one protocol for comparing optimizers on a training task.

Every chapter that ranks optimizers or picks a learning rate does it through :func:`tune`, so the
rule is the same everywhere:

1. The training split is divided once, from a fixed seed, into a part to fit on and a
   **validation** part (:func:`validation_split`). The test split is not looked at while choosing.
2. Each learning rate of a grid is trained on the fit part with several **seeds** (the seed draws
   the initial weights and the batch order). A run **diverges** if its loss becomes non-finite or
   its final training loss is above ``DIVERGENCE_FACTOR`` times its initial one; a rate with a
   diverged seed is out.
3. The chosen rate is the one with the lowest **mean final validation loss** over the seeds.
4. The **test** loss and accuracy are reported once, for the chosen rate, for every seed, so a
   reader sees their spread; a claim that one optimizer beats another compares them seed by seed.

Everything printed by :class:`Tuning` is rounded to what the numerics control, and the choice
reports its **margin** (how far the runner-up's mean is from the best): a choice with a small
margin is a tie, not a ranking.
"""
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from optlib.bench.data import Dataset
from optlib.bench.train import History, evaluate, train

DIVERGENCE_FACTOR = 2.0
"""A run whose final training loss exceeds its initial loss by this factor has diverged."""

SEEDS = (0, 1, 2)


def validation_split(data: Dataset, *, fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The training split divided in two: a Dataset whose train part is what the optimizer fits on
    and whose test part is the **validation** set; the real test set is not in it."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.x_train), generator=generator).to(data.x_train.device)
    n_val = round(fraction * len(order))
    val, fit = order[:n_val], order[n_val:]
    return Dataset(data.x_train[fit], data.y_train[fit], data.x_train[val], data.y_train[val])


def diverged(history: History) -> bool:
    """Non-finite on the way, or the final training loss far above the initial one."""
    start, end = history.epoch_train_loss[0], history.epoch_train_loss[-1]
    return history.diverged or not math.isfinite(end) or end > DIVERGENCE_FACTOR * start


@dataclass
class Run:
    """One seed at one rate: its history, trained on the fit part, and the loss on validation."""

    seed: int
    history: History
    val_loss: float
    diverged: bool
    model: nn.Module = field(repr=False)


@dataclass
class Tuning:
    """A learning-rate grid trained over seeds, and the rate it chose on validation."""

    name: str
    seeds: list[int]
    runs: dict[float, list[Run]]  # rate -> one Run per seed, in the order of `seeds`
    test: dict[str, list[float]]  # "loss" (and "accuracy") at the chosen rate, one per seed

    def mean_val_loss(self, lr: float) -> float:
        runs = self.runs[lr]
        return math.inf if any(r.diverged for r in runs) else sum(r.val_loss for r in runs) / len(runs)

    @property
    def lr(self) -> float:
        """The chosen rate: lowest mean validation loss; none if every rate diverged."""
        best = min(self.runs, key=self.mean_val_loss)
        if math.isinf(self.mean_val_loss(best)):
            raise ValueError(f"{self.name}: every learning rate diverged")
        return best

    @property
    def margin(self) -> float:
        """How much higher the runner-up's mean validation loss is than the chosen one's, relative."""
        losses = sorted(self.mean_val_loss(lr) for lr in self.runs)
        return (losses[1] - losses[0]) / losses[0] if len(losses) > 1 else math.inf

    def table(self) -> str:
        """The grid: mean (min to max) validation loss per rate, the chosen rate marked."""
        lines = [f"{self.name}: lr, validation loss mean (min to max over {len(self.seeds)} seeds)"]
        for lr, runs in self.runs.items():
            mark = "  <- chosen" if lr == self.lr else ""
            if any(r.diverged for r in runs):
                count = sum(r.diverged for r in runs)
                lines.append(f"  {lr:<8g} diverged ({count} of {len(runs)} seeds){mark}")
                continue
            losses = [r.val_loss for r in runs]
            lines.append(
                f"  {lr:<8g} {self.mean_val_loss(lr):.2g} ({min(losses):.2g} to {max(losses):.2g}){mark}"
            )
        return "\n".join(lines)

    def chosen_runs(self) -> list[Run]:
        return self.runs[self.lr]

    def summary(self) -> str:
        """The chosen rate, its margin, and the test results at that rate (mean, min to max)."""
        line = f"{self.name}: lr {self.lr:g} (runner-up {self.margin:.1%} worse on validation)"
        for key, values in self.test.items():
            line += f", test {key} {_spread(values)}"
        return line


def _spread(values: Sequence[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.3g} ({min(values):.3g} to {max(values):.3g})"


def paired(a: Tuning, b: Tuning, key: str = "loss") -> str:
    """Test results of two tunings on the same seeds, compared seed by seed: b minus a per seed,
    and on how many seeds a is better (lower loss, higher accuracy)."""
    if a.seeds != b.seeds:
        raise ValueError(f"paired comparison needs the same seeds, got {a.seeds} and {b.seeds}")
    differences = [y - x for x, y in zip(a.test[key], b.test[key])]
    a_better = sum(d > 0 if key == "loss" else d < 0 for d in differences)
    shown = ", ".join(f"{d:+.2g}" for d in differences)
    return f"test {key}, {b.name} minus {a.name} per seed: {shown}; {a.name} better on {a_better} of {len(differences)}"


def run(
    make_optimizer: Callable[[list, float], torch.optim.Optimizer],
    lr: float,
    split: Dataset,
    make_model: Callable[[int], nn.Module],
    seed: int,
    **train_options,
) -> Run:
    """One seed at one rate, as :func:`tune` runs it: trained on ``split``'s train part (the fit part
    of :func:`validation_split`), scored on its test part (the validation part)."""
    model = make_model(seed)
    history = train(model, make_optimizer(list(model.parameters()), lr), split, seed=seed, **train_options)
    bad = diverged(history)
    return Run(seed, history, math.inf if bad else history.test_loss[-1], bad, model)


def tune(
    name: str,
    make_optimizer: Callable[[list, float], torch.optim.Optimizer],
    rates: Sequence[float],
    data: Dataset,
    make_model: Callable[[int], nn.Module],
    *,
    seeds: Sequence[int] = SEEDS,
    epochs: int = 10,
    batch_size: int = 64,
    split_seed: int = 0,
    every_epoch: bool = True,
) -> Tuning:
    """Train ``make_optimizer(params, lr)`` for each rate and seed on the fit part of
    ``validation_split(data)``, choose the rate on validation, and evaluate the chosen rate's
    models once on ``data``'s test split. ``make_model(seed)`` builds the network for a seed.
    ``every_epoch=False``: the runs' histories hold the losses before and after training only
    (see :func:`train`); the choice is the same, in less time."""
    split = validation_split(data, seed=split_seed)
    runs = {
        lr: [run(make_optimizer, lr, split, make_model, seed, epochs=epochs, batch_size=batch_size,
                 every_epoch=every_epoch) for seed in seeds]
        for lr in rates
    }
    tuning = Tuning(name, list(seeds), runs, {})
    results = [evaluate(r.model, data.x_test, data.y_test) for r in tuning.chosen_runs()]
    tuning.test["loss"] = [loss for loss, _ in results]
    if results[0][1] is not None:
        tuning.test["accuracy"] = [accuracy for _, accuracy in results]
    return tuning
