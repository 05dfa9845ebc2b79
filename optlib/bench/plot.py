"""Plotting helpers in the book's one style: trajectories over contours, and loss curves.

Figures carry no titles: the chapter gives each one a caption. Axis labels are lowercase.
"""
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter
import torch

from optlib.bench.functions import TestFunction
from optlib.bench.train import History

STYLE = {
    "figure.figsize": (6.0, 3.6),
    "figure.dpi": 90,  # small PNGs in the notebooks, still sharp enough in the book
    "savefig.dpi": 90,
    "font.size": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "lines.linewidth": 1.6,
    "image.cmap": "viridis",
}


def use_book_style() -> None:
    """Apply the book's Matplotlib style; each chapter calls this once after its imports."""
    plt.rcParams.update(STYLE)


def contour(function: TestFunction, ax=None, resolution: int = 200):
    """Log-spaced contour lines of a test function, with its minimum marked by a star."""
    ax = ax or plt.gca()
    xs = torch.linspace(*function.xlim, resolution, dtype=torch.float64)
    ys = torch.linspace(*function.ylim, resolution, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
    values = function(grid).numpy()
    # Shift so the lowest value on the grid is positive, then space the levels on a log scale.
    shifted = values - values.min() + 1e-3
    levels = np.geomspace(shifted.min() * 1.5, shifted.max(), 20)
    ax.contour(xs.numpy(), ys.numpy(), shifted, levels=levels, colors="0.6", linewidths=0.6)
    ax.plot(*function.minimum, marker="*", markersize=12, color="black", linestyle="none")
    ax.set_xlim(function.xlim)
    ax.set_ylim(function.ylim)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    return ax


def trajectories(function: TestFunction, paths: dict[str, torch.Tensor], ax=None):
    """Draw each labelled path (shape (steps + 1, 2)) over the function's contours."""
    ax = contour(function, ax)
    for label, path in paths.items():
        points = path.numpy()
        ax.plot(points[:, 0], points[:, 1], marker="o", markersize=2.5, label=label)
    ax.legend(loc="best", fontsize=8)
    return ax


def loss_curves(
    histories: dict[str, History], key: str = "epoch_train_loss", ax=None, xlabel: str = "epoch", log: bool = True
):
    """Plot one History field per labelled run; a log scale shows late progress as well as early."""
    ax = ax or plt.gca()
    for label, history in histories.items():
        ax.plot(getattr(history, key), label=label)
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())  # label decades only, not every minor tick
    ax.set_xlabel(xlabel)
    ax.set_ylabel(key.replace("_", " "))
    ax.legend(loc="best", fontsize=8)
    return ax


def subplots(nrows: int = 1, ncols: int = 1, **kwargs):
    """plt.subplots with a figure size that grows with the grid, so panels keep the book's proportions."""
    width, height = STYLE["figure.figsize"]
    size = (min(width * ncols / 1.6, 10.0) if ncols > 1 else width, height * (0.85 * nrows if nrows > 1 else 1))
    return plt.subplots(nrows, ncols, figsize=size, constrained_layout=True, **kwargs)
