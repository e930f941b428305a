"""The dispatch table: every entry imports, and backend selection is checked."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from latkv._backend import IMPLEMENTATIONS, resolve_backend


@pytest.mark.parametrize("key", sorted(IMPLEMENTATIONS))
def test_every_implementation_imports(key):
    module_name, function_name = IMPLEMENTATIONS[key].split(":")
    assert callable(getattr(importlib.import_module(module_name), function_name))


def test_every_operation_has_every_backend():
    operations = {operation for operation, _ in IMPLEMENTATIONS}
    for operation in operations:
        assert {b for o, b in IMPLEMENTATIONS if o == operation} == {
            "numpy", "numba", "cupy", "numba.cuda"}


def test_resolve_backend():
    x = np.zeros(3)
    assert resolve_backend(None, x) == "numba"
    assert resolve_backend("numpy", x) == "numpy"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("torch", x)
    with pytest.raises(ValueError, match="needs CuPy input"):
        resolve_backend("cupy", x)
