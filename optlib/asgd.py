r"""ASGD: SGD with a decaying step size and an average of the iterates; a drop-in for
torch.optim.ASGD."""

import torch
from torch import Tensor

from optlib.optimizer import Optimizer, check_non_negative, check_tensor_lr
from optlib.optimizer import hyperparameters, real, settings_for, step_counter

__all__ = ["ASGD", "asgd_update"]


def asgd_update(
    param: Tensor,
    grad: Tensor,
    ax: Tensor,
    eta: Tensor,
    mu: Tensor,
    *,
    step: float,
    lr: float,
    lambd: float,
    alpha: float,
    t0: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """One ASGD step for one tensor, in the order of the equations in `ASGD`.

    Updates ``param``, the average ``ax`` and the 0-dim tensors ``eta`` (the
    step size) and ``mu`` (the averaging weight) in place; ``eta`` and ``mu``
    are those of step t, set at the end of step t-1. ``step`` is t, counted
    from 1. ``grad`` is never modified.
    """
    g = -grad if maximize else grad  # g_t = ±∇f(θ_{t-1})
    if weight_decay != 0:
        g = g.add(param, alpha=weight_decay)  # g_t + λ θ_{t-1}
    eta_t = eta.item()
    param.mul_(1 - lambd * eta_t)  # θ ← (1 - λ_a η_t) θ_{t-1}
    param.add_(g, alpha=-eta_t)  # θ_t = θ - η_t g_t
    # a_t = a_{t-1} + μ_t (θ_t - a_{t-1}); before averaging starts (μ_t = 1), a_t is the iterate
    # itself. A select, not an `if` on μ_t's value: compiled code cannot branch on a tensor's value.
    ax.copy_(torch.where(mu == 1, param, ax.add(param.sub(ax).mul_(mu))))
    # η_{t+1} and μ_{t+1}, rounded to the default dtype as torch rounds them
    # (which matters once a checkpoint has loaded them as float64)
    dtype = torch.get_default_dtype()
    eta.copy_(torch.as_tensor(lr / (1 + lambd * lr * step) ** alpha, dtype=dtype))
    # torch.full, not torch.as_tensor: compiled, as_tensor makes the number a constant of the
    # code, compiled again at every step once averaging has started
    mu.copy_(torch.full((), 1 / max(1, step - t0), dtype=dtype))


class ASGD(Optimizer):
    r"""Implements averaged SGD (Polyak and Juditsky, 1992), with the step sizes of Bottou (2012).

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \gamma \text{ (lr)}, \: \theta_0 \text{ (params)},
                \: f(\theta) \text{ (objective)}, \: \lambda_a \text{ (lambd)},
                \: \alpha \text{ (power)}, \: t_0 \text{ (start of averaging)},                   \\
            &\hspace{13mm} \lambda \text{ (weight decay)}, \: \textit{maximize}                  \\
            &\textbf{initialize} : \eta_1 \leftarrow \gamma, \: \mu_1 \leftarrow 1,
                \: a_0 \leftarrow 0                                                       \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}g_t \leftarrow \pm \nabla_{\theta} f_t (\theta_{t-1})
                + \lambda \theta_{t-1} \quad (- \textbf{ if } \textit{maximize})                 \\
            &\hspace{5mm}\theta_t \leftarrow (1 - \lambda_a \eta_t) \theta_{t-1}
                - \eta_t g_t                                                                      \\
            &\hspace{5mm}\textbf{if} \: \mu_t \neq 1 : \:
                a_t \leftarrow a_{t-1} + \mu_t (\theta_t - a_{t-1})                              \\
            &\hspace{5mm}\textbf{else} : \: a_t \leftarrow \theta_t                              \\
            &\hspace{5mm}\eta_{t+1} \leftarrow \gamma / (1 + \lambda_a \gamma t)^{\alpha}      \\
            &\hspace{5mm}\mu_{t+1} \leftarrow 1 / \max(1, t - t_0)                              \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \:  \theta_t, \: a_t                                            \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    The parameters hold the SGD iterates :math:`\theta_t`; the average :math:`a_t` is in the
    state. To evaluate or keep the averaged model, copy ``state["ax"]`` into the parameters.

    State, under PyTorch's keys: :math:`a` is ``ax``, :math:`\eta` is ``eta``, :math:`\mu` is
    ``mu`` and :math:`t` is ``step``; all on the parameter's device.

    Args:
        params (iterable): parameters, named parameters, or dicts defining parameter groups.
        lr (float, Tensor, optional): learning rate :math:`\gamma` (default: 1e-2)
        lambd (float, optional): :math:`\lambda_a`, the decay term of the step size, which also
            shrinks the weights (default: 1e-4)
        alpha (float, optional): power :math:`\alpha` of the step-size decay (default: 0.75)
        t0 (float, optional): the step :math:`t_0` after which averaging starts (default: 1e6)
        weight_decay (float, optional): weight decay :math:`\lambda` (L2 penalty) (default: 0)
        foreach (bool, optional): ``True`` runs the same update compiled, on many tensors at
            once (`optlib.fast`); the default (``None``) is the readable loop.
        maximize (bool, optional): maximize the objective instead of minimizing it
            (default: False)
        differentiable, capturable (bool, optional): only ``False`` is supported.

    .. note::
        Polyak and Juditsky average every iterate, :math:`a_t = \frac1t \sum_{i \le t}
        \theta_i`, with steps :math:`\eta_t \propto t^{-\alpha}`, :math:`\frac12 < \alpha < 1`.
        PyTorch follows Bottou's "Stochastic gradient descent tricks" (2012): the step
        :math:`\eta_t = \gamma / (1 + \lambda_a \gamma t)^{\alpha}`, a factor
        :math:`(1 - \lambda_a \eta_t)` on the weights (from the L2-regularised objective
        :math:`\frac{\lambda_a}{2}\|\theta\|^2` of that paper, which ``lambd`` stands for), and an
        average that starts after :math:`t_0`: with :math:`\mu_t = 1/\max(1, t - 1 - t_0)`,
        :math:`a_t` is the mean of the iterates :math:`\theta_{t_0 + 2}, \ldots, \theta_t`
        (for an integer :math:`t_0`). With the default :math:`t_0 = 10^6`, a short run never
        averages.
    """

    elementwise = False  # eta and mu: one 0-dim tensor per parameter
    checkpoint_defaults = dict(
        foreach=None, maximize=False, differentiable=False, capturable=False
    )

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        lambd: float = 1e-4,
        alpha: float = 0.75,
        t0: float = 1e6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
    ) -> None:
        check_tensor_lr(lr)
        check_non_negative(lr=lr, weight_decay=weight_decay)
        super().__init__(params, hyperparameters(locals()))

    def _init_state(self, param, group):
        # torch keeps all of ASGD's counters on the parameter's device
        step = step_counter().to(param.device)
        return dict(
            step=step,
            eta=step + float(group["lr"]),  # η_1 = γ
            mu=step + 1.0,  # μ_1 = 1
            ax=torch.zeros_like(param),
        )

    @staticmethod
    def _update(param, grad, state, group):
        asgd_update(
            real(param),
            real(grad),
            real(state["ax"]),
            state["eta"],
            state["mu"],
            **settings_for(asgd_update, group),  # lr, lambd, alpha, t0 ...
        )
