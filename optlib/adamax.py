r"""Adamax: Adam with the infinity norm in place of the root mean square; a drop-in for
torch.optim.Adamax."""

import torch
from torch import Tensor

from optlib.optimizer import Optimizer, check_betas, check_non_negative, check_tensor_lr
from optlib.optimizer import hyperparameters, real, settings_for, step_counter

__all__ = ["Adamax", "adamax_update"]


def adamax_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_inf: Tensor,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """One Adamax step for one tensor, in the order of the equations in
    `Adamax`.

    Updates ``param``, ``exp_avg`` (m) and ``exp_inf`` (u) in place.
    ``step`` is t, counted from 1. ``grad`` is never modified.
    """
    g = -grad if maximize else grad  # g_t = ±∇f(θ_{t-1})
    if weight_decay != 0:
        g = g.add(param, alpha=weight_decay)  # g_t + λ θ_{t-1}
    exp_avg.lerp_(g, 1 - beta1)  # m_t = β1 m_{t-1} + (1 - β1) g_t
    # u_t = max(β2 u_{t-1}, |g_t| + ε), the limit of Adam's v_t^(1/p)
    torch.maximum(exp_inf.mul_(beta2), g.abs().add_(eps), out=exp_inf)
    # θ_t = θ_{t-1} - γ m_t / ((1 - β1^t) u_t); u_t needs no bias correction
    param.addcdiv_(exp_avg, exp_inf, value=-lr / (1 - beta1**step))


class Adamax(Optimizer):
    r"""Implements Adamax (Kingma and Ba, 2015, Section 7.1).

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \gamma \text{ (lr)}, \: \beta_1, \beta_2 \text{ (betas)},
                \: \theta_0 \text{ (params)}, \: f(\theta) \text{ (objective)},
                \: \lambda \text{ (weight decay)}, \: \epsilon, \: \textit{maximize}             \\
            &\textbf{initialize} : m_0 \leftarrow 0 \text{ (first moment)},
                \: u_0 \leftarrow 0 \text{ (infinity norm)}                               \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}g_t \leftarrow \pm \nabla_{\theta} f_t (\theta_{t-1})
                + \lambda \theta_{t-1} \quad (- \textbf{ if } \textit{maximize})                 \\
            &\hspace{5mm}m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t                      \\
            &\hspace{5mm}u_t \leftarrow \max(\beta_2 u_{t-1}, |g_t| + \epsilon)                  \\
            &\hspace{5mm}\theta_t \leftarrow \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t}
                \frac{m_t}{u_t}                                                                  \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \:  \theta_t                                                     \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    State, under PyTorch's keys: :math:`m` is ``exp_avg``, :math:`u` is ``exp_inf`` and
    :math:`t` is ``step``.

    Args:
        params (iterable): parameters, named parameters, or dicts defining parameter groups.
        lr (float, Tensor, optional): learning rate :math:`\gamma` (default: 2e-3)
        betas (tuple[float, float], optional): decay rates :math:`(\beta_1, \beta_2)` of the
            first moment and of the infinity norm (default: (0.9, 0.999))
        eps (float, optional): :math:`\epsilon`, added to :math:`|g_t|` (default: 1e-8)
        weight_decay (float, optional): weight decay :math:`\lambda` (L2 penalty) (default: 0)
        foreach (bool, optional): ``True`` runs the same update compiled, on many tensors at
            once (`optlib.fast`); the default (``None``) is the readable loop.
        maximize (bool, optional): maximize the objective instead of minimizing it
            (default: False)
        differentiable, capturable (bool, optional): only ``False`` is supported.

    .. note::
        The paper's Algorithm 2 has no :math:`\epsilon`: :math:`u_t = \max(\beta_2 u_{t-1},
        |g_t|)`, which divides by zero for a coordinate whose gradients have all been zero.
        PyTorch adds :math:`\epsilon` to :math:`|g_t|` inside the maximum, so :math:`u_t \geq
        \epsilon` always; it then holds decayed copies of :math:`\epsilon` too.
    """

    checkpoint_defaults = dict(foreach=None)

    def __init__(
        self,
        params,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
    ) -> None:
        check_tensor_lr(lr)
        check_non_negative(lr=lr, eps=eps)
        check_betas(betas)
        check_non_negative(weight_decay=weight_decay)
        super().__init__(params, hyperparameters(locals()))

    def _init_state(self, param, group):
        return dict(
            step=step_counter(),
            exp_avg=torch.zeros_like(param),
            exp_inf=torch.zeros_like(param),
        )

    @staticmethod
    def _update(param, grad, state, group):
        beta1, beta2 = group["betas"]
        adamax_update(
            real(param),
            real(grad),
            real(state["exp_avg"]),
            real(state["exp_inf"]),
            beta1=beta1,
            beta2=beta2,
            **settings_for(adamax_update, group),  # lr, eps, weight_decay ...
        )
