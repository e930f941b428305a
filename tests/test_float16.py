"""numba float16 rounding (latkv._cpu.float16) against NumPy's float16 conversion."""

from __future__ import annotations

import numpy as np
from numba import njit

from latkv._cpu.float16 import (
    FLOAT16_MAX,
    float16_bits,
    next_float16_up,
    round_down_float16,
    round_up_float16,
)


@njit(cache=True)
def _round_all(values, down, up, down_bits, up_bits):
    for i in range(values.size):
        down[i] = round_down_float16(values[i])
        up[i] = round_up_float16(values[i])
        down_bits[i] = float16_bits(down[i]) if abs(down[i]) <= FLOAT16_MAX else 0
        up_bits[i] = float16_bits(up[i]) if abs(up[i]) <= FLOAT16_MAX else 0


def _every_float16_and_neighbours(rng):
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    every = every[np.isfinite(every)].astype(np.float32)
    above = np.nextafter(every, np.float32(np.inf))
    below = np.nextafter(every, np.float32(-np.inf))
    # random float32 over the whole float16 range, subnormals included
    spread = rng.standard_normal(200_000) * np.exp(rng.uniform(-20, 11, 200_000))
    values = np.concatenate([every, above, below, spread.astype(np.float32)])
    return values[np.abs(values) <= FLOAT16_MAX]


def _next_float16(h, direction):
    with np.errstate(over="ignore"):  # the next float16 after 65504 is inf
        return np.nextafter(h, np.float16(direction * np.inf))


def test_directed_rounding_is_the_nearest_float16_on_each_side(rng):
    values = _every_float16_and_neighbours(rng)
    down, up = np.empty_like(values), np.empty_like(values)
    down_bits = np.empty(values.size, np.uint16)
    up_bits = np.empty(values.size, np.uint16)
    _round_all(values, down, up, down_bits, up_bits)
    assert (down <= values).all() and (up >= values).all()
    # float16 numbers (exactly representable) ...
    down16, up16 = down.astype(np.float16), up.astype(np.float16)
    assert np.array_equal(down16.astype(np.float32), down)
    assert np.array_equal(up16.astype(np.float32), up)
    # ... with no float16 strictly between them and the value
    assert (_next_float16(down16, 1).astype(np.float32) > values).all()
    assert (_next_float16(up16, -1).astype(np.float32) < values).all()
    # and the stored bits are NumPy's, sign of zero included
    assert np.array_equal(down_bits, down16.view(np.uint16))
    assert np.array_equal(up_bits, up16.view(np.uint16))


def test_documented_examples():
    values = np.array([0.1, -0.1, 1.0, -0.0, 1e-8, 65504.0, 65505.0], np.float32)
    down, up = np.empty_like(values), np.empty_like(values)
    down_bits = np.empty(values.size, np.uint16)
    up_bits = np.empty(values.size, np.uint16)
    _round_all(values, down, up, down_bits, up_bits)
    # 0.1 lies between the float16 numbers 1638/16384 and 1639/16384
    assert down[0] == np.float32(1638 / 16384) and up[0] == np.float32(1639 / 16384)
    assert down[1] == -up[0] and up[1] == -down[0]
    assert down[2] == up[2] == 1.0 and down_bits[2] == 0x3C00
    assert down_bits[3] == 0x8000  # -0.0 keeps its sign
    assert down[4] == 0.0 and up[4] == np.float32(2.0**-24) and up_bits[4] == 0x0001
    assert up[5] == 65504.0 and up_bits[5] == 0x7BFF
    assert up[6] == 65536.0  # beyond float16: the caller must refuse it


@njit(cache=True)
def _next_all(values, out):
    for i in range(values.size):
        out[i] = next_float16_up(values[i])


def test_next_float16_up_steps_to_the_following_float16():
    every = np.arange(0x7BFF, dtype=np.uint16).view(np.float16)  # +0 .. the float16 before max
    following = np.empty(every.size, np.float32)
    _next_all(every.astype(np.float32), following)
    assert np.array_equal(following, np.nextafter(every, np.float16(np.inf)).astype(np.float32))
