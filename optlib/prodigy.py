r"""Prodigy: Adam whose step size D is estimated while training; a drop-in for
``prodigyopt.Prodigy`` (the prodigyopt package of Mishchenko and Defazio)."""

import math

import torch
from torch import Tensor

from optlib.optimizer import Optimizer, any_sharded, check_non_negative, refuse_zero_redundancy

__all__ = ["Prodigy", "prodigy_statistics", "prodigy_update"]


def _sliced(x: Tensor, slice_p: int) -> Tensor:
    """Every ``slice_p``-th entry of ``x`` flattened, where the reference keeps the statistics.
    Under FSDP2 ``x`` is a DTensor sharded by rows, which cannot be flattened when the rows do not
    divide evenly among the ranks (3 rows on 2): it keeps its shape and all its entries, the same
    numbers, so that ``s`` and ``p0`` are shaped (and sharded) as the parameter."""
    if not any_sharded([x]):
        return x.flatten()[::slice_p]
    if slice_p != 1:
        raise NotImplementedError("optlib.Prodigy supports slice_p=1 only on DTensor parameters (FSDP2)")
    return x


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """⟨a, b⟩: torch.dot of the flat tensors, as the reference computes it (its order of
    summation, bit for bit); a DTensor kept in its parameter's shape sums its products."""
    return torch.dot(a, b) if a.dim() == 1 else (a * b).sum()


def _whole(x: Tensor) -> Tensor:
    """A reduction over a tensor, over all of it. Under FSDP2 a sum over a DTensor is partial,
    each rank holding its shard's part, and ``.item()`` would read that part alone: full_tensor()
    adds the parts of all ranks, so that every rank reads the same global value."""
    return x.full_tensor() if any_sharded([x]) else x


def prodigy_statistics(
    param: Tensor,
    grad: Tensor,
    state: dict,
    *,
    d: float,
    d0: float,
    dlr: float,
    beta1: float,
    beta2: float,
    beta3: float,
    safeguard_warmup: bool,
    slice_p: int,
) -> tuple[float, float]:
    """The first pass over one tensor: its moments, scaled by D, and its parts of the estimate.

    Updates ``exp_avg`` (m), ``exp_avg_sq`` (v) and ``s`` in place and returns this tensor's
    term of the numerator, (d/d0) dlr ⟨g, θ_0 - θ⟩, and of the denominator, ‖s‖₁. Statistics are
    kept on every ``slice_p``-th entry only.
    """
    sliced_grad = _sliced(grad, slice_p)
    # how far the gradient points back towards the start: the evidence that D is too small
    inner = _dot(sliced_grad, state["p0"] - _sliced(param, slice_p))
    numerator = (d / d0) * dlr * _whole(inner).item()
    if beta1 > 0:
        state["exp_avg"].mul_(beta1).add_(grad, alpha=d * (1 - beta1))  # m_t, in units of D
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=d * d * (1 - beta2))  # v_t, D²
    weight = (d / d0) * d if safeguard_warmup else (d / d0) * dlr
    state["s"].mul_(beta3).add_(sliced_grad, alpha=weight)  # s_t: the weighted sum of gradients
    return numerator, _whole(state["s"].abs().sum()).item()


def prodigy_update(
    param: Tensor,
    grad: Tensor,
    state: dict,
    *,
    d: float,
    dlr: float,
    beta1: float,
    eps: float,
    weight_decay: float,
    decouple: bool,
) -> None:
    """The second pass over one tensor, with the new D: Adam's step of size dlr."""
    denom = state["exp_avg_sq"].sqrt().add_(d * eps)  # √v_t + D ε
    if weight_decay != 0 and decouple:
        param.add_(param, alpha=-weight_decay * dlr)  # AdamW's decay
    if beta1 > 0:
        param.addcdiv_(state["exp_avg"], denom, value=-dlr)  # θ ← θ - dlr m_t / (√v_t + D ε)
    else:
        param.addcdiv_(grad, denom, value=-dlr * d)


class Prodigy(Optimizer):
    r"""Implements Prodigy (Mishchenko and Defazio, 2024), Adam with an estimated step size.

    Adam's step :math:`\gamma` is replaced by :math:`\gamma d_t`, where :math:`d_t` estimates
    :math:`D = \|\theta_0 - \theta_*\|`, the distance to a solution, from the gradients seen:

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \gamma \text{ (lr, default 1)}, \: \beta_1, \beta_2,
                \: \beta_3 = \sqrt{\beta_2} \text{ (default)}, \: d_0, \: \epsilon, \: \lambda  \\
            &\textbf{initialize} : m_0, v_0, s_0, r_0 \leftarrow 0                           \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}g_t \leftarrow \nabla f_t(\theta_{t-1})                                 \\
            &\hspace{5mm}m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) d_t g_t                  \\
            &\hspace{5mm}v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) d_t^2 g_t^2              \\
            &\hspace{5mm}r_t \leftarrow \beta_3 r_{t-1} + \tfrac{d_t}{d_0} \gamma d_t
                \langle g_t, \theta_0 - \theta_{t-1} \rangle                                     \\
            &\hspace{5mm}s_t \leftarrow \beta_3 s_{t-1} + \tfrac{d_t}{d_0} \gamma d_t g_t        \\
            &\hspace{5mm}d_{t+1} \leftarrow \max\big(d_t, \: c \, r_t / \|s_t\|_1\big)
                \quad (c \text{: d\_coef; growth at most a factor growth\_rate})                 \\
            &\hspace{5mm}\theta_t \leftarrow (1 - \gamma d_t \lambda) \, \theta_{t-1}
                - \gamma d_t \, m_t / (\sqrt{v_t} + d_{t+1} \epsilon)                             \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \:  \theta_t                                                     \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    :math:`r_t` grows while the gradients keep pointing back towards :math:`\theta_0`, that is
    while the steps are too short to have reached the region a solution lies in; the estimate
    never decreases. Because :math:`m` and :math:`v` carry :math:`d` and :math:`d^2`, the
    step :math:`m_t / \sqrt{v_t}` is dimensionless and :math:`\gamma d_t` sets its length.

    One estimate serves all parameter groups, so every step passes over all tensors twice: once
    for the moments and the estimate, once, with the new :math:`d`, for the step.

    State, under the reference's keys: ``exp_avg`` (:math:`m`, kept only if :math:`\beta_1 > 0`),
    ``exp_avg_sq`` (:math:`v`), ``s``, ``p0`` (:math:`\theta_0`) and ``step`` (an int). The groups
    keep ``d``, ``d_max``, ``d_numerator`` (:math:`r`), ``d_denom``, ``d_hat`` and ``k``.

    Args:
        params (iterable): parameters or dicts defining parameter groups.
        lr (float, optional): :math:`\gamma`, a multiplier of the estimated step (default: 1.0)
        betas (tuple[float, float], optional): :math:`(\beta_1, \beta_2)` (default: (0.9, 0.999))
        beta3 (float, optional): decay of :math:`r` and :math:`s`; ``None`` is
            :math:`\sqrt{\beta_2}` (default: None)
        eps (float, optional): :math:`\epsilon`, in units of :math:`d` (default: 1e-8)
        weight_decay (float, optional): :math:`\lambda` (default: 0)
        decouple (bool, optional): AdamW's decoupled decay; ``False`` adds
            :math:`\lambda\theta` to the gradient (default: True)
        use_bias_correction (bool, optional): scale the step by Adam's bias corrections,
            :math:`\sqrt{1 - \beta_2^t} / (1 - \beta_1^t)` (default: False)
        safeguard_warmup (bool, optional): leave :math:`\gamma` out of :math:`s`, for
            schedules that start with a tiny rate (default: False)
        d0 (float, optional): the first estimate :math:`d_0` (default: 1e-6)
        d_coef (float, optional): :math:`c`, the preferred knob (default: 1.0)
        growth_rate (float, optional): largest factor by which :math:`d` grows per step
            (default: inf)
        fsdp_in_use (bool, optional): only ``False`` is supported here. The reference's flag
            all-reduces the sums of FSDP1's flat shards; under FSDP2 the parameters are DTensors,
            whose sums full_tensor() makes global, and no flag is needed (``slice_p`` must then be
            1, and ``s`` and ``p0`` keep the parameter's shape and sharding).
        slice_p (int, optional): keep the statistics on every ``slice_p``-th entry (default: 1)

    .. note::
        This class follows prodigyopt 1.1.2. Where it differs from the paper's Algorithm 4: the
        paper writes :math:`(1 - \beta_3)` factors in :math:`r` and :math:`s`, which cancel in
        their ratio, and has neither ``d_coef`` nor ``growth_rate``; bias correction is off by
        default. Several settings are read from the
        first parameter group only (``betas``, ``beta3``, ``d_coef``, ``growth_rate``,
        ``decouple``, ``use_bias_correction``), and a group's ``lr`` must equal the largest or
        be 0; the reference raises ``RuntimeError`` otherwise, and so does this class. The
        reference adds an L2 decay into ``p.grad`` in place and prints a line when decoupled
        decay is on; optlib leaves the gradient as it is and prints nothing. optlib also refuses
        a negative ``weight_decay`` and a ``slice_p`` below 1, which the reference accepts.
    """

    def __init__(
        self,
        params,
        lr=1.0,
        betas=(0.9, 0.999),
        beta3=None,
        eps=1e-8,
        weight_decay=0,
        decouple=True,
        use_bias_correction=False,
        safeguard_warmup=False,
        d0=1e-6,
        d_coef=1.0,
        growth_rate=float("inf"),
        fsdp_in_use=False,
        slice_p=1,
    ):
        # the reference's checks, in its order and with its messages
        if not 0.0 < d0:
            raise ValueError(f"Invalid d0 value: {d0}")
        if not 0.0 < lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 < eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for index in (0, 1):
            if not 0.0 <= betas[index] < 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {betas[index]}")
        check_non_negative(weight_decay=weight_decay)
        if not (isinstance(slice_p, int) and slice_p >= 1):
            raise ValueError(f"Invalid slice_p value: {slice_p}")
        if fsdp_in_use:
            raise NotImplementedError("optlib.Prodigy does not support fsdp_in_use=True")
        defaults = dict(
            lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay,
            d=d0, d0=d0, d_max=d0, d_numerator=0.0, d_coef=d_coef, k=0, growth_rate=growth_rate,
            use_bias_correction=use_bias_correction, decouple=decouple,
            safeguard_warmup=safeguard_warmup, fsdp_in_use=fsdp_in_use, slice_p=slice_p,
        )  # fmt: skip
        self.d0 = d0
        refuse_zero_redundancy("Prodigy", "all of them to estimate its step size")
        super().__init__(params, defaults)

    def _init_state(self, param, group):
        slice_p = group["slice_p"]
        state = dict(step=0, s=torch.zeros_like(_sliced(param.detach(), slice_p)))
        # θ_0, where the estimate measures from; a parameter that starts at 0 keeps one number
        if _whole(param.any()):
            state["p0"] = _sliced(param.detach(), slice_p).clone()
        else:
            state["p0"] = torch.tensor(0, device=param.device, dtype=param.dtype)
        if self.param_groups[0]["betas"][0] > 0:  # β1 of the first group, as everywhere
            state["exp_avg"] = torch.zeros_like(param.detach())
        state["exp_avg_sq"] = torch.zeros_like(param.detach())
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """One step: both passes over all groups; returns the closure's loss, or None."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        first = self.param_groups[0]  # the settings the whole optimizer shares
        beta1, beta2 = first["betas"]
        beta3 = first["beta3"] if first["beta3"] is not None else math.sqrt(beta2)
        d, d_max, k = first["d"], first["d_max"], first["k"]
        lr = max(group["lr"] for group in self.param_groups)
        correction = 1.0
        if first["use_bias_correction"]:
            correction = ((1 - beta2 ** (k + 1)) ** 0.5) / (1 - beta1 ** (k + 1))
        dlr = d * lr * correction  # the step size of this step, γ d_t
        delta_numerator, d_denom = 0.0, 0.0  # this step's terms of r_t, and ‖s_t‖₁

        for group in self.param_groups:
            if group["lr"] not in [lr, 0.0]:
                raise RuntimeError(
                    "Setting different lr values in different parameter groups is only supported for values of 0"
                )
            for param in [p for p in group["params"] if p.grad is not None]:
                if param.grad.is_sparse:
                    raise RuntimeError("Prodigy does not support sparse gradients")
                state = self.state[param]
                if not state:
                    state.update(self._init_state(param, group))
                if group["lr"] > 0.0:
                    numerator, denominator = prodigy_statistics(
                        param, self._gradient(param, first["decouple"], group), state,
                        d=d, d0=group["d0"], dlr=dlr, beta1=beta1, beta2=beta2, beta3=beta3,
                        safeguard_warmup=group["safeguard_warmup"], slice_p=group["slice_p"],
                    )  # fmt: skip
                    delta_numerator += numerator
                    d_denom += denominator
        if d_denom == 0:  # no gradient yet: no step, as the reference
            return loss

        d_numerator = first["d_numerator"] * beta3 + delta_numerator  # r_t
        d_hat = first["d_coef"] * d_numerator / d_denom
        if d == group["d0"]:  # the reference compares with the last group's d0
            d = max(d, d_hat)
        d_max = max(d_max, d_hat)
        d = min(d_max, d * first["growth_rate"])

        for group in self.param_groups:
            group.update(d_numerator=d_numerator, d_denom=d_denom, d=d, d_max=d_max, d_hat=d_hat)
            for param in [p for p in group["params"] if p.grad is not None]:
                state = self.state[param]
                state["step"] += 1
                prodigy_update(
                    param, self._gradient(param, first["decouple"], group), state,
                    d=d, dlr=dlr, beta1=beta1, eps=group["eps"],
                    weight_decay=group["weight_decay"], decouple=first["decouple"],
                )  # fmt: skip
            group["k"] += 1
        return loss

    @staticmethod
    def _gradient(param: Tensor, decouple: bool, group: dict) -> Tensor:
        """The gradient with the L2 decay added when the decay is not decoupled (a new tensor:
        ``p.grad`` is left as it is)."""
        if group["weight_decay"] != 0 and not decouple:
            return param.grad.add(param, alpha=group["weight_decay"])
        return param.grad
