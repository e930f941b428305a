"""Packed bit I/O: b-bit codes (b = 1..8) along the last axis, LSB-first.

Layout (the specification; ``docs/spec/packed-bits.md`` restates it)
---------------------------------------------------------------------
A row of ``n`` codes of ``b`` bits is stored in exactly ``ceil(n * b / 8)`` bytes. Code ``i``
occupies bits ``i*b .. i*b + b - 1`` of the row, counting bit ``j`` of the row as bit
``j % 8`` (value ``2**(j % 8)``) of byte ``j // 8``; within a code, its least significant bit
comes first. Unused high bits of the last byte are zero. Examples: with ``b = 1`` the codes
``[1, 0, 0, 0, 0, 0, 0, 0]`` pack to the byte ``0x01``; with ``b = 4`` the codes ``[0x3, 0xA]``
pack to ``0xA3``; with ``b = 3`` the codes ``[1, 2, 3]`` pack to ``0xD1, 0x00``
(``0b11_010_001``; the high bit of code 2 spills into byte 1 as a zero).

Every backend (NumPy reference, numba, CuPy RawModule, numba.cuda) writes the same bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from latkv._backend import array_module, implementation, resolve_backend
from latkv.checks import check_bits, check_int, check_integer_array


def packed_length(n: int, bits: int) -> int:
    """Bytes per row for ``n`` codes of ``bits`` bits: ``ceil(n * bits / 8)``.

    Parameters
    ----------
    n : int
        Codes per row, ``>= 0``.
    bits : int
        Bits per code, 1..8.

    Returns
    -------
    int
        The last dimension of `pack_bits`' output.

    Examples
    --------
    >>> import latkv
    >>> latkv.packed_length(128, 4), latkv.packed_length(3, 3), latkv.packed_length(0, 5)
    (64, 2, 0)
    """
    return (n * bits + 7) // 8


def pack_bits_reference(codes: Any, bits: int) -> Any:
    """NumPy/CuPy reference of `pack_bits`: expand to a bit plane, then ``packbits``.

    ``codes`` must already be checked: an unsigned integer array with values below ``2**bits``.
    """
    xp = array_module(codes)
    *lead, n = codes.shape
    # bit j of code i goes to bit position i*b + j of the row (LSB-first within a code)
    shifts = xp.arange(bits, dtype=xp.uint8)
    plane = (codes[..., :, None].astype(xp.uint8) >> shifts) & xp.uint8(1)
    plane = plane.reshape(*lead, n * bits)
    packed = xp.packbits(plane, axis=-1, bitorder="little")
    return packed.reshape(*lead, packed_length(n, bits))


def unpack_bits_reference(packed: Any, bits: int, n: int) -> Any:
    """NumPy/CuPy reference of `unpack_bits`: ``unpackbits``, then sum the bit plane."""
    xp = array_module(packed)
    *lead, _ = packed.shape
    # the padding bits sliced off (CuPy's unpackbits has no ``count``)
    plane = xp.unpackbits(packed, axis=-1, bitorder="little")[..., :n * bits]
    plane = plane.reshape(*lead, n, bits)
    weights = (xp.uint8(1) << xp.arange(bits, dtype=xp.uint8)).astype(xp.uint8)
    return (plane * weights).sum(axis=-1, dtype=xp.uint8)


def pack_bits(codes: Any, bits: int, *, backend: str | None = None, check: bool = True) -> Any:
    """Pack ``bits``-bit codes along the last axis, LSB-first.

    Parameters
    ----------
    codes : (..., n) unsigned integer array (NumPy or CuPy)
        Values in ``[0, 2**bits)``.
    bits : int
        Bits per code, 1..8.
    backend : str, optional
        ``"numpy"``, ``"numba"``, ``"cupy"`` or ``"numba.cuda"``; by default the array
        module of the input picks it (NumPy -> ``"numba"``, CuPy -> ``"cupy"``).
    check : bool
        Verify the value range (one reduction over ``codes``). Quantizers that produce codes
        in range themselves pass ``False``.

    Returns
    -------
    packed : (..., ceil(n * bits / 8)) uint8
        Same array module as ``codes``. Equivalent to `pack_bits_reference`.

    Examples
    --------
    >>> import numpy as np, latkv
    >>> latkv.pack_bits(np.array([3, 10], dtype=np.uint8), 4)
    array([163], dtype=uint8)
    >>> latkv.unpack_bits(np.array([163], dtype=np.uint8), 4, 2)
    array([ 3, 10], dtype=uint8)
    """
    bits = check_bits(bits)
    codes = check_integer_array(codes, "codes")
    if codes.dtype.kind == "i" and codes.size and bool((codes < 0).any()):
        raise ValueError("codes must be non-negative")
    if check and codes.size and int(codes.max()) >= (1 << bits):
        raise ValueError(
            f"codes must be below 2**bits = {1 << bits} for bits={bits}, got max {int(codes.max())}"
        )
    xp = array_module(codes)
    if codes.dtype != xp.uint8:
        codes = codes.astype(xp.uint8)
    backend = resolve_backend(backend, codes)
    return implementation("pack_bits", backend)(codes, bits)


def unpack_bits(packed: Any, bits: int, n: int, *, backend: str | None = None) -> Any:
    """Unpack ``n`` codes of ``bits`` bits per row from the LSB-first layout of `pack_bits`.

    Parameters
    ----------
    packed : (..., ceil(n * bits / 8)) uint8 array (NumPy or CuPy)
    bits : int
        Bits per code, 1..8.
    n : int
        Codes per row.
    backend : str, optional
        ``"numpy"``, ``"numba"``, ``"cupy"`` or ``"numba.cuda"``; by default the array
        module of the input picks it (NumPy -> ``"numba"``, CuPy -> ``"cupy"``).

    Returns
    -------
    codes : (..., n) uint8
        Equivalent to `unpack_bits_reference`.

    Examples
    --------
    The 3-bit codes ``[1, 2, 3]`` occupy 9 bits, ``0b11_010_001`` and a zero bit in the next
    byte (the layout of the module docstring):

    >>> import numpy as np, latkv
    >>> latkv.unpack_bits(np.array([0xD1, 0x00], dtype=np.uint8), 3, 3)
    array([1, 2, 3], dtype=uint8)
    >>> codes = np.random.default_rng(0).integers(0, 8, size=(2, 5), dtype=np.uint8)
    >>> packed = latkv.pack_bits(codes, 3)
    >>> packed.shape, bool((latkv.unpack_bits(packed, 3, 5) == codes).all())
    ((2, 2), True)
    """
    bits = check_bits(bits)
    n = check_int(n, "n", 0)
    packed = check_integer_array(packed, "packed")
    if packed.dtype != np.uint8:
        raise TypeError(f"packed must be uint8, got dtype {packed.dtype}")
    expected = packed_length(n, bits)
    if packed.shape[-1] != expected:
        raise ValueError(
            f"packed must have last dimension ceil(n*bits/8) = {expected} for n={n}, "
            f"bits={bits}, got shape {tuple(packed.shape)}"
        )
    backend = resolve_backend(backend, packed)
    return implementation("unpack_bits", backend)(packed, bits, n)
