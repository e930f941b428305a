"""GPU production path of the Walsh-Hadamard stage: the CuPy ``RawModule`` kernel.

``hadamard_segment`` is the ``("hadamard_segment", "cupy")`` entry of
``latkv._backend.IMPLEMENTATIONS``; it launches ``hadamard_segment<LOG_SIZE>`` from
``cuda_kernels/hadamard.cu`` (see the comment at the top of that file for the layout: a
group of ``min(size, 32)`` lanes per row, warp-shuffle and in-register butterflies).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from latkv._gpu.cuda_sources import MAX_LOG_SIZE
from latkv._gpu.cupy_modules import kernel

# Must match HADAMARD_THREADS in cuda_kernels/hadamard.cu (the kernel's __launch_bounds__).
THREADS_PER_BLOCK = 256
WARP_SIZE = 32
# Grid-stride loop in the kernel: any grid size is correct; this caps the launch.
MAX_BLOCKS = 2**31 - 1


def hadamard_segment(x: Any, start: int, size: int, signs: Any, inverse: bool) -> Any:
    """One orthonormal Hadamard stage on ``x[..., start:start+size]``, CuPy kernel.

    Parameters
    ----------
    x : cupy.ndarray, shape (..., dim), float32
        Input rows on the GPU (C-contiguous; other layouts and dtypes are copied to float32
        first). Not modified.
    start : int
        First coordinate of the segment.
    size : int
        Segment length, a power of two ``<= 2**MAX_LOG_SIZE`` with ``start + size <= dim``.
    signs : cupy.ndarray, shape (size,), float32
        The ±1 diagonal of the stage.
    inverse : bool
        ``False``: ``seg <- H (signs * seg) / sqrt(size)``; ``True``: ``seg <- signs * H seg /
        sqrt(size)``.

    Returns
    -------
    cupy.ndarray, shape (..., dim), float32
        A new array on the same device, equal to ``x`` outside the segment.
    """
    import cupy

    x = cupy.ascontiguousarray(x, dtype=cupy.float32)
    signs = cupy.ascontiguousarray(signs, dtype=cupy.float32)
    dim = int(x.shape[-1])
    size = int(size)
    start = int(start)
    if size < 1 or size & (size - 1) or start < 0 or start + size > dim:
        raise ValueError(
            f"segment [start, start + size) = [{start}, {start + size}) must lie in [0, {dim}) "
            "with size a power of two"
        )
    log_size = size.bit_length() - 1
    if log_size > MAX_LOG_SIZE:
        raise ValueError(
            f"the CUDA kernel handles segments up to 2**{MAX_LOG_SIZE}, got size {size}"
        )
    if signs.shape != (size,):
        raise ValueError(f"signs must have shape ({size},), got {signs.shape}")
    y = cupy.empty_like(x)
    rows = x.size // dim if dim else 0
    if rows == 0:
        return y
    lanes_per_row = min(size, WARP_SIZE)
    rows_per_block = (THREADS_PER_BLOCK // WARP_SIZE) * (WARP_SIZE // lanes_per_row)
    blocks = min(-(-rows // rows_per_block), MAX_BLOCKS)
    function = kernel("hadamard.cu", f"hadamard_segment<{log_size}>")
    function(
        (blocks,),
        (THREADS_PER_BLOCK,),
        (
            x,
            y,
            signs,
            np.int64(rows),
            np.int32(dim),
            np.int32(start),
            np.int32(1 if inverse else 0),
        ),
        shared_mem=0,
    )
    return y


def randomized_hadamard(x: Any, permutation: Any, head_signs: Any, tail_signs: Any,
                        inverse: bool) -> Any:
    """`latkv.rotations.randomized_hadamard_staged` with this module's `hadamard_segment`."""
    from latkv.rotations import randomized_hadamard_staged

    return randomized_hadamard_staged(x, permutation, head_signs, tail_signs, inverse,
                                      stage=hadamard_segment)
