"""Compile every CUDA source with NVRTC to a cubin, without a GPU or a driver.

CuPy's own compiler wrapper refuses to run without a driver, so CI compiles through
``cuda.bindings.nvrtc`` (pip ``cuda-bindings`` + ``nvidia-cuda-nvrtc-cu12``). Every name
expression listed in `latkv._gpu.cuda_sources.KERNELS` is instantiated, so a template
that does not compile for some bit width or size fails.

Run ``python -m latkv._gpu.nvrtc [--arch sm_80 sm_90] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from latkv._gpu.cuda_sources import COMPILE_OPTIONS, KERNELS, source, source_files

ARCHITECTURES = ("sm_80", "sm_90")


class CompileError(RuntimeError):
    pass


def compile_cubin(file_name: str, arch: str) -> bytes:
    """Compile ``cuda_kernels/<file_name>`` for ``arch`` and return the cubin bytes.

    Raises `CompileError` for a source that is not listed, cannot be read or does not compile.
    """
    try:
        text = source(file_name)
    except (OSError, ValueError) as error:
        raise CompileError(f"{file_name} ({arch}): cannot read the source: {error}") from None
    from cuda.bindings import nvrtc

    def check(result: tuple, what: str, program: object | None = None) -> tuple:
        status, *rest = result
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            log = ""
            if program is not None:
                _, size = nvrtc.nvrtcGetProgramLogSize(program)
                buffer = b" " * size
                nvrtc.nvrtcGetProgramLog(program, buffer)
                log = buffer.decode(errors="replace")
            raise CompileError(f"{file_name} ({arch}): {what} failed: {status}\n{log}")
        return tuple(rest)

    (program,) = check(
        nvrtc.nvrtcCreateProgram(text.encode(), file_name.encode(), 0, [], []),
        "nvrtcCreateProgram",
    )
    try:
        for name in KERNELS[file_name]:
            check(nvrtc.nvrtcAddNameExpression(program, name.encode()), f"add {name}")
        options = [f"--gpu-architecture={arch}".encode()] + [o.encode() for o in COMPILE_OPTIONS]
        check(nvrtc.nvrtcCompileProgram(program, len(options), options), "compile", program)
        for name in KERNELS[file_name]:
            (lowered,) = check(
                nvrtc.nvrtcGetLoweredName(program, name.encode()), f"lowered name of {name}"
            )
            if not lowered:
                raise CompileError(f"{file_name} ({arch}): {name} was not instantiated")
        (size,) = check(nvrtc.nvrtcGetCUBINSize(program), "cubin size")
        cubin = b" " * size
        check(nvrtc.nvrtcGetCUBIN(program, cubin), "cubin")
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(program)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHITECTURES))
    parser.add_argument("--out", type=Path, default=None, help="write the cubins here")
    args = parser.parse_args(argv)
    failures = 0
    unlisted = sorted(set(source_files()) - set(KERNELS))
    for file_name in unlisted:
        print(f"{file_name}: not listed in latkv._gpu.cuda_sources.KERNELS, so never compiled",
              file=sys.stderr)
        failures += 1
    for file_name in sorted(KERNELS):
        for arch in args.arch:
            try:
                cubin = compile_cubin(file_name, arch)
            except CompileError as error:
                print(error, file=sys.stderr)
                failures += 1
                continue
            print(f"compiled {file_name} for {arch}: {len(KERNELS[file_name])} kernels, "
                  f"{len(cubin)} bytes")
            if args.out is not None:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / f"{file_name[:-3]}.{arch}.cubin").write_bytes(cubin)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
