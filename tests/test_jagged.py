"""The jagged tile map every kernel starts with (_core.jagged.tile_owner), against a plain Python map."""
import pytest
import torch
import triton
import triton.language as tl

from conftest import DEVICE
from gesr_kernels._core.jagged import num_tiles, tile_owner


@triton.jit
def _owner_kernel(offsets_ptr, out_ptr, num_segments, BLOCK: tl.constexpr):
    tile = tl.program_id(0)
    user, first_row, end = tile_owner(offsets_ptr, num_segments, tile, BLOCK)
    tl.store(out_ptr + 3 * tile, user)
    tl.store(out_ptr + 3 * tile + 1, first_row)
    tl.store(out_ptr + 3 * tile + 2, end)


def _expected(lengths, block):
    """Every (user, first row, end row) the map must hand out, by tiles in user order."""
    tiles, start = [], 0
    for user, length in enumerate(lengths):
        tiles += [(user, start + k, start + length) for k in range(0, length, block)]
        start += length
    return tiles


@pytest.mark.parametrize("num_users", [1, 7, 128, 129, 300])
@pytest.mark.parametrize("block", [16, 64])
def test_tile_owner_covers_every_row_once(num_users, block):
    # Up to 128 users resolve in one window; more first bisect. Empty users and long ones mixed.
    g = torch.Generator().manual_seed(num_users * block)
    lengths = torch.randint(0, 3 * block, (num_users,), generator=g)
    lengths[torch.randperm(num_users, generator=g)[: num_users // 4]] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    grid = num_tiles(int(offsets[-1]), num_users, block)
    out = torch.full((grid, 3), -1, dtype=torch.int64, device=DEVICE)
    _owner_kernel[(grid,)](offsets.to(DEVICE), out, num_users, BLOCK=block)
    got = [tuple(row) for row in out.cpu().tolist() if row[1] < row[2]]  # spare tiles own no rows
    assert got == _expected(lengths.tolist(), block)
    assert all(0 <= row[0] < num_users for row in out.cpu().tolist())
