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
            bits = t.view(_INT[t.dtype])
            bits.copy_(torch.where(t.isfinite() & (t != 0), bits ^ 1, bits))
        return t

    class LastBitFlip(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # Not while torch's profiler runs: it counts the flip's temporaries as the measured
            # code's memory (speed.peak_extra_bytes), an artefact no other CPU would produce.
            if func in _OPS and not torch.autograd._profiler_enabled():
                with torch._C._DisableTorchDispatch():
                    if isinstance(out, (tuple, list)):
                        for t in out:
                            _flip(t)
                    else:
                        _flip(out)
            return out

    LastBitFlip().__enter__()
