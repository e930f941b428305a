"""CPU fast path of bit packing: numba kernels, bit-exact with `latkv.packing`.

Eight codes of ``bits`` bits fill exactly ``bits`` bytes, so a row is cut into groups of
eight codes that are packed independently: the eight code bytes are read as one
little-endian ``uint64`` word and squeezed together in three shift-and-mask steps (pairs of
bytes into 16-bit lanes of ``2 * bits`` bits, pairs of those into 32-bit lanes, then the two
halves), after which the low ``bits`` bytes of the word are the packed bytes. Unpacking runs
the same steps backwards. The last ``n % 8`` codes of a row (the tail) are packed code by
code. Rows are spread over threads with ``prange``.

The kernel body is written once (``_pack_row`` / ``_unpack_row``, inlined) and called from a
branch per bit width with a literal ``bits``, so that LLVM sees constant shifts and masks and
fixed-length byte loops for each of the eight widths.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_BYTE_LANES = np.uint64(0x00FF00FF00FF00FF)
_SHORT_LANES = np.uint64(0x0000FFFF0000FFFF)
_WORD_LANES = np.uint64(0x00000000FFFFFFFF)


@njit(inline="always", cache=True)
def _lane_masks(bits):
    """Masks of the low ``bits``, ``2 * bits`` and ``4 * bits`` bits of every 16-, 32- and
    64-bit lane (the layout after each squeeze step)."""
    one = np.uint64(1)
    width = np.uint64(bits)
    low = (one << width) - one
    low2 = (one << (np.uint64(2) * width)) - one
    low4 = (one << (np.uint64(4) * width)) - one
    mask_16 = low | (low << np.uint64(16)) | (low << np.uint64(32)) | (low << np.uint64(48))
    mask_32 = low2 | (low2 << np.uint64(32))
    mask_64 = low4
    return mask_16, mask_32, mask_64


@njit(inline="always", cache=True)
def _pack_row(codes, packed, row, bits):
    """Pack ``codes[row]`` into ``packed[row]`` (both C-contiguous 2-D uint8)."""
    n = codes.shape[1]
    width = np.uint64(bits)
    shift_8 = np.uint64(8 - bits)
    shift_16 = np.uint64(16 - 2 * bits)
    shift_32 = np.uint64(32 - 4 * bits)
    full_groups = n // 8
    for group in range(full_groups):
        start = group * 8
        word = np.uint64(0)
        for k in range(8):
            word |= np.uint64(codes[row, start + k]) << np.uint64(8 * k)
        # bytes -> 16-bit lanes of 2*bits bits -> 32-bit lanes of 4*bits bits -> 8*bits bits
        word = (word & _BYTE_LANES) | ((word & ~_BYTE_LANES) >> shift_8)
        word = (word & _SHORT_LANES) | ((word & ~_SHORT_LANES) >> shift_16)
        word = (word & _WORD_LANES) | ((word & ~_WORD_LANES) >> shift_32)
        out = group * bits
        for k in range(bits):
            packed[row, out + k] = np.uint8((word >> np.uint64(8 * k)) & np.uint64(0xFF))
    tail = n - full_groups * 8
    if tail > 0:
        start = full_groups * 8
        word = np.uint64(0)
        for k in range(tail):
            word |= np.uint64(codes[row, start + k]) << (np.uint64(k) * width)
        out = full_groups * bits
        for k in range((tail * bits + 7) // 8):
            packed[row, out + k] = np.uint8((word >> np.uint64(8 * k)) & np.uint64(0xFF))


@njit(inline="always", cache=True)
def _unpack_row(packed, codes, row, bits):
    """Unpack ``packed[row]`` into ``codes[row]`` (both C-contiguous 2-D uint8)."""
    n = codes.shape[1]
    width = np.uint64(bits)
    shift_8 = np.uint64(8 - bits)
    shift_16 = np.uint64(16 - 2 * bits)
    shift_32 = np.uint64(32 - 4 * bits)
    mask_16, mask_32, mask_64 = _lane_masks(bits)
    code_mask = (np.uint64(1) << width) - np.uint64(1)
    full_groups = n // 8
    for group in range(full_groups):
        start = group * bits
        word = np.uint64(0)
        for k in range(bits):
            word |= np.uint64(packed[row, start + k]) << np.uint64(8 * k)
        # 8*bits bits -> 32-bit lanes of 4*bits bits -> 16-bit lanes of 2*bits -> bytes of bits
        word = (word & mask_64) | ((word & ~mask_64) << shift_32)
        word = (word & mask_32) | ((word & ~mask_32) << shift_16)
        word = (word & mask_16) | ((word & ~mask_16) << shift_8)
        out = group * 8
        for k in range(8):
            codes[row, out + k] = np.uint8((word >> np.uint64(8 * k)) & np.uint64(0xFF))
    tail = n - full_groups * 8
    if tail > 0:
        start = full_groups * bits
        word = np.uint64(0)
        for k in range((tail * bits + 7) // 8):
            word |= np.uint64(packed[row, start + k]) << np.uint64(8 * k)
        out = full_groups * 8
        for k in range(tail):
            codes[row, out + k] = np.uint8((word >> (np.uint64(k) * width)) & code_mask)


@njit(parallel=True, cache=True)
def _pack_rows(codes, packed, bits):
    rows = codes.shape[0]
    # one branch per width with a literal bits: constant shifts and loop counts in each
    if bits == 1:
        for row in prange(rows):
            _pack_row(codes, packed, row, 1)
    elif bits == 2:
        for row in prange(rows):
            _pack_row(codes, packed, row, 2)
    elif bits == 3:
        for row in prange(rows):
            _pack_row(codes, packed, row, 3)
    elif bits == 4:
        for row in prange(rows):
            _pack_row(codes, packed, row, 4)
    elif bits == 5:
        for row in prange(rows):
            _pack_row(codes, packed, row, 5)
    elif bits == 6:
        for row in prange(rows):
            _pack_row(codes, packed, row, 6)
    elif bits == 7:
        for row in prange(rows):
            _pack_row(codes, packed, row, 7)
    else:
        for row in prange(rows):
            _pack_row(codes, packed, row, 8)


@njit(parallel=True, cache=True)
def _unpack_rows(packed, codes, bits):
    rows = codes.shape[0]
    if bits == 1:
        for row in prange(rows):
            _unpack_row(packed, codes, row, 1)
    elif bits == 2:
        for row in prange(rows):
            _unpack_row(packed, codes, row, 2)
    elif bits == 3:
        for row in prange(rows):
            _unpack_row(packed, codes, row, 3)
    elif bits == 4:
        for row in prange(rows):
            _unpack_row(packed, codes, row, 4)
    elif bits == 5:
        for row in prange(rows):
            _unpack_row(packed, codes, row, 5)
    elif bits == 6:
        for row in prange(rows):
            _unpack_row(packed, codes, row, 6)
    elif bits == 7:
        for row in prange(rows):
            _unpack_row(packed, codes, row, 7)
    else:
        for row in prange(rows):
            _unpack_row(packed, codes, row, 8)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``bits``-bit codes along the last axis, LSB-first (numba backend).

    Parameters
    ----------
    codes : (..., n) uint8 ndarray
        Already checked by `latkv.pack_bits`: values below ``2**bits``. Any strides.
    bits : int
        Bits per code, 1..8.

    Returns
    -------
    packed : (..., ceil(n * bits / 8)) uint8 ndarray
        Byte-identical to `latkv.packing.pack_bits_reference`.
    """
    *lead, n = codes.shape
    packed_length = (n * bits + 7) // 8
    codes_2d = np.ascontiguousarray(codes).reshape(-1, n) if n else None
    packed = np.empty((*lead, packed_length), dtype=np.uint8)
    if codes_2d is not None and codes_2d.shape[0] > 0:
        _pack_rows(codes_2d, packed.reshape(-1, packed_length), int(bits))
    return packed


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Unpack ``n`` codes of ``bits`` bits per row (numba backend).

    Parameters
    ----------
    packed : (..., ceil(n * bits / 8)) uint8 ndarray
        Already checked by `latkv.unpack_bits`. Any strides.
    bits : int
        Bits per code, 1..8.
    n : int
        Codes per row.

    Returns
    -------
    codes : (..., n) uint8 ndarray
        Byte-identical to `latkv.packing.unpack_bits_reference`.
    """
    *lead, packed_length = packed.shape
    codes = np.empty((*lead, n), dtype=np.uint8)
    if n and codes.size:
        packed_2d = np.ascontiguousarray(packed).reshape(-1, packed_length)
        _unpack_rows(packed_2d, codes.reshape(-1, n), int(bits))
    return codes
