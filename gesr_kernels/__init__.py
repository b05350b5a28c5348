"""gesr_kernels: fused Triton kernels for Generative Early Stage Ranking (GESR).

Public API:
    hard_match_count, hard_match_embedding   -- hard-match attention (HMA) ops
    target_aware_attention                   -- HSTU-style attention over [history ; candidates]
    nn.HardMatchAttention                    -- counts -> embedding -> MLP module
"""
__version__ = "0.1.0"

from .hard_match import hard_match_count, hard_match_embedding  # noqa: E402
from .target_attention import target_aware_attention  # noqa: E402
from . import nn  # noqa: E402

__all__ = ["hard_match_count", "hard_match_embedding", "target_aware_attention", "nn", "__version__"]
