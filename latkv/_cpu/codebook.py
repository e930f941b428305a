"""CPU fast path of the scalar-codebook kernels of TurboQuant: numba, parallel over rows.

`codebook_quantize` fuses the three steps of `latkv.turbo.codebook_quantize_reference` in one
pass over each row: the float32 division ``u = rotated / norm`` (a true division, as in the
reference, never a multiplication by a reciprocal), the search for the code (the number of
boundaries below ``u``: a branch-free comparison count for codebooks of up to 16 levels, a
branch-free binary search above) and the LSB-first packing of `latkv.packing`; the packed
bytes are identical to the reference's, NaN, signed zeros and values on a boundary included.
`codebook_dequantize` unpacks and looks up the centroids (exactly the reference's values).
`codebook_scores` never decodes all keys at once: each task decodes a block of keys into a
small ``(dim, block)`` buffer of centroid values and multiplies every query of its head with
it, accumulating in float32 over the coordinates in order; the scores agree with the
reference's float32 matrix product to float32 rounding. Small inputs run serial clones of the
kernels (`latkv._cpu.scalar._kernel`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from latkv._cpu.scalar import _kernel, _pack_row, _unpack_row
from latkv.packing import packed_length

ROWS_PER_TASK = 256
#: keys decoded together into one buffer by `codebook_scores` (one accumulator vector each)
KEY_BLOCK = 16
#: key blocks per parallel task of `codebook_scores`
BLOCKS_PER_TASK = 4
#: codebooks with at most this many levels count the boundaries below ``u`` one by one
LINEAR_SEARCH_LEVELS = 16


@njit(inline="always")
def _count_below(u, boundaries, codes):
    """``codes[j] = #{k : boundaries[k] < u[j]}`` by one vectorisable pass per boundary.

    ``not (u <= b)`` is ``b < u`` for every ``u`` but NaN, which it counts above every boundary,
    as `numpy.searchsorted` sorts NaN last.
    """
    for j in range(u.shape[0]):
        codes[j] = 0
    for k in range(boundaries.shape[0]):
        edge = boundaries[k]
        for j in range(u.shape[0]):
            codes[j] += np.uint8(not (u[j] <= edge))


@njit(inline="always")
def _search(u, padded, count, first_step, codes):
    """The codes of `_count_below` by binary search: ``log2(len(padded) + 1)`` probes each.

    ``padded`` holds the ``count`` boundaries and then ``+inf`` up to ``2**k - 1`` entries;
    ``first_step = 2**(k - 1)``. Position ``p`` advances by ``step`` while the boundary
    ``padded[p + step - 1]`` is below ``u``; NaN passes every probe and is clamped to ``count``.
    """
    for j in range(u.shape[0]):
        value = u[j]
        position = 0
        step = first_step
        while step > 0:
            if not (value <= padded[position + step - 1]):
                position += step
            step >>= 1
        codes[j] = np.uint8(min(position, count))


@njit(parallel=True, cache=True)
def _quantize_rows(rotated, safe_norm, padded, count, first_step, bits, packed):
    """Kernel: ``packed[i] = pack(code(rotated[i] / safe_norm[i]))`` for every row ``i``.

    ``rotated`` (rows, dim) float32, ``safe_norm`` (rows,) float32 without zeros, ``padded``
    the boundaries as `_search` wants them (their first ``count`` entries are the boundaries).
    """
    rows, dim = rotated.shape
    linear = count + 1 <= LINEAR_SEARCH_LEVELS
    boundaries = padded[:count]
    tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(tasks):
        u = np.empty(dim, np.float32)
        codes = np.empty(dim, np.uint8)
        for row in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            source = rotated[row]
            scale = safe_norm[row]
            for j in range(dim):
                u[j] = source[j] / scale
            if linear:
                _count_below(u, boundaries, codes)
            else:
                _search(u, padded, count, first_step, codes)
            _pack_row(codes, bits, packed[row])


@njit(parallel=True, cache=True)
def _dequantize_rows(packed, centroids, bits, out):
    """Kernel: ``out[i] = centroids[unpack(packed[i])]`` for every row ``i``."""
    rows, dim = out.shape
    tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(tasks):
        codes = np.empty(dim, np.uint8)
        for row in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            _unpack_row(packed[row], bits, codes)
            target = out[row]
            for j in range(dim):
                target[j] = centroids[codes[j]]


@njit(inline="always")
def _block_scores(q, values, batch, first, width, out):
    """``out[batch, i, first + k] = sum_j q[i, j] * values[j, k]`` for ``k < width``.

    The sum runs over ``j`` in order, one float32 accumulator per key of the block; the inner
    loop over the ``KEY_BLOCK`` keys has no reduction, so it vectorises without reassociation.
    """
    m, dim = q.shape
    accumulator = np.empty(KEY_BLOCK, np.float32)
    for i in range(m):
        query = q[i]
        for k in range(KEY_BLOCK):
            accumulator[k] = 0.0
        for j in range(dim):
            weight = query[j]
            row = values[j]
            for k in range(KEY_BLOCK):
                accumulator[k] += weight * row[k]
        for k in range(width):
            out[batch, i, first + k] = accumulator[k]


@njit(parallel=True, cache=True)
def _codebook_scores(q, packed, centroids, bits, out):
    """Kernel: ``out (B, m, n) = q (B, m, dim) @ centroids[unpack(packed (B, n, P))].T``.

    One task per ``BLOCKS_PER_TASK * KEY_BLOCK`` keys of one head; each block of keys is
    decoded into a ``(dim, KEY_BLOCK)`` buffer (zeros past the last key).
    """
    batches, m, dim = q.shape
    n = packed.shape[1]
    keys_per_task = BLOCKS_PER_TASK * KEY_BLOCK
    tasks_per_batch = (n + keys_per_task - 1) // keys_per_task
    for task in prange(batches * tasks_per_batch):
        batch = task // tasks_per_batch
        start = (task % tasks_per_batch) * keys_per_task
        stop = min(n, start + keys_per_task)
        codes = np.empty(dim, np.uint8)
        values = np.zeros((dim, KEY_BLOCK), np.float32)
        queries = q[batch]
        for first in range(start, stop, KEY_BLOCK):
            width = min(KEY_BLOCK, stop - first)
            for k in range(width):
                _unpack_row(packed[batch, first + k], bits, codes)
                for j in range(dim):
                    values[j, k] = centroids[codes[j]]
            for k in range(width, KEY_BLOCK):
                for j in range(dim):
                    values[j, k] = 0.0
            _block_scores(queries, values, batch, first, width, out)


def _padded_boundaries(boundaries: np.ndarray) -> tuple[np.ndarray, int]:
    """The boundaries followed by ``+inf`` up to ``2**k - 1`` entries, and ``2**(k - 1)``."""
    count = boundaries.shape[0]
    levels = 1 << count.bit_length()  # the smallest power of two above count
    padded = np.full(levels - 1, np.inf, dtype=boundaries.dtype)
    padded[:count] = boundaries
    return padded, levels >> 1


def codebook_quantize(rotated: np.ndarray, norm: np.ndarray, boundaries: np.ndarray,
                      bits: int) -> np.ndarray:
    """Packed codes of ``u = rotated / norm`` against a scalar codebook (numba backend).

    Parameters
    ----------
    rotated : numpy.ndarray, shape (n, d), float32
        Rotated vectors ``R x`` (other layouts and dtypes are copied to C-contiguous float32).
    norm : numpy.ndarray, shape (n,), float32
        Their norms; a row whose norm is not ``> 0`` is divided by 1 instead.
    boundaries : numpy.ndarray, shape (2**bits - 1,), float32
        Increasing cell edges (fewer are allowed); the code of ``u_j`` is the number of
        boundaries strictly below it (``numpy.searchsorted(boundaries, u_j, side="left")``).
    bits : int
        Bits per code, 1..8.

    Returns
    -------
    numpy.ndarray, shape (n, ceil(d * bits / 8)), uint8
        Byte-identical to `latkv.turbo.codebook_quantize_reference`.
    """
    rotated = np.ascontiguousarray(rotated, dtype=np.float32)
    if rotated.ndim != 2:
        raise ValueError(f"rotated must be 2-D (n, d), got shape {rotated.shape}")
    rows, dim = rotated.shape
    norm = np.asarray(norm)
    if norm.shape != (rows,):
        raise ValueError(f"norm must have shape ({rows},), got {norm.shape}")
    boundaries = np.ascontiguousarray(boundaries, dtype=np.float32)
    bits = int(bits)
    if boundaries.ndim != 1 or boundaries.shape[0] > (1 << bits) - 1:
        raise ValueError(f"boundaries must be 1-D with at most 2**bits - 1 = {(1 << bits) - 1} "
                         f"entries, got shape {boundaries.shape}")
    packed = np.empty((rows, packed_length(dim, bits)), dtype=np.uint8)
    if packed.size == 0:
        return packed
    # the reference's safe norm, in its dtypes: tested before the cast to float32
    safe_norm = np.where(norm > 0, norm, np.float32(1)).astype(np.float32)
    padded, first_step = _padded_boundaries(boundaries)
    _kernel(_quantize_rows, rotated.size)(rotated, safe_norm, padded, boundaries.shape[0],
                                          first_step, bits, packed)
    return packed


def _check_packed(packed: np.ndarray, bits: int, dim: int) -> None:
    expected = packed_length(dim, bits)
    if packed.shape[-1] != expected:
        raise ValueError(f"packed must have last dimension ceil(dim*bits/8) = {expected} for "
                         f"dim={dim}, bits={bits}, got shape {packed.shape}")


def _check_centroids(centroids: np.ndarray, bits: int) -> np.ndarray:
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    if centroids.ndim != 1 or centroids.shape[0] < (1 << bits):
        raise ValueError(f"centroids must be 1-D with at least 2**bits = {1 << bits} entries, "
                         f"got shape {centroids.shape}")
    return centroids


def codebook_dequantize(packed: np.ndarray, centroids: np.ndarray, bits: int,
                        dim: int) -> np.ndarray:
    """``centroids[codes]`` from packed codes (numba backend).

    Parameters
    ----------
    packed : numpy.ndarray, shape (n, ceil(dim * bits / 8)), uint8
        Codes packed LSB-first as `latkv.pack_bits` does (padding bits are ignored).
    centroids : numpy.ndarray, shape (2**bits,), float32
    bits : int
        Bits per code, 1..8.
    dim : int
        Codes per row.

    Returns
    -------
    numpy.ndarray, shape (n, dim), float32
        Equal to `latkv.turbo.codebook_dequantize_reference`.
    """
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    bits, dim = int(bits), int(dim)
    _check_packed(packed, bits, dim)
    centroids = _check_centroids(centroids, bits)
    out = np.empty((packed.shape[0], dim), dtype=np.float32)
    if out.size == 0:
        return out
    _kernel(_dequantize_rows, out.size)(packed, centroids, bits, out)
    return out


def codebook_scores(q: np.ndarray, packed: np.ndarray, centroids: np.ndarray, bits: int,
                    dim: int) -> np.ndarray:
    """``q @ centroids[codes].T`` per head without decoding all keys (numba backend).

    Parameters
    ----------
    q : numpy.ndarray, shape (B, m, dim), float32
        Queries (in the rotated domain).
    packed : numpy.ndarray, shape (B, n, ceil(dim * bits / 8)), uint8
        Packed codes of the keys.
    centroids : numpy.ndarray, shape (2**bits,), float32
    bits : int
        Bits per code, 1..8.
    dim : int
        Codes per key.

    Returns
    -------
    numpy.ndarray, shape (B, m, n), float32
        ``out[b, i, k] = sum_j q[b, i, j] * centroids[code[b, k, j]]``, summed in float32;
        equal to `latkv.turbo.codebook_scores_reference` up to float32 rounding.
    """
    q = np.ascontiguousarray(q, dtype=np.float32)
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    bits, dim = int(bits), int(dim)
    _check_packed(packed, bits, dim)
    centroids = _check_centroids(centroids, bits)
    if q.ndim != 3 or packed.ndim != 3 or q.shape[0] != packed.shape[0] or q.shape[2] != dim:
        raise ValueError(f"q must be (B, m, {dim}) and packed (B, n, P) with the same B, got "
                         f"{q.shape} and {packed.shape}")
    batches, m, _ = q.shape
    n = packed.shape[1]
    out = np.empty((batches, m, n), dtype=np.float32)
    if out.size == 0:
        return out
    if dim == 0:
        out[...] = 0
        return out
    _kernel(_codebook_scores, batches * n * max(m, dim))(q, packed, centroids, bits, out)
    return out
