"""Op registration: every op is a ``torch.library.custom_op`` (opaque to torch.compile, given a fake
implementation for shapes and dtypes), on CUDA and under the Triton interpreter alike.

Not ``torch.library.triton_op``: torch.compile then infers from the kernels' Triton IR which arguments
they write, and for our kernels (stores whose addresses derive from loaded offsets through helper
functions) that analysis also marks read-only inputs (q, the offsets) as written. Inductor then clones
them before every call, and AOTAutograd refuses outright when such an input is a leaf that requires grad.
An opaque op with ``mutates_args=()`` states the truth.

Eager calls (``call_op`` outside torch.compile) run the op's Python body directly: the dispatcher costs
host time per call, more than some of our kernels take on the GPU.
"""
from typing import Callable, Iterable

import torch

NAMESPACE = "gesr"


def register_op(name: str, *, mutates_args: Iterable[str] = ()) -> Callable:
    """Decorator: register ``fn`` as the custom op ``gesr::<name>``."""
    qualname = f"{NAMESPACE}::{name}"

    def decorate(fn: Callable):
        op = torch.library.custom_op(qualname, mutates_args=tuple(mutates_args))(fn)
        op._gesr_body = fn
        return op

    return decorate


def call_op(op, *args):
    """Call a registered op: through the dispatcher while torch.compile traces, else straight into its body.
    Both run the same code."""
    if torch.compiler.is_compiling():
        return op(*args)
    return op._gesr_body(*args)
