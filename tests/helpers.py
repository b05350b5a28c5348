"""Shared test helpers: jagged inputs, the float error budget, and recording a launcher's choices."""
import torch


def record_results(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` (a host-side choice of a launcher) so that every call's result is appended to the
    returned list; the results themselves are unchanged."""
    original = getattr(module, name)
    results = []
    monkeypatch.setattr(module, name, lambda *a: results.append(original(*a)) or results[-1])
    return results


def offsets_from_lengths(lengths, dtype=torch.int64, device="cpu") -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=dtype)
    out[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return out.to(device)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_within_budget(out: torch.Tensor, same_dtype_ref: torch.Tensor, fp64_ref: torch.Tensor,
                         band: float = None) -> None:
    """The kernel's error against an fp64 reference is at most twice that of the PyTorch reference run in
    the same dtype, plus a rounding band of a few units in the last place of the dtype."""
    assert out.shape == fp64_ref.shape and out.dtype == same_dtype_ref.dtype
    assert torch.isfinite(out).all(), "non-finite values in the output"
    if band is None:
        band = 4 * torch.finfo(out.dtype).eps
    err = relative_error(out, fp64_ref)
    ref_err = relative_error(same_dtype_ref, fp64_ref)
    assert err <= 2 * ref_err + band, f"error {err:.3e} > 2 x reference error {ref_err:.3e} + {band:.1e}"


def assert_max_error_within_budget(name: str, kernel: torch.Tensor, twin: torch.Tensor, fp64_ref: torch.Tensor,
                                   band: float) -> None:
    """Max-abs form of the error budget for one tensor: the kernel's error against the fp64 reference is at
    most twice that of the twin run in the kernel's dtype, plus ``band`` times the reference's magnitude
    (at least 1). Shapes, dtypes and finiteness are checked first; empty tensors pass."""
    assert kernel.shape == fp64_ref.shape and kernel.dtype == twin.dtype, \
        (name, kernel.shape, fp64_ref.shape, kernel.dtype, twin.dtype)
    assert torch.isfinite(kernel).all(), f"{name}: non-finite values"
    if not kernel.numel():
        return
    err = (kernel.double() - fp64_ref).abs().max().item()
    twin_err = (twin.double() - fp64_ref).abs().max().item()
    scale = max(fp64_ref.abs().max().item(), 1.0)
    assert err <= 2 * twin_err + band * scale, f"{name}: error {err:.3g}, twin error {twin_err:.3g}"


def set_arg(i, value):
    """Bad-input case mutator: replace positional argument i (``value`` may be a function of the args)."""
    def mutate(args, kwargs):
        args[i] = value(args) if callable(value) else value
    return mutate


def set_kw(name, value):
    """Bad-input case mutator: set keyword argument ``name`` (``value`` may be a function of the args)."""
    def mutate(args, kwargs):
        kwargs[name] = value(args) if callable(value) else value
    return mutate


def outputs_and_grads(model, inputs, kwargs, cotangents=None):
    """A module's outputs, and given cotangents the gradients of every parameter and float input."""
    inputs = [x.detach().requires_grad_() if x.is_floating_point() else x for x in inputs]
    outs = model(*inputs, **kwargs)
    outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
    if cotangents is None:
        return list(outs)
    wrt = list(model.parameters()) + [x for x in inputs if x.is_floating_point()]
    grads = torch.autograd.grad(outs, wrt, [c.to(o.dtype) for o, c in zip(outs, cotangents)])
    return list(outs) + list(grads)


def assert_backends_agree(model, inputs, kwargs, band=1e-5):
    """The triton backend's max error against an fp64 reference-backend copy is at most twice the fp32
    reference backend's + band * scale, for the outputs, every parameter gradient and the float input
    gradients (``assert_max_error_within_budget`` for each)."""
    import copy

    import gesr_kernels
    kern_model = gesr_kernels.set_backend(copy.deepcopy(model), "triton")
    twin = gesr_kernels.set_backend(copy.deepcopy(model), "reference")
    twin64 = gesr_kernels.set_backend(copy.deepcopy(model), "reference").double()
    inputs64 = [x.double() if x.is_floating_point() else x for x in inputs]
    cotangents = [torch.randn_like(o) for o in outputs_and_grads(twin64, inputs64, kwargs)]
    ref = outputs_and_grads(twin64, inputs64, kwargs, cotangents)
    same = outputs_and_grads(twin, inputs, kwargs, cotangents)
    kern = outputs_and_grads(kern_model, inputs, kwargs, cotangents)
    names = ([f"out{i}" for i in range(len(cotangents))] + [n for n, _ in model.named_parameters()]
             + [f"d_input{i}" for i, x in enumerate(inputs) if x.is_floating_point()])
    assert len(kern) == len(same) == len(ref) == len(names)
    for name, k, t, r in zip(names, kern, same, ref):
        assert_max_error_within_budget(name, k, t, r, band)


def compile_for_h100_in_subprocess(script: str) -> None:
    """Run ``script`` (which compiles kernels for sm_90 and prints "compiled") in a fresh Python without the
    Triton interpreter, from the repository root; skip when CUDA is available (the GPU tests run the kernels
    themselves) or when Triton has no NVIDIA backend or ptxas."""
    import os
    import subprocess
    import sys

    import pytest
    if torch.cuda.is_available():
        pytest.skip("the GPU tests compile and run the kernels")
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip("no ptxas to compile for sm_90")
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
