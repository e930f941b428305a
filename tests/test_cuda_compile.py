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

    files = {p.name for p in resources.files("latkv.cuda_kernels").iterdir()
             if p.name.endswith(".cu")}
    assert files == set(KERNELS)
