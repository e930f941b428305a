"""Second GPU implementation of PolarQuant's encode and decode kernels: numba.cuda kernels.

Same operations, same results as ``cuda_kernels/polar.cu`` (references:
`latkv.polar.polar_quantize_reference`, `latkv.polar.polar_dequantize_reference`, same
signatures), with the same work split:

``polar_quantize``
    One thread per (row, group of ``G`` consecutive blocks of ``2^levels`` coordinates), ``G``
    the smallest power of two for which every level's codes of ``G`` blocks fill whole bytes
    (`latkv._gpu.cupy_polar.group_blocks`), so no two threads write the same byte. Per block,
    in float64: the level-1 angles ``atan2(b, a)`` (plus ``2 pi`` when negative) and squared
    radii ``a*a + b*b`` of the coordinate pairs, then per level the angles
    ``atan2(sqrt(s2), sqrt(s1))`` and sums ``s1 + s2`` of pairs of squared radii, in a local
    array; each code (a binary search over the level's boundaries in shared memory) is
    appended LSB-first to the level's bit stream and every full byte is stored. A fused
    multiply-add in ``a*a + b*b`` cannot change it: ``a*a`` and ``b*b`` are exact in float64
    for float32 ``a``, ``b``. Square roots and sums are IEEE, so the radii are bit-identical to
    the reference; ``math.atan2`` is libdevice's on a GPU (within 2 ulp of the host libm's), so
    a code can only differ for an angle within about ``1e-16`` of a boundary. In the simulator
    it is the host libm's, as NumPy's.
``polar_dequantize``
    One thread per (row, block): from the block radius down, each radius ``r`` of level
    ``l = levels .. 2`` splits into ``(r cos psi, r sin psi)`` in a local array, at level 1
    into ``(r cos theta, r sin theta)`` written as float32; angles are centroids read from
    shared memory by the codes of the packed rows. Equal to the reference up to the ulps of
    ``sin`` / ``cos``.

``levels`` (1..8) and the code widths are kernel arguments (a small ``(levels, 3)`` table of
width, table offset and byte offset per level), so one compiled kernel serves every
configuration. The per-level tables are concatenated into one float64 array and the packed
codes of all levels share one ``(n, total_bytes)`` buffer, split into (or assembled from) the
per-level arrays on the host side. NumPy inputs are copied to the device and back (this is how
the kernels run in the simulator, ``NUMBA_ENABLE_CUDASIM=1``) and give NumPy results; CuPy
inputs (or anything else exposing ``__cuda_array_interface__``) stay on the device, run on
CuPy's current stream and give CuPy results.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# numba.cuda must be a module global: the CUDA simulator swaps the kernel's global ``cuda``.
from numba import cuda, float32, float64, int64

from latkv._gpu.cuda_sources import MAX_POLAR_LEVELS
from latkv._gpu.numba_launch import DeviceArrays, grid_blocks
from latkv._gpu.cupy_polar import (
    check_dim,
    check_levels,
    concat_tables,
    group_blocks,
    level_lengths,
)

MAX_LEVELS = MAX_POLAR_LEVELS
# Radii a thread keeps: half a block of 2**MAX_LEVELS coordinates.
MAX_HALF = 1 << (MAX_LEVELS - 1)
# Shared-memory table of all levels' centroids / boundaries: at most 2**8 per level.
MAX_TABLE = MAX_LEVELS * 256
# 2 * numpy.pi, the reference's TWO_PI
TWO_PI = 2 * math.pi


@cuda.jit(device=True)
def _cell(angle, edges, offset, bits):
    """``#{edges[offset + i] < angle}`` over ``2**bits - 1`` increasing edges; NaN -> last."""
    if math.isnan(angle):
        return (1 << bits) - 1
    code = 0
    step = 1 << (bits - 1)
    while step > 0:
        if edges[offset + code + step - 1] < angle:  # code + step - 1 <= 2**bits - 2
            code += step
        step >>= 1
    return code


@cuda.jit(device=True)
def _put(packed, row, word, fill, position, level, code, bits):
    """Append ``code`` to level ``level``'s bit stream; store the bytes it completes."""
    word[level] |= code << fill[level]
    fill[level] += bits
    while fill[level] >= 8:
        packed[row, position[level]] = word[level] & 0xFF
        word[level] >>= 8
        fill[level] -= 8
        position[level] += 1


@cuda.jit(device=True)
def _code_at(packed, row, start, j, bits):
    """Code ``j`` of the bits-bit codes packed from byte ``start`` of ``packed[row]``."""
    bit = j * bits
    byte = start + (bit >> 3)
    shift = bit & 7
    value = int(packed[row, byte]) >> shift
    if shift + bits > 8:  # the code continues in the next byte
        value |= int(packed[row, byte + 1]) << (8 - shift)
    return value & ((1 << bits) - 1)


@cuda.jit
def _quantize_kernel(rotated, boundaries, layout, packed, radius, group):
    edges = cuda.shared.array(MAX_TABLE, float64)
    for i in range(cuda.threadIdx.x, boundaries.shape[0], cuda.blockDim.x):
        edges[i] = boundaries[i]
    cuda.syncthreads()
    word = cuda.local.array(MAX_LEVELS, int64)
    fill = cuda.local.array(MAX_LEVELS, int64)
    position = cuda.local.array(MAX_LEVELS, int64)
    squared = cuda.local.array(MAX_HALF, float64)
    levels = layout.shape[0]
    block = 1 << levels
    half = block >> 1
    rows = rotated.shape[0]
    blocks_per_row = radius.shape[1]
    groups_per_row = (blocks_per_row + group - 1) // group
    total = rows * groups_per_row
    index = cuda.grid(1)
    stride = cuda.gridsize(1)
    while index < total:
        row = index // groups_per_row
        first = (index - row * groups_per_row) * group
        count = min(group, blocks_per_row - first)
        for level in range(levels):
            word[level] = 0
            fill[level] = 0
            # first is a multiple of group: the level's bits before it fill whole bytes
            position[level] = layout[level, 2] + first * (half >> level) * layout[level, 0] // 8
        for k in range(count):
            base = (first + k) * block
            bits = layout[0, 0]
            offset = layout[0, 1]
            for i in range(half):  # level 1: pairs of coordinates
                a = float64(rotated[row, base + 2 * i])
                b = float64(rotated[row, base + 2 * i + 1])
                theta = math.atan2(b, a)
                if theta < 0:
                    theta += TWO_PI
                _put(packed, row, word, fill, position, 0, _cell(theta, edges, offset, bits),
                     bits)
                squared[i] = a * a + b * b
            angles = half
            for level in range(1, levels):  # levels >= 2: pairs of squared radii
                angles >>= 1
                bits = layout[level, 0]
                offset = layout[level, 1]
                for i in range(angles):
                    s1 = squared[2 * i]
                    s2 = squared[2 * i + 1]
                    psi = math.atan2(math.sqrt(s2), math.sqrt(s1))
                    _put(packed, row, word, fill, position, level,
                         _cell(psi, edges, offset, bits), bits)
                    squared[i] = s1 + s2  # i < 2i: already read
            radius[row, first + k] = math.sqrt(squared[0])
        for level in range(levels):  # the last partial byte: only the tail group of a row
            if fill[level] > 0:
                packed[row, position[level]] = word[level] & 0xFF
        index += stride


@cuda.jit
def _dequantize_kernel(packed, radius, centroids, layout, out):
    points = cuda.shared.array(MAX_TABLE, float64)
    for i in range(cuda.threadIdx.x, centroids.shape[0], cuda.blockDim.x):
        points[i] = centroids[i]
    cuda.syncthreads()
    r = cuda.local.array(MAX_HALF, float64)
    levels = layout.shape[0]
    block = 1 << levels
    half = block >> 1
    rows = out.shape[0]
    blocks_per_row = radius.shape[1]
    total = rows * blocks_per_row
    index = cuda.grid(1)
    stride = cuda.gridsize(1)
    while index < total:
        row = index // blocks_per_row
        column = index - row * blocks_per_row
        r[0] = radius[row, column]
        angles = 1
        for level in range(levels - 1, 0, -1):  # levels L .. 2: each radius splits in two
            bits = layout[level, 0]
            offset = layout[level, 1]
            start = layout[level, 2]
            for i in range(angles - 1, -1, -1):  # backwards: 2i, 2i + 1 >= i
                psi = points[offset + _code_at(packed, row, start, column * angles + i, bits)]
                ri = r[i]
                r[2 * i] = ri * math.cos(psi)
                r[2 * i + 1] = ri * math.sin(psi)
            angles *= 2
        bits = layout[0, 0]
        offset = layout[0, 1]
        start = layout[0, 2]
        base = column * block
        for i in range(half):  # level 1: each radius gives a pair of coordinates
            theta = points[offset + _code_at(packed, row, start, column * half + i, bits)]
            out[row, base + 2 * i] = float32(r[i] * math.cos(theta))
            out[row, base + 2 * i + 1] = float32(r[i] * math.sin(theta))
        index += stride


# ---------------------------------------------------------------- host side


def _layout(dim: int, level_bits: tuple[int, ...], table_sizes: list[int]) -> np.ndarray:
    """``(levels, 3)`` int64: per level its width, table offset and byte offset in a row."""
    lengths = level_lengths(dim, level_bits)
    return np.array([(bits, sum(table_sizes[:level]), sum(lengths[:level]))
                     for level, bits in enumerate(level_bits)], dtype=np.int64)


def polar_quantize(rotated: Any, levels: int, level_bits: tuple[int, ...],
                   boundaries: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any]:
    """Codes of every level and the block radii of rotated vectors (numba.cuda kernel).

    Parameters
    ----------
    rotated : (n, d) float32, NumPy or on the GPU (CuPy or ``__cuda_array_interface__``)
        Preconditioned vectors; ``d`` a multiple of ``2^levels``.
    levels : int
        1..8.
    level_bits : tuple of int
        Bits per angle at each level, 1..8.
    boundaries : tuple of (2**bits - 1,) float64
        Increasing angle boundaries per level; a code is ``sum(boundaries < angle)``.

    Returns
    -------
    packed : tuple of (n, ceil((d >> l) * b_l / 8)) uint8
        Level ``l``'s codes in block order, packed as `latkv.pack_bits` does; contiguous.
    radius : (n, d >> levels) float64
        Block norms, bit-identical to `latkv.polar.polar_quantize_reference`.

    NumPy for NumPy input (copied to the device and back), else CuPy. The codes equal the
    reference's except for an angle within about ``1e-16`` of a boundary, where the GPU's
    ``atan2`` and the host libm's may round to different sides (random data: identical bytes).
    """
    levels, level_bits = check_levels(levels, level_bits)
    arrays = DeviceArrays(rotated)
    rotated = arrays.put(rotated, np.float32)
    if rotated.ndim != 2:
        raise ValueError(f"rotated must be 2-D (n, d), got shape {tuple(rotated.shape)}")
    rows, dim = (int(s) for s in rotated.shape)
    check_dim(dim, levels)
    sizes = [(1 << b) - 1 for b in level_bits]
    table = concat_tables(arrays.xp, boundaries, sizes, "boundaries")
    layout = arrays.put(_layout(dim, level_bits, sizes), np.int64)
    lengths = level_lengths(dim, level_bits)
    buffer = arrays.empty((rows, sum(lengths)), np.uint8)
    radius = arrays.empty((rows, dim >> levels), np.float64)
    group = group_blocks(levels, level_bits)
    if radius.size:
        arrays.launch(_quantize_kernel, grid_blocks(rows * -(-(dim >> levels) // group)),
                      (rotated, table, layout), (buffer, radius), (group,))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(int).tolist()
    packed = tuple(arrays.xp.ascontiguousarray(buffer[:, start:stop])
                   for start, stop in zip(offsets[:-1], offsets[1:]))
    return packed, radius


def polar_dequantize(packed: tuple[Any, ...], radius: Any, levels: int,
                     level_bits: tuple[int, ...], centroids: tuple[Any, ...],
                     dim: int) -> Any:
    """The rotated-domain reconstruction ``(n, dim)`` float32 (numba.cuda kernel).

    Parameters
    ----------
    packed : tuple of (n, ceil((dim >> l) * b_l / 8)) uint8, NumPy or on the GPU
        Per-level codes as `polar_quantize` returns them; padding bits are ignored.
    radius : (n, dim >> levels)
        Block radii, float64 or the stored float16 / float32 (converted to float64).
    levels : int
        1..8.
    level_bits : tuple of int
    centroids : tuple of (2**bits,) float64
        Angle centroids per level.
    dim : int
        A multiple of ``2^levels``.

    Returns
    -------
    (n, dim) float32
        NumPy for NumPy input, else CuPy. Computed in float64 and rounded once; equal to
        `latkv.polar.polar_dequantize_reference` up to the ulps of ``sin`` / ``cos``.
    """
    levels, level_bits = check_levels(levels, level_bits)
    dim = check_dim(dim, levels)
    arrays = DeviceArrays(radius)
    radius = arrays.put(radius, np.float64)
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
        codes = arrays.xp.ascontiguousarray(arrays.xp.asarray(codes))
        if codes.dtype != np.uint8:
            raise TypeError(f"packed level {level} must be uint8, got dtype {codes.dtype}")
        if tuple(codes.shape) != (rows, length):
            raise ValueError(f"packed level {level} must have shape ({rows}, {length}), got "
                             f"{tuple(codes.shape)}")
        parts.append(codes)
    sizes = [1 << b for b in level_bits]
    table = concat_tables(arrays.xp, centroids, sizes, "centroids")
    out = arrays.empty((rows, dim), np.float32)
    if out.size == 0:
        return out
    buffer = arrays.xp.ascontiguousarray(arrays.xp.concatenate(parts, axis=1))
    layout = arrays.put(_layout(dim, level_bits, sizes), np.int64)
    arrays.launch(_dequantize_kernel, grid_blocks(rows * (dim >> levels)),
                  (buffer, radius, table, layout), (out,), ())
    return out
