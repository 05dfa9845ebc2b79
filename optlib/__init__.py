"""optlib: deep-learning optimizers written from scratch, drop-in replacements for torch.optim.

`import optlib as optim` runs code written for `torch.optim` unchanged: the optimizers have
torch's names, arguments, defaults, errors and state, and `optim.lr_scheduler` is torch's own.
The optimizers need only torch; the book's experiment kit lives in ``optlib.bench`` and is not
imported here.
"""

from torch.optim import lr_scheduler

from optlib.adagrad import Adagrad
from optlib.adam import Adam
from optlib.adamw import AdamW
from optlib.optimizer import Optimizer
from optlib.rmsprop import RMSprop
from optlib.sgd import SGD

__all__ = ["Adagrad", "Adam", "AdamW", "Optimizer", "RMSprop", "SGD", "lr_scheduler"]
