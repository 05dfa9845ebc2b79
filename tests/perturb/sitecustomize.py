"""Perturb the last bit of torch's results, to find printed outputs that a last-bit difference flips.

Loaded by Python at start-up when this folder is on PYTHONPATH (``make perturbed`` puts it there, for
the notebook kernels and the test processes alike). With ``OPTLIB_PERTURB=ulp`` it installs a
``TorchDispatchMode`` that flips the lowest mantissa bit of every finite, non-zero floating-point
result of the operations whose last bit differs between machines: matrix products (the BLAS picks
its blocking by CPU), reductions (their order depends on vector width and threads) and the
transcendental functions (vectorized and scalar versions round differently).

The flip is a function of the exact result alone, so two computations that agree bit for bit still
agree under it (optlib against torch in one process stays exact), while anything that depends on the
last bit of a product, a sum or an exp moves as it would on another CPU.
"""
import os

if os.environ.get("OPTLIB_PERTURB") == "ulp":
    import contextlib
    import functools

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    _PACKETS = [
        # products
        aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.mv, aten.dot, aten.vdot, aten.addmv,
        aten._scaled_dot_product_flash_attention_for_cpu, aten.convolution,
        # reductions
        aten.sum, aten.mean, aten.prod, aten.norm, aten.linalg_vector_norm, aten.std, aten.var,
        aten.var_mean, aten.std_mean, aten.cumsum, aten.logsumexp, aten.nansum,
        aten._softmax, aten._log_softmax, aten._softmax_backward_data, aten._log_softmax_backward_data,
        aten.native_layer_norm, aten.native_layer_norm_backward,
        # transcendental functions
        aten.exp, aten.expm1, aten.log, aten.log1p, aten.log2, aten.tanh, aten.sigmoid, aten.sin,
        aten.cos, aten.atan2, aten.erf, aten.gelu, aten.gelu_backward, aten.pow,
    ]
    # Functional overloads only: an `out=` or in-place overload writes into a tensor the caller owns.
    _OPS = {getattr(packet, name) for packet in _PACKETS for name in packet.overloads() if "out" not in name}
    _INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}

    def _flip(t):
        if isinstance(t, torch.Tensor) and t.dtype in _INT and t.numel() and t.layout == torch.strided:
            # XOR with the mask (True is 1): four kernels, where a `where` and a copy take six
            t.view(_INT[t.dtype]).bitwise_xor_(t.isfinite() & (t != 0))
        return t

    class LastBitFlip(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in _OPS:
                with torch._C._DisableTorchDispatch():
                    if isinstance(out, (tuple, list)):
                        for t in out:
                            _flip(t)
                    else:
                        _flip(out)
            return out

    _mode = LastBitFlip()
    _mode.__enter__()
    _mode_on = True

    @contextlib.contextmanager
    def _flips_paused():
        global _mode_on
        if not _mode_on:  # already paused by an enclosing pause
            yield
            return
        _mode.__exit__(None, None, None)
        _mode_on = False
        try:
            yield
        finally:
            _mode.__enter__()
            _mode_on = True

    # Two places where the mode steps aside, because its presence, not a last bit, would change
    # what is measured. Compiled code: under a Python dispatch mode torch.compile does not compile
    # (the fast path would run as separate eager operations, with temporaries of their own).
    _compile = torch.compile

    def _compile_without_flips(model=None, **options):
        if model is None:  # used as @torch.compile(...)
            return lambda model: _compile_without_flips(model, **options)
        compiled = _compile(model, **options)

        @functools.wraps(model)
        def run_compiled(*args, **kwargs):
            with _flips_paused():
                return compiled(*args, **kwargs)

        return run_compiled

    torch.compile = _compile_without_flips

    # And torch's profiler, while it measures memory (speed._peak_extra_bytes): the flips allocate.
    _profile = torch.profiler.profile
    _profile_enter, _profile_exit = _profile.__enter__, _profile.__exit__

    def _enter_without_flips(self):
        self._flips_paused = _flips_paused()
        self._flips_paused.__enter__()
        return _profile_enter(self)

    def _exit_with_flips(self, *exc_info):
        try:
            return _profile_exit(self, *exc_info)
        finally:
            self._flips_paused.__exit__(None, None, None)

    _profile.__enter__, _profile.__exit__ = _enter_without_flips, _exit_with_flips
