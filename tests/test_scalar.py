"""ScalarQuant: the half-step error bound, exact sizes, scores without decoding, KIVI layout."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import latkv
from latkv.scalar import scale_and_zero

finite32 = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@given(bits=st.integers(1, 8), group=st.integers(1, 24), axis=st.sampled_from(["token", "channel"]),
       x=hnp.arrays(np.float32, st.tuples(st.integers(1, 9), st.just(24)), elements=finite32),
       backend=st.sampled_from(["numpy", "numba"]))
def test_error_never_exceeds_half_a_step(bits, group, axis, x, backend):
    qz = latkv.ScalarQuant(dim=24, bits=bits, group=group, axis=axis)
    codes = qz.encode(x, backend=backend)
    x_hat = qz.decode(codes, backend=backend)
    step = qz._expanded(codes["scale"], x.shape)
    # half a step of the stored fp16 scale, plus float32 rounding of x - zero and c*s + zero
    tolerance = step / 2 + 4 * np.finfo(np.float32).eps * (np.abs(x) + step * (2**bits))
    assert (np.abs(x_hat - x) <= tolerance).all()


@given(bits=st.integers(1, 8), group=st.integers(1, 24), axis=st.sampled_from(["token", "channel"]),
       x=hnp.arrays(np.float32, st.tuples(st.integers(1, 9), st.just(24)),
                    elements=st.sampled_from([0.0, -0.0, 1e-7, -3e-6, 0.1, -2.5, 6e4])
                    | finite32))
def test_numba_writes_the_reference_bits(bits, group, axis, x):
    # every byte of codes, scales and zeros, signed zeros and fp16 subnormals included
    qz = latkv.ScalarQuant(dim=24, bits=bits, group=group, axis=axis)
    try:
        reference = qz.encode(x, backend="numpy")
    except ValueError as error:  # a group range beyond float16: both refuse alike
        with pytest.raises(ValueError, match=re.escape(str(error))):
            qz.encode(x, backend="numba")
        return
    fast = qz.encode(x, backend="numba")
    for key, array in reference.arrays.items():
        assert fast[key].dtype == array.dtype
        assert fast[key].tobytes() == array.tobytes(), key


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_ranges_beyond_float16_are_refused(backend, axis):
    qz = latkv.ScalarQuant(dim=2, bits=1, group=2, axis=axis)
    # both values are float16 numbers, but the step (max - min) / 1 is not
    wide = np.array([[-60000.0, 60000.0], [60000.0, -60000.0]], np.float32)
    with pytest.raises(ValueError, match="ranges beyond float16"):
        qz.encode(wide, backend=backend)
    with pytest.raises(ValueError, match="beyond the float16 range"):
        qz.encode(np.array([[1e5, 0.0], [0.0, 0.0]], np.float32), backend=backend)


def test_small_inputs_use_serial_kernels_with_their_own_cache_entries():
    # numba names cache entries after the function's qualified name: a serial clone under the
    # same name was loaded for the parallel kernel too, silently running it on one thread
    from latkv._cpu import hadamard, serial
    from latkv._cpu import scalar as kernels

    for kernel in (kernels._encode_token, kernels._encode_channel, kernels._unpack_dequantize,
                   hadamard._randomized_hadamard_rows, hadamard._hadamard_segment_rows):
        clone = serial.kernel_for(kernel, 1)
        assert serial.kernel_for(kernel, serial.SERIAL_BELOW) is kernel
        assert kernel.targetoptions.get("parallel") and not clone.targetoptions.get("parallel")
        assert clone.py_func.__qualname__ != kernel.py_func.__qualname__


def test_group_range_is_covered_by_the_grid():
    # min and max that are not fp16 numbers: the zero rounds down, the scale up
    minimum = np.array([0.1, -3.3, 1e-5, 7.0], dtype=np.float32)
    maximum = np.array([0.7, 2.9, 1e-5, 7.0], dtype=np.float32)
    for bits in range(1, 9):
        scale, zero = scale_and_zero(minimum, maximum, bits)
        assert scale.dtype == np.float16 and zero.dtype == np.float16
        assert (zero.astype(np.float32) <= minimum).all()
        top = zero.astype(np.float64) + scale.astype(np.float64) * (2**bits - 1)
        assert (top >= maximum).all()


def test_constant_group_decodes_exactly():
    qz = latkv.ScalarQuant(dim=8, bits=2, group=8)
    x = np.full((3, 8), 0.5, dtype=np.float32)  # 0.5 is an fp16 number: scale 0, error 0
    assert np.array_equal(qz.decode(qz.encode(x)), x)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_tiny_ranges_keep_a_nonzero_step(backend):
    # min = max = 1e-45 (float32 subnormal): the zero rounds down to 0 and (1e-45 - 0) / 3
    # underflows to 0 in float32; the scale must still reach 1e-45, so it is 2**-24
    qz = latkv.ScalarQuant(dim=4, bits=2, group=1)
    x = np.full((1, 4), 1e-45, dtype=np.float32)
    codes = qz.encode(x, backend=backend)
    assert (codes["scale"] == np.float16(2.0**-24)).all() and (codes["zero"] == 0).all()
    assert (np.abs(qz.decode(codes) - x) <= 2.0**-25).all()


def test_sizes_match_the_kivi_formulas():
    # per token: ceil(128*4/8) = 64 bytes of codes + 4 groups * (2 + 2) bytes = 80
    assert latkv.ScalarQuant(dim=128, bits=4, group=32).code_size == 80
    assert latkv.ScalarQuant(dim=128, bits=4, group=32).bits_per_coordinate == 5.0
    assert latkv.ScalarQuant(dim=128, bits=2, group=128).bits_per_coordinate == 2.25
    # 3 bits in dim 96: 36 bytes of codes; groups of 64 -> 2 groups (the last one of 32)
    assert latkv.ScalarQuant(dim=96, bits=3, group=64).code_size == 36 + 8
    # per channel, 32 tokens a group: 64 + 4 * 128 / 32 bytes per token
    channel = latkv.ScalarQuant(dim=128, bits=4, group=32, axis="channel")
    assert channel.code_size == 80.0
    x = np.ones((2, 33, 128), dtype=np.float32)  # 33 tokens -> 2 token groups
    assert channel.encode(x).nbytes == 2 * (33 * 64 + 2 * 128 * 4)


@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("dim,group", [(64, 32), (80, 32), (7, 3)])
def test_scores_equal_q_dot_decoded(axis, dim, group, rng):
    qz = latkv.ScalarQuant(dim=dim, bits=3, group=group, axis=axis)
    x = rng.standard_normal((2, 3, 41, dim)).astype(np.float32)
    codes = qz.encode(x)
    x_hat = qz.decode(codes).astype(np.float64)
    q = rng.standard_normal((2, 3, 5, dim)).astype(np.float32)
    expected = q.astype(np.float64) @ np.swapaxes(x_hat, -1, -2)
    got = qz.scores(q, codes)
    assert got.shape == (2, 3, 5, 41) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # one query vector against codes of (n, dim)
    single = qz.encode(x[0, 0])
    np.testing.assert_allclose(qz.scores(q[0, 0, 0], single),
                               qz.decode(single).astype(np.float64) @ q[0, 0, 0], rtol=1e-4,
                               atol=1e-4)
    # broadcasting a query head group over KV heads: (3, m, d) against codes (2, 3, n, d)
    broadcast = qz.scores(q[0], codes)
    np.testing.assert_allclose(broadcast, q[0].astype(np.float64) @ np.swapaxes(x_hat, -1, -2),
                               rtol=1e-4, atol=1e-3)


def test_channel_axis_groups_tokens_per_channel(rng):
    # a per-channel offset is removed by per-channel groups but not by per-token ones
    x = rng.standard_normal((256, 64)).astype(np.float32)
    x[:, 5] += 40.0
    token = latkv.ScalarQuant(dim=64, bits=2, group=64, axis="token")
    channel = latkv.ScalarQuant(dim=64, bits=2, group=64, axis="channel")
    error_token = np.mean((token.decode(token.encode(x)) - x) ** 2)
    error_channel = np.mean((channel.decode(channel.encode(x)) - x) ** 2)
    assert error_channel < 0.1 * error_token


def test_quality_improves_with_bits(rng):
    x = rng.standard_normal((512, 128)).astype(np.float32)
    errors = []
    for bits in range(1, 9):
        qz = latkv.ScalarQuant(dim=128, bits=bits, group=32)
        errors.append(np.mean((qz.decode(qz.encode(x)) - x) ** 2) / np.mean(x**2))
    assert all(b < a for a, b in zip(errors, errors[1:]))
    # uniform quantizer of a Gaussian over its group range: each bit cuts MSE by about 4x
    assert 2.5 < errors[3] / errors[4] < 5.5


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 0}, "bits"), ({"bits": 9}, "bits"), ({"bits": 2.5}, "bits"),
    ({"group": 0}, "group"), ({"group": 65}, "group"), ({"axis": "head"}, "axis"),
    ({"dim": 0}, "dim"),
])
def test_bad_parameters(kwargs, match):
    arguments = {"dim": 64, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        latkv.ScalarQuant(**arguments)


def test_bad_inputs(rng):
    qz = latkv.ScalarQuant(dim=64, bits=4)
    with pytest.raises(ValueError, match="last dimension 64"):
        qz.encode(np.zeros((3, 32), dtype=np.float32))
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        qz.encode(np.zeros((3, 64), dtype=np.int32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        qz.encode(np.full((3, 64), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        qz.encode(np.full((3, 64), np.inf, dtype=np.float32))
    with pytest.raises(ValueError, match="empty"):
        qz.encode(np.zeros((0, 64), dtype=np.float32))
    with pytest.raises(ValueError, match="float16"):
        qz.encode(np.full((3, 64), 1e6, dtype=np.float32))
    with pytest.raises(ValueError, match="tokens, dim|at least 2 axes"):
        latkv.ScalarQuant(dim=64, axis="channel").encode(np.zeros(64, dtype=np.float32))
    codes = qz.encode(rng.standard_normal((3, 64)).astype(np.float32))
    with pytest.raises(ValueError, match="were made by"):
        latkv.ScalarQuant(dim=64, bits=3).decode(codes)
    with pytest.raises(TypeError, match="latkv.Codes"):
        qz.decode(codes["packed"])
    with pytest.raises(ValueError, match="last dimension 64"):
        qz.scores(np.zeros((2, 32), dtype=np.float32), codes)
