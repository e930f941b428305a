"""PolarQuant: the transform, the angle laws (KS), exact bits, distortion, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st
from scipy import integrate, special

import latkv
from latkv.codebooks import polar_angle_codebook
from latkv.polar import polar_angles, polar_blocks


@given(levels=st.integers(1, 6), seed=st.integers(0, 10**6), rows=st.integers(1, 5))
def test_transform_inverts_exactly(levels, seed, rows):
    x = np.random.default_rng(seed).standard_normal((rows, 3, 1 << levels))
    x[0, 0, :2] = 0.0  # zero pairs and radii
    angles, radius = polar_angles(x, levels)
    assert [a.shape[-1] for a in angles] == [1 << (levels - l) for l in range(1, levels + 1)]
    assert (angles[0] >= 0).all() and (angles[0] < 2 * np.pi).all()
    for psi in angles[1:]:
        assert (psi >= 0).all() and (psi <= np.pi / 2).all()
    np.testing.assert_allclose(radius, np.linalg.norm(x, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(polar_blocks(angles, radius), x, atol=1e-12)


def test_angles_of_preconditioned_gaussian_data_follow_the_analytic_laws():
    # Kolmogorov-Smirnov against the level-1 uniform law and the sin^(k-1)(2 psi) laws, on
    # the quantizer's own preconditioning of Gaussian data. Angles at one level come from
    # disjoint coordinates, hence independent; critical value at alpha = 0.001: 1.95 / sqrt(N)
    qz = latkv.PolarQuant(dim=128, levels=4, seed=3)
    x = np.random.default_rng(0).standard_normal((2000, 128)).astype(np.float32)
    rotated = qz.stages()[0].rotation.apply(x).astype(np.float64).reshape(2000, -1, 16)
    angles, _ = polar_angles(rotated, 4)
    for level, angle in enumerate(angles, start=1):
        sample = np.sort(angle[:, :, 0].ravel())  # one angle per block: independent draws
        if level == 1:
            cdf = sample / (2 * np.pi)
        else:
            half = 2.0 ** (level - 1) / 2
            cdf = special.betainc(half, half, np.sin(sample) ** 2)
        n = sample.size
        statistic = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
        assert statistic < 1.95 / np.sqrt(n), (level, statistic)


@pytest.mark.parametrize("level,bits", [(2, 2), (3, 3), (4, 2), (5, 4)])
def test_angle_codebooks_satisfy_the_lloyd_max_conditions(level, bits):
    book = polar_angle_codebook(level, bits)
    k = 2 ** (level - 1)
    norm = 2 / special.beta(k / 2, k / 2)

    def density(t):
        return norm * (np.sin(t) * np.cos(t)) ** (k - 1)

    c = book.centroids.astype(np.float64)
    edges = np.concatenate([[0.0], book.boundaries.astype(np.float64), [np.pi / 2]])
    np.testing.assert_allclose(c, np.pi / 2 - c[::-1], atol=1e-6)
    for i in range(c.size):
        mass = integrate.quad(density, edges[i], edges[i + 1])[0]
        moment = integrate.quad(lambda t: t * density(t), edges[i], edges[i + 1])[0]
        assert moment / mass == pytest.approx(c[i], abs=2e-6)


def test_exact_bits_and_sizes():
    qz = latkv.PolarQuant(dim=128)
    assert qz.level_bits == (4, 2, 2, 2)
    assert qz.bits_per_coordinate == (8 * 4 + 4 * 2 + 2 * 2 + 1 * 2 + 16) / 16 == 3.875
    codes = qz.encode(np.random.default_rng(0).standard_normal((3, 5, 128)))
    assert codes.nbytes == 3 * 5 * 62
    assert {k: v.shape for k, v in codes.arrays.items()} == {
        "level1": (3, 5, 32), "level2": (3, 5, 8), "level3": (3, 5, 4), "level4": (3, 5, 2),
        "radius": (3, 5, 8)}
    # a level whose codes do not fill a byte rounds up, and is counted: dim 32 has two
    # 2-bit level-4 angles (4 bits) in one byte
    small = latkv.PolarQuant(dim=32)
    assert small.code_size == 8 + 2 + 1 + 1 + 4
    assert latkv.PolarQuant(dim=64, levels=3, level_bits="3-2-2").code_size == 12 + 4 + 2 + 16


def test_distortion_on_gaussian_data():
    x = np.random.default_rng(1).standard_normal((8000, 128)).astype(np.float32)

    def relative_error(spec):
        qz = latkv.quantizer(spec, dim=128)
        return float(((qz.decode(qz.encode(x)) - x) ** 2).sum() / (x**2).sum())

    polar = relative_error("polar:4")
    # below 3-bit scalar quantization of the same data (groups of 128: 3.25 bits/coord)
    assert polar < 0.8 * relative_error("scalar:3,group=128")
    # measured 0.0321; more bits per level, less error
    assert polar == pytest.approx(0.0321, rel=0.03)
    assert relative_error("polar:4,level_bits=4-3-3-3") < 0.6 * polar


def test_scores_use_the_rotated_domain_and_match_decode():
    rng = np.random.default_rng(2)
    qz = latkv.PolarQuant(dim=64, levels=3, center=True)
    x = rng.standard_normal((2, 40, 64)).astype(np.float32) + 3
    q = rng.standard_normal((2, 5, 64)).astype(np.float32)
    codes = qz.encode(x)
    expected = q @ np.swapaxes(qz.decode(codes), -1, -2)
    np.testing.assert_allclose(qz.scores(q, codes), expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())


def test_spec_strings_round_trip():
    qz = latkv.quantizer("polar:4,level_bits=4-3-3-3", dim=128)
    assert qz.level_bits == (4, 3, 3, 3)
    assert latkv.quantizer(qz.spec) == qz
    assert "level_bits=4-3-3-3" in qz.spec


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of 2\\^levels"):
        latkv.PolarQuant(dim=72, levels=4)
    with pytest.raises(ValueError, match="one width per level"):
        latkv.PolarQuant(dim=64, level_bits=(4, 2))
    with pytest.raises(ValueError, match="level_bits must look like '4-2-2-2'"):
        latkv.PolarQuant(dim=64, level_bits="4-x-2-2")
    with pytest.raises(TypeError, match="level_bits must be a sequence"):
        latkv.PolarQuant(dim=64, level_bits=3.5)
    with pytest.raises(ValueError, match="level_bits"):
        latkv.PolarQuant(dim=64, level_bits=(4, 2, 2, 9))
    with pytest.raises(ValueError, match="levels"):
        latkv.PolarQuant(dim=512, levels=9)
    with pytest.raises(ValueError, match="float16 range \\(65504\\); use radius_dtype=.float32."):
        latkv.PolarQuant(dim=16).encode(np.full((2, 16), 3e4, np.float32))
