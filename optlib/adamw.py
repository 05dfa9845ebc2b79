r"""AdamW: Adam with decoupled weight decay; a drop-in for torch.optim.AdamW."""

from torch import Tensor

from optlib.adam import Adam

__all__ = ["AdamW"]


class AdamW(Adam):
    r"""Implements AdamW (Loshchilov and Hutter, 2019): `Adam` whose weight decay shrinks the
    weights directly instead of joining the gradient.

    .. math::
       \begin{aligned}
            &\textbf{input} : \text{Adam's}, \text{ with } \lambda \text{ (weight decay)}
                \text{ defaulting to } 10^{-2}                                                   \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}g_t \leftarrow \pm \nabla_{\theta} f_t (\theta_{t-1})                   \\
            &\hspace{5mm}\theta_{t-1} \leftarrow (1 - \gamma \lambda) \theta_{t-1}
                \quad \text{(Adam with L2 adds } \lambda \theta_{t-1} \text{ to } g_t
                \text{ instead)}                                                                  \\
            &\hspace{5mm}\theta_t \leftarrow \text{Adam's step from } \theta_{t-1}
                \text{ with } g_t: \: m_t, \: v_t, \: \widehat{m_t}, \: \widehat{v_t}, \:
                \theta_{t-1} - \gamma \widehat{m_t} / \big(\sqrt{\widehat{v_t}} + \epsilon \big)
       \end{aligned}

    The state is Adam's (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``step``), and so are
    the arguments, except that ``weight_decay`` defaults to 1e-2 and the decay is always
    decoupled. The update is `optlib.adam.adam_update` with ``decoupled_weight_decay=True``.

    .. note::
        Loshchilov and Hutter write the decay as :math:`\eta_t \lambda \theta_{t-1}`, where
        :math:`\eta_t` is the schedule multiplier and is separate from the base learning rate
        :math:`\alpha`. PyTorch multiplies by the learning rate itself, :math:`\gamma_t \lambda`:
        at a constant schedule the paper's :math:`\lambda` is PyTorch's :math:`\gamma \lambda`,
        and changing ``lr`` in PyTorch changes the decay per step too. A scheduler scales
        both terms in both formulations.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
        )

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # an Adam checkpoint loaded here decays as AdamW
            group["decoupled_weight_decay"] = True
