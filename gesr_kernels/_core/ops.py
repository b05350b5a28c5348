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
            op = torch.library.custom_op(qualname, mutates_args=tuple(mutates_args))(fn)
        else:
            op = torch.library.triton_op(qualname, mutates_args=tuple(mutates_args))(fn)
        op._gesr_eager_impl = fn
        return op

    return decorate


def call_op(op, *args):
    """Call a registered op: through the dispatcher while torch.compile traces, and straight into its
    Python body in eager mode, where the dispatcher's per-call cost (tens of microseconds) would
    dominate small launches. Both run the same code."""
    if torch.compiler.is_compiling():
        return op(*args)
    return op._gesr_eager_impl(*args)


def launchable(kernel):
    """The handle to launch ``kernel[grid](...)`` with from inside a registered op body."""
    if interpreting():
        return kernel
    return torch.library.wrap_triton(kernel)
