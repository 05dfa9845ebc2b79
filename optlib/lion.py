r"""Lion: the sign of an interpolated momentum, with decoupled weight decay; a drop-in for
``lion_pytorch.Lion`` (the lion-pytorch package)."""

import torch
from torch import Tensor

from optlib.optimizer import Optimizer, check_non_negative

__all__ = ["Lion", "lion_update"]


def lion_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """One Lion step for one tensor, in the order of the equations in `Lion`.

    Updates ``param`` and ``exp_avg`` (m) in place. ``grad`` is never modified.
    """
    # θ ← (1 - γλ) θ_{t-1}: AdamW's decoupled decay, applied first as in the reference
    param.mul_(1 - lr * weight_decay)
    # c_t = β1 m_{t-1} + (1 - β1) g_t; sgn is the sign (z / |z| for a complex entry)
    update = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1).sgn_()
    param.add_(update, alpha=-lr)  # θ_t = θ - γ sign(c_t)
    exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)  # m_t = β2 m_{t-1} + (1 - β2) g_t


class Lion(Optimizer):
    r"""Implements Lion, EvoLved Sign Momentum (Chen et al., 2023, Algorithm 2).

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \gamma \text{ (lr)}, \: \beta_1, \beta_2 \text{ (betas)},
                \: \theta_0 \text{ (params)}, \: f(\theta) \text{ (objective)},
                \: \lambda \text{ (weight decay)}                                                \\
            &\textbf{initialize} : m_0 \leftarrow 0 \text{ (momentum)}                          \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}g_t \leftarrow \nabla_{\theta} f_t (\theta_{t-1})                       \\
            &\hspace{5mm}c_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t                      \\
            &\hspace{5mm}\theta_t \leftarrow \theta_{t-1}
                - \gamma \big( \operatorname{sign}(c_t) + \lambda \theta_{t-1} \big)             \\
            &\hspace{5mm}m_t \leftarrow \beta_2 m_{t-1} + (1 - \beta_2) g_t                      \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \:  \theta_t                                                     \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    Every coordinate whose :math:`c_t` is not 0 moves by exactly :math:`\gamma` (plus the decay):
    the sign throws away the magnitude that Adam divides out with :math:`\sqrt{v_t}`. The step direction interpolates with
    :math:`\beta_1`, the stored momentum with the larger :math:`\beta_2`, so the step reacts
    faster to the current gradient than the memory it keeps. One state tensor per parameter,
    ``exp_avg`` (:math:`m`), half of Adam's; no step count.

    Args:
        params (iterable): parameters or dicts defining parameter groups.
        lr (float, optional): learning rate :math:`\gamma`, greater than 0 (default: 1e-4)
        betas (tuple[float, float], optional): :math:`(\beta_1, \beta_2)`, each in [0, 1]
            (default: (0.9, 0.99))
        weight_decay (float, optional): decoupled weight decay :math:`\lambda` (default: 0)
        use_triton (bool, optional): ``True`` runs the same update compiled with
            ``torch.compile`` (`optlib.fast`; on CUDA it generates Triton kernels) in place of
            lion-pytorch's hand-written Triton kernel (default: False)
        decoupled_weight_decay (bool, optional): divide ``weight_decay`` by the learning rate
            given to the constructor, so that the decay per step, :math:`\gamma \lambda /
            \gamma_0`, does not grow with the initial rate (default: False)

    .. note::
        This class follows lion-pytorch 0.2.5 (lucidrains), the package most Lion users
        install, which follows the authors' PyTorch code: the decay is applied as
        :math:`\theta \leftarrow (1 - \gamma\lambda)\theta` before the sign step. That is the
        :math:`\theta_t` of the algorithm above (and of the paper's Program 1, which computes
        :math:`\gamma(\operatorname{sign}(c_t) + \lambda\theta)` in one expression) in exact
        arithmetic, rounded in another order. Its checks are assertions, so its bad
        arguments raise ``AssertionError``; optlib raises the same type (explicitly, so that
        ``python -O`` keeps the check) with a message naming the value, and also refuses a
        negative ``weight_decay`` with torch's ``ValueError``, which lion-pytorch accepts.
        ``decoupled_weight_decay`` divides by the constructor's ``lr``, not by each group's,
        as lion-pytorch does. It has no ``maximize``; complex parameters take the complex sign
        :math:`z / |z|`, as in lion-pytorch.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        use_triton: bool = False,
        decoupled_weight_decay: bool = False,
    ) -> None:
        if not lr > 0.0:
            raise AssertionError(f"Invalid learning rate: {lr} (Lion needs lr > 0)")
        for index, beta in enumerate(betas):
            if not 0.0 <= beta <= 1.0:
                raise AssertionError(f"Invalid beta parameter at index {index}: {beta}")
        check_non_negative(weight_decay=weight_decay)
        # lion-pytorch keeps these two on the optimizer, not in the parameter groups, so a
        # checkpoint has the same groups in both packages.
        self._init_lr = lr
        self.decoupled_wd = decoupled_weight_decay
        self.use_triton = use_triton
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    def _init_state(self, param, group):
        return dict(exp_avg=torch.zeros_like(param))

    def _settings(self, group):
        settings = super()._settings(group)
        if self.decoupled_wd:
            settings["weight_decay"] /= self._init_lr
        settings["foreach"] = self.use_triton  # the compiled fast path
        return settings

    @staticmethod
    def _update(param, grad, state, group):
        beta1, beta2 = group["betas"]
        lion_update(
            param,
            grad,
            state["exp_avg"],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
        )
