r"""Adagrad: a step per coordinate, scaled by the root of that coordinate's summed squared
gradients; a drop-in for torch.optim.Adagrad."""

import torch
from torch import Tensor

from optlib.optimizer import Optimizer, check_non_negative, check_tensor_lr
from optlib.optimizer import hyperparameters, real, settings_for, step_counter

__all__ = ["Adagrad", "adagrad_update"]


def adagrad_update(
    param: Tensor,
    grad: Tensor,
    state_sum: Tensor,
    *,
    step: float,
    lr: float,
    lr_decay: float,
    weight_decay: float,
    eps: float,
    maximize: bool,
) -> None:
    """One Adagrad step for one tensor, in the order of the equations in
    `Adagrad`.

    Updates ``param`` and ``state_sum`` in place. A sparse ``grad`` (from an
    embedding with ``sparse=True``) touches only the rows it holds, in the sum
    and in the parameter. ``grad`` itself is never modified.
    """
    g = -grad if maximize else grad  # g_t = ±∇f(θ_{t-1})
    if weight_decay != 0:
        if g.is_sparse:
            raise RuntimeError(
                "weight_decay option is not compatible with sparse gradients"
            )
        g = g.add(param, alpha=weight_decay)  # g_t + λ θ_{t-1}
    clr = lr / (1 + (step - 1) * lr_decay)  # γ_t = γ / (1 + (t - 1) η)
    if g.is_sparse:  # the same two lines, on the rows that g holds only
        g = g.coalesce()  # one value per row: duplicates are summed first
        rows, values = g.indices(), g.values()
        state_sum.add_(torch.sparse_coo_tensor(rows, values**2, g.shape))
        root = state_sum.sparse_mask(g).values().sqrt().add_(eps)
        update = torch.sparse_coo_tensor(rows, values / root, g.shape)
        param.add_(update, alpha=-clr)
    else:
        state_sum.addcmul_(g, g)  # s_t = s_{t-1} + g_t²
        # θ_t = θ_{t-1} - γ_t g_t / (sqrt(s_t) + ε)
        param.addcdiv_(g, state_sum.sqrt().add_(eps), value=-clr)


class Adagrad(Optimizer):
    r"""Implements Adagrad (Duchi et al., 2011).

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \gamma \text{ (lr)}, \: \theta_0 \text{ (params)}, \:
                f(\theta) \text{ (objective)}, \: \lambda \text{ (weight decay)},                \\
            &\hspace{13mm} \eta \text{ (lr decay)}, \: s_0 \text{ (initial accumulator value)},
                \: \epsilon \text{ (epsilon)}, \: \textit{maximize}                              \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}g_t \leftarrow \pm \nabla_{\theta} f_t (\theta_{t-1})
                + \lambda \theta_{t-1} \quad (- \textbf{ if } \textit{maximize})                 \\
            &\hspace{5mm}\gamma_t \leftarrow \gamma / (1 + (t - 1) \eta)                         \\
            &\hspace{5mm}s_t \leftarrow s_{t-1} + g_t^2                                          \\
            &\hspace{5mm}\theta_t \leftarrow \theta_{t-1} - \gamma_t g_t /
                \big(\sqrt{s_t} + \epsilon \big)                                                 \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \:  \theta_t                                                     \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    State, under PyTorch's keys: :math:`s` is ``sum`` and :math:`t` is ``step``. Like torch, the
    state of every parameter is created with the optimizer, before the first step.

    Args:
        params (iterable): parameters, named parameters, or dicts defining parameter groups.
        lr (float, Tensor, optional): learning rate :math:`\gamma` (default: 1e-2)
        lr_decay (float, optional): learning-rate decay :math:`\eta` (default: 0)
        weight_decay (float, optional): weight decay :math:`\lambda` (L2 penalty) (default: 0)
        initial_accumulator_value (float, optional): the start :math:`s_0` of the sum of
            squared gradients (default: 0)
        eps (float, optional): :math:`\epsilon`, added to :math:`\sqrt{s_t}` (default: 1e-10)
        foreach, fused (bool, optional): ``True`` runs the same update compiled, on many
            tensors at once (`optlib.fast`); the default (``None``) is the readable loop.
        maximize (bool, optional): maximize the objective instead of minimizing it
            (default: False)
        differentiable (bool, optional): only ``False`` is supported.

    .. note::
        Duchi et al. (2011) analyse both a full-matrix and a diagonal version; PyTorch, like
        every deep-learning library, implements the diagonal one, with :math:`\epsilon` added
        outside the root. ``lr_decay`` and ``initial_accumulator_value`` are PyTorch's
        additions. A parameter group that sets its own ``initial_accumulator_value`` starts its
        sums from that value; torch 2.13 silently uses the constructor's value for every group.
    """

    accepts_sparse_gradients = True
    checkpoint_defaults = dict(foreach=None, maximize=False, differentiable=False, fused=None)

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        check_tensor_lr(lr)
        check_non_negative(
            lr=lr,
            lr_decay=lr_decay,
            weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value,
            eps=eps,
        )
        super().__init__(params, hyperparameters(locals()))
        for group in self.param_groups:  # torch creates Adagrad's state up front
            for param in group["params"]:
                self.state[param].update(self._init_state(param, group))

    def _init_state(self, param, group):
        s0 = group["initial_accumulator_value"]
        if param.is_complex():  # s_0 in the real and the imaginary part
            s0 = complex(s0, s0)
        return dict(step=step_counter(param, group["fused"]), sum=torch.full_like(param, s0))

    @staticmethod
    def _update(param, grad, state, group):
        adagrad_update(
            real(param),
            real(grad),
            real(state["sum"]),
            **settings_for(adagrad_update, group),  # lr, lr_decay, eps ...
        )

    def share_memory(self) -> None:
        """Move the sums into shared memory, for Hogwild-style training across processes."""
        for state in self.state.values():
            state["sum"].share_memory_()
