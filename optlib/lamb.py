r"""LAMB: Adam's direction, with a step for each tensor scaled by a trust ratio, the tensor's norm
over the direction's; a drop-in for ``pytorch_optimizer.Lamb`` (the pytorch-optimizer package)."""

import math

import torch
from torch import Tensor

from optlib.optimizer import Optimizer, check_betas, check_non_negative, real

__all__ = ["Lamb", "lamb_update"]


def lamb_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    step_size: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    weight_decouple: bool,
    fixed_decay: bool,
    grad_averaging: bool,
    adam: bool,
    clamp: float,
    lr: float,
) -> tuple:
    """One LAMB step for one tensor, in the order of the equations in `Lamb`.

    Updates ``param``, ``exp_avg`` (m) and ``exp_avg_sq`` (v) in place; ``grad`` is never
    modified. Returns the norms it measured, ``(‖θ‖ clamped, ‖r‖, trust ratio)``, which the
    reference keeps in the state for logging.
    """
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1 if grad_averaging else 1.0)  # m_t
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)  # v_t
    if weight_decay != 0 and weight_decouple:  # decoupled: θ ← (1 - γλ) θ, outside the ratio
        param.mul_(1.0 - weight_decay * (1.0 if fixed_decay else lr))
    update = exp_avg / exp_avg_sq.sqrt().add_(eps)  # r_t = m_t / (√v_t + ε)
    if weight_decay > 0 and not weight_decouple:  # the paper's form: r_t + λθ, inside the ratio
        update.add_(param, alpha=weight_decay)
    # φ(‖θ‖) = min(‖θ‖, 10); clamped out of place: under FSDP2 the norm is a partial DTensor,
    # and an in-place op may not change a placement
    weight_norm = torch.linalg.norm(param).clamp(min=0, max=clamp)
    update_norm = torch.linalg.norm(update)
    trust_ratio = 1.0 if weight_norm == 0 or update_norm == 0 else weight_norm / (update_norm + eps)
    # θ_t = θ - γ/(1 - β1^t) · φ(‖θ‖)/‖r‖ · r_t; with adam=True, Adam's step without the ratio
    param.add_(update, alpha=-step_size * (1.0 if adam else trust_ratio))
    return weight_norm, update_norm, trust_ratio


class Lamb(Optimizer):
    r"""Implements LAMB, layer-wise adaptive moments for batch training (You et al., 2020,
    Algorithm 2), as pytorch-optimizer does.

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \gamma \text{ (lr)}, \: \beta_1, \beta_2 \text{ (betas)},
                \: \epsilon, \: \lambda \text{ (weight decay)}, \: \theta_0 \text{ (params)},
                \: \phi(z) = \min(z, 10)                                                         \\
            &\textbf{initialize} : m_0, v_0 \leftarrow 0                                        \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}g_t \leftarrow \nabla_{\theta} f_t (\theta_{t-1})                       \\
            &\hspace{5mm}m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t                      \\
            &\hspace{5mm}v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2                    \\
            &\hspace{5mm}\theta \leftarrow (1 - \gamma\lambda)\theta_{t-1}
                \quad \text{(weight\_decouple; else } r_t \text{ below gains } +\lambda\theta)  \\
            &\hspace{5mm}r_t \leftarrow m_t / (\sqrt{v_t} + \epsilon)                            \\
            &\hspace{5mm}\theta_t \leftarrow \theta - \frac{\gamma}{1 - \beta_1^t}
                \frac{\phi(\lVert\theta\rVert)}{\lVert r_t \rVert + \epsilon} r_t                \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \:  \theta_t                                                     \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    The direction is Adam's; its length, for each tensor, is the tensor's own norm times the
    rate: :math:`\lVert\theta_t - \theta\rVert = \gamma\,\phi(\lVert\theta\rVert)/(1 - \beta_1^t)`
    up to :math:`\epsilon`, whatever the scale of the gradients. Norms are taken over whole
    tensors, so every matrix, vector and scalar has its own ratio. State: ``exp_avg`` (m),
    ``exp_avg_sq`` (v), and the last ``weight_norm``, ``adam_norm`` and ``trust_ratio``.

    Args:
        params (iterable): parameters or dicts defining parameter groups.
        lr (float, optional): learning rate :math:`\gamma` (default: 1e-3)
        betas (tuple[float, float], optional): :math:`(\beta_1, \beta_2)` (default: (0.9, 0.999))
        weight_decay (float, optional): :math:`\lambda` (default: 0)
        weight_decouple (bool, optional): decay the weights before the step, outside the trust
            ratio, as AdamW (``True``); or add :math:`\lambda\theta` to :math:`r_t`, inside it, as
            the paper (``False``) (default: True)
        fixed_decay (bool, optional): with ``weight_decouple``, decay by :math:`\lambda` per step
            instead of :math:`\gamma\lambda` (default: False)
        rectify, degenerated_to_sgd, n_sma_threshold: the reference's RAdam variant; optlib
            raises ``NotImplementedError`` for ``rectify=True`` (see the note) (defaults: False,
            False, 5)
        grad_averaging (bool, optional): ``False`` accumulates :math:`m_t = \beta_1 m_{t-1} + g_t`
            (default: True)
        max_grad_norm (float, optional): with ``pre_norm``, the global gradient norm above which
            the gradients are scaled down to it (default: 1.0)
        adam (bool, optional): a trust ratio of 1, Adam's step (default: False)
        pre_norm (bool, optional): scale all gradients by
            :math:`\min(1, \text{max\_grad\_norm} / (\lVert g \rVert + \epsilon))` first (default: False)
        eps (float, optional): :math:`\epsilon` (default: 1e-6)
        foreach (bool, optional): accepted for compatibility; optlib always runs its loop (the
            trust ratio needs a norm of each tensor, so there is no element-wise fast path)
            (default: None)
        maximize (bool, optional): maximize the objective (default: False)

    .. note::
        This class follows pytorch-optimizer 4.1.0 (``pytorch_optimizer.Lamb``), the LAMB that
        installs here (timm's needs torchvision). Where it differs from the paper's Algorithm 2:
        :math:`v_t` is not bias-corrected and :math:`m_t`'s correction divides the rate outside
        the ratio, so the first steps are :math:`1/(1 - \beta_1^t)` times longer (10 times at
        :math:`t = 1`; in the paper the ratio cancels both corrections); the decay is decoupled
        by default (the paper puts :math:`\lambda\theta` inside the ratio, ``weight_decouple=False``);
        :math:`\epsilon` is added to :math:`\lVert r_t\rVert`; a zero norm gives a ratio of 1.
        :math:`\phi(z) = \min(z, 10)` is the paper's clipping :math:`\min(\max(z, \gamma_l),
        \gamma_u)` with :math:`\gamma_l = 0, \gamma_u = 10`. Differences from the reference:
        ``p.grad`` is never modified (the reference scales it in place with ``pre_norm`` and
        negates it with ``maximize``); ``rectify=True`` raises ``NotImplementedError``, because
        the reference's rectified branch takes the ratio of :math:`\lVert\theta\rVert` to the
        norm of the next parameter instead of the step's, which is not LAMB; a negative ``lr``
        raises torch's ``ValueError`` (the reference raises its own ``NegativeLRError``) and
        extra keyword options (``adanorm``, ``adam_debias``) ``NotImplementedError``.
    """

    clamp: float = 10.0  # φ's upper bound, a class attribute as in the reference

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        weight_decouple: bool = True,
        fixed_decay: bool = False,
        rectify: bool = False,
        degenerated_to_sgd: bool = False,
        n_sma_threshold: int = 5,
        grad_averaging: bool = True,
        max_grad_norm: float = 1.0,
        adam: bool = False,
        pre_norm: bool = False,
        eps: float = 1e-6,
        foreach: bool | None = None,
        maximize: bool = False,
        **kwargs,
    ) -> None:
        if kwargs:
            raise NotImplementedError(f"optlib.Lamb does not implement the options {sorted(kwargs)}")
        if rectify:
            raise NotImplementedError(
                "optlib.Lamb does not implement rectify=True: pytorch-optimizer's rectified branch "
                "divides the weight norm by the norm of the next parameter, not of the step"
            )
        check_non_negative(lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm, eps=eps)
        check_betas(betas)
        # kept on the optimizer, not in the groups, as the reference keeps them
        self.degenerated_to_sgd = degenerated_to_sgd
        self.n_sma_threshold = n_sma_threshold
        self.pre_norm = pre_norm
        self.foreach = foreach
        self.maximize = maximize
        defaults = dict(
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            weight_decouple=weight_decouple,
            fixed_decay=fixed_decay,
            rectify=rectify,
            grad_averaging=grad_averaging,
            max_grad_norm=max_grad_norm,
            adam=adam,
            eps=eps,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def _init_state(self, param, group):
        return dict(exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))

    @torch.no_grad()
    def _gradient_scale(self) -> Tensor | float:
        """With ``pre_norm``: min(1, max_grad_norm / (‖g‖ + ε)) over every gradient, in float32
        as the reference computes it, with the constructor's ``max_grad_norm`` and ``eps``."""
        max_grad_norm, eps = self.defaults["max_grad_norm"], self.defaults["eps"]
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not self.pre_norm or max_grad_norm == 0.0:
            return 1.0
        if not grads:
            return 1.0  # max_grad_norm / ε, clamped at 1
        norms = [g.float().norm() if g.dtype in (torch.float16, torch.bfloat16) else g.norm() for g in grads]
        norm = torch.stack([n.to(grads[0].device) for n in norms]).float().square_().sum().sqrt_()
        return torch.clamp(max_grad_norm / norm.add_(eps), max=1.0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._scale = self._gradient_scale()  # after the closure: it sees this step's gradients
        super().step()
        return loss

    def _settings(self, group):
        group["step"] = group.get("step", 0) + 1  # one count per group, as the reference keeps it
        settings = super()._settings(group)
        beta1 = settings["betas"][0]
        step_size = settings["lr"] / (1.0 - math.pow(beta1, settings["step"]))  # γ / (1 - β1^t)
        return settings | dict(
            step_size=step_size, scale=self._scale, clamp=self.clamp, maximize=self.maximize, foreach=False
        )

    @staticmethod
    def _update(param, grad, state, group):
        if isinstance(group["scale"], Tensor):  # pre_norm
            grad = grad * group["scale"]
        if group["maximize"]:
            grad = -grad
        beta1, beta2 = group["betas"]
        param, grad, exp_avg, exp_avg_sq = (real(t) for t in (param, grad, state["exp_avg"], state["exp_avg_sq"]))
        state["weight_norm"], state["adam_norm"], state["trust_ratio"] = lamb_update(
            param,
            grad,
            exp_avg,
            exp_avg_sq,
            step_size=group["step_size"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            weight_decouple=group["weight_decouple"],
            fixed_decay=group["fixed_decay"],
            grad_averaging=group["grad_averaging"],
            adam=group["adam"],
            clamp=group["clamp"],
            lr=group["lr"],
        )
