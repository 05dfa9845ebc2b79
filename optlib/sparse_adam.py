r"""SparseAdam: Adam's update applied lazily, only to the rows that a sparse gradient
holds; a drop-in for torch.optim.SparseAdam."""

import math

import torch
from torch import Tensor

from optlib.optimizer import Optimizer, any_sharded, check_betas, check_tensor_lr, hyperparameters
from optlib.optimizer import _value  # a tensor hyperparameter is used by its value

__all__ = ["SparseAdam", "sparse_adam_update"]

_DENSE_GRADIENT = "SparseAdam does not support dense gradients, please consider Adam instead"


def sparse_adam_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    maximize: bool,
) -> None:
    """One SparseAdam step for one tensor: Adam's equations, in the order of
    `SparseAdam`, on the rows that the sparse ``grad`` holds, and nothing on
    the other rows.

    Updates ``param`` and the moments in place, at those rows only. ``step``
    is t, the steps of the whole tensor, counted from 1 (not of each row).
    ``grad`` is never modified.
    """
    g = -grad if maximize else grad  # g_t = ±∇f(θ_{t-1}), a sparse tensor
    g = g.coalesce()  # one entry per row: a row used twice is summed first
    rows, g = tuple(g.indices()), g.values()  # R_t, and g_{t,i} for i in R_t
    if g.numel() == 0:  # R_t is empty: nothing moves (the step still counts)
        return
    m, v = exp_avg[rows], exp_avg_sq[rows]  # copies of m_{t-1,i}, v_{t-1,i}
    # Adam's moving averages, on the rows i ∈ R_t only, as x + (1-β)(new - x):
    m = m + (g - m) * (1 - beta1)  # m_{t,i} = β1 m_{t-1,i} + (1-β1)g_{t,i}
    v = v + (g**2 - v) * (1 - beta2)  # v_{t,i} = β2 v_{t-1,i} + (1-β2)g_{t,i}²
    exp_avg[rows], exp_avg_sq[rows] = m, v  # rows outside R_t keep their m, v
    bias_correction1 = 1 - beta1**step  # m̂ = m / (1 - β1^t), t of the tensor
    bias_correction2 = 1 - beta2**step  # v̂ = v / (1 - β2^t)
    # θ_{t,i} = θ_{t-1,i} - γ sqrt(1-β2^t)/(1-β1^t) m_{t,i}/(sqrt(v_{t,i})+ε):
    # both corrections in the step size, ε added to the uncorrected root
    step_size = lr * math.sqrt(bias_correction2) / bias_correction1
    param[rows] += -step_size * (m / (v.sqrt() + eps))


def _check_arguments(lr, betas, eps) -> None:
    """torch's checks, in torch's order; unlike Adam's, they refuse lr = 0 and eps = 0 too."""
    check_tensor_lr(lr)
    if not 0.0 < lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 < eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    check_betas(betas)


class SparseAdam(Optimizer):
    r"""Implements the lazy version of Adam (Kingma and Ba, 2015) for sparse gradients that
    PyTorch calls SparseAdam (TensorFlow: LazyAdamOptimizer).

    A sparse gradient, as ``nn.Embedding(sparse=True)`` produces, holds the rows
    :math:`\mathcal{R}_t` that the batch used. Adam's equations run on those rows only; every
    other row keeps its parameters and its moments.

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \gamma \text{ (lr)}, \: \beta_1, \beta_2 \text{ (betas)},
                \: \theta_0 \text{ (params)}, \: f(\theta) \text{ (objective)},
                \: \epsilon \text{ (epsilon)}, \: \textit{maximize}                              \\
            &\textbf{initialize} : m_0 \leftarrow 0 \text{ (first moment)}, \:
                v_0 \leftarrow 0 \text{ (second moment)}                                   \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}g_t \leftarrow \pm \nabla_{\theta} f_t (\theta_{t-1}), \text{ sparse,
                with rows } \mathcal{R}_t \quad (- \textbf{ if } \textit{maximize})              \\
            &\hspace{5mm}\textbf{for} \: i \in \mathcal{R}_t \: \textbf{do}
                \quad \text{(a row repeated in } g_t \text{ is summed first)}                    \\
            &\hspace{10mm}m_{t,i} \leftarrow \beta_1 m_{t-1,i} + (1 - \beta_1) g_{t,i}           \\
            &\hspace{10mm}v_{t,i} \leftarrow \beta_2 v_{t-1,i} + (1 - \beta_2) g_{t,i}^2         \\
            &\hspace{10mm}\theta_{t,i} \leftarrow \theta_{t-1,i} - \gamma \,
                \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t} \,
                \frac{m_{t,i}}{\sqrt{v_{t,i}} + \epsilon}                                        \\
            &\hspace{5mm}\textbf{for} \: i \notin \mathcal{R}_t \: \textbf{do}                   \\
            &\hspace{10mm}m_{t,i} \leftarrow m_{t-1,i}, \: v_{t,i} \leftarrow v_{t-1,i}, \:
                \theta_{t,i} \leftarrow \theta_{t-1,i}                                           \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \:  \theta_t                                                     \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    State, under PyTorch's keys: :math:`m` is ``exp_avg``, :math:`v` is ``exp_avg_sq``, and
    :math:`t` is ``step``, a Python ``int`` as in torch (the other optimizers keep a tensor).

    Args:
        params (iterable): dense parameters, named parameters, or dicts defining parameter
            groups; their gradients must be sparse.
        lr (float, Tensor, optional): learning rate :math:`\gamma` (default: 1e-3)
        betas (tuple[float, float], optional): decay rates :math:`(\beta_1, \beta_2)` of the
            two moment estimates (default: (0.9, 0.999))
        eps (float, optional): :math:`\epsilon`, added to :math:`\sqrt{v_t}` (default: 1e-8)
        maximize (bool, optional): maximize the objective instead of minimizing it
            (default: False)

    .. note::
        SparseAdam is a construction of PyTorch, not of the Adam paper, and it is not Adam on
        sparse gradients. Where dense Adam, given a zero gradient row, still decays that row's
        moments and moves its parameters with the stale momentum, SparseAdam changes nothing in
        a row the batch did not use. The bias corrections use :math:`t`, the steps of the whole
        tensor, not the number of updates a row has had. And :math:`\epsilon` is added to the
        uncorrected :math:`\sqrt{v_t}` (the paper's :math:`\hat\epsilon`, end of its Section
        2), where ``torch.optim.Adam`` adds it to :math:`\sqrt{\widehat{v_t}}`: with every row
        in every batch, SparseAdam is Adam with :math:`\epsilon / \sqrt{1 - \beta_2^t}` in
        place of :math:`\epsilon`. A dense gradient raises a ``RuntimeError``, and sparse or
        complex parameters a ``ValueError``, as in torch. There is no weight decay, AMSGrad,
        ``foreach`` or ``fused`` option, as in torch.
    """

    # Sparse gradients are the only kind accepted: `step` below refuses dense ones, as torch does.
    accepts_sparse_gradients = True

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        maximize: bool = False,
    ) -> None:
        _check_arguments(lr, betas, eps)
        super().__init__(params, hyperparameters(locals()))
        # The parameters themselves must be dense and real (the gradients sparse: see step).
        at = {"Sparse": [], "Complex": []}
        for group_index, group in enumerate(self.param_groups):
            for index, param in enumerate(group["params"]):
                if param.is_sparse:
                    at["Sparse"].append([group_index, index])
                if param.is_complex():
                    at["Complex"].append([group_index, index])
        if at["Sparse"]:
            raise ValueError(
                f"Sparse params at indices {at['Sparse']}: SparseAdam requires dense parameter "
                "tensors"
            )
        if at["Complex"]:
            raise ValueError(
                f"Complex params at indices {at['Complex']}: SparseAdam does not support complex "
                "parameters"
            )
        if any_sharded([p for group in self.param_groups for p in group["params"]]):
            raise RuntimeError(
                "optlib.SparseAdam cannot run on DTensor parameters (FSDP2): FSDP2 does not reduce "
                "sparse gradients (its reduce-scatter has no sparse kernel). Run SparseAdam under "
                "DistributedDataParallel or ZeroRedundancyOptimizer, which all-reduce them."
            )

    def __setstate__(self, state: dict) -> None:
        # As torch: the step stays a Python int, and a checkpoint from before `maximize`
        # existed is kept as it is (the step reads a missing `maximize` as False).
        torch.optim.Optimizer.__setstate__(self, state)

    def _init_state(self, param, group):
        return dict(step=0, exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))

    @staticmethod
    def _update(param, grad, state, group):
        beta1, beta2 = group["betas"]
        sparse_adam_update(
            param,
            grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            step=state["step"],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            maximize=group.get("maximize", False),
        )

    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step; returns the closure's loss, or None.

        The loop of `optlib.optimizer.Optimizer`, with the two rules of
        torch.optim.SparseAdam: a dense gradient raises, and the step count
        is a Python int.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            settings = {k: _value(v) for k, v in group.items()}  # numbers
            params = [p for p in group["params"] if p.grad is not None]
            for param in params:  # as torch: check, create, count; then update
                if not param.grad.is_sparse:
                    raise RuntimeError(_DENSE_GRADIENT)
                state = self.state[param]
                if not state:
                    state.update(self._init_state(param, settings))
                state["step"] += 1  # t counts from 1, one count per tensor
            for param in params:
                self._update(param, param.grad, self.state[param], settings)
        return loss
