"""The optimizer study behind the chapter "Choosing an optimizer".

Thirteen optimizers on four tasks that differ in kind: a noisy ill-conditioned quadratic, the digits
network, logistic regression on sparse rare features, and the book's small character-level
transformer (the task of :mod:`optlib.bench.lm_study`). Every optimizer runs in two **arms**: with a
linear warm-up over the first tenth of the run and a cosine decay to zero set for the run's length
(the recipe of current practice), and at a constant rate (the old protocol, kept for contrast).
Schedule-Free AdamW runs once, with its own warm-up and no schedule: not needing one is its point.

For each task and arm:

1. **Tuning**: every rate of a logarithmic grid (and, for AdamW and Lion, every weight decay of
   :data:`WEIGHT_DECAYS`) is trained with each of the :data:`TUNING_SEEDS` and scored on the task's
   **validation** split; the setting with the lowest **mean** validation loss over those seeds is
   chosen. A setting with a diverged seed is out. The test split is never evaluated here.
2. **Testing**: the chosen setting is trained again with fresh :data:`TEST_SEEDS` and scored on the
   **test** split, with the validation loss recorded at :data:`CURVE_POINTS` points along the way
   (for the time to a target).

The results hold everything the chapter reports: per-seed test losses (for paired differences and
failure counts), the sweeps (for the range of good rates, judged by excess loss), the curves, the
memory the optimizer's state takes, and the seconds per step of the transformer with each optimizer's
fast path where it has one.

Run it with ``python -m optlib.bench.study`` (``make study``; about 20 minutes on 2 cores, which it
uses as two processes): it writes :data:`RESULTS`, which is committed and installed with the kit,
with the configuration that produced it; ``tests/test_study.py`` checks that the stored
configuration is this file's. Everything is seeded and runs on the CPU with one thread per process.
The quadratic, digits and rare-feature tasks compute in float64, so the chapter can re-run their
rows and get the stored numbers to many digits; the transformer computes in float32, and a re-run
lands within :data:`optlib.bench.lm_study.TOLERANCE`.
"""
import argparse
import concurrent.futures
import json
import math
import multiprocessing
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
from optlib.bench import lm, schedules
from optlib.bench.data import digits, rare_features
from optlib.bench.protocol import DIVERGENCE_FACTOR, validation_split
from optlib.bench.train import mlp, one_thread

# name -> (optlib class, or "MuonAndAdamW"; arguments other than lr). PyTorch's defaults otherwise.
OPTIMIZERS = {
    "SGD": ("SGD", {}),
    "Momentum": ("SGD", {"momentum": 0.9}),
    "Nesterov": ("SGD", {"momentum": 0.9, "nesterov": True}),
    "Adagrad": ("Adagrad", {}),
    "RMSprop": ("RMSprop", {}),
    "Adam": ("Adam", {}),
    "AdamW": ("AdamW", {}),  # weight decay tuned
    "NAdamW": ("NAdam", {"decoupled_weight_decay": True, "weight_decay": 0.01}),  # AlgoPerf's baseline
    "Lion": ("Lion", {}),  # weight decay tuned
    "SOAP": ("SOAP", {}),
    "AdEMAMix": ("AdEMAMix", {}),
    "SF-AdamW": ("AdamWScheduleFree", {}),
    "Muon + AdamW": ("MuonAndAdamW", {}),  # the transformer only: the other models have no hidden matrices
}
WEIGHT_DECAYS = {"AdamW": [0.0, 0.1, 1.0], "Lion": [0.0, 0.1, 1.0]}
"""Tuned together with the rate. PyTorch's AdamW and Lion shrink the weights by lr x weight_decay a
step, so at the rates they choose only decays of this size act within a few hundred steps."""
WARMUP = 0.1  # the warm-up of every scheduled arm, and Schedule-Free's, as a fraction of the run
ARMS = {"warm-up + cosine": ("cosine", {"warmup": WARMUP}), "constant": None}
SCHEDULE_FREE = "schedule-free"  # SF-AdamW's one arm
# The optimizers with a fast path (optlib's compiled update), and the argument that turns it on
FAST_PATH = {"SGD": "foreach", "Momentum": "foreach", "Nesterov": "foreach", "Adagrad": "foreach",
             "RMSprop": "foreach", "Adam": "foreach", "AdamW": "foreach", "NAdamW": "foreach",
             "Lion": "use_triton", "AdEMAMix": "foreach", "SF-AdamW": "foreach"}
RESULTS = pathlib.Path(__file__).parent / "results" / "study.json"
TUNING_SEEDS = (0, 1, 2)
TEST_SEEDS = (10, 11, 12, 13, 14)
CURVE_POINTS = 12  # training loss (chunk means) and validation loss are recorded at this many points
GOOD = 0.1
"""A setting is good if its mean validation loss closes all but this fraction of the gap between the
untrained model's loss and the task's best: its **excess loss** is at most GOOD."""
FAILED = 0.5
"""A test seed fails if its run diverged or its excess test loss is above this: it did not close
half of the gap."""
# Time per step on the transformer, measured apart from the runs, round-robin over the optimizers
# (a burst of load on a shared machine slows all of them alike): the fastest of TIMING_REPEATS
# rounds of TIMING_STEPS steps, after steps that compile the fast path.
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


def arms(task: "Task") -> list[tuple[str, str]]:
    """(optimizer, arm) pairs run on `task`."""
    return [(name, arm) for name in task.optimizers for arm in ([SCHEDULE_FREE] if name == "SF-AdamW" else ARMS)]


def settings(task: "Task", name: str) -> list[tuple[float, float | None]]:
    """The (rate, weight decay) pairs tuned: the task's grid, times WEIGHT_DECAYS where tuned."""
    return [(lr, wd) for wd in WEIGHT_DECAYS.get(name, [None]) for lr in task.grids[name]]


def make_optimizer(name: str, model: nn.Module, lr: float, *, arm: str, steps: int,
                   weight_decay: float | None = None, fast: bool = False):
    """The optimizer of an arm, with its schedule set for `steps` steps attached (it steps itself
    after every step), for the parameters of `model`. `fast` turns on the fast path where there is one."""
    class_name, kwargs = OPTIMIZERS[name]
    kwargs = dict(kwargs)
    if weight_decay is not None:
        kwargs["weight_decay"] = weight_decay
    if fast and name in FAST_PATH:
        kwargs[FAST_PATH[name]] = True
    if name == "SF-AdamW":
        kwargs["warmup_steps"] = round(WARMUP * steps)
    params = list(model.parameters())
    if class_name == "MuonAndAdamW":
        optimizer = lm.MuonAndAdamW(params, lr)
    else:
        optimizer = getattr(optlib, class_name)(params, lr=lr, **kwargs)
    if name == "SF-AdamW":
        optimizer.train()  # it starts in eval mode, as the reference does
    if ARMS.get(arm):
        schedule, options = ARMS[arm]
        multiplier = schedules.SCHEDULES[schedule](steps, warmup=round(options["warmup"] * steps))
        for each in getattr(optimizer, "optimizers", [optimizer]):
            schedules.every_step(each, multiplier)
    return optimizer


def state_bytes(optimizer) -> int:
    """Bytes held by the tensors in the optimizer's state (buffers and step counters; SOAP's lists of
    tensors included)."""
    optimizers = getattr(optimizer, "optimizers", [optimizer])
    tensors = [t for o in optimizers for state in o.state.values() for value in state.values()
               for t in (value if isinstance(value, list) else [value]) if isinstance(t, Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------------------------
# Tasks. Each one makes its data once (from a fixed seed), a model from a run's seed, minibatches
# from a generator seeded by the run's seed (a fresh shuffle every epoch), and evaluates a model on
# "val" or "test".


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
    lows: dict  # optimizer name -> the lowest rate of its grid
    points: int  # rates per grid
    _data: dict | None = field(default=None, repr=False)

    @property
    def optimizers(self) -> list[str]:
        return list(self.lows)

    @property
    def grids(self) -> dict:
        return {name: grid(low, self.points) for name, low in self.lows.items()}

    def config(self) -> dict:
        return {"description": self.description, "steps": self.steps, "batch_size": self.batch_size,
                "grids": self.grids, **self.settings()}

    def settings(self) -> dict:
        return {}

    @property
    def data(self) -> dict:
        if self._data is None:
            self._data = self.make_data()
        return self._data

    def batches(self, seed: int):
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
        if y.dtype == torch.long and output.dim() == 2:
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


class Transformer(Task):
    """The book's small transformer (lm.CharLM, float32) on lm.windows(): 800 windows to train on,
    200 for validation (bench.validation_split), 256 test windows from the held-out end of the text."""

    def settings(self):
        return {"model": "lm.CharLM", "data": "lm.windows()", "text": lm.corpus()[1], "dtype": "float32"}

    def make_data(self):
        windows = lm.windows()
        split = validation_split(windows)
        return {"train": (split.x_train, split.y_train), "val": (split.x_test, split.y_test),
                "test": (windows.x_test, windows.y_test)}

    def model(self, seed):
        return lm.CharLM(seed)


SGD_LIKE = ("SGD", "Momentum", "Nesterov")
ADAPTIVE = ("RMSprop", "Adam", "AdamW", "NAdamW", "SOAP", "AdEMAMix", "SF-AdamW")


def _lows(sgd: float, adagrad: float, adaptive: float, lion: float, muon: float | None = None) -> dict:
    lows = {**{n: sgd for n in SGD_LIKE}, "Adagrad": adagrad, **{n: adaptive for n in ADAPTIVE}, "Lion": lion}
    if muon is not None:
        lows["Muon + AdamW"] = muon
    return {name: lows[name] for name in OPTIMIZERS if name in lows}


TASKS = {
    "quadratic": NoisyQuadratic("quadratic", "noisy ill-conditioned quadratic (least squares, kappa = 1000)",
                                500, 10, _lows(3e-3, 3e-2, 1e-3, 1e-4), 6),
    "digits": Digits("digits", "digits, 64-32-10 ReLU network", 400, 32, _lows(1e-2, 1e-2, 1e-3, 1e-4), 6),
    "rare": RareFeatures("rare", "sparse rare features, logistic regression", 400, 32,
                         _lows(3e-2, 3e-2, 1e-3, 3e-4), 6),
    "lm": Transformer("lm", "character-level transformer on Python source", 300, 16,
                      _lows(3e-2, 3e-3, 1e-3, 3e-4, 1e-2), 5),
}


def config() -> dict:
    """Everything that determines the results (besides the code): stored in the results file."""
    return json.loads(json.dumps({
        "optimizers": {name: {"class": c, **kwargs} for name, (c, kwargs) in OPTIMIZERS.items()},
        "weight_decays": WEIGHT_DECAYS,
        "arms": ARMS,
        "warmup": WARMUP,
        "tuning_seeds": list(TUNING_SEEDS),
        "test_seeds": list(TEST_SEEDS),
        "divergence_factor": DIVERGENCE_FACTOR,
        "good": GOOD,
        "failed": FAILED,
        "curve_points": CURVE_POINTS,
        "timing": {"steps": TIMING_STEPS, "repeats": TIMING_REPEATS, "fast_path": FAST_PATH},
        "tasks": {name: task.config() for name, task in TASKS.items()},
    }))


# ----------------------------------------------------------------------------------------------
# Runs


def _evaluate(task: Task, model: nn.Module, optimizer, split: str) -> dict:
    """The model scored on `split`; Schedule-Free at its averaged point x (its eval mode)."""
    if hasattr(optimizer, "eval"):
        optimizer.eval()
    result = task.evaluate(model, split)
    if hasattr(optimizer, "train"):
        optimizer.train()
    return result


def run(task: Task | str, name: str, arm: str, lr: float, seed: int, split: str,
        weight_decay: float | None = None, trace: bool = False) -> dict:
    """Train one model and score it on `split` ("val" when tuning, "test" at the chosen setting).

    Returns the metrics on that split (None if the run diverged: a non-finite loss, or a last chunk's
    mean training loss above DIVERGENCE_FACTOR times the first step's), the training loss as means over
    CURVE_POINTS equal chunks of steps, with `trace` the validation loss at the end of each chunk, and
    the bytes of the optimizer's state per parameter."""
    task = TASKS[task] if isinstance(task, str) else task
    model = task.model(seed)
    optimizer = make_optimizer(name, model, lr, arm=arm, steps=task.steps, weight_decay=weight_decay)
    chunk = task.steps // CURVE_POINTS
    curve, validation, losses = [], [], []
    batches = task.batches(seed)
    for step in range(1, task.steps + 1):
        x, y = next(batches)
        optimizer.zero_grad()
        loss = task.loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        if step % chunk == 0 and len(curve) < CURVE_POINTS:
            curve.append(statistics.fmean(losses[-chunk:]))
            if trace:
                validation.append(_evaluate(task, model, optimizer, "val")["loss"])
    diverged = not math.isfinite(losses[-1]) or curve[-1] > DIVERGENCE_FACTOR * losses[0]
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "metrics": None if diverged else _evaluate(task, model, optimizer, split),
        "curve": curve,
        "validation": validation,
        "state_bytes_per_parameter": state_bytes(optimizer) / parameters,
    }


@torch.no_grad()
def initial_loss(task: Task | str, split: str) -> float:
    """The untrained models' loss on `split`, mean over the tuning seeds: the start of every run."""
    task = TASKS[task] if isinstance(task, str) else task
    return statistics.fmean(task.evaluate(task.model(seed), split)["loss"] for seed in TUNING_SEEDS)


def choose(sweep: list[dict]) -> dict:
    """The setting with the lowest mean validation loss (a setting with a diverged seed is out)."""
    finite = [row for row in sweep if row["mean_val_loss"] is not None]
    if not finite:
        raise ValueError("every setting diverged")
    return min(finite, key=lambda row: row["mean_val_loss"])


def excess(loss: float | None, start: float, best: float) -> float:
    """The fraction of the gap from the untrained loss to the task's best that is left: 0 at the best,
    1 where training started (inf for a diverged run)."""
    return math.inf if loss is None else (loss - best) / (start - best)


def tune_and_test(task_name: str, name: str, arm: str) -> dict:
    """One arm of one task: the sweep over the tuning seeds, the choice, and the test runs."""
    task = TASKS[task_name]
    with one_thread():
        sweep = []
        for lr, wd in settings(task, name):
            losses = [run(task, name, arm, lr, seed, "val", wd)["metrics"] for seed in TUNING_SEEDS]
            mean = None if None in losses else statistics.fmean(m["loss"] for m in losses)
            sweep.append({"lr": lr, "weight_decay": wd, "val_losses": [m and m["loss"] for m in losses],
                          "mean_val_loss": mean})
        chosen = choose(sweep)
        tests = {seed: run(task, name, arm, chosen["lr"], seed, "test", chosen["weight_decay"], trace=True)
                 for seed in TEST_SEEDS}
    lrs = task.grids[name]
    return {
        "sweep": sweep,
        "chosen": {"lr": chosen["lr"], "weight_decay": chosen["weight_decay"],
                   "at_edge": chosen["lr"] in (lrs[0], lrs[-1])},  # the best rate may lie off the grid
        "test": {str(seed): r["metrics"] for seed, r in tests.items()},
        "curves": {str(seed): r["curve"] for seed, r in tests.items()},
        "validation_curves": {str(seed): r["validation"] for seed, r in tests.items()},
        "state_bytes_per_parameter": tests[TEST_SEEDS[0]]["state_bytes_per_parameter"],
    }


def seconds_per_step(chosen: dict) -> dict:
    """Seconds per training step of the transformer for each (optimizer, arm) in `chosen` (mapping to
    its chosen setting), with the fast path where there is one; see TIMING_STEPS."""
    task = TASKS["lm"]
    setups = {}
    for key, setting in chosen.items():
        name, arm = key.split(" | ")
        model = task.model(TUNING_SEEDS[0])
        optimizer = make_optimizer(name, model, setting["lr"], arm=arm, steps=10**6,
                                   weight_decay=setting["weight_decay"], fast=True)
        setups[key] = (model, optimizer, task.batches(TUNING_SEEDS[0]))

    def steps(key, count):
        model, optimizer, batches = setups[key]
        for x, y in [next(batches) for _ in range(count)]:
            optimizer.zero_grad()
            task.loss(model(x), y).backward()
            optimizer.step()

    best = {}
    with one_thread():
        for key in setups:  # compile the fast paths first
            steps(key, 3)
        for _ in range(TIMING_REPEATS):
            for key in setups:
                start = time.perf_counter()
                steps(key, TIMING_STEPS)
                best[key] = min(best.get(key, math.inf), (time.perf_counter() - start) / TIMING_STEPS)
    return best


def study(tasks=None, jobs: int = 2, progress: bool = True) -> dict:
    """Run the study (or the tasks named) with `jobs` arms at a time, each in its own process."""
    tasks = list(tasks or TASKS)
    # the transformer's arms first: they take longest, and the others fill the gaps at the end
    work = sorted(((t, name, arm) for t in tasks for name, arm in arms(TASKS[t])), key=lambda w: w[0] != "lm")
    results = {"config": config(), "tasks": {t: {"arms": {}} for t in tasks}}
    bar = tqdm(total=len(work) + 1, file=sys.stderr, ascii=True, disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(tune_and_test, *key): key for key in work}
        for future in concurrent.futures.as_completed(futures):
            t, name, arm = futures[future]
            results["tasks"][t]["arms"][f"{name} | {arm}"] = future.result()
            bar.set_description(f"{t}: {name}, {arm}")
            bar.update()
    for t in tasks:
        entry = results["tasks"][t]
        entry["arms"] = {f"{n} | {a}": entry["arms"][f"{n} | {a}"] for n, a in arms(TASKS[t])}
        entry["initial_loss"] = {split: initial_loss(t, split) for split in ("val", "test")}
    if "lm" in tasks:
        bar.set_description("lm: timing")
        chosen = {key: row["chosen"] for key, row in results["tasks"]["lm"]["arms"].items()}
        results["tasks"]["lm"]["seconds_per_step"] = seconds_per_step(chosen)
    bar.update()
    bar.close()
    results["seconds"] = time.perf_counter() - start
    results["environment"] = {"python": ".".join(map(str, sys.version_info[:3])), "torch": torch.__version__}
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(RESULTS), help="where to write the results (JSON)")
    parser.add_argument("--tasks", nargs="*", choices=list(TASKS), help="only these tasks (a slice)")
    parser.add_argument("--jobs", type=int, default=2, help="arms run at the same time, one process each")
    args = parser.parse_args(argv)
    results = study(args.tasks, args.jobs)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out} in {results['seconds'] / 60:.1f} minutes", file=sys.stderr)


if __name__ == "__main__":
    main()
