"""The optimizer study behind the chapter "Choosing an optimizer".

Seven optimizers (SGD, Momentum, Nesterov, Adagrad, RMSprop, Adam, AdamW) on four tasks that differ in
kind: a noisy ill-conditioned quadratic, the digits network, logistic regression on sparse rare
features, and a small character-level transformer language model. For each task and optimizer:

1. a learning-rate sweep on a logarithmic grid, one run per rate with the tuning seed, scored on the
   task's **validation** split (the test split is never evaluated during the sweep);
2. the rate with the lowest validation loss, run again with several fresh seeds and scored on the
   **test** split: mean and spread;
3. loss curves of those runs against steps and against wall-clock seconds, the range of rates that
   came within `GOOD` of the task's best validation loss, and the memory that the optimizer's state
   takes per parameter, measured from ``optimizer.state``.

Run it with ``python -m optlib.bench.study`` (``make study``): it writes ``RESULTS``, the file
``optlib/bench/results/study.json`` that is committed and installed with the kit (so the chapter
runs wherever optlib[bench] is installed, Colab included). The results file holds `config()`, the configuration that produced it; ``tests/test_study.py`` checks that the
stored configuration is the one in this file, so that the file cannot silently go stale.

Everything is seeded, and the study runs on the CPU with one thread. The quadratic, digits and
rare-feature tasks compute in float64, where a change in the last bit (another CPU, another thread
count) stays far below the printed digits, so the chapter can re-run any of their rows and get the
stored numbers within a stated tolerance; the language model computes in float32 for speed. Wall-clock times are measured and stored, but they differ from run to run.
"""
import argparse
import json
import math
import pathlib
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import optlib
from optlib.bench import lm
from optlib.bench.data import digits, rare_features
from optlib.bench.train import mlp

# name -> (optlib class name, arguments other than lr). Everything else is PyTorch's default.
OPTIMIZERS = {
    "SGD": ("SGD", {}),
    "Momentum": ("SGD", {"momentum": 0.9}),
    "Nesterov": ("SGD", {"momentum": 0.9, "nesterov": True}),
    "Adagrad": ("Adagrad", {}),
    "RMSprop": ("RMSprop", {}),
    "Adam": ("Adam", {}),
    "AdamW": ("AdamW", {}),  # weight_decay=0.01, PyTorch's default
}
# The stored results: written by `make study`, read by the chapter and checked by tests/test_study.py.
RESULTS = pathlib.Path(__file__).parent / "results" / "study.json"
TUNING_SEED = 0  # the seed of every sweep run
SEEDS = (1, 2, 3)  # the seeds of the runs at the chosen rate
GOOD = 0.1  # a rate is "good" if its validation loss is within 10% of the task's best
CURVE_POINTS = 25  # loss curves are stored as means over this many equal chunks of steps
# Time per step is measured apart from the runs, round-robin over the optimizers, so that a burst of
# load on a shared machine slows all of them alike: TIMING_STEPS steps, TIMING_REPEATS times, fastest.
TIMING_STEPS, TIMING_REPEATS = 20, 5


def grid(low: float, points: int) -> list[float]:
    """`points` rates from `low` up on the grid 1, 3, 10, 30, ... times a power of ten
    (low must be on it): factors of about 3, written exactly as 1e-3, 3e-3, 0.01, ..."""
    first = math.floor(math.log10(low))
    rates = sorted(float(f"{m}e{e}") for e in range(first, first + points) for m in (1, 3))
    rates = [rate for rate in rates if rate >= low]
    if rates[0] != low:
        raise ValueError(f"low must be 1 or 3 times a power of ten, got {low}")
    return rates[:points]


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    class_name, kwargs = OPTIMIZERS[name]
    return getattr(optlib, class_name)(params, lr=lr, **kwargs)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors in the optimizer's state (buffers and step counters)."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, Tensor)
    )


def parameter_count(optimizer: torch.optim.Optimizer) -> int:
    return sum(p.numel() for group in optimizer.param_groups for p in group["params"])


# ----------------------------------------------------------------------------------------------
# Tasks. Each one makes its data once (from a fixed seed), a model from a run's seed, minibatches
# from a generator seeded by the run's seed, and evaluates a model on "val" or "test".


def _split_off(x: Tensor, y: Tensor, fraction: float, seed: int = 0):
    """Split (x, y) into (rest, held-out) with a fixed permutation: held-out is `fraction` of it."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_held = round(fraction * len(x))
    held, rest = order[:n_held], order[n_held:]
    return (x[rest], y[rest]), (x[held], y[held])


@dataclass
class Task:
    """A task of the study. Subclasses fill in the data, the model and the loss."""

    name: str
    description: str
    steps: int
    batch_size: int
    grids: dict  # optimizer name -> learning rates
    _data: dict | None = field(default=None, repr=False)

    def config(self) -> dict:
        return {
            "description": self.description,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "grids": self.grids,
            **self.settings(),
        }

    def settings(self) -> dict:
        return {}

    @property
    def data(self) -> dict:
        if self._data is None:
            self._data = self.make_data()
        return self._data

    def batches(self, seed: int):
        """Minibatches of the training split: a fresh shuffle each epoch, from `seed`."""
        x, y = self.data["train"]
        generator = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x) - self.batch_size + 1, self.batch_size):
                batch = order[start : start + self.batch_size]
                yield x[batch], y[batch]

    def loss(self, output: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(output, y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict:
        x, y = self.data[split]
        output = model(x)
        result = {"loss": self.loss(output, y).item()}
        if y.dtype == torch.long:
            result["accuracy"] = (output.argmax(-1) == y).double().mean().item()
        return result


class NoisyQuadratic(Task):
    """Least squares with inputs whose covariance has condition number `kappa`, in a random rotation:
    the loss is a quadratic with Hessian 2 Q diag(h) Q^T, the minibatch gradients are noisy, and the
    optimum is known: the weights w* that made the data, with expected loss noise**2."""

    dim, kappa, noise, sizes = 20, 1000.0, 0.5, (2000, 500, 500)

    def settings(self):
        return {"dim": self.dim, "kappa": self.kappa, "noise": self.noise, "sizes": list(self.sizes)}

    def make_data(self):
        generator = torch.Generator().manual_seed(0)
        d, n = self.dim, sum(self.sizes)
        h = self.kappa ** -torch.linspace(0, 1, d, dtype=torch.float64)  # eigenvalues 1 ... 1/kappa
        rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
        x = torch.randn(n, d, generator=generator, dtype=torch.float64) * h.sqrt() @ rotation.T
        w_star = torch.randn(d, 1, generator=generator, dtype=torch.float64)
        y = x @ w_star + self.noise * torch.randn(n, 1, generator=generator, dtype=torch.float64)
        a, b = self.sizes[0], self.sizes[0] + self.sizes[1]
        return {"train": (x[:a], y[:a]), "val": (x[a:b], y[a:b]), "test": (x[b:], y[b:]), "w_star": w_star}

    def model(self, seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return nn.Linear(self.dim, 1, bias=False).double()

    def loss(self, output, y):
        return F.mse_loss(output, y)


class Digits(Task):
    """scikit-learn's digits, the book's 64-32-10 ReLU network, in float64; a fifth of the training
    split is held out for validation."""

    def settings(self):
        return {"sizes": [64, 32, 10], "validation_fraction": 0.2}

    def make_data(self):
        data = digits(seed=0)
        train, val = _split_off(data.x_train.double(), data.y_train, 0.2)
        return {"train": train, "val": val, "test": (data.x_test.double(), data.y_test)}

    def model(self, seed):
        return mlp([64, 32, 10], seed=seed).double()


class RareFeatures(Task):
    """Logistic regression on the kit's rare_features data (10 frequent weak features, 90 rare strong
    ones), in float64; a fifth of the training split is held out for validation."""

    def settings(self):
        return {"data": "rare_features(seed=0)", "validation_fraction": 0.2}

    def make_data(self):
        data = rare_features(seed=0)
        train, val = _split_off(data.x_train.double(), data.y_train, 0.2)
        return {"train": train, "val": val, "test": (data.x_test.double(), data.y_test)}

    def model(self, seed):
        return mlp([100, 2], seed=seed).double()


class CharLM(Task):
    """A 2-layer transformer predicting the next character of standard-library Python source.
    The text is split in three consecutive blocks (80% train, 10% validation, 10% test); the loss is
    the cross-entropy in nats per character, on every non-overlapping window of the split."""

    context, width, layers, heads = 64, 64, 2, 4

    def settings(self):
        return {
            "context": self.context,
            "width": self.width,
            "layers": self.layers,
            "heads": self.heads,
            "files": list(lm.STDLIB_FILES),
            "split": [0.8, 0.1, 0.1],
            "dtype": "float32",
        }

    def make_data(self):
        text, record = lm.corpus()
        tokens = lm.encode(text)
        a, b = int(0.8 * len(tokens)), int(0.9 * len(tokens))
        return {"train": tokens[:a], "val": tokens[a:b], "test": tokens[b:], "text": record}

    def windows(self, tokens):
        n = (len(tokens) - 1) // self.context
        x = tokens[: n * self.context].view(n, self.context)
        y = tokens[1 : n * self.context + 1].view(n, self.context)
        return x, y

    def batches(self, seed):
        tokens = self.data["train"]
        generator = torch.Generator().manual_seed(seed)
        offsets = torch.arange(self.context)
        while True:
            starts = torch.randint(len(tokens) - self.context, (self.batch_size, 1), generator=generator)
            yield tokens[starts + offsets], tokens[starts + offsets + 1]  # (B, T) each

    def model(self, seed):
        return lm.char_transformer(
            context=self.context, width=self.width, layers=self.layers, heads=self.heads, seed=seed
        )

    def loss(self, output, y):
        return F.cross_entropy(output.flatten(0, 1), y.flatten())

    @torch.no_grad()
    def evaluate(self, model, split):
        x, y = self.windows(self.data[split])
        return {"loss": self.loss(model(x), y).item()}


SGD_LIKE = ("SGD", "Momentum", "Nesterov")
ADAPTIVE = ("RMSprop", "Adam", "AdamW")


def _grids(sgd_low: float, adagrad_low: float, adaptive_low: float, points: int) -> dict:
    lows = {**{n: sgd_low for n in SGD_LIKE}, "Adagrad": adagrad_low, **{n: adaptive_low for n in ADAPTIVE}}
    return {name: grid(lows[name], points) for name in OPTIMIZERS}


TASKS = {
    "quadratic": NoisyQuadratic(
        "quadratic", "noisy ill-conditioned quadratic (least squares, kappa = 1000)", 500, 10,
        _grids(1e-3, 1e-2, 1e-3, 7),
    ),
    "digits": Digits("digits", "digits, 64-32-10 ReLU network", 400, 32, _grids(3e-3, 3e-3, 3e-4, 7)),
    "rare": RareFeatures("rare", "sparse rare features, logistic regression", 400, 32, _grids(1e-2, 1e-2, 1e-3, 7)),
    "lm": CharLM("lm", "character-level transformer on Python source", 300, 16, _grids(1e-2, 1e-3, 3e-4, 6)),
}


def config() -> dict:
    """Everything that determines the results (besides the code): stored in the results file."""
    return {
        "optimizers": {name: {"class": c, **kwargs} for name, (c, kwargs) in OPTIMIZERS.items()},
        "tuning_seed": TUNING_SEED,
        "seeds": list(SEEDS),
        "good": GOOD,
        "curve_points": CURVE_POINTS,
        "timing_steps": TIMING_STEPS,
        "timing_repeats": TIMING_REPEATS,
        "tasks": {name: task.config() for name, task in TASKS.items()},
    }


# ----------------------------------------------------------------------------------------------
# Runs


def run(task: Task | str, optimizer: str, lr: float, seed: int, split: str) -> dict:
    """Train one model and score it on `split` ("val" for the sweep, "test" at the chosen rate).

    Returns the metrics on that split (None if the loss became inf or nan), the training-loss curve
    (the mean minibatch loss over each of CURVE_POINTS chunks of steps, with the step and the
    wall-clock seconds of training at the chunk's end) and the state memory per parameter."""
    task = TASKS[task] if isinstance(task, str) else task
    model = task.model(seed)
    opt = make_optimizer(optimizer, model.parameters(), lr)
    chunk = task.steps // CURVE_POINTS
    curve = {"step": [], "train_loss": [], "seconds": []}
    total, seconds, diverged = 0.0, 0.0, False
    batches = task.batches(seed)
    for step in range(1, task.steps + 1):
        x, y = next(batches)
        start = time.perf_counter()
        opt.zero_grad()
        loss = task.loss(model(x), y)
        loss.backward()
        opt.step()
        seconds += time.perf_counter() - start
        value = loss.item()
        if not math.isfinite(value):
            diverged = True
            break
        total += value
        if step % chunk == 0:
            curve["step"].append(step)
            curve["train_loss"].append(total / chunk)
            curve["seconds"].append(seconds)
            total = 0.0
    metrics = None if diverged else task.evaluate(model, split)
    return {
        "split": split,
        "metrics": metrics,
        "curve": curve,
        "state_bytes_per_parameter": state_bytes(opt) / parameter_count(opt),
        "parameter_bytes": next(model.parameters()).element_size(),
    }


def seconds_per_step(task: Task | str, rates: dict) -> dict:
    """Wall-clock seconds per training step for each optimizer in `rates` (name -> lr): the fastest of
    TIMING_REPEATS rounds of TIMING_STEPS steps, the optimizers taking turns within each round."""
    task = TASKS[task] if isinstance(task, str) else task
    setups = {}
    for name, lr in rates.items():
        model = task.model(TUNING_SEED)
        setups[name] = (model, make_optimizer(name, model.parameters(), lr), task.batches(TUNING_SEED))
    best = {name: math.inf for name in rates}
    for _ in range(TIMING_REPEATS):
        for name, (model, opt, batches) in setups.items():
            data = [next(batches) for _ in range(TIMING_STEPS)]
            start = time.perf_counter()
            for x, y in data:
                opt.zero_grad()
                task.loss(model(x), y).backward()
                opt.step()
            best[name] = min(best[name], (time.perf_counter() - start) / TIMING_STEPS)
    return best


def choose(sweep: dict) -> float:
    """The rate with the lowest validation loss; a run that diverged counts as infinitely bad."""
    return min(sweep, key=lambda lr: math.inf if sweep[lr] is None else sweep[lr])


def good_rates(sweep: dict, best: float) -> list[float]:
    """The rates whose validation loss is within GOOD of `best` (the task's best validation loss)."""
    return [lr for lr, loss in sweep.items() if loss is not None and loss <= (1 + GOOD) * best]


def study(tasks=None, optimizers=None, progress: bool = True) -> dict:
    """Run the study (or the part of it named by `tasks` and `optimizers`) and return the results."""
    tasks = list(tasks or TASKS)
    optimizers = list(optimizers or OPTIMIZERS)
    total = sum(len(TASKS[t].grids[o]) + len(SEEDS) for t in tasks for o in optimizers) + len(tasks)
    bar = tqdm(total=total, file=sys.stderr, ascii=True, disable=not progress, dynamic_ncols=True)
    results = {"config": config(), "tasks": {}}
    start = time.perf_counter()
    for task_name in tasks:
        task = TASKS[task_name]
        entry = results["tasks"][task_name] = {"optimizers": {}}
        if isinstance(task, CharLM):
            entry["text"] = task.data["text"]
        for name in optimizers:
            bar.set_description(f"{task_name} {name}")
            sweep = {}
            for lr in task.grids[name]:
                metrics = run(task, name, lr, TUNING_SEED, "val")["metrics"]
                sweep[lr] = None if metrics is None else metrics["loss"]
                bar.update()
            lr = choose(sweep)
            runs = {}
            for seed in SEEDS:
                runs[seed] = run(task, name, lr, seed, "test")
                bar.update()
            test_losses = [r["metrics"]["loss"] for r in runs.values() if r["metrics"] is not None]
            row = {
                "sweep": [[rate, loss] for rate, loss in sweep.items()],
                "chosen_lr": lr,
                "chosen_at_edge": lr in (task.grids[name][0], task.grids[name][-1]),
                "seeds": {str(s): r["metrics"] for s, r in runs.items()},
                "test_loss_mean": statistics.mean(test_losses) if test_losses else None,
                "test_loss_std": statistics.stdev(test_losses) if len(test_losses) > 1 else None,
                "curves": {str(s): r["curve"] for s, r in runs.items()},
                "state_bytes_per_parameter": runs[SEEDS[0]]["state_bytes_per_parameter"],
                "parameter_bytes": runs[SEEDS[0]]["parameter_bytes"],
            }
            if "accuracy" in (runs[SEEDS[0]]["metrics"] or {}):
                accuracies = [r["metrics"]["accuracy"] for r in runs.values() if r["metrics"] is not None]
                row["test_accuracy_mean"] = statistics.mean(accuracies)
            entry["optimizers"][name] = row
        # The good range needs the best validation loss over all optimizers of the task.
        best = min(
            loss for row in entry["optimizers"].values() for _, loss in row["sweep"] if loss is not None
        )
        entry["best_val_loss"] = best
        bar.set_description(f"{task_name} timing")
        rates = {name: row["chosen_lr"] for name, row in entry["optimizers"].items()}
        entry["seconds_per_step"] = seconds_per_step(task, rates)
        bar.update()
        for row in entry["optimizers"].values():
            good = good_rates(dict(map(tuple, row["sweep"])), best)
            row["good_lrs"] = good
            row["good_range_decades"] = math.log10(max(good) / min(good)) if good else None
    bar.close()
    results["seconds"] = time.perf_counter() - start
    results["environment"] = {
        "python": ".".join(map(str, sys.version_info[:3])),
        "torch": torch.__version__,
    }
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(RESULTS), help="where to write the results (JSON)")
    parser.add_argument("--tasks", nargs="*", choices=list(TASKS), help="only these tasks (a slice)")
    parser.add_argument("--optimizers", nargs="*", choices=list(OPTIMIZERS), help="only these optimizers")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small models run fastest on one thread, and the same on every machine
    results = study(args.tasks, args.optimizers)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out} in {results['seconds']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
