"""E8Quant: the Voronoi code, the exact nearest codebook point, the rANS streams, the rates."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import latkv
from latkv import e8
from latkv.lattice import is_e8, nearest_e8


def gaussian(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------- Voronoi code


@pytest.mark.parametrize("bits", [1, 2])
def test_voronoi_code_has_one_point_per_label(bits):
    q = 1 << bits
    labels = np.array(list(itertools.product(range(q), repeat=8)), dtype=np.int64)
    points = e8.voronoi_points(labels, bits)
    assert is_e8(points).all()
    assert e8.in_voronoi_code(points, bits).all()
    assert len({p.tobytes() for p in points}) == q ** 8          # 2^(8 b) distinct points
    assert np.array_equal(e8.voronoi_labels(points, bits), labels)
    # the code is the Voronoi cell of q E8: no point lies beyond q times E8's covering
    # radius (1) from the origin, and the shortest vectors are E8's (norm^2 2)
    norms = (points.astype(np.float64) ** 2).sum(axis=1)
    assert norms.max() <= q ** 2 + 1e-9 and np.sort(norms)[1] == 2


def test_voronoi_labels_reduce_any_lattice_point_modulo_q_e8():
    rng = np.random.default_rng(1)
    points = nearest_e8(rng.normal(0, 20, (5000, 8)).astype(np.float32))
    for bits in (2, 3, 5):
        q = 1 << bits
        labels = e8.voronoi_labels(points, bits)
        assert labels.min() >= 0 and labels.max() < q
        code_points = e8.voronoi_points(labels, bits)
        assert e8.in_voronoi_code(code_points, bits).all()
        # same coset of q E8: the difference divided by q is a lattice point
        assert is_e8((points - code_points) / q).all()
        inside = e8.in_voronoi_code(points, bits)
        assert np.array_equal(code_points[inside], points[inside])


def test_generator_is_a_basis_of_e8():
    assert np.linalg.det(e8.GENERATOR) == pytest.approx(1.0)
    assert is_e8(e8.GENERATOR).all()
    assert np.allclose(e8.GENERATOR @ e8.GENERATOR_INVERSE, np.eye(8))


# --------------------------------------------------------------------------- fixed rate


def test_fixed_rate_scale_is_the_first_fitting_rung():
    x = gaussian((300, 64), seed=2)
    for bits in (2, 3):
        _, multipliers = e8.scale_ladder(bits)
        scale, labels = e8.voronoi_encode_reference(x, multipliers, bits)
        groups = x.reshape(300, 8, 8)
        points = nearest_e8(groups / scale[:, None, None])
        assert e8.in_voronoi_code(points, bits).all()             # no group overloads
        assert np.array_equal(e8.voronoi_labels(points, bits).reshape(300, 64), labels)
        base = np.abs(x).max(axis=1).astype(np.float64) / (1 << bits)
        candidates = e8.scale_candidate(base[:, None], multipliers[None, :])  # (300, rungs)

        def documented_search(rows, rung_scales):
            """The docstring's rule, one vector at a time."""
            def fits(i):
                return e8.in_voronoi_code(nearest_e8(rows / rung_scales[i]), bits).all()
            last = len(rung_scales) - 1
            coarse = next((i for i in range(0, last, 8) if fits(i)), last)
            return next((i for i in range(coarse - 7, coarse) if i >= 0 and fits(i)), coarse)

        for i in range(0, 300, 3):
            assert scale[i] == candidates[i, documented_search(groups[i], candidates[i])]
        # the top rung always fits (the ladder's proof)
        top = nearest_e8(groups / candidates[:, -1][:, None, None])
        assert e8.in_voronoi_code(top, bits).all()


def test_fixed_rate_codes_hold_the_exact_nearest_codebook_point():
    """Brute force over all 65536 points of the 2-bit code."""
    bits = 2
    labels = np.array(list(itertools.product(range(4), repeat=8)), dtype=np.int64)
    codebook = e8.voronoi_points(labels, bits).astype(np.float64)
    qz = latkv.E8Quant(dim=16, bits=bits, rotation="none")
    x = gaussian((40, 16), seed=3)
    codes = qz.encode(x)
    scale = codes["scale"].astype(np.float32)
    got = qz.decode(codes).astype(np.float64).reshape(40, 2, 8) / scale[:, None, None]
    targets = (x.reshape(40, 2, 8) / scale[:, None, None]).reshape(-1, 8).astype(np.float64)
    distances = ((targets[:, None, :] - codebook[None]) ** 2).sum(axis=-1)
    nearest = codebook[distances.argmin(axis=1)]
    np.testing.assert_allclose(got.reshape(-1, 8), nearest, atol=1e-5)


def test_fixed_rate_distortion_against_turboquant():
    """The documented figures (docs/methods/e8.md): N(0, 1) rows, dim 128."""
    x = gaussian((4000, 128), seed=0)
    expected = {2: 0.1388, 3: 0.02968, 4: 0.007084}
    for bits, mse in expected.items():
        qz = latkv.E8Quant(dim=128, bits=bits)
        got = float(((qz.decode(qz.encode(x)) - x) ** 2).mean())
        assert got == pytest.approx(mse, rel=0.03)
        turbo = latkv.TurboQuant(dim=128, bits=bits)
        assert qz.bits_per_coordinate == turbo.bits_per_coordinate == bits + 0.125
        turbo_mse = float(((turbo.decode(turbo.encode(x)) - x) ** 2).mean())
        # a Voronoi code pays for shaping at 2 bits and wins from 3 bits on
        assert (got > turbo_mse) if bits == 2 else (got < 0.9 * turbo_mse)


def test_fixed_rate_zero_and_constant_vectors():
    qz = latkv.E8Quant(dim=32, bits=3)
    x = np.zeros((3, 32), np.float32)
    x[1] = 1.5
    x_hat = qz.decode(qz.encode(x))
    assert np.array_equal(x_hat[0], x[0])
    # rotated, a constant vector is one spike that decides the scale of all groups
    assert ((x_hat[1] - 1.5) ** 2).sum() < 0.05 * (x[1] ** 2).sum()


def test_fixed_rate_refuses_values_beyond_a_float16_scale():
    qz = latkv.E8Quant(dim=16, bits=2, rotation="none")
    qz.encode(np.full((1, 16), 3e4, np.float32))
    with pytest.raises(ValueError, match="too large for a float16 scale"):
        qz.encode(np.full((1, 16), 3e5, np.float32))


# --------------------------------------------------------------------------- entropy coded


def test_lattice_symbols_round_trip():
    rng = np.random.default_rng(4)
    points = nearest_e8(rng.normal(0, 6, (3000, 8)).astype(np.float32))
    offset = int(np.abs(points).max() + 0.5)
    coset, coordinates, last, coordinate_contexts, last_contexts = e8.lattice_symbols(
        points, offset)
    assert set(np.unique(coset)) == {0, 1}
    assert coordinates.min() >= 0 and coordinates.max() <= 2 * offset
    assert last.min() >= 0 and last.max() <= 2 * offset
    assert set(np.unique(last_contexts)) <= set(range(3, 7))
    assert np.array_equal(e8.points_from_symbols(coset, coordinates, last, offset), points)


@pytest.mark.parametrize("target", [1.5, 2.5, 3.5])
def test_entropy_rate_meets_the_target_from_below(target):
    x = gaussian((8, 512, 128), seed=5)
    qz = latkv.E8Quant(dim=128, bits=target, entropy=True)
    codes = qz.encode(x)
    rate = 8 * codes.nbytes / x.size
    # the step ladder moves the rate by about 1/64 bit per rung
    assert target - 0.05 <= rate <= target
    assert qz.bits_per_coordinate == target and qz.variable_rate


def test_entropy_coding_is_within_0_2_bits_of_the_shannon_bound():
    """D(R) = 2^(-2R) for N(0, 1); E8's granular gap alone is about 0.15 bits."""
    x = gaussian((8, 1024, 128), seed=6)
    for target in (2.5, 3.0):
        qz = latkv.E8Quant(dim=128, bits=target, entropy=True)
        codes = qz.encode(x)
        rate = 8 * codes.nbytes / x.size
        mse = float(((qz.decode(codes) - x) ** 2).mean())
        gap = rate - 0.5 * np.log2(1 / mse)
        assert 0.1 < gap < 0.2, (target, rate, mse, gap)


def test_entropy_streams_decode_exactly_to_the_nearest_lattice_points():
    x = gaussian((2, 64, 32), seed=7)
    qz = latkv.E8Quant(dim=32, bits=3, entropy=True)
    codes = qz.encode(x)
    rotated = qz.stages()[0].rotate(x, "numpy")
    step = codes["step"].astype(np.float32)
    points = nearest_e8((rotated / step[:, None, None]).reshape(-1, 8))
    estimate = qz.stages()[0].rotated_estimate(dict(codes.arrays), x.shape[:-1], "numpy")
    assert np.array_equal(estimate.reshape(-1, 8), points * np.repeat(step, 64 * 4)[:, None])


def test_entropy_code_refuses_heads_whose_step_passes_float16():
    """At 3 bits the step is about 0.52 x RMS (rung 0): an RMS of 2e5 needs a step past
    65504. Before the check, the step became inf, every point 0, and the codes (a few bytes)
    were refused only at decode. An RMS of 1e3 still encodes and round-trips."""
    x = gaussian((2, 64, 64), seed=11)
    qz = latkv.E8Quant(dim=64, bits=3, entropy=True)
    decoded = qz.decode(qz.encode(1e3 * x))
    assert np.all(np.isfinite(decoded))
    assert np.linalg.norm(decoded - 1e3 * x) < 0.2 * np.linalg.norm(1e3 * x)
    with pytest.raises(ValueError, match="float16 step"):
        qz.encode(2e5 * x)


def test_entropy_codes_refuse_corruption():
    x = gaussian((2, 64, 32), seed=8)
    qz = latkv.E8Quant(dim=32, bits=2, entropy=True)
    codes = qz.encode(x)

    def with_array(name, value):
        arrays = dict(codes.arrays)
        arrays[name] = value
        return latkv.Codes(codes.method, codes.params, codes.shape, codes.dtype, arrays)

    stream = codes["coordinate_stream"]
    with pytest.raises(ValueError, match="coordinate_stream"):
        qz.decode(with_array("coordinate_stream", stream[:-1].copy()))
    with pytest.raises(ValueError, match="coordinate_stream"):
        qz.decode(with_array("coordinate_stream", np.concatenate([stream, stream[:1]])))
    with pytest.raises(ValueError, match="model"):
        qz.decode(with_array("model", codes["model"][:3].copy()))
    with pytest.raises(ValueError, match="step"):
        qz.decode(with_array("step", np.full_like(codes["step"], np.nan)))
    with pytest.raises(ValueError, match="uint8"):
        qz.decode(with_array("last_stream", codes["last_stream"].astype(np.uint16)))


def test_entropy_codes_save_and_load(tmp_path):
    x = gaussian((3, 40, 64), seed=9)
    qz = latkv.E8Quant(dim=64, bits=2.5, entropy=True, center=True)
    codes = qz.encode(x)
    latkv.save(tmp_path / "c.lkv", codes)
    loaded = latkv.load(tmp_path / "c.lkv")
    assert np.array_equal(qz.decode(loaded), qz.decode(codes))
    with pytest.raises(ValueError, match="variable_rate"):
        qz.encoded_nbytes(x.shape)


def test_entropy_mode_is_host_side():
    qz = latkv.E8Quant(dim=16, bits=2, entropy=True)
    assert qz.supported_backends == ("numpy", "numba")
    with pytest.raises(ValueError, match="host-side"):
        qz.encode(gaussian((4, 16)), backend="numba.cuda")
    assert "numba.cuda" in latkv.E8Quant(dim=16, bits=2).supported_backends


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("kwargs, error, match", [
    ({"dim": 12}, ValueError, "multiple of 8"),
    ({"dim": 16, "bits": 1}, ValueError, "bits"),
    ({"dim": 16, "bits": 9}, ValueError, "bits"),
    ({"dim": 16, "bits": 2.5}, TypeError, "bits"),
    ({"dim": 16, "bits": 0.25, "entropy": True}, ValueError, r"\[0.5, 8\]"),
    ({"dim": 16, "bits": "2", "entropy": True}, TypeError, "number"),
    ({"dim": 16, "entropy": 1}, TypeError, "entropy"),
    ({"dim": 16, "rotation": "dense"}, ValueError, "rotation"),
])
def test_bad_parameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        latkv.E8Quant(**kwargs)


def test_spec_round_trip_with_a_fractional_target():
    qz = latkv.quantizer("e8:2.5,entropy=True", dim=128)
    assert qz.bits == 2.5 and latkv.quantizer(qz.spec) == qz
    assert qz.label == "e8:2.5,entropy=True"
    assert latkv.quantizer("e8:3.0,entropy=True", dim=128).bits == 3
