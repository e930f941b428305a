"""Compile every CUDA source with NVRTC to a cubin, without a GPU or a driver.

CuPy's own compiler wrapper refuses to run without a driver, so CI compiles through
``cuda.bindings.nvrtc`` (pip ``cuda-bindings`` + ``nvidia-cuda-nvrtc-cu12``). Every name
expression listed in `latkv._gpu.cuda_sources.KERNELS` is instantiated, so a template
that does not compile for some bit width or size fails.

`kernel_resources` compiles with ``ptxas -v`` and reads back what each instantiation uses
(registers, static shared memory, stack frame, spills): CI checks the static shared memory
against the 48 KB that a block may use without an opt-in, and ``--resources`` prints the table
(the first thing to look at before profiling on a device).

Run ``python -m latkv._gpu.nvrtc [--arch sm_80 sm_90] [--out DIR] [--resources]``.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from latkv._gpu.cuda_sources import (COMPILE_OPTIONS, KERNELS, STATIC_SHARED_LIMIT, source,
                                     source_files)

ARCHITECTURES = ("sm_80", "sm_90")


class CompileError(RuntimeError):
    pass


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reports for one kernel instantiation, per thread or per block."""

    registers: int       # per thread
    shared_bytes: int    # static shared memory per block
    stack_bytes: int     # per-thread stack frame (local arrays and spills)
    spill_bytes: int     # per-thread register spill stores


def compile_cubin(file_name: str, arch: str) -> bytes:
    """Compile ``cuda_kernels/<file_name>`` for ``arch`` and return the cubin bytes.

    Raises `CompileError` for a source that is not listed, cannot be read or does not compile.
    """
    return _compile(file_name, arch, ())[0]


def kernel_resources(file_name: str, arch: str) -> tuple[bytes, dict[str, KernelResources]]:
    """Compile as `compile_cubin` does, with ``ptxas -v``; return the cubin and the resources
    of every instantiation of ``KERNELS[file_name]``, by name expression.

    Kernels that a source gets from an included file (``voronoi.cu`` includes ``lattice.cu``'s
    kernels) are compiled but not listed for it.
    """
    cubin, log, lowered = _compile(file_name, arch, ("--ptxas-options=-v",))
    return cubin, _parse_resources(log, lowered, file_name, arch)


def _parse_resources(log: str, lowered: dict[str, str], file_name: str,
                     arch: str) -> dict[str, KernelResources]:
    """The ptxas lines of each entry function: ``Function properties for F`` / ``N bytes stack
    frame, N bytes spill stores`` and ``Used N registers, ..., N bytes smem``."""
    found: dict[str, dict[str, int]] = {}
    entry = properties = None
    for line in log.splitlines():
        match = re.search(r"Compiling entry function '([^']+)'", line)
        if match:
            entry = match.group(1)
            found.setdefault(entry, {"shared_bytes": 0, "stack_bytes": 0, "spill_bytes": 0})
            continue
        match = re.search(r"Function properties for (\S+)", line)
        if match:
            properties = match.group(1)
            continue
        match = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", line)
        if match and properties is not None and properties in found:
            found[properties]["stack_bytes"] = int(match.group(1))
            found[properties]["spill_bytes"] = int(match.group(2))
            continue
        match = re.search(r"Used (\d+) registers", line)
        if match and entry is not None:
            found[entry]["registers"] = int(match.group(1))
            shared = re.search(r"(\d+) bytes smem", line)
            if shared:
                found[entry]["shared_bytes"] = int(shared.group(1))
    resources = {}
    for name, symbol in lowered.items():
        fields = found.get(symbol, {})
        if "registers" not in fields:
            raise CompileError(f"{file_name} ({arch}): no ptxas resource lines for {name}")
        resources[name] = KernelResources(**fields)
    return resources


def program_log(program: object) -> str:
    """The compile log of an NVRTC program (ptxas's lines with ``-v``), without its NUL.

    NVRTC writes into the buffer it is given, so it must be mutable: ``b" " * n`` is the
    interpreter's shared one-byte ``b" "`` itself for n = 1, the size of an empty log, and
    writing the log's NUL into it made every later ``b" "`` in the process ``b"\\x00"``.
    """
    from cuda.bindings import nvrtc

    _, size = nvrtc.nvrtcGetProgramLogSize(program)
    buffer = bytearray(max(size, 1))
    nvrtc.nvrtcGetProgramLog(program, buffer)
    return buffer.decode(errors="replace").rstrip("\x00 ")


def _compile(file_name: str, arch: str,
             extra_options: tuple[str, ...]) -> tuple[bytes, str, dict[str, str]]:
    """The cubin, the compile log and the lowered (mangled) name of every name expression."""
    try:
        text = source(file_name)
    except (OSError, ValueError) as error:
        raise CompileError(f"{file_name} ({arch}): cannot read the source: {error}") from None
    from cuda.bindings import nvrtc

    def check(result: tuple, what: str, program: object | None = None) -> tuple:
        status, *rest = result
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            log = "" if program is None else program_log(program)
            raise CompileError(f"{file_name} ({arch}): {what} failed: {status}\n{log}")
        return tuple(rest)

    (program,) = check(
        nvrtc.nvrtcCreateProgram(text.encode(), file_name.encode(), 0, [], []),
        "nvrtcCreateProgram",
    )
    try:
        for name in KERNELS[file_name]:
            check(nvrtc.nvrtcAddNameExpression(program, name.encode()), f"add {name}")
        options = [f"--gpu-architecture={arch}".encode()] + [
            o.encode() for o in COMPILE_OPTIONS + tuple(extra_options)]
        check(nvrtc.nvrtcCompileProgram(program, len(options), options), "compile", program)
        lowered_names = {}
        for name in KERNELS[file_name]:
            (lowered,) = check(
                nvrtc.nvrtcGetLoweredName(program, name.encode()), f"lowered name of {name}"
            )
            if not lowered:
                raise CompileError(f"{file_name} ({arch}): {name} was not instantiated")
            lowered_names[name] = lowered.decode()
        (size,) = check(nvrtc.nvrtcGetCUBINSize(program), "cubin size")
        cubin = bytearray(size)              # mutable: NVRTC writes into it (see program_log)
        check(nvrtc.nvrtcGetCUBIN(program, cubin), "cubin")
        return bytes(cubin), program_log(program), lowered_names
    finally:
        nvrtc.nvrtcDestroyProgram(program)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHITECTURES))
    parser.add_argument("--out", type=Path, default=None, help="write the cubins here")
    parser.add_argument("--resources", action="store_true",
                        help="print the registers, shared memory, stack and spills of every "
                             "instantiation")
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
                if args.resources:
                    cubin, resources = kernel_resources(file_name, arch)
                else:
                    cubin, resources = compile_cubin(file_name, arch), {}
            except CompileError as error:
                print(error, file=sys.stderr)
                failures += 1
                continue
            print(f"compiled {file_name} for {arch}: {len(KERNELS[file_name])} kernels, "
                  f"{len(cubin)} bytes")
            for name, used in resources.items():
                print(f"  {name:42s} {used.registers:3d} registers {used.shared_bytes:6d} B "
                      f"shared {used.stack_bytes:5d} B stack {used.spill_bytes:4d} B spilled")
            if args.out is not None:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / f"{file_name[:-3]}.{arch}.cubin").write_bytes(cubin)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
