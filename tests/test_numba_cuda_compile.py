"""Every numba.cuda kernel compiles to PTX for sm_90 without a GPU (`latkv._gpu.numba_ptx`).

The simulator that runs the numba.cuda kernels in this suite never compiles them for a device,
so a kernel could pass every simulator test and fail on a GPU (the attention kernel did: a
shared array sized by an expression). The compile needs the real numba.cuda, so it runs in a
process without ``NUMBA_ENABLE_CUDASIM``. CI installs NVVM (nvidia-cuda-nvcc-cu12, the test
extra), so there the test must run: it is skipped only outside CI where NVVM is absent.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

if not os.environ.get("CI"):
    pytest.importorskip("nvidia.cuda_nvcc", reason="needs NVVM (nvidia-cuda-nvcc-cu12)")


def run_numba_ptx(*arguments: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_ENABLE_CUDASIM"}
    return subprocess.run([sys.executable, "-m", "latkv._gpu.numba_ptx", *arguments],
                          capture_output=True, text=True, env=env, timeout=600)


def test_every_numba_cuda_kernel_compiles_for_sm_90(tmp_path):
    from latkv._gpu.numba_ptx import HADAMARD_LOG_SIZES, MODULES

    result = run_numba_ptx("--cc", "9.0", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    written = sorted(path.name for path in tmp_path.iterdir())
    # 13 kernels and the Hadamard kernel at each size, each with an sm_90 entry
    assert len(written) == 13 + len(HADAMARD_LOG_SIZES)
    assert {name.split(".")[0] for name in written} == set(MODULES)
    for path in tmp_path.iterdir():
        text = path.read_text()
        assert ".target sm_90" in text and ".entry" in text


def test_it_refuses_to_run_in_the_simulator():
    result = subprocess.run([sys.executable, "-m", "latkv._gpu.numba_ptx"], capture_output=True,
                            text=True, env={**os.environ, "NUMBA_ENABLE_CUDASIM": "1"},
                            timeout=120)
    assert result.returncode == 2 and "real numba.cuda" in result.stderr
