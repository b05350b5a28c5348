"""Jagged-batch helpers: map a flat 1-D grid of row tiles onto users with no host sync and no extra launch.

User b owns rows ``offsets[b] : offsets[b+1]``, cut into ``BLOCK``-row tiles. User b is given the tile
indices ``[first(b), first(b+1))`` with ``first(b) = offsets[b] // BLOCK + b``. That range holds
``offsets[b+1]//BLOCK - offsets[b]//BLOCK + 1 >= cdiv(rows_b, BLOCK)`` tiles, so it covers the user's
rows with at most one spare tile, and ``first`` is computed from the offsets alone: no prefix-sum array.
The grid is ``cdiv(total_rows, BLOCK) + B`` programs (host-known sizes only); spare programs exit.
"""
import triton
import triton.language as tl

from .host_math import cdiv


def num_tiles(total_rows: int, num_segments: int, block: int) -> int:
    """Grid size for ``tile_owner``: an upper bound on ``first(B)``, from host-known sizes only."""
    return cdiv(total_rows, block) + num_segments


# Users a tile_owner search resolves with one vector load instead of log2(SEARCH_WINDOW) dependent ones.
SEARCH_WINDOW = tl.constexpr(128)


@triton.jit
def tile_owner(offsets_ptr, num_segments, tile, BLOCK: tl.constexpr):
    """(b, first row of the tile, end row of user b) for flat tile index ``tile``: the k-th tile of user b
    starts at row ``offsets[b] + k*BLOCK``; a first row >= the end row means a spare tile. ``offsets`` is
    the (B+1,) non-decreasing row offsets. Every program starts with this search, and short programs
    would wait mostly on it: bisect while more than SEARCH_WINDOW users remain, then count the rest's
    ``first(b) <= tile`` in one vector load (``first`` strictly increases with b)."""
    lo = 0
    hi = num_segments  # invariant: first(lo) <= tile < first(hi) (or hi == B)
    while hi - lo > SEARCH_WINDOW:
        mid = (lo + hi) // 2
        if tl.load(offsets_ptr + mid).to(tl.int64) // BLOCK + mid <= tile:
            lo = mid
        else:
            hi = mid
    # No `if hi - lo > 1` guard around this: with one user Triton specializes num_segments == 1, and
    # Triton 3.6's TritonGPUCoalesce pass then crashes on the guarded block (seen on the H100).
    later = lo + 1 + tl.arange(0, SEARCH_WINDOW)  # users after lo still in the range
    in_range = later < hi
    first = tl.load(offsets_ptr + later, mask=in_range, other=0).to(tl.int64) // BLOCK + later
    lo += tl.sum(tl.where(in_range & (first <= tile), 1, 0), 0)
    start = tl.load(offsets_ptr + lo).to(tl.int64)
    end = tl.load(offsets_ptr + lo + 1).to(tl.int64)
    first_row = start + (tile - (start // BLOCK + lo)) * BLOCK
    return lo, first_row, end
