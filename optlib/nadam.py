r"""NAdam: Adam with Nesterov's look-ahead on the first moment, and a momentum schedule; a
drop-in for torch.optim.NAdam."""

import torch
from torch import Tensor

from optlib.optimizer import Optimizer, check_betas, check_non_negative, check_tensor_lr
from optlib.optimizer import hyperparameters, real, settings_for, step_counter
from optlib.rmsprop import average_of_squares_

__all__ = ["NAdam", "nadam_update", "momentum_schedule"]


def momentum_schedule(t: float, beta1: float, momentum_decay: float) -> float:
    """μ_t = β1 (1 - 0.5 · 0.96^(t ψ)): Dozat's warming momentum, from β1/2
    at t = 0 towards β1."""
    return beta1 * (1.0 - 0.5 * (0.96 ** (t * momentum_decay)))


def nadam_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    mu_product: Tensor,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    momentum_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> None:
    """One NAdam step for one tensor, in the order of the equations in
    `NAdam`.

    Updates ``param``, the moments and ``mu_product`` (the product of the
    μ_i so far, a 0-dim tensor) in place. ``step`` is t, counted from 1.
    ``grad`` is never modified.
    """
    g = -grad if maximize else grad  # g_t = ±∇f(θ_{t-1})
    if weight_decay != 0:
        if decoupled_weight_decay:  # as AdamW: shrink θ, outside the moments
            param.mul_(1 - lr * weight_decay)
        else:  # an L2 penalty
            g = g.add(param, alpha=weight_decay)  # g_t + λ θ_{t-1}
    mu = momentum_schedule(step, beta1, momentum_decay)  # μ_t
    mu_next = momentum_schedule(step + 1, beta1, momentum_decay)  # μ_{t+1}
    mu_product.mul_(mu)  # Π_{i≤t} μ_i, kept as a tensor as torch does
    prod = mu_product.item()
    prod_next = prod * mu_next  # Π_{i≤t+1} μ_i
    exp_avg.lerp_(g, 1 - beta1)  # m_t = β1 m_{t-1} + (1 - β1) g_t
    average_of_squares_(exp_avg_sq, g, beta2)  # v_t = β2 v_{t-1} + (1-β2) g_t²
    # sqrt(v̂_t) + ε, with v̂_t = v_t / (1 - β2^t)
    denom = exp_avg_sq.div(1 - beta2**step).sqrt().add_(eps)
    # θ_t = θ_{t-1} - γ [(1 - μ_t) g_t / (1 - Π_{i≤t} μ_i)
    #                    + μ_{t+1} m_t / (1 - Π_{i≤t+1} μ_i)] / (sqrt(v̂_t) + ε)
    param.addcdiv_(g, denom, value=-lr * (1.0 - mu) / (1.0 - prod))
    param.addcdiv_(exp_avg, denom, value=-lr * mu_next / (1.0 - prod_next))


class NAdam(Optimizer):
    r"""Implements NAdam (Dozat, 2016).

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \gamma \text{ (lr)}, \: \beta_1, \beta_2 \text{ (betas)},
                \: \theta_0 \text{ (params)}, \: f(\theta) \text{ (objective)},
                \: \lambda \text{ (weight decay)},                                                \\
            &\hspace{13mm} \psi \text{ (momentum decay)}, \: \epsilon, \:
                \textit{decoupled\_weight\_decay}, \: \textit{maximize}                           \\
            &\textbf{initialize} : m_0 \leftarrow 0 \text{ (first moment)},
                \: v_0 \leftarrow 0 \text{ (second moment)}                               \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}g_t \leftarrow \pm \nabla_{\theta} f_t (\theta_{t-1})
                \quad (- \textbf{ if } \textit{maximize})                                         \\
            &\hspace{5mm}\textbf{if} \: \lambda \neq 0                                           \\
            &\hspace{10mm}\textbf{if} \: \textit{decoupled\_weight\_decay} : \:
                \theta_{t-1} \leftarrow (1 - \gamma \lambda) \theta_{t-1}                        \\
            &\hspace{10mm}\textbf{else} : \: g_t \leftarrow g_t + \lambda \theta_{t-1}          \\
            &\hspace{5mm}\mu_t \leftarrow \beta_1 \big(1 - \tfrac{1}{2} \, 0.96^{t \psi}\big),
                \quad \mu_{t+1} \leftarrow \beta_1 \big(1 - \tfrac{1}{2} \, 0.96^{(t+1)\psi}\big) \\
            &\hspace{5mm}m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t                      \\
            &\hspace{5mm}v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2                    \\
            &\hspace{5mm}\widehat{m_t} \leftarrow \frac{\mu_{t+1} m_t}{1 - \prod_{i=1}^{t+1}
                \mu_i} + \frac{(1 - \mu_t) g_t}{1 - \prod_{i=1}^{t} \mu_i}, \quad
                \widehat{v_t} \leftarrow \frac{v_t}{1 - \beta_2^t}                                \\
            &\hspace{5mm}\theta_t \leftarrow \theta_{t-1} - \gamma \widehat{m_t} /
                \big(\sqrt{\widehat{v_t}} + \epsilon \big)                                       \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \:  \theta_t                                                     \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    State, under PyTorch's keys: :math:`m` is ``exp_avg``, :math:`v` is ``exp_avg_sq``,
    :math:`\prod_{i \le t} \mu_i` is ``mu_product`` and :math:`t` is ``step``.

    Args:
        params (iterable): parameters, named parameters, or dicts defining parameter groups.
        lr (float, Tensor, optional): learning rate :math:`\gamma` (default: 2e-3)
        betas (tuple[float, float], optional): :math:`(\beta_1, \beta_2)`: the momentum the
            schedule approaches, and the decay rate of the second moment (default: (0.9, 0.999))
        eps (float, optional): :math:`\epsilon`, added to :math:`\sqrt{\widehat{v_t}}`
            (default: 1e-8)
        weight_decay (float, optional): weight decay :math:`\lambda` (default: 0)
        momentum_decay (float, optional): :math:`\psi` of the momentum schedule (default: 4e-3)
        decoupled_weight_decay (bool, optional): decay the weights directly, as AdamW does
            (NAdamW), instead of adding :math:`\lambda \theta` to the gradient (default: False)
        foreach (bool, optional): ``True`` runs the same update compiled, on many tensors at
            once (`optlib.fast`); the default (``None``) is the readable loop.
        maximize (bool, optional): maximize the objective instead of minimizing it
            (default: False)
        capturable, differentiable (bool, optional): only ``False`` is supported.

    .. note::
        Dozat (2016) replaces Nesterov's look-ahead point with a look-ahead in the update: the
        step uses :math:`\mu_{t+1} \widehat{m_t}`, the momentum as it will be after the next
        step, plus :math:`(1-\mu_t)` of the current gradient. The schedule
        :math:`\mu_t = \beta_1 (1 - \frac12 0.96^{t \psi})` is Dozat's (after Sutskever et
        al., 2013) with :math:`\psi = 0.004`; the first moment itself is still averaged with the
        constant :math:`\beta_1`, as in PyTorch and in Keras. ``decoupled_weight_decay`` is
        PyTorch's addition.
    """

    elementwise = False  # mu_product: one 0-dim tensor per parameter
    checkpoint_defaults = dict(
        maximize=False, foreach=None, capturable=False, differentiable=False,
        decoupled_weight_decay=False,
    )

    def __init__(
        self,
        params,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum_decay: float = 4e-3,
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
        check_non_negative(weight_decay=weight_decay, momentum_decay=momentum_decay)
        super().__init__(params, hyperparameters(locals()))

    def _init_state(self, param, group):
        return dict(
            step=step_counter(),
            mu_product=step_counter() + 1.0,  # Π_{i≤0} μ_i = 1, kept like the step count
            exp_avg=torch.zeros_like(param),
            exp_avg_sq=torch.zeros_like(param),
        )

    @staticmethod
    def _update(param, grad, state, group):
        beta1, beta2 = group["betas"]
        nadam_update(
            real(param),
            real(grad),
            real(state["exp_avg"]),
            real(state["exp_avg_sq"]),
            state["mu_product"],
            beta1=beta1,
            beta2=beta2,
            **settings_for(nadam_update, group),  # lr, eps, momentum_decay ...
        )
