"""Lloyd-Max codebooks: optimality conditions, the closed forms, the documented distortions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate

from latkv.codebooks import (lloyd_max, sphere_codebook, sphere_coordinate_cdf,
                             sphere_coordinate_density)


@pytest.mark.parametrize("dim", [2, 5, 64, 128])
def test_density_is_the_coordinate_law_of_a_uniform_unit_vector(dim):
    # integrates to 1, and its CDF matches the empirical CDF of real unit vectors
    total, _ = integrate.quad(sphere_coordinate_density, -1, 1, args=(dim,))
    assert total == pytest.approx(1, abs=1e-8)
    rng = np.random.default_rng(dim)
    x = rng.standard_normal((20000, dim))
    t = (x / np.linalg.norm(x, axis=1, keepdims=True))[:, 0]
    grid = np.linspace(-0.9, 0.9, 19) / np.sqrt(max(dim / 4, 1))
    empirical = (t[:, None] <= grid).mean(axis=0)
    # Kolmogorov-Smirnov scale: 4 / sqrt(N)
    assert np.abs(empirical - sphere_coordinate_cdf(grid, dim)).max() < 4 / np.sqrt(t.size)


@pytest.mark.parametrize("dim,bits", [(2, 3), (3, 2), (64, 4), (128, 1), (128, 8), (1024, 5)])
def test_codebook_satisfies_the_lloyd_max_conditions(dim, bits):
    book = sphere_codebook(dim, bits)
    c = book.centroids.astype(np.float64)
    assert c.shape == (1 << bits,) and (np.diff(c) > 0).all()
    np.testing.assert_allclose(c, -c[::-1], atol=1e-7)
    np.testing.assert_allclose(book.boundaries, (c[1:] + c[:-1]) / 2, rtol=1e-6, atol=1e-9)
    # each centroid is the conditional mean of its cell (numerical quadrature, independent
    # of the closed forms the solver uses)
    edges = np.concatenate([[-1.0], book.boundaries.astype(np.float64), [1.0]])
    for i in range(0, 1 << bits, max(1, (1 << bits) // 8)):
        mass, _ = integrate.quad(sphere_coordinate_density, edges[i], edges[i + 1], args=(dim,),
                                 epsabs=1e-14)
        moment, _ = integrate.quad(lambda t: t * sphere_coordinate_density(t, dim), edges[i],
                                   edges[i + 1], epsabs=1e-14)
        if mass > 1e-10:
            assert moment / mass == pytest.approx(c[i], rel=1e-5, abs=1e-9)


def test_uniform_law_has_the_closed_form_codebook():
    # d = 3: a coordinate of a unit vector is uniform on [-1, 1] (Archimedes), so the b-bit
    # Lloyd-Max codebook is the uniform midpoint grid with distortion 4^-b / 3 per coordinate
    for bits in range(1, 6):
        book = sphere_codebook(3, bits)
        levels = 1 << bits
        expected = -1 + (2 * np.arange(levels) + 1) / levels
        np.testing.assert_allclose(book.centroids, expected, atol=1e-7)
        assert book.distortion == pytest.approx(4.0**-bits / 3, rel=1e-9)


def test_distortions_match_the_turboquant_paper():
    # TurboQuant (arXiv 2504.19874) Theorem 1: D_mse ~ 0.36, 0.117, 0.03, 0.009 for b = 1..4 and
    # D_mse <= sqrt(3) pi / 2 * 4^-b; our exact values at d = 128
    exact = [128 * sphere_codebook(128, b).distortion for b in (1, 2, 3, 4)]
    np.testing.assert_allclose(exact, [0.3609, 0.1160, 0.03397, 0.009315], rtol=2e-3)
    for b, value in zip((1, 2, 3, 4), exact):
        assert value < np.sqrt(3) * np.pi / 2 * 4.0**-b
    # large d: the Gaussian Lloyd-Max figures (Max 1960): 0.3634, 0.1175, 0.03454, 0.009497
    gaussian = [4096 * sphere_codebook(4096, b).distortion for b in (1, 2, 3, 4)]
    np.testing.assert_allclose(gaussian, [0.3634, 0.1175, 0.03454, 0.009497], rtol=2e-3)


def test_lloyd_max_rejects_bad_starts_and_arguments():
    with pytest.raises(ValueError, match="increasing"):
        lloyd_max(lambda t: t, lambda a, b: b - a, lambda a, b: b - a, 1.0, -1, 1,
                  np.array([0.5, 0.1]))
    with pytest.raises(ValueError, match="dim"):
        sphere_codebook(1, 2)
    with pytest.raises(ValueError, match="bits"):
        sphere_codebook(64, 9)
