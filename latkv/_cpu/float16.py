"""float16 rounding inside numba kernels, which have no float16 type on the CPU.

A float16 value is kept as the float32 that equals it exactly, and stored as its IEEE
binary16 bit pattern (``uint16``; ``.view(np.float16)`` outside the kernel). Directed rounding
uses the float16 quantum of the value's binade: ``2**(e - 10)`` for ``|v|`` in
``[2**e, 2**(e+1))`` with ``e >= -14``, and ``2**-24`` below (subnormals), so
``floor(v / q) * q`` is the largest float16 ``<= v``; every operation is exact in float32.
"""

from __future__ import annotations

import numpy as np
from numba import njit

#: largest finite float16
FLOAT16_MAX = np.float32(65504.0)
_SMALLEST_NORMAL = np.float32(2.0**-14)
_SUBNORMAL_QUANTUM = np.float32(2.0**-24)


@njit(inline="always")
def _quantum(value):
    """Spacing of float16 values in the binade of float32 ``value``."""
    magnitude = abs(value)
    if magnitude < _SMALLEST_NORMAL:
        return _SUBNORMAL_QUANTUM
    exponent = (np.int32(np.float32(magnitude).view(np.int32)) >> 23) & 0xFF
    # 2**(exponent - 127 - 10) as float32 bits
    return np.int32((exponent - 10) << 23).view(np.float32)


@njit(inline="always")
def round_down_float16(value):
    """Largest float16 ``<= value`` (float32 in, float32 out; may exceed the float16 range)."""
    step = _quantum(value)
    return np.float32(np.floor(value / step) * step)


@njit(inline="always")
def round_up_float16(value):
    """Smallest float16 ``>= value`` (float32 in, float32 out; may exceed the float16 range)."""
    step = _quantum(value)
    return np.float32(np.ceil(value / step) * step)


@njit(inline="always")
def next_float16_up(value):
    """The float16 after a float16 ``value >= 0`` (``+0.0`` -> ``2**-24``)."""
    return np.float32(value + _quantum(value))


@njit(inline="always")
def float16_bits(value):
    """IEEE binary16 bits of a float32 ``value`` that is exactly a finite float16."""
    pattern = np.int32(np.float32(value).view(np.int32))
    sign = (pattern >> 16) & 0x8000
    magnitude = abs(value)
    if magnitude == np.float32(0.0):
        return np.uint16(sign)
    if magnitude < _SMALLEST_NORMAL:
        return np.uint16(sign | np.int32(magnitude / _SUBNORMAL_QUANTUM))
    exponent = ((pattern >> 23) & 0xFF) - 127
    return np.uint16(sign | ((exponent + 15) << 10) | ((pattern >> 13) & 0x3FF))
