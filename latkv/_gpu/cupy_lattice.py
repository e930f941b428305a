"""GPU production path of the D8 / E8 nearest points: CuPy ``RawModule`` kernels.

``nearest_d8`` and ``nearest_e8`` launch the kernels of the same names in
``cuda_kernels/lattice.cu`` (one thread per row of 8 coordinates, grid-stride; the comments at
the top of that file give the operations). The results are bit-identical to
`latkv.lattice.nearest_d8_reference` and `latkv.lattice.nearest_e8_reference`, signed zeros
included.

Inputs are CuPy arrays on the current device (copied to C-contiguous float32 first where they
are not); the results are new CuPy arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from latkv._gpu.cupy_modules import kernel, launch_1d

# Threads per block; one thread per row of 8 coordinates.
THREADS_PER_BLOCK = 256
# The kernels loop grid-stride, so any grid is correct; this caps the launch.
MAX_BLOCKS = 65535


def _run(name: str, x: Any) -> Any:
    import cupy

    x = cupy.ascontiguousarray(x, dtype=cupy.float32)
    if x.ndim < 1 or int(x.shape[-1]) != 8:
        raise ValueError(f"x must have shape (..., 8), got {tuple(x.shape)}")
    out = cupy.empty(x.shape, dtype=cupy.float32)
    if out.size == 0:
        return out
    rows = int(out.size) // 8
    launch_1d(kernel("lattice.cu", name), min(rows, MAX_BLOCKS * THREADS_PER_BLOCK),
              (x, out, np.int64(rows)), threads=THREADS_PER_BLOCK)
    return out


def nearest_d8(x: Any) -> Any:
    """Nearest ``D8`` point of each row (CuPy kernel).

    Parameters
    ----------
    x : (n, 8) (or (..., 8)) float32 cupy.ndarray
        Finite, ``|x_i| < 2^21`` (checked by `latkv.lattice.nearest_d8`, not here).

    Returns
    -------
    same shape, float32 cupy.ndarray
        Bit-identical to `latkv.lattice.nearest_d8_reference`.
    """
    return _run("nearest_d8", x)


def nearest_e8(x: Any) -> Any:
    """Nearest ``E8`` point of each row (CuPy kernel).

    Parameters
    ----------
    x : (n, 8) (or (..., 8)) float32 cupy.ndarray
        Finite, ``|x_i| < 2^21`` (checked by `latkv.lattice.nearest_e8`, not here).

    Returns
    -------
    same shape, float32 cupy.ndarray
        Bit-identical to `latkv.lattice.nearest_e8_reference`.
    """
    return _run("nearest_e8", x)
