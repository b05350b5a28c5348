"""Jagged-batch helpers: map a flat 1-D grid of row tiles onto users without a host sync.

A user b owning ``rows_b = offsets[b+1] - offsets[b]`` rows is cut into ``cdiv(rows_b, BLOCK)`` tiles.
``tile_offsets`` (B+1, int32) is their exclusive cumulative sum, computed on the device, and the grid is
launched with an upper bound that needs only host-known sizes: ``cdiv(total_rows, BLOCK) + B`` tiles.
Inside the kernel ``find_segment`` binary-searches a program's tile index in ``tile_offsets``;
programs past the last tile exit.
"""
import torch
import triton
import triton.language as tl


def tile_offsets(offsets: torch.Tensor, block: int) -> torch.Tensor:
    """(B+1,) int32: first tile of each user when every user's rows are cut into ``block``-row tiles."""
    lengths = (offsets[1:] - offsets[:-1]).to(torch.int32)
    tiles = torch.div(lengths + (block - 1), block, rounding_mode="floor")
    out = torch.zeros(offsets.shape[0], dtype=torch.int32, device=offsets.device)
    out[1:] = torch.cumsum(tiles, 0)
    return out


def max_tiles(total_rows: int, num_segments: int, block: int) -> int:
    """Host-side upper bound on ``tile_offsets(...)[-1]``: each segment wastes at most one partial tile."""
    return triton.cdiv(total_rows, block) + num_segments


@triton.jit
def find_segment(offsets_ptr, num_segments, value):
    """Largest b in [0, num_segments) with offsets[b] <= value, for non-decreasing offsets (scalar)."""
    lo = 0
    hi = num_segments  # invariant: offsets[lo] <= value < offsets[hi] (offsets[num_segments] = end)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tl.load(offsets_ptr + mid) <= value:
            lo = mid
        else:
            hi = mid
    return lo
