"""GPU production path of PolarQuant's encode and decode kernels: CuPy ``RawModule`` kernels.

``polar_quantize`` and ``polar_dequantize`` launch the ``<LEVELS>`` instantiations of
``cuda_kernels/polar.cu`` (the comment at the top of that file gives the work split: one
thread per (row, group of blocks) to encode, one per (row, block) to decode). The NumPy
references are `latkv.polar.polar_quantize_reference` and
`latkv.polar.polar_dequantize_reference`, with the same signatures.

The kernels take every level at once: the per-level tables are concatenated into one float64
array, the code widths packed into one integer (4 bits per level), and the packed codes of all
levels live in one ``(n, total_bytes)`` buffer, which `polar_quantize` cuts into the per-level
arrays (contiguous copies) and `polar_dequantize` assembles from them.

The argument checks and layout helpers below (`check_levels`, `check_dim`, `level_lengths`,
`group_blocks`, `concat_tables`) are shared with `latkv._gpu.numba_polar`; none imports CuPy.

Inputs are CuPy arrays on the current device (converted to C-contiguous arrays of the kernel's
dtype first where they are not); the results are new CuPy arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from latkv._gpu.cuda_sources import MAX_POLAR_LEVELS
from latkv._gpu.cupy_modules import kernel, launch_1d
from latkv.packing import packed_length

# Threads per block of both kernels.
THREADS_PER_BLOCK = 128
# The kernels loop grid-stride, so any grid is correct; this caps the launch.
MAX_BLOCKS = 2**31 - 1


def check_levels(levels: int, level_bits: Any) -> tuple[int, tuple[int, ...]]:
    """``levels`` in ``1..MAX_POLAR_LEVELS`` and one width ``1..8`` per level."""
    levels = int(levels)
    if not 1 <= levels <= MAX_POLAR_LEVELS:
        raise ValueError(f"levels must be 1..{MAX_POLAR_LEVELS} for the GPU kernels, got "
                         f"{levels}")
    bits = tuple(int(b) for b in level_bits)
    if len(bits) != levels:
        raise ValueError(f"level_bits must give one width per level ({levels}), got {bits}")
    if not all(1 <= b <= 8 for b in bits):
        raise ValueError(f"level_bits must be 1..8, got {bits}")
    return levels, bits


def pack_level_bits(level_bits: tuple[int, ...]) -> int:
    """The kernels' ``level_bits`` argument: width of level ``l`` in bits ``4(l-1)..4(l-1)+3``."""
    word = 0
    for level, bits in enumerate(level_bits):
        word |= bits << (4 * level)
    return word


def level_lengths(dim: int, level_bits: tuple[int, ...]) -> list[int]:
    """Packed bytes per row of each level: ``ceil((dim >> l) * b_l / 8)``."""
    return [packed_length(dim >> level, bits)
            for level, bits in enumerate(level_bits, start=1)]


def group_blocks(levels: int, level_bits: tuple[int, ...]) -> int:
    """Blocks per encoding thread: the smallest power of two ``G <= 8`` for which every
    level's codes of ``G`` blocks fill whole bytes (as ``cuda_kernels/polar.cu`` computes it)."""
    group = 1
    for level, bits in enumerate(level_bits, start=1):
        block_bits = (1 << (levels - level)) * bits
        low = block_bits & -block_bits
        group = max(group, 1 if low >= 8 else 8 // low)
    return group


def check_dim(dim: int, levels: int) -> int:
    """``dim`` as an int, checked to be a non-negative multiple of ``2^levels``."""
    dim = int(dim)
    if dim < 0 or dim % (1 << levels):
        raise ValueError(f"dim ({dim}) must be a multiple of 2^levels = {1 << levels}")
    return dim


def concat_tables(xp: Any, tables: Any, sizes: list[int], name: str) -> Any:
    """Per-level tables as float64 arrays of module ``xp``, checked against their sizes and
    concatenated (level 1 first), as the kernels read them."""
    tables = tuple(tables)
    if len(tables) != len(sizes):
        raise ValueError(f"{name} must give one table per level ({len(sizes)}), got "
                         f"{len(tables)}")
    parts = []
    for level, (table, size) in enumerate(zip(tables, sizes), start=1):
        table = xp.ascontiguousarray(xp.asarray(table), dtype=xp.float64)
        if tuple(table.shape) != (size,):
            raise ValueError(f"{name} of level {level} must have shape ({size},), got "
                             f"{tuple(table.shape)}")
        parts.append(table)
    return xp.concatenate(parts)


def polar_quantize(rotated: Any, levels: int, level_bits: tuple[int, ...],
                   boundaries: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any]:
    """Codes of every level and the block radii of rotated vectors (CuPy kernel).

    Parameters
    ----------
    rotated : (n, d) float32 cupy.ndarray
        Preconditioned vectors; ``d`` a multiple of ``2^levels``.
    levels : int
        1..8 (`latkv._gpu.cuda_sources.MAX_POLAR_LEVELS`).
    level_bits : tuple of int
        Bits per angle at each level, 1..8.
    boundaries : tuple of (2**bits - 1,) float64 cupy.ndarray
        Increasing angle boundaries per level; a code is ``sum(boundaries < angle)``.

    Returns
    -------
    packed : tuple of (n, ceil((d >> l) * b_l / 8)) uint8 cupy.ndarray
        Level ``l``'s codes in block order, packed as `latkv.pack_bits` does.
    radius : (n, d >> levels) float64 cupy.ndarray
        Block norms, bit-identical to `latkv.polar.polar_quantize_reference` (IEEE square
        roots of float64 sums of exact squares).

    Notes
    -----
    The codes equal the reference's except where CUDA's double ``atan2`` (within 2 ulp) and
    the host libm's round an angle differently *and* a boundary lies between the two: only
    for an angle within about ``1e-16`` of a boundary, so random data gives identical bytes.
    NaN angles get the last code, as with ``numpy.searchsorted``.
    """
    import cupy

    levels, level_bits = check_levels(levels, level_bits)
    rotated = cupy.ascontiguousarray(rotated, dtype=cupy.float32)
    if rotated.ndim != 2:
        raise ValueError(f"rotated must be 2-D (n, d), got shape {tuple(rotated.shape)}")
    rows, dim = (int(s) for s in rotated.shape)
    check_dim(dim, levels)
    table = concat_tables(cupy, boundaries, [(1 << b) - 1 for b in level_bits], "boundaries")
    lengths = level_lengths(dim, level_bits)
    buffer = cupy.empty((rows, sum(lengths)), dtype=cupy.uint8)
    radius = cupy.empty((rows, dim >> levels), dtype=cupy.float64)
    groups = -(-(dim >> levels) // group_blocks(levels, level_bits))
    if radius.size:
        launch_1d(
            kernel("polar.cu", f"polar_quantize<{levels}>"),
            min(rows * groups, MAX_BLOCKS * THREADS_PER_BLOCK),
            (rotated, table, buffer, radius, np.int64(rows), np.int64(dim),
             np.uint32(pack_level_bits(level_bits))),
            threads=THREADS_PER_BLOCK,
        )
    offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    packed = tuple(cupy.ascontiguousarray(buffer[:, start:stop])
                   for start, stop in zip(offsets[:-1], offsets[1:]))
    return packed, radius


def polar_dequantize(packed: tuple[Any, ...], radius: Any, levels: int,
                     level_bits: tuple[int, ...], centroids: tuple[Any, ...],
                     dim: int) -> Any:
    """The rotated-domain reconstruction ``(n, dim)`` float32 (CuPy kernel).

    Parameters
    ----------
    packed : tuple of (n, ceil((dim >> l) * b_l / 8)) uint8 cupy.ndarray
        Per-level codes as `polar_quantize` returns them; padding bits are ignored.
    radius : (n, dim >> levels) cupy.ndarray
        Block radii, float64 or the stored float16 / float32 (converted to float64).
    levels : int
        1..8.
    level_bits : tuple of int
    centroids : tuple of (2**bits,) float64 cupy.ndarray
        Angle centroids per level.
    dim : int
        A multiple of ``2^levels``.

    Returns
    -------
    (n, dim) float32 cupy.ndarray
        Computed in float64 and rounded once; equal to
        `latkv.polar.polar_dequantize_reference` up to the ulps of CUDA's ``sin`` / ``cos``
        (relative differences around ``1e-7`` at most, from the final float32 rounding).
    """
    import cupy

    levels, level_bits = check_levels(levels, level_bits)
    dim = check_dim(dim, levels)
    radius = cupy.ascontiguousarray(radius, dtype=cupy.float64)
    if radius.ndim != 2 or int(radius.shape[1]) != dim >> levels:
        raise ValueError(f"radius must have shape (n, {dim >> levels}) for dim {dim} and "
                         f"{levels} levels, got {tuple(radius.shape)}")
    rows = int(radius.shape[0])
    packed = tuple(packed)
    if len(packed) != levels:
        raise ValueError(f"packed must give one array per level ({levels}), got {len(packed)}")
    lengths = level_lengths(dim, level_bits)
    parts = []
    for level, (codes, length) in enumerate(zip(packed, lengths), start=1):
        codes = cupy.ascontiguousarray(codes)
        if codes.dtype != cupy.uint8:
            raise TypeError(f"packed level {level} must be uint8, got dtype {codes.dtype}")
        if tuple(codes.shape) != (rows, length):
            raise ValueError(f"packed level {level} must have shape ({rows}, {length}), got "
                             f"{tuple(codes.shape)}")
        parts.append(codes)
    table = concat_tables(cupy, centroids, [1 << b for b in level_bits], "centroids")
    out = cupy.empty((rows, dim), dtype=cupy.float32)
    if out.size == 0:
        return out
    buffer = cupy.ascontiguousarray(cupy.concatenate(parts, axis=1))
    launch_1d(
        kernel("polar.cu", f"polar_dequantize<{levels}>"),
        min(rows * (dim >> levels), MAX_BLOCKS * THREADS_PER_BLOCK),
        (buffer, radius, table, out, np.int64(rows), np.int64(dim),
         np.uint32(pack_level_bits(level_bits))),
        threads=THREADS_PER_BLOCK,
    )
    return out
