"""CPU fast path of bit packing: numba kernels, bit-exact with `latkv.packing`.

Eight codes of ``bits`` bits fill exactly ``bits`` bytes, so each row is cut into groups of
eight codes that are packed independently. The eight code bytes of a group, read as one
little-endian ``uint64`` word, are squeezed together in three shift-and-mask steps: pairs of
bytes into 16-bit lanes of ``2 * bits`` bits, pairs of those into 32-bit lanes of
``4 * bits`` bits, then the two halves, after which the low ``bits`` bytes of the word are the
packed bytes. Unpacking spreads them back with the same steps in reverse. For ``bits = 1`` a
single multiplication does the squeeze (and a multiply, mask and add the spread).

When ``n`` is a multiple of 8 (head dims are), the codes are read or written as a ``uint64``
view, one word per group. Otherwise each row is handled byte by byte: whole groups first,
then the last ``n % 8`` codes (the tail) into ``ceil((n % 8) * bits / 8)`` bytes. Rows are
spread over threads with ``prange``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_BYTE_LANES = np.uint64(0x00FF00FF00FF00FF)
_SHORT_LANES = np.uint64(0x0000FFFF0000FFFF)
_WORD_LANES = np.uint64(0x00000000FFFFFFFF)
# bit 0 of every byte; a byte times this is copied into every byte
_BYTE_ONES = np.uint64(0x0101010101010101)
# bit 0 of byte k times 2**(56 - 7k) lands on bit 56 + k: the eight bits gathered in the top byte
_GATHER_BITS = np.uint64(0x0102040810204080)
# bit k of byte k
_DIAGONAL_BITS = np.uint64(0x8040201008040201)
_SEVEN_BITS = np.uint64(0x7F7F7F7F7F7F7F7F)
_EMPTY_WORDS = np.empty((0, 0), dtype=np.uint64)


@njit(inline="always", cache=True)
def _squeeze(word, bits):
    """Eight codes of ``bits`` bits, one per byte of ``word``, into its low ``8 * bits`` bits."""
    word = (word & _BYTE_LANES) | ((word & ~_BYTE_LANES) >> np.uint64(8 - bits))
    word = (word & _SHORT_LANES) | ((word & ~_SHORT_LANES) >> np.uint64(16 - 2 * bits))
    return (word & _WORD_LANES) | ((word & ~_WORD_LANES) >> np.uint64(32 - 4 * bits))


@njit(inline="always", cache=True)
def _spread(word, bits):
    """Inverse of `_squeeze`: the low ``8 * bits`` bits of ``word`` into eight bytes."""
    one = np.uint64(1)
    width = np.uint64(bits)
    # masks of the low bits, 2*bits and 4*bits bits of every 16-, 32- and 64-bit lane
    low_1 = (one << width) - one
    low_2 = (one << (np.uint64(2) * width)) - one
    mask_64 = (one << (np.uint64(4) * width)) - one
    mask_32 = low_2 | (low_2 << np.uint64(32))
    mask_16 = low_1 | (low_1 << np.uint64(16)) | (low_1 << np.uint64(32)) | (low_1 << np.uint64(48))
    word = (word & mask_64) | ((word & ~mask_64) << np.uint64(32 - 4 * bits))
    word = (word & mask_32) | ((word & ~mask_32) << np.uint64(16 - 2 * bits))
    return (word & mask_16) | ((word & ~mask_16) << np.uint64(8 - bits))


@njit(inline="always", cache=True)
def _load_bytes(array, row, start, count):
    """Bytes ``array[row, start:start + count]`` (``count <= 8``) as a little-endian word."""
    word = np.uint64(0)
    for k in range(count):
        word |= np.uint64(array[row, start + k]) << np.uint64(8 * k)
    return word


@njit(inline="always", cache=True)
def _store_bytes(array, row, start, count, word):
    """The low ``count`` bytes of ``word`` into ``array[row, start:start + count]``."""
    for k in range(count):
        array[row, start + k] = np.uint8((word >> np.uint64(8 * k)) & np.uint64(0xFF))


@njit(parallel=True, cache=True)
def _pack_rows(codes, code_words, packed, bits):
    """Pack each row of ``codes`` (rows, n) into ``packed`` (rows, ceil(n * bits / 8)).

    ``code_words`` is ``codes`` viewed as (rows, n / 8) uint64 when ``n % 8 == 0``, else an
    empty array (then the bytes are read one by one).
    """
    rows, n = codes.shape
    full_groups = n // 8
    tail = n - 8 * full_groups
    width = np.uint64(bits)
    use_words = code_words.shape[0] == rows
    for row in prange(rows):
        if use_words and bits == 1:
            for group in range(full_groups):
                gathered = (code_words[row, group] * _GATHER_BITS) >> np.uint64(56)
                packed[row, group] = np.uint8(gathered)
        elif use_words:
            for group in range(full_groups):
                word = _squeeze(code_words[row, group], bits)
                _store_bytes(packed, row, group * bits, bits, word)
        else:
            for group in range(full_groups):
                word = _load_bytes(codes, row, group * 8, 8)
                if bits == 1:
                    packed[row, group] = np.uint8((word * _GATHER_BITS) >> np.uint64(56))
                else:
                    _store_bytes(packed, row, group * bits, bits, _squeeze(word, bits))
            if tail > 0:
                start = full_groups * 8
                word = np.uint64(0)
                for k in range(tail):
                    word |= np.uint64(codes[row, start + k]) << (np.uint64(k) * width)
                _store_bytes(packed, row, full_groups * bits, (tail * bits + 7) // 8, word)


@njit(parallel=True, cache=True)
def _unpack_rows(packed, codes, code_words, bits):
    """Unpack each row of ``packed`` (rows, ceil(n * bits / 8)) into ``codes`` (rows, n).

    ``code_words`` is ``codes`` viewed as (rows, n / 8) uint64 when ``n % 8 == 0``, else an
    empty array (then the codes are written one by one).
    """
    rows, n = codes.shape
    full_groups = n // 8
    tail = n - 8 * full_groups
    width = np.uint64(bits)
    code_mask = (np.uint64(1) << width) - np.uint64(1)
    use_words = code_words.shape[0] == rows
    for row in prange(rows):
        if use_words and bits == 1:
            for group in range(full_groups):
                diagonal = (np.uint64(packed[row, group]) * _BYTE_ONES) & _DIAGONAL_BITS
                # a nonzero byte (one bit set) plus 0x7F carries into its bit 7, never beyond
                code_words[row, group] = ((diagonal + _SEVEN_BITS) >> np.uint64(7)) & _BYTE_ONES
        elif use_words:
            for group in range(full_groups):
                code_words[row, group] = _spread(_load_bytes(packed, row, group * bits, bits), bits)
        else:
            for group in range(full_groups):
                if bits == 1:
                    diagonal = (np.uint64(packed[row, group]) * _BYTE_ONES) & _DIAGONAL_BITS
                    word = ((diagonal + _SEVEN_BITS) >> np.uint64(7)) & _BYTE_ONES
                else:
                    word = _spread(_load_bytes(packed, row, group * bits, bits), bits)
                _store_bytes(codes, row, group * 8, 8, word)
            if tail > 0:
                start = full_groups * bits
                word = _load_bytes(packed, row, start, (tail * bits + 7) // 8)
                for k in range(tail):
                    codes[row, full_groups * 8 + k] = np.uint8(
                        (word >> (np.uint64(k) * width)) & code_mask
                    )


def _word_view(array_2d: np.ndarray) -> np.ndarray:
    """``array_2d`` (rows, 8 * m) uint8, C-contiguous, as (rows, m) uint64; the empty
    placeholder when its rows are not whole words or it does not start 8-byte aligned."""
    if array_2d.shape[1] % 8 or array_2d.ctypes.data % 8:
        return _EMPTY_WORDS
    return array_2d.view(np.uint64)


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
    packed = np.empty((*lead, packed_length), dtype=np.uint8)
    if packed.size == 0:
        return packed
    codes_2d = np.ascontiguousarray(codes).reshape(-1, n)
    _pack_rows(codes_2d, _word_view(codes_2d), packed.reshape(-1, packed_length), int(bits))
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
    if codes.size == 0:
        return codes
    packed_2d = np.ascontiguousarray(packed).reshape(-1, packed_length)
    codes_2d = codes.reshape(-1, n)
    _unpack_rows(packed_2d, codes_2d, _word_view(codes_2d), int(bits))
    return codes
