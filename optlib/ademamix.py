r"""AdEMAMix: Adam with a second, slow momentum added to the fast one; a drop-in for
``pytorch_optimizer.AdEMAMix`` (the pytorch-optimizer package)."""

import math

import torch
from torch import Tensor

from optlib.optimizer import Optimizer, check_non_negative

__all__ = ["AdEMAMix", "ademamix_schedule", "ademamix_update"]


def ademamix_schedule(step: int, *, alpha: float, beta1: float, beta3: float, t_alpha_beta3) -> tuple:
    r"""The mixing weight :math:`\alpha_t` and the slow rate :math:`\beta_{3,t}` of step ``step``.

    Without a warm-up (``t_alpha_beta3=None``) they are :math:`\alpha` and :math:`\beta_3`. With
    one, :math:`\alpha_t` grows linearly from 0 and :math:`\beta_{3,t}` grows from
    :math:`\beta_1` so that the slow average's half-life, :math:`\ln\frac12 / \ln\beta`, grows
    linearly: a slow average that starts as long as the fast one cannot overshoot while its old
    gradients are still from the first steps.
    """
    if t_alpha_beta3 is None:
        return alpha, beta3
    alpha_t = min(step * alpha / t_alpha_beta3, alpha)
    log_beta1, log_beta3 = math.log(beta1), math.log(beta3)
    fraction = step / t_alpha_beta3
    beta3_t = min(math.exp(log_beta1 * log_beta3 / ((1.0 - fraction) * log_beta3 + fraction * log_beta1)), beta3)
    return alpha_t, beta3_t


def ademamix_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    exp_avg_slow: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    beta3_t: float,
    alpha_t: float,
    bias_correction1: float,
    bias_correction2_sqrt: float,
    eps: float,
    weight_decay: float,
    weight_decouple: bool,
    fixed_decay: bool,
    maximize: bool,
) -> None:
    """One AdEMAMix step for one tensor, in the order of the equations in `AdEMAMix`.

    Updates ``param``, ``exp_avg`` (m1), ``exp_avg_sq`` (nu) and ``exp_avg_slow`` (m2) in place.
    ``grad`` is never modified.
    """
    grad = -grad if maximize else grad
    if weight_decay != 0:
        if weight_decouple:  # AdamW's decay, as the paper: θ ← (1 - γλ) θ
            param.mul_(1.0 - weight_decay * (1.0 if fixed_decay else lr))
        else:  # the reference's default: L2, λθ added to the gradient
            grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, 1.0 - beta1)  # m1_t = β1 m1_{t-1} + (1 - β1) g_t, the fast EMA
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)  # ν_t
    exp_avg_slow.lerp_(grad, 1.0 - beta3_t)  # m2_t = β3 m2_{t-1} + (1 - β3) g_t, the slow EMA
    denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)  # √ν̂_t + ε
    update = exp_avg.div(bias_correction1).add_(exp_avg_slow, alpha=alpha_t)  # m̂1_t + α m2_t
    param.addcdiv_(update, denom, value=-lr)  # θ_t = θ - γ (m̂1_t + α m2_t) / (√ν̂_t + ε)


class AdEMAMix(Optimizer):
    r"""Implements AdEMAMix (Pagliardini, Ablin and Grangier, 2024, Algorithm 1).

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \gamma \text{ (lr)}, \: \beta_1, \beta_2, \beta_3 \text{ (betas)},
                \: \alpha, \: T_{\alpha,\beta_3} \text{ (t\_alpha\_beta3)}, \: \epsilon,
                \: \lambda \text{ (weight decay)}, \: \theta_0 \text{ (params)}                 \\
            &\textbf{initialize} : m^{(1)}_0, m^{(2)}_0, \nu_0 \leftarrow 0                     \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}g_t \leftarrow \nabla_{\theta} f_t (\theta_{t-1})                       \\
            &\hspace{5mm}\alpha_t, \beta_{3,t} \leftarrow \text{warm-up of } \alpha, \beta_3
                \text{ over } T_{\alpha,\beta_3} \text{ steps (or } \alpha, \beta_3)             \\
            &\hspace{5mm}m^{(1)}_t \leftarrow \beta_1 m^{(1)}_{t-1} + (1 - \beta_1) g_t          \\
            &\hspace{5mm}m^{(2)}_t \leftarrow \beta_{3,t} m^{(2)}_{t-1} + (1 - \beta_{3,t}) g_t  \\
            &\hspace{5mm}\nu_t \leftarrow \beta_2 \nu_{t-1} + (1 - \beta_2) g_t^2                \\
            &\hspace{5mm}\hat m^{(1)}_t \leftarrow m^{(1)}_t / (1 - \beta_1^t), \quad
                \hat\nu_t \leftarrow \nu_t / (1 - \beta_2^t)                                     \\
            &\hspace{5mm}\theta_t \leftarrow \theta_{t-1} - \gamma \Big(
                \frac{\hat m^{(1)}_t + \alpha_t m^{(2)}_t}{\sqrt{\hat\nu_t} + \epsilon}
                + \lambda \theta_{t-1} \Big)                                                     \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \:  \theta_t                                                     \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    Adam's momentum averages over about :math:`1/(1-\beta_1) = 10` steps; the slow momentum
    :math:`m^{(2)}` over :math:`1/(1-\beta_3) = 10^4`, and it is added, :math:`\alpha` times,
    not mixed in: the step keeps Adam's fast response and gains a memory of gradients that are
    thousands of steps old. The slow average is not bias-corrected (it would weigh its first
    gradients :math:`10^4` times as it warms up); ``t_alpha_beta3`` warms :math:`\alpha` and
    :math:`\beta_3` up instead (`ademamix_schedule`). One state tensor per parameter more than
    Adam: ``exp_avg`` (:math:`m^{(1)}`), ``exp_avg_sq`` (:math:`\nu`), ``exp_avg_slow``
    (:math:`m^{(2)}`).

    Args:
        params (iterable): parameters or dicts defining parameter groups.
        lr (float or Tensor, optional): learning rate :math:`\gamma` (default: 1e-3)
        betas (tuple[float, float, float], optional): :math:`(\beta_1, \beta_2, \beta_3)`,
            :math:`\beta_1, \beta_2` in [0, 1) and :math:`\beta_3` in [0, 1]
            (default: (0.9, 0.999, 0.9999))
        weight_decay (float, optional): :math:`\lambda` (default: 0)
        weight_decouple (bool, optional): ``True`` decays the weights as AdamW and the paper do;
            ``False``, the reference's default, adds :math:`\lambda\theta` to the gradient (L2)
            (default: False)
        fixed_decay (bool, optional): with ``weight_decouple``, decay by :math:`\lambda` per step
            instead of :math:`\gamma\lambda` (default: False)
        alpha (float, optional): the weight :math:`\alpha` of the slow momentum (default: 5.0)
        t_alpha_beta3 (float, optional): warm-up steps :math:`T_{\alpha,\beta_3}` of
            :math:`\alpha` and :math:`\beta_3`; ``None`` for none (default: None)
        eps (float, optional): :math:`\epsilon` (default: 1e-8)
        maximize (bool, optional): maximize the objective (default: False)
        foreach (bool, optional): ``True`` runs the same update compiled, on many tensors at
            once (`optlib.fast`); ``None`` and ``False`` run the loop (default: None)

    .. note::
        This class follows pytorch-optimizer 4.1.0 (``pytorch_optimizer.AdEMAMix``); the
        authors' code (apple/ml-ademamix) is not a package. Where they differ: the authors
        default to :math:`\alpha = 2` and decoupled decay with separate warm-ups ``alpha_warmup``
        and ``beta3_warmup``; pytorch-optimizer defaults to :math:`\alpha = 5` (the paper's value
        for its language models), L2 decay, one warm-up length for both, and the half-life
        schedule in closed form (the authors' adds 1e-8 inside a logarithm). The authors' code
        skips :math:`m^{(1)}` when :math:`\beta_1 = 0`; both packages keep it. Differences from
        the reference: ``p.grad`` is never modified (the reference negates it for ``maximize``
        and adds the L2 term to it in place); its own exception classes cannot be raised without
        importing it, so a negative ``lr`` raises torch's ``ValueError`` (the reference:
        ``NegativeLRError``), as does a warm-up with :math:`\beta_1 = 0` or :math:`\beta_3 = 0`,
        whose half-life schedule takes :math:`\ln 0` (the reference fails at its first step);
        extra keyword options of the reference (``cautious``, ``stable_adamw``) raise
        ``NotImplementedError``; float16 and bfloat16 parameters divide and add in one
        ``addcdiv_``, where the reference divides first.
    """

    per_step_settings = ("alpha_t", "beta3_t", "bias_correction1", "bias_correction2_sqrt")

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        weight_decay: float = 0.0,
        weight_decouple: bool = False,
        fixed_decay: bool = False,
        alpha: float = 5.0,
        t_alpha_beta3: float | None = None,
        eps: float = 1e-8,
        maximize: bool = False,
        foreach: bool | None = None,
        **kwargs,
    ) -> None:
        if kwargs:
            raise NotImplementedError(f"optlib.AdEMAMix does not implement the options {sorted(kwargs)}")
        check_non_negative(lr=lr, weight_decay=weight_decay, alpha=alpha, eps=eps)
        for index, beta in enumerate(betas[:2]):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {beta} (must be in [0, 1))")
        if not 0.0 <= betas[2] <= 1.0:
            raise ValueError(f"Invalid beta parameter at index 2: {betas[2]} (must be in [0, 1])")
        if t_alpha_beta3 is not None:
            check_non_negative(t_alpha_beta3=t_alpha_beta3)
            if betas[0] == 0.0 or betas[2] == 0.0:
                raise ValueError(f"t_alpha_beta3 needs beta1 and beta3 above 0 (half-lives), got {betas}")
        # maximize is kept on the optimizer, not in the groups, as the reference keeps it
        self.maximize = maximize
        defaults = dict(
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            weight_decouple=weight_decouple,
            fixed_decay=fixed_decay,
            alpha=alpha,
            t_alpha_beta3=t_alpha_beta3,
            eps=eps,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def _init_state(self, param, group):
        if param.is_complex():
            raise RuntimeError("AdEMAMix does not support complex parameter")  # the reference's text
        return dict(
            exp_avg=torch.zeros_like(param),
            exp_avg_sq=torch.zeros_like(param),
            exp_avg_slow=torch.zeros_like(param),
        )

    def _settings(self, group):
        # One step count per group, kept in the group as the reference keeps it.
        group["step"] = group.get("step", 0) + 1
        settings = super()._settings(group)
        beta1, beta2, beta3 = settings["betas"]
        t = settings["step"]
        alpha_t, beta3_t = ademamix_schedule(
            t, alpha=settings["alpha"], beta1=beta1, beta3=beta3, t_alpha_beta3=settings["t_alpha_beta3"]
        )
        return settings | dict(
            maximize=self.maximize,
            alpha_t=alpha_t,
            beta3_t=beta3_t,
            bias_correction1=1.0 - math.pow(beta1, t),
            bias_correction2_sqrt=math.sqrt(1.0 - math.pow(beta2, t)),
        )

    @staticmethod
    def _update(param, grad, state, group):
        beta1, beta2, _ = group["betas"]
        ademamix_update(
            param,
            grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            state["exp_avg_slow"],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            beta3_t=group["beta3_t"],
            alpha_t=group["alpha_t"],
            bias_correction1=group["bias_correction1"],
            bias_correction2_sqrt=group["bias_correction2_sqrt"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            weight_decouple=group["weight_decouple"],
            fixed_decay=group["fixed_decay"],
            maximize=group["maximize"],
        )
