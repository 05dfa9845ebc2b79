"""optlib: deep-learning optimizers written from scratch, drop-in replacements for torch.optim.

`import optlib as optim` runs code written for `torch.optim` unchanged: the optimizers have
torch's names, arguments, defaults, errors and state, and `optim.lr_scheduler` is torch's own.
Those that torch.optim lacks (`Lion`, `SGDScheduleFree`, `AdamWScheduleFree`, `Prodigy`,
`AdEMAMix`, `AdamW8bit`, `Lamb`, `LARS`, `Shampoo`, `SOAP`) follow the reference package their
users install.
The optimizers need only torch; the book's experiment kit lives in ``optlib.bench`` and is not
imported here.
"""

from torch.optim import lr_scheduler

from optlib.adadelta import Adadelta
from optlib.adafactor import Adafactor
from optlib.adagrad import Adagrad
from optlib.adam import Adam
from optlib.ademamix import AdEMAMix
from optlib.adamax import Adamax
from optlib.adamw import AdamW
from optlib.adamw8bit import AdamW8bit
from optlib.asgd import ASGD
from optlib.lamb import Lamb
from optlib.lars import LARS
from optlib.lbfgs import LBFGS
from optlib.lion import Lion
from optlib.muon import Muon
from optlib.nadam import NAdam
from optlib.optimizer import Optimizer
from optlib.prodigy import Prodigy
from optlib.radam import RAdam
from optlib.rmsprop import RMSprop
from optlib.rprop import Rprop
from optlib.schedule_free import AdamWScheduleFree, SGDScheduleFree
from optlib.sgd import SGD
from optlib.shampoo import Shampoo
from optlib.soap import SOAP
from optlib.sparse_adam import SparseAdam

__all__ = [
    "Adadelta",
    "Adafactor",
    "Adagrad",
    "Adam",
    "Adamax",
    "AdamW",
    "AdamW8bit",
    "AdamWScheduleFree",
    "AdEMAMix",
    "ASGD",
    "Lamb",
    "LARS",
    "LBFGS",
    "Lion",
    "Muon",
    "NAdam",
    "Optimizer",
    "Prodigy",
    "RAdam",
    "RMSprop",
    "Rprop",
    "SGD",
    "SGDScheduleFree",
    "Shampoo",
    "SOAP",
    "SparseAdam",
    "lr_scheduler",
]
