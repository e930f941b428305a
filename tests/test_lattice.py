"""D8 / E8 nearest points: truly nearest, on the lattice, the documented tie rules."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from latkv.lattice import e8_short_vectors, is_e8, nearest_d8, nearest_e8


def test_short_vector_counts_and_norms():
    roots, fours = e8_short_vectors(2), e8_short_vectors(4)
    assert roots.shape == (240, 8) and fours.shape == (2160, 8)
    assert is_e8(roots).all() and is_e8(fours).all()
    np.testing.assert_array_equal((roots.astype(np.float64) ** 2).sum(1), 2)
    np.testing.assert_array_equal((fours.astype(np.float64) ** 2).sum(1), 4)
    # the roots span E8 with inner products in {0, +-1, +-2} (an even unimodular lattice)
    gram = roots.astype(np.float64) @ roots.T.astype(np.float64)
    assert set(np.unique(gram)) <= {-2, -1, 0, 1, 2}


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0, 50.0])
def test_nearest_e8_is_nearest_against_the_short_vectors(scale):
    # x_hat is nearest iff no Voronoi-relevant vector v (the 240 roots) gives a closer
    # x_hat + v; the 2160 vectors of norm 4 are checked too
    x = (np.random.default_rng(int(scale * 10)).standard_normal((4000, 8)) * scale).astype(
        np.float32)
    y = nearest_e8(x)
    assert is_e8(y).all()
    distance = ((x.astype(np.float64) - y) ** 2).sum(1)
    for vectors in (e8_short_vectors(2), e8_short_vectors(4)):
        moved = ((x[:, None, :].astype(np.float64) - y[:, None, :] - vectors) ** 2).sum(-1)
        assert (moved >= distance[:, None] - 1e-9 * (1 + distance[:, None])).all()


def test_nearest_d8_is_nearest_and_even():
    x = (np.random.default_rng(1).standard_normal((4000, 8)) * 2).astype(np.float32)
    y = nearest_d8(x)
    assert (y == np.rint(y)).all() and (y.sum(1) % 2 == 0).all()
    # D8's relevant vectors: the 112 integer roots (+-1, +-1, 0, ...)
    roots = e8_short_vectors(2)
    roots = roots[(roots == np.rint(roots)).all(1)]
    distance = ((x - y) ** 2).sum(1)
    moved = ((x[:, None, :] - y[:, None, :] - roots) ** 2).sum(-1)
    assert (moved >= distance[:, None] - 1e-5).all()


def test_mean_squared_error_is_e8s_second_moment():
    # uniform error over the Voronoi cell: E||x - x_hat||^2 / 8 = G(E8) = 0.0716821 (Conway and
    # Sloane, Table 2.3) for the unit-volume lattice; N = 200k groups, standard error ~0.02%
    x = np.random.default_rng(2).uniform(-20, 20, (200000, 8)).astype(np.float32)
    error = ((x.astype(np.float64) - nearest_e8(x)) ** 2).sum(1).mean() / 8
    assert error == pytest.approx(0.0716821, rel=2e-3)


def test_documented_tie_rules():
    # halves round to even; the parity fix moves the first largest error towards x
    assert nearest_d8(np.array([0.5, 0, 0, 0, 0, 0, 0, 0], np.float32)).tolist() == [0] * 8
    assert nearest_d8(np.array([1.5, 0, 0, 0, 0, 0, 0, 0], np.float32)).tolist() == \
        [2, 0, 0, 0, 0, 0, 0, 0]
    odd = np.array([1, 0, 0, 0, 0, 0, 0, 0], np.float32)      # integral, odd sum: +1 on x_0
    assert nearest_d8(odd).tolist() == [2, 0, 0, 0, 0, 0, 0, 0]
    tie = np.array([0.4, -0.4, 0, 0, 0, 0, 0, 1], np.float32)  # sum 1: fix the first 0.4
    assert nearest_d8(tie).tolist() == [1, 0, 0, 0, 0, 0, 0, 1]
    # a point equidistant from D8 and its coset goes to D8: (1/4)*1 is 0.5 from 0 and from 1/2
    quarter = np.full(8, 0.25, np.float32)
    assert nearest_e8(quarter).tolist() == [0.0] * 8


@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 20), st.just(8)),
                  elements=st.floats(-1000, 1000, width=32)))
def test_results_are_lattice_points_for_any_input(x):
    y = nearest_e8(x)
    assert is_e8(y).all()
    assert (np.abs(x - y) <= 1.0).all()  # the covering radius of E8 is 1


def test_bad_inputs():
    with pytest.raises(ValueError, match="last dimension 8"):
        nearest_e8(np.zeros((3, 7), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        nearest_e8(np.full((1, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match="2\\^21"):
        nearest_e8(np.full((1, 8), 3e6, np.float32))
    with pytest.raises(TypeError, match="float"):
        nearest_e8(np.zeros((1, 8), np.int32))


def test_public_functions_dispatch_to_every_cpu_backend():
    x = (np.random.default_rng(5).standard_normal((3, 50, 8)) * 2).astype(np.float32)
    reference = nearest_e8(x, backend="numpy")
    assert reference.shape == x.shape
    for backend in ("numba", "numba.cuda"):
        assert np.array_equal(nearest_e8(x, backend=backend), reference)
        assert np.array_equal(nearest_d8(x, backend=backend), nearest_d8(x, backend="numpy"))
