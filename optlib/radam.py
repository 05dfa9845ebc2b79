r"""RAdam: Adam that takes momentum-SGD steps until the variance of its adaptive step can be
estimated, then rectifies that variance; a drop-in for torch.optim.RAdam."""

import torch
from torch import Tensor

from optlib.optimizer import Optimizer, check_betas, check_non_negative, check_tensor_lr
from optlib.optimizer import hyperparameters, real, settings_for, step_counter
from optlib.rmsprop import average_of_squares_

__all__ = ["RAdam", "radam_update", "rectification"]


def rectification(t: float, beta2: float) -> float | None:
    """r_t, the factor that gives the adaptive step a constant variance, or
    None while ρ_t ≤ 5, when that variance is not yet finite enough to
    estimate (Liu et al., 2020, eq. 6 and Algorithm 2)."""
    rho_inf = 2 / (1 - beta2) - 1  # ρ_∞, the length of the SMA as t → ∞
    rho_t = rho_inf - 2 * t * beta2**t / (1 - beta2**t)  # ρ_t
    if rho_t <= 5:
        return None
    numerator = (rho_t - 4) * (rho_t - 2) * rho_inf
    return (numerator / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5


def radam_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> None:
    """One RAdam step for one tensor, in the order of the equations in
    `RAdam`.

    Updates ``param`` and the moments in place. ``step`` is t, counted from
    1. ``grad`` is never modified.
    """
    g = -grad if maximize else grad  # g_t = ±∇f(θ_{t-1})
    if weight_decay != 0:
        if decoupled_weight_decay:  # as AdamW: shrink θ, outside the moments
            param.mul_(1 - lr * weight_decay)
        else:  # an L2 penalty
            g = g.add(param, alpha=weight_decay)  # g_t + λ θ_{t-1}
    exp_avg.lerp_(g, 1 - beta1)  # m_t = β1 m_{t-1} + (1 - β1) g_t
    average_of_squares_(exp_avg_sq, g, beta2)  # v_t = β2 v_{t-1} + (1-β2) g_t²
    m_hat = exp_avg / (1 - beta1**step)  # m̂_t = m_t / (1 - β1^t)
    r = rectification(step, beta2)  # r_t
    if r is None:  # θ_t = θ_{t-1} - γ m̂_t: momentum SGD, no adaptive step
        param.add_(m_hat * lr, alpha=-1.0)
    else:  # θ_t = θ_{t-1} - γ m̂_t l_t r_t, l_t = sqrt(1 - β2^t) / (sqrt(v_t) + ε)
        adaptive = (1 - beta2**step) ** 0.5 / exp_avg_sq.sqrt().add_(eps)
        param.add_(m_hat * lr * adaptive * r, alpha=-1.0)


class RAdam(Optimizer):
    r"""Implements RAdam (Liu et al., 2020).

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \gamma \text{ (lr)}, \: \beta_1, \beta_2 \text{ (betas)},
                \: \theta_0 \text{ (params)}, \: f(\theta) \text{ (objective)},
                \: \lambda \text{ (weight decay)},                                                \\
            &\hspace{13mm} \epsilon, \: \textit{decoupled\_weight\_decay}, \:
                \textit{maximize}                                                                 \\
            &\textbf{initialize} : m_0 \leftarrow 0, \: v_0 \leftarrow 0, \:
                \rho_{\infty} \leftarrow 2/(1-\beta_2) - 1                                \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}g_t \leftarrow \pm \nabla_{\theta} f_t (\theta_{t-1})
                \quad (- \textbf{ if } \textit{maximize})                                         \\
            &\hspace{5mm}\textbf{if} \: \lambda \neq 0                                           \\
            &\hspace{10mm}\textbf{if} \: \textit{decoupled\_weight\_decay} : \:
                \theta_{t-1} \leftarrow (1 - \gamma \lambda) \theta_{t-1}                        \\
            &\hspace{10mm}\textbf{else} : \: g_t \leftarrow g_t + \lambda \theta_{t-1}          \\
            &\hspace{5mm}m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t                      \\
            &\hspace{5mm}v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2                    \\
            &\hspace{5mm}\widehat{m_t} \leftarrow m_t / \big(1 - \beta_1^t \big)                 \\
            &\hspace{5mm}\rho_t \leftarrow \rho_{\infty} - 2 t \beta_2^t / \big(1 - \beta_2^t\big)\\
            &\hspace{5mm}\textbf{if} \: \rho_t > 5                                               \\
            &\hspace{10mm}l_t \leftarrow \sqrt{1 - \beta_2^t} / \big(\sqrt{v_t} + \epsilon\big)  \\
            &\hspace{10mm}r_t \leftarrow \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\rho_{\infty}}
                {(\rho_{\infty} - 4)(\rho_{\infty} - 2)\rho_t}}                                  \\
            &\hspace{10mm}\theta_t \leftarrow \theta_{t-1} - \gamma \widehat{m_t} r_t l_t       \\
            &\hspace{5mm}\textbf{else}                                                           \\
            &\hspace{10mm}\theta_t \leftarrow \theta_{t-1} - \gamma \widehat{m_t}               \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \:  \theta_t                                                     \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    State, under PyTorch's keys: :math:`m` is ``exp_avg``, :math:`v` is ``exp_avg_sq`` and
    :math:`t` is ``step``.

    Args:
        params (iterable): parameters, named parameters, or dicts defining parameter groups.
        lr (float, Tensor, optional): learning rate :math:`\gamma` (default: 1e-3)
        betas (tuple[float, float], optional): decay rates :math:`(\beta_1, \beta_2)` of the
            two moment estimates (default: (0.9, 0.999))
        eps (float, optional): :math:`\epsilon`, added to :math:`\sqrt{v_t}` (default: 1e-8)
        weight_decay (float, optional): weight decay :math:`\lambda` (default: 0)
        decoupled_weight_decay (bool, optional): decay the weights directly, as AdamW does,
            instead of adding :math:`\lambda \theta` to the gradient (default: False)
        foreach (bool, optional): ``True`` runs the same update compiled, on many tensors at
            once (`optlib.fast`); the default (``None``) is the readable loop.
        maximize (bool, optional): maximize the objective instead of minimizing it
            (default: False)
        capturable, differentiable (bool, optional): only ``False`` is supported.

    .. note::
        The paper's Algorithm 2 has no :math:`\epsilon`: :math:`l_t = \sqrt{(1 - \beta_2^t)
        / v_t}`. PyTorch, like the authors' code, adds :math:`\epsilon` to the uncorrected
        :math:`\sqrt{v_t}` (PyTorch's Adam adds it to the corrected root). PyTorch rectifies
        when :math:`\rho_t > 5`; the paper's Algorithm 2 writes :math:`\rho_t > 4`, where
        :math:`r_t` is defined, and the authors' code :math:`\rho_t \geq 5`, "more
        conservative since it's an approximated value". With :math:`\beta_2` from 0.9 to 0.999
        the first 5 steps are momentum-SGD steps.
    """

    checkpoint_defaults = dict(
        foreach=None, maximize=False, differentiable=False, capturable=False,
        decoupled_weight_decay=False,
    )

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
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
            exp_avg_sq=torch.zeros_like(param),
        )

    @staticmethod
    def _update(param, grad, state, group):
        beta1, beta2 = group["betas"]
        radam_update(
            real(param),
            real(grad),
            real(state["exp_avg"]),
            real(state["exp_avg_sq"]),
            beta1=beta1,
            beta2=beta2,
            **settings_for(radam_update, group),  # lr, eps, weight_decay ...
        )
