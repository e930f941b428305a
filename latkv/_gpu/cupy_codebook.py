"""GPU production path of the codebook and sign-sketch kernels: CuPy ``RawModule`` kernels.

``codebook_quantize``, ``codebook_dequantize`` and ``codebook_scores`` launch the
``<BITS>`` instantiations of ``cuda_kernels/codebook.cu``; ``sign_scores`` launches
``cuda_kernels/sign_sketch.cu``. The comments at the top of those files give the work split.
The NumPy references are `latkv.turbo.codebook_quantize_reference`,
`latkv.turbo.codebook_dequantize_reference`, `latkv.turbo.codebook_scores_reference` and
`latkv.qjl.sign_scores_reference`: quantize and dequantize are bit-exact with them, the scores
equal them up to float32 rounding (the sums run in a different order than BLAS).

Inputs are CuPy arrays on the current device (copied to C-contiguous float32 / uint8 first
where they are not); the results are new CuPy arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from latkv._gpu.cupy_modules import kernel, launch_1d
from latkv._gpu.kernel_arguments import check_bits, check_length, scores_shapes
from latkv.packing import packed_length

# Threads per block; one thread per (row, group of 8 codes) for quantize / dequantize.
THREADS_PER_BLOCK = 256
# Threads per block of the scores kernels: one thread per key, a tile of this many keys.
KEYS_PER_BLOCK = 128
# The kernels loop grid-stride, so any grid is correct; this caps the launch.
MAX_BLOCKS = 2**31 - 1


def codebook_quantize(rotated: Any, norm: Any, boundaries: Any, bits: int) -> Any:
    """Packed codes of ``u = rotated / norm`` against a scalar codebook (CuPy kernel).

    Parameters
    ----------
    rotated : (n, d) float32 cupy.ndarray
    norm : (n,) float32 cupy.ndarray
        A norm that is not ``> 0`` divides by 1 instead.
    boundaries : (2**bits - 1,) float32 cupy.ndarray
        Increasing; the code of ``u`` is the number of boundaries strictly below it.
    bits : int
        1..8.

    Returns
    -------
    packed : (n, ceil(d * bits / 8)) uint8 cupy.ndarray
        Byte-identical to `latkv.turbo.codebook_quantize_reference` (``u`` is an IEEE float32
        division, NaN gets the last code as with ``numpy.searchsorted``).
    """
    import cupy

    bits = check_bits(bits)
    rotated = cupy.ascontiguousarray(rotated, dtype=cupy.float32)
    rows, dim = (int(s) for s in rotated.shape)
    norm = cupy.ascontiguousarray(norm, dtype=cupy.float32)
    boundaries = cupy.ascontiguousarray(boundaries, dtype=cupy.float32)
    check_length(norm, rows, "norm")
    check_length(boundaries, (1 << bits) - 1, "boundaries")
    packed = cupy.empty((rows, packed_length(dim, bits)), dtype=cupy.uint8)
    if packed.size == 0:
        return packed
    launch_1d(
        kernel("codebook.cu", f"codebook_quantize<{bits}>"),
        min(rows * ((dim + 7) // 8), MAX_BLOCKS * THREADS_PER_BLOCK),
        (rotated, norm, boundaries, packed, np.int64(rows), np.int64(dim)),
        threads=THREADS_PER_BLOCK,
    )
    return packed


def codebook_dequantize(packed: Any, centroids: Any, bits: int, dim: int) -> Any:
    """``centroids[codes]`` from packed codes (CuPy kernel).

    Parameters
    ----------
    packed : (n, ceil(dim * bits / 8)) uint8 cupy.ndarray
        Padding bits of the last byte are ignored.
    centroids : (2**bits,) float32 cupy.ndarray
    bits : int
        1..8.
    dim : int
        Codes per row.

    Returns
    -------
    (n, dim) float32 cupy.ndarray
        Equal to `latkv.turbo.codebook_dequantize_reference`.
    """
    import cupy

    bits = check_bits(bits)
    dim = int(dim)
    packed = cupy.ascontiguousarray(packed, dtype=cupy.uint8)
    centroids = cupy.ascontiguousarray(centroids, dtype=cupy.float32)
    check_length(centroids, 1 << bits, "centroids")
    rows = int(packed.shape[0])
    if packed.ndim != 2 or int(packed.shape[1]) != packed_length(dim, bits):
        raise ValueError(f"packed must have shape (n, {packed_length(dim, bits)}) for dim "
                         f"{dim} and {bits} bits, got {tuple(packed.shape)}")
    out = cupy.empty((rows, dim), dtype=cupy.float32)
    if out.size == 0:
        return out
    launch_1d(
        kernel("codebook.cu", f"codebook_dequantize<{bits}>"),
        min(rows * ((dim + 7) // 8), MAX_BLOCKS * THREADS_PER_BLOCK),
        (packed, centroids, out, np.int64(rows), np.int64(dim)),
        threads=THREADS_PER_BLOCK,
    )
    return out


def _launch_scores(function: Any, batches: int, n: int, args: tuple) -> None:
    key_tiles = (n + KEYS_PER_BLOCK - 1) // KEYS_PER_BLOCK
    blocks = min(batches * key_tiles, MAX_BLOCKS)
    function((blocks,), (KEYS_PER_BLOCK,), args)


def codebook_scores(q: Any, packed: Any, centroids: Any, bits: int, dim: int) -> Any:
    """``q @ centroids[codes].T`` per batch, from packed codes (CuPy kernel).

    Parameters
    ----------
    q : (B, m, dim) float32 cupy.ndarray
    packed : (B, n, ceil(dim * bits / 8)) uint8 cupy.ndarray
    centroids : (2**bits,) float32 cupy.ndarray
    bits : int
        1..8.
    dim : int

    Returns
    -------
    (B, m, n) float32 cupy.ndarray
        ``out[b, i, k] = sum_j q[b, i, j] * centroids[code[b, k, j]]``, summed in float32;
        equal to `latkv.turbo.codebook_scores_reference` up to rounding.
    """
    import cupy

    bits = check_bits(bits)
    dim = int(dim)
    q = cupy.ascontiguousarray(q, dtype=cupy.float32)
    packed = cupy.ascontiguousarray(packed, dtype=cupy.uint8)
    centroids = cupy.ascontiguousarray(centroids, dtype=cupy.float32)
    check_length(centroids, 1 << bits, "centroids")
    batches, m, n = scores_shapes(q, packed, dim, packed_length(dim, bits))
    out = cupy.empty((batches, m, n), dtype=cupy.float32)
    if out.size == 0:
        return out
    _launch_scores(
        kernel("codebook.cu", f"codebook_scores<{bits}>"), batches, n,
        (q, packed, centroids, out, np.int64(batches), np.int64(m), np.int64(n),
         np.int64(dim)),
    )
    return out


def sign_scores(q: Any, packed: Any, rows: int) -> Any:
    """``<q, z>`` against packed sign sketches ``z = 2 * bit - 1`` (CuPy kernel).

    Parameters
    ----------
    q : (B, m, rows) float32 cupy.ndarray
    packed : (B, n, ceil(rows / 8)) uint8 cupy.ndarray
        Sign bits, LSB-first; padding bits of the last byte are ignored.
    rows : int
        Sketch rows (signs per key).

    Returns
    -------
    (B, m, n) float32 cupy.ndarray
        Equal to `latkv.qjl.sign_scores_reference` up to rounding (float32 sums).
    """
    import cupy

    rows = int(rows)
    q = cupy.ascontiguousarray(q, dtype=cupy.float32)
    packed = cupy.ascontiguousarray(packed, dtype=cupy.uint8)
    batches, m, n = scores_shapes(q, packed, rows, packed_length(rows, 1))
    out = cupy.empty((batches, m, n), dtype=cupy.float32)
    if out.size == 0:
        return out
    _launch_scores(
        kernel("sign_sketch.cu", "sign_scores"), batches, n,
        (q, packed, out, np.int64(batches), np.int64(m), np.int64(n), np.int64(rows)),
    )
    return out
