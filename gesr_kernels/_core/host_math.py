"""Integer helpers for launch-time arithmetic on the host.

``triton.cdiv`` / ``triton.next_power_of_2`` are constexpr functions: called from Python they cost 2-4 µs
each (argument unwrapping), and a launcher calls several per op call. These are plain ints."""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
