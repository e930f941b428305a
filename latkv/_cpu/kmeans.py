"""CPU fast path of QET's k-means: nearest codewords and cluster sums, numba.

Both follow the NumPy reference of `latkv.qet` operation for operation, so labels and sums
are bit-identical to it:

* the squared distance of a point to a codeword is ``sum_j (p_j - c_j)^2`` in float64,
  accumulated in coordinate order ``j = 0 .. d-1`` from 0 (numba compiles without fast math:
  no reassociation, no contraction), and the first codeword of least distance wins (a strict
  ``<`` scan from index 0);
* cluster sums add the points in row order, as ``numpy.add.at`` does.

`nearest_codeword` runs in parallel over points (a serial clone below
`latkv._cpu.serial.SERIAL_BELOW` distance terms); the sums are sequential (they are cheap).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from latkv._cpu.serial import kernel_for


@njit(parallel=True, cache=True)
def _nearest_rows(points, codewords, out):
    n, d = points.shape
    k = codewords.shape[0]
    for i in prange(n):
        best = np.inf
        arg = 0
        for c in range(k):
            distance = 0.0
            for j in range(d):
                difference = points[i, j] - codewords[c, j]
                distance += difference * difference
            if distance < best:
                best = distance
                arg = c
        out[i] = arg


@njit(cache=True)
def _cluster_sums(points, labels, sums, counts):
    n, d = points.shape
    for i in range(n):
        c = labels[i]
        counts[c] += 1
        for j in range(d):
            sums[c, j] += points[i, j]


def nearest_codeword(points: np.ndarray, codewords: np.ndarray) -> np.ndarray:
    """``points : (n, d)``, ``codewords : (k, d)`` float64 -> ``(n,)`` int64 labels."""
    points = np.ascontiguousarray(points, dtype=np.float64)
    codewords = np.ascontiguousarray(codewords, dtype=np.float64)
    out = np.empty(points.shape[0], dtype=np.int64)
    kernel_for(_nearest_rows, points.size * codewords.shape[0])(points, codewords, out)
    return out


def cluster_sums(points: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums ``(k, d)`` float64 and counts ``(k,)`` int64, rows added in order."""
    points = np.ascontiguousarray(points, dtype=np.float64)
    sums = np.zeros((k, points.shape[1]), dtype=np.float64)
    counts = np.zeros(k, dtype=np.int64)
    _cluster_sums(points, np.ascontiguousarray(labels, dtype=np.int64), sums, counts)
    return sums, counts
