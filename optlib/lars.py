r"""LARS: SGD with momentum whose step for each weight matrix is scaled by a trust ratio, the
matrix's norm over its gradient's; a drop-in for ``pytorch_optimizer.LARS`` (the
pytorch-optimizer package)."""

import torch
from torch import Tensor

from optlib.optimizer import Optimizer, check_non_negative

__all__ = ["LARS", "lars_update"]


def lars_update(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    trust_coefficient: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """One LARS step for one tensor, in the order of the equations in `LARS`.

    Updates ``param`` and ``momentum_buffer`` (b) in place. ``grad`` is never modified. Vectors and
    scalars (biases, normalization weights) take a plain SGD step, without decay or trust ratio.
    """
    grad = -grad if maximize else grad
    if param.ndim > 1:
        weight_norm = torch.linalg.norm(param)  # ‖θ‖
        # λ‖θ‖ + ‖g‖ in this order: in the other, a process that has added a number to a norm on
        # FSDP2's shards (Lamb's ‖u‖ + ε) fails here, a fault of torch 2.13's DTensor cache
        denominator = weight_decay * weight_norm + torch.linalg.norm(grad)
        one = torch.ones_like(weight_norm)
        # η ‖θ‖ / (‖g‖ + λ‖θ‖); 1 where a norm is 0 (a zero matrix takes the plain SGD step)
        trust_ratio = torch.where(
            weight_norm > 0.0,
            torch.where(denominator > 0.0, trust_coefficient * weight_norm / denominator, one),
            one,
        )
        grad = grad.add(param, alpha=weight_decay).mul_(trust_ratio)  # u_t = ratio (g + λθ)
    if momentum > 0.0:
        momentum_buffer.mul_(momentum).add_(grad, alpha=1.0 - dampening)  # b_t = μ b + (1 - τ) u_t
        grad = grad.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    param.add_(grad, alpha=-lr)  # θ_t = θ - γ b_t


class LARS(Optimizer):
    r"""Implements LARS, layer-wise adaptive rate scaling (You, Gitman and Ginsburg, 2017, Algorithm 1).

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \gamma \text{ (lr)}, \: \eta \text{ (trust coefficient)},
                \: \mu \text{ (momentum)}, \: \tau \text{ (dampening)},
                \: \lambda \text{ (weight decay)}, \: \theta_0 \text{ (params)}                 \\
            &\textbf{initialize} : b_0 \leftarrow 0 \text{ (momentum buffer)}                   \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}g_t \leftarrow \nabla_{\theta} f_t (\theta_{t-1})                       \\
            &\hspace{5mm}\textbf{if} \: \theta \text{ is a matrix (or has more dimensions)}     \\
            &\hspace{10mm}u_t \leftarrow \frac{\eta \lVert\theta_{t-1}\rVert}
                {\lVert g_t \rVert + \lambda \lVert\theta_{t-1}\rVert}
                \big(g_t + \lambda\theta_{t-1}\big)                                              \\
            &\hspace{5mm}\textbf{else} \: u_t \leftarrow g_t                                     \\
            &\hspace{5mm}b_t \leftarrow \mu b_{t-1} + (1 - \tau) u_t                             \\
            &\hspace{5mm}\textbf{if} \: \textit{nesterov} \: d_t \leftarrow u_t + \mu b_t
                \: \textbf{else} \: d_t \leftarrow b_t                                           \\
            &\hspace{5mm}\theta_t \leftarrow \theta_{t-1} - \gamma d_t                           \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \:  \theta_t                                                     \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    The trust ratio makes the step of a weight matrix a fixed fraction of its norm,
    :math:`\gamma\eta\lVert\theta\rVert` without momentum and decay, whatever its gradient's norm:
    layers whose gradients are large compared with their weights (the first ones, early in
    training) no longer set the largest stable rate for all. That is what lets SGD take the large
    rates of large batches. State: ``momentum_buffer`` (:math:`b`) when :math:`\mu > 0`.

    Args:
        params (iterable): parameters or dicts defining parameter groups.
        lr (float, optional): learning rate :math:`\gamma` (default: 1e-3)
        weight_decay (float, optional): :math:`\lambda` (default: 0)
        momentum (float, optional): :math:`\mu`, in [0, 1) (default: 0.9)
        dampening (float, optional): :math:`\tau`, in [0, 1) (default: 0)
        trust_coefficient (float, optional): :math:`\eta` (default: 1e-3)
        nesterov (bool, optional): Nesterov momentum (default: False)
        foreach (bool, optional): accepted for compatibility; optlib always runs its loop (the
            trust ratio needs a norm of each tensor, so there is no element-wise fast path)
            (default: None)
        maximize (bool, optional): maximize the objective (default: False)

    .. note::
        This class follows pytorch-optimizer 4.1.0 (``pytorch_optimizer.LARS``). Where it
        differs from the paper: the paper folds the rate into the momentum,
        :math:`v_t = \mu v_{t-1} + \gamma_t u_t`, here :math:`\gamma` multiplies the buffer, as in
        ``torch.optim.SGD`` (the same for a constant rate, not under a schedule); it leaves
        vectors and scalars out of the trust ratio and the decay, as large-batch training practice
        does (the paper scales every layer); a zero norm gives a ratio of 1, not
        :math:`\eta`; dampening and Nesterov are additions. The buffer starts at 0, so the first
        step is :math:`(1 - \tau)` of the scaled gradient (torch's SGD starts the buffer at the
        gradient). Differences from the reference: ``p.grad`` is never modified (the reference
        leaves the step direction in it); a negative ``lr`` raises torch's ``ValueError`` (the
        reference raises its own ``NegativeLRError``).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        dampening: float = 0.0,
        trust_coefficient: float = 1e-3,
        nesterov: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        **kwargs,
    ) -> None:
        if kwargs:
            raise NotImplementedError(f"optlib.LARS does not implement the options {sorted(kwargs)}")
        check_non_negative(lr=lr, weight_decay=weight_decay, trust_coefficient=trust_coefficient)
        for name, value in [("momentum", momentum), ("dampening", dampening)]:
            if not 0.0 <= value < 1.0:
                raise ValueError(f"Invalid {name} value: {value} (must be in [0, 1))")
        # kept on the optimizer, not in the groups, as the reference keeps them
        self.foreach = foreach
        self.maximize = maximize
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            dampening=dampening,
            trust_coefficient=trust_coefficient,
            nesterov=nesterov,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def _init_state(self, param, group):
        return dict(momentum_buffer=torch.zeros_like(param)) if group["momentum"] > 0.0 else {}

    def _settings(self, group):
        group["step"] = group.get("step", 0) + 1  # one count per group, as the reference keeps it
        return super()._settings(group) | dict(maximize=self.maximize, foreach=False)  # the loop

    @staticmethod
    def _update(param, grad, state, group):
        lars_update(
            param,
            grad,
            state.get("momentum_buffer"),
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            trust_coefficient=group["trust_coefficient"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
