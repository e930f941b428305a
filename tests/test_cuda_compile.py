"""Every CUDA source compiles with NVRTC for sm_80 and sm_90, every instantiation included.

This needs no GPU and no driver (cuda-bindings + nvidia-cuda-nvrtc-cu12). CI installs both, so
there the test must run: it is skipped only outside CI when they are absent.
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
    from latkv._gpu.nvrtc import compile_cubin

    cubin = compile_cubin(file_name, arch)
    assert cubin[:4] == b"\x7fELF"  # a cubin is an ELF image


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
