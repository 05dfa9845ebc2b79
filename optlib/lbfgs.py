r"""L-BFGS: a quasi-Newton method that builds its curvature from the last few gradient
differences, with an optional strong Wolfe line search; a drop-in for torch.optim.LBFGS.

Unlike the other optimizers of optlib, L-BFGS works on the whole problem at once: it treats all
parameters as one flat vector, evaluates the objective itself (through the closure) as often as
its line search needs, and does up to ``max_iter`` iterations per call of ``step``. Its pieces,
each a function of this module, follow Nocedal & Wright, *Numerical Optimization* (2nd ed., 2006):

- `two_loop_recursion`: the search direction :math:`p_k = -H_k g_k` from the stored pairs
  (Algorithm 7.4);
- `strong_wolfe`: a step length that satisfies the strong Wolfe conditions, by bracketing
  (Algorithm 3.5) and zooming (Algorithm 3.6), with `cubic_minimizer` (equation 3.59) to choose
  the trial steps;
- `LBFGS.step`: the outer iteration (Algorithm 7.5), with PyTorch's stopping tests.
"""

from typing import NamedTuple

import torch
from torch import Tensor

from optlib.optimizer import Optimizer, check_non_negative, check_tensor_lr, hyperparameters
from optlib.optimizer import any_sharded, real, refuse_zero_redundancy

__all__ = ["LBFGS", "cubic_minimizer", "strong_wolfe", "two_loop_recursion"]


def two_loop_recursion(
    grad: Tensor, s: list[Tensor], y: list[Tensor], rho: list[Tensor], scale
) -> tuple[Tensor, list[Tensor]]:
    """The L-BFGS direction p = -H g, by the two-loop recursion (Nocedal &
    Wright, Algorithm 7.4).

    H is the BFGS inverse-Hessian approximation built from the pairs
    (s_i, y_i), oldest first, starting from H^0 = scale * I; rho_i is
    1 / (y_iᵀ s_i). H is never formed: two passes over the pairs cost
    about 4 m d multiplications for m pairs of d numbers. Returns p and the
    coefficients α_i of the first loop (PyTorch keeps them in its state,
    as ``al``). ``grad`` is not modified.
    """
    q = grad.neg()  # q ← -g: the sign is folded in, so the result is -H g
    alpha = [None] * len(s)
    for i in reversed(range(len(s))):  # newest pair first
        alpha[i] = s[i].dot(q) * rho[i]  # α_i = ρ_i s_iᵀ q
        q.add_(y[i], alpha=-alpha[i])  # q ← q - α_i y_i
    r = torch.mul(q, scale)  # r ← H^0 q = ω q
    for i in range(len(s)):  # oldest pair first
        beta = y[i].dot(r) * rho[i]  # β_i = ρ_i y_iᵀ r
        r.add_(s[i], alpha=alpha[i] - beta)  # r ← r + (α_i - β_i) s_i
    return r, alpha


def cubic_minimizer(x1, f1, g1, x2, f2, g2, bounds=None):
    """The minimizer of the cubic through two points of a line search, where
    the function values are f1, f2 and the slopes g1, g2, clipped to
    ``bounds`` (default: between x1 and x2): Nocedal & Wright, eq. (3.59).

    If that cubic has no minimizer, the middle of the bounds.
    """
    if bounds is not None:
        low, high = bounds
    else:
        low, high = (x1, x2) if x1 <= x2 else (x2, x1)
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1**2 - g1 * g2
    if d2_square >= 0:  # (written so that a NaN, too, gives the middle)
        d2 = d2_square.sqrt()
        if x1 <= x2:  # (3.59) with x2 the newer, farther point
            minimum = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            minimum = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(minimum, low), high)
    return (low + high) / 2.0  # the cubic has no local minimum


class Trial(NamedTuple):
    """One evaluation of the line function φ(γ) = f(θ + γ p): the step length
    γ, φ(γ), the gradient ∇f(θ + γ p), and the slope φ'(γ) = ∇f(θ + γ p)ᵀ p."""

    step: float | Tensor
    phi: float
    grad: Tensor
    slope: Tensor


def strong_wolfe(
    evaluate,
    step,
    direction: Tensor,
    loss: float,
    grad: Tensor,
    slope: Tensor,
    c1: float = 1e-4,
    c2: float = 0.9,
    tolerance_change: float = 1e-9,
    max_ls: int = 25,
):
    """A step length γ along ``direction`` p that satisfies the strong Wolfe
    conditions (Nocedal & Wright, eq. 3.7), from the first trial ``step``:

        sufficient decrease:  φ(γ) ≤ φ(0) + c1 γ φ'(0)
        curvature:            |φ'(γ)| ≤ c2 |φ'(0)|

    ``evaluate(γ)`` returns (f, ∇f) at θ + γ p; ``loss``, ``grad`` and
    ``slope`` are f, ∇f and φ'(0) = ∇fᵀ p at θ. At most ``max_ls`` trials
    after the first. Returns (φ(γ), ∇f(θ + γ p), γ, number of evaluations).

    Phase 1 (Algorithm 3.5) moves forward until an interval is known to
    contain acceptable steps; phase 2 (Algorithm 3.6, "zoom") shrinks that
    interval by cubic interpolation. PyTorch's code (a port of Torch7's
    lswolfe.lua) is followed operation by operation, so that the results
    agree bit for bit; its departures from the book are marked "PyTorch:".
    """
    size = direction.abs().max()  # ‖p‖_∞, to measure intervals in θ

    def trial(step) -> Trial:
        f_new, g_new = evaluate(step)
        return Trial(step, f_new, g_new, g_new.dot(direction))

    def too_high(t: Trial) -> bool:  # sufficient decrease fails
        return t.phi > loss + c1 * t.step * slope

    def flat_enough(t: Trial) -> bool:  # the strong curvature condition holds
        return abs(t.slope) <= -c2 * slope

    # Phase 1, bracketing (Algorithm 3.5): the interval (previous, new).
    previous, new = Trial(0, loss, grad, slope), trial(step)
    evaluations, done, bracket = 1, False, None
    while evaluations - 1 < max_ls:
        # PyTorch: the second test from the third trial on (the book: second)
        if too_high(new) or (evaluations > 2 and new.phi >= previous.phi):
            bracket = [previous, new]  # passed a minimum of φ: zoom in
            break
        if flat_enough(new):
            bracket, done = [new], True  # strong Wolfe holds: accept
            break
        if new.slope >= 0:
            bracket = [previous, new]  # φ turns upward: a minimum in between
            break
        # Still going down steeply: extrapolate, 1.01 to 10 times as far.
        low, high = new.step + 0.01 * (new.step - previous.step), new.step * 10
        next_step = cubic_minimizer(
            previous.step, previous.phi, previous.slope,
            new.step, new.phi, new.slope, bounds=(low, high),
        )
        previous, new = new, trial(next_step)
        evaluations += 1
    if bracket is None:  # out of evaluations: the start and the last trial
        bracket = [Trial(0, loss, grad, slope), new]

    # Phase 2, zoom (Algorithm 3.6): shrink [lo, hi]; φ(lo) is lowest so far.
    low_position = 0 if bracket[0].phi <= bracket[-1].phi else 1
    insufficient_progress = False
    while not done and evaluations - 1 < max_ls:
        lo, hi = bracket[low_position], bracket[1 - low_position]
        a, b = bracket
        # PyTorch: stop when the interval is tiny in θ (1e-9 by default).
        if abs(b.step - a.step) * size < tolerance_change:
            break
        next_step = cubic_minimizer(
            a.step, a.phi, a.slope, b.step, b.phi, b.slope
        )
        # Safeguard (PyTorch, from lswolfe.lua): a trial within 10% of an
        # end moves to 10% inside if it is on or beyond the end, or if the
        # previous trial was near an end too; so the interval keeps shrinking.
        left, right = min(a.step, b.step), max(a.step, b.step)
        margin = 0.1 * (right - left)
        if min(right - next_step, next_step - left) < margin:
            at_an_end = next_step >= right or next_step <= left
            if insufficient_progress or at_an_end:
                if abs(next_step - right) < abs(next_step - left):
                    next_step = right - margin
                else:
                    next_step = left + margin
                insufficient_progress = False
            else:
                insufficient_progress = True
        else:
            insufficient_progress = False
        new = trial(next_step)
        evaluations += 1
        if too_high(new) or new.phi >= lo.phi:
            bracket[1 - low_position] = new  # hi ← γ_j
            low_position = 0 if bracket[0].phi <= bracket[1].phi else 1
        else:
            if flat_enough(new):
                done = True  # the strong Wolfe conditions hold: accept γ_j
            elif new.slope * (hi.step - lo.step) >= 0:
                bracket[1 - low_position] = lo  # hi ← lo
            bracket[low_position] = new  # lo ← γ_j
    best = bracket[low_position]  # the lowest point found, accepted or not
    return best.phi, best.grad, best.step, evaluations


def _flat_grad(params: list[Tensor], maximize: bool) -> Tensor:
    """All gradients as one vector (complex numbers as two reals; a missing gradient as 0),
    negated when maximizing."""
    views = []
    for p in params:
        if p.grad is None:
            grad = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
        elif p.grad.is_sparse:  # L-BFGS is dense: a sparse gradient is made dense
            grad = p.grad.to_dense()
        else:
            grad = p.grad
        views.append(real(grad).reshape(-1))
    flat = torch.cat(views)
    return flat.neg_() if maximize else flat


def _add_to_params(params: list[Tensor], step, direction: Tensor) -> None:
    """θ ← θ + step · direction, with the flat ``direction`` cut into the parameters' shapes."""
    offset = 0
    for p in params:
        p = real(p)
        p.add_(direction[offset : offset + p.numel()].view_as(p), alpha=step)
        offset += p.numel()


class LBFGS(Optimizer):
    r"""Implements L-BFGS (Liu and Nocedal, 1989), as PyTorch does.

    .. math::
       \begin{aligned}
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{input}      : \gamma \text{ (lr)}, \: \theta_0 \text{ (params)}, \:
                f(\theta) \text{ (closure)}, \: m \text{ (history size)},
                \: K \text{ (max\_iter)}, \: E \text{ (max\_eval)},                              \\
            &\hspace{13mm} \epsilon_g \text{ (tolerance\_grad)}, \:
                \epsilon_c \text{ (tolerance\_change)}, \: \textit{line\_search\_fn}            \\
            &\textbf{initialize} : g_1 \leftarrow \nabla f(\theta_0); \:
                \textbf{if} \: \lVert g_1 \rVert_\infty \le \epsilon_g \:
                \textbf{return}                                                          \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                                 \\
            &\textbf{for} \: k=1 \: \textbf{to} \: K \: \textbf{do}                              \\
            &\hspace{5mm}\textbf{if} \: k = 1: \: p_1 \leftarrow -g_1                            \\
            &\hspace{5mm}\textbf{else}                                                           \\
            &\hspace{10mm} s_{k-1} \leftarrow \theta_{k-1} - \theta_{k-2}
                = \gamma_{k-1} p_{k-1}, \: y_{k-1} \leftarrow g_k - g_{k-1}                      \\
            &\hspace{10mm}\textbf{if} \: y_{k-1}^\top s_{k-1} > 10^{-10}: \:
                \text{keep the pair and } \rho_{k-1} = 1 / y_{k-1}^\top s_{k-1}
                \text{ (the last } m \text{)}, \:
                \omega \leftarrow \frac{y_{k-1}^\top s_{k-1}}{y_{k-1}^\top y_{k-1}}              \\
            &\hspace{10mm} p_k \leftarrow -H_k g_k
                \text{ (two-loop recursion, from } H_k^0 = \omega I)                            \\
            &\hspace{5mm}\gamma_k \leftarrow \min(1, 1 / \lVert g_1 \rVert_1) \, \gamma
                \:\textbf{ if } k = 1 \textbf{ else } \gamma                                     \\
            &\hspace{5mm}\textbf{if} \: g_k^\top p_k > -\epsilon_c: \: \textbf{stop}            \\
            &\hspace{5mm}\textbf{if} \: \textit{line\_search\_fn}: \: \gamma_k \leftarrow
                \text{strong Wolfe line search along } p_k \text{ from } \gamma_k               \\
            &\hspace{5mm}\theta_k \leftarrow \theta_{k-1} + \gamma_k p_k, \:
                g_{k+1} \leftarrow \nabla f(\theta_k)                                            \\
            &\hspace{5mm}\textbf{stop if} \: \text{evaluations} \ge E, \:
                \lVert g_{k+1} \rVert_\infty \le \epsilon_g, \:
                \lVert \gamma_k p_k \rVert_\infty \le \epsilon_c \:
                \textbf{or} \: \lvert f(\theta_k) - f(\theta_{k-1}) \rvert < \epsilon_c   \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
            &\bf{return} \:  \theta_k                                                     \\[-1.ex]
            &\rule{110mm}{0.4pt}                                                          \\[-1.ex]
       \end{aligned}

    As everywhere in the book, :math:`g_k = \nabla f(\theta_{k-1})` is the gradient that
    iteration :math:`k` works with; here it is the full gradient, computed by the closure.

    One call of ``step(closure)`` runs this whole loop; the pairs, the last direction and
    step and the counters carry over to the next call, which continues where this one stopped
    (:math:`k` counts on across calls).

    State, under PyTorch's keys, all on the first parameter (L-BFGS has one state for all
    parameters; torch keeps it there so that ``load_state_dict`` moves it to the parameters'
    device): the pairs :math:`s_i` are ``old_stps``, :math:`y_i` ``old_dirs`` and
    :math:`\rho_i` ``ro``; :math:`\omega` is ``H_diag``, :math:`p_k` is ``d``, :math:`\gamma_k`
    is ``t``, :math:`g_k` is ``prev_flat_grad``, :math:`f(\theta_{k-1})` is ``prev_loss``,
    the two-loop coefficients :math:`\alpha_i` are ``al``; ``n_iter`` counts iterations and
    ``func_evals`` closure calls, over all calls of ``step``.

    Args:
        params (iterable): parameters to optimize, in one group (no per-group options).
        lr (float, Tensor, optional): :math:`\gamma`, the step length, or the first trial step
            of the line search (default: 1)
        max_iter (int, optional): :math:`K`, iterations per call of ``step`` (default: 20)
        max_eval (int, optional): :math:`E`, closure calls per call of ``step``
            (default: ``max_iter * 5 // 4``)
        tolerance_grad (float, optional): :math:`\epsilon_g`, stop when every entry of the
            gradient is at most this in absolute value (default: 1e-7)
        tolerance_change (float, optional): :math:`\epsilon_c`, stop when the step, the change
            of the loss or the directional derivative is smaller (default: 1e-9)
        history_size (int, optional): :math:`m`, the number of pairs kept (default: 100)
        line_search_fn (str, optional): ``"strong_wolfe"`` or ``None``, a fixed step
            (default: None)
        maximize (bool, optional): maximize f, by minimizing -f: the loss and the gradient
            are negated as the closure returns them (default: False)

    .. note::
        Where PyTorch's L-BFGS (and so this one) differs from the textbook (Nocedal & Wright,
        Algorithms 7.4 and 7.5): the first step is scaled to :math:`\min(1, 1/\lVert g_1
        \rVert_1)\,\gamma` instead of using :math:`H^0 = I`; without a line search every step
        is :math:`\gamma_k = \gamma` (``lr``) times the quasi-Newton direction, with no check
        of decrease; a pair is skipped unless :math:`y^\top s > 10^{-10}` (an absolute
        threshold, not relative to the sizes of :math:`s` and :math:`y`); the stopping tests
        are on the largest entry of the gradient and of the step, and on the change of the
        loss; ``max_eval`` defaults to ``max_iter * 5 // 4``; the line search uses its own
        ``tolerance_change=1e-9``, not the argument, and its second bracketing test starts one
        trial later than Algorithm 3.5's. The strong Wolfe constants are
        :math:`c_1 = 10^{-4}`, :math:`c_2 = 0.9`. An unknown ``line_search_fn`` raises
        PyTorch's RuntimeError at the start of ``step``, before the closure is called;
        PyTorch raises it later in the same call. With the line search and ``max_eval < 1``,
        torch 2.13 fails with an UnboundLocalError; here the line search evaluates its first
        trial only, as it does when ``max_eval`` is used up. ``maximize`` came to
        torch.optim.LBFGS in torch 2.15; optlib has it on every torch.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: str | None = None,
        *,
        maximize: bool = False,
    ) -> None:
        check_tensor_lr(lr)
        check_non_negative(lr=lr)
        if max_eval is None:
            max_eval = max_iter * 5 // 4  # PyTorch's default
        refuse_zero_redundancy("LBFGS", "the whole gradient for its line search")
        super().__init__(params, hyperparameters(locals()))
        if len(self.param_groups) != 1:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")

    def _evaluate_along(self, closure, params, start, step, direction, maximize):
        """φ for the line search: f and the flat ∇f (-f and -∇f when maximizing) at
        ``start`` + step · direction; the parameters are put back to ``start`` afterwards."""
        _add_to_params(params, step, direction)
        loss = float(closure())
        loss = -loss if maximize else loss
        grad = _flat_grad(params, maximize)
        for p, p0 in zip(params, start, strict=True):
            p.copy_(p0)
        return loss, grad

    @torch.no_grad()
    def step(self, closure):
        """Up to ``max_iter`` L-BFGS iterations. ``closure`` clears the
        gradients, computes the loss, calls ``backward`` and returns the
        loss. Returns the loss at the start."""
        if len(self.param_groups) != 1:  # a group added after construction
            count = len(self.param_groups)
            raise AssertionError(
                f"Expected exactly one param_group, but got {count}"
            )
        group = self.param_groups[0]
        params = group["params"]
        if any_sharded(params):
            raise RuntimeError(
                "optlib.LBFGS works on all parameters as one flat vector, which DTensor parameters "
                "(FSDP2's shards) do not give. Run it on whole parameters on every rank (under "
                "DistributedDataParallel), with a closure that returns the loss averaged over the ranks."
            )
        lr = group["lr"]  # a tensor lr stays a tensor (0-dim), as in torch
        if isinstance(lr, Tensor) and lr.dim() != 0:
            lr = lr.squeeze()
        max_iter, max_eval = group["max_iter"], group["max_eval"]
        tolerance_grad = group["tolerance_grad"]
        tolerance_change = group["tolerance_change"]
        history_size = group["history_size"]
        line_search_fn = group["line_search_fn"]
        # -f is minimized; .get: a state dict saved by a torch before 2.15 has no "maximize"
        maximize = group.get("maximize", False)
        if line_search_fn not in (None, "strong_wolfe"):
            raise RuntimeError(
                f"only 'strong_wolfe' is supported, got {line_search_fn!r}"
            )
        closure = torch.enable_grad()(closure)  # step runs under no_grad

        state = self.state[params[0]]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)

        first_loss = closure()
        loss = -float(first_loss) if maximize else float(first_loss)
        evaluations = 1  # closure calls in this call of step
        state["func_evals"] += 1
        grad = _flat_grad(params, maximize)  # g_k = ∇f(θ_{k-1})
        if grad.abs().max() <= tolerance_grad:  # already stationary
            return first_loss

        # What the previous call left (None on the first call).
        d, t = state.get("d"), state.get("t")  # p_{k-1}, γ_{k-1}
        old_stps, old_dirs = state.get("old_stps"), state.get("old_dirs")
        ro, H_diag = state.get("ro"), state.get("H_diag")  # ρ_i, ω
        prev_flat_grad = state.get("prev_flat_grad")  # g_{k-1}
        prev_loss = state.get("prev_loss")

        converged = False
        for n_iter in range(1, max_iter + 1):
            state["n_iter"] += 1  # k

            # The direction p_k = -H_k g_k.
            if state["n_iter"] == 1:  # no pairs yet: steepest descent
                d = grad.neg()
                old_stps, old_dirs, ro, H_diag = [], [], [], 1
            else:
                y = grad.sub(prev_flat_grad)  # y_{k-1} = g_k - g_{k-1}
                s = d.mul(t)  # s_{k-1} = θ_{k-1} - θ_{k-2} = γ_{k-1} p_{k-1}
                ys = y.dot(s)
                if ys > 1e-10:  # only positive curvature: H stays positive
                    if len(old_dirs) == history_size:  # forget the oldest
                        old_stps.pop(0), old_dirs.pop(0), ro.pop(0)
                    old_stps.append(s)
                    old_dirs.append(y)
                    ro.append(1.0 / ys)  # ρ = 1 / yᵀs
                    H_diag = ys / y.dot(y)  # ω = yᵀs / yᵀy (N&W eq. 7.20)
                d, al = two_loop_recursion(grad, old_stps, old_dirs, ro, H_diag)
                state.setdefault("al", [None] * history_size)[: len(al)] = al

            if prev_flat_grad is None:
                prev_flat_grad = grad.clone(memory_format=torch.contiguous_format)
            else:
                prev_flat_grad.copy_(grad)
            prev_loss = loss

            # The first trial step: lr, but at most lr / ‖g‖_1 at k = 1.
            if state["n_iter"] == 1:
                t = min(1.0, 1.0 / grad.abs().sum()) * lr
            else:
                t = lr
            gtd = grad.dot(d)  # φ'(0) = g_kᵀ p_k
            if gtd > -tolerance_change:  # p_k does not go (enough) downhill
                break

            if line_search_fn == "strong_wolfe":
                start = [p.clone(memory_format=torch.contiguous_format)
                         for p in params]

                def evaluate(step):
                    return self._evaluate_along(closure, params, start, step, d, maximize)

                loss, grad, t, used = strong_wolfe(
                    evaluate, t, d, loss, grad, gtd,
                    max_ls=max_eval - evaluations,
                )
                _add_to_params(params, t, d)  # θ_k = θ_{k-1} + γ_k p_k
                converged = grad.abs().max() <= tolerance_grad
            else:
                _add_to_params(params, t, d)  # θ_k = θ_{k-1} + γ p_k
                used = 0
                if n_iter != max_iter:  # else the next call evaluates θ_k
                    loss = float(closure())
                    loss = -loss if maximize else loss
                    grad = _flat_grad(params, maximize)
                    converged = grad.abs().max() <= tolerance_grad
                    used = 1
            evaluations += used
            state["func_evals"] += used

            # PyTorch's stopping tests, in its order.
            if n_iter == max_iter or evaluations >= max_eval or converged:
                break
            if d.mul(t).abs().max() <= tolerance_change:  # a tiny step
                break
            if abs(loss - prev_loss) < tolerance_change:  # f hardly changed
                break

        state.update(
            d=d, t=t, old_dirs=old_dirs, old_stps=old_stps, ro=ro,
            H_diag=H_diag, prev_flat_grad=prev_flat_grad, prev_loss=prev_loss,
        )
        return first_loss
