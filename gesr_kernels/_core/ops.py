"""Op registration that works on CUDA and under the Triton interpreter.

On CUDA an op is a ``torch.library.triton_op``: torch.compile sees the Triton kernels inside and can
fuse around them. Under ``TRITON_INTERPRET=1`` the same Python function is registered with
``torch.library.custom_op`` instead, because tracing a ``triton_op`` body with fake tensors would start
the interpreter on them. Every op must be given a fake (shape/dtype only) implementation.
"""
from typing import Callable, Iterable

import torch

from .env import interpreting

NAMESPACE = "gesr"


def register_op(name: str, *, mutates_args: Iterable[str] = ()) -> Callable:
    """Decorator: register ``fn`` as ``gesr::<name>`` (triton_op on CUDA, custom_op under the interpreter)."""
    qualname = f"{NAMESPACE}::{name}"

    def decorate(fn: Callable):
        if interpreting():
            return torch.library.custom_op(qualname, mutates_args=tuple(mutates_args))(fn)
        return torch.library.triton_op(qualname, mutates_args=tuple(mutates_args))(fn)

    return decorate


def launchable(kernel):
    """The handle to launch ``kernel[grid](...)`` with from inside a registered op body."""
    if interpreting():
        return kernel
    return torch.library.wrap_triton(kernel)
