"""Shared test helpers: jagged inputs and the float error budget."""
import torch


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
