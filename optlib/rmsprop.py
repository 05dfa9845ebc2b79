r"""RMSProp: divide the gradient by a running root mean square of its recent values; a drop-in
for torch.optim.RMSprop."""

import torch
from torch import Tensor

from optlib.optimizer import Optimizer, check_non_negative, check_tensor_lr
from optlib.optimizer import hyperparameters, real, settings_for, step_counter

__all__ = ["RMSprop", "rmsprop_update", "average_of_squares_"]


def average_of_squares_(avg: Tensor, grad: Tensor, decay: float) -> Tensor:
    """v <- decay v + (1 - decay) g^2, in place: the second-moment estimate
    that RMSprop (decay = alpha) and Adam (decay = beta2) share."""
    return avg.mul_(decay).addcmul_(grad, grad, value=1 - decay)


def rmsprop_update(
    param: Tensor,
    grad: Tensor,
    square_avg: Tensor,
    grad_avg: Tensor | None,
    momentum_buffer: Tensor | None,
    *,
    lr: float,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
) -> None:
    """One RMSprop step for one tensor, in the order of the equations in
    `RMSprop`.

    Updates ``param`` and the state tensors in place. ``grad_avg`` is used
    only when ``centered``, ``momentum_buffer`` only when ``momentum > 0``.
    ``grad`` is never modified.
    """
    g = -grad if maximize else grad  # g_t = ±∇f(θ_{t-1})
    if weight_decay != 0:
        g = g.add(param, alpha=weight_decay)  # g_t + λ θ_{t-1}
    # v_t = α v_{t-1} + (1 - α) g_t², the average that Adam shares
    v = average_of_squares_(square_avg, g, alpha)
    if centered:
        grad_avg.lerp_(g, 1 - alpha)  # m_t = α m_{t-1} + (1 - α) g_t
        v = v.addcmul(grad_avg, grad_avg, value=-1)  # ṽ_t = v_t - m_t²
    denom = v.sqrt().add_(eps)  # sqrt(ṽ_t) + ε
    if momentum > 0:
        # b_t = μ b_{t-1} + g_t / (sqrt(ṽ_t) + ε), θ_t = θ_{t-1} - γ b_t
        momentum_buffer.mul_(momentum).addcdiv_(g, denom)
        param.add_(momentum_buffer, alpha=-lr)
    else:  # θ_t = θ_{t-1} - γ g_t / (sqrt(ṽ_t) + ε)
        param.addcdiv_(g, denom, value=-lr)


class RMSprop(Optimizer):
    r"""Implements RMSprop (Tieleman and Hinton, 2012).

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \gamma \text{ (lr)}, \: \alpha \text{ (alpha)}, \:
                \theta_0 \text{ (params)}, \: f(\theta) \text{ (objective)},
                \: \lambda \text{ (weight decay)},                                                \\
            &\hspace{13mm} \mu \text{ (momentum)}, \: \epsilon \text{ (epsilon)},
                \: \textit{centered}, \: \textit{maximize}                                       \\
            &\textbf{initialize} : v_0 \leftarrow 0 \text{ (square average)}, \:
                b_0 \leftarrow 0 \text{ (buffer)}, \: m_0 \leftarrow 0 \text{ (gradient average)} \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}g_t \leftarrow \pm \nabla_{\theta} f_t (\theta_{t-1})
                + \lambda \theta_{t-1} \quad (- \textbf{ if } \textit{maximize})                 \\
            &\hspace{5mm}v_t \leftarrow \alpha v_{t-1} + (1 - \alpha) g_t^2                      \\
            &\hspace{5mm}\tilde{v}_t \leftarrow v_t                                              \\
            &\hspace{5mm}\textbf{if} \: \textit{centered}                                        \\
            &\hspace{10mm} m_t \leftarrow \alpha m_{t-1} + (1 - \alpha) g_t                      \\
            &\hspace{10mm} \tilde{v}_t \leftarrow v_t - m_t^2                                    \\
            &\hspace{5mm}\textbf{if} \: \mu > 0                                                  \\
            &\hspace{10mm} b_t \leftarrow \mu b_{t-1} + g_t / \big(\sqrt{\tilde{v}_t} + \epsilon \big) \\
            &\hspace{10mm} \theta_t \leftarrow \theta_{t-1} - \gamma b_t                         \\
            &\hspace{5mm}\textbf{else}                                                           \\
            &\hspace{10mm} \theta_t \leftarrow \theta_{t-1} - \gamma g_t /
                \big(\sqrt{\tilde{v}_t} + \epsilon \big)                                         \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \:  \theta_t                                                     \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    State, under PyTorch's keys: :math:`v` is ``square_avg``, :math:`m` is ``grad_avg`` (only when
    ``centered``), :math:`b` is ``momentum_buffer`` (only when :math:`\mu > 0`), and ``step``
    counts steps (RMSprop does not use it).

    Args:
        params (iterable): parameters, named parameters, or dicts defining parameter groups.
        lr (float, Tensor, optional): learning rate :math:`\gamma` (default: 1e-2)
        alpha (float, optional): decay :math:`\alpha` of the average of squared gradients
            (default: 0.99)
        eps (float, optional): :math:`\epsilon`, added to the root mean square (default: 1e-8)
        weight_decay (float, optional): weight decay :math:`\lambda` (L2 penalty) (default: 0)
        momentum (float, optional): momentum factor :math:`\mu` (default: 0)
        centered (bool, optional): divide by an estimate of the standard deviation of the
            gradient instead of its root mean square (Graves, 2013) (default: False)
        capturable, differentiable (bool, optional): only ``False`` is supported.
        foreach (bool, optional): ``True`` runs the same update compiled, on many
            tensors at once (`optlib.fast`); the default (``None``) is the readable loop.
        maximize (bool, optional): maximize the objective instead of minimizing it
            (default: False)

    .. note::
        The lecture that introduced RMSProp (Tieleman and Hinton, 2012, lecture 6.5 of
        "Neural Networks for Machine Learning") suggests a decay of 0.9; PyTorch's ``alpha``
        defaults to 0.99, a memory of about 100 steps instead of 10. PyTorch adds
        :math:`\epsilon` *outside* the square root, :math:`\sqrt{v_t} + \epsilon`; TensorFlow and
        Keras add it inside, :math:`\sqrt{v_t + \epsilon}`, which for a given :math:`\epsilon`
        is a much larger floor on the denominator. With momentum, PyTorch accumulates the
        normalized gradient in the buffer and multiplies by the learning rate outside it, as in
        its SGD. The centered variant is from Graves (2013), "Generating Sequences With
        Recurrent Neural Networks".
    """

    checkpoint_defaults = dict(
        momentum=0, centered=False, foreach=None, maximize=False, differentiable=False,
        capturable=False,
    )

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
    ) -> None:
        check_tensor_lr(lr)
        check_non_negative(
            lr=lr, eps=eps, momentum=momentum, weight_decay=weight_decay, alpha=alpha
        )
        super().__init__(params, hyperparameters(locals()))

    def _init_state(self, param, group):
        state = dict(step=step_counter(), square_avg=torch.zeros_like(param))
        if group["momentum"] > 0:
            state["momentum_buffer"] = torch.zeros_like(param)
        if group["centered"]:
            state["grad_avg"] = torch.zeros_like(param)
        return state

    @staticmethod
    def _update(param, grad, state, group):
        rmsprop_update(
            real(param),
            real(grad),
            real(state["square_avg"]),
            real(state.get("grad_avg")),
            real(state.get("momentum_buffer")),
            **settings_for(rmsprop_update, group),  # lr, alpha, eps ...
        )
