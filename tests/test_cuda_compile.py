"""Every CUDA source compiles with NVRTC for sm_80 and sm_90, every instantiation included.

This needs no GPU and no driver (cuda-bindings + nvidia-cuda-nvrtc-cu12). CI installs both, so
there the test must run: it is skipped only outside CI when they are absent. The same compile
runs ``ptxas -v``, so the resources of every instantiation are checked too: static shared
memory within the 48 KB a block gets without an opt-in (a kernel past it compiles but fails to
launch), and no instantiation without its resource lines.
"""

from __future__ import annotations

import os

import pytest

from latkv._gpu.cuda_sources import KERNELS

if not os.environ.get("CI"):
    pytest.importorskip("cuda.bindings.nvrtc")


@pytest.mark.parametrize("file_name", sorted(KERNELS))
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_source_compiles_to_cubin(file_name, arch):
    from latkv._gpu.nvrtc import STATIC_SHARED_LIMIT, kernel_resources

    cubin, resources = kernel_resources(file_name, arch)
    assert cubin[:4] == b"\x7fELF"  # a cubin is an ELF image
    assert set(resources) == set(KERNELS[file_name])
    for name, used in resources.items():
        assert 0 < used.registers <= 255, (name, used)
        assert used.shared_bytes <= STATIC_SHARED_LIMIT, (name, used)


def test_resource_lines_are_parsed():
    from latkv._gpu.nvrtc import CompileError, KernelResources, _parse_resources

    log = """ptxas info    : Compiling entry function '_Z1fILi1EEvv' for 'sm_90'
ptxas info    : Function properties for _Z1fILi1EEvv
ptxas         .     40 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 72 registers, used 1 barriers, 40 bytes cumulative stack size, 16384 bytes smem
ptxas info    : Function properties for __internal_trig_reduction_slowpathd
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z1gv' for 'sm_90'
ptxas info    : Used 30 registers, used 0 barriers"""
    assert _parse_resources(log, {"f<1>": "_Z1fILi1EEvv", "g": "_Z1gv"}, "x.cu", "sm_90") == {
        "f<1>": KernelResources(registers=72, shared_bytes=16384, stack_bytes=40, spill_bytes=8),
        "g": KernelResources(registers=30, shared_bytes=0, stack_bytes=0, spill_bytes=0)}
    with pytest.raises(CompileError, match="no ptxas resource lines for h"):
        _parse_resources(log, {"h": "_Z1hv"}, "x.cu", "sm_90")


def test_every_cu_file_is_listed():
    from importlib import resources

    from latkv._gpu.cuda_sources import source_files

    files = {p.name for p in resources.files("latkv.cuda_kernels").iterdir()
             if p.name.endswith(".cu")}
    assert files == set(KERNELS) == set(source_files())


def test_a_missing_or_unlisted_source_is_a_compile_failure(monkeypatch, capsys):
    from latkv._gpu import cuda_sources, nvrtc

    with pytest.raises(nvrtc.CompileError, match="unknown CUDA source"):
        nvrtc.compile_cubin("nowhere.cu", "sm_80")
    monkeypatch.setitem(cuda_sources.KERNELS, "missing.cu", ("missing<1>",))
    with pytest.raises(nvrtc.CompileError, match="missing.cu .*cannot read"):
        nvrtc.compile_cubin("missing.cu", "sm_80")
    # the command line reports it and fails, after trying the others
    monkeypatch.setattr(nvrtc, "KERNELS", {"missing.cu": ("missing<1>",)})
    assert nvrtc.main(["--arch", "sm_80"]) == 1
    assert "missing.cu" in capsys.readouterr().err
    monkeypatch.setattr(nvrtc, "KERNELS", {})
    monkeypatch.setattr(nvrtc, "source_files", lambda: ["stray.cu"])
    assert nvrtc.main(["--arch", "sm_80"]) == 1
    assert "stray.cu: not listed" in capsys.readouterr().err


def test_compiling_leaves_the_interpreters_shared_bytes_alone():
    """NVRTC writes the cubin and the log into the buffers it is given. A log buffer made as
    ``b" " * 1`` (an empty log is one NUL) was the interpreter's shared one-byte ``b" "``:
    after one compile, ``" ".encode()`` was ``b"\\x00"`` for the whole process (the tokenizer's
    doctest then encoded a space as byte 0)."""
    from latkv._gpu.nvrtc import compile_cubin

    compile_cubin("pack_bits.cu", "sm_80")      # without ptxas -v: an empty log
    assert " ".encode() == bytes([32]) and b" " * 1 == bytes([32])
    assert chr(32).encode("latin-1")[0] == 32


def test_sources_are_found_in_a_checkout_that_was_not_installed(monkeypatch):
    """Without the installed package ``latkv.cuda_kernels`` (``PYTHONPATH=.`` on a lent GPU
    machine), the sources are read from the checkout's ``cuda_kernels/`` folder."""
    from latkv._gpu import cuda_sources

    installed = cuda_sources.source("voronoi.cu")

    def not_installed(package):
        raise ModuleNotFoundError(f"No module named {package!r}")

    monkeypatch.setattr(cuda_sources.resources, "files", not_installed)
    assert cuda_sources.kernel_directory().name == "cuda_kernels"
    assert cuda_sources.source("voronoi.cu") == installed
    assert cuda_sources.source_files() == sorted(KERNELS)
