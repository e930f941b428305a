"""Input checking shared by every method.

Every public function checks its arguments with these and raises a ``ValueError`` or
``TypeError`` that names the argument and says what was expected. Nothing downstream of a
check sees a wrong dtype, a NaN or an empty array.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import numpy as np

from latkv._backend import array_module, as_array

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def check_int(value: Any, name: str, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` as an int if it is an integer in ``[low, high]``; else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def check_bits(bits: Any, name: str = "bits", low: int = 1, high: int = 8) -> int:
    """Bit widths are integers in ``[low, high]`` (1..8 unless a method says otherwise)."""
    return check_int(bits, name, low, high)


def check_rate(value: Any, name: str, low: float, high: float) -> int | float:
    """A real number in ``[low, high]`` (a rate or budget in bits): an int when integral."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not low <= number <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value}")
    return int(number) if number.is_integer() else number


def check_dashed(value: Any, name: str, convert: Callable[[str], Any], example: str) -> list:
    """The items of a sequence parameter given as a list/tuple or, as in a spec string, as
    parts joined by dashes (``"4-2-2-2"``; each part through ``convert``).

    Raises ``ValueError`` naming ``name`` for a string that does not parse, ``TypeError`` for
    anything that is neither.
    """
    if isinstance(value, str):
        try:
            return [convert(part) for part in value.split("-")]
        except ValueError:
            raise ValueError(f"{name} must look like {example!r}, got {value!r}") from None
    if isinstance(value, (list, tuple)):
        return list(value)
    raise TypeError(f"{name} must be a sequence or a string like {example!r}, got "
                    f"{type(value).__name__}")


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_float_array(
    x: Any, name: str, dim: int | None = None, min_ndim: int = 1, finite: bool = True
) -> Any:
    """Check a float16/32/64 array (NumPy or CuPy) of shape ``(..., dim)``.

    Raises ``TypeError`` for a non-array or a non-float dtype, ``ValueError`` for too few
    axes, a wrong last dimension, an empty array or NaN/Inf values.
    """
    x = as_array(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, float32 or float64, got dtype {x.dtype}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} axes, got shape {tuple(x.shape)}")
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(
            f"{name} must have last dimension {dim} (the quantizer's dim), "
            f"got shape {tuple(x.shape)}"
        )
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); nothing to encode")
    if finite and not bool(array_module(x).isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return x


def check_integer_array(x: Any, name: str, min_ndim: int = 1) -> Any:
    """Check an unsigned/signed integer array (NumPy or CuPy) that is not empty."""
    x = as_array(x, name)
    if x.dtype.kind not in "ui":
        raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} axes, got shape {tuple(x.shape)}")
    return x
