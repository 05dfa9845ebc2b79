r"""Muon: momentum orthogonalized by a Newton–Schulz iteration, for the matrices of a network's
hidden layers; a drop-in for torch.optim.Muon."""

import math

import torch
from torch import Tensor

from optlib.optimizer import Optimizer, check_tensor_lr, hyperparameters, settings_for

__all__ = ["Muon", "adjusted_lr", "muon_update", "zeropower_via_newtonschulz"]

# Keller Jordan's quintic (a, b, c), the normalisation's epsilon and the number of steps: the
# defaults of torch.optim.Muon and of the reference implementation, github.com/KellerJordan/Muon.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
EPS = 1e-7
NS_STEPS = 5


def zeropower_via_newtonschulz(
    G: Tensor,
    ns_coefficients: tuple[float, float, float],
    ns_steps: int,
    eps: float,
) -> Tensor:
    """About U V^T for G = U Σ V^T, in bfloat16, as torch computes it.

    Each step applies the odd polynomial p(X) = a X + b (X Xᵀ) X
    + c (X Xᵀ)² X, which is U p(Σ) Vᵀ: it keeps the singular vectors and
    maps every singular value σ to p(σ). After the division by the Frobenius
    norm every σ lies in [0, 1], where the iterates of p rise towards 1.
    ``G`` is not modified.
    """
    if ns_steps >= 100:
        raise ValueError(
            "Number of steps must be less than 100 "
            "for computational efficiency"
        )
    if G.ndim != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    if len(ns_coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    a, b, c = ns_coefficients
    X = G.bfloat16()  # as torch: in bfloat16, whatever G's dtype
    tall = G.size(0) > G.size(1)
    if tall:  # work on the wide side: X Xᵀ is then the smaller Gram matrix
        X = X.T
    X = X / X.norm().clamp(min=eps)  # ‖X‖₂ ≤ ‖X‖_F = 1: every σ in [0, 1]
    for _ in range(ns_steps):
        A = X @ X.T  # A = X Xᵀ = U Σ² Uᵀ
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # B = b A + c A²
        X = torch.addmm(X, B, X, beta=a)  # X ← a X + B X = U p(Σ) Vᵀ
    return X.T if tall else X


def adjusted_lr(
    lr: float, adjust_lr_fn: str | None, shape: torch.Size
) -> float:
    """The learning rate for a matrix of ``shape``: orthogonalized updates of
    different shapes have different sizes, and this factor evens them out."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":  # Jordan et al.
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":  # Liu et al.: RMS of AdamW's step
        return lr * (0.2 * math.sqrt(max(rows, cols)))
    return lr  # torch's fallback, for a name set in a group after the checks


def muon_update(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: tuple[float, float, float],
    eps: float,
    ns_steps: int,
    adjust_lr_fn: str | None,
) -> None:
    """One Muon step for one matrix, in the order of the equations in `Muon`.

    Updates ``param`` and ``momentum_buffer`` in place; ``grad`` is never
    modified.
    """
    if grad.ndim != 2:
        raise ValueError("Param gradient must be a 2D matrix")
    momentum_buffer.lerp_(grad, 1 - momentum)  # M_t = μ M_{t-1} + (1 - μ) G_t
    if nesterov:  # M̃_t = μ M_t + (1 - μ) G_t, a new tensor
        M = grad.lerp(momentum_buffer, momentum)
    else:  # M̃_t = M_t
        M = momentum_buffer
    O = zeropower_via_newtonschulz(M, ns_coefficients, ns_steps, eps)  # O_t
    step_size = adjusted_lr(lr, adjust_lr_fn, param.shape)  # γ'
    param.mul_(1 - lr * weight_decay)  # θ ← (1 - γλ) θ_{t-1}, decoupled
    param.add_(O, alpha=-step_size)  # θ_t = θ - γ' O_t


class Muon(Optimizer):
    r"""Implements Muon (Jordan et al., 2024): SGD with momentum whose update for each matrix
    is orthogonalized.

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \gamma \text{ (lr)}, \: \lambda \text{ (weight decay)}, \:
                \mu \text{ (momentum)}, \: \textit{nesterov}, \:
                \theta_0 \in \mathbb{R}^{d_{out} \times d_{in}} \text{ (params)},               \\
            &\hspace{13mm} (a, b, c) \text{ (NS coefficients)}, \: \epsilon \text{ (eps)},
                \: k \text{ (NS steps)}, \: f(\theta) \text{ (objective)}                        \\
            &\textbf{initialize} : M_0 \leftarrow 0 \text{ (momentum buffer)}, \:
                \gamma' \leftarrow \gamma \sqrt{\max(1, d_{out} / d_{in})}
                \text{ or } 0.2 \, \gamma \sqrt{\max(d_{out}, d_{in})}                     \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}G_t \leftarrow \nabla_{\theta} f_t (\theta_{t-1})                       \\
            &\hspace{5mm}M_t \leftarrow \mu M_{t-1} + (1 - \mu) G_t                              \\
            &\hspace{5mm}\textbf{if} \: \textit{nesterov} \: \textbf{then} \:
                \widetilde{M}_t \leftarrow \mu M_t + (1 - \mu) G_t
                \: \textbf{else} \: \widetilde{M}_t \leftarrow M_t                               \\
            &\hspace{5mm}X_0 \leftarrow \widetilde{M}_t / \max(\lVert \widetilde{M}_t
                \rVert_F, \epsilon) \quad \text{(transposed if } d_{out} > d_{in})               \\
            &\hspace{5mm}\textbf{for} \: j=1 \: \textbf{to} \: k \: \textbf{do}                  \\
            &\hspace{10mm}A \leftarrow X_{j-1} X_{j-1}^\top, \quad
                X_j \leftarrow a X_{j-1} + (b A + c A^2) X_{j-1}                                 \\
            &\hspace{5mm}O_t \leftarrow X_k \quad (\approx U V^\top \text{ for }
                \widetilde{M}_t = U \Sigma V^\top)                                               \\
            &\hspace{5mm}\theta_t \leftarrow (1 - \gamma \lambda) \theta_{t-1} - \gamma' O_t     \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \:  \theta_t                                                     \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    State, under PyTorch's key: :math:`M` is ``momentum_buffer``. Muon takes matrices only:
    optimize embeddings, the output layer, biases and gains with another optimizer (AdamW).

    Args:
        params (iterable): 2-D parameters, named parameters, or dicts defining parameter groups.
        lr (float, Tensor, optional): learning rate :math:`\gamma` (default: 1e-3)
        weight_decay (float, optional): decoupled weight decay :math:`\lambda`, as AdamW's
            (default: 0.1)
        momentum (float, optional): momentum :math:`\mu` (default: 0.95)
        nesterov (bool, optional): orthogonalize Nesterov's look-ahead
            :math:`\mu M_t + (1 - \mu) G_t` instead of :math:`M_t` (default: True)
        ns_coefficients (tuple[float, float, float], optional): :math:`(a, b, c)` of the
            polynomial :math:`p(\sigma) = a\sigma + b\sigma^3 + c\sigma^5`
            (default: (3.4445, -4.775, 2.0315))
        eps (float, optional): :math:`\epsilon`, the smallest norm divided by (default: 1e-7)
        ns_steps (int, optional): Newton–Schulz steps :math:`k`, fewer than 100 (default: 5)
        adjust_lr_fn (str, optional): ``"original"`` (Jordan et al.) or ``"match_rms_adamw"``
            (Liu et al., 2025) for :math:`\gamma'`; ``None`` means ``"original"``
            (default: None)

    .. note::
        PyTorch's momentum is the moving average of the reference implementation
        (KellerJordan/Muon), not the sum :math:`M_t = \mu M_{t-1} + G_t` of the blog post and
        of PyTorch's own documentation; the two differ by the factor :math:`1 - \mu`, which
        the normalisation removes. Unlike the reference, PyTorch takes only 2-D parameters
        (the reference also flattens convolution filters and runs batches of matrices),
        divides by :math:`\max(\lVert X \rVert_F, \epsilon)` instead of
        :math:`\lVert X \rVert_F + \epsilon`, scales the step by :math:`\gamma'` in the
        parameter's dtype instead of scaling the bfloat16 update, never writes to ``grad``
        (the reference stores Nesterov's look-ahead there), skips parameters without a
        gradient (the reference steps them with a zero gradient), and defaults to
        ``lr=1e-3, weight_decay=0.1`` (the reference: 0.02 and 0). The Newton–Schulz
        iteration always runs in bfloat16, also for float64 parameters. One deliberate
        difference from torch 2.13 and 2.14: for a bfloat16 parameter with ``nesterov=False``,
        they divide the momentum buffer itself by its norm at every step (``.bfloat16()``
        returns the buffer and the division is in place); optlib divides a new tensor and keeps
        the average, as torch does from 2.15 on.
    """

    # The update reduces over a matrix (a norm, matrix products): no flat packing of tensors.
    elementwise = False
    # Newton–Schulz orthogonalizes a whole matrix: under FSDP2 one rank does each (optlib.sharded).
    whole_tensors = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = EPS,
        ns_steps: int = NS_STEPS,
        adjust_lr_fn: str | None = None,
    ) -> None:
        # torch's checks and messages, in torch's order; ns_steps and ns_coefficients are
        # checked at the step, as torch does.
        check_tensor_lr(lr)
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 <= momentum:
            raise ValueError(f"momentum should be >= 0 but is: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        super().__init__(params, hyperparameters(locals()))
        for group in self.param_groups:
            for param in group["params"]:
                if param.ndim != 2:
                    raise ValueError(
                        "Muon only supports 2D parameters whereas we found a parameter with "
                        f"size: {param.size()}"
                    )

    def _init_state(self, param, group):
        if param.is_complex():
            raise RuntimeError("Muon does not support complex parameters")
        # Like the gradient (torch's choice): same dtype, device and memory layout.
        buffer = torch.zeros_like(param.grad, memory_format=torch.preserve_format)
        return dict(momentum_buffer=buffer)

    @staticmethod
    def _update(param, grad, state, group):
        muon_update(
            param,
            grad,
            state["momentum_buffer"],
            **settings_for(muon_update, group),  # lr, momentum, ns_steps ...
        )
