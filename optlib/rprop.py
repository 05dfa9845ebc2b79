r"""Rprop: steps of a size learned per weight, in the direction of the gradient's sign; a drop-in
for torch.optim.Rprop."""

import torch
from torch import Tensor

from optlib.optimizer import Optimizer, check_non_negative, check_tensor_lr
from optlib.optimizer import hyperparameters, real, step_counter

__all__ = ["Rprop", "rprop_update"]


def rprop_update(
    param: Tensor,
    grad: Tensor,
    prev: Tensor,
    step_size: Tensor,
    *,
    etaminus: float,
    etaplus: float,
    step_size_min: float,
    step_size_max: float,
    maximize: bool,
) -> None:
    """One Rprop step for one tensor, in the order of the equations in
    `Rprop`.

    Updates ``param``, ``prev`` (the last gradient, zeroed where its sign
    flipped) and ``step_size`` (one per weight) in place. ``grad`` is never
    modified.
    """
    g = -grad if maximize else grad  # g_t = ±∇f(θ_{t-1})
    agreement = g.mul(prev).sign()  # sign of g_{t-1} g_t, per weight
    # η_t = η_{t-1} × (η+ if the sign held, η- if it flipped, 1 if either is 0)
    factor = torch.where(agreement > 0, etaplus, agreement)
    factor = torch.where(agreement < 0, etaminus, factor)
    factor = torch.where(agreement == 0, 1.0, factor)
    step_size.mul_(factor).clamp_(step_size_min, step_size_max)
    g = torch.where(agreement < 0, 0.0, g)  # a flipped sign: no step, forget g_t
    param.addcmul_(g.sign(), step_size, value=-1)  # θ_t = θ_{t-1} - η_t sign(g_t)
    prev.copy_(g)  # g_{t-1} for the next step


class Rprop(Optimizer):
    r"""Implements Rprop, resilient backpropagation (Riedmiller and Braun, 1993).

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \theta_0 \text{ (params)}, \: f(\theta) \text{ (objective)},
                \: \eta_{+}, \eta_{-} \text{ (etas)}, \: \Gamma_{min}, \Gamma_{max}
                \text{ (step sizes)}, \: \textit{maximize}                                        \\
            &\textbf{initialize} : g_0 \leftarrow 0, \: \eta_0 \leftarrow \gamma
                \text{ (lr), for every weight}                                            \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}g_t \leftarrow \pm \nabla_{\theta} f_t (\theta_{t-1})
                \quad (- \textbf{ if } \textit{maximize})                                         \\
            &\hspace{5mm}\textbf{for each weight } i                                             \\
            &\hspace{10mm}\textbf{if} \: g^i_{t-1} g^i_t > 0 : \:
                \eta^i_t \leftarrow \min(\eta^i_{t-1} \eta_{+}, \Gamma_{max})                    \\
            &\hspace{10mm}\textbf{else if} \: g^i_{t-1} g^i_t < 0 : \:
                \eta^i_t \leftarrow \max(\eta^i_{t-1} \eta_{-}, \Gamma_{min}), \:
                g^i_t \leftarrow 0                                                                \\
            &\hspace{10mm}\textbf{else} : \: \eta^i_t \leftarrow \eta^i_{t-1}                   \\
            &\hspace{5mm}\theta_t \leftarrow \theta_{t-1} - \eta_t \odot \mathrm{sign}(g_t)      \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \:  \theta_t                                                     \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    State, under PyTorch's keys: :math:`g_{t-1}` is ``prev``, :math:`\eta` is ``step_size``
    and :math:`t` is ``step``.

    Args:
        params (iterable): parameters, named parameters, or dicts defining parameter groups.
        lr (float, Tensor, optional): the first step size :math:`\eta_0` of every weight; later
            values of ``lr`` (from a scheduler) have no effect (default: 1e-2)
        etas (tuple[float, float], optional): :math:`(\eta_{-}, \eta_{+})`, the factors that
            shrink and grow a step size (default: (0.5, 1.2))
        step_sizes (tuple[float, float], optional): :math:`(\Gamma_{min}, \Gamma_{max})`, the
            bounds of a step size (default: (1e-6, 50))
        foreach (bool, optional): ``True`` runs the same update compiled, on many tensors at
            once (`optlib.fast`); the default (``None``) is the readable loop.
        maximize (bool, optional): maximize the objective instead of minimizing it
            (default: False)
        capturable, differentiable (bool, optional): only ``False`` is supported.

    .. note::
        After a sign change the weight does not move and the gradient is forgotten, so that
        the next step counts as "no change": Rprop without weight backtracking, which Igel and
        Hüsken (2000) call iRprop-. Riedmiller and Braun's original takes the previous step back
        instead (weight backtracking). The paper's defaults are the same
        (:math:`\eta_{-} = 0.5`, :math:`\eta_{+} = 1.2`, :math:`\Gamma_{max} = 50`); its
        :math:`\eta_0 = 0.1`, PyTorch's ``lr`` 0.01. Rprop is meant for full-batch gradients.
    """

    checkpoint_defaults = dict(
        foreach=None, maximize=False, differentiable=False, capturable=False
    )

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        etas: tuple[float, float] = (0.5, 1.2),
        step_sizes: tuple[float, float] = (1e-6, 50),
        *,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
    ) -> None:
        check_tensor_lr(lr)
        check_non_negative(lr=lr)
        if not 0.0 < etas[0] < 1.0 < etas[1]:
            raise ValueError(f"Invalid eta values: {etas[0]}, {etas[1]}")
        super().__init__(params, hyperparameters(locals()))

    def _init_state(self, param, group):
        lr = float(group["lr"])
        if param.is_complex():  # η_0 for the real and the imaginary part
            lr = complex(lr, lr)
        return dict(
            step=step_counter(),
            prev=torch.zeros_like(param),
            step_size=torch.full_like(param, lr),
        )

    @staticmethod
    def _update(param, grad, state, group):
        etaminus, etaplus = group["etas"]
        step_size_min, step_size_max = group["step_sizes"]
        rprop_update(
            real(param),
            real(grad),
            real(state["prev"]),
            real(state["step_size"]),
            etaminus=etaminus,
            etaplus=etaplus,
            step_size_min=step_size_min,
            step_size_max=step_size_max,
            maximize=group["maximize"],
        )
