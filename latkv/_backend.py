"""Array-module and backend dispatch.

A *backend* names the implementation that runs an operation:

``"numpy"``
    The NumPy reference: short, readable, the definition of truth.
``"numba"``
    CPU fast path, numba ``@njit(parallel=True, cache=True)`` kernels in ``latkv/_cpu``.
``"cupy"``
    GPU production path: CuPy ``RawModule`` kernels compiled from ``cuda_kernels/*.cu``.
``"numba.cuda"``
    Second GPU implementation, numba.cuda kernels in ``latkv/_gpu``. It accepts NumPy
    arrays too (copied to the device and back), which is how it runs in the CUDA
    simulator (``NUMBA_ENABLE_CUDASIM=1``) on machines without a GPU.

The array module of the input picks the default (NumPy arrays -> ``"numba"``, CuPy arrays
-> ``"cupy"``); ``backend=`` overrides it. Implementations are listed in one table,
``IMPLEMENTATIONS``, as ``"module:function"`` strings imported on first use, so that a
missing optional dependency only matters to the backend that needs it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any, Callable

import numpy as np

BACKENDS = ("numpy", "numba", "cupy", "numba.cuda")
GPU_BACKENDS = ("cupy", "numba.cuda")

# (operation, backend) -> "module:function". One table, so no dispatch branch goes untested:
# tests/test_backend.py imports every entry.
IMPLEMENTATIONS: dict[tuple[str, str], str] = {
    ("pack_bits", "numpy"): "latkv.packing:pack_bits_reference",
    ("pack_bits", "numba"): "latkv._cpu.packing:pack_bits",
    ("pack_bits", "cupy"): "latkv._gpu.cupy_packing:pack_bits",
    ("pack_bits", "numba.cuda"): "latkv._gpu.numba_packing:pack_bits",
    ("unpack_bits", "numpy"): "latkv.packing:unpack_bits_reference",
    ("unpack_bits", "numba"): "latkv._cpu.packing:unpack_bits",
    ("unpack_bits", "cupy"): "latkv._gpu.cupy_packing:unpack_bits",
    ("unpack_bits", "numba.cuda"): "latkv._gpu.numba_packing:unpack_bits",
    # Walsh-Hadamard stage on a segment of each row: y[..., start:start+size] =
    # H_size(signs * x[..., start:start+size]) / sqrt(size) (forward) and its inverse.
    ("hadamard_segment", "numpy"): "latkv.rotations:hadamard_segment_reference",
    ("hadamard_segment", "numba"): "latkv._cpu.hadamard:hadamard_segment",
    ("hadamard_segment", "cupy"): "latkv._gpu.cupy_hadamard:hadamard_segment",
    ("hadamard_segment", "numba.cuda"): "latkv._gpu.numba_hadamard:hadamard_segment",
    # the whole RandomizedHadamard (permutation and one or two stages), forward or inverse:
    # `latkv.rotations.randomized_hadamard_staged` with that backend's stage; numba fuses it
    # into one pass over each row.
    ("randomized_hadamard", "numpy"): "latkv.rotations:randomized_hadamard_staged",
    ("randomized_hadamard", "numba"): "latkv._cpu.hadamard:randomized_hadamard",
    ("randomized_hadamard", "cupy"): "latkv._gpu.cupy_hadamard:randomized_hadamard",
    ("randomized_hadamard", "numba.cuda"): "latkv._gpu.numba_hadamard:randomized_hadamard",
    # TurboQuant's codebook stage: codes of rotated / norm (fused divide, search, pack), the
    # centroids of packed codes, and q @ centroids[codes].T from the packed codes
    ("codebook_quantize", "numpy"): "latkv.turbo:codebook_quantize_reference",
    ("codebook_quantize", "numba"): "latkv._cpu.codebook:codebook_quantize",
    ("codebook_quantize", "cupy"): "latkv._gpu.cupy_codebook:codebook_quantize",
    ("codebook_quantize", "numba.cuda"): "latkv._gpu.numba_codebook:codebook_quantize",
    ("codebook_dequantize", "numpy"): "latkv.turbo:codebook_dequantize_reference",
    ("codebook_dequantize", "numba"): "latkv._cpu.codebook:codebook_dequantize",
    ("codebook_dequantize", "cupy"): "latkv._gpu.cupy_codebook:codebook_dequantize",
    ("codebook_dequantize", "numba.cuda"): "latkv._gpu.numba_codebook:codebook_dequantize",
    ("codebook_scores", "numpy"): "latkv.turbo:codebook_scores_reference",
    ("codebook_scores", "numba"): "latkv._cpu.codebook:codebook_scores",
    ("codebook_scores", "cupy"): "latkv._gpu.cupy_codebook:codebook_scores",
    ("codebook_scores", "numba.cuda"): "latkv._gpu.numba_codebook:codebook_scores",
    # PolarQuant: codes of every level and block radii of rotated vectors, and back
    ("polar_quantize", "numpy"): "latkv.polar:polar_quantize_reference",
    ("polar_quantize", "numba"): "latkv._cpu.polar:polar_quantize",
    ("polar_quantize", "cupy"): "latkv._gpu.cupy_polar:polar_quantize",
    ("polar_quantize", "numba.cuda"): "latkv._gpu.numba_polar:polar_quantize",
    ("polar_dequantize", "numpy"): "latkv.polar:polar_dequantize_reference",
    ("polar_dequantize", "numba"): "latkv._cpu.polar:polar_dequantize",
    ("polar_dequantize", "cupy"): "latkv._gpu.cupy_polar:polar_dequantize",
    ("polar_dequantize", "numba.cuda"): "latkv._gpu.numba_polar:polar_dequantize",
    # E8 / D8 nearest lattice points of (n, 8) float32 rows (latkv.lattice tie rules)
    ("nearest_e8", "numpy"): "latkv.lattice:nearest_e8_reference",
    ("nearest_e8", "numba"): "latkv._cpu.lattice:nearest_e8",
    ("nearest_e8", "cupy"): "latkv._gpu.cupy_lattice:nearest_e8",
    ("nearest_e8", "numba.cuda"): "latkv._gpu.numba_lattice:nearest_e8",
    ("nearest_d8", "numpy"): "latkv.lattice:nearest_d8_reference",
    ("nearest_d8", "numba"): "latkv._cpu.lattice:nearest_d8",
    ("nearest_d8", "cupy"): "latkv._gpu.cupy_lattice:nearest_d8",
    ("nearest_d8", "numba.cuda"): "latkv._gpu.numba_lattice:nearest_d8",
    # E8Quant's fixed-rate Voronoi code: (scale, labels) of rotated (n, dim) float32 vectors
    # on a float16 scale ladder, and the scaled code points of (labels, scale)
    ("voronoi_encode", "numpy"): "latkv.e8:voronoi_encode_reference",
    ("voronoi_encode", "numba"): "latkv._cpu.voronoi:voronoi_encode",
    ("voronoi_encode", "cupy"): "latkv._gpu.cupy_voronoi:voronoi_encode",
    ("voronoi_encode", "numba.cuda"): "latkv._gpu.numba_voronoi:voronoi_encode",
    ("voronoi_decode", "numpy"): "latkv.e8:voronoi_decode_reference",
    ("voronoi_decode", "numba"): "latkv._cpu.voronoi:voronoi_decode",
    ("voronoi_decode", "cupy"): "latkv._gpu.cupy_voronoi:voronoi_decode",
    ("voronoi_decode", "numba.cuda"): "latkv._gpu.numba_voronoi:voronoi_decode",
    # KVCache decode step over TurboQuant-mse keys and values: per (head, block) the
    # split-softmax partials (acc in the value rotation's domain, max, sum) from packed codes
    ("codebook_attention", "numpy"): "latkv.attention:codebook_attention_reference",
    ("codebook_attention", "numba"): "latkv._cpu.attention:codebook_attention",
    ("codebook_attention", "cupy"): "latkv._gpu.cupy_attention:codebook_attention",
    ("codebook_attention", "numba.cuda"): "latkv._gpu.numba_attention:codebook_attention",
    # QJL: <q, 2 bits - 1> from packed sign bits
    ("sign_scores", "numpy"): "latkv.qjl:sign_scores_reference",
    ("sign_scores", "numba"): "latkv._cpu.sign_sketch:sign_scores",
    ("sign_scores", "cupy"): "latkv._gpu.cupy_codebook:sign_scores",
    ("sign_scores", "numba.cuda"): "latkv._gpu.numba_codebook:sign_scores",
}

_loaded: dict[tuple[str, str], Callable[..., Any]] = {}


def array_module(x: Any) -> ModuleType:
    """Return ``numpy`` or ``cupy`` for an array, without importing CuPy for NumPy input."""
    module = type(x).__module__.split(".")[0]
    if module == "cupy":
        import cupy

        return cupy
    return np


def is_gpu_array(x: Any) -> bool:
    """True for CuPy arrays (and other arrays exposing ``__cuda_array_interface__``)."""
    return hasattr(x, "__cuda_array_interface__") and not isinstance(x, np.ndarray)


def as_array(x: Any, name: str) -> Any:
    """Accept NumPy and CuPy arrays as they are and anything else with ``__dlpack__``.

    A DLPack producer on the GPU becomes a CuPy array, on the CPU a NumPy array.
    """
    if isinstance(x, np.ndarray) or type(x).__module__.split(".")[0] == "cupy":
        return x
    if hasattr(x, "__dlpack_device__"):
        device_type, _ = x.__dlpack_device__()
        if device_type == 1:  # kDLCPU
            return np.from_dlpack(x)
        import cupy

        return cupy.from_dlpack(x)
    if isinstance(x, (list, tuple, int, float, np.generic)):
        return np.asarray(x)
    raise TypeError(
        f"{name} must be a NumPy or CuPy array (or support __dlpack__), got {type(x).__name__}"
    )


def default_backend(x: Any) -> str:
    """The backend the array module of ``x`` selects: ``"cupy"`` for GPU arrays, else ``"numba"``."""
    if is_gpu_array(x):
        return "cupy"
    if os.environ.get("LATKV_BACKEND") in BACKENDS:
        return os.environ["LATKV_BACKEND"]
    return "numba"


def resolve_backend(backend: str | None, x: Any) -> str:
    """Validate ``backend`` (or pick the default for ``x``)."""
    if backend is None:
        return default_backend(x)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("numpy", "numba") and is_gpu_array(x):
        raise ValueError(
            f"backend {backend!r} runs on the CPU but the input is a GPU array; "
            "use backend='cupy' or 'numba.cuda', or move the array to the host"
        )
    if backend == "cupy" and not is_gpu_array(x):
        raise ValueError(
            "backend 'cupy' needs CuPy input arrays; use backend='numba.cuda' to run a GPU "
            "kernel on NumPy input (it copies to the device and back)"
        )
    return backend


def implementation(operation: str, backend: str) -> Callable[..., Any]:
    """Import and return the function implementing ``operation`` on ``backend``."""
    key = (operation, backend)
    if key not in _loaded:
        try:
            target = IMPLEMENTATIONS[key]
        except KeyError:
            raise ValueError(f"{operation!r} has no {backend!r} implementation") from None
        module_name, function_name = target.split(":")
        _loaded[key] = getattr(importlib.import_module(module_name), function_name)
    return _loaded[key]


def numba_cuda_available() -> bool:
    """True when numba.cuda can run kernels: a real device or the simulator."""
    try:
        from numba import cuda
    except ImportError:
        return False
    try:
        return bool(cuda.is_available())
    except Exception:
        return False


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def available_backends() -> tuple[str, ...]:
    """Backends that can run on this machine now."""
    found = ["numpy", "numba"]
    if cupy_available():
        found.append("cupy")
    if numba_cuda_available():
        found.append("numba.cuda")
    return tuple(found)
