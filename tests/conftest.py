"""Shared test setup: hypothesis profiles, the CUDA simulator where there is no GPU, markers."""

from __future__ import annotations

import os

# numba.cuda reads this when it is first imported: without a GPU, its kernels run in the
# simulator (slow, so tests give it tiny inputs). On a GPU machine the real device is used.
HAS_NVIDIA_DEVICE = os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")
if not HAS_NVIDIA_DEVICE:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

CUDA_SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def cupy_device_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


HAS_CUPY_GPU = cupy_device_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device with CuPy")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUPY_GPU:
            item.add_marker(skip_gpu)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)
