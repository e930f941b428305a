"""GPU PolarQuant kernels against their NumPy references.

``latkv._gpu.numba_polar`` runs here in the CUDA simulator where there is no GPU (tiny inputs:
the simulator runs every thread in Python); ``latkv._gpu.cupy_polar`` (the
``cuda_kernels/polar.cu`` kernels) and numba.cuda on CuPy input run in the ``gpu``-marked
tests, skipped without a device. Quantize must give the reference's bytes and radii exactly
(a GPU ``atan2`` may differ from the host libm's by an ulp, which could only move an angle
within ~1e-16 of a boundary: never on these random inputs); dequantize equals the reference up
to the ulps of ``sin`` / ``cos`` (rtol 1e-6 on the float32 output).
"""

from __future__ import annotations

import numpy as np
import pytest

from latkv._backend import numba_cuda_available
from latkv.codebooks import polar_angle_codebook
from latkv.packing import packed_length
from latkv.polar import polar_dequantize_reference, polar_quantize_reference

needs_numba_cuda = pytest.mark.skipif(
    not numba_cuda_available(), reason="numba.cuda has neither a device nor the simulator"
)

# (levels, level_bits): widths that fill bytes and widths that leave the top levels' codes of
# one block sharing a byte with the next blocks' (several blocks per encoding thread)
CONFIGS = [
    (1, (3,)),
    (1, (8,)),
    (2, (1, 1)),
    (2, (4, 2)),
    (3, (1, 3, 2)),
    (3, (4, 2, 2)),
    (4, (4, 2, 2, 2)),
    (4, (2, 1, 3, 8)),
]


def tables(level_bits: tuple[int, ...]) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """Float64 boundaries and centroids of the PolarQuant angle codebooks, per level."""
    books = [polar_angle_codebook(level, bits) for level, bits in enumerate(level_bits, 1)]
    return (tuple(b.boundaries.astype(np.float64) for b in books),
            tuple(b.centroids.astype(np.float64) for b in books))


def rotated_inputs(rows: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian rows with the edge cases: row 0 zero, zero and signed-zero pairs in row 1."""
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    x[0] = 0.0
    if rows > 1:
        x[1, :2] = 0.0                    # a zero pair: theta = 0, a zero radius below it
        if dim >= 4:
            x[1, 2:4] = -0.0              # atan2(-0, -0) = -pi -> pi
        if dim >= 8:
            x[1, 4:6] = (-0.0, 1.0)       # atan2(1, -0) = pi / 2
            x[1, 6:8] = (1.5, -0.0)       # atan2(-0, 1.5) = -0, not < 0: stays -0
    return x


def random_packed(rows: int, dim: int, level_bits: tuple[int, ...],
                  rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Arbitrary bytes per level, padding bits of the last byte included (ignored)."""
    return tuple(rng.integers(0, 256, size=(rows, packed_length(dim >> level, bits)),
                              dtype=np.uint8)
                 for level, bits in enumerate(level_bits, start=1))


def assert_quantize_equal(result, expected) -> None:
    (packed, radius), (expected_packed, expected_radius) = result, expected
    assert len(packed) == len(expected_packed)
    for codes, expected_codes in zip(packed, expected_packed):
        assert codes.dtype == np.uint8 and codes.flags.c_contiguous
        np.testing.assert_array_equal(codes, expected_codes)
    assert radius.dtype == np.float64
    np.testing.assert_array_equal(radius, expected_radius)


# ---------------------------------------------------------------- host-side helpers


def test_group_blocks_fill_whole_bytes():
    from latkv._gpu.cupy_polar import group_blocks

    for levels in range(1, 9):
        for bits in range(1, 9):
            for top in range(1, 9):
                level_bits = (bits,) * (levels - 1) + (top,)
                group = group_blocks(levels, level_bits)
                assert group in (1, 2, 4, 8)

                def whole(g):
                    return all(g * (1 << (levels - level)) * b % 8 == 0
                               for level, b in enumerate(level_bits, start=1))

                assert whole(group) and (group == 1 or not whole(group // 2))


# ---------------------------------------------------------------- numba.cuda (simulator)


@needs_numba_cuda
@pytest.mark.parametrize("blocks", (1, 3))
@pytest.mark.parametrize("levels, level_bits", CONFIGS)
def test_numba_cuda_quantize_is_byte_identical(levels, level_bits, blocks, rng):
    from latkv._gpu import numba_polar

    dim = blocks << levels
    boundaries, _ = tables(level_bits)
    x = rotated_inputs(3, dim, rng)
    result = numba_polar.polar_quantize(x, levels, level_bits, boundaries)
    assert all(isinstance(codes, np.ndarray) for codes in result[0])
    assert [codes.shape for codes in result[0]] == [
        (3, packed_length(dim >> level, bits)) for level, bits in enumerate(level_bits, 1)]
    assert result[1].shape == (3, blocks)
    assert_quantize_equal(result, polar_quantize_reference(x, levels, level_bits, boundaries))


@needs_numba_cuda
@pytest.mark.parametrize("levels, level_bits", [(1, (3,)), (2, (1, 1)), (3, (1, 3, 2))])
def test_numba_cuda_quantize_several_groups_per_row(levels, level_bits, rng):
    # 11 blocks per row: several encoding threads per row, a partial tail group
    from latkv._gpu import numba_polar

    dim = 11 << levels
    boundaries, _ = tables(level_bits)
    x = rotated_inputs(2, dim, rng)
    assert_quantize_equal(numba_polar.polar_quantize(x, levels, level_bits, boundaries),
                          polar_quantize_reference(x, levels, level_bits, boundaries))


@needs_numba_cuda
def test_numba_cuda_quantize_non_finite():
    from latkv._gpu import numba_polar

    levels, level_bits = 2, (3, 2)
    boundaries, _ = tables(level_bits)
    x = np.array([[np.nan, 1.0, 0.5, -0.5, np.inf, 1.0, -np.inf, -np.inf],
                  [np.inf, np.inf, 2.0, 1.0, 1.0, np.nan, 0.0, 0.0]], np.float32)
    assert_quantize_equal(numba_polar.polar_quantize(x, levels, level_bits, boundaries),
                          polar_quantize_reference(x, levels, level_bits, boundaries))


@needs_numba_cuda
@pytest.mark.parametrize("radius_dtype", (np.float16, np.float32, np.float64))
@pytest.mark.parametrize("levels, level_bits", CONFIGS[::2])
def test_numba_cuda_dequantize_matches_reference(levels, level_bits, radius_dtype, rng):
    from latkv._gpu import numba_polar

    dim = 3 << levels
    _, centroids = tables(level_bits)
    packed = random_packed(3, dim, level_bits, rng)
    radius = rng.uniform(0.0, 4.0, size=(3, 3)).astype(radius_dtype)
    radius[0, 0] = 0.0
    out = numba_polar.polar_dequantize(packed, radius, levels, level_bits, centroids, dim)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (3, dim)
    np.testing.assert_allclose(
        out, polar_dequantize_reference(packed, radius, levels, level_bits, centroids, dim),
        rtol=1e-6, atol=1e-30)


@needs_numba_cuda
@pytest.mark.parametrize("levels, level_bits", [(2, (4, 2)), (4, (4, 2, 2, 2))])
def test_numba_cuda_round_trip(levels, level_bits, rng):
    from latkv._gpu import numba_polar

    dim = 3 << levels
    boundaries, centroids = tables(level_bits)
    x = rotated_inputs(3, dim, rng)
    packed, radius = numba_polar.polar_quantize(x, levels, level_bits, boundaries)
    radius16 = radius.astype(np.float16)
    out = numba_polar.polar_dequantize(packed, radius16, levels, level_bits, centroids, dim)
    np.testing.assert_allclose(
        out, polar_dequantize_reference(packed, radius16, levels, level_bits, centroids, dim),
        rtol=1e-6, atol=1e-30)
    # and it is a reconstruction: the block norms are kept
    blocks = out.reshape(3, -1, 1 << levels).astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(blocks, axis=-1), radius16, rtol=1e-5)


@needs_numba_cuda
def test_numba_cuda_empty_inputs():
    from latkv._gpu import numba_polar

    levels, level_bits = 2, (4, 2)
    boundaries, centroids = tables(level_bits)
    packed, radius = numba_polar.polar_quantize(np.zeros((0, 8), np.float32), levels,
                                                level_bits, boundaries)
    assert [p.shape for p in packed] == [(0, 2), (0, 1)] and radius.shape == (0, 2)
    packed, radius = numba_polar.polar_quantize(np.zeros((2, 0), np.float32), levels,
                                                level_bits, boundaries)
    assert [p.shape for p in packed] == [(2, 0), (2, 0)] and radius.shape == (2, 0)
    out = numba_polar.polar_dequantize((np.zeros((0, 2), np.uint8), np.zeros((0, 1), np.uint8)),
                                       np.zeros((0, 2), np.float16), levels, level_bits,
                                       centroids, 8)
    assert out.shape == (0, 8) and out.dtype == np.float32


def check_errors(module, xp):
    boundaries, centroids = tables((4, 2))
    boundaries = tuple(xp.asarray(b) for b in boundaries)
    centroids = tuple(xp.asarray(c) for c in centroids)
    x = xp.zeros((2, 8), np.float32)
    packed = (xp.zeros((2, 2), np.uint8), xp.zeros((2, 1), np.uint8))
    radius = xp.ones((2, 2), np.float32)
    with pytest.raises(ValueError, match="levels must be 1..8"):
        module.polar_quantize(xp.zeros((2, 512), np.float32), 9, (2,) * 9, boundaries * 5)
    with pytest.raises(ValueError, match="one width per level"):
        module.polar_quantize(x, 2, (4,), boundaries)
    with pytest.raises(ValueError, match="level_bits must be 1..8"):
        module.polar_quantize(x, 2, (4, 9), boundaries)
    with pytest.raises(ValueError, match="multiple of 2"):
        module.polar_quantize(xp.zeros((2, 6), np.float32), 2, (4, 2), boundaries)
    with pytest.raises(ValueError, match="boundaries of level 2"):
        module.polar_quantize(x, 2, (4, 3), boundaries)
    with pytest.raises(ValueError, match="one table per level"):
        module.polar_quantize(x, 2, (4, 2), boundaries[:1])
    with pytest.raises(ValueError, match="centroids of level 1"):
        module.polar_dequantize(packed, radius, 2, (4, 2), centroids[::-1], 8)
    with pytest.raises(ValueError, match="radius"):
        module.polar_dequantize(packed, radius, 2, (4, 2), centroids, 16)
    with pytest.raises(ValueError, match="packed level 2"):
        module.polar_dequantize((packed[0], xp.zeros((2, 2), np.uint8)), radius, 2, (4, 2),
                                centroids, 8)
    with pytest.raises(ValueError, match="one array per level"):
        module.polar_dequantize(packed[:1], radius, 2, (4, 2), centroids, 8)
    with pytest.raises(TypeError, match="uint8"):
        module.polar_dequantize((packed[0].astype(np.int16), packed[1]), radius, 2, (4, 2),
                                centroids, 8)


@needs_numba_cuda
def test_numba_cuda_errors():
    from latkv._gpu import numba_polar

    check_errors(numba_polar, np)


# ---------------------------------------------------------------- GPU (skipped without one)

GPU_CONFIGS = [(levels, bits) for levels in range(1, 9)
               for bits in [(4,) + (2,) * (levels - 1), (1,) * levels, (8,) * levels,
                            tuple((3 * level) % 8 + 1 for level in range(levels))]]


def _gpu_modules():
    from latkv._gpu import cupy_polar, numba_polar

    return {"cupy": cupy_polar, "numba.cuda": numba_polar}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba.cuda"])
@pytest.mark.parametrize("levels, level_bits", GPU_CONFIGS)
def test_gpu_quantize_is_byte_identical(backend, levels, level_bits, rng):
    import cupy

    module = _gpu_modules()[backend]
    boundaries, _ = tables(level_bits)
    device_boundaries = tuple(cupy.asarray(b) for b in boundaries)
    for rows, blocks in [(1, 1), (37, 1), (37, 3), (37, 11), (5, 0), (0, 2), (4000, 8)]:
        dim = blocks << levels
        x = rotated_inputs(max(rows, 1), dim, rng)[:rows]
        packed, radius = module.polar_quantize(cupy.asarray(x), levels, level_bits,
                                               device_boundaries)
        assert all(isinstance(p, cupy.ndarray) and p.flags.c_contiguous for p in packed)
        assert isinstance(radius, cupy.ndarray) and radius.shape == (rows, blocks)
        assert [p.shape for p in packed] == [
            (rows, packed_length(dim >> level, bits))
            for level, bits in enumerate(level_bits, start=1)]
        if rows * dim == 0:
            continue  # the reference cannot reshape empty inputs
        assert_quantize_equal((tuple(cupy.asnumpy(p) for p in packed), cupy.asnumpy(radius)),
                              polar_quantize_reference(x, levels, level_bits, boundaries))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba.cuda"])
def test_gpu_quantize_non_finite(backend):
    import cupy

    module = _gpu_modules()[backend]
    levels, level_bits = 2, (3, 2)
    boundaries, _ = tables(level_bits)
    x = np.array([[np.nan, 1.0, 0.5, -0.5, np.inf, 1.0, -np.inf, -np.inf],
                  [np.inf, np.inf, 2.0, 1.0, 1.0, np.nan, 0.0, 0.0]], np.float32)
    packed, radius = module.polar_quantize(cupy.asarray(x), levels, level_bits,
                                           tuple(cupy.asarray(b) for b in boundaries))
    assert_quantize_equal((tuple(cupy.asnumpy(p) for p in packed), cupy.asnumpy(radius)),
                          polar_quantize_reference(x, levels, level_bits, boundaries))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba.cuda"])
@pytest.mark.parametrize("levels, level_bits", GPU_CONFIGS)
def test_gpu_dequantize_matches_reference(backend, levels, level_bits, rng):
    import cupy

    module = _gpu_modules()[backend]
    _, centroids = tables(level_bits)
    device_centroids = tuple(cupy.asarray(c) for c in centroids)
    for rows, blocks, dtype in [(1, 1, np.float16), (37, 3, np.float32), (37, 11, np.float64),
                                (4000, 8, np.float16), (0, 2, np.float16), (3, 0, np.float16)]:
        dim = blocks << levels
        packed = random_packed(rows, dim, level_bits, rng)
        radius = rng.uniform(0.0, 4.0, size=(rows, blocks)).astype(dtype)
        out = module.polar_dequantize(tuple(cupy.asarray(p) for p in packed),
                                      cupy.asarray(radius), levels, level_bits,
                                      device_centroids, dim)
        assert isinstance(out, cupy.ndarray) and out.shape == (rows, dim)
        assert out.dtype == np.float32
        if dim == 0:
            continue  # the reference cannot reshape an empty block axis
        np.testing.assert_allclose(
            cupy.asnumpy(out),
            polar_dequantize_reference(packed, radius, levels, level_bits, centroids, dim),
            rtol=1e-6, atol=1e-30)


@pytest.mark.gpu
def test_cupy_errors():
    import cupy

    from latkv._gpu import cupy_polar

    check_errors(cupy_polar, cupy)
