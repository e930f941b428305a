"""CPU fast path of the fixed-rate E8 Voronoi code (`latkv.e8`): numba, parallel over rows.

`voronoi_encode` runs `latkv.e8.voronoi_encode_reference` one vector at a time, fused into a
single pass over each row; `voronoi_decode` runs `latkv.e8.voronoi_decode_reference`. Both are
bit-identical to the references (scales, labels and points), since every value is the
reference's, computed with the same float32 / float64 operations:

* ``base = float64(max_i |x_i|) / 2^bits``; a rung's candidate is ``p = base * m`` (float64)
  rounded *once* to float16, round half to even, as NumPy's float64 -> float16 cast: with
  ``2^e <= p < 2^(e + 1)`` the float16 quantum is ``2^k``, ``k = e - 10`` (``k = -24`` below
  ``2^-14``: the subnormals), and ``ldexp(rint(ldexp(p, -k)), k)`` is exact in float64
  (``ldexp`` only moves the exponent; ``rint`` rounds halves to even). Then ``max(s, 2^-24)``
  in float32. The caller keeps ``p`` below 65504 (`latkv.e8.E8Stage` checks the top rung), so
  the float16 overflow to infinity never happens here;
* the search is the reference's: coarse rungs ``0, 8, ...`` below ``r - 1`` (else ``r - 1``,
  which is not tried), then the 7 rungs below the coarse one, lowest first, ``>= 0`` only
  (else the coarse rung). A rung *fits* when for every group ``λ = nearest_e8(float32(x_g /
  s))`` has ``nearest_e8(float32(λ - a) / float32(q)) == 0``. The kernel stops at the first
  group that does not fit, trying first the group that failed the previous rung (any order
  gives the same answer). Most groups are decided without a nearest-point search: ``max <v,
  r>`` over E8's roots (`_root_max`) of ``v = x_g / s`` (estimated as ``_root_max(x_g) / s``,
  once per row and group), and then of ``w = (λ - a) / q``, is compared with bounds whose
  margins are far above every rounding involved (`_cell_bounds`, `_SLACK`), so these
  shortcuts only ever give the exact search's answer. The rest run the exact search, where a
  group is out as soon as the D8 candidate of ``w`` is not zero (``-0.0`` counts as zero, as
  in the reference's ``!= 0``): the coset candidate is never zero, so the E8 point is then
  not zero either;
* the nearest points are the lattice kernels' (`latkv._cpu.lattice._nearest_d8_point`, inlined,
  and the E8 step of `latkv._cpu.lattice`: the coset candidate ``D8(x - 0.5) + 0.5`` in
  float32, ``sum_i float64(float32(x_i - y_i))^2`` in order 0..7, a tie to D8);
* labels ``k = rint(λ G^-1) mod q``: with ``d = 2 λ`` (exact integers) ``λ G^-1`` is
  ``k_7 = d_7``, ``k_j = (sum_{i=j..6} (d_i - d_7)) / 2`` for ``j = 1..6`` and ``k_0 =
  (sum_{i=0..6} (d_i - d_7)) / 4``, exact integer divisions (the reference's float64 product
  is exact too: its entries are multiples of 1/4); ``mod q`` is ``& (q - 1)``;
* decoding: ``y = k G`` (``y_7 = k_7 / 2``, ``y_6 = k_6 + k_7 / 2``, ``y_j = k_j - k_{j+1} +
  k_7 / 2`` for ``j = 1..5``, ``y_0 = 2 k_0 - k_1 + k_7 / 2``: exact in float32), the point
  ``y - float32(q) * nearest_e8(float32(y - a) / float32(q))`` and its product with the
  float32 scale (one rounding, as the reference's ``points * scale``).

The points that the fit test of a row's chosen rung computed are kept for its labels; the
others (the groups the bounds decided, or every group at the top rung, which is never tried)
are computed afterwards.

Rows are split into tasks of `ROWS_PER_TASK`; small inputs run serial clones of the kernels
(`latkv._cpu.serial.kernel_for`).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from latkv._cpu.lattice import _nearest_d8_point, nearest_e8_point
from latkv._cpu.serial import kernel_for
from latkv.e8 import TIE_OFFSET

#: rows per parallel task (a row of 128 coordinates costs a few microseconds to encode)
ROWS_PER_TASK = 64
_SMALLEST_SCALE = np.float32(2.0 ** -24)
#: ``max <w, r>`` over the roots below which ``nearest_e8(w) = 0``, above which not
#: (`_cell_bounds`)
_INSIDE = 1.0 - 2.0 ** -10
_OUTSIDE = 1.0 + 2.0 ** -10
#: ``_root_max(x_g) / s`` is within a factor ``1 ± 2^-21`` of ``_root_max(float32(x_g / s))``
#: (each quotient is within ``2^-24`` of the exact one, and the root bound is at least an
#: eighth of ``sum_i |v_i|``; float32 subnormal quotients add errors near ``2^-149``, far
#: below the bounds' margins): with this slack the bounds decide a group without dividing it
_SLACK = 2.0 ** -20


@njit(inline="always")
def _scale_candidate(base, multiplier):
    """``max(float32(fp16(base * multiplier)), 2^-24)``: one float64 -> float16 rounding,
    halves to even (`latkv.e8.scale_candidate`); ``base * multiplier`` below 65520."""
    p = base * multiplier
    _, exponent = math.frexp(p)                  # p = f 2^exponent, f in [0.5, 1)
    step = max(exponent - 11, -24)               # the float16 quantum 2^step of p's binade
    rounded = math.ldexp(np.rint(math.ldexp(p, -step)), step)
    return max(np.float32(rounded), _SMALLEST_SCALE)


@njit(inline="always")
def _nearest_is_zero(w, integer, shifted, coset):
    """Whether ``nearest_e8(w)`` is the zero vector (``-0.0`` included)."""
    _nearest_d8_point(w, integer)
    for i in range(8):
        if integer[i] != 0:
            return False                         # the coset candidate is never zero either
    half = np.float32(0.5)
    for i in range(8):
        shifted[i] = w[i] - half
    _nearest_d8_point(shifted, coset)
    integer_distance = 0.0
    coset_distance = 0.0
    for i in range(8):
        a = np.float64(w[i] - integer[i])
        integer_distance = integer_distance + a * a
        b = np.float64(w[i] - (coset[i] + half))
        coset_distance = coset_distance + b * b
    return integer_distance <= coset_distance


@njit(inline="always")
def _root_max(v, start):
    """``max <v, r>`` over E8's 240 roots ``r``, in float64: the larger of ``|v|_(1) +
    |v|_(2)`` (the two largest magnitudes: the roots ``±e_i ± e_j``) and ``sum_i |v_i| / 2``,
    less the smallest ``|v_i|`` when an odd number of the ``v_i`` are negative (the roots
    ``(±1/2)^8`` with an even number of minus signs)."""
    first = 0.0
    second = 0.0
    total = 0.0
    smallest = np.inf
    negatives = 0
    for i in range(8):
        value = v[start + i]
        a = abs(np.float64(value))
        total += a
        second = max(second, min(first, a))
        first = max(first, a)
        smallest = min(smallest, a)
        negatives += value < 0
    if negatives & 1:
        total -= 2.0 * smallest
    return max(first + second, 0.5 * total)


@njit(inline="always")
def _fits(x, roots, s, hot, inner, outer, offset, q, points, computed, v, point, w, integer,
          shifted, coset):
    """``-1`` when every group of the row ``x`` lands in the code at scale ``s``, else a group
    that does not. Groups are tried from ``hot`` on (wrapping), so that the group that failed
    the last rung goes first; the order does not change the answer. Most groups are decided
    without a nearest-point search by ``roots[g] / s`` (``roots[g] = _root_max(x_g)``, within
    `_SLACK` of the root bound of ``v = x_g / s``) against `_cell_bounds`; the others find
    ``λ = nearest_e8(v)`` (into ``points``, ``computed[g]`` says whether it was) and are decided
    by the root bound of ``w = (λ - a) / q`` with a margin, else by the exact search of
    ``nearest_e8(w)``."""
    groups = x.shape[0] // 8
    inverse = 1.0 / np.float64(s)
    for t in range(groups):
        g = hot + t
        if g >= groups:
            g -= groups
        estimate = roots[g] * inverse        # _root_max(x_g / s), up to 1 ± _SLACK
        if estimate * (1.0 + _SLACK) <= inner:   # λ is in the code, whichever it is
            computed[g] = False
            continue
        if estimate * (1.0 - _SLACK) >= outer:   # λ is not
            return g
        for i in range(8):
            v[i] = x[8 * g + i] / s
        nearest_e8_point(v, point, shifted, coset)
        computed[g] = True
        for i in range(8):
            points[8 * g + i] = point[i]
            w[i] = (point[i] - offset[i]) / q
        bound = _root_max(w, 0)
        if bound <= _INSIDE:                 # nearest_e8(w) = 0
            continue
        if bound >= _OUTSIDE or not _nearest_is_zero(w, integer, shifted, coset):
            return g
    return -1


def _cell_bounds(bits: int) -> tuple[float, float]:
    """``(inner, outer)``: `_root_max` of ``v = x_g / s`` at most ``inner`` puts ``λ =
    nearest_e8(v)`` in the code, at least ``outer`` outside it.

    E8's Voronoi cell is ``V = {w : <w, r> <= 1}`` over its 240 roots ``r`` (its relevant
    vectors, ``|r|^2 = 2``). With ``δ = 2^-10``: for ``w`` in ``(1 - δ) V`` every lattice point
    ``p != 0`` has ``|w - p|^2 - |w|^2 = |p|^2 - 2 <w, p> >= 2 δ``, and outside ``(1 + δ) V``
    a root ``r`` has ``|w - r|^2 <= |w|^2 - 2 δ``; both margins are far above the roundings
    of the nearest-point search (float32 differences of magnitudes below ``2^9``, float64
    sums), whose D8 part is exact: so ``nearest_e8(w)`` is 0 in the first case, and not in
    the second (a D8 root gives a nonzero D8 candidate; a coset root beats the D8
    candidate). Those are `_INSIDE` and `_OUTSIDE` for ``w = (λ - a) / q``. And ``|λ - v| <=
    1`` (E8's covering radius, up to the same roundings) while ``|<a, r>| < 0.05``, so
    ``<λ - a, r>`` is within 1.5 of ``<v, r>``: ``inner = q (1 - δ) - 1.5`` and ``outer = q (1 +
    δ) + 1.5`` (``inner > 0`` for every ``q >= 2``).
    """
    q = 1 << bits
    return q * _INSIDE - 1.5, q * _OUTSIDE + 1.5


@njit(inline="always")
def _labels(points, mask, target):
    """``target[:] = rint(points G^-1) mod q`` of the E8 points ``points (dim,)``."""
    for g in range(points.shape[0] // 8):
        last = np.int64(points[8 * g + 7] * np.float32(2.0))
        total = np.int64(0)
        for i in range(6, 0, -1):
            total += np.int64(points[8 * g + i] * np.float32(2.0)) - last
            target[8 * g + i] = np.uint8((total >> 1) & mask)
        total += np.int64(points[8 * g] * np.float32(2.0)) - last
        target[8 * g] = np.uint8((total >> 2) & mask)
        target[8 * g + 7] = np.uint8(last & mask)


@njit(cache=True)
def _encode_block(rotated, multipliers, bits, inner, outer, offset, scale, labels, start, stop):
    """Rows ``start:stop`` of `_encode_rows` (one task), with their work buffers."""
    dim = rotated.shape[1]
    groups = dim // 8
    q = np.float32(1 << bits)
    mask = np.int64((1 << bits) - 1)
    last = multipliers.shape[0] - 1
    best = np.empty(dim, np.float32)
    trial = np.empty(dim, np.float32)
    best_computed = np.zeros(groups, np.bool_)
    trial_computed = np.zeros(groups, np.bool_)
    v = np.empty(8, np.float32)
    point = np.empty(8, np.float32)
    w = np.empty(8, np.float32)
    integer = np.empty(8, np.float32)
    shifted = np.empty(8, np.float32)
    coset = np.empty(8, np.float32)
    roots = np.empty(groups, np.float64)
    for row in range(start, stop):
        x = rotated[row]
        largest = np.float32(0.0)
        for i in range(dim):
            largest = max(largest, abs(x[i]))
        for g in range(groups):
            roots[g] = _root_max(x, 8 * g)
        base = np.float64(largest) / (1 << bits)
        hot = 0
        coarse = last
        found = False
        for rung in range(0, last, 8):
            failed = _fits(x, roots, _scale_candidate(base, multipliers[rung]), hot, inner,
                           outer, offset, q, best, best_computed, v, point, w, integer, shifted,
                           coset)
            if failed < 0:
                coarse = rung
                found = True
                break
            hot = failed
        chosen = coarse
        for step in range(7, 0, -1):         # rungs coarse - 7 .. coarse - 1, lowest first
            rung = coarse - step
            if rung < 0:
                continue
            failed = _fits(x, roots, _scale_candidate(base, multipliers[rung]), hot, inner,
                           outer, offset, q, trial, trial_computed, v, point, w, integer,
                           shifted, coset)
            if failed < 0:
                chosen = rung
                best, trial = trial, best
                best_computed, trial_computed = trial_computed, best_computed
                found = True
                break
            hot = failed
        s = _scale_candidate(base, multipliers[chosen])
        # the points the fit test skipped (or all: the top rung is never tried)
        for g in range(groups):
            if not (found and best_computed[g]):
                for i in range(8):
                    v[i] = x[8 * g + i] / s
                nearest_e8_point(v, point, shifted, coset)
                for i in range(8):
                    best[8 * g + i] = point[i]
        scale[row] = s
        _labels(best, mask, labels[row])


@njit(parallel=True, cache=True)
def _encode_rows(rotated, multipliers, bits, inner, outer, offset, scale, labels):
    """Kernel: ``scale (n,)`` and ``labels (n, dim)`` of every row of ``rotated (n, dim)``;
    ``inner, outer``: `_cell_bounds` ``(bits)``, ``offset``: `latkv.e8.TIE_OFFSET`."""
    rows = rotated.shape[0]
    tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(tasks):
        _encode_block(rotated, multipliers, bits, inner, outer, offset, scale, labels,
                      task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK))


@njit(cache=True)
def _decode_block(labels, scale, bits, offset, out, start, stop):
    """Rows ``start:stop`` of `_decode_rows` (one task), with their work buffers."""
    dim = labels.shape[1]
    q = np.float32(1 << bits)
    half = np.float32(0.5)
    y = np.empty(8, np.float32)
    w = np.empty(8, np.float32)
    shift = np.empty(8, np.float32)
    shifted = np.empty(8, np.float32)
    coset = np.empty(8, np.float32)
    for row in range(start, stop):
        k = labels[row]
        s = scale[row]
        target = out[row]
        for g in range(dim // 8):
            k7 = np.int64(k[8 * g + 7])
            # y = k G in halves: exact small integers, then halved exactly in float32
            for i in range(1, 7):
                following = np.int64(k[8 * g + i + 1]) if i < 6 else np.int64(0)
                y[i] = np.float32(2 * (np.int64(k[8 * g + i]) - following) + k7) * half
            y[0] = np.float32(4 * np.int64(k[8 * g]) - 2 * np.int64(k[8 * g + 1]) + k7) * half
            y[7] = np.float32(k7) * half
            for i in range(8):
                w[i] = (y[i] - offset[i]) / q
            nearest_e8_point(w, shift, shifted, coset)
            for i in range(8):
                target[8 * g + i] = (y[i] - q * shift[i]) * s


@njit(parallel=True, cache=True)
def _decode_rows(labels, scale, bits, offset, out):
    """Kernel: ``out (n, dim)`` float32, the code points of ``labels`` times ``scale``."""
    rows = labels.shape[0]
    tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(tasks):
        _decode_block(labels, scale, bits, offset, out, task * ROWS_PER_TASK,
                      min(rows, (task + 1) * ROWS_PER_TASK))


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or int(bits) != bits or not 1 <= int(bits) <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    return int(bits)


def voronoi_encode(rotated: np.ndarray, multipliers: np.ndarray,
                   bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and labels of each vector (numba backend of `latkv.e8.voronoi_encode_reference`).

    Parameters
    ----------
    rotated : numpy.ndarray, shape (n, dim), float32
        ``dim`` a multiple of 8; finite (not checked). Other layouts and dtypes are copied to
        C-contiguous float32.
    multipliers : numpy.ndarray, shape (r,), float64
        `latkv.e8.scale_ladder` ``(bits)[1]``; ``max|x| / 2^bits * multipliers[-1]`` must stay
        below 65504 (`latkv.e8.E8Stage` checks it).
    bits : int, 1..8

    Returns
    -------
    scale : numpy.ndarray, shape (n,), float32 holding float16 values
    labels : numpy.ndarray, shape (n, dim), uint8
        Bit-identical to the reference's.
    """
    bits = _check_bits(bits)
    rotated = np.ascontiguousarray(rotated, dtype=np.float32)
    if rotated.ndim != 2 or rotated.shape[1] % 8:
        raise ValueError(f"rotated must have shape (n, dim) with dim a multiple of 8, got "
                         f"{rotated.shape}")
    multipliers = np.ascontiguousarray(multipliers, dtype=np.float64)
    if multipliers.ndim != 1 or multipliers.shape[0] == 0:
        raise ValueError(f"multipliers must be a non-empty 1-D array, got shape "
                         f"{multipliers.shape}")
    rows, dim = rotated.shape
    scale = np.empty(rows, dtype=np.float32)
    labels = np.empty((rows, dim), dtype=np.uint8)
    if rows and dim:
        inner, outer = _cell_bounds(bits)
        kernel_for(_encode_rows, rotated.size)(rotated, multipliers, np.int64(bits), inner,
                                               outer, TIE_OFFSET, scale, labels)
    elif rows:
        scale[:] = _SMALLEST_SCALE               # no coordinates: max |x| = 0 (the floor)
    return scale, labels


def voronoi_decode(labels: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """Code points times their scale (numba backend of `latkv.e8.voronoi_decode_reference`).

    Parameters
    ----------
    labels : numpy.ndarray, shape (n, dim), uint8
        ``dim`` a multiple of 8, values below ``2^bits`` (higher bits are not masked).
    scale : numpy.ndarray, shape (n,), float32 (other dtypes are converted)
    bits : int, 1..8

    Returns
    -------
    numpy.ndarray, shape (n, dim), float32
        Bit-identical to the reference's.
    """
    bits = _check_bits(bits)
    labels = np.ascontiguousarray(labels)
    if labels.dtype != np.uint8:
        raise TypeError(f"labels must be uint8, got {labels.dtype}")
    if labels.ndim != 2 or labels.shape[1] % 8:
        raise ValueError(f"labels must have shape (n, dim) with dim a multiple of 8, got "
                         f"{labels.shape}")
    scale = np.ascontiguousarray(scale, dtype=np.float32)
    if scale.shape != labels.shape[:1]:
        raise ValueError(f"scale must have shape ({labels.shape[0]},), got {scale.shape}")
    out = np.empty(labels.shape, dtype=np.float32)
    if out.size:
        kernel_for(_decode_rows, out.size)(labels, scale, np.int64(bits), TIE_OFFSET, out)
    return out
