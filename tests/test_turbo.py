"""TurboQuant: exact sizes, the paper's distortion and unbiasedness theorems, EDEN scales,
outlier splits, channel statistics, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

import latkv
from latkv.codebooks import sphere_codebook


def _unit_vectors(n, dim, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("rotation", ["hadamard", "dense"])
def test_mse_distortion_on_unit_vectors(bits, rotation):
    # Theorem 1: E||x - x_hat||^2 = d * D_b for a uniformly rotated unit vector, and
    # <= sqrt(3) pi / 2 * 4^-b. Uniform unit vectors stay uniform under any fixed rotation.
    x = _unit_vectors(20000, 128, seed=bits)
    qz = latkv.TurboQuant(dim=128, bits=bits, rotation=rotation, seed=1)
    error = ((qz.decode(qz.encode(x)) - x) ** 2).sum(axis=1).mean()
    expected = 128 * sphere_codebook(128, bits).distortion
    assert error == pytest.approx(expected, rel=0.03)
    assert error < np.sqrt(3) * np.pi / 2 * 4.0**-bits


def _prod_estimates(bits, q, x, seeds, rotation="dense"):
    out = []
    for seed in seeds:
        qz = latkv.TurboQuant(dim=x.size, bits=bits, mode="prod", seed=seed, rotation=rotation)
        out.append(float(qz.scores(q, qz.encode(x[None]))[0]))
    return np.array(out)


@pytest.mark.parametrize("bits", [2, 3])
def test_prod_is_unbiased_with_the_papers_variance_bound(bits):
    # Theorem 2 over 2000 seeds (rotation and sketch): E<q, x_hat> = <q, x> and
    # E(<q, x_hat> - <q, x>)^2 <= sqrt(3) pi^2 |q|^2 |x|^2 / d * 4^-b
    rng = np.random.default_rng(bits)
    dim = 64
    x = _unit_vectors(1, dim, seed=10 + bits)[0]
    q = (0.8 * x + 0.2 * rng.standard_normal(dim)).astype(np.float32)
    estimates = _prod_estimates(bits, q, x, range(2000))
    truth = float(q.astype(np.float64) @ x)
    standard_error = estimates.std(ddof=1) / np.sqrt(estimates.size)
    assert abs(estimates.mean() - truth) < 4 * standard_error
    bound = np.sqrt(3) * np.pi**2 * float(q @ q) / dim * 4.0**-bits
    squared = (estimates - truth) ** 2
    assert squared.mean() <= bound + 4 * squared.std(ddof=1) / np.sqrt(squared.size)


def test_mse_inner_products_are_biased_and_prod_fixes_it():
    # the paper's motivation for prod: at 1 bit, mse shrinks inner products by about 2/pi
    x = _unit_vectors(4000, 128, seed=3)
    mse = latkv.TurboQuant(dim=128, bits=1)
    shrink = float(np.mean(np.sum(mse.decode(mse.encode(x)) * x, axis=1)))
    assert shrink == pytest.approx(2 / np.pi, rel=0.02)
    prod = latkv.TurboQuant(dim=128, bits=2, mode="prod")
    ratio = np.sum(prod.decode(prod.encode(x)) * x, axis=1)
    assert abs(ratio.mean() - 1) < 4 * ratio.std(ddof=1) / np.sqrt(ratio.size)


def test_eden_scales():
    x = _unit_vectors(20000, 128, seed=4) * 3.0
    errors, means = {}, {}
    for scale in ("none", "eden", "eden-mse"):
        qz = latkv.TurboQuant(dim=128, bits=2, scale=scale, rotation="dense")
        x_hat = qz.decode(qz.encode(x))
        errors[scale] = ((x_hat - x) ** 2).sum(axis=1).mean() / 9
        means[scale] = np.sum(x_hat * x, axis=1) / 9
    # least-squares scale never increases a vector's error; the unbiased scale trades error
    # for E<x_hat, x> = |x|^2 (EDEN Theorem 2.1)
    assert errors["eden-mse"] <= errors["none"]
    assert errors["eden"] > errors["none"]
    unbiased = means["eden"]
    assert abs(unbiased.mean() - 1) < 4 * unbiased.std(ddof=1) / np.sqrt(unbiased.size) + 2e-3
    assert means["none"].mean() < 0.9


def test_documented_sizes_and_splits():
    assert latkv.TurboQuant(dim=128, bits=4).bits_per_coordinate == 4 + 16 / 128
    assert latkv.TurboQuant(dim=128, bits=3, mode="prod").code_size == 32 + 16 + 4
    # the paper's "2.5-bit" example: 32 channels at 3 bits + 96 at 2 is 2.25 bits of codes
    paper = latkv.TurboQuant(dim=128, bits=2, outlier_channels=32, outlier_bits=3)
    assert paper.code_size == 24 + 2 + 12 + 2 + 32 / 128
    assert (96 * 2 + 32 * 3) / 128 == 2.25
    real = latkv.TurboQuant(dim=128, bits=2, outlier_channels=64, outlier_bits=3)
    assert (real.code_size - 4 - 64 / 128) * 8 / 128 == 2.5
    codes = real.encode(np.random.default_rng(0).standard_normal((2, 128, 128)))
    assert codes.nbytes == 2 * 128 * real.code_size


def test_outlier_channels_are_the_prefill_energy_leaders_and_decode_in_place():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 64, 32)).astype(np.float32)
    x[0, :, 7] *= 30
    x[1, :, [2, 9]] *= 30
    qz = latkv.TurboQuant(dim=32, bits=3, outlier_channels=2, outlier_bits=8)
    codes = qz.encode(x)
    assert 7 in codes["outlier_index"][0] and codes["outlier_index"][1].tolist() == [2, 9]
    x_hat = qz.decode(codes)
    # the 8-bit outlier stage reconstructs the big channels far better than 3 bits could
    assert np.abs(x_hat[1, :, 9] - x[1, :, 9]).max() < 0.05 * np.abs(x[1, :, 9]).max()


@pytest.mark.parametrize("local_stats", [False, True])
def test_channel_statistics_keep_scores_exact(local_stats):
    rng = np.random.default_rng(6)
    offsets = rng.normal(0, 5, 48).astype(np.float32)
    x = rng.standard_normal((3, 50, 48)).astype(np.float32) + offsets
    q = rng.standard_normal((3, 4, 48)).astype(np.float32)
    qz = latkv.TurboQuant(dim=48, bits=3, center=True, channel_scale=True, stats_tokens=16,
                          local_stats=local_stats, outlier_channels=4)
    codes = qz.encode(x)
    assert codes["channel_mean"].shape == ((3, 4, 48) if local_stats else (3, 48))
    expected = q @ np.swapaxes(qz.decode(codes), -1, -2)
    np.testing.assert_allclose(qz.scores(q, codes), expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())
    # centring removes the offsets: far less error than without
    plain = latkv.TurboQuant(dim=48, bits=3)
    plain_error = np.mean((plain.decode(plain.encode(x)) - x) ** 2)
    assert np.mean((qz.decode(codes) - x) ** 2) < 0.2 * plain_error


def test_frozen_statistics_come_from_the_prefill_only():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((40, 16)).astype(np.float32)
    qz = latkv.TurboQuant(dim=16, bits=2, center=True, stats_tokens=8)
    changed = x.copy()
    changed[8:] += 100
    assert np.array_equal(qz.encode(x)["channel_mean"], qz.encode(changed)["channel_mean"])
    np.testing.assert_allclose(qz.encode(x)["channel_mean"], x[:8].mean(axis=0), atol=2e-3)


@given(dim=st.integers(2, 40), bits=st.integers(1, 8), mode=st.sampled_from(["mse", "prod"]),
       seed=st.integers(0, 10**6), tokens=st.integers(1, 12))
def test_scores_equal_decoded_inner_products(dim, bits, mode, seed, tokens):
    rng = np.random.default_rng(seed)
    qz = latkv.TurboQuant(dim=dim, bits=bits, mode=mode, seed=seed)
    x = rng.standard_normal((2, tokens, dim)).astype(np.float32)
    q = rng.standard_normal((2, 3, dim)).astype(np.float32)
    codes = qz.encode(x)
    expected = q @ np.swapaxes(qz.decode(codes), -1, -2)
    np.testing.assert_allclose(qz.scores(q, codes), expected, rtol=1e-4,
                               atol=1e-4 * (np.abs(expected).max() + 1e-6))


def test_zero_vectors_decode_to_zero():
    qz = latkv.TurboQuant(dim=16, bits=3, mode="prod")
    assert np.array_equal(qz.decode(qz.encode(np.zeros((3, 16), np.float32))), np.zeros((3, 16)))


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="bits"):
        latkv.TurboQuant(dim=64, bits=0)
    with pytest.raises(ValueError, match="mode"):
        latkv.TurboQuant(dim=64, mode="fast")
    with pytest.raises(ValueError, match="scale"):
        latkv.TurboQuant(dim=64, mode="prod", scale="eden")
    with pytest.raises(ValueError, match="outlier_channels"):
        latkv.TurboQuant(dim=64, outlier_channels=63)
    with pytest.raises(ValueError, match="dim"):
        latkv.TurboQuant(dim=1)
    with pytest.raises(ValueError, match="float16 range \\(65504\\); scale the input"):
        latkv.TurboQuant(dim=8).encode(np.full((2, 8), 3e4, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        latkv.TurboQuant(dim=8).encode(np.full((2, 8), np.nan, np.float32))
    qz = latkv.TurboQuant(dim=8, bits=2)
    other = latkv.TurboQuant(dim=8, bits=3)
    with pytest.raises(ValueError, match="not by this quantizer"):
        other.decode(qz.encode(np.ones((2, 8), np.float32)))
