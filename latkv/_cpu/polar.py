"""CPU fast path of PolarQuant's kernels: numba, parallel over rows.

`polar_quantize` fuses the steps of `latkv.polar.polar_quantize_reference` into one pass over
each row, in work buffers of one row: the recursive polar transform (`latkv.polar.polar_angles`)
level by level over the whole row (a row's blocks are contiguous, so level ``l``'s angle ``j``
pairs the squared radii ``2j`` and ``2j + 1`` of level ``l - 1``, in block order), the code
search of every level (the number of boundaries strictly below the angle: a vectorised count
for small codebooks, a binary search for large ones) and the LSB-first packing of
`latkv.packing`. The squared radii (``a a + b b``, then sums of pairs) and the block radii
(their square root) are the reference's float64 operations in its order, hence its values.

The C library's ``atan2`` would cost most of the time (about 30 ns a call, not vectorised),
so the transform computes its angles with a vectorised rational ``atan`` (Cephes, a few
float64 roundings from the exact angle) and counts the codes from them; an angle that is NaN
(a zero pair, two zero radii, infinities, NaN input) or within `SETTLE_MARGIN` (1e-9, a
million times the approximation's error) of a boundary is then recomputed exactly as the
reference does (``arctan2(b, a)`` plus ``2 pi`` when negative, ``arctan2(sqrt(s2),
sqrt(s1))``) and searched again. Every other angle is on the same side of every boundary as
the exact one, so the packed codes are bit-identical to the reference's (numba calls the same
C library ``atan2`` as NumPy's float64 ``arctan2`` on this platform; a NumPy build with its own
vectorised ``arctan2`` could differ by a rounding, and a code with it, for an angle within one
rounding of a boundary).

`polar_dequantize` unpacks each level's codes per row and runs the inverse transform from the
block radii down: every radius splits into ``(r cos psi, r sin psi)``, with ``cos`` and
``sin`` of the centroids taken once per call by NumPy, so each value is the reference's
float64 product cast to float32.

The levels' tables travel as one padded 2-D array with counts, and the per-level packed codes
as one flat byte buffer (level ``l`` a C-contiguous ``(n, width_l)`` block of it), so one
compiled kernel serves every depth and bit allocation. Small inputs run serial clones of the
kernels (`latkv._cpu.serial.kernel_for`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

from latkv._cpu.scalar import _pack_row, _unpack_row
from latkv._cpu.serial import kernel_for
from latkv.checks import check_bits, check_int
from latkv.packing import packed_length
from latkv.polar import SETTLE_MARGIN

ROWS_PER_TASK = 256
#: levels whose codebooks have at most this many boundaries count the boundaries below the
#: angles one by one (a vectorised pass per boundary); larger ones use a binary search
LINEAR_SEARCH_BOUNDARIES = 32
#: the deepest recursion `latkv.polar.PolarQuant` allows
MAX_LEVELS = 8
TWO_PI = 2 * np.pi
PI = np.pi
HALF_PI = np.pi / 2
QUARTER_PI = np.pi / 4
# SETTLE_MARGIN (the reference's): an approximate angle farther than this from every boundary
# has the exact angle's code: the approximation is within a few 1e-16 of the exact angle
# (`tests/test_cpu_polar.py` measures it), the C library's ``atan2`` within one rounding of
# the true one
# Cephes' atan: atan(x) = x + x z P(z) / Q(z), z = x^2, for |x| <= 0.66 (relative error 1e-16)
_P0, _P1, _P2, _P3, _P4 = (-8.750608600031904122785e-1, -1.615753718733365076637e1,
                           -7.500855792314704667340e1, -1.228866684490136173410e2,
                           -6.485021904942025371773e1)
_Q0, _Q1, _Q2, _Q3, _Q4 = (2.485846490142306297962e1, 1.650270098316988542046e2,
                           4.328810604912902668951e2, 4.853903996359136964868e2,
                           1.945506571482613964425e2)


@njit(inline="always")
def _level_starts(dim, levels, starts):
    """``starts[l]``: where level ``l + 1``'s ``dim >> (l + 1)`` angles begin in a row buffer."""
    position = 0
    for level in range(levels):
        starts[level] = position
        position += dim >> (level + 1)


@njit(inline="always")
def _theta(a, b):
    """The reference's level-1 angle: ``arctan2(b, a)``, plus ``2 pi`` when negative."""
    theta = np.arctan2(b, a)
    if theta < 0:
        theta = theta + TWO_PI
    return theta


@njit(inline="always")
def _psi(s1, s2):
    """The reference's angle of two squared radii: ``arctan2(sqrt(s2), sqrt(s1))``."""
    return np.arctan2(np.sqrt(s2), np.sqrt(s1))


@njit(inline="always")
def _approximate_angle(y, x):
    """``arctan2(y, x)`` for ``x, y >= 0`` without a library call (vectorisable): Cephes'
    rational ``atan`` of ``min / max`` in ``[0, 1]``, reflected about ``pi / 4``.

    Its error is a few float64 roundings of ``pi / 2``; NaN where the library's angle needs a
    look (both zero, both infinite, NaN): `_settle` recomputes those. A NaN argument makes the
    comparison below false whichever it is, and lands in the quotient.
    """
    swap = y > x
    numerator = x if swap else y
    denominator = y if swap else x
    t = numerator / denominator
    big = t > 0.66
    u = (t - 1.0) / (t + 1.0) if big else t
    z = u * u
    p = (((_P0 * z + _P1) * z + _P2) * z + _P3) * z + _P4
    q = ((((z + _Q0) * z + _Q1) * z + _Q2) * z + _Q3) * z + _Q4
    angle = (QUARTER_PI if big else 0.0) + (u + u * z * p / q)
    return HALF_PI - angle if swap else angle


@njit(inline="always")
def _approximate_theta(a, b):
    """`_theta` to a few float64 roundings (NaN for a zero pair: settled exactly)."""
    angle = _approximate_angle(np.abs(b), np.abs(a))
    angle = PI - angle if a < 0 else angle
    angle = -angle if b < 0 else angle
    return angle + TWO_PI if angle < 0 else angle


@njit(inline="always")
def _approximate_psi(s1, s2):
    """`_psi` to a few float64 roundings (NaN for two zero radii: settled exactly)."""
    swap = s2 > s1
    small = s1 if swap else s2
    large = s2 if swap else s1
    angle = _approximate_angle(np.sqrt(small), np.sqrt(large))
    return HALF_PI - angle if swap else angle


@njit(inline="always")
def _count_codes(angles, edges, count, codes, near):
    """``codes[j] = #{k < count : edges[k] < angles[j]}`` (`numpy.searchsorted`, side="left"),
    and ``near[j] = 1`` where ``angles[j]`` is NaN or within `SETTLE_MARGIN` of a boundary.

    NaN counts above every boundary, as `numpy.searchsorted` sorts NaN last: ``not (a <= e)``
    in the vectorised count, an explicit test in the binary search.
    """
    if count <= LINEAR_SEARCH_BOUNDARIES:
        for j in range(angles.shape[0]):
            codes[j] = 0
            near[j] = 0
        for k in range(count):
            edge = edges[k]
            for j in range(angles.shape[0]):
                codes[j] += np.int32(not (angles[j] <= edge))
                near[j] |= np.int32(not (np.abs(angles[j] - edge) > SETTLE_MARGIN))
    else:
        for j in range(angles.shape[0]):
            code = _search(angles[j], edges, count)
            codes[j] = code
            near[j] = np.int32(_unsettled(angles[j], code, edges, count))


@njit(inline="always")
def _search(angle, edges, count):
    """One code by binary search (NaN: ``count``)."""
    if angle != angle:
        return count
    low = 0
    high = count
    while low < high:
        middle = (low + high) >> 1
        if edges[middle] < angle:
            low = middle + 1
        else:
            high = middle
    return low


@njit(inline="always")
def _unsettled(angle, code, edges, count):
    """Whether ``angle`` with its ``code`` is NaN or within `SETTLE_MARGIN` of the boundary
    below or above it (so that the exact angle might be on the other side)."""
    if angle != angle:
        return True
    if code > 0 and not (angle - edges[code - 1] > SETTLE_MARGIN):
        return True
    return code < count and not (edges[code] - angle > SETTLE_MARGIN)


@njit(inline="always")
def _settle(level, near, codes, source, below, edges, count):
    """Give the angles flagged ``near`` the codes of the reference's exact angles.

    Level 0 (the first) recomputes `_theta` from the coordinates ``source``, the others `_psi`
    from the squared radii ``below`` of the level below. Rarely any: one pass finds out.
    """
    flagged = 0
    for j in range(near.shape[0]):
        flagged |= near[j]
    if flagged == 0:
        return
    for j in range(near.shape[0]):
        if near[j]:
            if level == 0:
                exact = _theta(np.float64(source[2 * j]), np.float64(source[2 * j + 1]))
            else:
                exact = _psi(below[2 * j], below[2 * j + 1])
            codes[j] = _search(exact, edges, count)


@njit(error_model="numpy", cache=True)
def _quantize_block(rotated, levels, bits, edges, counts, offsets, widths, packed, radius,
                    start, stop):
    """Rows ``start:stop`` of `_quantize_rows` (one task), with their work buffers.

    The transform runs with `_approximate_theta` and `_approximate_psi` (vectorised), the
    codes are counted from those angles, and `_settle` gives every angle within
    `SETTLE_MARGIN` of a boundary (or NaN) the code of the reference's exact angle: the codes
    are the reference's. The squared radii and block radii are the reference's operations.
    The parallel kernel and its serial clone share this compiled function; NumPy's error
    model: a zero pair divides 0 by 0 into NaN instead of raising.
    """
    dim = rotated.shape[1]
    pairs = dim >> 1
    blocks = radius.shape[1]
    starts = np.empty(levels, np.int64)
    _level_starts(dim, levels, starts)
    angles = np.empty(dim, np.float64)
    codes = np.empty(dim, np.int32)
    near = np.empty(dim, np.int32)
    squared = np.empty(dim, np.float64)  # level l's squared radii, laid out as its angles
    top = starts[levels - 1]
    for row in range(start, stop):
        source = rotated[row]
        # level 1: (y_2j, y_2j+1) -> theta in [0, 2 pi), squared radius
        for j in range(pairs):
            a = np.float64(source[2 * j])
            b = np.float64(source[2 * j + 1])
            squared[j] = a * a + b * b
            angles[j] = _approximate_theta(a, b)
        # levels >= 2: squared radii (s_2j, s_2j+1) of the level below -> psi in [0, pi/2]
        # (views indexed from 0: no negative-index wraparound in the way of vectorisation)
        for level in range(1, levels):
            first = starts[level]
            stop_angle = first + (dim >> (level + 1))
            below = squared[starts[level - 1]:first]
            above = squared[first:stop_angle]
            level_angles = angles[first:stop_angle]
            for j in range(level_angles.shape[0]):
                level_angles[j] = _approximate_psi(below[2 * j], below[2 * j + 1])
            # apart: a loop that also writes to the buffer it reads does not vectorise
            for j in range(above.shape[0]):
                above[j] = below[2 * j] + below[2 * j + 1]
        norms = squared[top:top + blocks]
        row_radius = radius[row]
        for block in range(blocks):
            row_radius[block] = np.sqrt(norms[block])
        for level in range(levels):
            first = starts[level]
            stop_angle = first + (dim >> (level + 1))
            level_codes = codes[first:stop_angle]
            level_near = near[first:stop_angle]
            _count_codes(angles[first:stop_angle], edges[level], counts[level], level_codes,
                         level_near)
            _settle(level, level_near, level_codes, source,
                    squared[starts[level - 1]:first] if level else squared, edges[level],
                    counts[level])
            position = offsets[level] + row * widths[level]
            _pack_row(level_codes, bits[level], packed[position:position + widths[level]])


@njit(parallel=True, cache=True)
def _quantize_rows(rotated, levels, bits, edges, counts, offsets, widths, packed, radius):
    """Kernel: the polar transform, codes and packing of every row of ``rotated (n, d)``.

    ``edges (levels, m)`` float64 holds level ``l``'s ``counts[l]`` boundaries, ``packed``
    (flat uint8) level ``l``'s row ``i`` at ``offsets[l] + i * widths[l]``, ``radius (n, d >>
    levels)`` float64 receives the block norms.
    """
    rows = rotated.shape[0]
    tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(tasks):
        _quantize_block(rotated, levels, bits, edges, counts, offsets, widths, packed, radius,
                        task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK))


@njit(cache=True)
def _dequantize_block(packed, offsets, widths, bits, levels, cosines, sines, radius, out,
                      start, stop):
    """Rows ``start:stop`` of `_dequantize_rows` (one task), with their work buffers."""
    dim = out.shape[1]
    pairs = dim >> 1
    blocks = radius.shape[1]
    starts = np.empty(levels, np.int64)
    _level_starts(dim, levels, starts)
    codes = np.empty(dim, np.uint8)
    current = np.empty(pairs, np.float64)
    following = np.empty(pairs, np.float64)
    for row in range(start, stop):
        for level in range(levels):
            position = offsets[level] + row * widths[level]
            first = starts[level]
            _unpack_row(packed[position:position + widths[level]], bits[level],
                        codes[first:first + (dim >> (level + 1))])
        for block in range(blocks):
            current[block] = radius[row, block]
        # levels L .. 2: radius j -> (r cos psi_j, r sin psi_j) at 2j, 2j + 1
        count = blocks
        for level in range(levels - 1, 0, -1):
            first = starts[level]
            for j in range(count):
                code = codes[first + j]
                r = current[j]
                following[2 * j] = r * cosines[level, code]
                following[2 * j + 1] = r * sines[level, code]
            count <<= 1
            current, following = following, current
        # level 1: radius j -> (r cos theta_j, r sin theta_j) = (y_2j, y_2j+1)
        target = out[row]
        for j in range(pairs):
            code = codes[j]
            r = current[j]
            target[2 * j] = np.float32(r * cosines[0, code])
            target[2 * j + 1] = np.float32(r * sines[0, code])


@njit(parallel=True, cache=True)
def _dequantize_rows(packed, offsets, widths, bits, levels, cosines, sines, radius, out):
    """Kernel: ``out (n, dim)`` float32 from the flat packed codes and ``radius (n, blocks)``
    float64; ``cosines`` and ``sines (levels, 256)`` are the centroids' per level."""
    rows = out.shape[0]
    tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(tasks):
        _dequantize_block(packed, offsets, widths, bits, levels, cosines, sines, radius, out,
                          task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK))


def _check_levels(levels: Any, level_bits: Any, tables: Any, name: str,
                  dim: int) -> tuple[int, np.ndarray]:
    levels = check_int(levels, "levels", 1, MAX_LEVELS)
    if dim % (1 << levels):
        raise ValueError(f"the dimension ({dim}) must be a multiple of 2^levels = {1 << levels}")
    bits = np.array([check_bits(b, "level_bits") for b in level_bits], dtype=np.int64)
    if bits.shape[0] != levels:
        raise ValueError(f"level_bits must give one width per level ({levels}), got "
                         f"{tuple(bits.tolist())}")
    if len(tables) != levels:
        raise ValueError(f"{name} must give one table per level ({levels}), got {len(tables)}")
    return levels, bits


def _layout(rows: int, dim: int, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Byte widths per row of each level's packed codes and their offsets in the flat buffer."""
    widths = np.array([packed_length(dim >> level, int(b)) for level, b in
                       enumerate(bits.tolist(), start=1)], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(rows * widths)[:-1]]).astype(np.int64)
    return offsets, widths


def polar_quantize(rotated: np.ndarray, levels: int, level_bits: tuple[int, ...],
                   boundaries: tuple[np.ndarray, ...]) -> tuple[tuple[np.ndarray, ...],
                                                                np.ndarray]:
    """Codes of every level and the block radii of rotated vectors (numba backend).

    Parameters
    ----------
    rotated : numpy.ndarray, shape (n, d), float32
        Preconditioned vectors; ``d`` a multiple of ``2^levels``. float64 is used as is, other
        dtypes are converted to float64 (as the reference does), other layouts copied.
    levels : int
        Recursion depth, 1..8: blocks of ``2^levels`` coordinates.
    level_bits : tuple of int
        Bits per angle at each level, 1..8 each.
    boundaries : tuple of numpy.ndarray, shape (m_l,), float64
        Increasing angle boundaries per level (``m_l <= 2**level_bits[l] - 1``; other dtypes
        are cast to float64); a code is the number of boundaries strictly below the angle
        (``numpy.searchsorted(boundaries, angle, side="left")``).

    Returns
    -------
    packed : tuple of numpy.ndarray, shape (n, ceil((d >> l) * level_bits[l - 1] / 8)), uint8
        Level ``l``'s codes in block order, packed LSB-first as `latkv.pack_bits` does; each a
        C-contiguous view of one buffer.
    radius : numpy.ndarray, shape (n, d >> levels), float64
        Block norms.

    Codes and radii are bit-identical to `latkv.polar.polar_quantize_reference`.
    """
    rotated = np.asarray(rotated)
    if rotated.ndim != 2:
        raise ValueError(f"rotated must be 2-D (n, d), got shape {rotated.shape}")
    rotated = np.ascontiguousarray(
        rotated, dtype=rotated.dtype if rotated.dtype in (np.float32, np.float64) else np.float64)
    rows, dim = rotated.shape
    levels, bits = _check_levels(levels, level_bits, boundaries, "boundaries", dim)
    tables = [np.asarray(edges, dtype=np.float64) for edges in boundaries]
    for level, (edges, b) in enumerate(zip(tables, bits.tolist()), start=1):
        if edges.ndim != 1 or edges.shape[0] > (1 << b) - 1:
            raise ValueError(f"boundaries of level {level} must be 1-D with at most "
                             f"2**bits - 1 = {(1 << b) - 1} entries, got shape {edges.shape}")
    counts = np.array([edges.shape[0] for edges in tables], dtype=np.int64)
    edges = np.full((levels, max(1, int(counts.max()))), np.inf)
    for level, table in enumerate(tables):
        edges[level, :table.shape[0]] = table
    offsets, widths = _layout(rows, dim, bits)
    packed = np.empty(int((rows * widths).sum()), dtype=np.uint8)
    radius = np.empty((rows, dim >> levels), dtype=np.float64)
    if rotated.size:
        kernel_for(_quantize_rows, rotated.size)(rotated, levels, bits, edges, counts, offsets,
                                                widths, packed, radius)
    levels_packed = tuple(packed[offset:offset + rows * width].reshape(rows, width)
                          for offset, width in zip(offsets.tolist(), widths.tolist()))
    return levels_packed, radius


def polar_dequantize(packed: tuple[np.ndarray, ...], radius: np.ndarray, levels: int,
                     level_bits: tuple[int, ...], centroids: tuple[np.ndarray, ...],
                     dim: int) -> np.ndarray:
    """The rotated-domain reconstruction from packed angle codes and block radii (numba backend).

    Parameters
    ----------
    packed : tuple of numpy.ndarray, shape (n, ceil((dim >> l) * level_bits[l - 1] / 8)), uint8
        Level ``l``'s codes as `polar_quantize` returns them (padding bits are ignored).
    radius : numpy.ndarray, shape (n, dim >> levels), float16, float32 or float64
        Block radii (the stored float16/float32 or the float64 of `polar_quantize`); converted
        to float64.
    levels : int
        Recursion depth, 1..8.
    level_bits : tuple of int
        Bits per angle at each level, 1..8 each.
    centroids : tuple of numpy.ndarray, shape (>= 2**level_bits[l - 1],), float64
        Angle centroids per level (other dtypes are cast to float64).
    dim : int
        Coordinates per vector, ``radius.shape[1] * 2^levels``.

    Returns
    -------
    numpy.ndarray, shape (n, dim), float32
        Every value the reference's float64 product ``r * cos(angle)`` or ``r * sin(angle)``
        cast to float32: equal to `latkv.polar.polar_dequantize_reference` where NumPy's and
        the kernel's cosines agree (to one float32 rounding otherwise).
    """
    dim = check_int(dim, "dim", 0)
    radius = np.asarray(radius)
    if radius.ndim != 2:
        raise ValueError(f"radius must be 2-D (n, blocks), got shape {radius.shape}")
    levels, bits = _check_levels(levels, level_bits, centroids, "centroids", dim)
    rows = radius.shape[0]
    if radius.shape[1] != dim >> levels:
        raise ValueError(f"radius must have shape (n, dim >> levels) = (n, {dim >> levels}), "
                         f"got {radius.shape}")
    if len(packed) != levels:
        raise ValueError(f"packed must give one array per level ({levels}), got {len(packed)}")
    offsets, widths = _layout(rows, dim, bits)
    arrays = []
    for level, (codes, width) in enumerate(zip(packed, widths.tolist()), start=1):
        codes = np.asarray(codes)
        if codes.dtype != np.uint8 or codes.shape != (rows, width):
            raise ValueError(f"packed level {level} must be uint8 of shape ({rows}, {width}), "
                             f"got {codes.dtype} {codes.shape}")
        arrays.append(codes.reshape(-1))
    cosines = np.zeros((levels, 256), dtype=np.float64)
    sines = np.zeros((levels, 256), dtype=np.float64)
    for level, (points, b) in enumerate(zip(centroids, bits.tolist())):
        points = np.asarray(points, dtype=np.float64)
        if points.ndim != 1 or points.shape[0] < (1 << b):
            raise ValueError(f"centroids of level {level + 1} must be 1-D with at least "
                             f"2**bits = {1 << b} entries, got shape {points.shape}")
        # the reference's cos(points[code]) and sin(points[code]), by NumPy, once per centroid
        cosines[level, :1 << b] = np.cos(points[:1 << b])
        sines[level, :1 << b] = np.sin(points[:1 << b])
    out = np.empty((rows, dim), dtype=np.float32)
    if out.size == 0:
        return out
    flat = np.concatenate(arrays)
    kernel_for(_dequantize_rows, out.size)(flat, offsets, widths, bits, levels, cosines, sines,
                                           np.ascontiguousarray(radius, dtype=np.float64), out)
    return out
