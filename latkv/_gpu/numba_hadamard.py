"""Second GPU implementation of the Walsh-Hadamard stage: a numba.cuda kernel.

``hadamard_segment`` is the ``("hadamard_segment", "numba.cuda")`` entry of
``latkv._backend.IMPLEMENTATIONS``. It takes CuPy arrays (run in place on the device, on
CuPy's current stream) or NumPy arrays (copied to the device and back), which is how it runs
in the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) on machines without a GPU.

Layout: a block of ``THREADS_PER_BLOCK`` threads transforms a tile of ``ROWS_PER_TILE =
max(1, TILE_ELEMENTS // size)`` rows in shared memory, ``log2(size)`` butterfly stages with
a barrier after each (the simulator has no warp shuffles, so unlike
``cuda_kernels/hadamard.cu`` this kernel uses shared memory only), then copies the untouched
coordinates. Blocks loop over tiles (grid-stride), so any grid size is correct. The
butterflies run in the order of `latkv.rotations.fwht_reference`, in float32, so the
result equals the reference to the last bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# numba.cuda must be a module global: the CUDA simulator swaps the kernel's global ``cuda``.
# Without a GPU (and without the simulator) the import still succeeds; launching fails.
from numba import cuda, float32, int64

from latkv._gpu.cuda_sources import STATIC_SHARED_LIMIT

THREADS_PER_BLOCK = 128
# Shared-memory tile, in float32 elements (4 KiB), unless one row of the segment is longer.
TILE_ELEMENTS = 1024
# Grid-stride loop over tiles in the kernel: the grid is capped at this many blocks.
MAX_BLOCKS = 65535
# The longest segment whose row fits the static shared memory a block may use on a device:
# 2**13 floats. The simulator has no such limit; a longer segment would compile there and
# fail on a GPU, so the wrapper refuses it everywhere.
MAX_SEGMENT = 1 << ((STATIC_SHARED_LIMIT // 4).bit_length() - 1)

_kernels: dict[int, Any] = {}


def _build_kernel(log_size: int) -> Any:
    """Compile (on first use) the kernel for segments of length ``2**log_size``.

    The kernel is ``kernel[blocks, THREADS_PER_BLOCK, stream](x, y, signs, start, inverse,
    scale)`` with ``x, y : (rows, dim)`` float32 device arrays, ``signs : (size,)`` float32,
    ``start`` int64, ``inverse`` bool and ``scale = float32(1 / sqrt(size))``.
    """
    size = 1 << log_size
    half = max(size // 2, 1)  # 1 for size 1 (no butterflies), avoids a division by 0
    rows_per_tile = max(1, TILE_ELEMENTS // size)
    tile_elements = rows_per_tile * size
    butterflies_per_tile = tile_elements // 2
    threads = THREADS_PER_BLOCK

    @cuda.jit
    def hadamard_segment_kernel(x, y, signs, start, inverse, scale):
        rows = x.shape[0]
        dim = x.shape[1]
        untouched = dim - size
        buffer = cuda.shared.array(tile_elements, float32)
        thread = cuda.threadIdx.x
        tile_row = int64(cuda.blockIdx.x) * rows_per_tile
        tile_stride = int64(cuda.gridDim.x) * rows_per_tile
        # tile_row depends on the block only, so every thread of a block reaches each barrier
        while tile_row < rows:
            for element in range(thread, tile_elements, threads):
                row = tile_row + (element >> log_size)
                column = element & (size - 1)
                value = float32(0.0)
                if row < rows:
                    value = x[row, start + column]
                    if not inverse:
                        value = value * signs[column]
                buffer[element] = value
            cuda.syncthreads()

            stride = 1
            log_stride = 0
            while stride < size:
                for butterfly in range(thread, butterflies_per_tile, threads):
                    row_in_tile = butterfly // half
                    k = butterfly - row_in_tile * half
                    low = (
                        row_in_tile * size
                        + ((k >> log_stride) << (log_stride + 1))
                        + (k & (stride - 1))
                    )
                    a = buffer[low]
                    b = buffer[low + stride]
                    buffer[low] = a + b
                    buffer[low + stride] = a - b
                cuda.syncthreads()
                stride *= 2
                log_stride += 1

            for element in range(thread, tile_elements, threads):
                row = tile_row + (element >> log_size)
                column = element & (size - 1)
                if row < rows:
                    value = buffer[element] * scale
                    if inverse:
                        value = value * signs[column]
                    y[row, start + column] = value
            for element in range(thread, rows_per_tile * untouched, threads):
                row_in_tile = element // untouched
                j = element - row_in_tile * untouched
                row = tile_row + row_in_tile
                if row < rows:
                    column = j if j < start else j + size
                    y[row, column] = x[row, column]
            cuda.syncthreads()  # the next tile overwrites the buffer
            tile_row += tile_stride

    return hadamard_segment_kernel


def hadamard_segment(x: Any, start: int, size: int, signs: Any, inverse: bool) -> Any:
    """One orthonormal Hadamard stage on ``x[..., start:start+size]``, numba.cuda kernel.

    Parameters
    ----------
    x : numpy.ndarray or cupy.ndarray, shape (..., dim), float32
        Input rows (C-contiguous; other layouts and dtypes are copied to float32 first).
        NumPy input is copied to the device and the result back. Not modified.
    start : int
        First coordinate of the segment.
    size : int
        Segment length, a power of two ``<= MAX_SEGMENT`` (2**13) with ``start + size <= dim``.
    signs : numpy.ndarray or cupy.ndarray, shape (size,), float32
        The ±1 diagonal of the stage (either array module).
    inverse : bool
        ``False``: ``seg <- H (signs * seg) / sqrt(size)``; ``True``: ``seg <- signs * H seg /
        sqrt(size)``.

    Returns
    -------
    numpy.ndarray or cupy.ndarray, shape (..., dim), float32
        A new array in the array module of ``x``, equal to ``x`` outside the segment.
    """
    on_gpu = hasattr(x, "__cuda_array_interface__") and not isinstance(x, np.ndarray)
    if on_gpu:
        import cupy

        x = cupy.ascontiguousarray(x, dtype=cupy.float32)
        signs = cupy.ascontiguousarray(cupy.asarray(signs), dtype=cupy.float32)
    else:
        x = np.ascontiguousarray(x, dtype=np.float32)
        signs = np.ascontiguousarray(signs, dtype=np.float32)
    shape = x.shape
    dim = int(shape[-1])
    size = int(size)
    start = int(start)
    if size < 1 or size & (size - 1) or start < 0 or start + size > dim:
        raise ValueError(
            f"segment [start, start + size) = [{start}, {start + size}) must lie in [0, {dim}) "
            "with size a power of two"
        )
    if tuple(signs.shape) != (size,):
        raise ValueError(f"signs must have shape ({size},), got {tuple(signs.shape)}")
    if size > MAX_SEGMENT:
        raise ValueError(
            f"the numba.cuda kernel keeps a row of the segment in shared memory (at most "
            f"{STATIC_SHARED_LIMIT // 1024} KB): segments up to {MAX_SEGMENT}, got size {size}"
        )
    rows = x.size // dim
    if rows == 0:
        return cupy.empty_like(x) if on_gpu else np.empty_like(x)

    log_size = size.bit_length() - 1
    if log_size not in _kernels:
        _kernels[log_size] = _build_kernel(log_size)
    kernel = _kernels[log_size]
    rows_per_tile = max(1, TILE_ELEMENTS // size)
    blocks = min(-(-rows // rows_per_tile), MAX_BLOCKS)
    scale = np.float32(1.0 / np.sqrt(size))
    arguments = (np.int64(start), bool(inverse), scale)

    if on_gpu:
        y = cupy.empty_like(x)
        stream_pointer = cupy.cuda.get_current_stream().ptr
        stream = cuda.external_stream(stream_pointer) if stream_pointer else cuda.default_stream()
        kernel[blocks, THREADS_PER_BLOCK, stream](
            cuda.as_cuda_array(x.reshape(rows, dim)),
            cuda.as_cuda_array(y.reshape(rows, dim)),
            cuda.as_cuda_array(signs),
            *arguments,
        )
        return y

    device_x = cuda.to_device(x.reshape(rows, dim))
    device_y = cuda.device_array((rows, dim), dtype=np.float32)
    device_signs = cuda.to_device(signs)
    kernel[blocks, THREADS_PER_BLOCK](device_x, device_y, device_signs, *arguments)
    return device_y.copy_to_host().reshape(shape)


def randomized_hadamard(x: Any, permutation: Any, head_signs: Any, tail_signs: Any,
                        inverse: bool) -> Any:
    """`latkv.rotations.randomized_hadamard_staged` with this module's `hadamard_segment`."""
    from latkv.rotations import randomized_hadamard_staged

    return randomized_hadamard_staged(x, permutation, head_signs, tail_signs, inverse,
                                      stage=hadamard_segment)
