"""Second GPU implementation of the D8 / E8 nearest points: numba.cuda kernels.

Same operations, same results as ``cuda_kernels/lattice.cu`` (references:
`latkv.lattice.nearest_d8_reference`, `latkv.lattice.nearest_e8_reference`, bit-identical,
signed zeros included): one thread per row of 8 coordinates, grid-stride, the row held in
local arrays of 8.

* ``r = rint(x)``, halves to even: numba.cuda has no ``np.rint`` in kernels, so ``k =
  round(x)`` (``__nv_llrint`` of the exact double, an int64 rounded half to even) and ``r =
  copysign(float32(k), x)`` (``rint`` keeps the sign of ``x``, so a zero result is ``-0.0``
  for negative ``x``, as in NumPy); ``e = x - r`` in float32 (exact);
* the parity of ``r`` is the parity of the sum of the ``k`` (exact for ``|x| < 2^21``);
  when odd, the first coordinate of largest ``|e|`` (strict ``>`` scan from index 0) moves by
  ``+1`` if its ``e >= 0`` (``-0.0`` included), else ``-1``, in float32;
* E8: the coset candidate is the D8 point of ``float32(x - 0.5)`` plus ``0.5`` in float32;
  the distances are ``sum_i float64(float32(x_i - y_i))^2`` accumulated in coordinate order
  0..7 and the D8 candidate wins ties (``<=``). numba.cuda does not offer ``__dmul_rn`` /
  ``__dadd_rn`` in the simulator, and without fast math NVVM may still contract ``d * d +
  total`` into an FMA: that cannot change a sum, since the square of a float32 value is exact
  in float64 (24-bit significand squared: at most 48 bits), so ``fma(d, d, t)`` and
  ``t + d * d`` round the same exact value once.

The kernels compile without fast math: no flush to zero, float32 ``-`` and ``+`` round to
nearest (there is no float32 product to contract). NumPy inputs are copied to the device and back (this is how the kernels
run in the CUDA simulator, ``NUMBA_ENABLE_CUDASIM=1``) and give NumPy results; CuPy inputs
(or anything else exposing ``__cuda_array_interface__``) stay on the device, run on CuPy's
current stream and give CuPy results.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# numba.cuda must be a module global: the CUDA simulator swaps the kernel's global ``cuda``.
from numba import cuda, float32, float64

from latkv._gpu.numba_launch import DeviceArrays, grid_blocks



@cuda.jit(device=True)
def _nearest_d8_point(v, y):
    """``y[:8] =`` the nearest D8 point of the float32 8-vector ``v`` (module tie rules)."""
    parity = 0
    best = float32(-1.0)
    worst = 0
    worst_error = float32(0.0)
    for i in range(8):
        k = round(v[i])                   # llrint: half to even (a float32 is exact in double)
        r = float32(math.copysign(float32(k), v[i]))   # rint(v): the sign of v, -0.0 too
        e = v[i] - r                      # exact in float32
        a = abs(e)
        if a > best:                      # strict: the first index among equals
            best = a
            worst = i
            worst_error = e
        parity += k
        y[i] = r
    # y[worst] += step when the parity is odd, written with constant indices only (so that
    # the local arrays can live in registers): y[i] - 0.0 is y[i] (-0.0 included) and
    # y[i] - (-step) is y[i] + step
    back = float32(-1.0) if worst_error >= float32(0.0) else float32(1.0)
    odd = (parity & 1) != 0
    for i in range(8):
        y[i] = y[i] - (back if odd and i == worst else float32(0.0))


@cuda.jit(device=True)
def _squared_distance(x, y):
    """``sum_i float64(x_i - y_i)^2`` (float32 differences), in order 0..7."""
    total = float64(0.0)
    for i in range(8):
        d = float64(x[i] - y[i])
        total = total + d * d
    return total


@cuda.jit
def _nearest_d8_kernel(x, out):
    v = cuda.local.array(8, float32)
    y = cuda.local.array(8, float32)
    rows = x.shape[0]
    row = cuda.grid(1)
    stride = cuda.gridsize(1)
    while row < rows:
        for i in range(8):
            v[i] = x[row, i]
        _nearest_d8_point(v, y)
        for i in range(8):
            out[row, i] = y[i]
        row += stride


@cuda.jit(device=True)
def nearest_e8_point(v, point, shifted, coset):
    """``point[:8] =`` the nearest E8 point of ``v``; ``shifted``, ``coset``: work arrays."""
    half = float32(0.5)
    for i in range(8):
        shifted[i] = v[i] - half
    _nearest_d8_point(v, point)
    _nearest_d8_point(shifted, coset)
    for i in range(8):
        coset[i] = coset[i] + half
    keep = _squared_distance(v, point) <= _squared_distance(v, coset)  # tie: D8
    for i in range(8):
        point[i] = point[i] if keep else coset[i]


@cuda.jit
def _nearest_e8_kernel(x, out):
    v = cuda.local.array(8, float32)
    shifted = cuda.local.array(8, float32)
    point = cuda.local.array(8, float32)
    coset = cuda.local.array(8, float32)
    rows = x.shape[0]
    row = cuda.grid(1)
    stride = cuda.gridsize(1)
    while row < rows:
        for i in range(8):
            v[i] = x[row, i]
        nearest_e8_point(v, point, shifted, coset)
        for i in range(8):
            out[row, i] = point[i]
        row += stride


# ---------------------------------------------------------------- host side


def _run(kernel: Any, x: Any) -> Any:
    arrays = DeviceArrays(x)
    x = arrays.put(x, np.float32)
    if x.ndim < 1 or int(x.shape[-1]) != 8:
        raise ValueError(f"x must have shape (..., 8), got {tuple(x.shape)}")
    out = arrays.empty(x.shape, np.float32)
    if out.size == 0:
        return out
    rows = out.size // 8
    arrays.launch(kernel, grid_blocks(rows), (x.reshape(rows, 8),), (out.reshape(rows, 8),), ())
    return out


def nearest_d8(x: Any) -> Any:
    """Nearest ``D8`` point of each row (numba.cuda kernel).

    Parameters
    ----------
    x : (n, 8) (or (..., 8)) float32, NumPy or on the GPU (CuPy or ``__cuda_array_interface__``)
        Copied to C-contiguous float32 where it is not. Finite, ``|x_i| < 2^21`` (checked by
        `latkv.lattice.nearest_d8`, not here).

    Returns
    -------
    same shape, float32
        NumPy for NumPy input (copied to the device and back), else CuPy. Bit-identical to
        `latkv.lattice.nearest_d8_reference`.
    """
    return _run(_nearest_d8_kernel, x)


def nearest_e8(x: Any) -> Any:
    """Nearest ``E8`` point of each row (numba.cuda kernel).

    Parameters
    ----------
    x : (n, 8) (or (..., 8)) float32, NumPy or on the GPU (CuPy or ``__cuda_array_interface__``)
        Copied to C-contiguous float32 where it is not. Finite, ``|x_i| < 2^21`` (checked by
        `latkv.lattice.nearest_e8`, not here).

    Returns
    -------
    same shape, float32
        NumPy for NumPy input (copied to the device and back), else CuPy. Bit-identical to
        `latkv.lattice.nearest_e8_reference`.
    """
    return _run(_nearest_e8_kernel, x)
