"""numba kernels of ScalarQuant: one pass per group of rows, min/max -> fp16 sides -> packed codes.

Each task reads its block of ``x`` once while it is in cache: the group minima and maxima,
the fp16 zero (rounded down) and scale (rounded up) of `latkv.scalar.scale_and_zero` computed
with exact float32 arithmetic (`latkv._cpu.float16`), then the codes of
`latkv.scalar.quantize` with the reference's float32 operations in its order, packed
LSB-first. Codes, scales and zeros are bit-identical to the NumPy reference.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from latkv._cpu.float16 import (
    FLOAT16_MAX,
    float16_bits,
    next_float16_up,
    round_down_float16,
    round_up_float16,
)
from latkv._cpu.serial import kernel_for
from latkv.packing import packed_length

#: kernel status bits, raised as the reference's errors by `encode`
VALUE_BEYOND_FLOAT16 = 1
RANGE_BEYOND_FLOAT16 = 2


@njit(inline="always")
def _side(smallest, largest, levels):
    """fp16 (zero, scale) of a group as exact float32 values, and the status bits."""
    status = 0
    if smallest < -FLOAT16_MAX or largest > FLOAT16_MAX:
        status |= VALUE_BEYOND_FLOAT16
    # signed zeros become +0.0, as in the reference
    zero = round_down_float16(smallest + np.float32(0.0))
    span = (largest + np.float32(0.0)) - zero
    scale = round_up_float16(span / levels)
    if scale * levels < span:  # the division rounded the step down
        scale = next_float16_up(scale)
    if scale > FLOAT16_MAX:
        status |= RANGE_BEYOND_FLOAT16
    return zero, scale, status


@njit(inline="always")
def _quantize_row(x, zero, step, levels, codes):
    """``codes = clip(rint((x - zero) / step), 0, levels)`` elementwise (step 0 already 1)."""
    for j in range(x.shape[0]):
        code = np.rint((x[j] - zero[j]) / step[j])
        codes[j] = np.uint8(min(max(code, np.float32(0.0)), levels))


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
def _encode_token(x, bits, group, n_groups, n_bytes):
    """Per-token groups: ``x (rows, dim)`` -> packed, scale bits, zero bits, status per task."""
    rows, dim = x.shape
    levels = np.float32((1 << bits) - 1)
    packed = np.empty((rows, n_bytes), np.uint8)  # _pack_row writes every byte
    scale_bits = np.empty((rows, n_groups), np.uint16)
    zero_bits = np.empty((rows, n_groups), np.uint16)
    tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    status = np.zeros(tasks, np.int32)
    for task in prange(tasks):
        codes = np.empty(dim, np.uint8)
        zero_row = np.empty(dim, np.float32)
        step_row = np.empty(dim, np.float32)
        task_status = 0
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            for g in range(n_groups):
                low = g * group
                high = min(low + group, dim)
                smallest = x[r, low]
                largest = x[r, low]
                for j in range(low + 1, high):
                    value = x[r, j]
                    smallest = min(smallest, value)
                    largest = max(largest, value)
                zero, scale, flags = _side(smallest, largest, levels)
                task_status |= flags
                zero_bits[r, g] = float16_bits(zero) if flags == 0 else np.uint16(0)
                scale_bits[r, g] = float16_bits(scale) if flags == 0 else np.uint16(0)
                step = scale if scale != np.float32(0.0) else np.float32(1.0)
                for j in range(low, high):
                    zero_row[j] = zero
                    step_row[j] = step
            _quantize_row(x[r], zero_row, step_row, levels, codes)
            _pack_row(codes, bits, packed[r])
        status[task] = task_status
    return packed, scale_bits, zero_bits, status


@njit(parallel=True, cache=True)
def _encode_channel(x, bits, group, n_groups, n_bytes):
    """Per-channel groups of ``group`` tokens: ``x (lead, tokens, dim)``."""
    lead, tokens, dim = x.shape
    levels = np.float32((1 << bits) - 1)
    packed = np.empty((lead, tokens, n_bytes), np.uint8)
    scale_bits = np.empty((lead, n_groups, dim), np.uint16)
    zero_bits = np.empty((lead, n_groups, dim), np.uint16)
    status = np.zeros(lead * n_groups, np.int32)
    for task in prange(lead * n_groups):
        block = task // n_groups
        t = task % n_groups
        low = t * group
        high = min(low + group, tokens)
        codes = np.empty(dim, np.uint8)
        smallest = x[block, low].copy()
        largest = x[block, low].copy()
        for i in range(low + 1, high):
            for j in range(dim):
                value = x[block, i, j]
                smallest[j] = min(smallest[j], value)
                largest[j] = max(largest[j], value)
        zero_row = np.empty(dim, np.float32)
        step_row = np.empty(dim, np.float32)
        task_status = 0
        for j in range(dim):
            zero, scale, flags = _side(smallest[j], largest[j], levels)
            task_status |= flags
            zero_bits[block, t, j] = float16_bits(zero) if flags == 0 else np.uint16(0)
            scale_bits[block, t, j] = float16_bits(scale) if flags == 0 else np.uint16(0)
            zero_row[j] = zero
            step_row[j] = scale if scale != np.float32(0.0) else np.float32(1.0)
        for i in range(low, high):
            _quantize_row(x[block, i], zero_row, step_row, levels, codes)
            _pack_row(codes, bits, packed[block, i])
        status[task] = task_status
    return packed, scale_bits, zero_bits, status


@njit(parallel=True, cache=True)
def _unpack_dequantize(packed, scale, zero, side_row, side_column, bits, dim):
    rows = packed.shape[0]
    out = np.empty((rows, dim), np.float32)
    tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(tasks):
        codes = np.empty(dim, np.uint8)
        scale_row = np.empty(dim, np.float32)
        zero_row = np.empty(dim, np.float32)
        previous = -1
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            _unpack_row(packed[r], bits, codes)
            g_row = side_row[r]
            if g_row != previous:
                for j in range(dim):
                    scale_row[j] = scale[g_row, side_column[j]]
                    zero_row[j] = zero[g_row, side_column[j]]
                previous = g_row
            for j in range(dim):
                out[r, j] = np.float32(codes[j]) * scale_row[j] + zero_row[j]
    return out


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


def _flat_sides(side):
    """(..., G) or (..., T, dim) per-group arrays as 2-D float32 (side rows, side columns)."""
    side = np.ascontiguousarray(side, dtype=np.float32)
    return side.reshape(-1, side.shape[-1])


def encode(x, bits, group, axis):
    """``x : (..., dim)`` C-contiguous finite float32 -> (packed uint8, scale fp16, zero fp16).

    Raises the reference's ``ValueError`` (`latkv.scalar.scale_and_zero`) for values or group
    ranges beyond float16.
    """
    from latkv.scalar import FLOAT16_RANGE_ERROR, FLOAT16_VALUE_ERROR

    shape = x.shape
    dim = shape[-1]
    n_bytes = packed_length(dim, bits)
    if axis == "token":
        n_groups = -(-dim // group)
        packed, scale, zero, status = kernel_for(_encode_token, x.size)(
            x.reshape(-1, dim), bits, group, n_groups, n_bytes)
        side_shape = (*shape[:-1], n_groups)
    else:
        tokens = shape[-2]
        n_groups = -(-tokens // group)
        packed, scale, zero, status = kernel_for(_encode_channel, x.size)(
            x.reshape(-1, tokens, dim), bits, group, n_groups, n_bytes)
        side_shape = (*shape[:-2], n_groups, dim)
    flags = int(np.bitwise_or.reduce(status)) if status.size else 0
    if flags & VALUE_BEYOND_FLOAT16:
        raise ValueError(FLOAT16_VALUE_ERROR)
    if flags & RANGE_BEYOND_FLOAT16:
        raise ValueError(FLOAT16_RANGE_ERROR)
    return (packed.reshape(*shape[:-1], n_bytes), scale.view(np.float16).reshape(side_shape),
            zero.view(np.float16).reshape(side_shape))


def decode(packed, scale, zero, bits, dim, group, axis):
    """Inverse of `encode` up to quantization: float32 ``(..., dim)``."""
    shape = (*packed.shape[:-1], dim)
    side_row, side_column = _side_indices(shape, group, axis)
    packed2 = np.ascontiguousarray(packed).reshape(-1, packed.shape[-1])
    out = kernel_for(_unpack_dequantize, packed2.size * 8)(
        packed2, _flat_sides(scale), _flat_sides(zero), side_row, side_column, bits, dim)
    return out.reshape(shape)
