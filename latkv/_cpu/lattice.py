"""CPU fast path of the D8 / E8 nearest points: numba, parallel over rows.

`nearest_d8` and `nearest_e8` run `latkv.lattice.nearest_d8_reference` and
`latkv.lattice.nearest_e8_reference` as one pass over each row of eight coordinates, with the
reference's float32 and float64 operations in its order, so the points are bit-identical
(signed zeros included) to the reference's:

* ``r = rint(x)`` (``numpy.rint``: halves to even), ``e = x - r`` in float32;
* the parity of ``r`` is the parity of the sum of ``int64(r)`` (exact for ``|x| < 2^21``,
  as the reference's float64 sum is);
* the coordinate to fix is the first of the largest ``|e|`` (a strict ``>`` scan from index
  0), moved by ``+1`` when its ``e >= 0`` (``-0.0`` included), else ``-1``, in float32;
* E8: the coset candidate is the D8 point of ``float32(x - 0.5)`` plus ``0.5`` in float32;
  each distance is ``sum_i float64(float32(x_i - y_i))^2`` accumulated in coordinate order
  0..7 (numba compiles without fast math: no reassociation, no contraction; each square is
  exact in float64 anyway), and the D8 candidate wins ties (``<=``).

Rows are split into tasks of `ROWS_PER_TASK`; small inputs run serial clones of the kernels
(`latkv._cpu.serial.kernel_for`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from latkv._cpu.serial import kernel_for

ROWS_PER_TASK = 1024


@njit(inline="always")
def _nearest_d8_point(v, y):
    """``y[:8] =`` the nearest D8 point of the float32 8-vector ``v`` (module tie rules)."""
    parity = 0
    best = np.float32(-1.0)
    worst = 0
    worst_error = np.float32(0.0)
    for i in range(8):
        r = np.rint(v[i])
        e = v[i] - r                      # exact in float32
        a = abs(e)
        larger = a > best                 # strict: the first index among equals
        best = a if larger else best
        worst = i if larger else worst
        worst_error = e if larger else worst_error
        parity += np.int64(r)
        y[i] = r
    step = np.float32(1.0) if worst_error >= np.float32(0.0) else np.float32(-1.0)
    if parity & 1:
        y[worst] = y[worst] + step


@njit(cache=True)
def _d8_block(x, out, start, stop):
    """Rows ``start:stop`` of `_nearest_d8_rows` (one task)."""
    for row in range(start, stop):
        _nearest_d8_point(x[row], out[row])


@njit(parallel=True, cache=True)
def _nearest_d8_rows(x, out):
    """Kernel: ``out[i] = nearest_d8(x[i])`` for every row of ``x (n, 8)`` float32."""
    rows = x.shape[0]
    tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(tasks):
        _d8_block(x, out, task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK))


@njit(inline="always")
def nearest_e8_point(v, point, shifted, coset):
    """``point[:8] =`` the nearest E8 point of the float32 8-vector ``v`` (module rules);
    ``shifted``, ``coset``: work buffers of 8 float32."""
    half = np.float32(0.5)
    _nearest_d8_point(v, point)
    for i in range(8):
        shifted[i] = v[i] - half
    _nearest_d8_point(shifted, coset)
    integer_distance = 0.0
    coset_distance = 0.0
    for i in range(8):
        c = coset[i] + half
        coset[i] = c
        a = np.float64(v[i] - point[i])
        integer_distance = integer_distance + a * a
        b = np.float64(v[i] - c)
        coset_distance = coset_distance + b * b
    if not integer_distance <= coset_distance:  # a tie goes to D8
        for i in range(8):
            point[i] = coset[i]


@njit(cache=True)
def _e8_block(x, out, start, stop):
    """Rows ``start:stop`` of `_nearest_e8_rows` (one task), with their work buffers."""
    shifted = np.empty(8, np.float32)
    coset = np.empty(8, np.float32)
    for row in range(start, stop):
        nearest_e8_point(x[row], out[row], shifted, coset)


@njit(parallel=True, cache=True)
def _nearest_e8_rows(x, out):
    """Kernel: ``out[i] = nearest_e8(x[i])`` for every row of ``x (n, 8)`` float32."""
    rows = x.shape[0]
    tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(tasks):
        _e8_block(x, out, task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK))


def _run(kernel, x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim < 1 or x.shape[-1] != 8:
        raise ValueError(f"x must have shape (..., 8), got {x.shape}")
    out = np.empty(x.shape, dtype=np.float32)
    if out.size == 0:
        return out
    kernel_for(kernel, x.size)(x.reshape(-1, 8), out.reshape(-1, 8))
    return out


def nearest_d8(x: np.ndarray) -> np.ndarray:
    """Nearest ``D8`` point of each row (numba backend).

    Parameters
    ----------
    x : numpy.ndarray, shape (n, 8) (or (..., 8)), float32
        Other layouts and dtypes are copied to C-contiguous float32. Finite, ``|x_i| < 2^21``
        (checked by `latkv.lattice.nearest_d8`, not here).

    Returns
    -------
    numpy.ndarray, same shape, float32
        Bit-identical to `latkv.lattice.nearest_d8_reference`.
    """
    return _run(_nearest_d8_rows, x)


def nearest_e8(x: np.ndarray) -> np.ndarray:
    """Nearest ``E8`` point of each row (numba backend).

    Parameters
    ----------
    x : numpy.ndarray, shape (n, 8) (or (..., 8)), float32
        Other layouts and dtypes are copied to C-contiguous float32. Finite, ``|x_i| < 2^21``
        (checked by `latkv.lattice.nearest_e8`, not here).

    Returns
    -------
    numpy.ndarray, same shape, float32
        Bit-identical to `latkv.lattice.nearest_e8_reference`.
    """
    return _run(_nearest_e8_rows, x)
