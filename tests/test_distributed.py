"""optlib across processes (torch.distributed, gloo, 2 processes on the CPU): every optimizer
under DistributedDataParallel, ZeroRedundancyOptimizer and FSDP2 reproduces the single-process
run on whole batches, or refuses with an error that says what works instead. The process group starts once for the module; rank 0 reports each case, and a case that fails on
a rank is reported without stopping the others."""
import inspect

import pytest
import torch
from optim_helpers import TYPICAL

import optlib
from optlib.bench import distributed

# Beyond torch.optim's twins: the newer optimizers, with settings that move every part of them.
SETTINGS = TYPICAL | {
    "Lion": dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.1),
    # the readable update here, as for the others (their default is the fast path: below)
    "SGDScheduleFree": dict(lr=0.1, momentum=0.8, weight_decay=0.01, foreach=False),
    "AdamWScheduleFree": dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.01, foreach=False),
    "Prodigy": dict(lr=1.0, weight_decay=0.01),
    "AdEMAMix": dict(lr=0.01, weight_decay=0.01),
    "Lamb": dict(lr=0.01, weight_decay=0.01),
    "LARS": dict(lr=0.1, weight_decay=0.01),
    "Shampoo": dict(lr=0.1),
    "SOAP": dict(lr=0.01, precondition_frequency=1),
    "AdamW8bit": dict(lr=0.01, min_8bit_size=1),
    "SparseAdam": dict(lr=0.1, betas=(0.8, 0.9)),
}
# Muon takes matrices only, SparseAdam sparse gradients (of an embedding); the others a network.
MODEL = {"Muon": "matrices", "SparseAdam": "embedding"}
# Combinations that cannot be right, refused with an error that names what works instead:
# under ZeRO a rank's optimizer holds its share of the parameters, and these need all of them;
# L-BFGS works on one flat vector of all parameters, which FSDP2's shards do not give; FSDP2 does
# not reduce sparse gradients.
REFUSED = [("LBFGS", "ZeRO"), ("Prodigy", "ZeRO"), ("SGDScheduleFree", "ZeRO"),
           ("AdamWScheduleFree", "ZeRO"), ("LBFGS", "FSDP2"), ("SparseAdam", "FSDP2")]
NAMES = sorted(SETTINGS) + ["LBFGS"]
# The fast path (foreach=True), for every optimizer that has one (Lamb and LARS accept the flag
# and run their loop): under FSDP2 it falls back to the readable update, with one warning; under
# DDP and ZeRO it runs compiled on whole tensors, as on one process (shown for AdamW: compiling
# costs seconds each, and on whole tensors the compiled path is the one tests/test_fast.py checks).
FAST = [name for name in NAMES if "foreach" in inspect.signature(getattr(optlib, name)).parameters
        and name not in ("Lamb", "LARS")]
FAST_COMPILED = ["AdamW"]
CASES = [(name, getattr(optlib, name), SETTINGS.get(name, {}), wrapper, MODEL.get(name, "network"))
         for name in NAMES for wrapper in distributed.WRAPPERS]
# Under FSDP2 against the readable update on one process: what runs on the shards (and no
# compiling on one process, seconds for each optimizer)
CASES += [(f"{name}, fast", getattr(optlib, name), SETTINGS.get(name, {}) | {"foreach": True}, wrapper, "network",
           SETTINGS.get(name, {}) | {"foreach": wrapper != "FSDP2"})
          for name in FAST for wrapper in distributed.WRAPPERS
          if (name, wrapper) not in REFUSED and (wrapper == "FSDP2" or name in FAST_COMPILED)]
# torch 2.13's DTensor caches how to add a number to a norm of shards, and then fails to add a norm
# to a norm the same way: LARS wrote ‖g‖ + λ‖θ‖, which failed after Lamb's ‖u‖ + ε.
CASES += [("LARS, after Lamb", optlib.LARS, SETTINGS["LARS"], "FSDP2", "network")]
PAIRS = [(name, wrapper) for name, _, _, wrapper, *_ in CASES if (name, wrapper) not in REFUSED]


# Saved sharded under FSDP2 with torch.distributed.checkpoint, loaded on one process: state
# sharded as DTensors (AdamW), factored (Adafactor) and kept whole by each matrix's owner (Muon).
CHECKPOINTS = [("AdamW", optlib.AdamW, SETTINGS["AdamW"], "network"),
               ("Adafactor", optlib.Adafactor, SETTINGS["Adafactor"], "network"),
               ("Muon", optlib.Muon, SETTINGS["Muon"], "matrices")]


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def results(directory):
    return distributed.run(distributed.compare_all, CASES, CHECKPOINTS, str(directory))[0]


# float64 throughout. Under DDP and ZeRO every optimizer computes on whole tensors and the mean
# gradient is the same to the last bit as the single process's (see distributed._train): the same
# numbers. Under FSDP2 a norm or a sum over a sharded tensor adds the shards' partial sums in
# another order than over the whole.
TOLERANCE = {"DDP": 0.0, "ZeRO": 0.0, "FSDP2": 1e-12}


@pytest.mark.parametrize("name, wrapper", PAIRS)
def test_reproduces_the_single_process_run(results, name, wrapper):
    outcome = results[name, wrapper]
    assert not isinstance(outcome, str), outcome
    difference, _, warned = outcome
    assert difference <= TOLERANCE[wrapper]
    fallback = [w for w in warned if "fast path" in w]
    # one warning, at the first step on shards of each optimizer's fast path
    assert len(fallback) == (name.endswith(", fast") and wrapper == "FSDP2"), warned


@pytest.mark.parametrize("name, wrapper", REFUSED)
def test_refuses_where_it_cannot_be_right(results, name, wrapper):
    refusal = results[name, wrapper]
    assert refusal.startswith(f"RuntimeError: optlib.{name} "), refusal
    assert "DistributedDataParallel" in refusal  # what works instead


@pytest.mark.parametrize("name, optimizer_class, kwargs, model_name", CHECKPOINTS)
def test_a_sharded_checkpoint_continues_on_one_process(results, directory, name, optimizer_class,
                                                        kwargs, model_name):
    distributed_run = results[name, "checkpoint"]
    assert not isinstance(distributed_run, str), distributed_run

    def difference(restore_optimizer):
        single = distributed.load_and_continue(optimizer_class, kwargs, str(directory / name),
                                               model_name, restore_optimizer=restore_optimizer)
        return max((torch.from_numpy(p) - q).abs().max().item() for p, q in zip(distributed_run, single))

    assert difference(restore_optimizer=True) <= TOLERANCE["FSDP2"]
    assert difference(restore_optimizer=False) > 1e-6  # without its state, another step
