"""Learning-rate schedules as multipliers of the base rate, one per step, and a way to run any of
them on any optimizer through ``torch.optim.lr_scheduler.LambdaLR``.

Each function returns ``multiplier(t)``: the factor on the optimizer's rate for its step ``t + 1``
(``t`` counts the steps already taken, as LambdaLR counts its own ``step()`` calls). A schedule "set
for the budget" is given the run's number of steps, ``total``; a linear warm-up over ``warmup``
steps starts at ``1 / warmup`` (never at 0, which would waste a step) and reaches 1 at step
``warmup``.
"""
import math
from collections.abc import Callable, Sequence

import torch

Multiplier = Callable[[int], float]


def _warm(t: int, warmup: int) -> float | None:
    return (t + 1) / warmup if t < warmup else None


def constant(total: int = 0, warmup: int = 0) -> Multiplier:
    """1 at every step (after the warm-up, if any)."""
    return lambda t: _warm(t, warmup) or 1.0


def step_decay(milestones: Sequence[int], gamma: float = 0.1, warmup: int = 0) -> Multiplier:
    """1, then times `gamma` at each milestone (a step count), as ``MultiStepLR``."""
    return lambda t: _warm(t, warmup) or gamma ** sum(t >= m for m in milestones)


def cosine(total: int, warmup: int = 0) -> Multiplier:
    """Half a cosine from 1 after the warm-up down to 0 at step `total`."""

    def multiplier(t: int) -> float:
        progress = (t - warmup) / max(total - warmup, 1)
        return _warm(t, warmup) or 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return multiplier


def linear(total: int, warmup: int = 0) -> Multiplier:
    """A straight line from 1 after the warm-up down to 0 at step `total` ("linear decay to zero")."""
    return lambda t: _warm(t, warmup) or max(0.0, 1 - (t - warmup) / max(total - warmup, 1))


def wsd(total: int, warmup: int = 0, decay: float = 0.2) -> Multiplier:
    """Warm-up, stable, decay: 1 until the last `decay` fraction of the run, then linearly to 0."""
    start = total - round(decay * total)
    return lambda t: _warm(t, warmup) or min(1.0, max(0.0, (total - t) / max(total - start, 1)))


def inverse_sqrt(total: int = 0, warmup: int = 1) -> Multiplier:
    """sqrt(warmup / t) after the warm-up (the original transformer's schedule): it never reaches 0
    and does not know the run's length."""
    return lambda t: _warm(t, warmup) or math.sqrt(warmup / (t + 1))


SCHEDULES = {"constant": constant, "step": step_decay, "cosine": cosine, "linear": linear, "wsd": wsd,
             "inverse_sqrt": inverse_sqrt}


def every_step(optimizer: torch.optim.Optimizer, multiplier: Multiplier) -> torch.optim.lr_scheduler.LambdaLR:
    """Multiply every group's rate by ``multiplier(t)`` before step t + 1: a LambdaLR that steps
    itself after every ``optimizer.step()`` (a step post-hook), so a training loop that knows nothing
    of schedules runs it."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    optimizer.register_step_post_hook(lambda o, args, kwargs: scheduler.step())
    return scheduler
