"""Second GPU implementation of bit packing: numba.cuda kernels.

Same algorithm as ``cuda_kernels/pack_bits.cu``: one thread per (row, group of 8 codes);
the 8 code bytes are gathered into a ``uint64`` word and squeezed together in three
shift-and-mask steps (bytes -> 16-bit lanes of ``2 * bits`` bits -> 32-bit lanes of
``4 * bits`` bits -> ``8 * bits`` bits), and the low ``bits`` bytes are written; the last
``n % 8`` codes of a row (the tail) are packed code by code. Unpacking runs the steps
backwards. ``bits`` is a kernel argument, so one compiled kernel serves every width.

NumPy inputs are copied to the device and back (this is how the kernels run in the CUDA
simulator, ``NUMBA_ENABLE_CUDASIM=1``); CuPy inputs, or anything else exposing
``__cuda_array_interface__``, stay on the device and give CuPy outputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

THREADS_PER_BLOCK = 128

_BYTE_LANES = np.uint64(0x00FF00FF00FF00FF)
_SHORT_LANES = np.uint64(0x0000FFFF0000FFFF)
_WORD_LANES = np.uint64(0x00000000FFFFFFFF)


@cuda.jit
def _pack_kernel(codes, packed, bits):
    rows = codes.shape[0]
    n = codes.shape[1]
    groups_per_row = (n + 7) // 8
    total = rows * groups_per_row
    width = np.uint64(bits)
    shift_8 = np.uint64(8 - bits)
    shift_16 = np.uint64(16 - 2 * bits)
    shift_32 = np.uint64(32 - 4 * bits)
    index = cuda.grid(1)
    stride = cuda.gridsize(1)
    while index < total:
        row = index // groups_per_row
        group = index - row * groups_per_row
        start = group * 8
        out = group * bits
        remaining = n - start
        word = np.uint64(0)
        if remaining >= 8:
            for k in range(8):
                word |= np.uint64(codes[row, start + k]) << np.uint64(8 * k)
            word = (word & _BYTE_LANES) | ((word & ~_BYTE_LANES) >> shift_8)
            word = (word & _SHORT_LANES) | ((word & ~_SHORT_LANES) >> shift_16)
            word = (word & _WORD_LANES) | ((word & ~_WORD_LANES) >> shift_32)
            length = bits
        else:
            # tail: fewer than 8 codes, packed into ceil(remaining * bits / 8) bytes
            for k in range(remaining):
                word |= np.uint64(codes[row, start + k]) << (np.uint64(k) * width)
            length = (remaining * bits + 7) // 8
        for k in range(length):
            packed[row, out + k] = np.uint8((word >> np.uint64(8 * k)) & np.uint64(0xFF))
        index += stride


@cuda.jit
def _unpack_kernel(packed, codes, bits):
    rows = codes.shape[0]
    n = codes.shape[1]
    groups_per_row = (n + 7) // 8
    total = rows * groups_per_row
    one = np.uint64(1)
    width = np.uint64(bits)
    shift_8 = np.uint64(8 - bits)
    shift_16 = np.uint64(16 - 2 * bits)
    shift_32 = np.uint64(32 - 4 * bits)
    # masks of the low bits, 2*bits and 4*bits bits of every 16-, 32- and 64-bit lane
    low_1 = (one << width) - one
    low_2 = (one << (np.uint64(2) * width)) - one
    mask_64 = (one << (np.uint64(4) * width)) - one
    mask_32 = low_2 | (low_2 << np.uint64(32))
    mask_16 = low_1 | (low_1 << np.uint64(16)) | (low_1 << np.uint64(32)) | (low_1 << np.uint64(48))
    index = cuda.grid(1)
    stride = cuda.gridsize(1)
    while index < total:
        row = index // groups_per_row
        group = index - row * groups_per_row
        start = group * bits
        out = group * 8
        remaining = n - out
        word = np.uint64(0)
        if remaining >= 8:
            for k in range(bits):
                word |= np.uint64(packed[row, start + k]) << np.uint64(8 * k)
            word = (word & mask_64) | ((word & ~mask_64) << shift_32)
            word = (word & mask_32) | ((word & ~mask_32) << shift_16)
            word = (word & mask_16) | ((word & ~mask_16) << shift_8)
            for k in range(8):
                codes[row, out + k] = np.uint8((word >> np.uint64(8 * k)) & np.uint64(0xFF))
        else:
            for k in range((remaining * bits + 7) // 8):
                word |= np.uint64(packed[row, start + k]) << np.uint64(8 * k)
            for k in range(remaining):
                codes[row, out + k] = np.uint8((word >> (np.uint64(k) * width)) & low_1)
        index += stride


def _cupy_stream() -> Any:
    """CuPy's current stream for a numba launch, so that the kernel is ordered with CuPy work."""
    import cupy

    pointer = cupy.cuda.get_current_stream().ptr
    return cuda.external_stream(pointer) if pointer else 0


def _blocks(rows: int, n: int) -> int:
    """Blocks of ``THREADS_PER_BLOCK`` threads for one thread per (row, group of 8 codes)."""
    total = rows * ((n + 7) // 8)
    return (total + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK


def pack_bits(codes: Any, bits: int) -> Any:
    """Pack ``bits``-bit codes along the last axis, LSB-first (numba.cuda backend).

    Parameters
    ----------
    codes : (..., n) uint8 array, NumPy or on the GPU (CuPy or ``__cuda_array_interface__``)
        Already checked by `latkv.pack_bits`: values below ``2**bits``. Any strides.
    bits : int
        Bits per code, 1..8.

    Returns
    -------
    packed : (..., ceil(n * bits / 8)) uint8 array
        NumPy for NumPy input (copied to the device and back), else CuPy. Byte-identical to
        `latkv.packing.pack_bits_reference`.
    """
    *lead, n = codes.shape
    packed_length = (n * bits + 7) // 8
    if isinstance(codes, np.ndarray):
        packed = np.empty((*lead, packed_length), dtype=np.uint8)
        if n == 0 or packed.size == 0:
            return packed
        codes_device = cuda.to_device(np.ascontiguousarray(codes).reshape(-1, n))
        packed_device = cuda.device_array((codes_device.shape[0], packed_length), np.uint8)
        blocks = _blocks(codes_device.shape[0], n)
        _pack_kernel[blocks, THREADS_PER_BLOCK](codes_device, packed_device, int(bits))
        packed_device.copy_to_host(packed.reshape(-1, packed_length))
        return packed
    import cupy

    packed = cupy.empty((*lead, packed_length), dtype=cupy.uint8)
    if n == 0 or packed.size == 0:
        return packed
    codes_2d = cupy.ascontiguousarray(cupy.asarray(codes), dtype=cupy.uint8).reshape(-1, n)
    blocks = _blocks(codes_2d.shape[0], n)
    _pack_kernel[blocks, THREADS_PER_BLOCK, _cupy_stream()](
        cuda.as_cuda_array(codes_2d),
        cuda.as_cuda_array(packed.reshape(-1, packed_length)),
        int(bits),
    )
    return packed


def unpack_bits(packed: Any, bits: int, n: int) -> Any:
    """Unpack ``n`` codes of ``bits`` bits per row (numba.cuda backend).

    Parameters
    ----------
    packed : (..., ceil(n * bits / 8)) uint8 array, NumPy or on the GPU
        Already checked by `latkv.unpack_bits`. Any strides.
    bits : int
        Bits per code, 1..8.
    n : int
        Codes per row.

    Returns
    -------
    codes : (..., n) uint8 array
        NumPy for NumPy input, else CuPy. Byte-identical to
        `latkv.packing.unpack_bits_reference`.
    """
    *lead, packed_length = packed.shape
    if isinstance(packed, np.ndarray):
        codes = np.empty((*lead, n), dtype=np.uint8)
        if n == 0 or codes.size == 0:
            return codes
        packed_device = cuda.to_device(np.ascontiguousarray(packed).reshape(-1, packed_length))
        codes_device = cuda.device_array((packed_device.shape[0], n), np.uint8)
        blocks = _blocks(packed_device.shape[0], n)
        _unpack_kernel[blocks, THREADS_PER_BLOCK](packed_device, codes_device, int(bits))
        codes_device.copy_to_host(codes.reshape(-1, n))
        return codes
    import cupy

    codes = cupy.empty((*lead, n), dtype=cupy.uint8)
    if n == 0 or codes.size == 0:
        return codes
    packed_2d = cupy.ascontiguousarray(cupy.asarray(packed), dtype=cupy.uint8).reshape(
        -1, packed_length
    )
    blocks = _blocks(packed_2d.shape[0], n)
    _unpack_kernel[blocks, THREADS_PER_BLOCK, _cupy_stream()](
        cuda.as_cuda_array(packed_2d),
        cuda.as_cuda_array(codes.reshape(-1, n)),
        int(bits),
    )
    return codes
