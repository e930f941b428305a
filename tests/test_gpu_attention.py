"""The CuPy codebook attention kernel (``cuda_kernels/attention.cu``) against the reference.

`latkv._gpu.cupy_attention.codebook_attention` must return the partials of
`latkv.attention.codebook_attention_reference` (run on ``cupy.asnumpy`` of the same inputs) to
float32 rounding; every test that launches it is marked ``gpu`` and skipped without a device.
The argument checks run everywhere (they look at shapes and dtypes only).

Tolerance. Both sides compute in float32 but add in different orders (BLAS against the
kernel's per-thread sums), and ``expf`` may differ from NumPy's ``exp`` by an ulp or two, so
the comparison is relative to the *size of the terms* rather than of the result (the value
sums cancel, and a logit error ``e`` becomes a relative weight error ``e``). With ``u = 2**-24``
and ``|s|_n = |scale| (|key_factor_n| sum_j |q_j c_j| + |offset|)`` (float64), a float32 dot
product of ``dim`` terms followed by the three float32 steps of the logit is off by at most
``(dim + 3) u |s|_n`` (``8e-6`` of ``|s|_n`` at dim 128) on each side, so

* ``|maximum - maximum_ref| <= RTOL max_n |s|_n``,
* a weight ``exp(s_n - max)`` is off by a relative ``RTOL (1 + |s|_n + max_n |s|_n)`` (the
  logit errors, the rounding of the difference; the ``1`` covers ``expf`` and the sums),
* ``|total - total_ref| <= RTOL sum_n w_n (1 + |s|_n + max |s|)`` and
  ``|acc_j - acc_ref_j| <= RTOL sum_n w_n (1 + |s|_n + max |s|) |v_nj|``,

with ``RTOL = 2e-5``: twice the worst case of one side at dim 128, and far above the errors
seen in practice (a few ulps), while a wrong code, token, factor or block gives errors of
order 1 of these bounds. The large-logit tests (``scale = 10``) keep ``|s|`` in the tens, where
the weights span many orders of magnitude.
"""

from __future__ import annotations

import numpy as np
import pytest

from latkv.attention import codebook_attention_reference
from latkv.packing import pack_bits_reference, packed_length
from latkv.turbo import codebook_dequantize_reference

RTOL = 2e-5


def packed_codes(heads: int, tokens: int, dim: int, bits: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Random packed codes ``(heads, tokens, ceil(dim * bits / 8))`` with random padding bits
    (the kernel must ignore them)."""
    codes = rng.integers(0, 1 << bits, size=(heads, tokens, dim), dtype=np.uint8)
    packed = pack_bits_reference(codes, bits)
    padding = packed_length(dim, bits) * 8 - dim * bits
    if padding:
        junk = rng.integers(0, 256, size=(heads, tokens), dtype=np.uint8)
        packed[..., -1] |= junk & np.uint8((0xFF << (8 - padding)) & 0xFF)
    return packed


def attention_inputs(rng: np.random.Generator, *, heads: int = 2, blocks: int = 3,
                     block: int = 16, m: int = 4, dim: int = 64, key_bits: int = 4,
                     value_bits: int = 4, per_block_query: bool = False,
                     per_block_offset: bool = False, scale: float | None = None,
                     zero_factors: bool = True) -> dict:
    """Keyword arguments of ``codebook_attention`` (NumPy arrays) with random contents.

    Centroids are sorted normals of the size of a unit vector's coordinates, factors are
    uniform in [0.5, 2] with some exact zeros (``zero_factors``), the queries are normal,
    the offsets normal; ``scale`` defaults to ``1 / sqrt(dim)``.
    """
    tokens = blocks * block

    def factors() -> np.ndarray:
        values = rng.uniform(0.5, 2.0, size=(heads, tokens)).astype(np.float32)
        if zero_factors:
            values[rng.random((heads, tokens)) < 0.1] = 0.0
        return values

    def centroids(bits: int) -> np.ndarray:
        return np.sort(rng.standard_normal(1 << bits) * 2 / np.sqrt(dim)).astype(np.float32)

    return dict(
        q_key=rng.standard_normal((heads, blocks if per_block_query else 1, m, dim)).astype(
            np.float32),
        key_packed=packed_codes(heads, tokens, dim, key_bits, rng),
        key_factor=factors(),
        key_centroids=centroids(key_bits),
        key_bits=key_bits,
        key_offset=rng.standard_normal((heads, blocks if per_block_offset else 1, m)).astype(
            np.float32),
        value_packed=packed_codes(heads, tokens, dim, value_bits, rng),
        value_factor=factors(),
        value_centroids=centroids(value_bits),
        value_bits=value_bits,
        dim=dim,
        block=block,
        scale=float(1 / np.sqrt(dim)) if scale is None else float(scale),
    )


def partial_tolerances(inputs: dict, rtol: float = RTOL) -> tuple[np.ndarray, ...]:
    """Allowed absolute errors of ``(acc, maximum, total)`` (the bounds of the module
    docstring), computed in float64 from NumPy ``inputs``."""
    heads, tokens, _ = inputs["key_packed"].shape
    dim, block = inputs["dim"], inputs["block"]
    blocks = tokens // block
    k_hat = codebook_dequantize_reference(
        inputs["key_packed"].reshape(heads * tokens, -1), inputs["key_centroids"],
        inputs["key_bits"], dim).astype(np.float64).reshape(heads, blocks, block, dim)
    v_hat = codebook_dequantize_reference(
        inputs["value_packed"].reshape(heads * tokens, -1), inputs["value_centroids"],
        inputs["value_bits"], dim).astype(np.float64).reshape(heads, blocks, block, dim)
    v_hat *= inputs["value_factor"].astype(np.float64).reshape(heads, blocks, block, 1)
    q = inputs["q_key"].astype(np.float64)
    key_factor = inputs["key_factor"].astype(np.float64).reshape(heads, blocks, 1, block)
    offset = inputs["key_offset"].astype(np.float64)[..., None]
    scale = abs(inputs["scale"])
    logits = (q @ np.swapaxes(k_hat, -1, -2) * key_factor + offset) * inputs["scale"]
    size = scale * (np.abs(q) @ np.swapaxes(np.abs(k_hat), -1, -2) * np.abs(key_factor)
                    + np.abs(offset))                                    # |s|_n
    largest = size.max(axis=-1, keepdims=True)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    spread = weights * (1.0 + size + largest)
    return (rtol * (spread @ np.abs(v_hat)), rtol * largest[..., 0],
            rtol * spread.sum(axis=-1))


def assert_partials_close(got: tuple, inputs: dict, rtol: float = RTOL) -> None:
    """``got = (acc, maximum, total)`` (NumPy) within `partial_tolerances` of the reference."""
    expected = codebook_attention_reference(**inputs)
    tolerances = partial_tolerances(inputs, rtol)
    for name, value, reference, tolerance in zip(("acc", "maximum", "total"), got, expected,
                                                 tolerances):
        assert value.dtype == np.float32, name
        assert value.shape == reference.shape, (name, value.shape, reference.shape)
        assert np.all(np.isfinite(value)), name
        error = np.abs(value.astype(np.float64) - reference.astype(np.float64))
        worst = np.unravel_index(np.argmax(error - tolerance), error.shape)
        assert np.all(error <= tolerance + 1e-30), (
            f"{name}: error {error[worst]:.3g} > tolerance {tolerance[worst]:.3g} at {worst} "
            f"(got {value[worst]!r}, reference {reference[worst]!r})")


def run_cupy(inputs: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CuPy kernel on device copies of ``inputs``, results back on the host."""
    import cupy

    from latkv._gpu.cupy_attention import codebook_attention

    arguments = {key: cupy.asarray(value) if isinstance(value, np.ndarray) else value
                 for key, value in inputs.items()}
    result = codebook_attention(**arguments)
    assert all(isinstance(x, cupy.ndarray) for x in result)
    return tuple(cupy.asnumpy(x) for x in result)


def reference_inputs(inputs: dict) -> dict:
    """``inputs`` as the reference sees them in the tests: NumPy copies of device arrays."""
    import cupy

    return {key: cupy.asnumpy(cupy.asarray(value)) if isinstance(value, np.ndarray) else value
            for key, value in inputs.items()}


def check_against_reference(inputs: dict) -> None:
    assert_partials_close(run_cupy(inputs), reference_inputs(inputs))


BIT_PAIRS = [(1, 1), (2, 2), (3, 3), (4, 4), (4, 2), (8, 8), (5, 7), (3, 2), (8, 4), (2, 6)]


@pytest.mark.gpu
@pytest.mark.parametrize("key_bits,value_bits", BIT_PAIRS)
@pytest.mark.parametrize("dim", [8, 64, 72, 128, 13])
def test_matches_reference_over_bits_and_dims(key_bits, value_bits, dim, rng):
    inputs = attention_inputs(rng, heads=2, blocks=3, block=16, m=4, dim=dim,
                              key_bits=key_bits, value_bits=value_bits)
    check_against_reference(inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("block", [1, 16, 128, 256, 300, 600])
@pytest.mark.parametrize("m", [1, 3, 4, 9, 16])
def test_matches_reference_over_blocks_and_queries(block, m, rng):
    # 300 and 600 tokens: more than one chunk of 256 threads (online rescaling)
    blocks = 2 if block >= 256 else 3
    inputs = attention_inputs(rng, heads=2, blocks=blocks, block=block, m=m, dim=64,
                              key_bits=3, value_bits=3)
    check_against_reference(inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("per_block_query", [False, True])
@pytest.mark.parametrize("per_block_offset", [False, True])
@pytest.mark.parametrize("key_bits,value_bits", [(4, 4), (5, 7)])
def test_shared_and_per_block_queries_and_offsets(per_block_query, per_block_offset,
                                                  key_bits, value_bits, rng):
    inputs = attention_inputs(rng, heads=3, blocks=4, block=16, m=4, dim=64,
                              key_bits=key_bits, value_bits=value_bits,
                              per_block_query=per_block_query,
                              per_block_offset=per_block_offset)
    check_against_reference(inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("key_bits,value_bits", [(2, 2), (4, 4), (8, 8), (5, 7)])
@pytest.mark.parametrize("block", [16, 600])
def test_large_logits(key_bits, value_bits, block, rng):
    # scale 10: logits in the tens, most weights underflow against the block's maximum
    inputs = attention_inputs(rng, heads=2, blocks=2, block=block, m=4, dim=64,
                              key_bits=key_bits, value_bits=value_bits, scale=10.0)
    check_against_reference(inputs)


@pytest.mark.gpu
def test_zero_factors(rng):
    inputs = attention_inputs(rng, heads=2, blocks=2, block=16, m=4, dim=64)
    inputs["key_factor"][0] = 0.0            # head 0: every logit is offset * scale
    inputs["value_factor"][1, :16] = 0.0     # head 1, block 0: acc is exactly 0
    acc, maximum, total = run_cupy(inputs)
    assert np.all(acc[1, 0] == 0.0)
    np.testing.assert_array_equal(total[0], np.float32(16.0))
    np.testing.assert_array_equal(
        maximum[0], np.broadcast_to(inputs["key_offset"][0] * np.float32(inputs["scale"]),
                                    maximum[0].shape))
    assert_partials_close((acc, maximum, total), inputs)


@pytest.mark.gpu
def test_dim_above_the_staged_chunk(rng):
    # dim 300 > ATTENTION_DIM_CHUNK = 256: the queries are staged in two parts per chunk
    inputs = attention_inputs(rng, heads=1, blocks=2, block=300, m=5, dim=300, key_bits=3,
                              value_bits=5)
    check_against_reference(inputs)


@pytest.mark.gpu
def test_large_shape(rng):
    inputs = attention_inputs(rng, heads=16, blocks=32, block=256, m=8, dim=128, key_bits=4,
                              value_bits=4, per_block_offset=True)
    check_against_reference(inputs)


@pytest.mark.gpu
def test_grid_smaller_than_the_pairs(monkeypatch, rng):
    from latkv._gpu import cupy_attention

    monkeypatch.setattr(cupy_attention, "MAX_BLOCKS", 3)      # grid-stride over 8 pairs
    inputs = attention_inputs(rng, heads=2, blocks=4, block=16, m=4, dim=64)
    check_against_reference(inputs)


@pytest.mark.gpu
def test_converts_dtypes_and_layouts(rng):
    import cupy

    from latkv._gpu.cupy_attention import codebook_attention

    inputs = attention_inputs(rng, heads=2, blocks=2, block=16, m=4, dim=64)
    device = {key: cupy.asarray(value) if isinstance(value, np.ndarray) else value
              for key, value in inputs.items()}
    # the same values as float64, Fortran order and a strided view: converted, not misread
    device["q_key"] = device["q_key"].astype(cupy.float64)
    device["value_centroids"] = device["value_centroids"].astype(cupy.float64)
    device["key_factor"] = cupy.asfortranarray(device["key_factor"])
    packed = cupy.zeros((2, 32, 2 * 32), dtype=cupy.uint8)
    packed[:, :, ::2] = device["key_packed"]
    device["key_packed"] = packed[:, :, ::2]
    got = tuple(cupy.asnumpy(x) for x in codebook_attention(**device))
    assert_partials_close(got, inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("heads,blocks,m", [(0, 2, 4), (2, 0, 4), (2, 2, 0)])
def test_empty_inputs(heads, blocks, m, rng):
    inputs = attention_inputs(rng, heads=heads, blocks=blocks, block=16, m=m, dim=64)
    acc, maximum, total = run_cupy(inputs)
    assert acc.shape == (heads, blocks, m, 64)
    assert maximum.shape == total.shape == (heads, blocks, m)


def _argument_cases(rng):
    """``(keyword, replacement, error, message)``: one wrong argument each."""
    base = attention_inputs(rng, heads=2, blocks=2, block=16, m=4, dim=64)
    f32 = np.float32
    return base, [
        ("key_bits", 0, ValueError, "key_bits"),
        ("key_bits", 9, ValueError, "key_bits"),
        ("value_bits", 0, ValueError, "value_bits"),
        ("value_bits", 9, ValueError, "value_bits"),
        ("key_bits", 4.0, TypeError, "key_bits"),
        ("dim", 0, ValueError, "dim"),
        ("block", 0, ValueError, "block"),
        ("block", 5, ValueError, "multiple of block"),
        ("scale", "1", TypeError, "scale"),
        ("key_packed", base["key_packed"].astype(np.int16), TypeError, "key_packed"),
        ("value_packed", base["value_packed"][..., :-1], ValueError, "value_packed"),
        ("key_packed", base["key_packed"][0], ValueError, "key_packed"),
        ("key_factor", base["key_factor"][:, :-1], ValueError, "key_factor"),
        ("value_factor", base["value_factor"].astype(np.int32), TypeError, "value_factor"),
        ("key_centroids", np.zeros(8, f32), ValueError, "key_centroids"),
        ("value_centroids", np.zeros(32, f32), ValueError, "value_centroids"),
        ("q_key", np.zeros((2, 3, 4, 64), f32), ValueError, "q_key"),
        ("q_key", np.zeros((2, 1, 4, 63), f32), ValueError, "q_key"),
        ("q_key", np.zeros((1, 1, 4, 64), f32), ValueError, "q_key"),
        ("q_key", np.zeros((2, 4, 64), f32), ValueError, "q_key"),
        ("key_offset", np.zeros((2, 1, 3), f32), ValueError, "key_offset"),
        ("key_offset", np.zeros((2, 3, 4), f32), ValueError, "key_offset"),
        ("key_offset", np.zeros((2, 4), f32), ValueError, "key_offset"),
    ]


def test_argument_errors_name_the_argument(rng):
    from latkv.attention import check_attention_arguments

    base, cases = _argument_cases(rng)
    assert check_attention_arguments(**base) == (4, 4, 64, 16, 2, 2, 4, base["scale"])
    for keyword, replacement, error, message in cases:
        with pytest.raises(error, match=message):
            check_attention_arguments(**{**base, keyword: replacement})


@pytest.mark.gpu
def test_kernel_raises_the_argument_errors(rng):
    import cupy

    from latkv._gpu.cupy_attention import codebook_attention

    base, cases = _argument_cases(rng)
    for keyword, replacement, error, message in cases:
        arguments = {key: cupy.asarray(value) if isinstance(value, np.ndarray) else value
                     for key, value in {**base, keyword: replacement}.items()}
        with pytest.raises(error, match=message):
            codebook_attention(**arguments)


def test_kernel_names_are_instantiated():
    from latkv._gpu.cuda_sources import KERNELS
    from latkv._gpu.cupy_attention import kernel_name

    for key_bits in range(1, 9):
        for value_bits in range(1, 9):
            for m in (1, 2, 4, 5, 8, 9, 64):
                assert kernel_name(key_bits, value_bits, m) in KERNELS["attention.cu"]
