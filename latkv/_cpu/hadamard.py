"""CPU fast path of the Walsh-Hadamard stage: numba kernel, parallel over rows.

``hadamard_segment`` is the ``("hadamard_segment", "numba")`` entry of
``latkv._backend.IMPLEMENTATIONS``; `latkv.rotations.hadamard_segment_reference` is
its definition. Each row is handled by one iteration of a ``prange`` loop: the untouched
coordinates are copied, the segment is written to the output row (times the signs, forward)
and transformed there in place with float32 butterflies in the same order as the reference
(stride 1, 2, 4, ...), so the results agree with the reference to the last bit. A row of
``size`` float32 values stays in L1 cache through all ``log2(size)`` stages; the strides
1, 2, 4 are fused into one pass over groups of 8 and the longer strides vectorise.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, uint64

from latkv._cpu.serial import kernel_for


@njit(cache=True, inline="always")
def _fwht_in_place(segment, size):
    """Unnormalised FWHT (Sylvester order) of a float32 ``(size,)`` view, in place.

    Butterflies ``(a, b) -> (a + b, a - b)`` on pairs ``(i, i + stride)`` for stride 1, 2, 4,
    ..., in the order of `latkv.rotations.fwht_reference`. Indices are ``uint64`` so
    that numba emits no negative-index wraparound, which lets LLVM vectorise the loops.
    """
    if size >= 8:
        # strides 1, 2 and 4 fused: one pass over each group of 8, in registers.
        for group in range(0, size, 8):
            g = uint64(group)
            v0 = segment[g]
            v1 = segment[g + 1]
            v2 = segment[g + 2]
            v3 = segment[g + 3]
            v4 = segment[g + 4]
            v5 = segment[g + 5]
            v6 = segment[g + 6]
            v7 = segment[g + 7]
            v0, v1 = v0 + v1, v0 - v1
            v2, v3 = v2 + v3, v2 - v3
            v4, v5 = v4 + v5, v4 - v5
            v6, v7 = v6 + v7, v6 - v7
            v0, v2 = v0 + v2, v0 - v2
            v1, v3 = v1 + v3, v1 - v3
            v4, v6 = v4 + v6, v4 - v6
            v5, v7 = v5 + v7, v5 - v7
            segment[g] = v0 + v4
            segment[g + 4] = v0 - v4
            segment[g + 1] = v1 + v5
            segment[g + 5] = v1 - v5
            segment[g + 2] = v2 + v6
            segment[g + 6] = v2 - v6
            segment[g + 3] = v3 + v7
            segment[g + 7] = v3 - v7
        stride = 8
    else:
        stride = 1
    while stride < size:
        offset = uint64(stride)
        for block in range(size // (2 * stride)):
            block_start = uint64(block) * uint64(2 * stride)
            for k in range(stride):
                i = block_start + uint64(k)
                a = segment[i]
                b = segment[i + offset]
                segment[i] = a + b
                segment[i + offset] = a - b
        stride *= 2


@njit(parallel=True, cache=True)
def _hadamard_segment_rows(x, y, start, size, signs, inverse, scale):
    """Kernel: ``x, y : (rows, dim)`` float32 C-contiguous, ``signs : (size,)`` float32.

    Writes every row of ``y``: the coordinates outside ``[start, start + size)`` copied from
    ``x``, the segment transformed. ``scale`` is ``float32(1 / sqrt(size))``.
    """
    rows, dim = x.shape
    stop = start + size
    for row in prange(rows):
        source = x[row]
        target = y[row]
        for j in range(start):
            target[j] = source[j]
        for j in range(stop, dim):
            target[j] = source[j]
        source_segment = source[start:stop]
        segment = target[start:stop]
        if inverse:
            for j in range(size):
                segment[j] = source_segment[j]
            _fwht_in_place(segment, size)
            for j in range(size):
                segment[j] = segment[j] * scale * signs[j]
        else:
            for j in range(size):
                segment[j] = source_segment[j] * signs[j]
            _fwht_in_place(segment, size)
            for j in range(size):
                segment[j] = segment[j] * scale


def hadamard_segment(
    x: np.ndarray, start: int, size: int, signs: np.ndarray, inverse: bool
) -> np.ndarray:
    """One orthonormal Hadamard stage on ``x[..., start:start+size]``, numba CPU kernel.

    Parameters
    ----------
    x : numpy.ndarray, shape (..., dim), float32
        Input rows (C-contiguous; other layouts and dtypes are copied to float32 first).
        Not modified.
    start : int
        First coordinate of the segment.
    size : int
        Segment length, a power of two with ``start + size <= dim``.
    signs : numpy.ndarray, shape (size,), float32
        The ±1 diagonal of the stage.
    inverse : bool
        ``False``: ``seg <- H (signs * seg) / sqrt(size)``; ``True``: ``seg <- signs * H seg /
        sqrt(size)``.

    Returns
    -------
    numpy.ndarray, shape (..., dim), float32
        A new array, equal to ``x`` outside the segment.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    signs = np.ascontiguousarray(signs, dtype=np.float32)
    dim = x.shape[-1]
    if size < 1 or size & (size - 1) or start < 0 or start + size > dim:
        raise ValueError(
            f"segment [start, start + size) = [{start}, {start + size}) must lie in [0, {dim}) "
            "with size a power of two"
        )
    if signs.shape != (size,):
        raise ValueError(f"signs must have shape ({size},), got {signs.shape}")
    y = np.empty_like(x)
    if x.size == 0:
        return y
    scale = np.float32(1.0 / np.sqrt(size))
    kernel_for(_hadamard_segment_rows, x.size)(
        x.reshape(-1, dim), y.reshape(-1, dim), start, size, signs, bool(inverse), scale
    )
    return y


ROWS_PER_TASK = 256
_NO_SIGNS = np.empty(0, dtype=np.float32)


@njit(inline="always")
def _forward_stage(segment, signs, scale):
    for j in range(segment.shape[0]):
        segment[j] = segment[j] * signs[j]
    _fwht_in_place(segment, segment.shape[0])
    for j in range(segment.shape[0]):
        segment[j] = segment[j] * scale


@njit(inline="always")
def _inverse_stage(segment, signs, scale):
    _fwht_in_place(segment, segment.shape[0])
    for j in range(segment.shape[0]):
        segment[j] = segment[j] * scale * signs[j]


@njit(parallel=True, cache=True)
def _randomized_hadamard_rows(x, y, permutation, head_signs, tail_signs, inverse, scale):
    """Kernel: every row of ``y`` is the RandomizedHadamard of the row of ``x``.

    Forward: gather ``x[row, permutation]`` into ``y[row]``, head stage on ``[:p]``, tail
    stage on ``[dim - p:]``, all in place in the output row. Inverse: the stages in reverse on
    a per-task buffer, then the scatter ``y[row, permutation] = buffer``. An empty
    ``tail_signs`` means ``dim == p``: one stage, no permutation. The float32 operations are
    those of `latkv.rotations.randomized_hadamard_staged` in its order.
    """
    rows, dim = x.shape
    p = head_signs.shape[0]
    two_stages = tail_signs.shape[0] == p
    tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(tasks):
        buffer = np.empty(dim, np.float32)
        for row in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            source = x[row]
            target = y[row]
            if not inverse:
                if two_stages:
                    for j in range(dim):
                        target[j] = source[permutation[j]]
                else:
                    for j in range(dim):
                        target[j] = source[j]
                _forward_stage(target[:p], head_signs, scale)
                if two_stages:
                    _forward_stage(target[dim - p:], tail_signs, scale)
            elif two_stages:
                for j in range(dim):
                    buffer[j] = source[j]
                _inverse_stage(buffer[dim - p:], tail_signs, scale)
                _inverse_stage(buffer[:p], head_signs, scale)
                for j in range(dim):
                    target[permutation[j]] = buffer[j]
            else:
                for j in range(dim):
                    target[j] = source[j]
                _inverse_stage(target, head_signs, scale)


def randomized_hadamard(x: np.ndarray, permutation: np.ndarray, head_signs: np.ndarray,
                        tail_signs: np.ndarray | None, inverse: bool) -> np.ndarray:
    """`latkv.rotations.RandomizedHadamard` in one pass over each row, numba CPU kernel.

    Parameters
    ----------
    x : numpy.ndarray, shape (..., dim), float32
        Input rows (other layouts and dtypes are copied to float32 first). Not modified.
    permutation : numpy.ndarray, shape (dim,), int
        The coordinate permutation (ignored when ``tail_signs`` is None).
    head_signs, tail_signs : numpy.ndarray, shape (p,), float32, or None for ``tail_signs``
        Signs of the stage on ``[:p]`` and on ``[dim - p:]``; ``p`` a power of two.
    inverse : bool
        Undo the forward map.

    Returns
    -------
    numpy.ndarray, shape (..., dim), float32
        Agrees with `latkv.rotations.randomized_hadamard_staged` to float32 rounding (the
        same operations in the same order).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    dim = x.shape[-1]
    head_signs = np.ascontiguousarray(head_signs, dtype=np.float32)
    p = head_signs.shape[0]
    if p < 1 or p & (p - 1) or p > dim:
        raise ValueError(f"head_signs must have a power-of-two length <= dim ({dim}), got {p}")
    if tail_signs is None:
        if p != dim:
            raise ValueError(f"tail_signs is needed when dim ({dim}) is not a power of two")
        tail_signs, permutation = _NO_SIGNS, np.arange(dim)
    tail_signs = np.ascontiguousarray(tail_signs, dtype=np.float32)
    permutation = np.ascontiguousarray(permutation, dtype=np.int64)
    if tail_signs.size and tail_signs.shape != (p,):
        raise ValueError(f"tail_signs must have shape ({p},), got {tail_signs.shape}")
    if permutation.shape != (dim,) or not np.array_equal(np.sort(permutation), np.arange(dim)):
        raise ValueError(f"permutation must be a permutation of range({dim})")
    y = np.empty_like(x)
    if x.size == 0:
        return y
    scale = np.float32(1.0 / np.sqrt(p))
    kernel_for(_randomized_hadamard_rows, x.size)(
        x.reshape(-1, dim), y.reshape(-1, dim), permutation, head_signs, tail_signs,
        bool(inverse), scale)
    return y
