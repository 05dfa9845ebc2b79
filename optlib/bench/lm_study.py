"""The transformer comparisons of the chapters, run once and stored.

Many chapters compare optimizers, schedules, clipping or batch sizes on the same task: :class:`lm.CharLM`
trained on :func:`lm.windows`, through the book's protocol (:func:`bench.tune`: the rate chosen on
validation by the mean of 3 seeds, the test loss at that rate for each seed). Run in every chapter,
these were the slowest cells of the book (20 to 35 s each, on every run of the notebooks), and most
of the runs were the same AdamW and Muon runs again.

Here every arm (an optimizer with its settings, its schedule, its clipping and its grid of rates)
runs once per protocol (the length of the run and the batch size, :data:`PROTOCOLS`).
``python -m optlib.bench.lm_study`` (``make lm-study``, minutes) writes :data:`RESULTS`, which is
committed and installed with the kit; ``--protocols`` runs only some protocols and keeps the others'
stored rows. A chapter reads the arms it compares with :func:`load`, then re-runs one of the stored
runs live with :func:`rerun` and shows that it lands within :data:`TOLERANCE` of the stored loss.
Each protocol's rows are stored with the configuration that made them, and ``tests/test_lm_study.py``
checks that it is the configuration in this file.

The runs are float32 on one thread. Another CPU or thread count changes their last bits, and over
hundreds of steps such a change grows, but stays far below TOLERANCE, and the chapters' verdicts keep
margins larger than it.
"""
import argparse
import concurrent.futures
import json
import math
import multiprocessing
import pathlib
import sys
import time

import torch
from tqdm import tqdm

import optlib
from optlib.bench import lm, schedules
from optlib.bench.protocol import SEEDS, Run, Tuning, run, tune, validation_split
from optlib.bench.train import one_thread

# protocol -> bench.tune's training options, and the number of windows drawn (lm.windows; 1,000 if not
# given). 80% of the windows are fit on (the rest is the validation part): 800 of 1,000 make an epoch
# of 50 batches of 16.
PROTOCOLS = {
    "3 epochs": {"epochs": 3, "batch_size": 16, "every_epoch": False},
    "1 epoch": {"epochs": 1, "batch_size": 16, "every_epoch": False},
    "6 epochs": {"epochs": 6, "batch_size": 16, "every_epoch": False},
    # the same examples in larger or smaller batches: fewer or more steps
    "6 epochs, batch 8": {"epochs": 6, "batch_size": 8, "every_epoch": False},
    "6 epochs, batch 64": {"epochs": 6, "batch_size": 64, "every_epoch": False},
    "6 epochs, batch 128": {"epochs": 6, "batch_size": 128, "every_epoch": False},
    # as many steps as "6 epochs", each on windows never seen before: 6,000 windows, 4,800 fit on once
    "1 pass": {"epochs": 1, "batch_size": 16, "every_epoch": False, "windows": 6000},
}
WARMUP = 0.1
"""The warm-up of the scheduled arms, as a fraction of the run's steps (30 of 300)."""
CURVE_POINTS = 12
"""A run's training loss is stored as the mean minibatch loss over this many equal chunks of steps."""
ADAMW = {"optimizer": "AdamW", "options": {"weight_decay": 0.0}}
MOMENTUM = {"optimizer": "SGD", "options": {"momentum": 0.9}}
LAMB = {"optimizer": "Lamb", "options": {}}
ADAMW_RATES = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
MOMENTUM_RATES = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
WARM_COSINE = ("cosine", {"warmup": WARMUP})
# protocol -> arm -> the optimizer (an optlib class, or "MuonAndAdamW"), its arguments other than
# lr, the rates, and optionally a schedule (a name in bench.schedules and its arguments; "warmup" is
# a fraction of the run, "set_for" a multiple of the run's length that the schedule is set for)
# and gradient clipping before every step ("norm" or "value", and the threshold).
_BATCH_ARMS = {
    "AdamW, constant": {**ADAMW, "rates": ADAMW_RATES},
    "AdamW, warm-up + cosine": {**ADAMW, "rates": ADAMW_RATES, "schedule": WARM_COSINE},
    "Momentum, warm-up + cosine": {**MOMENTUM, "rates": MOMENTUM_RATES, "schedule": WARM_COSINE},
    "LAMB, warm-up + cosine": {**LAMB, "rates": ADAMW_RATES, "schedule": WARM_COSINE},
}
ARMS = {
    "3 epochs": {
        "AdamW": {**ADAMW, "rates": [3e-3, 1e-2, 3e-2]},
        "Muon + AdamW": {"optimizer": "MuonAndAdamW", "options": {}, "rates": [1e-2, 3e-2, 1e-1]},
        "Lion": {"optimizer": "Lion", "options": {}, "rates": [3e-3, 1e-2, 3e-2]},
        "Prodigy": {"optimizer": "Prodigy", "options": {}, "rates": [1.0]},
        "Prodigy, bias correction": {"optimizer": "Prodigy", "options": {"use_bias_correction": True}, "rates": [1.0]},
        "AdEMAMix β3=0.999": {"optimizer": "AdEMAMix", "options": {"betas": [0.9, 0.999, 0.999]}, "rates": [1e-2, 3e-2]},
        "AdEMAMix β3=0.9999": {"optimizer": "AdEMAMix", "options": {}, "rates": [1e-2, 3e-2]},
        "SOAP": {"optimizer": "SOAP", "options": {"weight_decay": 0.0}, "rates": [1e-2, 3e-2]},
        "LAMB": {**LAMB, "rates": [3e-3, 1e-2]},
    },
    "1 epoch": {
        "AdamW": {**ADAMW, "rates": [1e-2, 3e-2]},
        "AdamW8bit": {"optimizer": "AdamW8bit", "options": {"weight_decay": 0.0}, "rates": [1e-2, 3e-2]},
        "AdamW8bit, all quantized": {"optimizer": "AdamW8bit", "options": {"weight_decay": 0.0, "min_8bit_size": 1},
                                     "rates": [1e-2, 3e-2]},
        "Muon + AdamW": {"optimizer": "MuonAndAdamW", "options": {}, "rates": [1e-2, 3e-2]},
    },
    # Schedules, warm-up and clipping, for a run twice as long
    "6 epochs": {
        **_BATCH_ARMS,
        "AdamW, warm-up + constant": {**ADAMW, "rates": ADAMW_RATES, "schedule": ("constant", {"warmup": WARMUP})},
        "AdamW, cosine": {**ADAMW, "rates": ADAMW_RATES, "schedule": ("cosine", {})},
        "AdamW, warm-up + linear": {**ADAMW, "rates": ADAMW_RATES, "schedule": ("linear", {"warmup": WARMUP})},
        "AdamW, warm-up + WSD": {**ADAMW, "rates": ADAMW_RATES,
                                 "schedule": ("wsd", {"warmup": WARMUP, "decay": 0.2})},
        "AdamW, warm-up + inverse sqrt": {**ADAMW, "rates": ADAMW_RATES,
                                          "schedule": ("inverse_sqrt", {"warmup": WARMUP})},
        # set for a run twice as long, and stopped half-way: a schedule that does not know the budget
        "AdamW, warm-up + cosine for 2x the run": {**ADAMW, "rates": ADAMW_RATES,
                                                   "schedule": ("cosine", {"warmup": WARMUP, "set_for": 2})},
        "Momentum, constant": {**MOMENTUM, "rates": MOMENTUM_RATES},
        "AdamW, clip norm 1": {**ADAMW, "rates": ADAMW_RATES, "clip": ("norm", 1.0)},
        "AdamW, clip norm 0.1": {**ADAMW, "rates": ADAMW_RATES, "clip": ("norm", 0.1)},
        "AdamW, clip value 0.01": {**ADAMW, "rates": ADAMW_RATES, "clip": ("value", 0.01)},
        "AdamW, warm-up + cosine, clip norm 1": {**ADAMW, "rates": ADAMW_RATES, "schedule": WARM_COSINE,
                                                 "clip": ("norm", 1.0)},
        "Momentum, clip norm 1": {**MOMENTUM, "rates": MOMENTUM_RATES, "clip": ("norm", 1.0)},
        "Momentum, warm-up + cosine, clip norm 1": {**MOMENTUM, "rates": MOMENTUM_RATES, "schedule": WARM_COSINE,
                                                    "clip": ("norm", 1.0)},
    },
    # The schedules again, without repeated data
    "1 pass": {
        "AdamW, constant": {**ADAMW, "rates": ADAMW_RATES[1:5]},
        "AdamW, warm-up + constant": {**ADAMW, "rates": ADAMW_RATES[1:5], "schedule": ("constant", {"warmup": WARMUP})},
        "AdamW, warm-up + cosine": {**ADAMW, "rates": ADAMW_RATES[1:5], "schedule": WARM_COSINE},
        "AdamW, warm-up + linear": {**ADAMW, "rates": ADAMW_RATES[1:5], "schedule": ("linear", {"warmup": WARMUP})},
        "AdamW, warm-up + WSD": {**ADAMW, "rates": ADAMW_RATES[1:5],
                                 "schedule": ("wsd", {"warmup": WARMUP, "decay": 0.2})},
        "AdamW, warm-up + cosine for 2x the run": {**ADAMW, "rates": ADAMW_RATES[1:5],
                                                   "schedule": ("cosine", {"warmup": WARMUP, "set_for": 2})},
        "Momentum, constant": {**MOMENTUM, "rates": MOMENTUM_RATES[2:5]},
        "Momentum, warm-up + cosine": {**MOMENTUM, "rates": MOMENTUM_RATES[2:5], "schedule": WARM_COSINE},
    },
    "6 epochs, batch 8": _BATCH_ARMS,
    "6 epochs, batch 64": _BATCH_ARMS,
    "6 epochs, batch 128": _BATCH_ARMS,
}
RESULTS = pathlib.Path(__file__).parent / "results" / "lm_study.json"
TOLERANCE = 0.03
"""How far a live re-run's validation loss may be from the stored one. The losses are about 2.4, and
the optimizers compared differ by 0.05 or more; flipping the last bit of every product and sum
(tests/perturb, `ulp`) moves a re-run by less than a quarter of this."""


def config(protocol: str) -> dict:
    """Everything that determines a protocol's results: stored with them, and compared by the tests."""
    return json.loads(json.dumps({
        "training": PROTOCOLS[protocol],
        "arms": ARMS[protocol],
        "seeds": list(SEEDS),
        "text": lm.corpus()[1],
        "model": {"context": lm.CONTEXT, "width": 32, "layers": 2, "heads": 2, "dtype": "float32"},
        "curve_points": CURVE_POINTS,
    }))


def _windows(protocol: str) -> int:
    return PROTOCOLS[protocol].get("windows", 1000)


def _training(protocol: str) -> dict:
    """bench.tune's options for the protocol (all but the number of windows)."""
    return {k: v for k, v in PROTOCOLS[protocol].items() if k != "windows"}


def steps(protocol: str) -> int:
    """The number of steps of a run: epochs of batches over the fit part (80% of the windows)."""
    options = PROTOCOLS[protocol]
    return options["epochs"] * math.ceil(round(0.8 * _windows(protocol)) / options["batch_size"])


def make_optimizer(protocol: str, arm: str):
    """The arm's optimizer as bench.tune takes it: a function of the parameters and the rate, with
    the arm's schedule and clipping attached as step hooks. A Prodigy optimizer also records its
    estimate d after every step, in its `estimates` attribute."""
    spec = ARMS[protocol][arm]
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["options"].items()}

    def make(params, lr):
        params = list(params)
        if spec["optimizer"] == "MuonAndAdamW":
            optimizer = lm.MuonAndAdamW(params, lr, **options)
        else:
            optimizer = getattr(optlib, spec["optimizer"])(params, lr=lr, **options)
        optimizers = getattr(optimizer, "optimizers", [optimizer])
        if spec["optimizer"] == "Prodigy":
            optimizer.estimates = []
            optimizer.register_step_post_hook(lambda o, args, kw: o.estimates.append(o.param_groups[0]["d"]))
        if "schedule" in spec:
            name, settings = spec["schedule"]
            settings = dict(settings)
            length = steps(protocol) * settings.pop("set_for", 1)
            if "warmup" in settings:
                settings["warmup"] = round(settings["warmup"] * steps(protocol))
            multiplier = schedules.SCHEDULES[name](length, **settings)
            for each in optimizers:
                schedules.every_step(each, multiplier)
        if "clip" in spec:
            kind, threshold = spec["clip"]
            clip = {"norm": torch.nn.utils.clip_grad_norm_, "value": torch.nn.utils.clip_grad_value_}[kind]

            def clip_gradients(o, args, kwargs):  # a step pre-hook returns None
                clip(params, threshold)

            # before the first optimizer's step, on every parameter: the global norm is over all of them
            optimizers[0].register_step_pre_hook(clip_gradients)
        return optimizer

    return make


def _curve(losses: list[float], total: int) -> list[float]:
    """Mean minibatch loss over each of CURVE_POINTS equal chunks of `total` steps (a diverged run's
    curve stops at its last complete chunk)."""
    chunk = total / CURVE_POINTS
    bounds = [round(i * chunk) for i in range(CURVE_POINTS + 1)]
    return [sum(losses[a:b]) / (b - a) for a, b in zip(bounds, bounds[1:]) if b <= len(losses)]


def _arm(protocol: str, arm: str) -> dict:
    """One arm of one protocol, tuned on the CPU with one thread: its stored row."""
    made = []

    def make(params, lr):
        made.append(make_optimizer(protocol, arm)(params, lr))
        return made[-1]

    rates = ARMS[protocol][arm]["rates"]
    with one_thread():
        tuning = tune(arm, make, rates, lm.windows(count=_windows(protocol)), lm.CharLM, **_training(protocol))
    row = {
        "runs": {repr(lr): [{"val_loss": r.val_loss, "diverged": r.diverged,
                             "curve": _curve(r.history.train_loss, steps(protocol))} for r in runs]
                 for lr, runs in tuning.runs.items()},
        "chosen_lr": tuning.lr,
        "test_loss": tuning.test["loss"],
    }
    first = rates.index(tuning.lr) * len(SEEDS)  # tune makes the optimizers rate by rate, seed by seed
    chosen = made[first : first + len(SEEDS)]
    if all(hasattr(o, "estimates") for o in chosen):
        row["estimates"] = [o.estimates for o in chosen]
    return row


def study(protocols=None, jobs: int = 2, progress: bool = True) -> dict:
    """The arms of `protocols` (default: all), `jobs` of them at a time in separate processes."""
    protocols = list(protocols or ARMS)
    work = [(p, arm) for p in protocols for arm in ARMS[p]]
    results = {p: {"config": config(p), "arms": {}} for p in protocols}
    bar = tqdm(total=len(work), file=sys.stderr, ascii=True, disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = {pool.submit(_arm, p, arm): (p, arm) for p, arm in work}
        for future in concurrent.futures.as_completed(futures):
            p, arm = futures[future]
            results[p]["arms"][arm] = future.result()
            bar.set_description(f"{p}: {arm}")
            bar.update()
    bar.close()
    for p in protocols:  # the arms in the order of ARMS, whatever order they finished in
        results[p]["arms"] = {arm: results[p]["arms"][arm] for arm in ARMS[p]}
    print(f"{len(work)} arms in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return results


def load(protocol: str, arms: list[str], path=RESULTS) -> dict[str, Tuning]:
    """The stored tunings of `arms` under `protocol`, as bench.tune returned them, without the
    models and histories: each Run has its seed, validation loss and divergence, and `curve`, its
    training loss as CURVE_POINTS chunk means. A Prodigy arm's tuning also has `estimates`, d after
    every step, one list per seed at the chosen rate."""
    stored = json.loads(pathlib.Path(path).read_text())["protocols"][protocol]["arms"]
    tunings = {}
    for arm in arms:
        row = stored[arm]
        runs = {}
        for lr, rows in row["runs"].items():
            runs[float(lr)] = [Run(seed, None, r["val_loss"], r["diverged"], None) for seed, r in zip(SEEDS, rows)]
            for each, r in zip(runs[float(lr)], rows):
                each.curve = r["curve"]
        tuning = Tuning(arm, list(SEEDS), runs, {"loss": row["test_loss"]})
        if "estimates" in row:
            tuning.estimates = row["estimates"]
        tunings[arm] = tuning
    return tunings


def rerun(protocol: str, arm: str, lr: float, seed: int, device="cpu") -> float:
    """One stored run done again, live: its validation loss."""
    split = validation_split(lm.windows(device, _windows(protocol)))
    with one_thread():
        again = run(make_optimizer(protocol, arm), lr, split, lambda s: lm.CharLM(s).to(device), seed,
                    **_training(protocol))
    return again.val_loss


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(RESULTS), help="where to write the results (JSON)")
    parser.add_argument("--protocols", nargs="*", choices=list(ARMS), help="only these (the others' rows are kept)")
    parser.add_argument("--jobs", type=int, default=2, help="arms run at the same time, one process each")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    stored = json.loads(out.read_text()) if args.protocols and out.exists() else {"protocols": {}}
    stored["protocols"].update(study(args.protocols, args.jobs))
    stored["protocols"] = {p: stored["protocols"][p] for p in ARMS if p in stored["protocols"]}
    stored["environment"] = {"python": ".".join(map(str, sys.version_info[:3])), "torch": torch.__version__}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stored, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
