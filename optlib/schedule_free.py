r"""Schedule-Free SGD and AdamW: no learning-rate schedule, an average of the iterates instead;
drop-ins for ``schedulefree.SGDScheduleFree`` and ``schedulefree.AdamWScheduleFree`` (the
schedulefree package of Defazio et al.).

Three sequences share one method. ``z`` takes the base optimizer's steps at a constant rate; ``x``
is a running average of the ``z``'s, the weights the model is evaluated at; the gradient is taken
at ``y``, an interpolation between the two. Only ``z`` and ``y`` are stored: during training the
parameter holds ``y`` and ``x`` follows from the other two, so the method costs one tensor per
parameter more than its base optimizer. ``eval()`` moves the parameters to ``x`` and ``train()``
back to ``y``.
"""

import torch
from torch import Tensor

from optlib.optimizer import Optimizer, check_non_negative, refuse_zero_redundancy

__all__ = [
    "AdamWScheduleFree",
    "SGDScheduleFree",
    "adamw_schedule_free_update",
    "averaging_weight",
    "sgd_schedule_free_update",
]


def averaging_weight(group: dict) -> dict:
    """The settings of one step of a group, and the group's running sums advanced by that step.

    Returns the step's learning rate ``lr`` (the constant rate after a linear warm-up) and
    ``ckp1``, the weight c_{t+1} of the newest z in the average x. The weight of step t is
    t^r γ_max^p, where γ_max is the largest rate so far: with the defaults (r = 0, p = 2) and no
    warm-up every step weighs the same, c_{t+1} = 1/t, and x_{t+1} is the plain mean of
    z_2, ..., z_{t+1} (the first step, with c = 1, replaces the start); during warm-up the small
    early rates weigh less. Updates ``k``, ``lr_max``, ``weight_sum`` and
    ``scheduled_lr`` in ``group``, as the reference keeps them there.
    """
    k = group["k"]
    warmup = (k + 1) / group["warmup_steps"] if k < group["warmup_steps"] else 1.0
    lr = float(group["lr"]) * warmup  # a tensor lr by its value
    group["scheduled_lr"] = lr  # for logging, as in the reference
    lr_max = group["lr_max"] = max(lr, group["lr_max"])
    weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
    weight_sum = group["weight_sum"] = group["weight_sum"] + weight
    group["k"] = k + 1
    return dict(lr=lr, ckp1=weight / weight_sum if weight_sum != 0 else 0.0, t=k + 1)


def sgd_schedule_free_update(
    y: Tensor, grad: Tensor, z: Tensor, *, lr: float, ckp1: float, momentum: float, weight_decay: float
) -> None:
    """One Schedule-Free SGD step for one tensor: ``y`` (the parameter) and ``z`` in place,
    ``x`` implicitly. ``grad`` is never modified."""
    g = grad.add(y, alpha=weight_decay) if weight_decay != 0 else grad  # ∇f(y_t) + λ y_t
    # With x_t = (y_t - (1 - β) z_t) / β, the three lines
    #   z_{t+1} = z_t - γ g,   x_{t+1} = (1 - c) x_t + c z_{t+1},   y_{t+1} = β x_{t+1} + (1 - β) z_{t+1}
    # come to these two updates of y, and x is never stored:
    y.lerp_(z, ckp1)  # y ← (1 - c) y + c z
    y.add_(g, alpha=lr * (momentum * (1 - ckp1) - 1))  # y ← y - γ (1 - β (1 - c)) g
    z.sub_(g, alpha=lr)  # z_{t+1} = z_t - γ g


def adamw_schedule_free_update(
    y: Tensor,
    grad: Tensor,
    z: Tensor,
    exp_avg_sq: Tensor,
    *,
    lr: float,
    ckp1: float,
    t: int,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One Schedule-Free AdamW step for one tensor: the SGD form on Adam's normalized gradient,
    with the weight decay taken at y after the normalization. ``grad`` is never modified."""
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v_t
    denom = exp_avg_sq.div(1 - beta2**t).sqrt_().add_(eps)  # sqrt(v̂_t) + ε
    g = grad.div(denom)  # Adam's step direction, without m: the average x is the momentum
    if weight_decay != 0:
        g.add_(y, alpha=weight_decay)  # + λ y_t, decoupled from the normalization
    y.lerp_(z, ckp1)
    y.add_(g, alpha=lr * (beta1 * (1 - ckp1) - 1))
    z.sub_(g, alpha=lr)


class _ScheduleFree(Optimizer):
    """What Schedule-Free SGD and AdamW share: the modes, the averaging weights and the error
    for a step outside train mode. ``interpolation`` names the group's β."""

    interpolation: str

    @torch.no_grad()
    def eval(self):
        """Parameters to x, the average, for evaluation and for checkpoints."""
        for group in self.param_groups:
            if group["train_mode"]:
                beta = self._beta(group)
                for param in group["params"]:
                    if "z" in self.state[param]:  # x = (y - (1 - β) z) / β
                        param.lerp_(self.state[param]["z"].to(param.device), 1 - 1 / beta)
                group["train_mode"] = False

    @torch.no_grad()
    def train(self):
        """Parameters to y, where the gradients are taken, before training steps."""
        for group in self.param_groups:
            if not group["train_mode"]:
                beta = self._beta(group)
                for param in group["params"]:
                    if "z" in self.state[param]:  # y = β x + (1 - β) z
                        param.lerp_(self.state[param]["z"].to(param.device), 1 - beta)
                group["train_mode"] = True

    def _beta(self, group):
        beta = group[self.interpolation]
        return beta[0] if isinstance(beta, tuple) else beta

    def step(self, closure=None):
        if not self.param_groups[0]["train_mode"]:
            # the reference's type and message
            raise Exception(
                "Optimizer was not in train mode when step is called. Please insert .train() "
                "and .eval() calls on the optimizer. See documentation for details."
            )
        return super().step(closure)

    def _settings(self, group):
        # once per group and step, as the reference: the group's own sums advance here
        return super()._settings(group) | averaging_weight(group)


# Why ZeroRedundancyOptimizer cannot run Schedule-Free: a rank's optimizer holds its share of the
# parameters, so its train() and eval() would move only that share between y and x (and ZeRO copies
# its own param_groups, train_mode included, over the rank's optimizer's at every step).
_EVERY_PARAMETER = "every parameter in train() and eval(), which move them between x and y"


def _defaults(arguments: dict) -> dict:
    """The reference's group keys: the arguments and the running sums of `averaging_weight`."""
    defaults = {k: v for k, v in arguments.items() if k not in ("self", "params", "__class__")}
    return defaults | dict(k=0, train_mode=False, weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0)


class SGDScheduleFree(_ScheduleFree):
    r"""Implements Schedule-Free SGD (Defazio et al., 2024, "The Road Less Scheduled").

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \gamma \text{ (lr)}, \: \beta \text{ (momentum)},
                \: \lambda \text{ (weight decay)}, \: T_w \text{ (warmup steps)},
                \: r, \: p \text{ (weight\_lr\_power)}, \: x_1 = z_1 \text{ (params)}           \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do}                         \\
            &\hspace{5mm}y_t \leftarrow (1 - \beta) z_t + \beta x_t                              \\
            &\hspace{5mm}g_t \leftarrow \nabla f_t(y_t) + \lambda y_t                            \\
            &\hspace{5mm}\gamma_t \leftarrow \gamma \min(1, t / T_w)                             \\
            &\hspace{5mm}z_{t+1} \leftarrow z_t - \gamma_t g_t                                   \\
            &\hspace{5mm}c_{t+1} \leftarrow \frac{t^r \max_{i \le t} \gamma_i^p}
                {\sum_{j=1}^{t} j^r \max_{i \le j} \gamma_i^p}                                  \\
            &\hspace{5mm}x_{t+1} \leftarrow (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}                  \\
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \: x_{t+1} \text{ (after } \texttt{eval()} \text{)}              \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    As :math:`\beta \to 0`, :math:`y \to z`: SGD evaluated at the average of its iterates
    (Polyak averaging); at :math:`\beta = 1`, :math:`y = x`: primal averaging. Between the two
    it behaves like momentum, with no schedule to choose and no length of the run to know in
    advance. Both ends are excluded: the parameter stores :math:`y`, and ``eval()`` recovers
    :math:`x = (y - (1 - \beta) z) / \beta`.

    State, under the reference's keys: ``z``; the parameter itself holds :math:`y_t` in train
    mode and :math:`x_t` in eval mode. The group keeps ``k`` (steps taken), ``train_mode``,
    ``weight_sum``, ``lr_max`` and ``scheduled_lr``.

    Call ``optimizer.train()`` before training steps and ``optimizer.eval()`` before evaluating
    or saving a checkpoint; ``step`` in eval mode raises ``Exception``, as the reference does.

    Args:
        params (iterable): parameters or dicts defining parameter groups.
        lr (float, optional): learning rate :math:`\gamma` (default: 1.0)
        momentum (float, optional): interpolation :math:`\beta`, in (0, 1) (default: 0.9)
        weight_decay (float, optional): :math:`\lambda`, added to the gradient at :math:`y`
            (default: 0)
        warmup_steps (int, optional): steps of linear warm-up :math:`T_w` (default: 0)
        r (float, optional): polynomial weighting of the average (default: 0)
        weight_lr_power (float, optional): :math:`p`, how much the rate weighs in the average
            (default: 2)
        foreach (bool, optional): ``True`` (the reference's default) runs the same update
            compiled, on many tensors at once (`optlib.fast`); ``False`` the readable loop.

    .. note::
        The reference adds the weight decay into ``p.grad`` in place; optlib leaves the gradient
        as it is and computes the same numbers. A tensor ``lr`` is used by its value.
    """

    interpolation = "momentum"
    per_step_settings = ("ckp1",)

    def __init__(
        self,
        params,
        lr: float | Tensor = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2,
        foreach: bool | None = hasattr(torch, "_foreach_mul_"),
    ) -> None:
        check_non_negative(lr=lr, weight_decay=weight_decay)
        if momentum <= 0 or momentum >= 1:
            raise ValueError(f"Momentum must be between 0 and 1 exclusive: {momentum}")
        refuse_zero_redundancy("SGDScheduleFree", _EVERY_PARAMETER)
        super().__init__(params, _defaults(locals()))

    def _init_state(self, param, group):
        return dict(z=param.detach().clone(memory_format=torch.preserve_format))

    @staticmethod
    def _update(param, grad, state, group):
        sgd_schedule_free_update(
            param,
            grad,
            state["z"],
            lr=group["lr"],
            ckp1=group["ckp1"],
            momentum=group["momentum"],
            weight_decay=group["weight_decay"],
        )


class AdamWScheduleFree(_ScheduleFree):
    r"""Implements Schedule-Free AdamW (Defazio et al., 2024, "The Road Less Scheduled").

    Schedule-Free SGD (see `SGDScheduleFree`) with Adam's normalized gradient in place of the
    gradient, and :math:`\beta_1` as the interpolation:

    .. math::
       \begin{aligned}
            &\hspace{5mm}y_t \leftarrow (1 - \beta_1) z_t + \beta_1 x_t                          \\
            &\hspace{5mm}g_t \leftarrow \nabla f_t(y_t)                                          \\
            &\hspace{5mm}v_t \leftarrow \beta_2 v_{t-1} + (1 - \beta_2) g_t^2                    \\
            &\hspace{5mm}\gamma_t \leftarrow \gamma \min(1, t / T_w)                             \\
            &\hspace{5mm}z_{t+1} \leftarrow z_t - \gamma_t \Big( \frac{g_t}
                {\sqrt{v_t / (1 - \beta_2^t)} + \epsilon} + \lambda y_t \Big)                    \\
            &\hspace{5mm}x_{t+1} \leftarrow (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}
                \quad (c_{t+1} \text{ as in } \texttt{SGDScheduleFree})
       \end{aligned}

    There is no first moment :math:`m`: the average :math:`x` and the interpolation do its work.
    State, under the reference's keys: ``z`` and ``exp_avg_sq`` (:math:`v`), as much as Adam's.

    Args:
        params (iterable): parameters or dicts defining parameter groups.
        lr (float, optional): learning rate :math:`\gamma` (default: 0.0025)
        betas (tuple[float, float], optional): :math:`(\beta_1, \beta_2)` (default: (0.9, 0.999))
        eps (float, optional): :math:`\epsilon` (default: 1e-8)
        weight_decay (float, optional): :math:`\lambda`, decoupled, taken at :math:`y` (default: 0)
        warmup_steps, r, weight_lr_power, foreach: as in `SGDScheduleFree`.

    .. note::
        Where the reference differs from the paper: the paper (Algorithm 1) scales the rate,
        :math:`\gamma_t = \gamma \sqrt{1 - \beta_2^t} \min(1, t/T_w)`, so that the bias correction
        also enters the averaging weights; ``AdamWScheduleFree`` divides :math:`v_t` by
        :math:`1 - \beta_2^t` as Adam does and weights by the uncorrected rate (the package
        keeps the paper's form as ``AdamWScheduleFreePaper``). The reference's docstring calls
        ``weight_decay`` an L2 penalty, but it is added after the normalization, AdamW's
        decoupled decay. It checks no argument; optlib raises torch's ``ValueError`` for a
        negative ``lr``, ``eps`` or ``weight_decay``, a :math:`\beta_2` outside [0, 1) and a
        :math:`\beta_1` outside (0, 1) (at 0 the reference's ``eval()`` divides by zero), and, like
        ``SGDScheduleFree``, leaves ``p.grad`` as it is (the reference normalizes it in place).
    """

    interpolation = "betas"
    per_step_settings = ("ckp1", "t")

    def __init__(
        self,
        params,
        lr: float | Tensor = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        foreach: bool | None = hasattr(torch, "_foreach_mul_"),
    ) -> None:
        check_non_negative(lr=lr, eps=eps, weight_decay=weight_decay)
        # β1 = 0 would make y = z and lose x, which eval() recovers as (y - (1 - β1) z) / β1
        if not 0.0 < betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]} (must be in (0, 1))")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        refuse_zero_redundancy("AdamWScheduleFree", _EVERY_PARAMETER)
        super().__init__(params, _defaults(locals()))

    def _init_state(self, param, group):
        return dict(
            z=param.detach().clone(memory_format=torch.preserve_format),
            exp_avg_sq=torch.zeros_like(param, memory_format=torch.preserve_format),
        )

    @staticmethod
    def _update(param, grad, state, group):
        beta1, beta2 = group["betas"]
        adamw_schedule_free_update(
            param,
            grad,
            state["z"],
            state["exp_avg_sq"],
            lr=group["lr"],
            ckp1=group["ckp1"],
            t=group["t"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )
