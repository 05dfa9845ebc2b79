r"""Adafactor: Adam's second moment, stored for a matrix as one statistic per row and one per
column, with a step size relative to the parameter's scale; a drop-in for torch.optim.Adafactor."""

import torch
from torch import Tensor

from optlib.optimizer import Optimizer, hyperparameters, settings_for, step_counter

__all__ = ["Adafactor", "adafactor_update"]


def _rms(x: Tensor, d: float = 1.0) -> Tensor:
    """RMS(x) / d, with RMS(x) = ||x|| / sqrt(number of entries) over the whole
    tensor: a 0-dim float64 tensor, as torch computes it (from a Python float)."""
    return x.norm().double() / (x.numel() ** 0.5 * d)


def adafactor_update(
    param: Tensor,
    grad: Tensor,
    row_var: Tensor | None,
    col_var: Tensor | None,
    variance: Tensor | None,
    *,
    step: float,
    lr: float,
    beta2_decay: float,
    eps1: float | None,
    eps2: float,
    d: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """One Adafactor step for one tensor, in the order of the equations in
    `Adafactor`.

    A tensor of two or more dimensions keeps the row and column statistics
    ``row_var`` and ``col_var`` of its last two dimensions (one pair per
    matrix of a batch); a vector or a scalar keeps the full ``variance``.
    Updates ``param`` and that state in place. ``grad`` is never modified.
    """
    if eps1 is None:  # the machine epsilon of the parameter's dtype
        eps1 = torch.finfo(param.dtype).eps
    g = -grad if maximize else grad  # g_t = ±∇f(θ_{t-1})
    one_minus_beta2 = step**beta2_decay  # 1 - β̂2_t = t^ω
    # γ_t = min(γ, 1/√t), as a tensor: on the fast path lr is one
    gamma_t = torch.as_tensor(lr, dtype=torch.float64).clamp(max=1 / step**0.5)
    # the step size γ_t max(ε2, RMS(θ_{t-1})), taken before the decay
    step_size = _rms(param).clamp(min=eps2) * gamma_t
    if weight_decay != 0:  # decoupled, with γ: θ_{t-1} ← (1 - γλ) θ_{t-1}
        param.mul_(1 - lr * weight_decay)
    if g.dim() > 1:
        # the means of g_t² along each row and each column, as squared norms
        # (as torch computes them: no tensor g_t² is made; squared and divided
        # in place, torch's operations, so that the bits agree on every machine)
        row_mean = g.norm(dim=-1, keepdim=True).square_().div_(g.size(-1))  # (p, 1)
        # a column's norm squared as a product, the same bits as square_: under FSDP2
        # it runs over sharded rows, a partial DTensor that no in-place op may change
        col_norm = g.norm(dim=-2, keepdim=True)
        col_mean = (col_norm * col_norm).div_(g.size(-2))  # (1, q)
        row_var.lerp_(row_mean, one_minus_beta2)  # r_t = β̂2 r_{t-1} + ...
        col_var.lerp_(col_mean, one_minus_beta2)  # c_t = β̂2 c_{t-1} + ...
        # v̂_t = r_t c_tᵀ / max(mean(r_t), ε1), a rank-1 (p, q) matrix
        v_hat = row_var @ col_var
        v_hat = v_hat / row_var.mean(dim=-2, keepdim=True).clamp(min=eps1)
    else:  # v̂_t = v_t = β̂2_t v_{t-1} + (1 - β̂2_t) g_t²
        v_hat = variance.lerp_(g * g, one_minus_beta2)
    # u_t = g_t / max(sqrt(v̂_t), ε1)
    u = v_hat.clamp(min=eps1 * eps1).rsqrt().mul_(g)
    # û_t = u_t / max(1, RMS(u_t) / d): the update clipping
    clip = _rms(u, d).clamp(min=1)
    # θ_t = θ_{t-1} - γ_t max(ε2, RMS(θ_{t-1})) û_t
    param.add_(u, alpha=-(step_size / clip))


class Adafactor(Optimizer):
    r"""Implements Adafactor (Shazeer and Stern, 2018), as PyTorch does.

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \gamma \text{ (lr)}, \: \omega \text{ (beta2 decay)},
                \: \theta_0 \text{ (params)}, \: f(\theta) \text{ (objective)},                   \\
            &\hspace{13mm} \epsilon_1, \epsilon_2 \text{ (eps)}, \: d \text{ (clipping
                threshold)}, \: \lambda \text{ (weight decay)}, \: \textit{maximize}              \\
            &\textbf{initialize} : r_0 \leftarrow 0 \text{ (row statistics)}, \:
                c_0 \leftarrow 0 \text{ (column statistics)}, \:
                v_0 \leftarrow 0 \text{ (for vectors)}                                 \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}g_t \leftarrow \pm \nabla_{\theta} f_t (\theta_{t-1})
                \quad (- \textbf{ if } \textit{maximize})                                         \\
            &\hspace{5mm}\hat\beta_{2,t} \leftarrow 1 - t^{\omega}, \quad
                \gamma_t \leftarrow \min(\gamma, 1/\sqrt{t})                                      \\
            &\hspace{5mm}\textbf{if} \: g_t \text{ is a } p \times q \text{ matrix}             \\
            &\hspace{10mm}r_t \leftarrow \hat\beta_{2,t} r_{t-1} + (1 - \hat\beta_{2,t})
                \tfrac{1}{q} (g_t \odot g_t) 1_q                                                  \\
            &\hspace{10mm}c_t \leftarrow \hat\beta_{2,t} c_{t-1} + (1 - \hat\beta_{2,t})
                \tfrac{1}{p} (g_t \odot g_t)^\top 1_p                                             \\
            &\hspace{10mm}\hat v_t \leftarrow r_t c_t^\top /
                \max\big(\tfrac{1}{p} 1_p^\top r_t, \epsilon_1\big)                               \\
            &\hspace{5mm}\textbf{else}                                                           \\
            &\hspace{10mm}\hat v_t \leftarrow v_t \leftarrow \hat\beta_{2,t} v_{t-1}
                + (1 - \hat\beta_{2,t}) \, g_t \odot g_t                                          \\
            &\hspace{5mm}u_t \leftarrow g_t / \max\big(\sqrt{\hat v_t}, \epsilon_1\big)       \\
            &\hspace{5mm}\hat u_t \leftarrow u_t / \max\big(1, \mathrm{RMS}(u_t) / d\big)       \\
            &\hspace{5mm}\theta_t \leftarrow (1 - \gamma \lambda) \theta_{t-1} - \gamma_t
                \max\big(\epsilon_2, \mathrm{RMS}(\theta_{t-1})\big) \, \hat u_t                 \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \:  \theta_t                                                     \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    :math:`\mathrm{RMS}(x) = \lVert x \rVert / \sqrt{\text{number of entries of } x}` is taken over
    the whole tensor. A tensor of more than two dimensions is a batch of matrices in its last two
    dimensions: each matrix gets its own :math:`r_t`, :math:`c_t` and :math:`\hat v_t`, while
    both RMS are taken over the whole tensor. A scalar is treated as a vector.

    State, under PyTorch's keys: :math:`r` is ``row_var`` (the shape of the parameter with a last
    dimension of 1), :math:`c` is ``col_var`` (a second-to-last dimension of 1), :math:`v` is
    ``variance`` (for tensors of fewer than two dimensions), and :math:`t` is ``step``.

    Args:
        params (iterable): parameters, named parameters, or dicts defining parameter groups.
        lr (float, Tensor, optional): :math:`\gamma`, the largest relative step size
            :math:`\gamma_t`, and the factor of the weight decay (default: 1e-2)
        beta2_decay (float, optional): :math:`\omega \le 0`, the exponent of the decay rate
            :math:`\hat\beta_{2,t} = 1 - t^{\omega}` (default: -0.8)
        eps (tuple[float | None, float], optional): :math:`(\epsilon_1, \epsilon_2)`:
            :math:`\epsilon_1` bounds :math:`\hat v_t` and the mean row statistic from below
            (``None``: the machine epsilon of the parameter's dtype), :math:`\epsilon_2` bounds
            the parameter scale :math:`\mathrm{RMS}(\theta)` from below (default: (None, 1e-3))
        d (float, optional): the clipping threshold :math:`d \ge 1` on
            :math:`\mathrm{RMS}(u_t)` (default: 1.0)
        weight_decay (float, optional): decoupled weight decay :math:`\lambda` (default: 0.0)
        foreach (bool, optional): ``True`` runs the same update compiled, tensor by tensor
            (`optlib.fast`); the default (``None``) is the readable loop.
        maximize (bool, optional): maximize the objective instead of minimizing it
            (default: False)

    .. note::
        Shazeer and Stern's algorithm has no learning rate: its step size is
        :math:`\max(\epsilon_2, \mathrm{RMS}(\theta_{t-1})) \rho_t` with the relative step size
        :math:`\rho_t = \min(10^{-2}, 1/\sqrt{t})`. PyTorch replaces the constant
        :math:`10^{-2}` by ``lr`` (whose default is that constant) and also uses ``lr`` for a
        decoupled weight decay, which the paper does not have. The paper adds
        :math:`\epsilon_1` (there :math:`10^{-30}`) to :math:`g_t^2` before the row and column
        sums; PyTorch leaves the statistics alone and bounds :math:`\hat v_t` (by
        :math:`\epsilon_1^2`) and the mean of :math:`r_t` (by :math:`\epsilon_1`) instead, and
        keeps means where the paper keeps sums, which gives the same :math:`\hat v_t`. Neither
        has a first moment (the paper's experiments also try :math:`\beta_1 > 0`). With
        ``eps1=None``, torch 2.13 takes the machine epsilon of the first parameter of a group
        for the whole group; optlib takes each parameter's own.
    """

    # Two norms per tensor (RMS of θ and of u): the fast path updates each tensor alone.
    elementwise = False
    checkpoint_defaults = dict(foreach=None)

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
    ) -> None:
        # torch's checks, in torch's order and with its messages
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 >= beta2_decay:
            raise ValueError(f"beta2_decay should be <= 0 but is: {beta2_decay}")
        if eps[0] is not None and not 0.0 <= eps[0]:
            raise ValueError(f"epsilon1 should be >= 0 but is: {eps[0]}")
        if not 0.0 <= eps[1]:
            raise ValueError(f"epsilon2 should be >= 0 but is: {eps[1]}")
        if not 1.0 <= d:
            raise ValueError(f"Clipping threshold d should be >= 1 but is: {d}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay should be >= 0 but is: {weight_decay}")
        super().__init__(params, hyperparameters(locals()))

    def _init_state(self, param, group):
        if param.is_complex():
            raise RuntimeError("Adafactor does not support complex parameters")
        # torch shapes the state after the gradient (the parameter's shape and dtype; a
        # checkpoint that is being loaded has none)
        grad = param if param.grad is None else param.grad
        state = dict(step=step_counter())
        if grad.dim() > 1:  # one statistic per row and one per column
            state["row_var"] = grad.new_zeros((*grad.shape[:-1], 1))
            state["col_var"] = grad.new_zeros((*grad.shape[:-2], 1, grad.shape[-1]))
        else:
            state["variance"] = torch.zeros_like(grad)
        return state

    @staticmethod
    def _update(param, grad, state, group):
        eps1, eps2 = group["eps"]
        adafactor_update(
            param,
            grad,
            state.get("row_var"),
            state.get("col_var"),
            state.get("variance"),
            eps1=eps1,
            eps2=eps2,
            **settings_for(adafactor_update, group),  # lr, beta2_decay, d ...
        )
