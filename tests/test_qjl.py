"""QJL: the exact size, the estimator's theorems over independent seeds, outliers, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

import latkv
from latkv.qjl import QJL_SCALE, gaussian_sketch


def _pair(rng, dim):
    k = rng.standard_normal(dim).astype(np.float32)
    q = (0.6 * k + rng.standard_normal(dim)).astype(np.float32)  # correlated, <q, k> != 0
    return q, k


def test_documented_size():
    assert latkv.QJL(dim=128, sketch_dim=256).bits_per_coordinate == (256 + 16) / 128
    assert latkv.QJL(dim=128, sketch_dim=256, norm_dtype="float32").code_size == 32 + 4
    # outliers: a second sketch with its own norm, plus one index per channel per head over
    # the 128-token prefill
    qz = latkv.QJL(dim=128, sketch_dim=256, outliers=8, outlier_sketch_dim=64)
    assert qz.code_size == 32 + 2 + 8 + 2 + 8 / 128
    codes = qz.encode(np.random.default_rng(0).standard_normal((3, 128, 128)))
    assert codes.nbytes == 3 * 128 * qz.code_size
    assert codes["outlier_index"].shape == (3, 8)


def _estimates(seeds, q, k, **options):
    return np.array([latkv.QJL(dim=k.size, seed=seed, **options).scores(
        q, latkv.QJL(dim=k.size, seed=seed, **options).encode(k[None]))[0] for seed in seeds],
        dtype=np.float64)


@pytest.mark.parametrize("orthogonal", [False, True])
def test_estimator_is_unbiased_with_bounded_variance(orthogonal):
    # QJL Lemma 3 over 2000 independent sketches: E[est] = <q, k>, Var <= pi/(2m) |q|^2 |k|^2
    rng = np.random.default_rng(7)
    dim, m = 32, 48
    q, k = _pair(rng, dim)
    estimates = _estimates(range(2000), q, k, sketch_dim=m, norm_dtype="float32",
                           orthogonal=orthogonal)
    truth = float(q.astype(np.float64) @ k)
    standard_error = estimates.std(ddof=1) / np.sqrt(estimates.size)
    assert abs(estimates.mean() - truth) < 4 * standard_error
    bound = np.pi / (2 * m) * float(q @ q) * float(k @ k)
    # sample variance of N draws: relative standard deviation sqrt(2 / (N - 1))
    assert estimates.var(ddof=1) <= bound * (1 + 4 * np.sqrt(2 / (estimates.size - 1)))


def test_outlier_sketch_keeps_the_estimator_unbiased():
    rng = np.random.default_rng(8)
    dim = 32
    q, k = _pair(rng, dim)
    k[[3, 17]] *= 20  # two outlier channels
    keys = np.stack([k, 0.1 * rng.standard_normal(dim).astype(np.float32)])
    estimates = np.array([
        (lambda qz: qz.scores(q, qz.encode(keys))[0])(
            latkv.QJL(dim=dim, sketch_dim=32, seed=seed, outliers=2, norm_dtype="float32"))
        for seed in range(1000)])
    truth = float(q.astype(np.float64) @ k)
    standard_error = estimates.std(ddof=1) / np.sqrt(estimates.size)
    assert abs(estimates.mean() - truth) < 4 * standard_error
    codes = latkv.QJL(dim=dim, sketch_dim=32, outliers=2).encode(keys)
    assert codes["outlier_index"].tolist() == [3, 17]


def test_outliers_reduce_the_error_on_keys_with_outlier_channels():
    # the point of the outlier sketch: the inlier sketch no longer carries the big channels
    rng = np.random.default_rng(9)
    keys = rng.standard_normal((256, 64)).astype(np.float32)
    keys[:, [5, 40]] *= 15
    queries = rng.standard_normal((32, 64)).astype(np.float32)
    truth = queries @ keys.T
    errors = {}
    for outliers in (0, 2):
        qz = latkv.QJL(dim=64, sketch_dim=128, outliers=outliers, outlier_sketch_dim=32)
        errors[outliers] = np.mean((qz.scores(queries, qz.encode(keys)) - truth) ** 2)
    assert errors[2] < 0.5 * errors[0]


def test_orthogonal_sketch_rows_are_orthogonal_within_blocks():
    sketch = gaussian_sketch(80, 32, np.random.default_rng(0), orthogonal=True)
    block = sketch[:32] / np.linalg.norm(sketch[:32], axis=1, keepdims=True)
    np.testing.assert_allclose(block @ block.T, np.eye(32), atol=1e-10)
    assert sketch.shape == (80, 32)


def test_decode_is_the_estimators_vector():
    rng = np.random.default_rng(1)
    qz = latkv.QJL(dim=64, sketch_dim=100, seed=3)
    k = rng.standard_normal((5, 64)).astype(np.float32)
    codes = qz.encode(k)
    signs = np.unpackbits(codes["signs"], axis=-1, count=100, bitorder="little") * 2.0 - 1
    norms = codes["norm"].astype(np.float64)
    expected = QJL_SCALE / 100 * norms[:, None] * (signs @ qz.stages()[0].sketch)
    np.testing.assert_allclose(qz.decode(codes), expected, rtol=1e-5, atol=1e-6)


@given(dim=st.integers(2, 70), sketch_dim=st.integers(1, 90), seed=st.integers(0, 2**31),
       tokens=st.integers(1, 9))
def test_scores_equal_decoded_inner_products(dim, sketch_dim, seed, tokens):
    rng = np.random.default_rng(seed)
    qz = latkv.QJL(dim=dim, sketch_dim=sketch_dim, seed=seed % 1000)
    k = rng.standard_normal((2, tokens, dim)).astype(np.float32)
    q = rng.standard_normal((2, 3, dim)).astype(np.float32)
    codes = qz.encode(k)
    expected = q @ np.swapaxes(qz.decode(codes), -1, -2)
    np.testing.assert_allclose(qz.scores(q, codes), expected, rtol=1e-4,
                               atol=1e-4 * (np.abs(expected).max() + 1e-6))


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="sketch_dim"):
        latkv.QJL(dim=64, sketch_dim=0)
    with pytest.raises(ValueError, match="outliers"):
        latkv.QJL(dim=64, outliers=64)
    with pytest.raises(ValueError, match="norm_dtype"):
        latkv.QJL(dim=64, norm_dtype="bfloat16")
    with pytest.raises(TypeError, match="center"):
        latkv.QJL(dim=64, center=1)
    qz = latkv.QJL(dim=8, sketch_dim=16, outliers=2)
    with pytest.raises(ValueError, match="at least 2 axes"):
        qz.encode(np.ones(8, np.float32))
    with pytest.raises(ValueError, match="float16 range \\(65504\\); use norm_dtype=.float32."):
        latkv.QJL(dim=8).encode(np.full((2, 8), 3e4, np.float32))
    assert latkv.QJL(dim=8, norm_dtype="float32").encode(np.full((2, 8), 3e4)).nbytes > 0
    codes = qz.encode(np.random.default_rng(0).standard_normal((4, 8)))
    bad = dict(codes.arrays, outlier_index=np.array([5, 5], np.uint8))
    with pytest.raises(ValueError, match="outlier_index"):
        qz.decode(latkv.Codes(codes.method, codes.params, codes.shape, codes.dtype, bad))
