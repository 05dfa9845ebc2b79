"""The book's experiment kit: test functions, datasets, a training loop, the side-by-side comparison
with torch.optim, and plots. The optimizers in `optlib` do not depend on any of it."""
from optlib.bench.compare import compare_with_torch, fixed_gradients, run_side_by_side, verdict
from optlib.bench.data import Dataset, breast_cancer, digits, linear_regression, rare_features
from optlib.bench.functions import TestFunction, beale, quadratic, rastrigin, rosenbrock, saddle, trajectory
from optlib.bench.protocol import paired, tune, validation_split
from optlib.bench.plot import contour, loss_curves, subplots, trajectories, use_book_style
from optlib.bench.train import History, device, evaluate, mlp, one_thread, train
