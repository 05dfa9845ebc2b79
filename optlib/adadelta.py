r"""Adadelta: RMSProp's scaling with a numerator that carries the parameter's units; a drop-in
for torch.optim.Adadelta."""

import torch
from torch import Tensor

from optlib.optimizer import Optimizer, check_non_negative, check_tensor_lr
from optlib.optimizer import hyperparameters, real, settings_for, step_counter
from optlib.rmsprop import average_of_squares_

__all__ = ["Adadelta", "adadelta_update"]


def adadelta_update(
    param: Tensor,
    grad: Tensor,
    square_avg: Tensor,
    acc_delta: Tensor,
    *,
    lr: float,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """One Adadelta step for one tensor, in the order of the equations in
    `Adadelta`.

    Updates ``param``, ``square_avg`` (v) and ``acc_delta`` (u) in place.
    ``grad`` is never modified.
    """
    g = -grad if maximize else grad  # g_t = ±∇f(θ_{t-1})
    if weight_decay != 0:
        g = g.add(param, alpha=weight_decay)  # g_t + λ θ_{t-1}
    average_of_squares_(square_avg, g, rho)  # v_t = ρ v_{t-1} + (1 - ρ) g_t²
    rms_g = square_avg.add(eps).sqrt_()  # RMS[g]_t = sqrt(v_t + ε)
    rms_delta = acc_delta.add(eps).sqrt_()  # RMS[Δθ]_{t-1} = sqrt(u_{t-1} + ε)
    delta = rms_delta.div_(rms_g).mul_(g)  # Δθ_t = RMS[Δθ]_{t-1} / RMS[g]_t g_t
    average_of_squares_(acc_delta, delta, rho)  # u_t = ρ u_{t-1} + (1 - ρ) Δθ_t²
    param.add_(delta, alpha=-lr)  # θ_t = θ_{t-1} - γ Δθ_t


class Adadelta(Optimizer):
    r"""Implements Adadelta (Zeiler, 2012).

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \gamma \text{ (lr)}, \: \theta_0 \text{ (params)},
                \: f(\theta) \text{ (objective)}, \: \rho \text{ (decay)},
                \: \lambda \text{ (weight decay)}, \: \epsilon, \: \textit{maximize}             \\
            &\textbf{initialize} :  v_0 \leftarrow 0 \text{ (square avg)},
                \: u_0 \leftarrow 0 \text{ (accumulated squared updates)}                 \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}g_t \leftarrow \pm \nabla_{\theta} f_t (\theta_{t-1})
                + \lambda \theta_{t-1} \quad (- \textbf{ if } \textit{maximize})                 \\
            &\hspace{5mm}v_t \leftarrow \rho v_{t-1} + (1 - \rho) g_t^2                          \\
            &\hspace{5mm}\Delta\theta_t \leftarrow \frac{\sqrt{u_{t-1} + \epsilon}}
                {\sqrt{v_t + \epsilon}} \, g_t                                                   \\
            &\hspace{5mm}u_t \leftarrow \rho u_{t-1} + (1 - \rho) \Delta\theta_t^2               \\
            &\hspace{5mm}\theta_t \leftarrow \theta_{t-1} - \gamma \Delta\theta_t                \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \:  \theta_t                                                     \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    State, under PyTorch's keys: :math:`v` is ``square_avg``, :math:`u` is ``acc_delta`` and
    :math:`t` is ``step``.

    Args:
        params (iterable): parameters, named parameters, or dicts defining parameter groups.
        lr (float, Tensor, optional): a factor :math:`\gamma` on the update (default: 1.0)
        rho (float, optional): decay rate :math:`\rho` of both running averages (default: 0.9)
        eps (float, optional): :math:`\epsilon`, added inside both roots (default: 1e-6)
        weight_decay (float, optional): weight decay :math:`\lambda` (L2 penalty) (default: 0)
        foreach (bool, optional): ``True`` runs the same update compiled, on many tensors at
            once (`optlib.fast`); the default (``None``) is the readable loop.
        maximize (bool, optional): maximize the objective instead of minimizing it
            (default: False)
        capturable, differentiable (bool, optional): only ``False`` is supported.

    .. note::
        Zeiler's Algorithm 1 has no learning rate: :math:`\theta_t = \theta_{t-1} + \Delta x_t`
        with :math:`\Delta x_t = -\frac{RMS[\Delta x]_{t-1}}{RMS[g]_t} g_t`. PyTorch adds the
        factor :math:`\gamma`, with default 1.0, which is the paper's update; the paper's
        decay rate is 0.95 in its experiments, PyTorch's default 0.9. :math:`\epsilon` sits inside
        both roots, as in the paper; in the numerator it also starts the steps off, since
        :math:`u_0 = 0`.
    """

    checkpoint_defaults = dict(foreach=None)

    def __init__(
        self,
        params,
        lr: float | Tensor = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
    ) -> None:
        check_tensor_lr(lr)
        check_non_negative(lr=lr)
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"Invalid rho value: {rho}")
        check_non_negative(eps=eps, weight_decay=weight_decay)
        super().__init__(params, hyperparameters(locals()))

    def _init_state(self, param, group):
        return dict(
            step=step_counter(),
            square_avg=torch.zeros_like(param),
            acc_delta=torch.zeros_like(param),
        )

    @staticmethod
    def _update(param, grad, state, group):
        adadelta_update(
            real(param),
            real(grad),
            real(state["square_avg"]),
            real(state["acc_delta"]),
            **settings_for(adadelta_update, group),  # lr, rho, eps ...
        )
