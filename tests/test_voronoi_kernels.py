"""Fixed-rate E8 Voronoi kernels (numba, numba.cuda, CuPy) against the NumPy references.

`latkv.e8.voronoi_encode_reference` and `latkv.e8.voronoi_decode_reference` are the
specification: every backend must give the same scale bits, the same labels and the same
decoded float32 bits, for bits 1..8 and dims 8, 64, 96, 128, on Gaussian rows at many scales,
heavy-tailed rows (spikes), rows of zeros and signed zeros, rows so small that the scale
candidates are float16 subnormals (or below, floored at 2^-24), and rows whose candidates
``base * m`` are exact float16 rounding ties (``max|x| = M 2^bits`` with ``M`` a float16
midpoint, at the rungs whose multiplier is a power of two) or lie within a float32 rounding of
one at the rung the row settles on: only a single round-half-to-even conversion from float64
gives the reference's scale there (the coverage tests check that the inputs reach those cases).

``latkv._gpu.numba_voronoi`` runs here in the CUDA simulator where there is no GPU (tiny
inputs); ``latkv._gpu.cupy_voronoi`` (``cuda_kernels/voronoi.cu``) and numba.cuda on CuPy input
run in the ``gpu``-marked tests, skipped without a device.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

import latkv
from latkv import e8
from latkv._backend import numba_cuda_available
from latkv._cpu import serial
from latkv._cpu import voronoi as cpu_voronoi
from latkv.e8 import scale_ladder, voronoi_decode_reference, voronoi_encode_reference

needs_numba_cuda = pytest.mark.skipif(
    not numba_cuda_available(), reason="numba.cuda has neither a device nor the simulator"
)

BITS = tuple(range(1, 9))
DIMS = (8, 64, 96, 128)


# ---------------------------------------------------------------- inputs


def float16_midpoints(rng: np.random.Generator, n: int) -> np.ndarray:
    """float64 midpoints of adjacent float16 values: normal ones in [2^-14, 2^11) and
    subnormal ones (a quarter), each exactly between two float16 values."""
    exponent = rng.integers(-14, 11, n)
    normal = (rng.integers(1024, 2048, n) + 0.5) * 2.0 ** (exponent - 10)
    subnormal = (rng.integers(0, 1024, n) + 0.5) * 2.0 ** -24
    return np.where(rng.random(n) < 0.25, subnormal, normal)


def tie_rows(rng: np.random.Generator, rows: int, dim: int, bits: int) -> np.ndarray:
    """Rows with ``max|x| = M 2^bits``, ``M`` a float16 midpoint: ``base = M``, so the rungs
    ``m = 1, 2, 4`` (``j = 0, 32, 64``) put ``base * m`` exactly on a float16 tie. Shapes: a
    spike over small noise (its fit threshold lies near ``m = 1``), Gaussian, and near-constant
    magnitudes (threshold near ``m = 4``)."""
    peak = float16_midpoints(rng, rows) * (1 << bits)
    x = np.empty((rows, dim), np.float32)
    for r in range(rows):
        kind = r % 3
        if kind == 0:
            row = rng.standard_normal(dim) * 0.01
        elif kind == 1:
            row = rng.standard_normal(dim)
        else:
            row = rng.choice([-1.0, 1.0], dim) * (1 - 0.05 * rng.random(dim))
        row = np.clip(row / np.abs(row).max() * peak[r], -peak[r], peak[r])
        row[rng.integers(dim)] = peak[r] * rng.choice([-1.0, 1.0])
        x[r] = row
    assert np.array_equal(np.abs(x).max(axis=1).astype(np.float64), peak)  # exact in float32
    return x


def chosen_rungs(x: np.ndarray, bits: int) -> np.ndarray:
    """The reference's rung of each row (the lowest index with its scale)."""
    _, multipliers = scale_ladder(bits)
    scale, _ = voronoi_encode_reference(x, multipliers, bits)
    base = np.abs(x).max(axis=1).astype(np.float64) / (1 << bits)
    candidates = e8.scale_candidate(base[:, None], multipliers[None, :])
    return (candidates == scale[:, None]).argmax(axis=1)


def near_tie_rows(rng: np.random.Generator, rows: int, dim: int, bits: int) -> np.ndarray:
    """Gaussian rows rescaled so that at their chosen rung ``base * m`` lies within a float32
    rounding of a float16 tie without being one (``m`` is not a power of two): rounding
    ``base * m`` to float32 first, then to float16, would land on the tie and go to even, half
    the time the wrong way."""
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    _, multipliers = scale_ladder(bits)
    m = multipliers[chosen_rungs(x, bits)]
    target = np.abs(x).max(axis=1).astype(np.float64) / (1 << bits) * m
    _, exponent = np.frexp(target)
    quantum = np.ldexp(1.0, np.maximum(exponent - 11, -24))
    midpoint = (np.floor(target / quantum) + 0.5) * quantum
    peak = (midpoint * (1 << bits) / m).astype(np.float32)
    x = x / np.abs(x).max(axis=1, keepdims=True) * peak[:, None]
    x = np.clip(x, -peak[:, None], peak[:, None])
    x[np.arange(rows), np.abs(x).argmax(axis=1)] = peak * rng.choice([-1, 1], rows)
    return x.astype(np.float32)


def encode_inputs(rng: np.random.Generator, rows: int, dim: int, bits: int) -> np.ndarray:
    """A mix of every input kind (see the module docstring), about ``rows`` rows."""
    q = 1 << bits
    part = max(1, rows // 6)
    gaussian = rng.standard_normal((part, dim)) * 10.0 ** rng.uniform(-3, 2, (part, 1))
    heavy = rng.standard_t(2, (part, dim))
    spikes = rng.random((part, dim)) < 2.0 / dim
    heavy[spikes] *= rng.uniform(5, 100, int(spikes.sum()))
    zeros = np.zeros((3, dim))
    zeros[1] = -0.0
    zeros[2, ::2] = -0.0
    # max|x| / q * m around the float16 subnormals (2^-24 .. 2^-14) and below 2^-25
    tiny = rng.standard_normal((part, dim))
    tiny *= q * 2.0 ** rng.uniform(-28, -12, (part, 1)) / np.abs(tiny).max(axis=1, keepdims=True)
    # the callers' precondition (E8Stage checks it): the top rung's scale below 65504
    limit = 0.5 * 65504 * q / scale_ladder(bits)[1][-1]
    heavy *= np.minimum(1.0, limit / np.abs(heavy).max(axis=1, keepdims=True))
    x = np.concatenate([gaussian, heavy, zeros, tiny]).astype(np.float32)
    x = np.concatenate([x, near_tie_rows(rng, part, dim, bits),
                        tie_rows(rng, max(1, rows - x.shape[0] - part), dim, bits)])
    return x[rng.permutation(x.shape[0])]


def random_labels(rng: np.random.Generator, rows: int, dim: int, bits: int) -> np.ndarray:
    return rng.integers(0, 1 << bits, (rows, dim), dtype=np.uint8)


def random_scales(rng: np.random.Generator, rows: int) -> np.ndarray:
    """float16 values held as float32: log-uniform, subnormal, the floor, the largest."""
    scale = (2.0 ** rng.uniform(-24, 15.9, rows)).astype(np.float16).astype(np.float32)
    special = np.array([2.0 ** -24, 3 * 2.0 ** -24, 2.0 ** -14, 1.0, 65504.0], np.float32)
    scale[:special.size] = special[:rows]
    return np.maximum(scale, np.float32(2.0 ** -24))


def assert_encode_equal(result, expected) -> None:
    (scale, labels), (expected_scale, expected_labels) = result, expected
    assert scale.dtype == np.float32 and scale.shape == expected_scale.shape
    np.testing.assert_array_equal(scale.view(np.uint32), expected_scale.view(np.uint32))
    assert labels.dtype == np.uint8 and labels.shape == expected_labels.shape
    np.testing.assert_array_equal(labels, expected_labels)


def assert_decode_equal(result, expected) -> None:
    assert result.dtype == np.float32 and result.shape == expected.shape
    np.testing.assert_array_equal(result.view(np.uint32), expected.view(np.uint32))


# ---------------------------------------------------------------- the float16 rounding


@njit
def _candidates(base, multiplier):
    out = np.empty(base.shape[0], np.float32)
    for i in range(base.shape[0]):
        out[i] = cpu_voronoi._scale_candidate(base[i], multiplier[i])
    return out


def test_scale_candidate_rounds_once_half_to_even():
    rng = np.random.default_rng(0)
    mid = float16_midpoints(rng, 4000)
    ulp = np.spacing(mid)
    # ties, one float64 ulp either side (a detour through float32 would round these to the
    # tie, then to even), random values, and the subnormal / underflow / top edges
    products = np.concatenate([
        mid, mid + ulp, mid - ulp, 2.0 ** rng.uniform(-30, 15.99, 4000),
        [0.0, 2.0 ** -26, 2.0 ** -25, 2.0 ** -25 + 2.0 ** -60, 3 * 2.0 ** -25, 5 * 2.0 ** -25,
         2.0 ** -14 - 2.0 ** -26, 2.0 ** -14, 65504.0, 65519.0, 2048 + 1.0, 2048 + 3.0]])
    ones = np.ones_like(products)
    np.testing.assert_array_equal(_candidates(products, ones).view(np.uint32),
                                  e8.scale_candidate(products, ones).view(np.uint32))
    # the ladder's products base * m (one float64 rounding, then one float16 rounding)
    _, multipliers = scale_ladder(3)
    base = np.abs(rng.standard_normal(4000)).astype(np.float32).astype(np.float64) / 8
    m = rng.choice(multipliers, 4000)
    np.testing.assert_array_equal(_candidates(base, m), e8.scale_candidate(base, m))


def test_tie_rows_choose_tie_rungs():
    """Coverage: many tie rows settle on a rung whose ``base * m`` is an exact float16 tie, so
    a kernel rounding that tie the other way would store another scale."""
    rng = np.random.default_rng(1)
    settled = 0
    for bits in BITS:
        low, multipliers = scale_ladder(bits)
        x = tie_rows(rng, 60, 64, bits)
        scale, _ = voronoi_encode_reference(x, multipliers, bits)
        base = np.abs(x).max(axis=1).astype(np.float64) / (1 << bits)
        for rung in range(multipliers.shape[0]):
            if (low + rung) % 32:
                continue                              # m = 2^(j/32) is not a power of two
            product = base * multipliers[rung]
            _, exponent = np.frexp(product)
            quanta = np.ldexp(product, -np.maximum(exponent - 11, -24))  # in float16 steps
            tie = quanta % 1 == 0.5
            settled += int((tie & (scale == e8.scale_candidate(base, multipliers[rung]))).sum())
    assert settled >= 40


def test_near_tie_rows_sit_a_float32_rounding_from_a_tie():
    """Coverage: at the chosen rung, ``float32(base * m)`` is a float16 tie and ``base * m``
    is not, for most near-tie rows (a detour through float32 would round them to even)."""
    rng = np.random.default_rng(2)
    near = 0
    for bits in BITS:
        _, multipliers = scale_ladder(bits)
        x = near_tie_rows(rng, 30, 64, bits)
        product = np.abs(x).max(axis=1).astype(np.float64) / (1 << bits) * multipliers[
            chosen_rungs(x, bits)]
        single = product.astype(np.float16)
        double = product.astype(np.float32).astype(np.float16)
        near += int((single != double).sum())
    assert near >= 30


# ---------------------------------------------------------------- numba (CPU)


@pytest.mark.parametrize("bits", BITS)
def test_numba_serial(bits):
    rng = np.random.default_rng(bits)
    _, multipliers = scale_ladder(bits)
    for dim in DIMS:
        x = encode_inputs(rng, 48, dim, bits)
        assert x.size < serial.SERIAL_BELOW                         # the serial clones
        expected = voronoi_encode_reference(x, multipliers, bits)
        assert_encode_equal(cpu_voronoi.voronoi_encode(x, multipliers, bits), expected)
        scale, labels = expected
        assert_decode_equal(cpu_voronoi.voronoi_decode(labels, scale, bits),
                            voronoi_decode_reference(labels, scale, bits))
        labels = random_labels(rng, 40, dim, bits)
        scale = random_scales(rng, 40)
        assert_decode_equal(cpu_voronoi.voronoi_decode(labels, scale, bits),
                            voronoi_decode_reference(labels, scale, bits))


@pytest.mark.parametrize("bits, dim", [(3, 128), (1, 96), (8, 64)])
def test_numba_parallel(bits, dim):
    rng = np.random.default_rng(100 + bits)
    _, multipliers = scale_ladder(bits)
    rows = serial.SERIAL_BELOW // dim + cpu_voronoi.ROWS_PER_TASK + 5   # several tasks, a tail
    x = encode_inputs(rng, rows, dim, bits)
    assert x.size >= serial.SERIAL_BELOW                            # the parallel kernels
    expected = voronoi_encode_reference(x, multipliers, bits)
    assert_encode_equal(cpu_voronoi.voronoi_encode(x, multipliers, bits), expected)
    scale, labels = expected
    assert_decode_equal(cpu_voronoi.voronoi_decode(labels, scale, bits),
                        voronoi_decode_reference(labels, scale, bits))


def test_numba_layouts_and_shapes():
    rng = np.random.default_rng(5)
    _, multipliers = scale_ladder(4)
    x = encode_inputs(rng, 30, 64, 4)
    expected = voronoi_encode_reference(x, multipliers, 4)
    # other layouts and dtypes are copied to C-contiguous float32 / float64
    wide = np.asfortranarray(x.astype(np.float64))
    assert_encode_equal(cpu_voronoi.voronoi_encode(wide, list(multipliers), 4), expected)
    scale, labels = cpu_voronoi.voronoi_encode(np.zeros((0, 64), np.float32), multipliers, 4)
    assert scale.shape == (0,) and labels.shape == (0, 64)
    assert cpu_voronoi.voronoi_decode(labels, scale, 4).shape == (0, 64)
    with pytest.raises(ValueError, match="multiple of 8"):
        cpu_voronoi.voronoi_encode(np.zeros((2, 12), np.float32), multipliers, 4)
    with pytest.raises(ValueError, match="bits"):
        cpu_voronoi.voronoi_encode(x, multipliers, 9)
    with pytest.raises(TypeError, match="uint8"):
        cpu_voronoi.voronoi_decode(expected[1].astype(np.int64), expected[0], 4)
    with pytest.raises(ValueError, match="scale"):
        cpu_voronoi.voronoi_decode(expected[1], expected[0][:-1], 4)


@pytest.mark.parametrize("bits", [2, 5])
def test_e8quant_backends_agree(bits):
    """The stage runs the dispatch table's entries: numpy and numba give the same codes."""
    x = np.random.default_rng(bits).standard_normal((3, 40, 64)).astype(np.float32)
    x[0, 0] = 0.0
    quantizer = latkv.E8Quant(dim=64, bits=bits)
    reference = quantizer.encode(x, backend="numpy")
    fast = quantizer.encode(x, backend="numba")
    assert set(reference.arrays) == set(fast.arrays)
    for name in reference.arrays:
        np.testing.assert_array_equal(fast[name], reference[name])
    assert_decode_equal(quantizer.decode(fast, backend="numba"),
                        quantizer.decode(reference, backend="numpy"))


def test_cuda_source_includes_the_lattice_code_once():
    from latkv._gpu.cuda_sources import source

    text = source("voronoi.cu")
    assert not any(line.startswith("#include") for line in text.splitlines())
    assert text.count("void nearest_d8_point(") == 1


# ---------------------------------------------------------------- numba.cuda (simulator)


@needs_numba_cuda
@pytest.mark.parametrize("bits", BITS)
def test_numba_cuda(bits):
    """Small inputs (the simulator runs every thread in Python), heavy on the float16 ties."""
    from latkv._gpu import numba_voronoi

    rng = np.random.default_rng(200 + bits)
    _, multipliers = scale_ladder(bits)
    dim = 16
    x = np.concatenate([encode_inputs(rng, 12, dim, bits), tie_rows(rng, 24, dim, bits),
                        near_tie_rows(rng, 12, dim, bits)])
    expected = voronoi_encode_reference(x, multipliers, bits)
    result = numba_voronoi.voronoi_encode(x, multipliers, bits)
    assert isinstance(result[0], np.ndarray)
    assert_encode_equal(result, expected)
    labels = np.concatenate([expected[1], random_labels(rng, 8, dim, bits)])
    scale = np.concatenate([expected[0], random_scales(rng, 8)])
    assert_decode_equal(numba_voronoi.voronoi_decode(labels, scale, bits),
                        voronoi_decode_reference(labels, scale, bits))
    labels, scale = random_labels(rng, 5, 24, bits), random_scales(rng, 5)
    assert_decode_equal(numba_voronoi.voronoi_decode(labels, scale, bits),
                        voronoi_decode_reference(labels, scale, bits))
    empty = numba_voronoi.voronoi_encode(np.zeros((0, 8), np.float32), multipliers, bits)
    assert empty[0].shape == (0,) and empty[1].shape == (0, 8)


# ---------------------------------------------------------------- CuPy (and numba.cuda on CuPy)


def gpu_cases():
    rng = np.random.default_rng(300)
    for bits in BITS:
        for dim in DIMS:
            yield bits, dim, encode_inputs(rng, 3000, dim, bits), random_labels(rng, 3000, dim,
                                                                                bits)


@pytest.mark.gpu
def test_cupy_kernels():
    import cupy

    from latkv._gpu import cupy_voronoi

    rng = np.random.default_rng(301)
    for bits, dim, x, labels in gpu_cases():
        _, multipliers = scale_ladder(bits)
        expected = voronoi_encode_reference(x, multipliers, bits)
        scale, codes = cupy_voronoi.voronoi_encode(cupy.asarray(x), cupy.asarray(multipliers),
                                                   bits)
        assert isinstance(scale, cupy.ndarray)
        assert_encode_equal((cupy.asnumpy(scale), cupy.asnumpy(codes)), expected)
        scales = random_scales(rng, labels.shape[0])
        decoded = cupy_voronoi.voronoi_decode(cupy.asarray(labels), cupy.asarray(scales), bits)
        assert_decode_equal(cupy.asnumpy(decoded),
                            voronoi_decode_reference(labels, scales, bits))


@pytest.mark.gpu
def test_cupy_kernels_unaligned():
    """Rows and labels that are not 16- / 8-byte aligned: the scalar loads and stores."""
    import cupy

    from latkv._gpu import cupy_voronoi

    rng = np.random.default_rng(302)
    bits, dim = 3, 64
    _, multipliers = scale_ladder(bits)
    x = encode_inputs(rng, 500, dim, bits)
    flat = cupy.empty(x.size + 1, dtype=cupy.float32)
    shifted = flat[1:].reshape(x.shape)
    shifted[...] = cupy.asarray(x)
    assert shifted.data.ptr % 16 != 0
    scale, labels = voronoi_encode_reference(x, multipliers, bits)
    got = cupy_voronoi.voronoi_encode(shifted, cupy.asarray(multipliers), bits)
    assert_encode_equal((cupy.asnumpy(got[0]), cupy.asnumpy(got[1])), (scale, labels))
    bytes_ = cupy.empty(labels.size + 1, dtype=cupy.uint8)
    odd = bytes_[1:].reshape(labels.shape)
    odd[...] = cupy.asarray(labels)
    assert odd.data.ptr % 8 != 0
    decoded = cupy_voronoi.voronoi_decode(odd, cupy.asarray(scale), bits)
    assert_decode_equal(cupy.asnumpy(decoded), voronoi_decode_reference(labels, scale, bits))


@pytest.mark.gpu
def test_numba_cuda_on_cupy_input():
    import cupy

    from latkv._gpu import numba_voronoi

    rng = np.random.default_rng(303)
    for bits in (1, 4, 8):
        _, multipliers = scale_ladder(bits)
        x = encode_inputs(rng, 2000, 96, bits)
        scale, labels = numba_voronoi.voronoi_encode(cupy.asarray(x), multipliers, bits)
        assert isinstance(scale, cupy.ndarray)
        expected = voronoi_encode_reference(x, multipliers, bits)
        assert_encode_equal((cupy.asnumpy(scale), cupy.asnumpy(labels)), expected)
        decoded = numba_voronoi.voronoi_decode(labels, scale, bits)
        assert_decode_equal(cupy.asnumpy(decoded),
                            voronoi_decode_reference(expected[1], expected[0], bits))


@pytest.mark.gpu
def test_e8quant_on_the_gpu_matches_the_host():
    import cupy

    x = np.random.default_rng(304).standard_normal((4, 256, 128)).astype(np.float32)
    quantizer = latkv.E8Quant(dim=128, bits=3)
    host = quantizer.encode(x, backend="numpy")
    for backend in ("cupy", "numba.cuda"):
        device = quantizer.encode(cupy.asarray(x), backend=backend)
        for name in host.arrays:
            np.testing.assert_array_equal(cupy.asnumpy(device[name]), host[name])
        assert_decode_equal(cupy.asnumpy(quantizer.decode(device, backend=backend)),
                            quantizer.decode(host, backend="numpy"))
