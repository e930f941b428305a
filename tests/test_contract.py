"""The one interface, checked for every registered method on every backend that runs here.

Adding a method to the registry adds it to these tests.
"""

from __future__ import annotations

import numpy as np
import pytest

import latkv
from latkv._backend import available_backends
from latkv.container import from_bytes, to_bytes
from latkv.compare import instantiate
from latkv.registry import METHODS

from conftest import CUDA_SIMULATOR


def configurations():
    """Each method's compare variants at two bit widths (templates with a value kept as is)."""
    for name, cls in METHODS.items():
        for template in getattr(cls, "compare_specs", (name,)):
            for spec in template.split("|"):
                head, *options = spec.split(",")
                if ":" in head:
                    yield spec
                    continue
                for bits in (2, 4):
                    yield ",".join([f"{head}:{bits}", *options])


SPECS = sorted(set(configurations()))
DIMS = (64, 96, 128, 256)
CPU_BACKENDS = ("numpy", "numba")


def make(spec, dim):
    return latkv.quantizer(instantiate(spec, dim), dim=dim)


def _backends(qz):
    usable = [b for b in qz.supported_backends if b in available_backends() and b != "cupy"]
    return usable


def _input(rng, shape, dtype=np.float32):
    return (rng.standard_normal(shape) * np.exp(rng.normal(0, 0.5, shape[-1]))).astype(dtype)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dim", DIMS)
def test_shapes_dtypes_sizes_and_round_trip(spec, dim, rng):
    qz = make(spec, dim)
    for shape in [(1, dim), (7, dim), (2, 3, 97, dim)]:
        for dtype in (np.float16, np.float32):
            x = _input(rng, shape, dtype)
            codes = qz.encode(x)
            assert codes.method == qz.name and tuple(codes.shape) == shape
            if qz.variable_rate:
                # data-dependent sizes (entropy-coded streams): no size from the shape alone
                with pytest.raises(ValueError, match="variable_rate"):
                    qz.encoded_nbytes(shape)
            else:
                assert codes.nbytes == qz.encoded_nbytes(shape)
            x_hat = qz.decode(codes)
            assert x_hat.shape == shape and x_hat.dtype == dtype
            assert from_bytes(to_bytes(codes)).nbytes == codes.nbytes
    # code_size (the docstring formula) agrees with the bytes actually stored, for a full
    # group of vectors: n a multiple of every group size in use (and one statistics block)
    n = 128
    codes = qz.encode(_input(rng, (n, dim)))
    if qz.variable_rate:
        # code_size is the target, which the measured size meets once the model and stream
        # headers are amortised (tests/test_e8.py checks how closely)
        codes = qz.encode(_input(rng, (16, n, dim)))
        assert 8 * codes.nbytes / (16 * n * dim) <= qz.bits_per_coordinate
        return
    assert codes.nbytes == pytest.approx(n * qz.code_size, rel=0, abs=0)
    assert qz.bits_per_coordinate == pytest.approx(8 * codes.nbytes / (n * dim), rel=1e-12)


@pytest.mark.parametrize("spec", SPECS)
def test_every_backend_writes_identical_codes(spec, rng):
    qz = make(spec, 64)
    small = CUDA_SIMULATOR
    for shape in [(1, 64), (7, 64), (3, 33, 64)] if not small else [(1, 64), (2, 9, 64)]:
        x = _input(rng, shape)
        reference = qz.encode(x, backend="numpy")
        decoded = qz.decode(reference, backend="numpy")
        for backend in _backends(qz):
            codes = qz.encode(x, backend=backend)
            for key in reference.arrays:
                assert np.array_equal(codes[key], reference[key]), (backend, key)
            np.testing.assert_allclose(qz.decode(codes, backend=backend), decoded, rtol=1e-6,
                                       atol=1e-6)


@pytest.mark.parametrize("spec", SPECS)
def test_seed_determinism_and_idempotence(spec, rng):
    qz = make(spec, 128)
    again = latkv.quantizer(qz.spec)
    assert again == qz and again.spec == qz.spec
    x = _input(rng, (5, 40, 128))
    first, second = qz.encode(x), again.encode(x.copy())
    for key in first.arrays:
        assert np.array_equal(first[key], second[key])
    decoded = qz.decode(first)
    re_encoded = qz.encode(decoded)
    idempotent = getattr(qz, "idempotent", True)
    if idempotent is None:
        # estimators (QJL signs, TurboQuant-prod): a decoded vector is an estimate, not a
        # grid point, and re-encoding it draws a new estimate; it must still encode
        if not qz.variable_rate:
            assert qz.encoded_nbytes(decoded.shape) == re_encoded.nbytes
        assert np.isfinite(qz.decode(re_encoded)).all()
    elif idempotent:
        # encode(decode(encode(x))) == encode(x): the decoded vectors sit on the grid
        for key in first.arrays:
            assert np.array_equal(re_encoded[key], first[key])
    else:
        # data-dependent grids (min-max scales rounded to fp16) move slightly when refitted to
        # decoded data; re-quantizing must still cost far less than the first quantization
        first_error = np.sum((decoded - x) ** 2)
        second_error = np.sum((qz.decode(re_encoded) - decoded) ** 2)
        assert second_error <= 0.25 * first_error


@pytest.mark.parametrize("spec", SPECS)
def test_save_load_gives_identical_codes(spec, rng, tmp_path):
    qz = make(spec, 96)
    codes = qz.encode(_input(rng, (2, 1025 if spec.startswith("scalar") else 97, 96)))
    path = tmp_path / "c.lkv"
    latkv.save(path, codes)
    loaded = latkv.load(path)
    assert latkv.quantizer_for(loaded) == qz
    for key in codes.arrays:
        assert np.array_equal(loaded[key], codes[key])
    assert np.array_equal(qz.decode(loaded), qz.decode(codes))


@pytest.mark.parametrize("spec", SPECS)
def test_scores_match_decoded_inner_products(spec, rng):
    qz = make(spec, 64)
    x = _input(rng, (3, 50, 64))
    q = rng.standard_normal((3, 4, 64)).astype(np.float32)
    codes = qz.encode(x)
    expected = q.astype(np.float64) @ np.swapaxes(qz.decode(codes).astype(np.float64), -1, -2)
    got = qz.scores(q, codes)
    assert got.shape == (3, 4, 50)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("spec", SPECS)
def test_weighted_sum_matches_weights_times_decoded_vectors(spec, rng):
    # rotation methods sum in the rotated domain, statistics and outlier channels enter
    # once per block of tokens: the result must still be weights @ decode(codes)
    qz = make(spec, 64)
    x = _input(rng, (3, 50, 64))
    weights = rng.random((3, 4, 50)).astype(np.float32)
    codes = qz.encode(x)
    expected = weights.astype(np.float64) @ qz.decode(codes).astype(np.float64)
    for backend in CPU_BACKENDS:
        got = qz.weighted_sum(weights, codes, backend=backend)
        assert got.shape == (3, 4, 64) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-4,
                                   atol=1e-5 * np.abs(expected).max())
    # one set of weights broadcast over the heads
    shared = qz.weighted_sum(weights[0], codes)
    np.testing.assert_allclose(shared, weights[0].astype(np.float64) @ qz.decode(codes),
                               rtol=1e-4, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("spec", ["turbo:3", "scalar:4", "e8:2"])
def test_weighted_sum_refuses_mismatched_weights(spec, rng):
    qz = make(spec, 64)
    codes = qz.encode(_input(rng, (2, 10, 64)))
    with pytest.raises(ValueError, match=r"weights must be \(\.\.\., m, 10\)"):
        qz.weighted_sum(np.ones((2, 3, 9), np.float32), codes)
    with pytest.raises(ValueError, match="does not broadcast"):
        qz.weighted_sum(np.ones((3, 3, 10), np.float32), codes)
    with pytest.raises(TypeError, match="weights must be float"):
        qz.weighted_sum(np.ones((2, 3, 10), np.int32), codes)
    with pytest.raises(ValueError, match="NaN or Inf"):
        qz.weighted_sum(np.full((2, 3, 10), np.nan, np.float32), codes)
    with pytest.raises(ValueError, match="at least 2 axes"):
        qz.weighted_sum(np.ones(10, np.float32), codes)
