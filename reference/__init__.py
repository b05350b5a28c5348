"""Pure-PyTorch twins of the gesr_kernels ops: same signatures, same semantics, no Triton.

They are the ground truth of the tests and benchmarks, and a fallback users can read.
"""
from .hard_match import hard_match_count, hard_match_embedding  # noqa: F401
from .target_attention import target_aware_attention  # noqa: F401
