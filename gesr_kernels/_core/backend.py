"""Backend choice shared by the modules: Triton kernels or the pure-PyTorch references."""
import torch

BACKENDS = ("auto", "triton", "reference")


def check_backend(owner: str, backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{owner}: backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def use_triton(backend: str, device: torch.device) -> bool:
    """"triton" always, "reference" never, "auto" on CUDA tensors only."""
    if backend == "auto":
        return device.type == "cuda"
    return backend == "triton"
