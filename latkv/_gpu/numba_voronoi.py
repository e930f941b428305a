"""Second GPU implementation of the fixed-rate E8 Voronoi code: numba.cuda kernels.

Same operations, same results and the same work split as ``cuda_kernels/voronoi.cu``
(references: `latkv.e8.voronoi_encode_reference`, `latkv.e8.voronoi_decode_reference`,
bit-identical): one thread per vector to encode, one per group of 8 to decode, grid-stride.

* The scale candidate of a rung: ``p = base * m`` in float64, rounded once to float16, halves
  to even: the float16 spacing ``u`` of ``p``'s binade (``2^-24`` below ``2^-13``, doubled at
  every power of two above: a short loop, no ``frexp``), then ``round(p / u) * u``, exact
  (``round`` is ``llrint``, halves to even, on the device and Python's ``round`` in the
  simulator); then ``max(s, 2^-24)`` in float32. No fused multiply-add can touch ``base * m``:
  nothing is added to it.
* The search (coarse rungs ``0, 8, ...``, then the 7 below, first fitting), the bounds that
  decide most groups without a nearest-point search (`latkv._cpu.voronoi._cell_bounds` and
  ``_SLACK``: their margins are far above every rounding involved, so they only ever give the
  exact search's answer), the labels in integers and the decoded points are those of
  ``voronoi.cu``.
* The nearest points are `latkv._gpu.numba_lattice`'s device functions (``_nearest_d8_point``,
  ``_squared_distance``) with the E8 step of its kernel, hence its tie rules and results.

float32 ``/``, ``-``, ``*`` round to nearest (no fast math); the float32 product ``q * shift``
is exact, so a contraction of ``y - q * shift`` into an FMA cannot change it. NumPy inputs are
copied to the device and back (how the kernels run in the CUDA simulator,
``NUMBA_ENABLE_CUDASIM=1``) and give NumPy results; CuPy inputs (or anything else exposing
``__cuda_array_interface__``) stay on the device, run on CuPy's current stream and give CuPy
results.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# numba.cuda must be a module global: the CUDA simulator swaps the kernel's global ``cuda``.
from numba import cuda, float32, float64, int64

from latkv._cpu.voronoi import _INSIDE, _OUTSIDE, _SLACK, _cell_bounds
from latkv._gpu.cupy_voronoi import SMALLEST_SCALE, decode_arguments, encode_arguments
from latkv._gpu.numba_lattice import _nearest_d8_point, _squared_distance, nearest_e8_point
from latkv._gpu.numba_launch import DeviceArrays, grid_blocks
from latkv.e8 import TIE_OFFSET

# float16 spacing of the subnormals and of the first binade [2^-14, 2^-13)
_SUBNORMAL_QUANTUM = 2.0 ** -24
_FIRST_BINADE_TOP = 2.0 ** -13


@cuda.jit(device=True)
def _scale_candidate(base, multiplier):
    """``max(float32(fp16(base * multiplier)), 2^-24)``: one rounding, halves to even."""
    p = base * multiplier
    quantum = float64(_SUBNORMAL_QUANTUM)    # the float16 spacing below 2^-13 ...
    top = float64(_FIRST_BINADE_TOP)
    while p >= top:                          # ... doubling with every binade above
        quantum *= float64(2.0)
        top *= float64(2.0)
    rounded = float64(round(p / quantum)) * quantum   # exact: powers of two, llrint
    return max(float32(rounded), float32(SMALLEST_SCALE))


@cuda.jit(device=True)
def _nearest_is_zero(w, integer, shifted, coset):
    """Whether ``nearest_e8(w)`` is the zero vector (``-0.0`` included)."""
    _nearest_d8_point(w, integer)
    zero = True
    for i in range(8):
        zero = zero and integer[i] == float32(0.0)
    if not zero:
        return False                     # the coset candidate is never zero either
    half = float32(0.5)
    for i in range(8):
        shifted[i] = w[i] - half
    _nearest_d8_point(shifted, coset)
    for i in range(8):
        coset[i] = coset[i] + half
    return _squared_distance(w, integer) <= _squared_distance(w, coset)


@cuda.jit(device=True)
def _root_max(v):
    """``max <v, r>`` over E8's 240 roots (`latkv._cpu.voronoi._root_max`), float64."""
    first = float64(0.0)
    second = float64(0.0)
    total = float64(0.0)
    smallest = float64(math.inf)
    negatives = 0
    for i in range(8):
        a = abs(float64(v[i]))
        total += a
        second = max(second, min(first, a))
        first = max(first, a)
        smallest = min(smallest, a)
        if v[i] < float32(0.0):
            negatives += 1
    if negatives & 1:
        total -= float64(2.0) * smallest
    return max(first + second, float64(0.5) * total)


@cuda.jit(device=True)
def _fits(x, row, s, hot, inner, outer, offset, q, v, point, w, integer, shifted, coset):
    """``-1`` when every group of ``x[row]`` fits at scale ``s``, else a group that does not;
    groups are tried from ``hot`` on, wrapping."""
    groups = x.shape[1] // 8
    inverse = float64(1.0) / float64(s)
    for t in range(groups):
        g = hot + t
        if g >= groups:
            g -= groups
        for i in range(8):
            v[i] = x[row, 8 * g + i]
        estimate = _root_max(v) * inverse   # the root bound of x_g / s, up to 1 ± _SLACK
        if estimate * (float64(1.0) + _SLACK) <= inner:  # λ is in the code, whichever it is
            continue
        if estimate * (float64(1.0) - _SLACK) >= outer:  # it is not
            return g
        for i in range(8):
            v[i] = v[i] / s
        nearest_e8_point(v, point, shifted, coset)
        for i in range(8):
            w[i] = (point[i] - offset[i]) / q
        bound = _root_max(w)
        if bound <= _INSIDE:             # nearest_e8(w) = 0
            continue
        if bound >= _OUTSIDE or not _nearest_is_zero(w, integer, shifted, coset):
            return g
    return -1


@cuda.jit
def _encode_kernel(x, multipliers, offset, scale, labels, bits, inner, outer):
    v = cuda.local.array(8, float32)
    point = cuda.local.array(8, float32)
    w = cuda.local.array(8, float32)
    integer = cuda.local.array(8, float32)
    shifted = cuda.local.array(8, float32)
    coset = cuda.local.array(8, float32)
    rows = x.shape[0]
    dim = x.shape[1]
    groups = dim // 8
    q = float32(1 << bits)
    mask = int64((1 << bits) - 1)
    last = multipliers.shape[0] - 1
    row = cuda.grid(1)
    stride = cuda.gridsize(1)
    while row < rows:
        largest = float32(0.0)
        for i in range(dim):
            largest = max(largest, abs(x[row, i]))
        base = float64(largest) / float64(1 << bits)
        hot = 0
        coarse = last
        rung = 0
        while rung < last:
            failed = _fits(x, row, _scale_candidate(base, multipliers[rung]), hot, inner, outer,
                           offset, q, v, point, w, integer, shifted, coset)
            if failed < 0:
                coarse = rung
                break
            hot = failed
            rung += 8
        chosen = coarse
        for step in range(7, 0, -1):     # rungs coarse - 7 .. coarse - 1, lowest first
            rung = coarse - step
            if rung >= 0:
                failed = _fits(x, row, _scale_candidate(base, multipliers[rung]), hot, inner,
                               outer, offset, q, v, point, w, integer, shifted, coset)
                if failed < 0:
                    chosen = rung
                    break
                hot = failed
        s = _scale_candidate(base, multipliers[chosen])
        scale[row] = s
        for g in range(groups):
            for i in range(8):
                v[i] = x[row, 8 * g + i] / s
            nearest_e8_point(v, point, shifted, coset)
            # k = λ G^-1 mod q from d = 2 λ: k_7 = d_7, k_j = sum_{i=j..6} (d_i - d_7) / 2,
            # k_0 = sum_{i=0..6} (d_i - d_7) / 4 (exact divisions)
            doubled_last = int64(point[7] * float32(2.0))
            total = int64(0)
            for i in range(6, 0, -1):
                total += int64(point[i] * float32(2.0)) - doubled_last
                labels[row, 8 * g + i] = (total // 2) & mask
            total += int64(point[0] * float32(2.0)) - doubled_last
            labels[row, 8 * g] = (total // 4) & mask
            labels[row, 8 * g + 7] = doubled_last & mask
        row += stride


@cuda.jit
def _decode_kernel(labels, scale, offset, out, bits):
    y = cuda.local.array(8, float32)
    w = cuda.local.array(8, float32)
    shift = cuda.local.array(8, float32)
    shifted = cuda.local.array(8, float32)
    coset = cuda.local.array(8, float32)
    half = float32(0.5)
    q = float32(1 << bits)
    groups = labels.shape[1] // 8
    total = labels.shape[0] * groups
    index = cuda.grid(1)
    stride = cuda.gridsize(1)
    while index < total:
        row = index // groups
        first = 8 * (index - row * groups)
        last = int64(labels[row, first + 7])
        # y = k G in halves (exact small integers, halved exactly in float32)
        y[0] = float32(4 * int64(labels[row, first]) - 2 * int64(labels[row, first + 1])
                       + last) * half
        for i in range(1, 7):
            following = int64(labels[row, first + i + 1]) if i < 6 else int64(0)
            y[i] = float32(2 * (int64(labels[row, first + i]) - following) + last) * half
        y[7] = float32(last) * half
        for i in range(8):
            w[i] = (y[i] - offset[i]) / q
        nearest_e8_point(w, shift, shifted, coset)
        s = scale[row]
        for i in range(8):
            out[row, first + i] = (y[i] - q * shift[i]) * s
        index += stride


# ---------------------------------------------------------------- host side


def voronoi_encode(rotated: Any, multipliers: Any, bits: int) -> tuple[Any, Any]:
    """Scale and labels of each vector (numba.cuda kernel).

    Parameters
    ----------
    rotated : (n, dim) float32, NumPy or on the GPU (CuPy or ``__cuda_array_interface__``)
        ``dim`` a multiple of 8, finite (not checked).
    multipliers : (r,) float64
        `latkv.e8.scale_ladder` ``(bits)[1]``; ``max|x| / 2^bits * multipliers[-1]`` must stay
        below 65504 (`latkv.e8.E8Stage` checks it).
    bits : int
        1..8.

    Returns
    -------
    scale : (n,) float32 holding float16 values
    labels : (n, dim) uint8
        NumPy for NumPy input (copied to the device and back), else CuPy. Bit-identical to
        `latkv.e8.voronoi_encode_reference`.
    """
    arrays = DeviceArrays(rotated)
    rotated, multipliers, bits = encode_arguments(arrays.xp, rotated, multipliers, bits)
    rows, dim = (int(s) for s in rotated.shape)
    scale = arrays.empty((rows,), np.float32)
    labels = arrays.empty((rows, dim), np.uint8)
    if rows and dim:
        inner, outer = _cell_bounds(bits)
        arrays.launch(_encode_kernel, grid_blocks(rows),
                      (rotated, multipliers, arrays.put(TIE_OFFSET, np.float32)),
                      (scale, labels), (bits, inner, outer))
    elif rows:
        scale.fill(SMALLEST_SCALE)           # no coordinates: max |x| = 0 (the floor)
    return scale, labels


def voronoi_decode(labels: Any, scale: Any, bits: int) -> Any:
    """The code points of ``labels`` times ``scale`` (numba.cuda kernel).

    Parameters
    ----------
    labels : (n, dim) uint8, NumPy or on the GPU
        ``dim`` a multiple of 8; values below ``2^bits``.
    scale : (n,) float32
    bits : int
        1..8.

    Returns
    -------
    (n, dim) float32
        NumPy for NumPy input, else CuPy. Bit-identical to
        `latkv.e8.voronoi_decode_reference`.
    """
    arrays = DeviceArrays(labels)
    labels, scale, bits = decode_arguments(arrays.xp, labels, scale, bits)
    rows, dim = (int(s) for s in labels.shape)
    out = arrays.empty((rows, dim), np.float32)
    if out.size:
        arrays.launch(_decode_kernel, grid_blocks(rows * (dim // 8)),
                      (labels, scale, arrays.put(TIE_OFFSET, np.float32)), (out,), (bits,))
    return out
