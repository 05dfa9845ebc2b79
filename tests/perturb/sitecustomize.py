"""Perturb the last bit of torch's results, to find printed outputs that a last-bit difference flips.

Loaded by Python at start-up when this folder is on PYTHONPATH (``make perturbed`` puts it there, for
the notebook kernels and the test processes alike). With ``OPTLIB_PERTURB=ulp`` it turns on a
dispatcher mode (``last_bit_flip.cpp``, compiled once per machine into torch's extension cache) that
flips the lowest mantissa bit of every finite, non-zero floating-point result of the operations whose
last bit differs between machines: matrix products (the BLAS picks its blocking by CPU), reductions
(their order depends on vector width and threads) and the transcendental functions (vectorized and
scalar versions round differently). It sees the operators a Python ``TorchDispatchMode`` would see,
below autograd, but costs a C++ redispatch, not a call into Python, for every operator it leaves alone.

The flip is a function of the exact result alone, so two computations that agree bit for bit still
agree under it (optlib against torch in one process stays exact), while anything that depends on the
last bit of a product, a sum or an exp moves as it would on another CPU.
"""
import os

if os.environ.get("OPTLIB_PERTURB") == "ulp":
    import contextlib
    import functools
    import sys
    from pathlib import Path

    import torch
    from torch.utils import cpp_extension

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

    # ninja, which builds the extension, may be installed in this venv only
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    _flips = cpp_extension.load(
        name="optlib_last_bit_flip",
        sources=[str(Path(__file__).with_name("last_bit_flip.cpp"))],
        extra_cflags=["-O2"],
    )
    # the functional overloads of these operators (an `out=` or in-place one writes into a tensor
    # the caller owns); the extension skips overload names that contain "out"
    _flips.set_listed([packet._qualified_op_name for packet in _PACKETS])
    _flips.set_enabled(True)

    @contextlib.contextmanager
    def _flips_paused():
        was_on = _flips.enabled()
        _flips.set_enabled(False)
        try:
            yield
        finally:
            _flips.set_enabled(was_on)

    # Two places where the mode steps aside, because its presence, not a last bit, would change
    # what is measured. Compiled code: the fast path is compiled and measured as it runs unperturbed
    # (and tracing under the mode would compile the flips into the graph).
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
