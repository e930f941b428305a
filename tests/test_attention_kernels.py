"""The codebook-attention kernels against `latkv.attention.codebook_attention_reference`.

``latkv._cpu.attention`` (numba) runs on every case; ``latkv._gpu.numba_attention`` runs here
in the CUDA simulator where there is no GPU (tiny inputs: the simulator runs every thread in
Python), and on CuPy input in the ``gpu``-marked test, skipped without a device.

Tolerances. Every implementation computes the partials in float32 from float32 inputs, in its
own order of summation, so none is exact; `error_bounds` gives, per output element, a bound of
the float32 error against the exact partials (computed in float64 by `exact_partials` from
the decoded keys and values). With ``u = 2**-24``:

* a logit ``s = (factor * <q, k> + offset) * scale`` is off by at most
  ``(dim + 3) u |scale| (|factor| sum_j |q_j k_j| + |offset|)`` (a float32 dot product of
  ``dim`` terms in any order, then three roundings); ``D`` is its maximum over the block, the
  bound of the block's maximum;
* a weight ``w = exp(s - max)`` is then off by ``w (2 D + 4 u) + u w |s - max|`` (the errors
  of ``s`` and ``max``, the rounding of the difference, and ``exp``), plus the smallest
  normal float32 where it underflows;
* ``total`` and ``acc`` add the weight errors (times ``|value|``) and the float32 rounding of
  a sum of ``block`` terms, ``(block + 2) u sum_n w_n |value_n|``.

These are worst-case bounds, tight enough for real bugs (a wrong offset, a swapped or
mis-decoded token moves a weight by far more than ``1e-4`` relative) and independent of the
order of the sums. Both the reference and the kernels must be within them of the exact
partials (times 2 for headroom), so the kernels are within twice that of the reference.
"""

from __future__ import annotations

import numpy as np
import pytest

from latkv import pack_bits
from latkv._backend import numba_cuda_available
from latkv._cpu import attention as cpu_attention
from latkv._cpu import serial
from latkv.attention import codebook_attention_reference
from latkv.codebooks import sphere_codebook
from latkv.turbo import codebook_dequantize_reference

needs_numba_cuda = pytest.mark.skipif(
    not numba_cuda_available(), reason="numba.cuda has neither a device nor the simulator"
)

ROUNDING = 2.0 ** -24
#: absolute error of a float32 weight that underflows (to a subnormal or to zero)
UNDERFLOW = float(np.finfo(np.float32).tiny)
#: headroom on the worst-case bounds of `error_bounds`
SAFETY = 2.0


def make_inputs(rng: np.random.Generator, *, heads: int = 2, blocks: int = 2, block: int = 16,
                m: int = 4, dim: int = 64, key_bits: int = 4, value_bits: int = 4,
                shared_queries: bool = False, shared_offsets: bool = False,
                centroids: str = "sphere", scale: float | None = None,
                query_size: float = 1.0) -> dict:
    """Keyword arguments of ``codebook_attention``: random codes, factors with zeros in them.

    ``centroids`` is ``"sphere"`` (TurboQuant's codebook for ``dim``) or ``"random"``
    (arbitrary, unsorted, with a repeat); queries are standard normal times ``query_size``,
    ``scale`` defaults to ``1 / sqrt(dim)``.
    """
    tokens = blocks * block

    def codebook(bits: int) -> np.ndarray:
        if centroids == "sphere":
            return sphere_codebook(dim, bits).centroids
        levels = rng.normal(0.0, 1.0, 1 << bits).astype(np.float32)
        levels[-1] = levels[0]
        return levels

    def factors() -> np.ndarray:
        factor = rng.uniform(0.2, 3.0, (heads, tokens)).astype(np.float32)
        factor[rng.random((heads, tokens)) < 0.1] = 0.0
        factor[:, :1] = 0.0
        return factor

    def packed(bits: int) -> np.ndarray:
        codes = rng.integers(0, 1 << bits, (heads, tokens, dim), dtype=np.uint8)
        return pack_bits(codes, bits)

    return {
        "q_key": (rng.standard_normal((heads, 1 if shared_queries else blocks, m, dim))
                  * query_size).astype(np.float32),
        "key_packed": packed(key_bits), "key_factor": factors(),
        "key_centroids": codebook(key_bits), "key_bits": key_bits,
        "key_offset": rng.normal(0.0, 0.5, (heads, 1 if shared_offsets else blocks, m)).astype(
            np.float32),
        "value_packed": packed(value_bits), "value_factor": factors(),
        "value_centroids": codebook(value_bits), "value_bits": value_bits, "dim": dim,
        "block": block, "scale": 1.0 / np.sqrt(dim) if scale is None else scale}


def decoded(packed: np.ndarray, centroids: np.ndarray, bits: int, dim: int) -> np.ndarray:
    """``(H, N, dim)`` float64 centroids of packed codes (the NumPy decoder)."""
    heads, tokens, width = packed.shape
    return codebook_dequantize_reference(packed.reshape(heads * tokens, width), centroids, bits,
                                         dim).reshape(heads, tokens, dim).astype(np.float64)


def exact_partials(inputs: dict) -> dict:
    """The partials in float64 from the decoded keys and values, and what `error_bounds` needs:
    the logits, the weights, the logits' magnitudes ``|scale| (|factor| sum_j |q_j k_j| +
    |offset|)`` and the absolute values (times their factors)."""
    dim, block = inputs["dim"], inputs["block"]
    keys = decoded(inputs["key_packed"], inputs["key_centroids"], inputs["key_bits"], dim)
    values = decoded(inputs["value_packed"], inputs["value_centroids"], inputs["value_bits"],
                     dim)
    heads, tokens, _ = keys.shape
    blocks = tokens // block
    keys = keys.reshape(heads, blocks, block, dim)
    values = values.reshape(heads, blocks, block, dim) * inputs["value_factor"].astype(
        np.float64).reshape(heads, blocks, block, 1)
    q = np.broadcast_to(inputs["q_key"].astype(np.float64), (heads, blocks, *inputs[
        "q_key"].shape[2:]))
    offset = np.broadcast_to(inputs["key_offset"].astype(np.float64),
                             (heads, blocks, q.shape[2]))[..., None]
    factor = inputs["key_factor"].astype(np.float64).reshape(heads, blocks, 1, block)
    scale = float(np.float32(inputs["scale"]))
    logits = (np.einsum("hbid,hbnd->hbin", q, keys) * factor + offset) * scale
    magnitude = abs(scale) * (np.einsum("hbid,hbnd->hbin", np.abs(q), np.abs(keys))
                              * np.abs(factor) + np.abs(offset))
    maximum = logits.max(axis=-1)
    weights = np.exp(logits - maximum[..., None])
    return {"acc": weights @ values, "maximum": maximum, "total": weights.sum(axis=-1),
            "logits": logits, "weights": weights, "magnitude": magnitude,
            "values": np.abs(values)}


def error_bounds(exact: dict, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bounds of the float32 error of ``(acc, maximum, total)`` (the module docstring)."""
    block = exact["logits"].shape[-1]
    logit_error = (dim + 3) * ROUNDING * exact["magnitude"].max(axis=-1)        # D
    weights = exact["weights"]
    weight_error = (weights * (2 * logit_error[..., None] + 4 * ROUNDING) + ROUNDING * weights
                    * np.abs(exact["logits"] - exact["maximum"][..., None]) + UNDERFLOW)
    sum_rounding = (block + 2) * ROUNDING
    total = weight_error.sum(axis=-1) + sum_rounding * exact["total"]
    acc = weight_error @ exact["values"] + sum_rounding * (weights @ exact["values"])
    return SAFETY * acc, SAFETY * logit_error, SAFETY * total


def assert_within(actual, expected, bound, name: str) -> None:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    excess = np.abs(actual - expected) - bound
    assert (excess <= 0).all(), (
        f"{name}: {int((excess > 0).sum())} of {excess.size} elements off by more than their "
        f"bound; worst {np.abs(actual - expected).flat[np.argmax(excess)]:.3g} against "
        f"{np.broadcast_to(bound, excess.shape).flat[np.argmax(excess)]:.3g}")


def assert_partials_close(actual, expected, bounds, factor: float = 2.0) -> None:
    """``actual`` within ``factor`` times ``bounds`` of ``expected``, all three partials float32
    of the right shapes."""
    for name, array, reference, bound in zip(("acc", "maximum", "total"), actual, expected,
                                             bounds):
        assert array.dtype == np.float32, (name, array.dtype)
        assert_within(array, reference, factor * bound, name)


def check_numba(inputs: dict) -> tuple:
    """The numba kernel's partials against the reference's, both against the exact ones."""
    exact = exact_partials(inputs)
    bounds = error_bounds(exact, inputs["dim"])
    expected = codebook_attention_reference(**inputs)
    assert_partials_close(expected, (exact["acc"], exact["maximum"], exact["total"]), bounds,
                          1.0)
    actual = cpu_attention.codebook_attention(**inputs)
    assert_partials_close(actual, expected, bounds)
    return actual


# (key bits, value bits, dim, block, m, shared queries, shared offsets, centroids)
CASES = [
    (4, 4, 128, 128, 4, False, False, "sphere"),
    (4, 2, 128, 16, 1, True, True, "sphere"),
    (1, 8, 64, 16, 4, True, False, "random"),
    (8, 1, 64, 1, 4, False, True, "sphere"),
    (3, 3, 72, 16, 4, False, False, "random"),
    (3, 1, 70, 16, 1, True, False, "sphere"),     # 6 and 2 padding bits in the last byte
    (2, 4, 8, 128, 4, False, True, "random"),
    (2, 3, 8, 1, 1, True, True, "sphere"),
    (8, 8, 72, 16, 4, False, False, "sphere"),
]


@pytest.mark.parametrize("key_bits, value_bits, dim, block, m, shared_queries, shared_offsets, "
                         "centroids", CASES)
def test_numba_matches_reference(key_bits, value_bits, dim, block, m, shared_queries,
                                 shared_offsets, centroids):
    rng = np.random.default_rng(key_bits * 1000 + value_bits * 100 + dim + block)
    check_numba(make_inputs(rng, heads=2, blocks=3, block=block, m=m, dim=dim,
                            key_bits=key_bits, value_bits=value_bits,
                            shared_queries=shared_queries, shared_offsets=shared_offsets,
                            centroids=centroids))


@pytest.mark.parametrize("dim, block", [(128, 128), (8, 16)])
def test_large_logits_subtract_the_maximum(dim, block):
    """Logits in the hundreds: ``exp(s)`` overflows float32, ``exp(s - max)`` does not."""
    rng = np.random.default_rng(7)
    inputs = make_inputs(rng, blocks=2, block=block, dim=dim, scale=10.0, query_size=10.0)
    acc, maximum, total = check_numba(inputs)
    assert np.abs(maximum).max() > 100
    assert np.isfinite(acc).all() and (total >= 1).all()


def test_the_reference_is_the_dense_attention():
    """The reference's partials combine to softmax attention over the decoded keys and values,
    computed densely in float64 (the guard of the reference itself)."""
    rng = np.random.default_rng(3)
    inputs = make_inputs(rng, heads=2, blocks=4, block=16, m=3, dim=64, key_bits=3,
                         value_bits=2, shared_queries=True, centroids="random")
    acc, maximum, total = codebook_attention_reference(**inputs)
    keys = decoded(inputs["key_packed"], inputs["key_centroids"], 3, 64)
    values = decoded(inputs["value_packed"], inputs["value_centroids"], 2, 64)
    keys *= inputs["key_factor"][..., None]
    values *= inputs["value_factor"][..., None]
    offsets = np.repeat(inputs["key_offset"].astype(np.float64), 16, axis=1)   # (H, N, m)
    logits = (inputs["q_key"][:, 0].astype(np.float64) @ keys.transpose(0, 2, 1)
              + offsets.transpose(0, 2, 1)) * inputs["scale"]                  # (H, m, N)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    dense = (weights / weights.sum(axis=-1, keepdims=True)) @ values             # (H, m, dim)
    top = maximum.max(axis=1, keepdims=True)
    rescale = np.exp(maximum.astype(np.float64) - top)                         # (H, b, m)
    combined = (rescale[..., None] * acc).sum(axis=1) / (rescale * total).sum(axis=1)[..., None]
    np.testing.assert_allclose(combined, dense, rtol=1e-5, atol=1e-5 * np.abs(dense).max())


def test_padding_bits_are_ignored():
    rng = np.random.default_rng(4)
    inputs = make_inputs(rng, dim=70, key_bits=3, value_bits=1)   # 6 and 2 padding bits
    expected = cpu_attention.codebook_attention(**inputs)
    inputs["key_packed"][..., -1] |= np.uint8(0b11111100)
    inputs["value_packed"][..., -1] |= np.uint8(0b11000000)
    for actual, reference in zip(cpu_attention.codebook_attention(**inputs), expected):
        np.testing.assert_array_equal(actual, reference)


def test_other_dtypes_and_layouts_are_converted():
    rng = np.random.default_rng(5)
    inputs = make_inputs(rng, dim=8, block=4, m=2)
    expected = cpu_attention.codebook_attention(**inputs)
    converted = dict(inputs)
    for name in ("q_key", "key_factor", "key_offset", "value_factor", "value_centroids"):
        converted[name] = np.asfortranarray(inputs[name].astype(np.float64))
    converted["key_packed"] = np.asfortranarray(inputs["key_packed"])
    converted["key_centroids"] = list(inputs["key_centroids"])
    converted["scale"] = np.float32(inputs["scale"])
    for actual, reference in zip(cpu_attention.codebook_attention(**converted), expected):
        np.testing.assert_array_equal(actual, reference)


@pytest.mark.parametrize("module_name", ["cpu", "numba.cuda"])
def test_empty_inputs(module_name):
    if module_name == "numba.cuda":
        if not numba_cuda_available():
            pytest.skip("numba.cuda has neither a device nor the simulator")
        from latkv._gpu import numba_attention as module
    else:
        module = cpu_attention
    rng = np.random.default_rng(6)
    no_tokens = make_inputs(rng, blocks=0, block=4, dim=8, m=3, shared_queries=True,
                            shared_offsets=True)
    acc, maximum, total = module.codebook_attention(**no_tokens)
    assert acc.shape == (2, 0, 3, 8) and maximum.shape == total.shape == (2, 0, 3)
    no_queries = make_inputs(rng, blocks=2, block=4, dim=8, m=0)
    acc, maximum, total = module.codebook_attention(**no_queries)
    assert acc.shape == (2, 2, 0, 8) and maximum.shape == total.shape == (2, 2, 0)
    assert acc.dtype == maximum.dtype == total.dtype == np.float32


def test_serial_clone_and_parallel_kernel_agree():
    rng = np.random.default_rng(8)
    inputs = make_inputs(rng, heads=4, blocks=4, block=32, m=4, dim=128, key_bits=4,
                         value_bits=3)
    elements = 4 * 4 * 4 * 128 * 32
    assert elements >= serial.SERIAL_BELOW          # codebook_attention runs the parallel one
    parallel = cpu_attention.codebook_attention(**inputs)
    check_numba(inputs)
    clone = serial.kernel_for(cpu_attention._codebook_attention, 1)
    assert clone is not cpu_attention._codebook_attention
    assert not clone.targetoptions.get("parallel")
    assert clone.py_func.__qualname__ != cpu_attention._codebook_attention.py_func.__qualname__
    outputs = (np.empty_like(parallel[0]), np.empty_like(parallel[1]),
               np.empty_like(parallel[2]))
    clone(inputs["q_key"], inputs["key_packed"], inputs["key_factor"], inputs["key_centroids"],
          4, inputs["key_offset"], inputs["value_packed"], inputs["value_factor"],
          inputs["value_centroids"], 3, np.float32(inputs["scale"]), *outputs)
    for serial_output, parallel_output in zip(outputs, parallel):   # the same task function
        np.testing.assert_array_equal(serial_output, parallel_output)


def test_small_inputs_use_the_serial_clone():
    kernel = cpu_attention._codebook_attention
    assert kernel.targetoptions.get("parallel")
    assert serial.kernel_for(kernel, serial.SERIAL_BELOW) is kernel
    assert serial.kernel_for(kernel, serial.SERIAL_BELOW - 1) is not kernel


def bad_arguments() -> tuple[list, dict]:
    """Cases ``(changes to the valid inputs, exception, words of its message)`` and the valid
    inputs."""
    rng = np.random.default_rng(9)
    good = make_inputs(rng, heads=2, blocks=2, block=4, m=3, dim=8, key_bits=3, value_bits=2)
    floats = np.zeros
    return [
        ({"key_bits": 0}, ValueError, "key_bits"),
        ({"value_bits": 9}, ValueError, "value_bits"),
        ({"key_bits": 3.0}, TypeError, "key_bits"),
        ({"block": 3}, ValueError, "multiple of block"),
        ({"block": 0}, ValueError, "block"),
        ({"dim": 0}, ValueError, "dim"),
        ({"dim": 9}, ValueError, "key_packed"),            # the packed width of 9 codes
        ({"scale": "1"}, TypeError, "scale"),
        ({"key_packed": good["key_packed"][:, :, :-1]}, ValueError, "key_packed"),
        ({"key_packed": good["key_packed"][0]}, ValueError, "key_packed"),
        ({"key_packed": good["key_packed"].astype(np.int32)}, TypeError, "key_packed"),
        ({"value_packed": good["value_packed"][:, :4]}, ValueError, "value_packed"),
        ({"value_packed": good["value_packed"].astype(np.float32)}, TypeError,
         "value_packed"),
        ({"key_factor": floats((2, 7), np.float32)}, ValueError, "key_factor"),
        ({"value_factor": floats((1, 8), np.float32)}, ValueError, "value_factor"),
        ({"key_factor": np.ones((2, 8), np.int64)}, TypeError, "key_factor"),
        ({"key_centroids": floats(16, np.float32)}, ValueError, "key_centroids"),
        ({"value_centroids": floats(2, np.float32)}, ValueError, "value_centroids"),
        ({"value_centroids": np.arange(4)}, TypeError, "value_centroids"),
        ({"q_key": floats((2, 3, 3, 8), np.float32)}, ValueError, "q_key"),
        ({"q_key": floats((2, 1, 3, 7), np.float32)}, ValueError, "q_key"),
        ({"q_key": floats((2, 3, 8), np.float32)}, ValueError, "q_key"),
        ({"q_key": floats((1, 1, 3, 8), np.float32)}, ValueError, "q_key"),
        ({"key_offset": floats((2, 1, 2), np.float32)}, ValueError, "key_offset"),
        ({"key_offset": floats((2, 3, 3), np.float32)}, ValueError, "key_offset"),
        ({"key_offset": floats((2, 3), np.float32)}, ValueError, "key_offset"),
    ], good


@pytest.mark.parametrize("module_name", ["cpu", "numba.cuda"])
def test_bad_arguments_are_refused(module_name):
    """The numba.cuda wrapper checks its arguments with the same `latkv.attention.check_attention_arguments`, before
    any device work."""
    if module_name == "numba.cuda":
        if not numba_cuda_available():
            pytest.skip("numba.cuda has neither a device nor the simulator")
        from latkv._gpu import numba_attention as module
    else:
        module = cpu_attention
    cases, good = bad_arguments()
    for changes, exception, words in cases:
        with pytest.raises(exception, match=words):
            module.codebook_attention(**{**good, **changes})


# ---------------------------------------------------------------- numba.cuda


@needs_numba_cuda
@pytest.mark.parametrize("key_bits, value_bits, dim, m, shared", [
    (4, 2, 16, 2, False),
    (3, 8, 8, 1, True),
])
def test_numba_cuda_matches_reference(key_bits, value_bits, dim, m, shared):
    from latkv._gpu import numba_attention

    rng = np.random.default_rng(20 + key_bits)
    inputs = make_inputs(rng, heads=2, blocks=2, block=4, m=m, dim=dim, key_bits=key_bits,
                         value_bits=value_bits, shared_queries=shared, shared_offsets=shared,
                         centroids="random", scale=2.0)
    bounds = error_bounds(exact_partials(inputs), dim)
    actual = numba_attention.codebook_attention(**inputs)
    assert all(isinstance(array, np.ndarray) for array in actual)
    assert_partials_close(actual, codebook_attention_reference(**inputs), bounds)


@needs_numba_cuda
def test_numba_cuda_tiles_and_query_groups():
    """A block longer than the threads of a CUDA block (two tiles, the logits computed again)
    and more queries than `TILE_QUERIES` (two groups), padding bits set."""
    from latkv._gpu import numba_attention

    rng = np.random.default_rng(21)
    assert numba_attention.threads_for(160) == numba_attention.MAX_THREADS < 160
    inputs = make_inputs(rng, heads=1, blocks=1, block=160, m=numba_attention.TILE_QUERIES + 1,
                         dim=6, key_bits=3, value_bits=1, scale=3.0)
    inputs["key_packed"][..., -1] |= np.uint8(0b11000000)      # 6 codes of 3 bits: 2 spare
    inputs["value_packed"][..., -1] |= np.uint8(0b11000000)
    bounds = error_bounds(exact_partials(inputs), 6)
    assert_partials_close(numba_attention.codebook_attention(**inputs),
                          codebook_attention_reference(**inputs), bounds)


@needs_numba_cuda
def test_numba_cuda_threads_per_block():
    from latkv._gpu import numba_attention

    assert [numba_attention.threads_for(block) for block in (1, 32, 33, 100, 128, 129, 4096)] \
        == [32, 32, 64, 128, 128, 128, 128]


@pytest.mark.gpu
@pytest.mark.parametrize("block", [16, 128, 300])
def test_numba_cuda_on_cupy_input(block):
    import cupy

    from latkv._gpu import numba_attention

    rng = np.random.default_rng(block)
    inputs = make_inputs(rng, heads=8, blocks=6, block=block, m=4, dim=128, key_bits=4,
                         value_bits=3, shared_queries=block == 16, scale=0.5)
    bounds = error_bounds(exact_partials(inputs), 128)
    on_device = {name: cupy.asarray(value) if isinstance(value, np.ndarray) else value
                 for name, value in inputs.items()}
    actual = numba_attention.codebook_attention(**on_device)
    assert all(isinstance(array, cupy.ndarray) for array in actual)
    assert_partials_close([cupy.asnumpy(array) for array in actual],
                          codebook_attention_reference(**inputs), bounds)
