"""Serial clones of the parallel numba kernels, for small inputs.

Launching numba's thread pool costs more than the work below `SERIAL_BELOW` elements, and far
more when other threads (an OpenBLAS pool that just ran a matmul) are spinning on the same
cores: measured on 2 cores, a 480 x 64 randomized Hadamard took 0.3 ms serial and 5-9 ms
parallel right after a BLAS call. Every CPU kernel module picks its kernel with `kernel_for`.
"""

from __future__ import annotations

import types

from numba import njit

SERIAL_BELOW = 1 << 16
_serial: dict = {}


def serial_clone(kernel):
    """``kernel`` compiled without ``parallel``, under its own name.

    numba names a function's on-disk cache entry after its qualified name and first line, so
    a clone of the same Python function would share the parallel kernel's entry, and whichever
    compiled first would be loaded for both (a single-threaded "parallel" kernel).
    """
    function = kernel.py_func
    clone = types.FunctionType(function.__code__, function.__globals__,
                               function.__name__ + "_serial", function.__defaults__,
                               function.__closure__)
    clone.__qualname__ = function.__qualname__ + "_serial"
    return njit(cache=True)(clone)


def kernel_for(kernel, elements: int):
    """The parallel ``kernel`` for ``elements >= SERIAL_BELOW``, else its serial clone."""
    if elements >= SERIAL_BELOW:
        return kernel
    if kernel not in _serial:
        _serial[kernel] = serial_clone(kernel)
    return _serial[kernel]
