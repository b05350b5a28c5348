"""Op registration that works on CUDA and under the Triton interpreter.

On CUDA an op is a ``torch.library.triton_op``: torch.compile sees the Triton kernels inside and can
fuse around them. Under ``TRITON_INTERPRET=1`` the same Python function is registered with
``torch.library.custom_op`` instead, because tracing a ``triton_op`` body with fake tensors would start
the interpreter on them. Every op must be given a fake (shape/dtype only) implementation.

Eager calls (``call_op`` outside torch.compile) run the op's Python body directly and launch its kernels
without ``wrap_triton``: the dispatcher and the wrapper's higher-order-op machinery cost hundreds of
microseconds of host time per call, more than most of our kernels take on the GPU.
"""
import threading
from typing import Callable, Iterable

import torch

from .env import interpreting

NAMESPACE = "gesr"
_eager = threading.local()


def register_op(name: str, *, mutates_args: Iterable[str] = ()) -> Callable:
    """Decorator: register ``fn`` as ``gesr::<name>`` (triton_op on CUDA, custom_op under the interpreter)."""
    qualname = f"{NAMESPACE}::{name}"

    def decorate(fn: Callable):
        if interpreting():
            op = torch.library.custom_op(qualname, mutates_args=tuple(mutates_args))(fn)
        else:
            op = torch.library.triton_op(qualname, mutates_args=tuple(mutates_args))(fn)
        op._gesr_body = fn
        return op

    return decorate


def call_op(op, *args):
    """Call a registered op: through the dispatcher while torch.compile traces, else straight into its body
    with direct kernel launches. Both run the same code."""
    if torch.compiler.is_compiling():
        return op(*args)
    _eager.direct = True
    try:
        return op._gesr_body(*args)
    finally:
        _eager.direct = False


def launchable(kernel):
    """The handle to launch ``kernel[grid](...)`` with from inside a registered op body."""
    if interpreting() or getattr(_eager, "direct", False):
        return kernel
    return torch.library.wrap_triton(kernel)
