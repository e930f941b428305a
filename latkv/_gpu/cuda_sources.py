"""The CUDA sources under ``cuda_kernels/`` and the kernel instantiations each one provides.

Head dim and bit width are template parameters, instantiated by name (NVRTC name
expressions), never ``#define`` constants. ``KERNELS`` is the one list of what the library
instantiates: the CuPy loader compiles from it, and CI compiles every entry with NVRTC for
sm_80 and sm_90 (``python -m latkv._gpu.nvrtc``), so a kernel that does not compile fails CI.

A source may start from another one's device functions with a line ``#include "other.cu"``:
`source` replaces it with the text of that file (once per file, recursively), so the CuPy
loader and NVRTC compile one self-contained text and each device function has one definition
(``voronoi.cu`` reuses the nearest-point code of ``lattice.cu`` this way).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

# Static shared memory a thread block may use without cudaFuncSetAttribute (every
# architecture since sm_20; the CUDA and numba.cuda kernels use static shared memory only).
STATIC_SHARED_LIMIT = 48 * 1024
# Largest Hadamard length the kernels instantiate: 2**MAX_LOG_SIZE.
MAX_LOG_SIZE = 10
# Deepest PolarQuant recursion the kernels instantiate: blocks of 2**MAX_POLAR_LEVELS.
MAX_POLAR_LEVELS = 8

# (key bits, value bits) pairs whose codebook attention kernel has the widths as template
# parameters (the common TurboQuant widths); every other pair of 1..8 runs the runtime-width
# instantiation <0, 0, tile>, which reads the packed bytes one at a time.
ATTENTION_BIT_PAIRS: tuple[tuple[int, int], ...] = (
    (1, 1), (2, 2), (3, 3), (4, 4), (8, 8), (4, 2), (3, 2), (8, 4))
# Queries per tile of the codebook attention kernel (1, 4 or 8; the wrapper picks by m).
ATTENTION_QUERY_TILES: tuple[int, ...] = (1, 4, 8)

KERNELS: dict[str, tuple[str, ...]] = {
    "pack_bits.cu": tuple(f"pack_bits<{b}>" for b in range(1, 9))
    + tuple(f"unpack_bits<{b}>" for b in range(1, 9)),
    "hadamard.cu": tuple(f"hadamard_segment<{k}>" for k in range(0, MAX_LOG_SIZE + 1)),
    "codebook.cu": tuple(f"{kernel}<{b}>"
                         for kernel in ("codebook_quantize", "codebook_dequantize",
                                        "codebook_scores")
                         for b in range(1, 9)),
    "sign_sketch.cu": ("sign_scores",),
    "lattice.cu": ("nearest_d8", "nearest_e8"),
    "voronoi.cu": tuple(f"{kernel}<{b}>" for kernel in ("voronoi_encode", "voronoi_decode")
                        for b in range(1, 9)),
    "polar.cu": tuple(f"{kernel}<{levels}>"
                      for kernel in ("polar_quantize", "polar_dequantize")
                      for levels in range(1, MAX_POLAR_LEVELS + 1)),
    "attention.cu": tuple(f"codebook_attention<{key_bits}, {value_bits}, {tile}>"
                          for key_bits, value_bits in ATTENTION_BIT_PAIRS + ((0, 0),)
                          for tile in ATTENTION_QUERY_TILES),
}

COMPILE_OPTIONS: tuple[str, ...] = ("-std=c++17",)

# a whole line `#include "name.cu"`: another source of cuda_kernels/, inlined by `source`
_INCLUDE = re.compile(r'^#include "([A-Za-z0-9_]+\.cu)"[ \t]*$', re.MULTILINE)


def kernel_directory() -> Any:
    """Where the ``.cu`` files are: the installed package ``latkv.cuda_kernels`` (the
    ``cuda_kernels/`` folder of the checkout, mapped by pyproject.toml), or that folder itself
    when latkv runs from a checkout that was not installed (``PYTHONPATH=.``, as on a lent
    GPU machine)."""
    try:
        return resources.files("latkv.cuda_kernels")
    except ModuleNotFoundError:
        folder = Path(__file__).resolve().parents[2] / "cuda_kernels"
        if not folder.is_dir():
            raise
        return folder


def _read(file_name: str) -> str:
    return kernel_directory().joinpath(file_name).read_text()


def _expand(file_name: str, included: set[str]) -> str:
    included.add(file_name)

    def include(match: re.Match) -> str:
        name = match.group(1)
        if name in included:
            return f"// {name} is already included above"
        return f"// ---- {name}\n{_expand(name, included)}\n// ---- end of {name}"

    return _INCLUDE.sub(include, _read(file_name))


def source(file_name: str) -> str:
    """The text of ``cuda_kernels/<file_name>`` (`kernel_directory`), with its
    ``#include "other.cu"`` lines replaced by those files' texts."""
    if file_name not in KERNELS:
        raise ValueError(f"unknown CUDA source {file_name!r}; known: {sorted(KERNELS)}")
    return _expand(file_name, set())


def source_files() -> list[str]:
    """Names of the ``.cu`` files shipped in ``cuda_kernels/``."""
    return sorted(p.name for p in kernel_directory().iterdir() if p.name.endswith(".cu"))
