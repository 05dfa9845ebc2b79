r"""Shampoo: a preconditioner per dimension of each tensor, L^{-1/4} G R^{-1/4} for a matrix; a
drop-in for ``pytorch_optimizer.Shampoo`` (the pytorch-optimizer package)."""

import torch
from torch import Tensor

from optlib.optimizer import Optimizer, check_non_negative

__all__ = ["Shampoo", "inverse_root", "shampoo_precondition", "shampoo_update"]


def inverse_root(matrix: Tensor, power: float) -> Tensor:
    """:math:`M^{-1/p}` of a symmetric positive definite matrix, by its singular value
    decomposition (float32 for a half-precision matrix, as the reference computes it)."""
    dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    u, s, vh = torch.linalg.svd(matrix.to(dtype), full_matrices=False)
    s.pow_(-1.0 / power)
    return ((u * s.unsqueeze(-2)) @ vh).to(matrix.dtype)


def shampoo_precondition(grad: Tensor, roots: list[Tensor]) -> Tensor:
    """:math:`G \\times_1 L_1^{-1/2k} \\times_2 \\cdots \\times_k L_k^{-1/2k}` for a tensor of order
    k: each dimension in turn is brought to the front and multiplied by its root (the last from
    the right, which puts every dimension back in place). For a matrix,
    :math:`L^{-1/4} G R^{-1/4}`."""
    shape = grad.shape
    for dim, root in enumerate(roots):
        grad = grad.transpose(0, dim).contiguous()
        moved = grad.shape
        unfolded = grad.view(moved[0], -1)
        if dim == len(roots) - 1:
            grad = (unfolded.t() @ root).view(shape)
        else:
            grad = (root @ unfolded).view(moved)
    return grad


def shampoo_update(
    param: Tensor,
    grad: Tensor,
    state: dict,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    weight_decouple: bool,
    fixed_decay: bool,
    recompute_roots: bool,
) -> None:
    """One Shampoo step for one tensor, in the order of the equations in `Shampoo`.

    Updates ``param`` and the state in place: the statistics ``pre_cond_i``, their inverse roots
    ``inv_pre_cond_i`` (when ``recompute_roots``) and ``momentum_buffer``, which the reference
    sets to the step just taken. ``grad`` is never modified.
    """
    if momentum > 0.0:
        grad = grad.lerp(state["momentum_buffer"], momentum)  # G̃ = (1 - μ) G + μ b
    if weight_decay != 0:
        if weight_decouple:
            param.mul_(1.0 - weight_decay * (1.0 if fixed_decay else lr))
        else:
            grad = grad.add(param, alpha=weight_decay)  # L2
    order = grad.dim()
    roots = []
    for dim, size in enumerate(grad.shape):
        unfolded = grad.movedim(dim, 0).reshape(size, -1)  # the mode-i unfolding G_(i)
        state[f"pre_cond_{dim}"].addmm_(unfolded, unfolded.t())  # L_i ← L_i + G_(i) G_(i)ᵀ
        if recompute_roots:
            state[f"inv_pre_cond_{dim}"].copy_(inverse_root(state[f"pre_cond_{dim}"], 2 * order))
        roots.append(state[f"inv_pre_cond_{dim}"])
    direction = shampoo_precondition(grad, roots)
    state["momentum_buffer"] = direction
    param.add_(direction, alpha=-lr)


class Shampoo(Optimizer):
    r"""Implements Shampoo (Gupta, Koren and Singer, 2018, Algorithms 1 and 2), as
    pytorch-optimizer does.

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \gamma \text{ (lr)}, \: \mu \text{ (momentum)},
                \: \lambda \text{ (weight decay)}, \: \epsilon \text{ (matrix eps)},
                \: f \text{ (preconditioning compute steps)},
                \: W_0 \in \mathbb{R}^{n_1 \times \cdots \times n_k}                            \\
            &\textbf{initialize} : L_i \leftarrow \epsilon I_{n_i}, \: \hat L_i \leftarrow 0,
                \: b \leftarrow G_1                                                              \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}G \leftarrow (1 - \mu) \nabla_W f_t(W_{t-1}) + \mu b \quad
                (\text{and } + \lambda W_{t-1} \text{ for L2 decay})                             \\
            &\hspace{5mm}L_i \leftarrow L_i + G_{(i)} G_{(i)}^\top \quad \text{for each dimension }
                i \: (G_{(i)}: \text{ the } n_i \times \prod_{j \ne i} n_j \text{ unfolding})    \\
            &\hspace{5mm}\textbf{if} \: t \bmod f = 0: \: \hat L_i \leftarrow L_i^{-1/(2k)}     \\
            &\hspace{5mm}b \leftarrow G \times_1 \hat L_1 \times_2 \cdots \times_k \hat L_k
                \qquad (\hat L^{-1/4} G \hat R^{-1/4} \text{ for a matrix})                     \\
            &\hspace{5mm}W_t \leftarrow W_{t-1} - \gamma b                                       \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \:  W_t                                                          \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    Adagrad keeps :math:`\sum g^2` per coordinate and divides by its root: a diagonal
    preconditioner. Full-matrix Adagrad would keep :math:`\sum g g^\top`, :math:`(mn)^2` numbers
    for an :math:`m \times n` matrix. Shampoo keeps one statistic per dimension, :math:`L = \sum
    G G^\top` (:math:`m^2`) and :math:`R = \sum G^\top G` (:math:`n^2`), whose Kronecker product
    approximates the full matrix; its inverse roots rotate and scale the gradient from both
    sides, so a problem whose curvature is not aligned with the coordinates is preconditioned as
    well as one that is. The roots cost :math:`O(m^3 + n^3)` per refresh (an SVD here), hence
    ``preconditioning_compute_steps``. A vector gets full-matrix Adagrad,
    :math:`L^{-1/2} g`; a scalar, SGD.

    Args:
        params (iterable): parameters or dicts defining parameter groups.
        lr (float, optional): learning rate :math:`\gamma` (default: 1e-3)
        momentum (float, optional): :math:`\mu`, in [0, 1) (default: 0)
        weight_decay (float, optional): :math:`\lambda` (default: 0)
        weight_decouple (bool, optional): decoupled decay instead of L2 (default: False)
        fixed_decay (bool, optional): with ``weight_decouple``, decay by :math:`\lambda` per step
            instead of :math:`\gamma\lambda` (default: False)
        preconditioning_compute_steps (int, optional): :math:`f`, steps between refreshes of the
            inverse roots (default: 1)
        matrix_eps (float, optional): :math:`\epsilon`, the statistics' start (default: 1e-6)
        maximize (bool, optional): maximize the objective (default: False)

    .. note::
        This class follows pytorch-optimizer 4.1.0 (``pytorch_optimizer.Shampoo``, from
        torch-optimizer's), the Shampoo of the 2018 paper; Distributed Shampoo, which won the
        AlgoPerf 2024 external-tuning track (grafting, exponents, blocking, distributed roots),
        is not a package. Where the reference differs from the paper: its momentum is not a
        moving average of gradients but a mix of the new gradient with the previous *step*,
        :math:`b`, the preconditioned direction (the first :math:`b` is the first gradient), and
        the statistics accumulate that mix; the inverse roots start at 0, so with :math:`f > 1`
        the parameters do not move before step :math:`f`; the roots come from an SVD of
        :math:`L_i`, started at :math:`\epsilon I` as in the paper. Differences from the reference: ``p.grad`` is never modified (the
        reference mixes the momentum, adds the decay and negates it for ``maximize`` in place); a
        negative ``lr`` and a ``preconditioning_compute_steps`` below 1 raise torch's
        ``ValueError`` (the reference raises its own ``NegativeLRError`` and
        ``NegativeStepError``); extra keyword options raise ``NotImplementedError``.
    """

    # Preconditioners are products of whole gradients: under FSDP2 one rank updates each tensor
    # (optlib.sharded).
    whole_tensors = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        weight_decouple: bool = False,
        fixed_decay: bool = False,
        preconditioning_compute_steps: int = 1,
        matrix_eps: float = 1e-6,
        maximize: bool = False,
        **kwargs,
    ) -> None:
        if kwargs:
            raise NotImplementedError(f"optlib.Shampoo does not implement the options {sorted(kwargs)}")
        check_non_negative(lr=lr, weight_decay=weight_decay, matrix_eps=matrix_eps)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum value: {momentum} (must be in [0, 1))")
        if not preconditioning_compute_steps >= 1:
            raise ValueError(f"Invalid preconditioning_compute_steps: {preconditioning_compute_steps} (must be >= 1)")
        # kept on the optimizer, not in the groups, as the reference keeps them
        self.preconditioning_compute_steps = preconditioning_compute_steps
        self.maximize = maximize
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            weight_decouple=weight_decouple,
            fixed_decay=fixed_decay,
            matrix_eps=matrix_eps,
        )
        super().__init__(params, defaults)

    def _init_state(self, param, group):
        if param.is_complex():
            raise RuntimeError("Shampoo does not support complex parameter")  # the reference's text
        grad = param.grad
        state = dict(momentum_buffer=grad.clone()) if group["momentum"] > 0.0 else {}
        for dim, size in enumerate(grad.shape):
            state[f"pre_cond_{dim}"] = torch.eye(size, device=grad.device).to(grad.dtype).mul_(group["matrix_eps"])
            state[f"inv_pre_cond_{dim}"] = grad.new_zeros(size, size)
        return state

    def _settings(self, group):
        group["step"] = group.get("step", 0) + 1  # one count per group, as the reference keeps it
        settings = super()._settings(group)
        recompute = settings["step"] % self.preconditioning_compute_steps == 0
        return settings | dict(maximize=self.maximize, recompute_roots=recompute)

    @staticmethod
    def _update(param, grad, state, group):
        shampoo_update(
            param,
            -grad if group["maximize"] else grad,
            state,
            lr=group["lr"],
            momentum=group["momentum"],
            weight_decay=group["weight_decay"],
            weight_decouple=group["weight_decouple"],
            fixed_decay=group["fixed_decay"],
            recompute_roots=group["recompute_roots"],
        )
