"""CPU fast path of TurboQuant's scalar-codebook kernels: numba, parallel over rows or keys.

`codebook_quantize` fuses the three steps of `latkv.turbo.codebook_quantize_reference` into
one pass over each row: the float32 division ``u = rotated / norm`` (a true division, as in
the reference, never a multiplication by a reciprocal), the code search (the number of
boundaries below ``u``: one vectorised comparison pass per boundary for codebooks of up to 64
levels, above that a guess from a uniform grid made exact by comparisons) and the LSB-first
packing of `latkv.packing`. Its bytes are identical to the reference's, values on a
boundary, signed zeros, infinities and NaN included. `codebook_dequantize` reads each group
of eight codes as one word and looks up the centroids: exactly the reference's values.
`codebook_scores` never decodes all keys at once: each key is decoded into a ``(dim,)``
buffer of centroid values and dotted with every query of its head in float32 (SIMD partial
sums), so its scores agree with the reference's float32 matrix product to float32 rounding.
Small inputs run serial clones of the kernels (`latkv._cpu.serial.kernel_for`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from latkv._cpu.scalar import _pack_row
from latkv._cpu.serial import kernel_for
from latkv.checks import check_bits, check_int
from latkv.packing import packed_length

ROWS_PER_TASK = 256
#: keys per parallel task of `codebook_scores` and `latkv._cpu.sign_sketch.sign_scores`
KEYS_PER_TASK = 64
#: codebooks with at most this many levels count the boundaries below ``u`` one by one (a
#: vectorised pass per boundary); larger ones use `_bucket_search`
LINEAR_SEARCH_LEVELS = 64
#: cells of `_bucket_search`'s grid per boundary
CELLS_PER_BOUNDARY = 4
_NO_TABLE = np.empty(0, dtype=np.int32)


@njit(inline="always")
def _count_below(u, boundaries, codes):
    """``codes[j] = #{k : boundaries[k] < u[j]}`` by one vectorised pass per boundary.

    ``not (u <= b)`` is ``b < u`` for every ``u`` but NaN, which it counts above every boundary,
    as `numpy.searchsorted` sorts NaN last. ``codes`` is int32, as wide as ``u``'s lanes.
    """
    for j in range(u.shape[0]):
        codes[j] = 0
    for k in range(boundaries.shape[0]):
        edge = boundaries[k]
        for j in range(u.shape[0]):
            codes[j] += np.int32(not (u[j] <= edge))


@njit(inline="always")
def _bucket_search(u, boundaries, table, low, scale, codes):
    """The codes of `_count_below` for large codebooks: a guess from a uniform grid, then a walk.

    Cell ``g = floor((u - low) * scale)`` of the grid holds ``table[g]``, about the code of its
    lower edge; the walk up over boundaries below ``u`` and down over boundaries not below it
    makes the code exact whatever the guess (the comparisons alone decide it; NaN, counted
    above every boundary, starts at 0 and walks to the top). With a few cells per boundary
    the walk is short.
    """
    count = boundaries.shape[0]
    cells = table.shape[0]
    for j in range(u.shape[0]):
        value = u[j]
        position = (value - low) * scale
        code = 0
        if position >= np.float32(cells):
            code = table[cells - 1]
        elif position >= np.float32(0.0):
            code = table[np.intp(position)]
        while code < count and not (value <= boundaries[code]):
            code += 1
        while code > 0 and value <= boundaries[code - 1]:
            code -= 1
        codes[j] = code


@njit(error_model="numpy", cache=True)
def _quantize_block(rotated, safe_norm, boundaries, table, low, scale, bits, packed, start, stop):
    """Rows ``start:stop`` of `_quantize_rows` (one task), with their work buffers.

    The parallel kernel and its serial clone share this compiled function (less to compile);
    the buffers are allocated here, so LLVM knows that they alias nothing. NumPy's error
    model: a zero divisor gives infinities and NaN, as in the reference, not an exception.
    """
    dim = rotated.shape[1]
    u = np.empty(dim, np.float32)
    codes = np.empty(dim, np.int32)
    linear = table.shape[0] == 0
    for row in range(start, stop):
        source = rotated[row]
        divisor = safe_norm[row]
        for j in range(dim):
            u[j] = source[j] / divisor
        if linear:
            _count_below(u, boundaries, codes)
        else:
            _bucket_search(u, boundaries, table, low, scale, codes)
        _pack_row(codes, bits, packed[row])


@njit(parallel=True, cache=True)
def _quantize_rows(rotated, safe_norm, boundaries, table, low, scale, bits, packed):
    """Kernel: ``packed[i] = pack(code(rotated[i] / safe_norm[i]))`` for every row ``i``.

    ``rotated`` (rows, dim) float32, ``safe_norm`` (rows,) float32 the reference's divisors
    (the norm, or 1 where it is not positive). An empty ``table`` selects `_count_below`, else
    `_bucket_search` with its grid.
    """
    rows = rotated.shape[0]
    tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(tasks):
        _quantize_block(rotated, safe_norm, boundaries, table, low, scale, bits, packed,
                        task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK))


@njit(inline="always")
def _decode_row(packed, centroids, bits, values):
    """``values[j] = centroids[code j]`` for one packed row: eight codes per ``bits`` bytes,
    read as one little-endian word (the last, partial group from the bytes that exist)."""
    dim = values.shape[0]
    width = packed.shape[0]
    mask = np.uint64((1 << bits) - 1)
    for group in range((dim + 7) // 8):
        word = np.uint64(0)
        for byte in range(bits):
            position = group * bits + byte
            if position < width:
                word |= np.uint64(packed[position]) << np.uint64(8 * byte)
        for k in range(min(8, dim - group * 8)):
            values[group * 8 + k] = centroids[np.intp((word >> np.uint64(k * bits)) & mask)]


@njit(cache=True)
def _dequantize_block(packed, centroids, bits, out, start, stop):
    """Rows ``start:stop`` of `_dequantize_rows` (one task)."""
    for row in range(start, stop):
        _decode_row(packed[row], centroids, bits, out[row])


@njit(parallel=True, cache=True)
def _dequantize_rows(packed, centroids, bits, out):
    """Kernel: ``out[i] = centroids[unpack(packed[i])]`` for every row ``i``."""
    rows = out.shape[0]
    tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(tasks):
        _dequantize_block(packed, centroids, bits, out, task * ROWS_PER_TASK,
                          min(rows, (task + 1) * ROWS_PER_TASK))


@njit(fastmath={"reassoc", "contract"}, cache=True)
def _dot(a, b):
    """``sum_j a[j] * b[j]`` in float32, vectorised: reassociated into SIMD partial sums.

    A function of its own (inlined by LLVM, not by numba), so that its fast-math flags stay
    on these instructions alone.
    """
    total = np.float32(0.0)
    for j in range(a.shape[0]):
        total += a[j] * b[j]
    return total


@njit(cache=True)
def _scores_block(q, packed, centroids, bits, out, batch, start, stop):
    """Keys ``start:stop`` of head ``batch`` of `_codebook_scores` (one task): each key decoded
    into a ``(dim,)`` buffer of centroid values, dotted with every query of the head."""
    values = np.empty(q.shape[2], np.float32)
    queries = q[batch]
    scores = out[batch]
    for key in range(start, stop):
        _decode_row(packed[batch, key], centroids, bits, values)
        for i in range(queries.shape[0]):
            scores[i, key] = _dot(queries[i], values)


@njit(parallel=True, cache=True)
def _codebook_scores(q, packed, centroids, bits, out):
    """Kernel: ``out (B, m, n) = q (B, m, dim) @ centroids[unpack(packed (B, n, P))].T``,
    one task per ``KEYS_PER_TASK`` keys of one head."""
    batches = q.shape[0]
    n = packed.shape[1]
    tasks_per_batch = (n + KEYS_PER_TASK - 1) // KEYS_PER_TASK
    for task in prange(batches * tasks_per_batch):
        batch = task // tasks_per_batch
        start = (task % tasks_per_batch) * KEYS_PER_TASK
        _scores_block(q, packed, centroids, bits, out, batch, start,
                      min(n, start + KEYS_PER_TASK))


def _search_grid(boundaries: np.ndarray) -> tuple[np.ndarray, np.float32, np.float32]:
    """`_bucket_search`'s grid: ``CELLS_PER_BOUNDARY`` cells per boundary over the span of the
    boundaries, each cell's guess the code of its lower edge; an empty table (the linear count)
    for small codebooks."""
    count = boundaries.shape[0]
    if count + 1 <= LINEAR_SEARCH_LEVELS:
        return _NO_TABLE, np.float32(0), np.float32(0)
    cells = CELLS_PER_BOUNDARY * count
    low = float(boundaries[0])
    span = float(boundaries[-1]) - low
    scale = cells / span if np.isfinite(span) and span > 0 else 0.0
    if not np.isfinite(np.float32(scale)):
        scale = 0.0
    edges = (low + np.arange(cells) / scale) if scale else np.full(cells, low)
    table = np.searchsorted(boundaries, edges.astype(np.float32), side="left").astype(np.int32)
    return table, np.float32(low), np.float32(scale)


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
        Increasing cell edges (fewer are allowed; other dtypes are cast to float32); the code
        of ``u_j`` is the number of boundaries strictly below it
        (``numpy.searchsorted(boundaries, u_j, side="left")``; NaN gets ``len(boundaries)``).
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
    bits = check_bits(bits)
    if boundaries.ndim != 1 or boundaries.shape[0] > (1 << bits) - 1:
        raise ValueError(f"boundaries must be 1-D with at most 2**bits - 1 = {(1 << bits) - 1} "
                         f"entries, got shape {boundaries.shape}")
    packed = np.empty((rows, packed_length(dim, bits)), dtype=np.uint8)
    if packed.size == 0:
        return packed
    # the reference's safe norm, in its dtypes: tested before the cast to float32
    safe_norm = np.where(norm > 0, norm, np.float32(1)).astype(np.float32)
    table, low, scale = _search_grid(boundaries)
    kernel_for(_quantize_rows, rotated.size)(rotated, safe_norm, boundaries, table, low, scale,
                                          bits, packed)
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
        Codes packed LSB-first as `latkv.pack_bits` does (padding bits are ignored). Any
        leading axes ``(..., ceil(dim * bits / 8))`` are kept.
    centroids : numpy.ndarray, shape (2**bits,), float32
        Other dtypes are cast to float32.
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
    bits, dim = check_bits(bits), check_int(dim, "dim", 0)
    _check_packed(packed, bits, dim)
    centroids = _check_centroids(centroids, bits)
    out = np.empty((*packed.shape[:-1], dim), dtype=np.float32)
    if out.size == 0:
        return out
    kernel_for(_dequantize_rows, out.size)(packed.reshape(-1, packed.shape[-1]), centroids, bits,
                                        out.reshape(-1, dim))
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
        Other dtypes are cast to float32.
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
    bits, dim = check_bits(bits), check_int(dim, "dim", 0)
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
    kernel_for(_codebook_scores, out.size * dim)(q, packed, centroids, bits, out)
    return out
