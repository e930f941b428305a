"""Rotations: orthogonality properties, seeds, dtypes, errors, and every backend of the
Hadamard stage against the NumPy reference (``hadamard_segment_reference``)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

from latkv._backend import implementation
from latkv.rotations import (
    Hadamard,
    RandomizedHadamard,
    RandomOrthogonal,
    hadamard_segment_reference,
    randomized_hadamard_staged,
)

# set by tests/conftest.py (before numba.cuda is imported) where there is no GPU
CUDA_SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

POWER_OF_TWO_DIMS = tuple(1 << k for k in range(9))  # 1 .. 256
NAMED_DIMS = (1, 3, 64, 80, 96, 112, 128, 256)

power_of_two_dims = st.sampled_from(POWER_OF_TWO_DIMS)
randomized_dims = st.one_of(st.sampled_from(NAMED_DIMS), st.integers(1, 300))
seeds = st.integers(0, 2**32 - 1)
leading_shapes = st.lists(st.integers(1, 4), min_size=0, max_size=2).map(tuple)
data_seeds = st.integers(0, 2**32 - 1)


@st.composite
def rotations(draw, kinds=("hadamard", "randomized", "orthogonal")):
    """Any of the three rotations, with a dim each accepts."""
    kind = draw(st.sampled_from(kinds))
    if kind == "hadamard":
        return Hadamard(draw(power_of_two_dims))
    if kind == "randomized":
        return RandomizedHadamard(draw(randomized_dims), seed=draw(seeds))
    return RandomOrthogonal(draw(st.integers(1, 64)), seed=draw(seeds))


def sample_rows(shape: tuple[int, ...], data_seed: int) -> np.ndarray:
    """float32 rows of mixed scale with an outlier channel, shape ``shape``."""
    rng = np.random.default_rng(data_seed)
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 3)
    x[..., rng.integers(shape[-1])] *= 50.0
    return x.astype(np.float32)


def row_norms(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x.astype(np.float64), axis=-1)


# ------------------------------------------------------------------------------------------
# orthogonality


@given(rotation=rotations(), lead=leading_shapes, data_seed=data_seeds)
def test_apply_preserves_norms(rotation, lead, data_seed):
    x = sample_rows((*lead, rotation.dim), data_seed)
    y = rotation.apply(x)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_allclose(row_norms(y), row_norms(x), rtol=1e-5)


@given(rotation=rotations(), lead=leading_shapes, data_seed=data_seeds)
def test_inverse_undoes_apply(rotation, lead, data_seed):
    x = sample_rows((*lead, rotation.dim), data_seed)
    back = rotation.inverse(rotation.apply(x))
    assert back.shape == x.shape and back.dtype == np.float32
    error = row_norms(back - x)
    assert np.all(error <= 1e-5 * row_norms(x)), (error / row_norms(x)).max()


@given(rotation=rotations())
def test_matrix_is_orthogonal_and_matches_apply(rotation):
    matrix = rotation.matrix()
    assert matrix.shape == (rotation.dim, rotation.dim) and matrix.dtype == np.float64
    identity = np.eye(rotation.dim)
    np.testing.assert_allclose(matrix @ matrix.T, identity, atol=2e-6)
    np.testing.assert_allclose(matrix.T @ matrix, identity, atol=2e-6)
    x = sample_rows((3, rotation.dim), 0)
    np.testing.assert_allclose(
        rotation.apply(x), x.astype(np.float64) @ matrix.T, rtol=1e-5, atol=1e-5 * np.abs(x).max()
    )


@pytest.mark.parametrize("dim", POWER_OF_TWO_DIMS)
def test_hadamard_matrix_is_sylvester_hadamard(dim):
    expected = scipy.linalg.hadamard(dim) / np.sqrt(dim)
    np.testing.assert_allclose(Hadamard(dim).matrix(), expected, rtol=1e-6, atol=1e-7)


def test_hadamard_docstring_example():
    y = Hadamard(4).apply(np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32))
    np.testing.assert_array_equal(y, np.full(4, 0.5, dtype=np.float32))


# ------------------------------------------------------------------------------------------
# seeds


@given(dim=randomized_dims, seed=seeds)
def test_same_seed_same_rotation(dim, seed):
    for make in (RandomizedHadamard, RandomOrthogonal):
        first, second = make(dim, seed=seed), make(dim, seed=seed)
        assert first == second
        np.testing.assert_array_equal(first.matrix(), second.matrix())


@given(
    dim=st.one_of(st.sampled_from((32, 64, 80, 96, 112, 128, 256)), st.integers(32, 300)),
    seed=seeds,
    other=seeds,
)
def test_different_seed_different_rotation(dim, seed, other):
    # dim >= 32: at least 32 random signs, so two seeds collide with probability <= 2**-32
    if seed == other:
        other = seed + 1
    for make in (RandomizedHadamard, RandomOrthogonal):
        assert make(dim, seed=seed) != make(dim, seed=other)
        assert not np.allclose(make(dim, seed=seed).matrix(), make(dim, seed=other).matrix())


# ------------------------------------------------------------------------------------------
# dtypes


@given(rotation=rotations(), dtype=st.sampled_from([np.float16, np.float64]), data_seed=data_seeds)
def test_float16_and_float64_inputs_give_float32(rotation, dtype, data_seed):
    x = sample_rows((2, rotation.dim), data_seed)
    if dtype is np.float16:
        x = x * np.float32(1e4 / np.abs(x).max())  # inside float16 range (max 65504)
    x = x.astype(dtype)
    x32 = x.astype(np.float32)
    y = rotation.apply(x)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, rotation.apply(x32))
    back = rotation.inverse(y.astype(dtype))
    assert back.dtype == np.float32


def test_input_is_not_modified(rng):
    x = rng.standard_normal((4, 96)).astype(np.float32)
    kept = x.copy()
    rotation = RandomizedHadamard(96, seed=3)
    for backend in ("numpy", "numba"):
        rotation.inverse(rotation.apply(x, backend=backend), backend=backend)
        Hadamard(32).apply(x[:, :32], backend=backend)
    np.testing.assert_array_equal(x, kept)


# ------------------------------------------------------------------------------------------
# backends against the reference


def assert_close_float32(actual: np.ndarray, expected: np.ndarray) -> None:
    """Both float32: relative 1e-6, plus an absolute slack of 1e-6 of the largest value."""
    assert actual.dtype == expected.dtype == np.float32 and actual.shape == expected.shape
    np.testing.assert_allclose(
        actual, expected, rtol=1e-6, atol=1e-6 * float(np.abs(expected).max()) + 1e-30
    )


ODD_LEADING_SHAPES = ((), (1,), (7,), (3, 5), (2, 1, 3))


@given(
    rotation=rotations(),
    lead=st.one_of(leading_shapes, st.sampled_from(ODD_LEADING_SHAPES)),
    data_seed=data_seeds,
)
def test_numba_backend_matches_numpy(rotation, lead, data_seed):
    x = sample_rows((*lead, rotation.dim), data_seed)
    y = rotation.apply(x, backend="numba")
    assert_close_float32(y, rotation.apply(x, backend="numpy"))
    assert_close_float32(rotation.inverse(y, backend="numba"), rotation.inverse(y, backend="numpy"))


def test_numba_backend_on_strided_input(rng):
    x = rng.standard_normal((6, 3, 80)).astype(np.float32)[::2, :, :]
    assert not x.flags.c_contiguous
    rotation = RandomizedHadamard(80, seed=5)
    assert_close_float32(rotation.apply(x, backend="numba"), rotation.apply(x, backend="numpy"))


def segment_cases():
    """(dim, start, size) for every instantiated log size, at the edges and inside."""
    for log_size in range(11):
        size = 1 << log_size
        yield size, 0, size
        yield size + 3, 3, size
        yield size + 5, 2, size


@pytest.mark.parametrize("dim,start,size", list(segment_cases()))
@pytest.mark.parametrize("inverse", [False, True])
def test_numba_hadamard_segment_matches_reference(dim, start, size, inverse, rng):
    x = rng.standard_normal((3, 2, dim)).astype(np.float32)
    kept = x.copy()
    signs = (1 - 2 * rng.integers(0, 2, size)).astype(np.float32)
    stage = implementation("hadamard_segment", "numba")
    y = stage(x, start, size, signs, inverse)
    assert y is not x
    np.testing.assert_array_equal(x, kept)
    expected = hadamard_segment_reference(x, start, size, signs, inverse)
    assert_close_float32(y, expected)
    outside = np.ones(dim, dtype=bool)
    outside[start : start + size] = False
    np.testing.assert_array_equal(y[..., outside], x[..., outside])


def test_reference_segment_is_orthonormal_stage(rng):
    # independent check of the reference itself against scipy's dense Hadamard matrix
    x = rng.standard_normal((4, 21)).astype(np.float32)
    signs = (1 - 2 * rng.integers(0, 2, 16)).astype(np.float32)
    dense = scipy.linalg.hadamard(16) / 4.0
    y = hadamard_segment_reference(x, 3, 16, signs, False)
    np.testing.assert_allclose(y[:, 3:19], (x[:, 3:19] * signs) @ dense, rtol=1e-5, atol=1e-5)
    z = hadamard_segment_reference(y, 3, 16, signs, True)
    np.testing.assert_allclose(z, x, rtol=1e-5, atol=1e-5)


# numba.cuda in the simulator is slow: tiny inputs, few examples.
@settings(max_examples=4 if CUDA_SIMULATOR else 25)
@given(
    kind=st.sampled_from(["hadamard", "randomized", "orthogonal"]),
    dim=st.sampled_from([8, 16, 96]),
    rows=st.integers(1, 3),
    seed=seeds,
    data_seed=data_seeds,
)
def test_numba_cuda_backend_matches_numpy(kind, dim, rows, seed, data_seed):
    if kind == "hadamard":
        rotation = Hadamard(dim if dim != 96 else 32)
    elif kind == "randomized":
        rotation = RandomizedHadamard(dim, seed=seed)
    else:
        rotation = RandomOrthogonal(dim, seed=seed)
    x = sample_rows((rows, rotation.dim), data_seed)
    y = rotation.apply(x, backend="numba.cuda")
    assert isinstance(y, np.ndarray)
    assert_close_float32(y, rotation.apply(x, backend="numpy"))
    assert_close_float32(
        rotation.inverse(y, backend="numba.cuda"), rotation.inverse(y, backend="numpy")
    )


@pytest.mark.parametrize("dim,start,size", [(1, 0, 1), (11, 3, 8), (40, 5, 32), (64, 0, 64)])
def test_numba_cuda_hadamard_segment_matches_reference(dim, start, size, rng):
    x = rng.standard_normal((2, 1, dim)).astype(np.float32)
    kept = x.copy()
    signs = (1 - 2 * rng.integers(0, 2, size)).astype(np.float32)
    stage = implementation("hadamard_segment", "numba.cuda")
    for inverse in (False, True):
        y = stage(x, start, size, signs, inverse)
        assert_close_float32(y, hadamard_segment_reference(x, start, size, signs, inverse))
    np.testing.assert_array_equal(x, kept)


# ------------------------------------------------------------------------------------------
# spreading


def test_randomized_hadamard_spreads_one_hot_power_of_two():
    # dim 128: H D / sqrt(128) maps e_i to (+-1/sqrt(128), ...): every coordinate equal size
    rotated = RandomizedHadamard(128, seed=7).apply(np.eye(128, dtype=np.float32))
    np.testing.assert_allclose(np.abs(rotated), 1 / np.sqrt(128), rtol=1e-6)


def one_hot_bound(dim: int) -> float:
    """What the two-stage construction guarantees for ``max |apply(e_i)|``.

    With ``p`` the largest power of two ``<= dim`` and ``overlap = 2p - dim`` coordinates
    shared by the two windows: a one-hot permuted into the trailing ``dim - p`` coordinates
    is spread by the second stage alone (every coordinate ``1/sqrt(p)`` or 0); one permuted
    into the leading window becomes ``+-1/sqrt(p)`` on all ``p`` of them, of which the first
    ``dim - p`` are final and the ``overlap`` others feed the second stage, whose outputs are
    then sums of ``overlap`` terms ``+-1/p``. So ``max |coordinate| <= max(1/sqrt(p),
    overlap/p)`` (for dim 96: 1/2). The brief's ``1/sqrt(32)`` for dim 96 is the typical
    size, not a bound: it depends on the signs (seed 0 reaches 0.1875).
    """
    p = 1 << (dim.bit_length() - 1)
    if p == dim:
        return 1 / np.sqrt(dim)
    return max(1 / np.sqrt(p), (2 * p - dim) / p)


@given(dim=st.sampled_from([3, 80, 96, 112, 200, 300]), seed=seeds)
def test_randomized_hadamard_spreads_one_hot(dim, seed):
    rotation = RandomizedHadamard(dim, seed=seed)
    rotated = np.abs(rotation.apply(np.eye(dim, dtype=np.float32)).astype(np.float64))
    assert rotated.max() <= one_hot_bound(dim) * (1 + 1e-6)
    p = rotation.block
    landed = np.argsort(rotation.permutation)  # input i sits at landed[i] after permuting
    in_tail_only = landed >= p
    # tail-only inputs: zero on the leading dim - p coordinates, 1/sqrt(p) on the rest
    np.testing.assert_allclose(rotated[in_tail_only, : dim - p], 0.0, atol=1e-7)
    np.testing.assert_allclose(rotated[in_tail_only, dim - p :], 1 / np.sqrt(p), rtol=1e-6)
    # inputs in the leading window: the leading dim - p coordinates are final, 1/sqrt(p)
    np.testing.assert_allclose(rotated[~in_tail_only, : dim - p], 1 / np.sqrt(p), rtol=1e-6)


def test_randomized_hadamard_96_one_hot_bound():
    # dim 96, p = 64, overlap 32: the guarantee is 1/2; for seed 0 the largest coordinate of a
    # rotated one-hot is 0.1875 (12/64), above 1/sqrt(32) = 0.177, and at least 1/sqrt(64)
    rotated = np.abs(RandomizedHadamard(96, seed=0).apply(np.eye(96, dtype=np.float32)))
    assert one_hot_bound(96) == 0.5
    assert 1 / np.sqrt(64) * (1 - 1e-6) <= rotated.max() <= 0.5
    assert np.all(rotated.max(axis=1) >= 1 / np.sqrt(64) * (1 - 1e-6))


# ------------------------------------------------------------------------------------------
# errors


ALL_KINDS = (
    lambda: Hadamard(16),
    lambda: RandomizedHadamard(16, seed=1),
    lambda: RandomizedHadamard(96, seed=1),
    lambda: RandomOrthogonal(16, seed=1),
)


@pytest.mark.parametrize("make", ALL_KINDS)
def test_apply_errors_name_the_argument(make):
    rotation = make()
    dim = rotation.dim
    good = np.ones((2, dim), dtype=np.float32)
    with pytest.raises(ValueError, match="x must have last dimension"):
        rotation.apply(np.ones((2, dim + 1), dtype=np.float32))
    nan = good.copy()
    nan[1, 3] = np.nan
    with pytest.raises(ValueError, match="x contains NaN"):
        rotation.apply(nan)
    with pytest.raises(TypeError, match="x must be float16, float32 or float64"):
        rotation.apply(np.ones((2, dim), dtype=np.int32))
    with pytest.raises(ValueError, match="x is empty"):
        rotation.apply(np.ones((0, dim), dtype=np.float32))
    with pytest.raises(ValueError, match="backend must be one of"):
        rotation.apply(good, backend="torch")
    with pytest.raises(ValueError, match="needs CuPy input"):
        rotation.apply(good, backend="cupy")


@pytest.mark.parametrize("make", ALL_KINDS)
def test_inverse_errors_name_the_argument(make):
    rotation = make()
    dim = rotation.dim
    with pytest.raises(ValueError, match="y must have last dimension"):
        rotation.inverse(np.ones((2, dim - 1), dtype=np.float32))
    nan = np.ones((2, dim), dtype=np.float32)
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="y contains NaN"):
        rotation.inverse(nan)
    with pytest.raises(TypeError, match="y must be float16, float32 or float64"):
        rotation.inverse(np.ones((2, dim), dtype=np.int64))
    with pytest.raises(ValueError, match="y is empty"):
        rotation.inverse(np.ones((0, dim), dtype=np.float32))


@pytest.mark.parametrize("dim", [3, 12, 96, 100])
def test_hadamard_needs_power_of_two_dim(dim):
    with pytest.raises(ValueError, match="dim to be a power of two"):
        Hadamard(dim)


@pytest.mark.parametrize("make", [Hadamard, RandomizedHadamard, RandomOrthogonal])
def test_bad_dim(make):
    with pytest.raises(ValueError, match="dim must be >= 1"):
        make(0)
    with pytest.raises(TypeError, match="dim must be an integer"):
        make(16.0)


@pytest.mark.parametrize("make", [RandomizedHadamard, RandomOrthogonal])
def test_negative_seed(make):
    with pytest.raises(ValueError, match="seed must be >= 0"):
        make(16, seed=-1)
    with pytest.raises(TypeError, match="seed must be an integer"):
        make(16, seed=1.5)


@pytest.mark.parametrize(
    "start,size,signs_size", [(0, 3, 3), (-1, 4, 4), (6, 4, 4), (0, 4, 2)]
)
def test_numba_hadamard_segment_rejects_bad_segment(start, size, signs_size):
    stage = implementation("hadamard_segment", "numba")
    x = np.ones((2, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="segment|signs"):
        stage(x, start, size, np.ones(signs_size, dtype=np.float32), False)


@given(dim=randomized_dims, seed=seeds, rows=st.integers(0, 600), data_seed=data_seeds)
def test_numba_randomized_hadamard_is_bit_exact_with_the_stages(dim, seed, rows, data_seed):
    # the fused one-pass kernel does the staged reference's float32 operations in its order;
    # rows up to 600 cross the kernel's 256-row tasks
    rotation = RandomizedHadamard(dim, seed=seed)
    fused = implementation("randomized_hadamard", "numba")
    x = sample_rows((rows, dim), data_seed)
    for inverse in (False, True):
        expected = randomized_hadamard_staged(x, rotation.permutation, rotation.head_signs,
                                              rotation.tail_signs, inverse)
        got = fused(x, rotation.permutation, rotation.head_signs, rotation.tail_signs, inverse)
        assert got.shape == x.shape and got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)


def test_staged_reference_against_dense_stages(rng):
    # independent check of the staged reference: permutation matrix, then two dense stages
    rotation = RandomizedHadamard(24, seed=5)
    p = rotation.block
    permute = np.eye(24)[:, rotation.permutation]             # x @ permute == x[..., perm]
    head, tail = np.eye(24), np.eye(24)
    head[:p, :p] = np.diag(rotation.head_signs) @ scipy.linalg.hadamard(p) / np.sqrt(p)
    tail[-p:, -p:] = np.diag(rotation.tail_signs) @ scipy.linalg.hadamard(p) / np.sqrt(p)
    x = rng.standard_normal((5, 24)).astype(np.float32)
    np.testing.assert_allclose(rotation.apply(x, backend="numpy"), x @ permute @ head @ tail,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("permutation,head,tail,match", [
    (np.arange(12), np.ones(6), np.ones(6), "power-of-two"),
    (np.arange(12), np.ones(8), None, "tail_signs is needed"),
    (np.arange(12), np.ones(8), np.ones(4), "tail_signs must have shape"),
    (np.zeros(12, dtype=np.int64), np.ones(8), np.ones(8), "permutation"),
    (np.arange(11), np.ones(8), np.ones(8), "permutation"),
])
def test_numba_randomized_hadamard_rejects_bad_arguments(permutation, head, tail, match):
    fused = implementation("randomized_hadamard", "numba")
    with pytest.raises(ValueError, match=match):
        fused(np.ones((2, 12), np.float32), permutation, head, tail, False)


# ------------------------------------------------------------------------------------------
# GPU (skipped without a CUDA device and CuPy)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba.cuda"])
def test_gpu_backends_match_reference(backend):
    import cupy

    stage = implementation("hadamard_segment", backend)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1_000_000, 128), dtype=np.float32)
    signs = (1 - 2 * rng.integers(0, 2, 128)).astype(np.float32)
    x_gpu, signs_gpu = cupy.asarray(x), cupy.asarray(signs)
    for inverse in (False, True):
        y = stage(x_gpu, 0, 128, signs_gpu, inverse)
        assert isinstance(y, cupy.ndarray) and y.dtype == cupy.float32
        assert_close_float32(cupy.asnumpy(y), hadamard_segment_reference(x, 0, 128, signs, inverse))
    np.testing.assert_array_equal(cupy.asnumpy(x_gpu), x)
    # odd shapes, every instantiated size, segments inside the row
    for dim, start, size in segment_cases():
        for lead in ((1,), (3, 5), (33,), (2, 1, 7)):
            x = rng.standard_normal((*lead, dim)).astype(np.float32)
            signs = (1 - 2 * rng.integers(0, 2, size)).astype(np.float32)
            for inverse in (False, True):
                y = stage(cupy.asarray(x), start, size, cupy.asarray(signs), inverse)
                assert_close_float32(
                    cupy.asnumpy(y), hadamard_segment_reference(x, start, size, signs, inverse)
                )
    # the rotations end to end on the GPU
    for rotation in (Hadamard(128), RandomizedHadamard(96, seed=2), RandomizedHadamard(300)):
        x = rng.standard_normal((1001, rotation.dim)).astype(np.float32)
        y = rotation.apply(cupy.asarray(x), backend=backend)
        assert_close_float32(cupy.asnumpy(y), rotation.apply(x, backend="numpy"))
        back = rotation.inverse(y, backend=backend)
        np.testing.assert_allclose(cupy.asnumpy(back), x, rtol=1e-5, atol=1e-5)
