"""optlib across processes (torch.distributed, gloo, 2 processes on the CPU): every optimizer
under DistributedDataParallel, ZeroRedundancyOptimizer and FSDP2 reproduces the single-process
run on whole batches, or refuses. What does not yet is marked as a strict xfail, with the reason. The process group starts once for the module; rank 0 reports
each case, and a case that fails on a rank is reported without stopping the others."""
import pytest
import torch
from optim_helpers import TYPICAL

import optlib
from optlib.bench import distributed

# Beyond torch.optim's twins: the newer optimizers, with settings that move every part of them.
SETTINGS = TYPICAL | {
    "Lion": dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.1),
    "SGDScheduleFree": dict(lr=0.1, momentum=0.8, weight_decay=0.01),
    "AdamWScheduleFree": dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.01),
    "Prodigy": dict(lr=1.0, weight_decay=0.01),
    "AdEMAMix": dict(lr=0.01, weight_decay=0.01),
    "Lamb": dict(lr=0.01, weight_decay=0.01),
    "LARS": dict(lr=0.1, weight_decay=0.01),
    "Shampoo": dict(lr=0.1),
    "SOAP": dict(lr=0.01, precondition_frequency=1),
    "AdamW8bit": dict(lr=0.01, min_8bit_size=1),
}
# Under ZeRO each rank's optimizer holds its share of the parameters: these need all of them.
REFUSED = [("LBFGS", "ZeRO"), ("Prodigy", "ZeRO")]
# Found by these tests, to be fixed (issue "Across processes"):
KNOWN = {
    ("SGDScheduleFree", "ZeRO"): "ZeroRedundancyOptimizer copies its param_groups over its local "
    "optimizer's at every step, train_mode included: train() on the local optimizer is undone",
    ("AdamWScheduleFree", "ZeRO"): "the same",
    # A last-bit change of the loss moves SOAP's parameters by 7e-3 in three steps on one
    # process too: its eigenbases of nearly degenerate Gram matrices; this model needs another
    # check for SOAP (the difference under DDP is 9e-3).
    ("SOAP", "DDP"): "eigenbases of nearly degenerate Gram matrices: chaotic in the last bit",
    ("SOAP", "ZeRO"): "the same",
    # FSDP2: parameters, gradients and state are DTensors sharded by rows
    ("Adafactor", "FSDP2"): "an in-place pow_ of a norm (a partial DTensor) changes its placement",
    ("Lamb", "FSDP2"): "an in-place clamp_ of a norm (a partial DTensor) changes its placement",
    ("AdamW8bit", "FSDP2"): "indexes a DTensor with a plain tensor; its blocks of 256 numbers "
    "would also fall otherwise on shards than on the whole tensor",
    ("SGDScheduleFree", "FSDP2"): "its default foreach=True packs tensors with _foreach_copy_, "
    "which has no DTensor sharding strategy",
    ("AdamWScheduleFree", "FSDP2"): "the same",
    ("Prodigy", "FSDP2"): "flattens a parameter sharded unevenly (3 rows on 2 ranks); its sums "
    "over all parameters need an all-reduce (the reference's fsdp_in_use)",
    ("Muon", "FSDP2"): "5e-4: Newton-Schulz in bfloat16 through sharded matrix products; every "
    "rank works on every matrix (the owner-rank scheme is to come)",
    ("Shampoo", "FSDP2"): "state made as plain tensors (torch.eye), not as DTensors like the "
    "parameter; whole-matrix preconditioners need the owner-rank scheme",
    ("SOAP", "FSDP2"): "the same (torch.zeros), and chaotic as under DDP",
}
NAMES = sorted(SETTINGS)
CASES = [(name, getattr(optlib, name), SETTINGS.get(name, {}), wrapper, name == "Muon")
         for name in NAMES + ["LBFGS"] for wrapper in distributed.WRAPPERS
         if name != "LBFGS" or wrapper == "ZeRO"]
PAIRS = [(name, wrapper) for name in NAMES for wrapper in distributed.WRAPPERS
         if (name, wrapper) not in REFUSED]


@pytest.fixture(scope="module")
def results():
    return distributed.run(distributed.compare_all, CASES)[0]


# float64 throughout; the ranks' halves of a batch are summed in another order than the whole.
TOLERANCE = 1e-12


@pytest.mark.parametrize("name, wrapper", [
    pytest.param(*pair, marks=pytest.mark.xfail(strict=True, reason=KNOWN[pair])) if pair in KNOWN else pair
    for pair in PAIRS
])
def test_reproduces_the_single_process_run(results, name, wrapper):
    outcome = results[name, wrapper]
    assert not isinstance(outcome, str), outcome
    difference, _ = outcome
    assert difference < TOLERANCE


@pytest.mark.parametrize("name, wrapper", REFUSED)
def test_refuses_where_it_cannot_be_right(results, name, wrapper):
    refusal = f"RuntimeError: optlib.{name} cannot run under ZeroRedundancyOptimizer"
    assert results[name, wrapper].startswith(refusal)
