"""GPU production path of bit packing: the CuPy ``RawModule`` kernels of ``cuda_kernels/pack_bits.cu``.

One thread per (row, group of 8 codes); see the source for the algorithm. Bit-exact with
`latkv.packing.pack_bits_reference` and `latkv.packing.unpack_bits_reference`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from latkv._gpu.cupy_modules import kernel, launch_1d


def pack_bits(codes: Any, bits: int) -> Any:
    """Pack ``bits``-bit codes along the last axis, LSB-first (CuPy backend).

    Parameters
    ----------
    codes : (..., n) uint8 cupy.ndarray
        Already checked by `latkv.pack_bits`: values below ``2**bits``. Any strides.
    bits : int
        Bits per code, 1..8.

    Returns
    -------
    packed : (..., ceil(n * bits / 8)) uint8 cupy.ndarray
        On the current device; byte-identical to the reference.
    """
    import cupy

    *lead, n = codes.shape
    packed_length = (n * bits + 7) // 8
    packed = cupy.empty((*lead, packed_length), dtype=cupy.uint8)
    if n == 0 or packed.size == 0:
        return packed
    codes_2d = cupy.ascontiguousarray(codes, dtype=cupy.uint8).reshape(-1, n)
    rows = codes_2d.shape[0]
    groups_per_row = (n + 7) // 8
    launch_1d(
        kernel("pack_bits.cu", f"pack_bits<{bits}>"),
        rows * groups_per_row,
        (codes_2d, packed, np.int64(rows), np.int64(n)),
    )
    return packed


def unpack_bits(packed: Any, bits: int, n: int) -> Any:
    """Unpack ``n`` codes of ``bits`` bits per row (CuPy backend).

    Parameters
    ----------
    packed : (..., ceil(n * bits / 8)) uint8 cupy.ndarray
        Already checked by `latkv.unpack_bits`. Any strides.
    bits : int
        Bits per code, 1..8.
    n : int
        Codes per row.

    Returns
    -------
    codes : (..., n) uint8 cupy.ndarray
        On the current device; byte-identical to the reference.
    """
    import cupy

    *lead, packed_length = packed.shape
    codes = cupy.empty((*lead, n), dtype=cupy.uint8)
    if n == 0 or codes.size == 0:
        return codes
    packed_2d = cupy.ascontiguousarray(packed, dtype=cupy.uint8).reshape(-1, packed_length)
    rows = packed_2d.shape[0]
    groups_per_row = (n + 7) // 8
    launch_1d(
        kernel("pack_bits.cu", f"unpack_bits<{bits}>"),
        rows * groups_per_row,
        (packed_2d, codes, np.int64(rows), np.int64(n)),
    )
    return codes
