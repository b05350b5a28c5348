"""Host-side argument checks shared by the public functions.

Every check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (shape, device, value) with a
message that names the function, the argument, what was expected and what was given. Checks that read
tensor data (offsets monotone, lengths non-negative) cost a device-to-host copy; callers skip them with
``validate=False``, and they are skipped automatically while torch.compile traces.
"""
import math
from typing import Iterable, Optional, Sequence

import torch

from .env import interpreting

INDEX_DTYPES = (torch.int32, torch.int64)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(fn: str, name: str, t, *, ndim: Optional[int] = None,
                 dtypes: Optional[Sequence[torch.dtype]] = None) -> None:
    """``t`` is a tensor of rank ``ndim`` with a dtype in ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{fn}: {name} must have dtype {_dtype_names(dtypes)}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_same_device(fn: str, **tensors) -> None:
    """All given tensors (None entries ignored) live on one device."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but {first_name} is on {first.device}; "
                             f"all tensors must be on one device")


def check_kernel_device(fn: str, name: str, t: torch.Tensor) -> None:
    """The Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter. Anything else
    (CPU tensors in a normal process) would fail inside the launcher with a message about pointers."""
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"{fn}: the Triton kernels need CUDA tensors, got {name} on {t.device}; move the "
                         f"inputs to a GPU, use the pure-PyTorch twin (gesr_kernels.reference, or "
                         f"backend='reference' in gesr_kernels.nn), or set TRITON_INTERPRET=1 before "
                         f"triton is imported to run the kernels on the CPU (slow)")


def check_int(fn: str, name: str, value, *, minimum: Optional[int] = None) -> None:
    """``value`` is a Python int (not bool) and at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")


def should_check_data(validate: bool) -> bool:
    """Data-dependent checks run unless disabled or while torch.compile traces (they would sync)."""
    return validate and not torch.compiler.is_compiling()


def check_offsets(fn: str, name: str, offsets, num_rows: int, num_segments: Optional[int],
                  *, check_data: bool) -> Optional[torch.Tensor]:
    """1-D int32/int64 offsets of length B+1 (``num_segments`` = B when known), from 0, non-decreasing,
    ending at ``num_rows``. Returns the int64 host copy the data checks made (None when they did not run),
    so callers that need more of the offsets' values do not copy them again."""
    check_tensor(fn, name, offsets, dtypes=INDEX_DTYPES)
    if offsets.dim() != 1 or offsets.shape[0] < 2:
        raise ValueError(f"{fn}: {name} must be 1-D with B+1 >= 2 entries, got shape {tuple(offsets.shape)}")
    if num_segments is not None and offsets.shape[0] != num_segments + 1:
        raise ValueError(f"{fn}: {name} must be 1-D with B+1 = {num_segments + 1} entries, "
                         f"got shape {tuple(offsets.shape)}")
    if not check_data:
        return None
    host = offsets.detach().to("cpu", torch.int64)
    if host[0].item() != 0:
        raise ValueError(f"{fn}: {name} must start at 0, got {host[0].item()}")
    steps = host[1:] - host[:-1]
    if bool((steps < 0).any()):
        at = int(torch.nonzero(steps < 0)[0, 0])
        raise ValueError(f"{fn}: {name} must be non-decreasing, got {host[at].item()} then "
                         f"{host[at + 1].item()} at index {at}")
    if host[-1].item() != num_rows:
        raise ValueError(f"{fn}: {name} must end at the row count {num_rows}, got {host[-1].item()}")
    return host


def check_real(fn: str, name: str, value) -> float:
    """``value`` is a finite Python int or float (not bool); returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be finite, got {value}")
    return value


def check_lengths(fn: str, name: str, lengths, num_rows: int, *, check_data: bool) -> None:
    """Optional per-row visible lengths: 1-D int32/int64 of ``num_rows`` non-negative entries."""
    if lengths is None:
        return
    check_tensor(fn, name, lengths, dtypes=INDEX_DTYPES)
    if lengths.dim() != 1 or lengths.shape[0] != num_rows:
        raise ValueError(f"{fn}: {name} must be 1-D with {num_rows} entries (one per candidate), "
                         f"got shape {tuple(lengths.shape)}")
    if check_data and num_rows > 0:
        smallest = int(lengths.detach().min().item())
        if smallest < 0:
            raise ValueError(f"{fn}: {name} must be non-negative, got {smallest}")
