"""Checks of the arguments that the GPU kernel wrappers (CuPy and numba.cuda) share."""

from __future__ import annotations

from typing import Any


def check_bits(bits: int) -> int:
    """A code width in 1..8."""
    bits = int(bits)
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    return bits


def check_length(array: Any, length: int, name: str) -> None:
    """``array`` must have shape ``(length,)``."""
    if tuple(array.shape) != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(array.shape)}")


def scores_shapes(q: Any, packed: Any, length: int, width: int) -> tuple[int, int, int]:
    """``(batches, m, n)`` of ``q : (B, m, length)`` and ``packed : (B, n, width)``."""
    if q.ndim != 3 or packed.ndim != 3:
        raise ValueError(f"q and packed must be 3-D, got {tuple(q.shape)} and "
                         f"{tuple(packed.shape)}")
    batches, m, q_length = (int(s) for s in q.shape)
    packed_batches, n, packed_width = (int(s) for s in packed.shape)
    if q_length != length or packed_batches != batches or packed_width != width:
        raise ValueError(f"q {tuple(q.shape)} and packed {tuple(packed.shape)} do not match: "
                         f"expected (B, m, {length}) and (B, n, {width})")
    return batches, m, n
