"""CPU fast path of QJL's sign-sketch scores: numba, parallel over blocks of keys.

`sign_scores` computes ``<q, z>`` for every query and key of a head, ``z = 2 * bit - 1`` from
the packed sign bits, without unpacking all keys at once (`latkv.qjl.sign_scores_reference`
first expands them to a ``(B, n, rows)`` float32 matrix). Each key's bits are expanded into a
``(rows,)`` buffer of ``+-1.0``, which is dotted with every query of its head in float32 (SIMD
partial sums, `latkv._cpu.codebook._dot`); the scores agree with the reference's float32
matrix product to float32 rounding. Small inputs run a serial clone of the kernel
(`latkv._cpu.serial.kernel_for`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from latkv._cpu.codebook import KEYS_PER_TASK, _dot
from latkv._cpu.serial import kernel_for
from latkv.checks import check_int
from latkv.packing import packed_length


@njit(cache=True)
def _sign_block(q, packed, out, batch, start, stop):
    """Keys ``start:stop`` of head ``batch`` of `_sign_scores` (one task): each key's bits
    expanded into a ``(rows,)`` buffer of ``+-1.0``, dotted with every query of the head."""
    rows = q.shape[2]
    signs = np.empty(rows, np.float32)
    queries = q[batch]
    scores = out[batch]
    for key in range(start, stop):
        bits = packed[batch, key]
        for j in range(rows):
            bit = np.int32((bits[j >> 3] >> np.uint8(j & 7)) & np.uint8(1))
            signs[j] = np.float32(2 * bit - 1)
        for i in range(queries.shape[0]):
            scores[i, key] = _dot(queries[i], signs)


@njit(parallel=True, cache=True)
def _sign_scores(q, packed, out):
    """Kernel: ``out (B, m, n) = q (B, m, rows) @ (2 * unpack(packed (B, n, P)) - 1).T``,
    one task per ``KEYS_PER_TASK`` keys of one head."""
    batches = q.shape[0]
    n = packed.shape[1]
    tasks_per_batch = (n + KEYS_PER_TASK - 1) // KEYS_PER_TASK
    for task in prange(batches * tasks_per_batch):
        batch = task // tasks_per_batch
        start = (task % tasks_per_batch) * KEYS_PER_TASK
        _sign_block(q, packed, out, batch, start, min(n, start + KEYS_PER_TASK))


def sign_scores(q: np.ndarray, packed: np.ndarray, rows: int) -> np.ndarray:
    """``<q, z>`` for queries and packed sign bits, per head (numba backend).

    Parameters
    ----------
    q : numpy.ndarray, shape (B, m, rows), float32
        Sketched queries ``S q``.
    packed : numpy.ndarray, shape (B, n, ceil(rows / 8)), uint8
        Sign bits of the keys, LSB-first: bit ``j`` set means ``z_j = +1``, clear ``-1``
        (padding bits are ignored).
    rows : int
        Sketch rows (signs per key).

    Returns
    -------
    numpy.ndarray, shape (B, m, n), float32
        ``out[b, i, k] = sum_j q[b, i, j] * z[b, k, j]``, summed in float32; equal to
        `latkv.qjl.sign_scores_reference` up to float32 rounding.
    """
    q = np.ascontiguousarray(q, dtype=np.float32)
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    rows = check_int(rows, "rows", 0)
    if q.ndim != 3 or packed.ndim != 3 or q.shape[0] != packed.shape[0] or q.shape[2] != rows:
        raise ValueError(f"q must be (B, m, {rows}) and packed (B, n, P) with the same B, got "
                         f"{q.shape} and {packed.shape}")
    if packed.shape[2] != packed_length(rows, 1):
        raise ValueError(f"packed must have last dimension ceil(rows/8) = "
                         f"{packed_length(rows, 1)} for rows={rows}, got shape {packed.shape}")
    batches, m, _ = q.shape
    n = packed.shape[1]
    out = np.empty((batches, m, n), dtype=np.float32)
    if out.size == 0:
        return out
    kernel_for(_sign_scores, out.size * rows)(q, packed, out)
    return out
