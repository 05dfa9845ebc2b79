"""optlib.SparseAdam against torch.optim.SparseAdam, float64. SparseAdam steps only on sparse
gradients, so it is not in the generic TWINS tests (they step with dense gradients): this file
holds its three layers. (1) Against torch: embeddings trained side by side over a grid of every
argument, with repeated indices in a batch and rows never touched; sparse gradients of other
layouts; parameter groups. (2) Equivalences: with every row in every batch SparseAdam is Adam
with eps / sqrt(1 - beta2^t); repeated rows are summed; maximize is minimizing -f. (3) Behaviour:
the lazy rule, convergence, checkpoints both ways bit for bit, torch's errors and rules."""

import copy
import inspect
import math

import pytest
import torch
from torch import nn

import optlib
from optim_helpers import TOL, grid, lr_options

VOCABULARY, USED = 40, 30  # rows USED.. of every table are never in a batch
WIDTHS = (3, 2)  # two tables, so that every step updates two tensors


def _sparse(indices, values, shape):
    """A sparse COO tensor, its invariants checked (which also silences torch's warning)."""
    return torch.sparse_coo_tensor(indices, values, shape, check_invariants=True)


def _betas():
    f64 = torch.float64
    tensors = (torch.tensor(0.8, dtype=f64), torch.tensor(0.99, dtype=f64))
    return [(0.9, 0.999), (0.5, 0.9), (0.0, 0.99), tensors]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The tensors here are tiny: threads only add their start-up cost (and, on a busy machine,
    # spinning), most of all in the sparse kernels (coalesce, index_put).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


GRID = grid(lr=lr_options(0.01), betas=_betas(), eps=[1e-8, 1e-3], maximize=[False, True])
TYPICAL = dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6)


def _show(value):
    if torch.is_tensor(value):
        return f"tensor({value.tolist()})" if value.numel() <= 2 else "tensor"
    if isinstance(value, tuple):
        return "(" + ",".join(_show(v) for v in value) + ")"
    if isinstance(value, list):
        return f"list{len(value)}"
    return str(value)


def _label(kwargs):
    if not isinstance(kwargs, dict):
        return str(kwargs)
    return "-".join(f"{k}={_show(v)}" for k, v in kwargs.items())


class Model(nn.Module):
    """Two sparse embedding tables; a batch of rows is fitted to fixed targets, the rows scaled
    by fixed factors of which some are 1e-4, so that their gradients are ~1e-8 and eps matters."""

    def __init__(self, seed=0, dtype=torch.float64):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.tables = nn.ModuleList(
            nn.Embedding(VOCABULARY, width, sparse=True, dtype=dtype) for width in WIDTHS
        )
        with torch.no_grad():
            for table in self.tables:
                table.weight.copy_(torch.randn(table.weight.shape, generator=gen, dtype=dtype))
        self.scale = torch.where(torch.rand(VOCABULARY, generator=gen) < 0.25, 1e-4, 1.0).to(dtype)
        self.targets = [torch.randn(VOCABULARY, w, generator=gen, dtype=dtype) for w in WIDTHS]

    def loss(self, words):
        return sum(
            ((self.scale[words, None] * table(words) - target[words]) ** 2).sum()
            for table, target in zip(self.tables, self.targets)
        )


def batches(steps, seed=1, size=12):
    """Word indices for each step, from rows 0..USED-1 only; with 12 draws from 30 rows most
    batches repeat a row (and the first batch repeats row 3 on purpose)."""
    gen = torch.Generator().manual_seed(seed)
    words = [torch.randint(0, USED, (size,), generator=gen) for _ in range(steps)]
    words[0][:3] = 3
    return words


def train(make, steps=60, model=None, words=None, record=None):
    """Train a Model with the optimizer ``make(params)``; returns (model, optimizer)."""
    model = model or Model()
    opt = make(list(model.parameters()))
    for t, batch in enumerate(words or batches(steps)):
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()
        if record is not None:
            record(t, model, opt)
    return model, opt


def _state_diff(a, b):
    """Largest difference between two optimizers' states (inf if keys or types differ)."""
    worst = 0.0
    for p, q in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]):
        sa, sb = a.state.get(p, {}), b.state.get(q, {})
        if sa.keys() != sb.keys():
            return math.inf
        for key in sa:
            x, y = sa[key], sb[key]
            if type(x) is not type(y):
                return math.inf
            if torch.is_tensor(x):
                if (x.dtype, x.device, x.shape) != (y.dtype, y.device, y.shape):
                    return math.inf
                worst = max(worst, (x - y).abs().max().item())
            else:
                worst = max(worst, abs(x - y))
    return worst


def side_by_side(kwargs, steps=60, **train_kwargs):
    """optlib and torch trained side by side; the largest differences of parameters and state
    over all steps."""
    ours_model, theirs_model = Model(), Model()
    ours = optlib.SparseAdam(list(ours_model.parameters()), **copy.deepcopy(kwargs))
    theirs = torch.optim.SparseAdam(list(theirs_model.parameters()), **copy.deepcopy(kwargs))
    param_diff = state_diff = 0.0
    for batch in batches(steps, **train_kwargs):
        for model, opt in ((ours_model, ours), (theirs_model, theirs)):
            opt.zero_grad()
            model.loss(batch).backward()
            opt.step()
        for p, q in zip(ours_model.parameters(), theirs_model.parameters()):
            param_diff = max(param_diff, (p - q).abs().max().item())
        state_diff = max(state_diff, _state_diff(ours, theirs))
    return param_diff, state_diff, ours_model, ours


# ---------------------------------------------------------------- 1. against torch.optim


@pytest.mark.parametrize("kwargs", GRID, ids=_label)
def test_matches_torch_on_embeddings_over_the_grid(kwargs):
    param_diff, state_diff, model, opt = side_by_side(kwargs)
    assert param_diff < TOL and state_diff < TOL
    assert all(opt.state[p]["step"] == 60 for p in model.parameters())


def test_the_grid_covers_every_argument_and_the_rows_it_should():
    names = set(inspect.signature(torch.optim.SparseAdam).parameters) - {"params"}
    assert names == {k for kwargs in GRID for k in kwargs}
    words = torch.cat(batches(60))
    assert any(b.unique().numel() < b.numel() for b in batches(60))  # repeated indices
    assert words.max() < USED < VOCABULARY  # rows never touched
    assert words.unique().numel() == USED  # every other row is touched at some step


def test_bit_identical_to_torch():
    # optlib computes each number with the same operations, in the same order, as torch's
    # functional sparse_adam: not only ~1e-12, but equal.
    assert side_by_side(dict(TYPICAL, maximize=True))[:2] == (0.0, 0.0)


def _sparse_gradients(shapes, steps, sparse_dims, seed=2):
    """Sparse gradients of given layouts, built directly (not by an embedding): uncoalesced,
    with repeated indices and some ~1e-8 values."""
    gen = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(steps):
        step = []
        for shape, sparse_dim in zip(shapes, sparse_dims):
            nnz = 2 * shape[0]
            index = [torch.randint(0, n, (nnz,), generator=gen) for n in shape[:sparse_dim]]
            index = torch.stack(index)
            values = torch.randn(nnz, *shape[sparse_dim:], generator=gen, dtype=torch.float64)
            tiny = torch.rand(values.shape, generator=gen) < 0.2
            values = torch.where(tiny, values * 1e-8, values)
            step.append(_sparse(index, values, shape))
        result.append(step)
    return result


@pytest.mark.parametrize("sparse_dims", [(1, 1), (2, 1), (2, 3)], ids=str)
def test_matches_torch_on_other_sparse_layouts(sparse_dims):
    # Hybrid tensors (rows of values, as from an embedding) and fully sparse ones (single
    # entries), each with repeated indices.
    shapes = ((6, 4), (5, 3, 2))
    grads = _sparse_gradients(shapes, 60, sparse_dims)
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    runs = []
    for cls in (optlib.SparseAdam, torch.optim.SparseAdam):
        params = [s.clone().requires_grad_() for s in start]
        opt = cls(params, **TYPICAL)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        runs.append((params, opt))
    (ours, ours_opt), (theirs, theirs_opt) = runs
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
    assert _state_diff(ours_opt, theirs_opt) == 0.0


def test_param_groups_with_different_hyperparameters():
    def make(cls):
        def groups(params):
            return cls([dict(params=params[:1], **GRID[0]), dict(params=params[1:], **GRID[-1])])

        return groups

    ours, _ = train(make(optlib.SparseAdam))
    theirs, _ = train(make(torch.optim.SparseAdam))
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), theirs.parameters()))


def test_a_table_unused_for_a_while_and_an_empty_gradient_like_torch():
    # The second table gets no gradient for 3 steps (None: no state, no count), then an empty
    # sparse gradient for 3 (the step counts, nothing moves), then real ones.
    results = []
    for cls in (optlib.SparseAdam, torch.optim.SparseAdam):
        model = Model()
        first, second = model.parameters()
        opt = cls(model.parameters(), **TYPICAL)
        for t, batch in enumerate(batches(10)):
            opt.zero_grad()
            model.loss(batch).backward()
            if t < 3:
                second.grad = None
            elif t < 6:
                second.grad = _sparse(
                    torch.zeros(1, 0, dtype=torch.long),
                    torch.zeros(0, WIDTHS[1], dtype=torch.float64),
                    second.shape,
                )
            opt.step()
            if t == 2:
                assert second not in opt.state
            if t == 5:
                assert opt.state[second]["step"] == 3 and not opt.state[second]["exp_avg"].any()
        results.append((model, opt))
    (ours, ours_opt), (theirs, theirs_opt) = results
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), theirs.parameters()))
    assert _state_diff(ours_opt, theirs_opt) == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_matches_torch_on_cuda():
    results = []
    for cls in (optlib.SparseAdam, torch.optim.SparseAdam):
        model = Model().cuda()
        model.scale = model.scale.cuda()
        model.targets = [t.cuda() for t in model.targets]
        train(lambda ps: cls(ps, **TYPICAL), model=model, words=[b.cuda() for b in batches(60)])
        results.append(list(model.parameters()))
    assert max((p - q).abs().max().item() for p, q in zip(*results)) < 1e-10


# ---------------------------------------------------------------- 2. equivalences


def _every_row_gradients(steps=60):
    """Sparse gradients that hold every row of a (8, 3) tensor, and the same as dense ones."""
    gen = torch.Generator().manual_seed(3)
    dense = [torch.randn(8, 3, generator=gen, dtype=torch.float64) for _ in range(steps)]
    for g in dense:
        g[0] *= 1e-8  # a row where eps matters
    rows = torch.arange(8)[None]
    return [_sparse(rows, g, g.shape) for g in dense], dense


def _step_all(opt, param, grads):
    for g in grads:
        param.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.9)], ids=str)
def test_every_row_in_every_batch_is_adam_with_eps_over_sqrt_bias_correction(betas):
    # With every row in every batch the lazy rule changes nothing: the moments are Adam's
    # (to rounding: x + (1-β)(g - x) against Adam's βx + (1-β)g). The step is Adam's only
    # with Adam's eps replaced by eps / sqrt(1 - β2^t) at step t, because SparseAdam adds eps
    # to the uncorrected root sqrt(v_t), Adam to sqrt(v̂_t) = sqrt(v_t / (1 - β2^t)).
    lr, eps = 0.01, 1e-3
    sparse, dense = _every_row_gradients()
    start = torch.randn(8, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    lazy = start.clone().requires_grad_()
    lazy_opt = optlib.SparseAdam([lazy], lr=lr, betas=betas, eps=eps)
    _step_all(lazy_opt, lazy, sparse)

    def adam(translate_eps):
        param = start.clone().requires_grad_()
        opt = optlib.Adam([param], lr=lr, betas=betas, eps=eps)
        if translate_eps:
            def hook(optimizer, args, kwargs):
                t = optimizer.state[param]["step"].item() + 1 if optimizer.state else 1
                optimizer.param_groups[0]["eps"] = eps / math.sqrt(1 - betas[1] ** t)

            opt.register_step_pre_hook(hook)
        _step_all(opt, param, dense)
        return param, opt

    param, opt = adam(translate_eps=True)
    assert (lazy - param).abs().max().item() < TOL
    for key in ("exp_avg", "exp_avg_sq"):
        assert (lazy_opt.state[lazy][key] - opt.state[param][key]).abs().max().item() < TOL
    assert lazy_opt.state[lazy]["step"] == opt.state[param]["step"].item() == 60

    plain, _ = adam(translate_eps=False)  # the same eps in both: not the same update
    assert (lazy - plain).abs().max().item() > 1e-6


def test_repeated_rows_are_summed():
    # A batch that uses a row twice gives the gradient the two uses add up to (the update is
    # not linear in g, so the rows must be summed before it: coalesce).
    gen = torch.Generator().manual_seed(5)
    values = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    repeated = _sparse(torch.tensor([[1, 4, 1, 6, 4]]), values, (8, 3))
    summed = _sparse(
        torch.tensor([[1, 4, 6]]),
        torch.stack([values[0] + values[2], values[1] + values[4], values[3]]),
        (8, 3),
    )
    results = []
    for grad in (repeated, summed):
        param = torch.zeros(8, 3, dtype=torch.float64, requires_grad=True)
        opt = optlib.SparseAdam([param], lr=0.1)
        _step_all(opt, param, [grad] * 3)
        results.append((param, opt.state[param]["exp_avg_sq"]))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_maximize_is_minimizing_the_negative():
    sparse, _ = _every_row_gradients(30)
    results = []
    for maximize, sign in ((True, 1), (False, -1)):
        param = torch.ones(8, 3, dtype=torch.float64, requires_grad=True)
        opt = optlib.SparseAdam([param], lr=0.1, maximize=maximize)
        _step_all(opt, param, [sign * g for g in sparse])
        results.append(param)
    assert torch.equal(*results)


def test_the_update_function_is_the_optimizer():
    # sparse_adam_update, called by hand on the tensors, is every step of the class.
    sparse, _ = _every_row_gradients(30)
    by_class = torch.ones(8, 3, dtype=torch.float64, requires_grad=True)
    opt = optlib.SparseAdam([by_class], **TYPICAL)
    _step_all(opt, by_class, sparse)
    param = torch.ones(8, 3, dtype=torch.float64)
    m, v = torch.zeros_like(param), torch.zeros_like(param)
    for t, g in enumerate(sparse, start=1):
        optlib.sparse_adam.sparse_adam_update(
            param, g, m, v, step=t, lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6, maximize=False
        )
    assert torch.equal(param, by_class.detach()) and torch.equal(m, opt.state[by_class]["exp_avg"])


# ---------------------------------------------------------------- 3. behaviour: the lazy rule


def test_rows_outside_the_batch_keep_parameters_and_moments():
    # The lazy rule: a row not in this step's batch keeps θ, m and v exactly; a row never in any
    # batch keeps its start and zero moments. (Dense Adam would decay m and v and keep moving θ.)
    model = Model()
    start = [p.detach().clone() for p in model.parameters()]
    checked = []

    def record(t, model, opt):
        for p in model.parameters():
            state = opt.state[p]
            absent = torch.ones(VOCABULARY, dtype=torch.bool)
            absent[words[t]] = False
            now = (p.detach().clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone())
            if t > 0:
                assert all(torch.equal(a[absent], b[absent]) for a, b in zip(now, before[p]))
            before[p] = now
        checked.append(t)

    words, before = batches(20), {}
    make = lambda ps: optlib.SparseAdam(ps, **TYPICAL)  # noqa: E731
    _, opt = train(make, model=model, words=words, record=record)
    assert len(checked) == 20
    for p, s in zip(model.parameters(), start):
        assert torch.equal(p.detach()[USED:], s[USED:])
        assert not opt.state[p]["exp_avg"][USED:].any()
        assert not opt.state[p]["exp_avg_sq"][USED:].any()
        assert not torch.equal(p.detach()[:USED], s[:USED])


def test_dense_adam_moves_rows_outside_the_batch():
    # The contrast: the same model with dense gradients (zero rows for the words not in the
    # batch) and optlib.Adam. A row used once and then absent keeps moving, on its momentum.
    model = Model()
    for table in model.tables:
        table.sparse = False
    words = [torch.tensor([5])] + [torch.tensor([7])] * 10
    positions = []
    train(lambda ps: optlib.Adam(ps, **TYPICAL), model=model, words=words,
          record=lambda t, model, opt: positions.append(model.tables[0].weight[5].detach().clone()))
    assert all(not torch.equal(a, b) for a, b in zip(positions, positions[1:]))


def test_bias_correction_counts_the_steps_of_the_tensor_not_of_the_row():
    # A row first used at step t = 1000 gets m = (1-β1) g and v = (1-β2) g², and the step size
    # of t = 1000: its first move is γ sqrt(1-β2^t)/(1-β1^t) (1-β1)/sqrt(1-β2), 2.5 γ, where
    # Adam's first step is γ (sqrt(1-β2^t) -> 1 and the move -> 3.16 γ for large t). As torch.
    lr, (beta1, beta2), t = 1e-3, (0.9, 0.999), 1000
    results = []
    for cls in (optlib.SparseAdam, torch.optim.SparseAdam):
        param = torch.zeros(2, 1, dtype=torch.float64, requires_grad=True)
        opt = cls([param], lr=lr)
        for k in range(1, t + 1):
            row = torch.tensor([[1 if k == t else 0]])
            param.grad = _sparse(row, torch.ones(1, 1, dtype=torch.float64), (2, 1))
            opt.step()
        results.append(param[1].item())
    step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
    expected = -step_size * (1 - beta1) / (math.sqrt(1 - beta2) + 1e-8)  # g = 1
    assert results[0] == results[1] == pytest.approx(expected, rel=1e-12)
    assert 2.5 * lr < abs(results[0]) < 2.6 * lr


def test_converges_on_a_regression_of_embeddings():
    # Every row used in some batch moves to its target (the scaled rows more slowly).
    model, _ = train(lambda ps: optlib.SparseAdam(ps, lr=0.05), steps=600)
    for table, target in zip(model.tables, model.targets):
        fitted = (model.scale[:USED, None] * table.weight[:USED] - target[:USED]).detach()
        full_scale = model.scale[:USED] == 1
        assert fitted[full_scale].abs().max().item() < 1e-3


def test_converges_on_rosenbrock_as_an_embedding_row():
    point = nn.Embedding(1, 2, sparse=True, dtype=torch.float64)
    with torch.no_grad():
        point.weight.copy_(torch.tensor([[-1.5, 2.0]]))
    opt = optlib.SparseAdam(point.parameters(), lr=0.02)
    for _ in range(3000):
        opt.zero_grad()
        x, y = point(torch.tensor([0]))[0]
        ((1 - x) ** 2 + 100 * (y - x**2) ** 2).backward()
        opt.step()
    assert (point.weight.detach() - torch.ones(1, 2, dtype=torch.float64)).abs().max().item() < 1e-3


# ---------------------------------------------------------------- 3. behaviour: torch's rules


def test_same_signature_defaults_group_keys_and_no_fast_path():
    def described(cls):
        return [(p.name, p.kind, p.default) for p in inspect.signature(cls).parameters.values()]

    assert described(optlib.SparseAdam) == described(torch.optim.SparseAdam)
    a = optlib.SparseAdam(Model().parameters())
    b = torch.optim.SparseAdam(Model().parameters())
    assert a.defaults == b.defaults
    assert a.param_groups[0].keys() == b.param_groups[0].keys()
    assert "foreach" not in a.defaults and "fused" not in a.defaults


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])
def test_same_state_keys_dtypes_and_devices(default_dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        described = []
        for cls in (optlib.SparseAdam, torch.optim.SparseAdam):
            model = Model(dtype=torch.float32)
            model, opt = train(lambda ps: cls(ps, **TYPICAL), model=model, steps=2)
            described.append(
                [
                    (k, type(v)) + ((v.dtype, v.device, v.shape) if torch.is_tensor(v) else (v,))
                    for p in model.parameters()
                    for k, v in sorted(opt.state[p].items())
                ]
            )
    finally:
        torch.set_default_dtype(previous)
    assert described[0] == described[1]
    assert ("step", int, 2) in described[0]  # a Python int, unlike every other optimizer's


def _invalid():
    """(kwargs, text the message must contain) for every invalid argument."""
    sparse_param = torch.zeros(3, 2).to_sparse().requires_grad_()
    complex_param = torch.zeros(3, 2, dtype=torch.complex128, requires_grad=True)
    return [
        (dict(lr=-0.1), "-0.1"),
        (dict(lr=0.0), "learning rate: 0.0"),  # Adam allows lr = 0, SparseAdam does not
        (dict(lr=torch.tensor(-0.1)), "-0.1"),
        (dict(lr=torch.tensor([0.1, 0.2])), "1-element"),
        (dict(eps=-1e-8), "-1e-08"),
        (dict(eps=0.0), "epsilon value: 0.0"),
        (dict(betas=(1.0, 0.999)), "index 0"),
        (dict(betas=(-0.1, 0.999)), "index 0"),
        (dict(betas=(0.9, 1.0)), "index 1"),
        (dict(betas=(0.9,)), None),  # IndexError in both
        (dict(params=[]), None),
        (dict(params=torch.zeros(2, requires_grad=True)), None),
        (dict(params=[torch.zeros(2, requires_grad=True), sparse_param]), "indices [[0, 1]]"),
        (dict(params=[complex_param]), "Complex params at indices [[0, 0]]"),
        (dict(params=[dict(params=[torch.zeros(2)]), dict(params=[complex_param])]), "[[1, 0]]"),
    ]


@pytest.mark.parametrize("kwargs, text", _invalid(), ids=_label)
def test_invalid_arguments_raise_like_torch(kwargs, text):
    kwargs = dict(params=[torch.zeros(2, requires_grad=True)]) | kwargs
    with pytest.raises(Exception) as torch_error:
        torch.optim.SparseAdam(**kwargs)
    with pytest.raises(torch_error.type) as our_error:
        optlib.SparseAdam(**kwargs)
    if text is not None:
        assert text in str(our_error.value) and text in str(torch_error.value)


def test_a_dense_gradient_raises_like_torch():
    # torch checks the tensors of a group in order, creating and counting the state of those
    # before the dense one, then raises before updating any: so does optlib.
    results = []
    for cls in (optlib.SparseAdam, torch.optim.SparseAdam):
        model = Model()
        opt = cls(model.parameters(), **TYPICAL)
        model.loss(torch.tensor([1, 2, 2])).backward()
        second = model.tables[1].weight
        second.grad = second.grad.to_dense()
        with pytest.raises(RuntimeError) as error:
            opt.step()
        results.append((str(error.value), model, opt))
    (message, ours, ours_opt), (torch_message, theirs, theirs_opt) = results
    assert message == torch_message and "dense gradients" in message
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), theirs.parameters()))
    assert _state_diff(ours_opt, theirs_opt) == 0.0
    assert ours_opt.state[ours.tables[0].weight]["step"] == 1


def _checkpoint_continues(make_first, make_second):
    """30 steps with make_first, its state_dict into make_second, 30 more on both: they must
    agree bit for bit, parameters and state, and the step must stay an int."""
    words = batches(60)
    model, first = train(lambda ps: make_first(ps, **TYPICAL), words=words[:30])
    resumed = Model()
    resumed.load_state_dict(model.state_dict())
    second = make_second(list(resumed.parameters()), lr=1.0)  # settings come from the state_dict
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    train(lambda ps: first, model=model, words=words[30:])
    train(lambda ps: second, model=resumed, words=words[30:])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
    assert _state_diff(first, second) == 0.0
    assert all(type(s["step"]) is int for s in second.state.values())


@pytest.mark.parametrize("direction", ["optlib->optlib", "torch->optlib", "optlib->torch"])
def test_state_dict_resumes_bit_for_bit(direction):
    ours, theirs = optlib.SparseAdam, torch.optim.SparseAdam
    pairs = {
        "optlib->optlib": (ours, ours),
        "torch->optlib": (theirs, ours),
        "optlib->torch": (ours, theirs),
    }
    _checkpoint_continues(*pairs[direction])


def test_checkpoint_without_maximize_loads_like_torch():
    # torch versions before `maximize` existed saved groups without it; torch keeps such a
    # group as it is and reads a missing `maximize` as False: so does optlib.
    model, opt = train(lambda ps: torch.optim.SparseAdam(ps, **TYPICAL), steps=3)
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        del group["maximize"]
    results = []
    for cls in (optlib.SparseAdam, torch.optim.SparseAdam):
        resumed = Model()
        resumed.load_state_dict(model.state_dict())
        fresh = cls(list(resumed.parameters()), **TYPICAL)
        fresh.load_state_dict(copy.deepcopy(old))
        train(lambda ps: fresh, model=resumed, words=batches(5))
        results.append((fresh.state_dict()["param_groups"], list(resumed.parameters())))
    assert results[0][0] == results[1][0] and "maximize" not in results[0][0][0]
    assert all(torch.equal(p, q) for p, q in zip(results[0][1], results[1][1]))


def test_lr_scheduler_closure_and_hooks():
    results = []
    for optim in (optlib, torch.optim):
        model = Model()
        opt = optim.SparseAdam(model.parameters(), lr=0.02)
        scheduler = optlib.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
        calls = []
        opt.register_step_pre_hook(lambda *args: calls.append("pre"))
        opt.register_step_post_hook(lambda *args: calls.append("post"))
        for batch in batches(30):
            def closure():
                opt.zero_grad()
                loss = model.loss(batch)
                loss.backward()  # needs grad enabled inside step
                return loss

            loss = opt.step(closure)
            scheduler.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.02 * 0.5**3)
        assert torch.is_tensor(loss) and calls == ["pre", "post"] * 30
        results.append(list(model.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(*results))


def test_grad_is_not_modified():
    model = Model()
    opt = optlib.SparseAdam(model.parameters(), **TYPICAL, maximize=True)
    model.loss(torch.tensor([1, 2, 2, 5])).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for _ in range(3):
        opt.step()
    for p, g in zip(model.parameters(), grads):
        assert not p.grad.is_coalesced() and torch.equal(p.grad.to_dense(), g.to_dense())
        state = [v.data_ptr() for v in opt.state[p].values() if torch.is_tensor(v)]
        assert p.grad._values().data_ptr() not in state


def test_float32_tensor_lr_is_used_by_value():
    # torch keeps a tensor lr as a tensor, so a float32 one makes its step size a float32 number;
    # optlib, as for every optimizer, reads the tensor's value and computes in float64. The two
    # agree to that rounding.
    param_diff, state_diff, _, _ = side_by_side(dict(TYPICAL, lr=torch.tensor(0.01)))
    assert 0 < param_diff < 1e-6 and state_diff < 1e-6
