"""GPU codebook and sign-sketch kernels against their NumPy references.

``latkv._gpu.numba_codebook`` runs here in the CUDA simulator where there is no GPU (tiny
inputs: the simulator runs every thread in Python); ``latkv._gpu.cupy_codebook`` (the
``cuda_kernels/codebook.cu`` and ``sign_sketch.cu`` kernels) and numba.cuda on CuPy input run
in the ``gpu``-marked tests, skipped without a device. Quantize and dequantize must be
bit-exact; scores equal the reference up to float32 rounding of the sums.
"""

from __future__ import annotations

import numpy as np
import pytest

from latkv._backend import numba_cuda_available
from latkv.codebooks import sphere_codebook
from latkv.packing import packed_length
from latkv.qjl import sign_scores_reference
from latkv.turbo import (
    codebook_dequantize_reference,
    codebook_quantize_reference,
    codebook_scores_reference,
)

needs_numba_cuda = pytest.mark.skipif(
    not numba_cuda_available(), reason="numba.cuda has neither a device nor the simulator"
)

BITS = (1, 2, 3, 4, 8)
DIMS = (2, 5, 64)


def quantize_inputs(dim: int, bits: int, rng: np.random.Generator, rows: int = 3):
    """``rotated, norm, boundaries`` with the edge cases of the quantizer.

    Row 0 has norm 0 (divided by 1) and holds boundary values exactly and their float32
    neighbours; row 1 is ``boundary * norm``, rounded so that ``rotated / norm`` is the
    boundary exactly (it goes to the lower cell) when possible, often where ``rotated * (1 /
    norm)`` is not; the other rows are random unit-ish vectors with random norms.
    """
    codebook = sphere_codebook(max(dim, 2), bits)
    boundaries = codebook.boundaries
    scale = np.float32(1.5 / np.sqrt(dim))
    rotated = (rng.standard_normal((rows, dim)) * scale).astype(np.float32)
    norm = rng.uniform(0.5, 3.0, size=rows).astype(np.float32)
    # row 0: norm 0 -> u = rotated; boundary values, just below and just above
    norm[0] = 0.0
    picks = boundaries[rng.integers(0, boundaries.size, size=dim)]
    kind = rng.integers(0, 3, size=dim)
    row0 = np.where(kind == 0, picks,
                    np.where(kind == 1, np.nextafter(picks, np.float32(-np.inf)),
                             np.nextafter(picks, np.float32(np.inf))))
    rotated[0] = row0.astype(np.float32)
    if rows > 1:
        # row 1: rotated / norm == boundary exactly (u on the boundary, lower cell)
        s = norm[1]
        for j in range(dim):
            b = boundaries[rng.integers(0, boundaries.size)]
            r = np.float32(b * s)
            for candidate in (r, np.nextafter(r, np.float32(-np.inf)),
                              np.nextafter(r, np.float32(np.inf))):
                if np.float32(candidate / s) == b:
                    r = candidate
                    break
            rotated[1, j] = r
    return rotated, norm, boundaries


def division_cases(bits: int, rng: np.random.Generator, count: int = 16):
    """``(rotated, norm)`` with ``rotated / norm`` on a boundary but ``rotated * (1/norm)`` off.

    A kernel that multiplies by a reciprocal instead of dividing gets some of these codes wrong.
    Needs ``bits >= 2``: the one 1-bit boundary is 0, where both give 0.
    """
    assert bits >= 2
    boundaries = sphere_codebook(16, bits).boundaries
    values, norms = [], []
    while len(values) < count:
        b = boundaries[rng.integers(0, boundaries.size)]
        s = np.float32(rng.uniform(0.1, 10.0))
        r = np.float32(b * s)
        if (np.float32(r / s) == b and np.float32(r * np.float32(np.float32(1) / s)) != b
                and b != 0):
            values.append(r)
            norms.append(s)
    return np.array(values, np.float32)[:, None], np.array(norms, np.float32), boundaries


def random_packed(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Arbitrary bytes, padding bits of the last byte included (they must be ignored)."""
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def score_tolerance(q: np.ndarray, values: np.ndarray) -> float:
    """Absolute tolerance for float32 sums of ``q * values`` in a different order."""
    dim = q.shape[-1]
    scale = float(np.abs(q).max(initial=0.0)) * float(np.abs(values).max(initial=0.0)) * dim
    return 1e-5 * max(scale, 1e-30)


# ---------------------------------------------------------------- numba.cuda (simulator)


@needs_numba_cuda
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("bits", BITS)
def test_numba_cuda_quantize_is_byte_identical(bits, dim, rng):
    from latkv._gpu import numba_codebook

    rotated, norm, boundaries = quantize_inputs(dim, bits, rng)
    packed = numba_codebook.codebook_quantize(rotated, norm, boundaries, bits)
    assert isinstance(packed, np.ndarray) and packed.dtype == np.uint8
    assert packed.shape == (3, packed_length(dim, bits))
    np.testing.assert_array_equal(
        packed, codebook_quantize_reference(rotated, norm, boundaries, bits))


@needs_numba_cuda
@pytest.mark.parametrize("bits", (2, 3, 8))
def test_numba_cuda_quantize_divides(bits, rng):
    from latkv._gpu import numba_codebook

    rotated, norm, boundaries = division_cases(bits, rng)
    np.testing.assert_array_equal(
        numba_codebook.codebook_quantize(rotated, norm, boundaries, bits),
        codebook_quantize_reference(rotated, norm, boundaries, bits))


@needs_numba_cuda
def test_numba_cuda_quantize_non_finite(rng):
    from latkv._gpu import numba_codebook

    boundaries = sphere_codebook(8, 2).boundaries
    rotated = np.array([[np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 0.25],
                        [0.5, -0.5, 0.0, 1.0, 2.0, -2.0, 0.1, -0.1]], np.float32)
    norm = np.array([1.0, np.nan], np.float32)  # a NaN norm divides by 1, as a zero norm
    np.testing.assert_array_equal(
        numba_codebook.codebook_quantize(rotated, norm, boundaries, 2),
        codebook_quantize_reference(rotated, norm, boundaries, 2))


@needs_numba_cuda
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("bits", BITS)
def test_numba_cuda_dequantize_is_exact(bits, dim, rng):
    from latkv._gpu import numba_codebook

    centroids = sphere_codebook(max(dim, 2), bits).centroids
    packed = random_packed((3, packed_length(dim, bits)), rng)
    out = numba_codebook.codebook_dequantize(packed, centroids, bits, dim)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (3, dim)
    np.testing.assert_array_equal(
        out, codebook_dequantize_reference(packed, centroids, bits, dim))


@needs_numba_cuda
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("bits", (1, 3, 8))
def test_numba_cuda_scores_match_reference(bits, dim, rng):
    from latkv._gpu import numba_codebook

    centroids = sphere_codebook(max(dim, 2), bits).centroids
    q = rng.standard_normal((2, 3, dim)).astype(np.float32)
    packed = random_packed((2, 4, packed_length(dim, bits)), rng)
    out = numba_codebook.codebook_scores(q, packed, centroids, bits, dim)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (2, 3, 4)
    np.testing.assert_allclose(
        out, codebook_scores_reference(q, packed, centroids, bits, dim),
        rtol=0, atol=score_tolerance(q, centroids))


@needs_numba_cuda
def test_numba_cuda_quantize_round_trip_scores(rng):
    # codes made by the quantizer, not arbitrary bytes: the scores of the decoded keys
    from latkv._gpu import numba_codebook

    dim, bits = 16, 4
    codebook = sphere_codebook(dim, bits)
    rotated, norm, boundaries = quantize_inputs(dim, bits, rng, rows=4)
    packed = numba_codebook.codebook_quantize(rotated, norm, boundaries, bits)
    u_hat = numba_codebook.codebook_dequantize(packed, codebook.centroids, bits, dim)
    q = rng.standard_normal((1, 2, dim)).astype(np.float32)
    scores = numba_codebook.codebook_scores(q, packed[None], codebook.centroids, bits, dim)
    np.testing.assert_allclose(scores[0], q[0] @ u_hat.T, rtol=0,
                               atol=score_tolerance(q, codebook.centroids))


@needs_numba_cuda
@pytest.mark.parametrize("rows", (5, 64))
def test_numba_cuda_sign_scores_match_reference(rows, rng):
    from latkv._gpu import numba_codebook

    q = rng.standard_normal((2, 3, rows)).astype(np.float32)
    packed = random_packed((2, 4, packed_length(rows, 1)), rng)
    out = numba_codebook.sign_scores(q, packed, rows)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (2, 3, 4)
    np.testing.assert_allclose(out, sign_scores_reference(q, packed, rows), rtol=0,
                               atol=score_tolerance(q, np.ones(1)))


@needs_numba_cuda
def test_numba_cuda_empty_inputs():
    from latkv._gpu import numba_codebook

    codebook = sphere_codebook(4, 2)
    assert numba_codebook.codebook_quantize(
        np.zeros((0, 4), np.float32), np.zeros(0, np.float32), codebook.boundaries, 2
    ).shape == (0, 1)
    assert numba_codebook.codebook_dequantize(
        np.zeros((0, 1), np.uint8), codebook.centroids, 2, 4).shape == (0, 4)
    assert numba_codebook.codebook_scores(
        np.zeros((2, 0, 4), np.float32), np.zeros((2, 3, 1), np.uint8), codebook.centroids,
        2, 4).shape == (2, 0, 3)
    assert numba_codebook.sign_scores(
        np.zeros((1, 2, 9), np.float32), np.zeros((1, 0, 2), np.uint8), 9).shape == (1, 2, 0)


def check_shape_errors(module, xp):
    codebook = sphere_codebook(4, 2)
    centroids, boundaries = xp.asarray(codebook.centroids), xp.asarray(codebook.boundaries)
    with pytest.raises(ValueError, match="bits"):
        module.codebook_dequantize(xp.zeros((1, 1), np.uint8), centroids, 9, 4)
    with pytest.raises(ValueError, match="boundaries"):
        module.codebook_quantize(xp.zeros((1, 4), np.float32), xp.ones(1, np.float32),
                                 boundaries, 3)
    with pytest.raises(ValueError, match="centroids"):
        module.codebook_dequantize(xp.zeros((1, 1), np.uint8), centroids, 3, 2)
    with pytest.raises(ValueError, match="packed"):
        module.codebook_dequantize(xp.zeros((1, 2), np.uint8), centroids, 2, 4)
    with pytest.raises(ValueError, match="do not match"):
        module.codebook_scores(xp.zeros((1, 1, 4), np.float32), xp.zeros((2, 1, 1), np.uint8),
                               centroids, 2, 4)
    with pytest.raises(ValueError, match="do not match"):
        module.sign_scores(xp.zeros((1, 1, 9), np.float32), xp.zeros((1, 1, 1), np.uint8), 9)


@needs_numba_cuda
def test_numba_cuda_shape_errors():
    from latkv._gpu import numba_codebook

    check_shape_errors(numba_codebook, np)


# ---------------------------------------------------------------- GPU (skipped without one)

GPU_DIMS = (1, 2, 5, 64, 77, 128, 300, 513)


def _gpu_modules():
    from latkv._gpu import cupy_codebook, numba_codebook

    return {"cupy": cupy_codebook, "numba.cuda": numba_codebook}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba.cuda"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_gpu_quantize_is_byte_identical(backend, bits, rng):
    import cupy

    module = _gpu_modules()[backend]
    for dim in GPU_DIMS:
        rotated, norm, boundaries = quantize_inputs(max(dim, 1), bits, rng, rows=37)
        packed = module.codebook_quantize(cupy.asarray(rotated), cupy.asarray(norm),
                                          cupy.asarray(boundaries), bits)
        assert isinstance(packed, cupy.ndarray)
        np.testing.assert_array_equal(
            cupy.asnumpy(packed), codebook_quantize_reference(rotated, norm, boundaries, bits))
    # many rows: grid-stride loops, more than one block per row set
    rotated = (rng.standard_normal((20_000, 128)) / np.sqrt(128)).astype(np.float32)
    norm = rng.uniform(0.0, 2.0, size=20_000).astype(np.float32)
    norm[::7] = 0.0
    boundaries = sphere_codebook(128, bits).boundaries
    np.testing.assert_array_equal(
        cupy.asnumpy(module.codebook_quantize(cupy.asarray(rotated), cupy.asarray(norm),
                                              cupy.asarray(boundaries), bits)),
        codebook_quantize_reference(rotated, norm, boundaries, bits))
    if bits == 1:
        return
    # rotated / norm exactly on a boundary where rotated * (1 / norm) is not
    rotated, norm, boundaries = division_cases(bits, rng, count=64)
    np.testing.assert_array_equal(
        cupy.asnumpy(module.codebook_quantize(cupy.asarray(rotated), cupy.asarray(norm),
                                              cupy.asarray(boundaries), bits)),
        codebook_quantize_reference(rotated, norm, boundaries, bits))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba.cuda"])
def test_gpu_quantize_non_finite(backend):
    import cupy

    module = _gpu_modules()[backend]
    boundaries = sphere_codebook(8, 2).boundaries
    rotated = np.array([[np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 0.25],
                        [0.5, -0.5, 0.0, 1.0, 2.0, -2.0, 0.1, -0.1]], np.float32)
    norm = np.array([1.0, np.nan], np.float32)
    np.testing.assert_array_equal(
        cupy.asnumpy(module.codebook_quantize(cupy.asarray(rotated), cupy.asarray(norm),
                                              cupy.asarray(boundaries), 2)),
        codebook_quantize_reference(rotated, norm, boundaries, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba.cuda"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_gpu_dequantize_is_exact(backend, bits, rng):
    import cupy

    module = _gpu_modules()[backend]
    centroids = sphere_codebook(16, bits).centroids
    for rows, dim in [(37, d) for d in GPU_DIMS] + [(20_000, 128), (0, 8), (3, 0)]:
        packed = random_packed((rows, packed_length(dim, bits)), rng)
        out = module.codebook_dequantize(cupy.asarray(packed), cupy.asarray(centroids), bits,
                                         dim)
        assert isinstance(out, cupy.ndarray) and out.shape == (rows, dim)
        np.testing.assert_array_equal(
            cupy.asnumpy(out), codebook_dequantize_reference(packed, centroids, bits, dim))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba.cuda"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_gpu_scores_match_reference(backend, bits, rng):
    import cupy

    module = _gpu_modules()[backend]
    centroids = sphere_codebook(16, bits).centroids
    # query counts around the query tile (8), key counts around the key tile (128), dims
    # around the staged chunk (256)
    for batches, m, n, dim in [(1, 1, 1, 1), (3, 1, 200, 128), (2, 9, 129, 77),
                               (4, 17, 300, 513), (1, 8, 128, 256), (2, 0, 5, 8),
                               (2, 3, 0, 8), (2, 2, 3, 0)]:
        q = rng.standard_normal((batches, m, dim)).astype(np.float32)
        packed = random_packed((batches, n, packed_length(dim, bits)), rng)
        out = module.codebook_scores(cupy.asarray(q), cupy.asarray(packed),
                                     cupy.asarray(centroids), bits, dim)
        assert isinstance(out, cupy.ndarray) and out.shape == (batches, m, n)
        np.testing.assert_allclose(
            cupy.asnumpy(out), codebook_scores_reference(q, packed, centroids, bits, dim),
            rtol=0, atol=score_tolerance(q, centroids))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba.cuda"])
def test_gpu_sign_scores_match_reference(backend, rng):
    import cupy

    module = _gpu_modules()[backend]
    for batches, m, n, rows in [(1, 1, 1, 1), (3, 1, 200, 128), (2, 9, 129, 77),
                                (4, 17, 300, 513), (1, 8, 128, 256), (2, 0, 5, 8),
                                (2, 3, 0, 8)]:
        q = rng.standard_normal((batches, m, rows)).astype(np.float32)
        packed = random_packed((batches, n, packed_length(rows, 1)), rng)
        out = module.sign_scores(cupy.asarray(q), cupy.asarray(packed), rows)
        assert isinstance(out, cupy.ndarray) and out.shape == (batches, m, n)
        np.testing.assert_allclose(
            cupy.asnumpy(out), sign_scores_reference(q, packed, rows), rtol=0,
            atol=score_tolerance(q, np.ones(1)))


@pytest.mark.gpu
def test_cupy_shape_errors():
    import cupy

    from latkv._gpu import cupy_codebook

    check_shape_errors(cupy_codebook, cupy)
