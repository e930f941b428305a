"""numba PolarQuant kernels (`latkv._cpu.polar`) against their NumPy references.

Packed codes are compared byte for byte and radii exactly, on Gaussian rows and rows of
special values (zeros, signed zeros, equal and opposite coordinates, huge and subnormal
values, infinities, NaN), with the real angle codebooks and with boundaries placed exactly on
(or one rounding beside) the data's own angles, where the kernel's approximate angles must
give way to the exact ones. Reconstructions agree to one float32 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numba import njit

from latkv._cpu import polar as kernels
from latkv._cpu import serial
from latkv._cpu.polar import polar_dequantize, polar_quantize
from latkv.codebooks import polar_angle_codebook
from latkv.packing import packed_length
from latkv.polar import polar_angles, polar_dequantize_reference, polar_quantize_reference

BIT_SETS = {1: [(1,), (4,), (8,)],
            2: [(4, 2), (8, 1), (3, 7)],
            3: [(4, 2, 2), (8, 1, 3), (1, 1, 1)],
            4: [(4, 2, 2, 2), (8, 1, 3, 2), (2, 8, 8, 5)],
            5: [(1, 1, 1, 1, 1), (4, 3, 3, 2, 2)],
            6: [(4, 2, 2, 2, 2, 2), (8, 8, 1, 6, 2, 3)]}
CASES = [(levels, bits) for levels, sets in BIT_SETS.items() for bits in sets]

SPECIAL = np.array([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 3e38, -3e38, 1e-45, -1e-45, 1e-30, 7.0,
                    np.inf, -np.inf, np.nan], np.float32)


def tables(levels: int, level_bits: tuple[int, ...]) -> tuple[tuple[np.ndarray, ...],
                                                             tuple[np.ndarray, ...]]:
    """(boundaries, centroids) per level, float64, from the real angle codebooks."""
    books = [polar_angle_codebook(level, bits) for level, bits in
             enumerate(level_bits, start=1)]
    return (tuple(book.boundaries.astype(np.float64) for book in books),
            tuple(book.centroids.astype(np.float64) for book in books))


def make_rows(rng: np.random.Generator, rows: int, dim: int, special: bool = True) -> np.ndarray:
    """Gaussian rows at assorted scales; with ``special``, some rows of special values, a zero
    row, a row of signed zeros and one of equal pairs (angles pi/4, 3pi/4, ... and pi/4)."""
    x = rng.standard_normal((rows, dim)) * 10.0 ** rng.integers(-20, 20, (rows, 1))
    x = x.astype(np.float32)
    if special and rows:
        mixed = rng.random(rows) < 0.3
        x[mixed] = rng.choice(SPECIAL, size=(int(mixed.sum()), dim))
        x[0] = 0.0
        if rows > 1:
            x[1] = np.where(rng.random(dim) < 0.5, -0.0, 0.0).astype(np.float32)
        if rows > 2:
            x[2] = np.repeat(rng.choice([1.0, -1.0, 2.5], size=dim // 2), 2)
        if rows > 3:
            x[3, 0::2], x[3, 1::2] = 0.0, rng.choice(SPECIAL[:6], size=dim // 2)
    return x


def check_quantize(x, levels, level_bits, boundaries):
    with np.errstate(all="ignore"):
        expected, expected_radius = polar_quantize_reference(x, levels, level_bits, boundaries)
    packed, radius = polar_quantize(x, levels, level_bits, boundaries)
    assert len(packed) == levels
    for level, (fast, ref, bits) in enumerate(zip(packed, expected, level_bits), start=1):
        assert fast.dtype == np.uint8 and fast.flags.c_contiguous
        assert fast.shape == ref.shape == (x.shape[0], packed_length(x.shape[1] >> level, bits))
        assert fast.tobytes() == ref.tobytes(), f"level {level}"
    assert radius.dtype == np.float64 and radius.shape == expected_radius.shape
    np.testing.assert_array_equal(radius, expected_radius)
    return packed, radius


def check_dequantize(packed, radius, levels, level_bits, centroids, dim):
    for dtype in (np.float64, np.float32, np.float16):
        with np.errstate(over="ignore"):
            stored = radius.astype(dtype)  # huge radii become infinite in float16
        fast = polar_dequantize(packed, stored, levels, level_bits, centroids, dim)
        with np.errstate(all="ignore"):
            ref = polar_dequantize_reference(packed, stored, levels, level_bits, centroids, dim)
        assert fast.dtype == np.float32 and fast.shape == ref.shape == (radius.shape[0], dim)
        finite = np.isfinite(ref)
        assert np.array_equal(np.isfinite(fast), finite)
        np.testing.assert_allclose(fast[finite], ref[finite], rtol=1e-6, atol=0)
        np.testing.assert_array_max_ulp(fast[finite], ref[finite], maxulp=1)


@pytest.mark.parametrize("levels,level_bits", CASES)
@pytest.mark.parametrize("blocks", [1, 3, 8])
def test_quantize_is_byte_identical_and_dequantize_close(levels, level_bits, blocks):
    dim = blocks << levels
    rng = np.random.default_rng(1000 * levels + 10 * blocks + sum(level_bits))
    boundaries, centroids = tables(levels, level_bits)
    x = make_rows(rng, 13, dim)
    packed, radius = check_quantize(x, levels, level_bits, boundaries)
    finite = np.isfinite(radius).all(axis=1)  # inf/NaN radii: NaN reconstructions
    check_dequantize(tuple(p[finite] for p in packed), radius[finite], levels, level_bits,
                     centroids, dim)


def test_codes_by_hand():
    # one block of 4: level 1 angles atan2(1, 1) = pi/4 and atan2(-0.0, -2) -> -pi + 2 pi = pi;
    # level 2 psi = atan2(2, sqrt(2)) = 0.955; radius sqrt(6)
    x = np.array([[1.0, 1.0, -2.0, -0.0]], np.float32)
    boundaries = (np.array([np.pi / 4, 3.0]), np.array([0.5, 1.0, 1.5]))
    packed, radius = polar_quantize(x, 2, (2, 2), boundaries)
    # codes: level 1 [0 (on the boundary: not above), 2], level 2 [1]
    assert packed[0].tolist() == [[0 | 2 << 2]] and packed[1].tolist() == [[1]]
    assert radius.tolist() == [[np.sqrt(6.0)]]
    check_quantize(x, 2, (2, 2), boundaries)


def tie_boundaries(x, levels, level_bits, offset):
    """Per level, ``2**bits - 1`` of the data's exact angles (as the reference computes them),
    moved by ``offset`` roundings (0: exactly on them), sorted."""
    angles, _ = polar_angles(x.astype(np.float64).reshape(x.shape[0], -1, 1 << levels), levels)
    rng = np.random.default_rng(5)
    result = []
    for angle, bits in zip(angles, level_bits):
        pool = np.unique(angle[np.isfinite(angle)])
        chosen = rng.choice(pool, size=min(pool.size, (1 << bits) - 1), replace=False)
        for _ in range(abs(offset)):
            chosen = np.nextafter(chosen, np.inf if offset > 0 else -np.inf)
        result.append(np.sort(chosen))
    return tuple(result)


@njit(error_model="numpy")
def _approximate_thetas(a, b, out):
    for j in range(a.shape[0]):
        out[j] = kernels._approximate_theta(a[j], b[j])


@njit(error_model="numpy")
def _approximate_psis(s1, s2, out):
    for j in range(s1.shape[0]):
        out[j] = kernels._approximate_psi(s1[j], s2[j])


@pytest.mark.parametrize("offset", [0, 1, -1])
@pytest.mark.parametrize("level_bits", [(5, 5, 5), (8, 8, 8), (8, 2, 6)])
def test_boundaries_on_the_data_angles_follow_the_exact_angles(level_bits, offset):
    # every angle of these rows is a boundary (or one rounding beside one): the approximate
    # angles are near a boundary and must be settled with the exact ones, in the vectorised
    # count (31 boundaries) and in the binary search (255)
    levels = 3
    rng = np.random.default_rng(17 + offset)
    x = make_rows(rng, 40, 24, special=False)
    x[:10] = rng.integers(-3, 4, (10, 24))  # small integers: ties between pairs and radii
    boundaries = tie_boundaries(x, levels, level_bits, offset)
    check_quantize(x, levels, level_bits, boundaries)
    check_quantize(np.ascontiguousarray(x[:, ::-1]), levels, level_bits, boundaries)
    # the test is not vacuous: the approximate level-1 angles miss some exact ones
    a, b = x[:, 0::2].astype(np.float64).ravel(), x[:, 1::2].astype(np.float64).ravel()
    approximate = np.empty_like(a)
    _approximate_thetas(a, b, approximate)
    exact = np.arctan2(b, a)
    exact = np.where(exact < 0, exact + 2 * np.pi, exact)
    assert (approximate != exact).any()


def test_approximate_angles_are_within_the_settle_margin():
    rng = np.random.default_rng(3)
    n = 400_000
    scale = 10.0 ** rng.integers(-300, 300, (2, n))
    a, b = rng.standard_normal((2, n)) * scale
    a[:1000], b[1000:2000] = 0.0, -0.0  # axes
    b[2000:3000] = a[2000:3000]  # diagonals
    b[3000:4000] = -a[3000:4000]
    a[4000:5000] = 1e-310  # subnormal against normal values
    a[5000:6000], b[6000:7000] = np.inf, -np.inf
    approximate = np.empty(n)
    _approximate_thetas(a, b, approximate)
    exact = np.arctan2(b, a)
    exact = np.where(exact < 0, exact + 2 * np.pi, exact)
    assert np.isfinite(approximate).all()
    assert np.abs(approximate - exact).max() < 1e-14 < kernels.SETTLE_MARGIN
    s1, s2 = np.abs(a) * 1e-10, np.abs(b) * 1e-10  # squared radii: non-negative
    s1[7000:8000] = s2[7000:8000]
    s1[8000:9000] = 5e-324
    s1[:1000] = 1.0
    psi = np.empty(n)
    _approximate_psis(s1, s2, psi)
    exact = np.arctan2(np.sqrt(s2), np.sqrt(s1))
    assert np.isfinite(psi).all()
    assert np.abs(psi - exact).max() < 1e-14
    # the cases settled exactly come out NaN
    zeros = np.array([0.0, -0.0, np.nan, np.inf])
    out = np.empty(4)
    _approximate_thetas(zeros, np.array([0.0, 0.0, 1.0, -np.inf]), out)
    assert np.isnan(out).all()
    _approximate_psis(np.array([0.0, np.nan, 1.0, np.inf]), np.array([0.0, 1.0, np.nan, np.inf]),
                      out)
    assert np.isnan(out).all()


def test_float64_and_other_inputs_follow_the_reference():
    rng = np.random.default_rng(8)
    boundaries, _ = tables(2, (4, 3))
    x = rng.standard_normal((6, 8)) * 1e160  # squares overflow to infinity
    x[0, :2] = 1e-170  # and underflow to zero
    x[1, :4] = [1e200, 1e200, -1e-200, 0.0]
    check_quantize(x, 2, (4, 3), boundaries)
    with np.errstate(over="ignore"):
        check_quantize(x.astype(np.float16), 2, (4, 3), boundaries)
        check_quantize(np.asfortranarray(x.astype(np.float32)), 2, (4, 3), boundaries)


def test_parallel_kernels_on_inputs_above_the_serial_threshold():
    levels, level_bits = 4, (4, 2, 2, 2)
    dim = 128
    rows = serial.SERIAL_BELOW // dim + kernels.ROWS_PER_TASK + 7
    boundaries, centroids = tables(levels, level_bits)
    x = make_rows(np.random.default_rng(21), rows, dim)
    packed, radius = check_quantize(x, levels, level_bits, boundaries)
    finite = np.isfinite(radius).all(axis=1)
    assert finite.sum() * dim >= serial.SERIAL_BELOW
    check_dequantize(tuple(p[finite] for p in packed), radius[finite], levels, level_bits,
                     centroids, dim)
    # arbitrary bytes (padding bits included) decode as the reference does
    rng = np.random.default_rng(22)
    noise = tuple(rng.integers(0, 256, p.shape, dtype=np.uint8) for p in packed)
    check_dequantize(noise, np.abs(rng.standard_normal(radius.shape)), levels, level_bits,
                     centroids, dim)


def test_small_inputs_use_serial_clones_with_their_own_cache_entries():
    for kernel in (kernels._quantize_rows, kernels._dequantize_rows):
        clone = serial.kernel_for(kernel, 1)
        assert serial.kernel_for(kernel, serial.SERIAL_BELOW) is kernel
        assert kernel.targetoptions.get("parallel") and not clone.targetoptions.get("parallel")
        assert clone.py_func.__qualname__ != kernel.py_func.__qualname__


def test_empty_inputs():
    # (the reference cannot reshape zero rows into blocks)
    boundaries, centroids = tables(3, (4, 2, 2))
    x = np.zeros((0, 16), np.float32)
    packed, radius = polar_quantize(x, 3, (4, 2, 2), boundaries)
    assert [p.shape for p in packed] == [(0, 4), (0, 1), (0, 1)]
    assert radius.shape == (0, 2) and radius.dtype == np.float64
    out = polar_dequantize(packed, radius.astype(np.float16), 3, (4, 2, 2), centroids, 16)
    assert out.shape == (0, 16) and out.dtype == np.float32


def test_bad_arguments_are_refused():
    boundaries, centroids = tables(2, (2, 2))
    x = np.zeros((3, 8), np.float32)
    with pytest.raises(ValueError, match="multiple of 2\\^levels"):
        polar_quantize(np.zeros((3, 6), np.float32), 2, (2, 2), boundaries)
    with pytest.raises(ValueError, match="one width per level"):
        polar_quantize(x, 2, (2,), boundaries)
    with pytest.raises(ValueError, match="one table per level"):
        polar_quantize(x, 2, (2, 2), boundaries[:1])
    with pytest.raises(ValueError, match="at most 2\\*\\*bits - 1"):
        polar_quantize(x, 2, (1, 2), boundaries)
    with pytest.raises(ValueError, match="2-D"):
        polar_quantize(x[0], 2, (2, 2), boundaries)
    packed, radius = polar_quantize(x, 2, (2, 2), boundaries)
    with pytest.raises(ValueError, match="radius must have shape"):
        polar_dequantize(packed, radius[:, :1], 2, (2, 2), centroids, 8)
    with pytest.raises(ValueError, match="packed level 2"):
        polar_dequantize((packed[0], packed[1][:, :0]), radius, 2, (2, 2), centroids, 8)
    with pytest.raises(ValueError, match="at least 2\\*\\*bits"):
        polar_dequantize(packed, radius, 2, (2, 2), (centroids[0], centroids[1][:3]), 8)


@given(levels=st.integers(1, 5), data=st.data(), blocks=st.integers(1, 4),
       rows=st.integers(1, 6), special=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_property(levels, data, blocks, rows, special, seed):
    level_bits = tuple(data.draw(st.lists(st.integers(1, 8), min_size=levels,
                                          max_size=levels)))
    dim = blocks << levels
    boundaries, centroids = tables(levels, level_bits)
    x = make_rows(np.random.default_rng(seed), rows, dim, special)
    packed, radius = check_quantize(x, levels, level_bits, boundaries)
    finite = np.isfinite(radius).all(axis=1)
    check_dequantize(tuple(p[finite] for p in packed), radius[finite], levels, level_bits,
                     centroids, dim)
