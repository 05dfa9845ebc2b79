r"""Stochastic gradient descent with optional (Nesterov) momentum: a drop-in for torch.optim.SGD."""

from torch import Tensor

from optlib.optimizer import (
    Optimizer,
    check_non_negative,
    check_tensor_lr,
    hyperparameters,
    settings_for,
)

__all__ = ["SGD", "sgd_update"]


def sgd_update(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> Tensor | None:
    """One SGD step for one tensor, in the order of the equations in `SGD`.

    Updates ``param`` (and ``momentum_buffer``) in place and returns the
    buffer: a new one on the first step, ``None`` when ``momentum == 0``.
    ``grad`` itself is never modified: every operation on it makes a new
    tensor.
    """
    g = -grad if maximize else grad  # g_t = ±∇f(θ_{t-1})
    if weight_decay != 0:
        g = g.add(param, alpha=weight_decay)  # g_t + λ θ_{t-1}
    u = g  # u_t = g_t: the step direction without momentum
    if momentum != 0:
        if momentum_buffer is None:
            momentum_buffer = g.clone()  # b_1 = g_1: no dampening on step 1
        else:  # b_t = μ b_{t-1} + (1 - τ) g_t
            momentum_buffer.mul_(momentum).add_(g, alpha=1 - dampening)
        if nesterov:
            u = g.add(momentum_buffer, alpha=momentum)  # u_t = g_t + μ b_t
        else:
            u = momentum_buffer  # u_t = b_t
    param.add_(u, alpha=-lr)  # θ_t = θ_{t-1} - γ u_t
    return momentum_buffer


class SGD(Optimizer):
    r"""Implements stochastic gradient descent (optionally with momentum).

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \gamma \text{ (lr)}, \: \theta_0 \text{ (params)}, \: f(\theta)
                \text{ (objective)}, \: \lambda \text{ (weight decay)},                          \\
            &\hspace{13mm} \:\mu \text{ (momentum)}, \:\tau \text{ (dampening)},
            \:\textit{ nesterov,}\:\textit{ maximize}                                     \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}\textbf{if} \: \textit{maximize}:                                       \\
            &\hspace{10mm}g_t           \leftarrow   -\nabla_{\theta} f_t (\theta_{t-1})         \\
            &\hspace{5mm}\textbf{else}                                                           \\
            &\hspace{10mm}g_t           \leftarrow   \nabla_{\theta} f_t (\theta_{t-1})          \\
            &\hspace{5mm}\textbf{if} \: \lambda \neq 0                                           \\
            &\hspace{10mm} g_t \leftarrow g_t + \lambda  \theta_{t-1}                            \\
            &\hspace{5mm}\textbf{if} \: \mu \neq 0                                               \\
            &\hspace{10mm}\textbf{if} \: t > 1                                                   \\
            &\hspace{15mm} \textbf{b}_t \leftarrow \mu \textbf{b}_{t-1} + (1-\tau) g_t           \\
            &\hspace{10mm}\textbf{else}                                                          \\
            &\hspace{15mm} \textbf{b}_t \leftarrow g_t                                           \\
            &\hspace{10mm}\textbf{if} \: \textit{nesterov}                                       \\
            &\hspace{15mm} g_t \leftarrow g_{t} + \mu \textbf{b}_t                               \\
            &\hspace{10mm}\textbf{else}                                                   \\[-1.ex]
            &\hspace{15mm} g_t  \leftarrow  \textbf{b}_t                                         \\
            &\hspace{5mm}\theta_t \leftarrow \theta_{t-1} - \gamma g_t                    \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \:  \theta_t                                                     \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    The buffer :math:`\textbf{b}` is ``state["momentum_buffer"]``; it exists only when
    :math:`\mu \neq 0`.

    Args:
        params (iterable): parameters, named parameters, or dicts defining parameter groups.
        lr (float, Tensor, optional): learning rate :math:`\gamma` (default: 1e-3)
        momentum (float, optional): momentum factor :math:`\mu` (default: 0)
        dampening (float, optional): dampening :math:`\tau` for momentum (default: 0)
        weight_decay (float, optional): weight decay :math:`\lambda` (L2 penalty) (default: 0)
        nesterov (bool, optional): Nesterov momentum; needs momentum > 0 and zero
            dampening (default: False)
        maximize (bool, optional): maximize the objective instead of minimizing it
            (default: False)
        foreach, fused (bool, optional): ``True`` runs the same update compiled, on many
            tensors at once (`optlib.fast`); the default (``None``) is the readable loop.
        differentiable (bool, optional): only ``False`` is supported.

    .. note::
        Like PyTorch, and unlike Sutskever et al. (2013), "On the importance of initialization
        and momentum in deep learning", the learning rate multiplies the buffer *outside* it:

        .. math::
            \text{PyTorch: } b_t = \mu b_{t-1} + g_t,\ \theta_t = \theta_{t-1} - \gamma b_t
            \qquad
            \text{Sutskever: } \Delta_t = \mu \Delta_{t-1} - \gamma g_t,\
            \theta_t = \theta_{t-1} + \Delta_t.

        With a constant :math:`\gamma` the two give the same iterates
        (:math:`\Delta_t = -\gamma b_t`);
        when :math:`\gamma` changes (a schedule), PyTorch applies the new rate to the whole
        accumulated buffer at once, Sutskever's only to new gradients. The Nesterov variant
        :math:`\theta_t = \theta_{t-1} - \gamma (g_t + \mu b_t)` is the same idea rewritten so
        that it needs the gradient at :math:`\theta_{t-1}` only, not at the look-ahead point.
        Finally, the buffer starts as a copy of the first gradient (:math:`b_1 = g_1`), not as
        zeros, so dampening only applies from the second step on.
    """

    accepts_sparse_gradients = True
    checkpoint_defaults = dict(
        nesterov=False, maximize=False, foreach=None, differentiable=False, fused=False
    )

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        check_tensor_lr(lr)
        check_non_negative(lr=lr, momentum=momentum, weight_decay=weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(
                "Nesterov momentum requires a momentum and zero dampening, "
                f"got momentum={momentum}, dampening={dampening}"
            )
        super().__init__(params, hyperparameters(locals()))

    @staticmethod
    def _update(param, grad, state, group):
        buffer = sgd_update(
            param,
            grad,
            state.get("momentum_buffer"),
            **settings_for(sgd_update, group),  # lr, momentum ...
        )
        if buffer is not None:  # plain SGD (momentum 0) keeps no state
            state["momentum_buffer"] = buffer
