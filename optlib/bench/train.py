"""A small, seeded training loop that returns the history a chapter plots."""
import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from optlib.bench.data import Dataset


def device() -> torch.device:
    """The GPU when there is one, else the CPU. Data and models are made on the CPU, then moved here."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def one_thread():
    """Run the block on one thread: models this small train fastest so, and every sum is then taken
    in the same order whatever the number of cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def mlp(sizes: list[int], *, seed: int = 0, device="cpu") -> nn.Sequential:
    """A ReLU network with the given layer sizes, e.g. [64, 32, 10]; [64, 10] is logistic regression.

    The weights are drawn on the CPU from `seed`, so every optimizer in a comparison starts from the
    same point, on every machine. The global random state is left as it was.
    """
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(n_in, n_out))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(device)


@dataclass
class History:
    """What happened during training. Epoch lists start with the value before the first step."""

    train_loss: list[float] = field(default_factory=list)  # the minibatch loss at every step
    # After every epoch, or only after the last (train's every_epoch=False)
    epoch_train_loss: list[float] = field(default_factory=list)  # loss on the whole training set
    test_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)  # classification only
    diverged: bool = False


def _default_loss(y: Tensor):
    return F.cross_entropy if y.dtype == torch.long else F.mse_loss


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, loss_fn=None) -> tuple[float, float | None]:
    """Loss and, for class targets, accuracy of the model on (x, y)."""
    loss_fn = loss_fn or _default_loss(y)
    output = model(x)
    loss = loss_fn(output, y).item()
    accuracy = (output.argmax(1) == y).float().mean().item() if y.dtype == torch.long else None
    return loss, accuracy


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Dataset,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    loss_fn=None,
    scheduler=None,
    seed: int = 0,
    progress: bool = False,
    every_epoch: bool = True,
) -> History:
    """Minibatch training for `epochs` passes over data.x_train; the batch order comes from `seed`.

    A run whose loss becomes inf or nan stops there and is marked `diverged`, so a learning-rate sweep
    can include rates that are too large. `scheduler`, if given, steps once per epoch. `progress=True`
    shows a progress bar over epochs, for long runs of your own (the book's runs are short).
    `every_epoch=False` evaluates on the whole splits only before the first step and after the last,
    which is all a tuning needs: for the small transformer each evaluation costs as much as 20 steps.
    """
    loss_fn = loss_fn or _default_loss(data.y_train)
    generator = torch.Generator().manual_seed(seed)
    history = History()

    def record_epoch() -> None:
        history.epoch_train_loss.append(evaluate(model, data.x_train, data.y_train, loss_fn)[0])
        test_loss, test_accuracy = evaluate(model, data.x_test, data.y_test, loss_fn)
        history.test_loss.append(test_loss)
        if test_accuracy is not None:
            history.test_accuracy.append(test_accuracy)

    record_epoch()
    n = len(data.x_train)
    for epoch in tqdm(range(epochs), desc=type(optimizer).__name__, disable=not progress, leave=False):
        order = torch.randperm(n, generator=generator).to(data.x_train.device)
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(data.x_train[batch]), data.y_train[batch])
            loss.backward()
            optimizer.step()
            history.train_loss.append(loss.item())
            if not math.isfinite(history.train_loss[-1]):
                history.diverged = True
                return history
        if scheduler is not None:
            scheduler.step()
        if every_epoch or epoch == epochs - 1:
            record_epoch()
    return history
