"""optlib: deep-learning optimizers written from scratch, drop-in replacements for torch.optim.

The optimizers need only torch; the book's experiment kit lives in ``optlib.bench`` and is
not imported here.
"""

from optlib.sgd import SGD

__all__ = ["SGD"]
