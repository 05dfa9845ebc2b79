r"""8-bit AdamW: AdamW whose two moments are stored in 8 bits per number, quantized block by block
(Dettmers et al., 2022); a drop-in for ``bitsandbytes.optim.AdamW8bit`` (the bitsandbytes package)."""

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from optlib.optimizer import Optimizer, check_betas, check_non_negative

__all__ = [
    "AdamW8bit",
    "adamw8bit_update",
    "dequantize_blockwise",
    "dynamic_map",
    "quantize_blockwise",
    "rounding_table",
]

# B: numbers that share one scale (absmax). The paper uses 2048; bitsandbytes, 256.
BLOCK_SIZE = 256
# bitsandbytes on the CPU rounds through a table of this many evenly spaced points of [-1, 1].
TABLE_SIZE = 65536
# The state entries that hold the quantized moments (and the 32-bit moments of small tensors).
# bitsandbytes keeps them in the dtype it made them in, never the parameter's, and its
# state_dict nests them under one key so that FSDP does not try to shard them.
QUANT_KEYS = ("state1", "qmap1", "state2", "qmap2", "absmax1", "absmax2")
_WRAPPER_KEY = "__bnb_optimizer_quant_state__"


def dynamic_map(signed: bool = True) -> Tensor:
    """The 256 numbers in [-1, 1] that the 8-bit codes stand for, sorted: Dettmers' dynamic data
    type, as ``bitsandbytes.functional.create_dynamic_map`` builds it.

    A code is an exponent and a fraction. Seven decades, 10^-6 ... 10^0, each with evenly spaced
    fractions in [0.1, 1] (the midpoints of equal bins): 1, 2, 4, ... 64 of them, so that the
    largest decade, where the big numbers of a block are, is the finest. A signed map spends one
    bit on the sign (127 magnitudes, each with both signs); the unsigned map, for the second
    moment, which is never negative, spends it on twice as many fractions (254). With 0 and 1
    that makes 256.
    """
    magnitudes = []
    for decade in range(7):  # 10^(decade - 6)
        fractions = 2**decade if signed else 2 ** (decade + 1)
        edges = torch.linspace(0.1, 1, fractions + 1, dtype=torch.float32)
        midpoints = (edges[:-1] + edges[1:]) / 2.0
        magnitudes.append(10 ** (decade - 6) * midpoints)
    magnitudes = torch.cat(magnitudes)
    values = [magnitudes, -magnitudes] if signed else [magnitudes]
    return torch.cat([*values, torch.tensor([0.0, 1.0])]).sort().values


def rounding_table(code: Tensor, size: int = TABLE_SIZE) -> Tensor:
    """For each of ``size`` evenly spaced points of [-1, 1], the index of its nearest entry of
    ``code``: bitsandbytes' CPU kernel rounds a number to the entry nearest to the point it falls
    next to, one table look-up instead of a search of the map."""
    midpoints = (code[:-1] + code[1:]) * 0.5
    points = (2.0 * torch.arange(size, dtype=torch.float32)) / (size - 1) - 1.0
    # entry k is nearest to a point that lies above k midpoints
    return torch.searchsorted(midpoints, points).to(torch.uint8)


def _nearest(normed: Tensor, code: Tensor) -> Tensor:
    """The index of the entry of ``code`` nearest to each number (a tie goes to the lower)."""
    above = torch.searchsorted(code, normed).clamp(1, code.numel() - 1)  # first entry ≥ x
    below = above - 1
    closer_above = (code[above] - normed).abs() < (normed - code[below]).abs()
    return torch.where(closer_above, above, below)


def _blocks(x: Tensor, block_size: int) -> Tensor:
    """``x`` in row-major order as rows of ``block_size`` numbers; zeros pad the last one."""
    flat = x.reshape(-1)
    return F.pad(flat, (0, -flat.numel() % block_size)).view(-1, block_size)


def quantize_blockwise(x: Tensor, code: Tensor, block_size: int = BLOCK_SIZE, table: Tensor | None = None):
    """``x`` (float32) as 8-bit indices into ``code`` (uint8, shaped like ``x``) and the absolute
    maximum of each block of ``block_size`` numbers (float32; the last block may be shorter).

    Each block is divided by its absmax, so that its largest number becomes ±1 and a single
    outlier only coarsens its own block, and each number becomes the index of the nearest entry
    of ``code``: exactly so without a ``table`` (the paper), through ``rounding_table(code)``
    with one (bitsandbytes on the CPU, whose table cannot tell apart entries closer than its
    spacing, 2 / 65535 ≈ 3e-5: 0 itself becomes the entry 2.1e-5 of the signed map).
    """
    blocks = _blocks(x, block_size)
    absmax = blocks.abs().amax(dim=1)
    # x times 1/absmax, as bitsandbytes computes it (a division may round differently)
    normed = blocks * torch.where(absmax > 0, absmax.reciprocal(), 0.0)[:, None]
    if table is None:
        indices = _nearest(normed, code)
    else:
        position = (normed.clamp(-1.0, 1.0) + 1.0) * 0.5 * (table.numel() - 1) + 0.5
        indices = table[position.long()]  # .long() truncates: the nearest of the points
    # An all-zero block decodes to 0 whatever its indices; bitsandbytes stores 0.
    indices = indices.masked_fill((absmax == 0)[:, None], 0).to(torch.uint8)
    return indices.view(-1)[: x.numel()].view(x.shape), absmax


def dequantize_blockwise(indices: Tensor, absmax: Tensor, code: Tensor, block_size: int = BLOCK_SIZE) -> Tensor:
    """The float32 numbers that ``indices`` and ``absmax`` stand for: code[index] × absmax."""
    values = _blocks(code[indices.long()], block_size) * absmax[:, None]
    return values.view(-1)[: indices.numel()].view(indices.shape)


def adamw8bit_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: float,
    eps_hat: bool,
) -> None:
    r"""One AdamW step in float32 on float32 moments ``exp_avg`` (m) and ``exp_avg_sq`` (v),
    which it updates in place (the caller quantizes them again); ``grad`` is never modified.

    ``eps_hat`` picks between two forms of the step that agree in exact arithmetic:
    :math:`\frac{\gamma}{1-\beta_1^t}\, m / (\sqrt{v / (1-\beta_2^t)} + \epsilon)`, torch's and
    bitsandbytes' 8-bit kernel's, and
    :math:`\gamma \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\, m / (\sqrt{v} + \hat\epsilon)` with
    :math:`\hat\epsilon = \epsilon \sqrt{1-\beta_2^t}` (Kingma and Ba's form), bitsandbytes'
    32-bit kernel's. They round differently; each is kept where the reference uses it.
    """
    grad = grad.float()
    param_f32 = param.float()  # the parameter itself when it is float32
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)  # m_t = β1 m_{t-1} + (1 - β1) g_t
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)  # v_t = β2 v_{t-1} + (1 - β2) g_t²
    bias_correction1 = 1.0 - beta1**step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**step)
    param_f32.mul_(1.0 - lr * weight_decay)  # θ ← (1 - γλ) θ, decoupled decay, before the step
    if eps_hat:
        denom = exp_avg_sq.sqrt() + eps * bias_correction2_sqrt  # √v_t + ε̂
        param_f32.add_(exp_avg / denom, alpha=-lr * bias_correction2_sqrt / bias_correction1)
    else:
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)  # √v̂_t + ε
        param_f32.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)  # θ_t = θ - γ m̂_t / (√v̂_t + ε)
    param.copy_(param_f32)


class AdamW8bit(Optimizer):
    r"""Implements AdamW with 8-bit block-wise quantized moments (Dettmers, Lewis, Shleifer and
    Zettlemoyer, 2022, "8-bit Optimizers via Block-wise Quantization").

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \gamma \text{ (lr)}, \: \beta_1, \beta_2 \text{ (betas)},
                \: \epsilon, \: \lambda \text{ (weight decay)}, \: \theta_0 \text{ (params)},
                \: B \text{ (block size)}, \: Q^{\pm}, Q^{+} \text{ (signed, unsigned maps)}   \\
            &\textbf{initialize} : \text{codes of } m_0, v_0 \leftarrow \text{those of } 0,
                \: \text{absmax } a^m_0, a^v_0 \leftarrow 0 \text{ per block}                   \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}g_t \leftarrow \nabla_{\theta} f_t (\theta_{t-1})                       \\
            &\hspace{5mm}m_{t-1} \leftarrow Q^{\pm}[\text{codes}] \cdot a^m, \quad
                v_{t-1} \leftarrow Q^{+}[\text{codes}] \cdot a^v
                \quad \text{(dequantize, per block)}                                             \\
            &\hspace{5mm}m_t \leftarrow \beta_1 m_{t-1} + (1 - \beta_1) g_t                      \\
            &\hspace{5mm}v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2                    \\
            &\hspace{5mm}\hat m_t \leftarrow m_t / (1 - \beta_1^t), \quad
                \hat v_t \leftarrow v_t / (1 - \beta_2^t)                                        \\
            &\hspace{5mm}\theta_t \leftarrow (1 - \gamma\lambda)\theta_{t-1}
                - \gamma \hat m_t / (\sqrt{\hat v_t} + \epsilon)                                 \\
            &\hspace{5mm}\textbf{for each block } b \text{ of } B \text{ numbers:} \:
                a^m_b \leftarrow \max_{i \in b} |m_{t,i}|, \:
                \text{code}_i \leftarrow \operatorname{argmin}_k |Q^{\pm}_k - m_{t,i} / a^m_b|
                \text{ (and so for } v_t, Q^{+})                                                 \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \:  \theta_t                                                     \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    The arithmetic is AdamW's, in float32; only the storage between steps changes. m and v are
    kept as one byte per number, an index into a map of 256 values (`dynamic_map`), plus one
    float32 scale per block of B numbers: 2 bytes per parameter and 8 per block, against
    AdamW's 8 bytes per parameter. The map is dense near 0 and spans seven decades, since a
    moment's numbers differ by orders of magnitude; normalizing each block by its own absmax
    keeps an outlier from flattening the rest of the tensor to 0.

    Args:
        params (iterable): parameters or dicts defining parameter groups.
        lr (float, optional): learning rate :math:`\gamma` (default: 1e-3)
        betas (tuple[float, float], optional): :math:`(\beta_1, \beta_2)` (default: (0.9, 0.999))
        eps (float, optional): :math:`\epsilon` (default: 1e-8)
        weight_decay (float, optional): decoupled weight decay :math:`\lambda` (default: 1e-2)
        amsgrad (bool, optional): must be ``False``, as in the reference (default: False)
        optim_bits (int, optional): must be 32, as in the reference, whose states are 8-bit
            whatever it says (default: 32)
        args (optional): the reference's configuration object; not supported (default: None)
        min_8bit_size (int, optional): tensors with fewer numbers keep 32-bit moments
            (default: 4096)
        is_paged (bool, optional): the reference pages large CUDA states to the CPU; the
            numbers do not change, and optlib keeps ordinary tensors (default: False)

    .. note::
        This class follows bitsandbytes 0.50.2 on the CPU, the paper's authors' package. Where it
        differs from the paper: blocks of :math:`B = 256` numbers, not 2048; tensors with fewer
        than ``min_8bit_size`` numbers keep 32-bit moments (``state1``, ``state2``, float32) and
        take the step in Kingma and Ba's form (`adamw8bit_update`); the CPU kernel rounds through
        a table of 65536 points (`rounding_table`), not to the exact nearest entry, so entries of
        the map below about 3e-5 × absmax are never used and a zero moment is stored as
        2.1e-5 × absmax (m) or 1.6e-5 × absmax (v); there is no stochastic rounding and no
        "stable embedding" layer. Its CUDA kernel (not run here) rounds by a search of the map,
        takes the step in the :math:`\hat\epsilon` form and decays the weights after the step,
        not before; optlib follows the CPU kernels on every device.
        The state is the reference's: ``step`` (an int), ``state1``/``state2`` (uint8 codes of
        m and v), ``qmap1``/``qmap2`` (the signed and unsigned maps), ``absmax1``/``absmax2``;
        the groups keep the reference's AdEMAMix settings (``alpha``, ``t_alpha``, ``t_beta3``),
        unused here, so that checkpoints move between the two. Differences from the reference:
        ``p.grad`` is never made contiguous in place; per-parameter overrides through its
        ``GlobalOptimManager`` are not read; float64 parameters are stepped in float32 by both.
    """

    # The state holds maps and one scale per block, not one number per element of the parameter.
    elementwise = False
    # Blocks of 256 numbers over the whole tensor: under FSDP2 one rank updates each (optlib.sharded).
    whole_tensors = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        optim_bits: int = 32,
        args=None,
        min_8bit_size: int = 4096,
        is_paged: bool = False,
    ) -> None:
        if amsgrad:
            raise ValueError("AdamW8bit does not support amsgrad=True")  # the reference's text
        if optim_bits != 32:
            raise ValueError("AdamW8bit only supports optim_bits=32 (default value for compatibility)")
        if args is not None:
            raise NotImplementedError("optlib.AdamW8bit does not read the reference's args object")
        check_non_negative(lr=lr, eps=eps)
        check_betas(betas)
        check_non_negative(weight_decay=weight_decay)
        # Kept on the optimizer, not in the groups, as the reference keeps them.
        self.min_8bit_size = min_8bit_size
        self.is_paged = is_paged
        # One signed map for m and one unsigned map for v, shared by all tensors of the optimizer,
        # and their rounding tables, built once (a checkpoint's maps are the same numbers: both
        # packages always build these two).
        self.qmaps = {"dynamic": dynamic_map(signed=True), "udynamic": dynamic_map(signed=False)}
        self.tables = {name: rounding_table(qmap) for name, qmap in self.qmaps.items()}
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha=0.0, t_alpha=None, t_beta3=None)
        super().__init__(params, defaults)

    def _init_state(self, param, group):
        if param.numel() < self.min_8bit_size:  # a small tensor: 32-bit moments
            return dict(
                step=0,
                state1=torch.zeros_like(param, dtype=torch.float32),
                state2=torch.zeros_like(param, dtype=torch.float32),
            )
        blocks = -(-param.numel() // BLOCK_SIZE)
        for name in self.qmaps:
            self.qmaps[name] = self.qmaps[name].to(param.device)
            self.tables[name] = self.tables[name].to(param.device)
        return dict(
            step=0,
            state1=torch.zeros_like(param, dtype=torch.uint8),
            qmap1=self.qmaps["dynamic"],
            state2=torch.zeros_like(param, dtype=torch.uint8),
            qmap2=self.qmaps["udynamic"],
            absmax1=torch.zeros(blocks, dtype=torch.float32, device=param.device),
            absmax2=torch.zeros(blocks, dtype=torch.float32, device=param.device),
        )

    def _settings(self, group):
        return super()._settings(group) | dict(tables=self.tables)

    @staticmethod
    def _update(param, grad, state, group):
        beta1, beta2 = group["betas"][:2]
        settings = dict(
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            step=group["step"],
        )
        if state["state1"].dtype != torch.uint8:
            adamw8bit_update(param, grad, state["state1"], state["state2"], eps_hat=True, **settings)
            return
        # Dequantize, step in float32, quantize again.
        exp_avg = dequantize_blockwise(state["state1"], state["absmax1"], state["qmap1"])
        exp_avg_sq = dequantize_blockwise(state["state2"], state["absmax2"], state["qmap2"])
        adamw8bit_update(param, grad, exp_avg, exp_avg_sq, eps_hat=False, **settings)
        for moment, number, name in ((exp_avg, "1", "dynamic"), (exp_avg_sq, "2", "udynamic")):
            indices, absmax = quantize_blockwise(moment, state["qmap" + number], table=group["tables"][name])
            state["state" + number].copy_(indices)
            state["absmax" + number].copy_(absmax)

    def state_dict(self):
        """torch's state_dict, with each parameter's quantized state nested under one key, as
        the reference writes it."""
        state_dict = super().state_dict()
        for index, param_state in state_dict["state"].items():
            quant = {k: v for k, v in param_state.items() if k in QUANT_KEYS}
            if quant:
                rest = {k: v for k, v in param_state.items() if k not in QUANT_KEYS}
                state_dict["state"][index] = rest | {_WRAPPER_KEY: quant}
        return state_dict

    def load_state_dict(self, state_dict) -> None:
        """Loads a state_dict of either package. The quantized state keeps its own dtypes (torch
        would cast every float tensor of the state to the parameter's dtype)."""
        state_dict = copy.deepcopy(state_dict)
        for param_state in state_dict["state"].values():
            param_state.update(param_state.pop(_WRAPPER_KEY, {}))
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for index, param in zip(saved_ids, params):
            for key, value in state_dict["state"].get(index, {}).items():
                if key in QUANT_KEYS:
                    self.state[param][key] = value.to(param.device)
