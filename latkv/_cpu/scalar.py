"""numba kernels of ScalarQuant: group min/max, then quantize fused with LSB-first packing.

The fp16 rounding of scale and zero is shared with the reference
(`latkv.scalar.scale_and_zero`, NumPy on the small per-group arrays); the per-element
arithmetic here repeats the reference's float32 operations in the same order, so the codes
are bit-identical.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from latkv.packing import packed_length


@njit(parallel=True, cache=True)
def _token_min_max(x, group, n_groups):
    rows, dim = x.shape
    minimum = np.empty((rows, n_groups), np.float32)
    maximum = np.empty((rows, n_groups), np.float32)
    for r in prange(rows):
        for g in range(n_groups):
            low = g * group
            high = min(low + group, dim)
            smallest = x[r, low]
            largest = x[r, low]
            for j in range(low + 1, high):
                value = x[r, j]
                if value < smallest:
                    smallest = value
                if value > largest:
                    largest = value
            minimum[r, g] = smallest
            maximum[r, g] = largest
    return minimum, maximum


@njit(parallel=True, cache=True)
def _channel_min_max(x, group, n_groups):
    lead, tokens, dim = x.shape
    minimum = np.empty((lead, n_groups, dim), np.float32)
    maximum = np.empty((lead, n_groups, dim), np.float32)
    for index in prange(lead * n_groups):
        block = index // n_groups
        t = index % n_groups
        low = t * group
        high = min(low + group, tokens)
        for j in range(dim):
            minimum[block, t, j] = x[block, low, j]
            maximum[block, t, j] = x[block, low, j]
        for i in range(low + 1, high):
            for j in range(dim):
                value = x[block, i, j]
                if value < minimum[block, t, j]:
                    minimum[block, t, j] = value
                if value > maximum[block, t, j]:
                    maximum[block, t, j] = value
    return minimum, maximum


@njit(inline="always")
def _pack_row(codes, bits, out):
    """LSB-first packing of one row of codes: 8 codes -> one 64-bit word -> ``bits`` bytes."""
    n = codes.shape[0]
    full = n // 8
    for word_index in range(full):
        word = np.uint64(0)
        for k in range(8):
            word |= np.uint64(codes[word_index * 8 + k]) << np.uint64(k * bits)
        for byte in range(bits):
            out[word_index * bits + byte] = np.uint8((word >> np.uint64(8 * byte)) & np.uint64(255))
    word = np.uint64(0)
    for k in range(n - full * 8):
        word |= np.uint64(codes[full * 8 + k]) << np.uint64(k * bits)
    for byte in range(out.shape[0] - full * bits):
        out[full * bits + byte] = np.uint8((word >> np.uint64(8 * byte)) & np.uint64(255))


@njit(inline="always")
def _unpack_row(packed, bits, codes):
    """Inverse of `_pack_row`."""
    n = codes.shape[0]
    full = n // 8
    mask = np.uint64((1 << bits) - 1)
    for word_index in range(full + 1):
        word = np.uint64(0)
        for byte in range(bits):
            position = word_index * bits + byte
            if position < packed.shape[0]:
                word |= np.uint64(packed[position]) << np.uint64(8 * byte)
        for k in range(min(8, n - word_index * 8)):
            codes[word_index * 8 + k] = np.uint8((word >> np.uint64(k * bits)) & mask)


ROWS_PER_TASK = 256


@njit(parallel=True, cache=True)
def _quantize_pack(x, scale, zero, side_row, side_column, bits, n_bytes):
    """Quantize rows of ``x (rows, dim)``; element (r, j) uses ``scale[side_row[r], side_column[j]]``.

    The float32 operations are the reference's (`latkv.scalar.quantize`) in its order.
    """
    rows, dim = x.shape
    packed = np.zeros((rows, n_bytes), np.uint8)
    levels = np.float32((1 << bits) - 1)
    tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(tasks):
        codes = np.empty(dim, np.uint8)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            g_row = side_row[r]
            for j in range(dim):
                g_column = side_column[j]
                step = scale[g_row, g_column]
                if step == np.float32(0.0):
                    step = np.float32(1.0)
                code = np.rint((x[r, j] - zero[g_row, g_column]) / step)
                code = min(max(code, np.float32(0.0)), levels)
                codes[j] = np.uint8(code)
            _pack_row(codes, bits, packed[r])
    return packed


@njit(parallel=True, cache=True)
def _unpack_dequantize(packed, scale, zero, side_row, side_column, bits, dim):
    rows = packed.shape[0]
    out = np.empty((rows, dim), np.float32)
    tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(tasks):
        codes = np.empty(dim, np.uint8)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            _unpack_row(packed[r], bits, codes)
            g_row = side_row[r]
            for j in range(dim):
                g_column = side_column[j]
                out[r, j] = np.float32(codes[j]) * scale[g_row, g_column] + zero[g_row, g_column]
    return out


# Small inputs run the same kernels compiled without threads: launching the parallel pool costs
# more than the work below this many elements (and much more on a busy machine).
SERIAL_BELOW = 1 << 16
_serial = {}


def _kernel(function, elements):
    if elements >= SERIAL_BELOW:
        return function
    if function not in _serial:
        _serial[function] = njit(cache=True)(function.py_func)
    return _serial[function]


def _side_indices(shape, group, axis):
    """Row -> side row and column -> side column maps for the flattened (rows, dim) view."""
    dim = shape[-1]
    if axis == "token":
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        return np.arange(rows, dtype=np.int64), np.arange(dim, dtype=np.int64) // group
    tokens = shape[-2]
    lead = int(np.prod(shape[:-2], dtype=np.int64))
    n_groups = -(-tokens // group)
    token_group = np.arange(tokens, dtype=np.int64) // group
    side_row = (np.arange(lead, dtype=np.int64)[:, None] * n_groups + token_group).reshape(-1)
    return side_row, np.arange(dim, dtype=np.int64)


def _flat_sides(side, axis):
    """(..., G) or (..., T, dim) per-group arrays as 2-D float32 (side rows, side columns)."""
    side = np.ascontiguousarray(side, dtype=np.float32)
    return side.reshape(-1, side.shape[-1])


def encode(x, bits, group, axis):
    """``x : (..., dim)`` C-contiguous float32 -> (packed uint8, scale fp16, zero fp16)."""
    from latkv.scalar import scale_and_zero

    shape = x.shape
    dim = shape[-1]
    if axis == "token":
        n_groups = -(-dim // group)
        minimum, maximum = _kernel(_token_min_max, x.size)(x.reshape(-1, dim), group, n_groups)
        side_shape = (*shape[:-1], n_groups)
    else:
        tokens = shape[-2]
        n_groups = -(-tokens // group)
        minimum, maximum = _kernel(_channel_min_max, x.size)(x.reshape(-1, tokens, dim), group, n_groups)
        side_shape = (*shape[:-2], n_groups, dim)
    scale, zero = scale_and_zero(minimum.reshape(side_shape), maximum.reshape(side_shape), bits)
    side_row, side_column = _side_indices(shape, group, axis)
    packed = _kernel(_quantize_pack, x.size)(x.reshape(-1, dim), _flat_sides(scale, axis),
                            _flat_sides(zero, axis), side_row, side_column, bits,
                            packed_length(dim, bits))
    return packed.reshape(*shape[:-1], -1), scale, zero


def decode(packed, scale, zero, bits, dim, group, axis):
    """Inverse of `encode` up to quantization: float32 ``(..., dim)``."""
    shape = (*packed.shape[:-1], dim)
    side_row, side_column = _side_indices(shape, group, axis)
    packed2 = np.ascontiguousarray(packed).reshape(-1, packed.shape[-1])
    out = _kernel(_unpack_dequantize, packed2.size * 8)(packed2, _flat_sides(scale, axis), _flat_sides(zero, axis),
                             side_row, side_column, bits, dim)
    return out.reshape(shape)
