r"""Adam: momentum on the gradient, RMSProp's scaling, both bias-corrected; a drop-in for
torch.optim.Adam."""

import torch
from torch import Tensor

from optlib.optimizer import Optimizer, check_betas, check_non_negative, check_tensor_lr
from optlib.optimizer import hyperparameters, real, settings_for, step_counter
from optlib.rmsprop import average_of_squares_

__all__ = ["Adam", "adam_update"]


def _checked_betas(betas: tuple) -> tuple:
    """torch's checks of betas, in torch's order; a tensor beta is kept as a 0-dim tensor."""
    check_betas(betas)
    if not (all(isinstance(b, float) for b in betas) or all(isinstance(b, Tensor) for b in betas)):
        raise ValueError("betas must be either both floats or both Tensors")
    for index, beta in enumerate(betas):
        if isinstance(beta, Tensor) and beta.numel() != 1:
            raise ValueError(f"Tensor betas[{index}] must be 1-element")
    return tuple(b.squeeze() if isinstance(b, Tensor) else b for b in betas)


def adam_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
) -> None:
    """One Adam step for one tensor, in the order of the equations in `Adam`.

    Updates ``param`` and the moment estimates in place; ``max_exp_avg_sq``
    is used only with ``amsgrad``. ``step`` is t, counted from 1. ``grad``
    is never modified.
    """
    g = -grad if maximize else grad  # g_t = ±∇f(θ_{t-1})
    if weight_decay != 0:
        if decoupled_weight_decay:  # AdamW: shrink θ, outside the moments
            param.mul_(1 - lr * weight_decay)  # θ_{t-1} ← (1 - γλ) θ_{t-1}
        else:  # an L2 penalty: λθ joins g_t and goes through the moments
            g = g.add(param, alpha=weight_decay)  # g_t + λ θ_{t-1}
    exp_avg.lerp_(g, 1 - beta1)  # m_t = β1 m_{t-1} + (1 - β1) g_t
    average_of_squares_(exp_avg_sq, g, beta2)  # v_t = β2 v_{t-1} + (1-β2) g_t²
    if amsgrad:  # v_t^max = max(v_{t-1}^max, v_t), used in place of v_t
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        exp_avg_sq = max_exp_avg_sq
    bias_correction1 = 1 - beta1**step  # m̂_t = m_t / (1 - β1^t)
    bias_correction2 = 1 - beta2**step  # v̂_t = v_t / (1 - β2^t)
    # θ_t = θ_{t-1} - γ m̂_t / (sqrt(v̂_t) + ε), with the corrections folded in
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


class Adam(Optimizer):
    r"""Implements Adam (Kingma and Ba, 2015).

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \gamma \text{ (lr)}, \: \beta_1, \beta_2 \text{ (betas)},
                \: \theta_0 \text{ (params)}, \: f(\theta) \text{ (objective)},
                \: \lambda \text{ (weight decay)},                                                \\
            &\hspace{13mm} \epsilon \text{ (epsilon)}, \: \textit{amsgrad}, \: \textit{maximize},
                \: \textit{decoupled\_weight\_decay}                                              \\
            &\textbf{initialize} : m_0 \leftarrow 0 \text{ (first moment)}, \:
                v_0 \leftarrow 0 \text{ (second moment)}, \: v_0^{max} \leftarrow 0              \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}g_t \leftarrow \pm \nabla_{\theta} f_t (\theta_{t-1})
                \quad (- \textbf{ if } \textit{maximize})                                         \\
            &\hspace{5mm}\textbf{if} \: \lambda \neq 0                                           \\
            &\hspace{10mm}\textbf{if} \: \textit{decoupled\_weight\_decay}                       \\
            &\hspace{15mm} \theta_{t-1} \leftarrow (1 - \gamma \lambda) \theta_{t-1}             \\
            &\hspace{10mm}\textbf{else}                                                          \\
            &\hspace{15mm} g_t \leftarrow g_t + \lambda \theta_{t-1}                             \\
            &\hspace{5mm}m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t                      \\
            &\hspace{5mm}v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2                    \\
            &\hspace{5mm}\textbf{if} \: \textit{amsgrad}                                         \\
            &\hspace{10mm} v_t \leftarrow v_t^{max} \leftarrow \max(v_{t-1}^{max}, v_t)          \\
            &\hspace{5mm}\widehat{m_t} \leftarrow m_t / \big(1 - \beta_1^t \big), \quad
                \widehat{v_t} \leftarrow v_t / \big(1 - \beta_2^t \big)                           \\
            &\hspace{5mm}\theta_t \leftarrow \theta_{t-1} - \gamma \widehat{m_t} /
                \big(\sqrt{\widehat{v_t}} + \epsilon \big)                                       \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \:  \theta_t                                                     \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    State, under PyTorch's keys: :math:`m` is ``exp_avg``, :math:`v` is ``exp_avg_sq``,
    :math:`v^{max}` is ``max_exp_avg_sq`` (only with ``amsgrad``), and :math:`t` is ``step``.

    Args:
        params (iterable): parameters, named parameters, or dicts defining parameter groups.
        lr (float, Tensor, optional): learning rate :math:`\gamma` (default: 1e-3)
        betas (tuple[float, float] or tuple[Tensor, Tensor], optional): decay rates
            :math:`(\beta_1, \beta_2)` of the two moment estimates (default: (0.9, 0.999))
        eps (float, optional): :math:`\epsilon`, added to :math:`\sqrt{\widehat{v_t}}` (default: 1e-8)
        weight_decay (float, optional): weight decay :math:`\lambda` (default: 0)
        amsgrad (bool, optional): use the running maximum of :math:`v_t` (Reddi et al., 2018)
            (default: False)
        foreach, fused (bool, optional): ``True`` runs the same update compiled, on many
            tensors at once (`optlib.fast`); the default (``None``) is the readable loop.
        maximize (bool, optional): maximize the objective instead of minimizing it
            (default: False)
        capturable, differentiable (bool, optional): only ``False`` is supported.
        decoupled_weight_decay (bool, optional): decay the weights directly, as AdamW does,
            instead of adding :math:`\lambda \theta` to the gradient (default: False)

    .. note::
        PyTorch computes :math:`\gamma \widehat{m_t} / (\sqrt{\widehat{v_t}} + \epsilon)` as
        :math:`\frac{\gamma}{1 - \beta_1^t} m_t / (\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon)`:
        the same number as the paper's Algorithm 1, with :math:`\epsilon` added to the
        bias-corrected root. Section 2 of the paper suggests a cheaper order with
        :math:`\hat\epsilon` added to the uncorrected :math:`\sqrt{v_t}`, which TensorFlow
        uses; it is the same update with :math:`\epsilon = \hat\epsilon / \sqrt{1 - \beta_2^t}`,
        which changes over the first steps. ``weight_decay`` is an L2 penalty added to the
        gradient unless ``decoupled_weight_decay`` is set; see `optlib.AdamW`. AMSGrad's
        :math:`v^{max}` is the maximum of the uncorrected :math:`v_t`, as in PyTorch.
    """

    checkpoint_defaults = dict(
        amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False,
        decoupled_weight_decay=False, fused=None,
    )

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
    ) -> None:
        check_tensor_lr(lr)
        check_non_negative(lr=lr, eps=eps)
        betas = _checked_betas(betas)
        check_non_negative(weight_decay=weight_decay)
        super().__init__(params, hyperparameters(locals()))

    def _init_state(self, param, group):
        state = dict(
            step=step_counter(param, group["fused"]),
            exp_avg=torch.zeros_like(param),
            exp_avg_sq=torch.zeros_like(param),
        )
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(param)
        return state

    @staticmethod
    def _update(param, grad, state, group):
        beta1, beta2 = group["betas"]
        adam_update(
            real(param),
            real(grad),
            real(state["exp_avg"]),
            real(state["exp_avg_sq"]),
            real(state.get("max_exp_avg_sq")),
            beta1=beta1,
            beta2=beta2,
            **settings_for(adam_update, group),  # lr, eps, weight_decay ...
        )
