"""D8 / E8 nearest-point kernels (numba, numba.cuda, CuPy) against the NumPy references.

Every backend must be bit-identical with `latkv.lattice.nearest_d8_reference` and
`latkv.lattice.nearest_e8_reference`: ``array_equal`` of the float32 points and equal bit
patterns (signed zeros included), on Gaussian points at several scales, on the tie
configurations of the module's rules (half-integers, the quarter vectors equidistant from D8
and its coset, integral vectors with an odd sum, equal largest errors at several indices,
negative zeros, a dyadic grid full of ties of every kind) and on hypothesis-drawn inputs.

``latkv._gpu.numba_lattice`` runs here in the CUDA simulator where there is no GPU (tiny
inputs); ``latkv._gpu.cupy_lattice`` (``cuda_kernels/lattice.cu``) and numba.cuda on CuPy
input run in the ``gpu``-marked tests, skipped without a device.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from latkv._backend import numba_cuda_available
from latkv._cpu import lattice as cpu_lattice
from latkv._cpu import serial
from latkv.lattice import nearest_d8_reference, nearest_e8_reference, squared_distance

needs_numba_cuda = pytest.mark.skipif(
    not numba_cuda_available(), reason="numba.cuda has neither a device nor the simulator"
)

REFERENCES = {"d8": nearest_d8_reference, "e8": nearest_e8_reference}
SCALES = (0.3, 1.0, 3.0, 50.0)
LIMIT = float(1 << 21)


def gaussian(rows: int, scale: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + int(scale * 1000))
    return (rng.standard_normal((rows, 8)) * scale).astype(np.float32)


def _odd_sum(rng: np.random.Generator, rows: int, low: int, high: int) -> np.ndarray:
    """Integer rows with an odd sum."""
    base = rng.integers(low, high, (rows, 8)).astype(np.float64)
    even = base.sum(axis=1) % 2 == 0
    base[even, rng.integers(0, 8, int(even.sum()))] += 1
    return base


def tie_cases() -> np.ndarray:
    """Rows on the tie configurations of `latkv.lattice` (float32, ``(n, 8)``)."""
    rng = np.random.default_rng(2024)
    e0 = np.eye(8)[0]
    parts: list[np.ndarray] = []
    # half-integers: rint ties (halves to even), all of one row or mixed with integers
    parts.append(np.array([np.full(8, h) for h in (0.5, -0.5, 1.5, -1.5, 2.5, -2.5)]))
    parts.append(np.arange(-4, 4)[None, :] + 0.5)
    parts.append(rng.integers(-5, 5, (24, 8)) + 0.5)
    parts.append(rng.integers(-5, 5, (24, 8)) + 0.5 * rng.integers(0, 2, (24, 8)))
    # quarter vectors: (1/4) 1 is as far from 0 (D8) as from (1/2) 1 (the coset)
    parts.append(np.array([np.full(8, q) for q in (0.25, -0.25, 0.75, -0.75, 1.25, -1.75)]))
    parts.append(rng.integers(-3, 3, (24, 8)) + rng.choice([0.25, -0.25], (24, 8)))
    parts.append(rng.integers(-3, 3, (24, 8)) + rng.choice([0.25, 0.75], (24, 8)))
    # integral vectors with an odd sum: every error is 0, the first coordinate moves up
    parts.append(np.array([e0, -e0, np.roll(e0, 7), -np.roll(e0, 3), 3 * e0, np.ones(8) - e0]))
    parts.append(_odd_sum(rng, 24, -4, 5))
    # equal largest errors at several indices (an odd rounded sum: the first of them moves)
    for magnitude in (0.375, 0.5, 0.25):
        base = _odd_sum(rng, 24, -4, 5)
        error = rng.choice([0.0, 0.125, -0.125], (24, 8))
        for row in range(24):
            where = rng.choice(8, size=int(rng.integers(2, 6)), replace=False)
            error[row, where] = rng.choice([magnitude, -magnitude], where.size)
        parts.append(base + error)
    parts.append(np.array([[0.4, -0.4, 0.4, 0, 0, 0, 0, 0], [-0.4, 0.4, 0, 0, 0, 0, 0, 0.4],
                           [0.6, 0, 0, 0.4, 0, 0, 0, 0], [1.5, 0.5, 0, 0, 0, 0, 0, 0],
                           [-0.5, -1.5, 0, 0, 0, 0, 0, 0]]))
    # a dyadic grid: rint ties, parity ties, D8 / coset distance ties all over
    parts.append(rng.integers(-12, 13, (160, 8)) / 4)
    parts.append(rng.integers(-24, 25, (160, 8)) / 8)
    # large magnitudes (|x| < 2^21) and tiny ones, subnormals included
    parts.append(rng.choice([LIMIT - 0.5, -(LIMIT - 0.5), LIMIT - 0.125, LIMIT - 1.25,
                             2.0 ** 20 + 0.5, 0.0], (12, 8)))
    parts.append(rng.choice([1e-30, -1e-30, 1e-40, -1e-40, 2.0 ** -24, 0.5 - 2.0 ** -25,
                             0.25 + 2.0 ** -26], (12, 8)))
    # ties up to a coordinate far below the ulp of 1/2: x - 1/2 and x - y round in float32,
    # and the distances tie only as the reference computes them (float32 differences)
    parts.append(np.array([[2.0 ** -30, 0.5, 0.5, 0.5, 0.5, 0, 0, 0],
                           [0.5, -(2.0 ** -30), 0.5, -0.5, 0.5, 0, 0, 0],
                           [1e-30, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25]]))
    grid = rng.integers(-4, 5, (64, 8)) / 4
    grid[grid == 0] = rng.choice([2.0 ** -30, -(2.0 ** -30), 1e-30, 1e-40], int((grid == 0).sum()))
    parts.append(grid)
    x = np.concatenate([p.astype(np.float32) for p in parts])
    # negative zeros: whole rows, beside odd integers, in place of the +0 entries of some rows
    zeros = np.array([np.full(8, -0.0), np.r_[-0.0, 1.0, np.zeros(6)], np.r_[1.0, np.full(7, -0.0)],
                      np.r_[np.full(7, -0.0), -1.0], np.r_[-0.0, -0.3, -0.0, 0.25, -0.2, 0, 0, 0],
                      np.r_[-0.25, np.full(7, -0.0)], np.r_[-0.0, np.full(7, 0.25)]],
                     dtype=np.float32)
    signed = x[::5].copy()
    signed[signed == 0] = -0.0
    return np.concatenate([x, zeros, signed])


def assert_bit_identical(result, expected) -> None:
    assert result.dtype == np.float32 and result.shape == expected.shape
    np.testing.assert_array_equal(result, expected)
    # signed zeros too: the same bit patterns
    np.testing.assert_array_equal(result.view(np.uint32), expected.view(np.uint32))


def test_the_tie_cases_hit_every_tie_rule():
    x = tie_cases()
    assert (np.abs(x) < LIMIT).all()
    rounded = np.rint(x)
    error = np.abs(x - rounded)
    odd = rounded.sum(axis=1, dtype=np.float64) % 2 != 0
    largest = error == error.max(axis=1, keepdims=True)
    assert (odd & (largest.sum(axis=1) >= 2) & (error.max(axis=1) > 0)).sum() >= 20
    assert (odd & (error.max(axis=1) == 0)).sum() >= 10           # integral, odd sum
    assert (odd & (error.max(axis=1) == 0.5)).sum() >= 10         # half-integer fixes
    integer = nearest_d8_reference(x)
    coset = nearest_d8_reference(x - np.float32(0.5)) + np.float32(0.5)
    ties = squared_distance(x, integer) == squared_distance(x, coset)
    assert ties.sum() >= 20                                        # D8 wins these
    assert np.signbit(nearest_e8_reference(x)[nearest_e8_reference(x) == 0]).sum() >= 10


# ---------------------------------------------------------------- numba (CPU)


@pytest.mark.parametrize("kind", ["d8", "e8"])
@pytest.mark.parametrize("scale", SCALES)
def test_numba_gaussian(kind, scale):
    x = gaussian(4000, scale)
    assert x.size < serial.SERIAL_BELOW                            # the serial clone
    function = getattr(cpu_lattice, f"nearest_{kind}")
    assert_bit_identical(function(x), REFERENCES[kind](x))


@pytest.mark.parametrize("kind", ["d8", "e8"])
def test_numba_parallel_kernel(kind):
    rows = serial.SERIAL_BELOW // 8 * 3 + 5                        # several tasks, a tail
    x = np.concatenate([gaussian(rows, scale) for scale in SCALES] + [tie_cases()])
    assert x.size >= serial.SERIAL_BELOW                           # the parallel kernel
    function = getattr(cpu_lattice, f"nearest_{kind}")
    assert_bit_identical(function(x), REFERENCES[kind](x))


@pytest.mark.parametrize("kind", ["d8", "e8"])
def test_numba_ties(kind):
    x = tie_cases()
    function = getattr(cpu_lattice, f"nearest_{kind}")
    assert_bit_identical(function(x), REFERENCES[kind](x))
    # any layout and dtype: copied to C-contiguous float32, leading axes kept
    wide = np.asfortranarray(x.astype(np.float64))
    assert_bit_identical(function(wide), REFERENCES[kind](x))
    assert_bit_identical(function(x[:48].reshape(2, 3, 8, 8)),
                         REFERENCES[kind](x[:48]).reshape(2, 3, 8, 8))


@pytest.mark.parametrize("kind", ["d8", "e8"])
def test_numba_shapes(kind):
    function = getattr(cpu_lattice, f"nearest_{kind}")
    assert function(np.zeros((0, 8), np.float32)).shape == (0, 8)
    with pytest.raises(ValueError, match="8"):
        function(np.zeros((4, 7), np.float32))


COORDINATES = st.one_of(
    st.floats(-LIMIT, LIMIT, exclude_min=True, exclude_max=True, width=32),
    st.floats(-4, 4, width=32),
    st.integers(-64, 64).map(lambda k: k / 8),                    # dyadic: ties
    st.sampled_from([0.0, -0.0, 0.5, -0.5, 0.25, -0.25, 1e-40]),
)
POINTS = hnp.arrays(np.float32, st.tuples(st.integers(1, 12), st.just(8)), elements=COORDINATES)


@given(x=POINTS)
def test_numba_property(x):
    for kind, reference in REFERENCES.items():
        assert_bit_identical(getattr(cpu_lattice, f"nearest_{kind}")(x), reference(x))


# ---------------------------------------------------------------- numba.cuda (simulator)


@needs_numba_cuda
@pytest.mark.parametrize("kind", ["d8", "e8"])
def test_numba_cuda_gaussian_and_ties(kind):
    from latkv._gpu import numba_lattice

    function = getattr(numba_lattice, f"nearest_{kind}")
    x = np.concatenate([gaussian(24, scale) for scale in SCALES] + [tie_cases()])
    result = function(x)
    assert isinstance(result, np.ndarray)
    assert_bit_identical(result, REFERENCES[kind](x))
    assert function(np.zeros((0, 8), np.float32)).shape == (0, 8)


@needs_numba_cuda
@settings(max_examples=25)
@given(x=POINTS)
def test_numba_cuda_property(x):
    from latkv._gpu import numba_lattice

    for kind, reference in REFERENCES.items():
        assert_bit_identical(getattr(numba_lattice, f"nearest_{kind}")(x), reference(x))


# ---------------------------------------------------------------- CuPy (and numba.cuda on CuPy)


def gpu_inputs() -> np.ndarray:
    """Gaussian rows at every scale (more than one grid-stride round of a capped grid is not
    needed: the stride loop is the same code) and the tie cases."""
    return np.concatenate([gaussian(50000, scale) for scale in SCALES] + [tie_cases()])


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["d8", "e8"])
def test_cupy_kernels(kind):
    import cupy

    from latkv._gpu import cupy_lattice

    function = getattr(cupy_lattice, f"nearest_{kind}")
    x = gpu_inputs()
    expected = REFERENCES[kind](x)
    result = function(cupy.asarray(x))
    assert isinstance(result, cupy.ndarray)
    assert_bit_identical(cupy.asnumpy(result), expected)
    # a row pointer that is not 16-byte aligned: the kernel's scalar loads and stores
    flat = cupy.empty(x.size + 1, dtype=cupy.float32)
    shifted = flat[1:].reshape(x.shape)
    shifted[...] = cupy.asarray(x)
    assert shifted.data.ptr % 16 != 0
    assert_bit_identical(cupy.asnumpy(function(shifted)), expected)
    assert function(cupy.zeros((0, 8), cupy.float32)).shape == (0, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["d8", "e8"])
def test_numba_cuda_on_cupy_input(kind):
    import cupy

    from latkv._gpu import numba_lattice

    x = gpu_inputs()
    result = getattr(numba_lattice, f"nearest_{kind}")(cupy.asarray(x))
    assert isinstance(result, cupy.ndarray)
    assert_bit_identical(cupy.asnumpy(result), REFERENCES[kind](x))


@pytest.mark.gpu
@settings(max_examples=50)
@given(x=POINTS)
def test_cupy_property(x):
    import cupy

    from latkv._gpu import cupy_lattice

    for kind, reference in REFERENCES.items():
        result = getattr(cupy_lattice, f"nearest_{kind}")(cupy.asarray(x))
        assert_bit_identical(cupy.asnumpy(result), reference(x))
