"""Compile every numba.cuda kernel to PTX for a device, without a GPU (CI's check).

The CUDA simulator runs the kernels' Python, so it accepts what a device compile refuses: a
shared array sized by an expression instead of a constant made the attention kernel fail type
inference on a real GPU while every simulator test passed. This compiles each kernel with the
argument types its wrapper launches it with (`kernel_types`; ``numba.cuda.compile_ptx``, NVVM
from nvidia-cuda-nvcc-cu12 of the test extra), and checks that every kernel of
``latkv._gpu.numba_*`` is listed. numba-cuda asks the current device for its compute
capability when it compiles the device functions a kernel calls; with no device, a stand-in
answers with the target's.

It needs the real numba.cuda, so it runs in a process without ``NUMBA_ENABLE_CUDASIM=1`` (the
test suite's setting): ``python -m latkv._gpu.numba_ptx [--cc 9.0] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any

MODULES = ("numba_packing", "numba_hadamard", "numba_codebook", "numba_attention",
           "numba_polar", "numba_lattice", "numba_voronoi")
#: sizes of the Hadamard kernels compiled (`numba_hadamard._build_kernel` builds one per size)
HADAMARD_LOG_SIZES = (0, 7, 13)


def kernel_types() -> dict[tuple[str, str], tuple[Any, ...]]:
    """``(module, kernel) -> argument types`` as the wrappers pass them (inputs, outputs,
    scalars: `latkv._gpu.numba_launch.DeviceArrays.launch`)."""
    from numba.core import types

    f32, f64, u8, i64 = types.float32, types.float64, types.uint8, types.int64

    def array(dtype: Any, ndim: int) -> Any:
        return types.Array(dtype, ndim, "C")

    return {
        ("numba_packing", "_pack_kernel"): (array(u8, 2), array(u8, 2), i64),
        ("numba_packing", "_unpack_kernel"): (array(u8, 2), array(u8, 2), i64),
        ("numba_codebook", "_quantize_kernel"): (array(f32, 2), array(f32, 1), array(f32, 1),
                                                 array(u8, 2), i64),
        ("numba_codebook", "_dequantize_kernel"): (array(u8, 2), array(f32, 1),
                                                   array(f32, 2), i64),
        ("numba_codebook", "_scores_kernel"): (array(f32, 3), array(u8, 3), array(f32, 1),
                                               array(f32, 3), i64),
        ("numba_codebook", "_sign_scores_kernel"): (array(f32, 3), array(u8, 3),
                                                    array(f32, 3)),
        ("numba_attention", "_attention_kernel"): (
            array(f32, 4), array(u8, 3), array(f32, 2), array(f32, 1), array(f32, 3),
            array(u8, 3), array(f32, 2), array(f32, 1), array(f32, 4), array(f32, 3),
            array(f32, 3), i64, i64, f32),
        ("numba_polar", "_quantize_kernel"): (array(f32, 2), array(f64, 1), array(i64, 2),
                                              array(u8, 2), array(f64, 2), i64),
        ("numba_polar", "_dequantize_kernel"): (array(u8, 2), array(f64, 2), array(f64, 1),
                                                array(i64, 2), array(f32, 2)),
        ("numba_lattice", "_nearest_d8_kernel"): (array(f32, 2), array(f32, 2)),
        ("numba_lattice", "_nearest_e8_kernel"): (array(f32, 2), array(f32, 2)),
        ("numba_voronoi", "_encode_kernel"): (array(f32, 2), array(f64, 1), array(f32, 1),
                                              array(f32, 1), array(u8, 2), i64, f64, f64),
        ("numba_voronoi", "_decode_kernel"): (array(u8, 2), array(f32, 1), array(f32, 1),
                                              array(f32, 2), i64),
        ("numba_hadamard", "_build_kernel"): (array(f32, 2), array(f32, 2), array(f32, 1),
                                              i64, types.boolean, f32),
    }


def unlisted_kernels() -> set[tuple[str, str]]:
    """Kernels (not device functions) of the modules that `kernel_types` lacks."""
    from numba.cuda.dispatcher import CUDADispatcher

    listed = set(kernel_types())
    found = set()
    for module in MODULES:
        for name, value in vars(importlib.import_module(f"latkv._gpu.{module}")).items():
            if isinstance(value, CUDADispatcher) and not value.targetoptions.get("device"):
                found.add((module, name))
    return found - listed


def compile_all(cc: tuple[int, int]) -> dict[str, str]:
    """PTX of every kernel (the Hadamard ones at `HADAMARD_LOG_SIZES`), by name."""
    import numba.cuda.dispatcher as dispatcher
    from numba import cuda
    from numba.core import types

    class StandIn:
        compute_capability = cc

    if not hasattr(dispatcher, "get_current_device"):
        raise RuntimeError("numba-cuda no longer asks numba.cuda.dispatcher."
                           "get_current_device for the compute capability: update numba_ptx")
    dispatcher.get_current_device = lambda: StandIn()
    out = {}
    for (module, name), argument_types in kernel_types().items():
        target = getattr(importlib.import_module(f"latkv._gpu.{module}"), name)
        kernels = ({f"{module}.{name}": target} if name != "_build_kernel" else
                   {f"{module}.{name}({size})": target(size) for size in HADAMARD_LOG_SIZES})
        for label, kernel in kernels.items():
            ptx, _ = cuda.compile_ptx(kernel.py_func, types.void(*argument_types), cc=cc)
            out[label] = ptx
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", default="9.0", help="compute capability (default 9.0)")
    parser.add_argument("--out", type=Path, default=None, help="write the PTX files here")
    args = parser.parse_args(argv)
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        print("numba_ptx needs the real numba.cuda: unset NUMBA_ENABLE_CUDASIM", file=sys.stderr)
        return 2
    major, minor = (int(part) for part in args.cc.split("."))
    unlisted = unlisted_kernels()
    if unlisted:
        print(f"kernels without argument types in numba_ptx: {sorted(unlisted)}",
              file=sys.stderr)
        return 1
    failures = 0
    try:
        compiled = compile_all((major, minor))
    except Exception as error:  # noqa: BLE001 - report which kernel and why, then fail
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        return 1
    for label, ptx in compiled.items():
        if f".target sm_{major}{minor}" not in ptx or ".entry" not in ptx:
            print(f"{label}: no sm_{major}{minor} entry in the PTX", file=sys.stderr)
            failures += 1
            continue
        print(f"compiled {label} for sm_{major}{minor}: {len(ptx)} characters of PTX")
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{label}.sm_{major}{minor}.ptx").write_text(ptx)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
