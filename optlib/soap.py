r"""SOAP: Adam run in the eigenbasis of Shampoo's preconditioner; a drop-in for
``pytorch_optimizer.SOAP`` (the pytorch-optimizer package, a port of the authors' code)."""

import math
from itertools import chain

import torch
from torch import Tensor

from optlib.optimizer import Optimizer, check_betas, check_non_negative

__all__ = ["SOAP", "eigenbases", "project", "refresh_eigenbases", "soap_update"]


def project(tensor: Tensor, bases: list, *, backward: bool = False) -> Tensor:
    r"""``tensor`` in the eigenbases (:math:`Q_L^\top G Q_R` for a matrix), or back
    (``backward=True``: :math:`Q_L G' Q_R^\top`).

    Each step of the loop contracts the first dimension with its basis and moves it last, so that
    after one step per dimension every dimension is back in place. A dimension without a basis
    (``[]``, too large or a vector) is only moved: it stays in the standard basis.
    """
    for basis in bases:
        if len(basis) > 0:
            tensor = torch.tensordot(tensor, basis, dims=[[0], [1 if backward else 0]])
        else:
            tensor = tensor.permute([*range(1, tensor.dim()), 0])
    return tensor


def eigenbases(statistics: list) -> list:
    """The eigenvectors of each statistic L, R, ..., by ``eigh``, largest eigenvalue first; the
    first bases, before any power iteration."""
    bases = []
    for matrix in statistics:
        if len(matrix) == 0:
            bases.append([])
            continue
        # a tiny multiple of the identity, as in the authors' code: eigh of a singular matrix
        _, vectors = torch.linalg.eigh(matrix + 1e-30 * torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device))
        bases.append(torch.flip(vectors, dims=[1]))
    return bases


def refresh_eigenbases(statistics: list, bases: list, exp_avg_sq: Tensor) -> tuple[list, Tensor]:
    """One step of power iteration for each basis, Q ← qr(L Q), with the columns sorted by the
    estimated eigenvalues qᵢᵀ L qᵢ; ``exp_avg_sq`` (kept in the old basis) is permuted with them.
    QR runs in float32 (as in the reference; torch's QR lacks bfloat16)."""
    refreshed = []
    for dim, (matrix, basis) in enumerate(zip(statistics, bases)):
        if len(matrix) == 0:
            refreshed.append([])
            continue
        product = matrix @ basis
        estimated_eigenvalues = (basis * product).sum(dim=0)
        order = torch.argsort(estimated_eigenvalues, descending=True)
        exp_avg_sq = exp_avg_sq.index_select(dim, order)
        q, _ = torch.linalg.qr(product.index_select(1, order).to(torch.float32))
        refreshed.append(q.to(product.dtype))
    return refreshed, exp_avg_sq


def soap_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    bases: list,
    *,
    lr: float,
    step_size: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    normalize_gradient: bool,
    to_preconditioned_shape,
    to_param_shape,
) -> None:
    """One SOAP step for one tensor, with the bases of the previous steps: Adam in their
    coordinates. Updates ``param``, ``exp_avg`` (m, in the parameter's coordinates) and
    ``exp_avg_sq`` (v, in the eigenbases) in place; ``grad`` is never modified.
    ``to_preconditioned_shape`` and ``to_param_shape`` merge and unmerge small dimensions."""

    def rotate(tensor, backward=False):
        return to_param_shape(project(to_preconditioned_shape(tensor), bases, backward=backward))

    grad_rotated = rotate(grad)  # G' = Q_Lᵀ G Q_R
    exp_avg.lerp_(grad, 1.0 - beta1)  # m_t = β1 m_{t-1} + (1 - β1) G, unrotated
    exp_avg_sq.lerp_(grad_rotated.square(), 1.0 - beta2)  # v_t = β2 v_{t-1} + (1 - β2) G'²
    denom = exp_avg_sq.sqrt().add_(eps)
    direction = rotate(rotate(exp_avg) / denom, backward=True)  # Q_L (m'_t / (√v_t + ε)) Q_Rᵀ
    if normalize_gradient:
        direction.div_(torch.mean(direction.square()).sqrt_().add_(eps))
    param.add_(direction, alpha=-step_size)  # step_size = γ √(1 - β2^t) / (1 - β1^t)
    if weight_decay != 0:
        param.mul_(1.0 - weight_decay * lr)  # decoupled decay, after the step as in the reference


class SOAP(Optimizer):
    r"""Implements SOAP, ShampoO with Adam in the Preconditioner's eigenbasis (Vyas et al., 2024,
    Algorithm 3), as pytorch-optimizer ports the authors' code.

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \gamma \text{ (lr)}, \: \beta_1, \beta_2 \text{ (betas)},
                \: \beta_s \text{ (shampoo beta)}, \: f \text{ (precondition frequency)},
                \: \epsilon, \: \lambda, \: W_0 \in \mathbb{R}^{m \times n} \text{ (params)}    \\
            &\textbf{initialize} : \text{on step 1 only: } L, R \leftarrow (1-\beta_s) G_1 G_1^\top,
                (1-\beta_s) G_1^\top G_1; \: Q_L, Q_R \leftarrow \operatorname{eigh}(L),
                \operatorname{eigh}(R); \: m, v \leftarrow 0                                     \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}
                \quad (t \text{ counts the steps after the first})                               \\
            &\hspace{5mm}G \leftarrow \nabla_W f(W_{t-1}), \quad G' \leftarrow Q_L^\top G Q_R  \\
            &\hspace{5mm}m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) G, \quad
                v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) G'^2                              \\
            &\hspace{5mm}N \leftarrow Q_L \frac{Q_L^\top m_t Q_R}{\sqrt{v_t} + \epsilon} Q_R^\top \\
            &\hspace{5mm}W_t \leftarrow (1 - \gamma\lambda)\Big(W_{t-1}
                - \gamma \frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t} N\Big)                      \\
            &\hspace{5mm}L \leftarrow \beta_s L + (1 - \beta_s) G G^\top, \quad
                R \leftarrow \beta_s R + (1 - \beta_s) G^\top G                                  \\
            &\hspace{5mm}\textbf{if} \: t \bmod f = 0: \: Q_L \leftarrow \operatorname{qr}(L Q_L),
                \: Q_R \leftarrow \operatorname{qr}(R Q_R), \text{ columns sorted, } v
                \text{ permuted with them}                                                       \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \:  W_t                                                          \\[-1.ex]
       \end{aligned}

    Shampoo preconditions a matrix gradient from both sides, :math:`L^{-1/4} G R^{-1/4}`; its
    preconditioner's eigenvectors :math:`Q_L, Q_R` give coordinates in which it is diagonal.
    SOAP runs Adam in those coordinates: a per-coordinate second moment of the rotated gradient,
    updated every step, where Shampoo would hold its eigenvalues fixed between refreshes. The
    bases are refreshed every :math:`f` steps by one step of power iteration. A dimension larger
    than ``max_precondition_dim`` (and a vector, unless ``precondition_1d``) keeps the standard
    basis: along it SOAP is Adam. State: ``exp_avg``, ``exp_avg_sq``, the statistics ``GG``
    (:math:`L, R`, one matrix per dimension, ``[]`` where none), the bases ``Q``, and the
    parameter's ``precondition_frequency`` and ``shampoo_beta``. Memory per :math:`m \times n`
    matrix: Adam's :math:`2mn` plus :math:`2(m^2 + n^2)`.

    Args:
        params (iterable): parameters or dicts defining parameter groups.
        lr (float, optional): learning rate :math:`\gamma` (default: 3e-3)
        betas (tuple[float, float], optional): :math:`(\beta_1, \beta_2)` (default: (0.95, 0.95))
        shampoo_beta (float, optional): :math:`\beta_s`; ``None`` for :math:`\beta_2` (default: None)
        weight_decay (float, optional): :math:`\lambda`, decoupled (default: 0.01)
        precondition_frequency (int, optional): :math:`f` (default: 10)
        max_precondition_dim (int, optional): larger dimensions keep the standard basis
            (default: 10000)
        merge_dims (bool, optional): merge small dimensions (a convolution's kernel and input
            channels) up to ``max_precondition_dim`` before preconditioning (default: False)
        precondition_1d (bool, optional): precondition vectors with one full matrix (default: False)
        correct_bias (bool, optional): Adam's bias correction (default: True)
        normalize_gradient (bool, optional): divide the direction by its RMS (default: False)
        data_format (str, optional): ``'channels_first'`` or ``'channels_last'``, the layout of
            4-dimensional parameters for ``merge_dims`` (default: 'channels_first')
        eps (float, optional): :math:`\epsilon` (default: 1e-8)
        maximize (bool, optional): maximize the objective (default: False)

    .. note::
        This class follows pytorch-optimizer 4.1.0 (``pytorch_optimizer.SOAP``), a port of the
        authors' code (nikhilvyas/SOAP, not a package) with ``max_precond_dim`` and
        ``normalize_grads`` renamed ``max_precondition_dim`` and ``normalize_gradient``. The paper's
        Algorithm 3 shows one step; as in the authors' code, the first step only initializes
        :math:`L, R` and the bases and does not move the parameters, so the bias correction counts
        from the second step, and the decay is applied after the step (the authors add
        :math:`-\gamma\lambda W`, pytorch-optimizer multiplies by :math:`1 - \gamma\lambda`). As in
        the paper, :math:`m` is kept in the parameter's coordinates and rotated when used, so a
        new basis leaves no stale first moment, while :math:`v`, kept in the eigenbasis, is only
        permuted when the basis changes. Differences from the reference: ``p.grad`` is never modified
        (the reference negates it for ``maximize``); a negative ``lr`` raises torch's
        ``ValueError`` (the reference raises its own ``NegativeLRError``), an unknown
        ``data_format`` ``ValueError`` (the reference ignores it), and extra keyword options
        ``NotImplementedError``; with ``merge_dims``, a tensor whose dimensions all merge into one
        (every vector, a small matrix) is preconditioned as that one dimension, as in the authors'
        code, where the reference fails to reshape it.
    """

    # Eigenbases of products of whole gradients: under FSDP2 one rank updates each tensor
    # (optlib.sharded).
    whole_tensors = True

    def __init__(
        self,
        params,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float | None = None,
        weight_decay: float = 1e-2,
        precondition_frequency: int = 10,
        max_precondition_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        correct_bias: bool = True,
        normalize_gradient: bool = False,
        data_format: str = "channels_first",
        eps: float = 1e-8,
        maximize: bool = False,
        **kwargs,
    ) -> None:
        if kwargs:
            raise NotImplementedError(f"optlib.SOAP does not implement the options {sorted(kwargs)}")
        check_non_negative(lr=lr, weight_decay=weight_decay, eps=eps)
        if shampoo_beta is not None:
            check_non_negative(shampoo_beta=shampoo_beta)
        check_betas(betas)
        for name, value in [("precondition_frequency", precondition_frequency), ("max_precondition_dim", max_precondition_dim)]:
            if not value > 0:
                raise ValueError(f"Invalid {name} value: {value} (must be positive)")
        if data_format not in ("channels_first", "channels_last"):
            raise ValueError(f"Invalid data_format: {data_format!r} (channels_first or channels_last)")
        # kept on the optimizer, not in the groups, as the reference keeps them
        self.data_format = data_format
        self.maximize = maximize
        defaults = dict(
            lr=lr,
            betas=betas,
            shampoo_beta=shampoo_beta,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            max_precondition_dim=max_precondition_dim,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            correct_bias=correct_bias,
            normalize_gradient=normalize_gradient,
            eps=eps,
        )
        super().__init__(params, defaults)

    # ------------------------------------------------ shapes: merged dimensions, channels last
    def _shapes(self, shape: torch.Size, group: dict):
        """Two functions between the parameter's shape and the shape that is preconditioned:
        with ``merge_dims``, small dimensions merged up to ``max_precondition_dim`` (a
        channels-last 4-d tensor first permuted to channels first); otherwise the identity."""
        if not group["merge_dims"]:
            return (lambda t: t), (lambda t: t)
        channels_last = self.data_format == "channels_last" and len(shape) == 4
        permuted = torch.Size([shape[0], shape[3], shape[1], shape[2]]) if channels_last else shape
        merged = _merge_small_dims(permuted, group["max_precondition_dim"])

        def to_preconditioned_shape(t):
            return (t.permute(0, 3, 1, 2) if channels_last else t).reshape(merged)

        def to_param_shape(t):
            return t.reshape(permuted).permute(0, 2, 3, 1) if channels_last else t.reshape(shape)

        return to_preconditioned_shape, to_param_shape

    def _accumulate(self, grad: Tensor, state: dict, step: int, group: dict) -> None:
        """L ← β_s L + (1 - β_s) G Gᵀ for every preconditioned dimension (the contraction over all
        other dimensions, for a tensor of any order); the first bases by eigh, and every f-th
        step a refresh by power iteration."""
        to_preconditioned_shape, to_param_shape = self._shapes(grad.shape, group)
        statistics = state["GG"]
        if grad.dim() == 1:
            if group["precondition_1d"] and grad.shape[0] <= group["max_precondition_dim"]:
                statistics[0].lerp_((grad.unsqueeze(1) @ grad.unsqueeze(0)).to(statistics[0].dtype), 1.0 - state["shampoo_beta"])
        else:
            merged = to_preconditioned_shape(grad)
            for dim, size in enumerate(merged.shape):
                if size <= group["max_precondition_dim"]:
                    others = [*chain(range(dim), range(dim + 1, merged.dim()))]
                    outer = torch.tensordot(merged, merged, dims=[others, others])
                    statistics[dim].lerp_(outer.to(statistics[dim].dtype), 1.0 - state["shampoo_beta"])
        if state["Q"] is None:
            state["Q"] = eigenbases(statistics)
        if step > 0 and step % state["precondition_frequency"] == 0:
            exp_avg_sq = to_preconditioned_shape(state["exp_avg_sq"])
            state["Q"], exp_avg_sq = refresh_eigenbases(statistics, state["Q"], exp_avg_sq)
            state["exp_avg_sq"] = to_param_shape(exp_avg_sq)

    def _init_state(self, param, group):
        grad = -param.grad if self.maximize else param.grad
        shampoo_beta = group["shampoo_beta"] if group["shampoo_beta"] is not None else group["betas"][1]
        to_preconditioned_shape, _ = self._shapes(grad.shape, group)
        if grad.dim() == 1:
            sizes = [grad.shape[0] if group["precondition_1d"] else None]
        else:
            sizes = list(to_preconditioned_shape(grad).shape)
        statistics = [
            torch.zeros(size, size, dtype=grad.dtype, device=grad.device)
            if size is not None and size <= group["max_precondition_dim"]
            else []
            for size in sizes
        ]
        state = dict(
            exp_avg=torch.zeros_like(grad),
            exp_avg_sq=torch.zeros_like(grad),
            GG=statistics,
            Q=None,
            precondition_frequency=group["precondition_frequency"],
            shampoo_beta=shampoo_beta,
        )
        # the first gradient starts the statistics and the bases (at the group's previous step)
        self._accumulate(grad, state, group["step"] - 1, group)
        return state

    def _settings(self, group):
        group["step"] = group.get("step", 0) + 1  # one count per group, as the reference keeps it
        settings = super()._settings(group)
        beta1, beta2 = settings["betas"]
        t = settings["step"] - 1  # the first step does not move the parameters
        step_size = settings["lr"]
        if settings["correct_bias"] and t > 0:
            step_size *= math.sqrt(1.0 - math.pow(beta2, t)) / (1.0 - math.pow(beta1, t))
        return settings | dict(t=t, step_size=step_size)

    def _update(self, param, grad, state, group):
        if group["t"] == 0:
            return  # step 1 of the group: only the statistics and the bases
        grad = -grad if self.maximize else grad
        beta1, beta2 = group["betas"]
        to_preconditioned_shape, to_param_shape = self._shapes(grad.shape, group)
        soap_update(
            param,
            grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            state["Q"],
            lr=group["lr"],
            step_size=group["step_size"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            normalize_gradient=group["normalize_gradient"],
            to_preconditioned_shape=to_preconditioned_shape,
            to_param_shape=to_param_shape,
        )
        self._accumulate(grad, state, group["t"], group)


def _merge_small_dims(shape, max_dim: int) -> list[int]:
    """Merge neighbouring dimensions while their product stays within ``max_dim``:
    [1, 2, 512, 1, 2048, 1, 3, 4] with 1024 gives [1024, 2048, 12]. Where all merge into one, the
    result is that one dimension (the reference returns [1] and then fails to reshape)."""
    merged, product = [], 1
    for size in shape:
        product *= size
        if product > max_dim:
            merged.append(product // size)
            product = size
    merged.append(product)
    return merged
