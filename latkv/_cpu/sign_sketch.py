"""CPU fast path of QJL's sign-sketch scores: numba, parallel over blocks of keys.

`sign_scores` computes ``<q, z>`` for every query and key of a head, ``z = 2 * bit - 1`` the
packed sign bits, without unpacking all keys at once (`latkv.qjl.sign_scores_reference`
unpacks them to a ``(B, n, rows)`` float32 matrix first). Each task decodes a block of keys
into a small ``(rows, block)`` buffer of ``+-1`` and multiplies every query of its head with
it, accumulating in float32 over the sketch rows in order, the loop over the keys of the block
innermost (vectorised, no reassociation). The scores agree with the reference's float32 matrix
product to float32 rounding. Small inputs run a serial clone of the kernel
(`latkv._cpu.scalar._kernel`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from latkv._cpu.codebook import BLOCKS_PER_TASK, KEY_BLOCK, _block_scores
from latkv._cpu.scalar import _kernel
from latkv.packing import packed_length


@njit(parallel=True, cache=True)
def _sign_scores(q, packed, out):
    """Kernel: ``out (B, m, n) = q (B, m, rows) @ (2 * unpack(packed (B, n, P)) - 1).T``."""
    batches, m, rows = q.shape
    n = packed.shape[1]
    keys_per_task = BLOCKS_PER_TASK * KEY_BLOCK
    tasks_per_batch = (n + keys_per_task - 1) // keys_per_task
    for task in prange(batches * tasks_per_batch):
        batch = task // tasks_per_batch
        start = (task % tasks_per_batch) * keys_per_task
        stop = min(n, start + keys_per_task)
        signs = np.zeros((rows, KEY_BLOCK), np.float32)
        queries = q[batch]
        for first in range(start, stop, KEY_BLOCK):
            width = min(KEY_BLOCK, stop - first)
            for k in range(width):
                key = packed[batch, first + k]
                for j in range(rows):
                    bit = (key[j >> 3] >> np.uint8(j & 7)) & np.uint8(1)
                    signs[j, k] = np.float32(2 * np.int32(bit) - 1)
            for k in range(width, KEY_BLOCK):
                for j in range(rows):
                    signs[j, k] = 0.0
            _block_scores(queries, signs, batch, first, width, out)


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
    rows = int(rows)
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
    if rows == 0:
        out[...] = 0
        return out
    _kernel(_sign_scores, batches * n * max(m, rows))(q, packed, out)
    return out
