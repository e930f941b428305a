"""The one loader of CUDA kernels: ``cupy.RawModule`` per source file, cached per device."""

from __future__ import annotations

from typing import Any

from latkv._gpu.cuda_sources import COMPILE_OPTIONS, KERNELS, source

_modules: dict[tuple[str, int], Any] = {}


def kernel(file_name: str, name_expression: str) -> Any:
    """Return the compiled kernel ``name_expression`` (e.g. ``"pack_bits<4>"``) of a source.

    The module is compiled by NVRTC through CuPy on first use on each device, with every
    instantiation that ``KERNELS`` lists for that file, and kept for the process.
    """
    import cupy

    if name_expression not in KERNELS.get(file_name, ()):
        raise ValueError(f"{file_name} does not instantiate {name_expression!r}")
    key = (file_name, cupy.cuda.Device().id)
    if key not in _modules:
        _modules[key] = cupy.RawModule(
            code=source(file_name),
            options=COMPILE_OPTIONS,
            name_expressions=list(KERNELS[file_name]),
        )
    return _modules[key].get_function(name_expression)


def launch_1d(function: Any, total_threads: int, args: tuple, threads: int = 256) -> None:
    """Launch ``function`` with enough blocks of ``threads`` to cover ``total_threads``."""
    if total_threads <= 0:
        return
    blocks = (total_threads + threads - 1) // threads
    function((blocks,), (threads,), args)
