"""Host side of the numba.cuda kernels: one array module per call, grid sizes, launches.

NumPy inputs are copied to the device and the outputs back (how the kernels run in the CUDA
simulator, ``NUMBA_ENABLE_CUDASIM=1``); CuPy inputs (or anything else exposing
``__cuda_array_interface__``) stay on the device and run on CuPy's current stream.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

THREADS_PER_BLOCK = 128
# Every kernel loops grid-stride, so any grid is correct; this caps the launch.
MAX_BLOCKS = 65535


def on_gpu(x: Any) -> bool:
    """Whether ``x`` is a device array (not a NumPy array)."""
    return hasattr(x, "__cuda_array_interface__") and not isinstance(x, np.ndarray)


def grid_blocks(threads_needed: int) -> int:
    """Blocks of `THREADS_PER_BLOCK` threads for ``threads_needed`` threads, capped."""
    return max(1, min(-(-threads_needed // THREADS_PER_BLOCK), MAX_BLOCKS))


class DeviceArrays:
    """The array module of one call: NumPy (kernels get device copies) or CuPy (views).

    ``put(x, dtype)`` converts an input to C-contiguous ``dtype`` in that module, ``empty``
    allocates there, and ``launch(kernel, blocks, inputs, outputs, scalars, threads)`` runs
    ``kernel[blocks, threads](*inputs, *outputs, *scalars)`` (``threads`` defaults to
    `THREADS_PER_BLOCK`) and fills the outputs.
    """

    def __init__(self, first: Any) -> None:
        self.gpu = on_gpu(first)
        if self.gpu:
            import cupy

            self.xp = cupy
        else:
            self.xp = np

    def put(self, x: Any, dtype: Any) -> Any:
        return self.xp.ascontiguousarray(self.xp.asarray(x), dtype=dtype)

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self.xp.empty(shape, dtype=dtype)

    def launch(self, kernel: Any, blocks: int, inputs: tuple, outputs: tuple,
               scalars: tuple, threads: int = THREADS_PER_BLOCK) -> None:
        if self.gpu:
            import cupy

            pointer = cupy.cuda.get_current_stream().ptr
            stream = cuda.external_stream(pointer) if pointer else cuda.default_stream()
            # sync=False: the kernel runs on CuPy's current stream, after the work that made
            # its inputs (sync=True would block the host on that stream for every array)
            kernel[blocks, threads, stream](
                *(cuda.as_cuda_array(x, sync=False) for x in inputs + outputs), *scalars)
            return
        device_outputs = tuple(cuda.device_array(out.shape, dtype=out.dtype) for out in outputs)
        kernel[blocks, threads](
            *(cuda.to_device(x) for x in inputs), *device_outputs, *scalars)
        for device_out, out in zip(device_outputs, outputs):
            device_out.copy_to_host(out)
