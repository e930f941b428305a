"""The CUDA sources under ``cuda_kernels/`` and the kernel instantiations each one provides.

Head dim and bit width are template parameters, instantiated by name (NVRTC name
expressions), never ``#define`` constants. ``KERNELS`` is the one list of what the library
instantiates: the CuPy loader compiles from it, and CI compiles every entry with NVRTC for
sm_80 and sm_90 (``python -m latkv._gpu.nvrtc``), so a kernel that does not compile fails CI.
"""

from __future__ import annotations

from importlib import resources

# Largest Hadamard length the kernels instantiate: 2**MAX_LOG_SIZE.
MAX_LOG_SIZE = 10
# Deepest PolarQuant recursion the kernels instantiate: blocks of 2**MAX_POLAR_LEVELS.
MAX_POLAR_LEVELS = 8

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
    "polar.cu": tuple(f"{kernel}<{levels}>"
                      for kernel in ("polar_quantize", "polar_dequantize")
                      for levels in range(1, MAX_POLAR_LEVELS + 1)),
}

COMPILE_OPTIONS: tuple[str, ...] = ("-std=c++17",)


def source(file_name: str) -> str:
    """The text of ``cuda_kernels/<file_name>``, read from the installed package."""
    if file_name not in KERNELS:
        raise ValueError(f"unknown CUDA source {file_name!r}; known: {sorted(KERNELS)}")
    return resources.files("latkv.cuda_kernels").joinpath(file_name).read_text()


def source_files() -> list[str]:
    """Names of the ``.cu`` files shipped in ``cuda_kernels/``."""
    return sorted(p.name for p in resources.files("latkv.cuda_kernels").iterdir()
                  if p.name.endswith(".cu"))
