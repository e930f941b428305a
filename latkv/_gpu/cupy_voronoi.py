"""GPU production path of the fixed-rate E8 Voronoi code: CuPy ``RawModule`` kernels.

``voronoi_encode`` and ``voronoi_decode`` launch the ``<BITS>`` instantiations of
``cuda_kernels/voronoi.cu`` (the comment at the top of that file gives the operations and the
work split: one thread per vector to encode, one per group of 8 to decode). The NumPy
references are `latkv.e8.voronoi_encode_reference` and `latkv.e8.voronoi_decode_reference`,
with the same signatures; the results are bit-identical to them.

The argument checks (`encode_arguments`, `decode_arguments`) are shared with
`latkv._gpu.numba_voronoi`; they take the array module and do not import CuPy.

Inputs are CuPy arrays on the current device (converted to C-contiguous arrays of the kernel's
dtype first where they are not); the results are new CuPy arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from latkv._gpu.cupy_modules import kernel, launch_1d
from latkv._gpu.kernel_arguments import check_bits, check_length

# Threads per block of the encoder (one thread per vector: small blocks spread few vectors
# over more multiprocessors) and of the decoder (one thread per group of 8).
ENCODE_THREADS = 64
DECODE_THREADS = 256
# The kernels loop grid-stride, so any grid is correct; this caps the launch.
MAX_BLOCKS = 2**31 - 1
#: 2^-24, the smallest float16: the scale of a vector without coordinates
SMALLEST_SCALE = 2.0 ** -24


def encode_arguments(xp: Any, rotated: Any, multipliers: Any,
                     bits: int) -> tuple[Any, Any, int]:
    """``rotated`` as C-contiguous float32 ``(n, dim)`` (``dim`` a multiple of 8),
    ``multipliers`` as a non-empty C-contiguous float64 ``(r,)``, ``bits`` in 1..8."""
    bits = check_bits(bits)
    rotated = xp.ascontiguousarray(xp.asarray(rotated), dtype=xp.float32)
    if rotated.ndim != 2 or int(rotated.shape[1]) % 8:
        raise ValueError(f"rotated must have shape (n, dim) with dim a multiple of 8, got "
                         f"{tuple(rotated.shape)}")
    multipliers = xp.ascontiguousarray(xp.asarray(multipliers), dtype=xp.float64)
    if multipliers.ndim != 1 or int(multipliers.shape[0]) == 0:
        raise ValueError(f"multipliers must be a non-empty 1-D array, got shape "
                         f"{tuple(multipliers.shape)}")
    return rotated, multipliers, bits


def decode_arguments(xp: Any, labels: Any, scale: Any, bits: int) -> tuple[Any, Any, int]:
    """``labels`` as C-contiguous uint8 ``(n, dim)`` (``dim`` a multiple of 8), ``scale`` as
    C-contiguous float32 ``(n,)``, ``bits`` in 1..8."""
    bits = check_bits(bits)
    labels = xp.ascontiguousarray(xp.asarray(labels))
    if labels.dtype != xp.uint8:
        raise TypeError(f"labels must be uint8, got {labels.dtype}")
    if labels.ndim != 2 or int(labels.shape[1]) % 8:
        raise ValueError(f"labels must have shape (n, dim) with dim a multiple of 8, got "
                         f"{tuple(labels.shape)}")
    scale = xp.ascontiguousarray(xp.asarray(scale), dtype=xp.float32)
    check_length(scale, int(labels.shape[0]), "scale")
    return labels, scale, bits


def voronoi_encode(rotated: Any, multipliers: Any, bits: int) -> tuple[Any, Any]:
    """Scale and labels of each vector (CuPy kernel).

    Parameters
    ----------
    rotated : (n, dim) float32 cupy.ndarray
        ``dim`` a multiple of 8, finite (not checked).
    multipliers : (r,) float64 cupy.ndarray
        `latkv.e8.scale_ladder` ``(bits)[1]``; ``max|x| / 2^bits * multipliers[-1]`` must stay
        below 65504 (`latkv.e8.E8Stage` checks it).
    bits : int
        1..8.

    Returns
    -------
    scale : (n,) float32 cupy.ndarray holding float16 values
    labels : (n, dim) uint8 cupy.ndarray
        Bit-identical to `latkv.e8.voronoi_encode_reference`.
    """
    import cupy

    rotated, multipliers, bits = encode_arguments(cupy, rotated, multipliers, bits)
    rows, dim = (int(s) for s in rotated.shape)
    scale = cupy.empty(rows, dtype=cupy.float32)
    labels = cupy.empty((rows, dim), dtype=cupy.uint8)
    if rows and dim:
        launch_1d(
            kernel("voronoi.cu", f"voronoi_encode<{bits}>"),
            min(rows, MAX_BLOCKS * ENCODE_THREADS),
            (rotated, multipliers, scale, labels, np.int64(rows), np.int64(dim),
             np.int64(multipliers.shape[0])),
            threads=ENCODE_THREADS,
        )
    elif rows:
        scale.fill(SMALLEST_SCALE)               # no coordinates: max |x| = 0 (the floor)
    return scale, labels


def voronoi_decode(labels: Any, scale: Any, bits: int) -> Any:
    """The code points of ``labels`` times ``scale`` (CuPy kernel).

    Parameters
    ----------
    labels : (n, dim) uint8 cupy.ndarray
        ``dim`` a multiple of 8; values below ``2^bits``.
    scale : (n,) float32 cupy.ndarray
    bits : int
        1..8.

    Returns
    -------
    (n, dim) float32 cupy.ndarray
        Bit-identical to `latkv.e8.voronoi_decode_reference`.
    """
    import cupy

    labels, scale, bits = decode_arguments(cupy, labels, scale, bits)
    rows, dim = (int(s) for s in labels.shape)
    out = cupy.empty((rows, dim), dtype=cupy.float32)
    if out.size:
        groups = rows * (dim // 8)
        launch_1d(
            kernel("voronoi.cu", f"voronoi_decode<{bits}>"),
            min(groups, MAX_BLOCKS * DECODE_THREADS),
            (labels, scale, out, np.int64(rows), np.int64(dim)),
            threads=DECODE_THREADS,
        )
    return out
