"""Every GPU kernel on large and awkward shapes, against its NumPy reference.

The other kernel tests hold each kernel's edge cases (ties, NaN, alignment, grid-stride
loops, padding bits); this file runs the same comparison over the shapes a real cache has,
uniformly for every operation of `latkv._backend.IMPLEMENTATIONS` that has GPU kernels, each
through its CuPy kernel and its numba.cuda kernel (on CuPy input), and for each float dtype
the operation takes (float16 and float32: every wrapper converts to C-contiguous float32 on
the device, which is exact, so the reference gets the float32 values):

* large: ``2**20`` rows of 128 coordinates (a million KV vectors; the scores take them as
  8 heads of 131072 keys);
* awkward: 1, 7, 97, 1003 and 1025 rows (or keys) times dims 64, 96 (not a power of two),
  128 and 256;
* decode attention and scores at the issue's size: batch 8 x 8 KV heads = 64 heads of
  131072 tokens, dim 128, 4 queries per KV head (GQA); attention again at 8 bits with 262272
  tokens, so that each packed array passes ``2**31`` bytes; attention blocks of 97 and 1025
  tokens (1025 > 4 chunks of 256 threads: the last chunk has one token);
* codes past ``2**31`` elements: packing, unpacking and decoding ``2**24 + 1027`` rows of 128.

All ``gpu``-marked: ``pytest -m gpu`` runs them on a device; without one they are skipped.
Comparisons are bit-exact (float bit patterns, signed zeros included) for everything the
kernels document as exact: codes, labels, radii, lattice points, Hadamard stages, decoded
values. Scores, attention partials and PolarQuant decoding are within the tolerances of
their own test files (float32 sums in another order; CUDA's ``sin``/``cos``/``expf``).

Where a NumPy reference on the whole input would take minutes, or host memory in the tens of
GB, it runs on a slice; each such test says why the slice is enough. Device memory stays
below 12 GB per test (the pool is emptied after each); the references of the large cases
take seconds each (most are cached between the two backends).

The ``needs_numba_cuda`` tests at the end run the numba.cuda kernels in the CUDA simulator on
the awkward shapes (1 and 7 rows, dim 96, 97 tokens) in the default run.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest

from latkv._backend import GPU_BACKENDS, implementation, numba_cuda_available
from latkv.codebooks import sphere_codebook
from latkv.e8 import scale_ladder
from latkv.packing import pack_bits_reference, packed_length
from latkv.rotations import RandomizedHadamard
from test_gpu_attention import assert_partials_close, attention_inputs
from test_gpu_codebook import score_tolerance
from test_gpu_polar import random_packed as polar_random_packed
from test_gpu_polar import tables as polar_tables
from test_voronoi_kernels import random_scales

needs_numba_cuda = pytest.mark.skipif(
    not numba_cuda_available(), reason="numba.cuda has neither a device nor the simulator"
)

FLOAT_DTYPES = (np.float16, np.float32)
LARGE_ROWS, LARGE_DIM = 1 << 20, 128
ODD_ROWS = (1, 7, 97, 1003, 1025)
DIMS = (64, 96, 128, 256)
# 3-bit codes straddle byte boundaries (the hardest packing case)
BITS = 3
POLAR_LEVELS, POLAR_BITS = 4, (4, 2, 2, 2)
QUERIES = 3                       # an odd number of queries per head for the scores
# where a 32-bit signed index (of elements or of bytes) wraps
INDEX_LIMIT = 1 << 31


@pytest.fixture(autouse=True)
def _empty_the_device_pool(request):
    yield
    if "gpu" in request.keywords:
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
        cupy.get_default_pinned_memory_pool().free_all_blocks()


# ---------------------------------------------------------------- host <-> device


def to_device(value: Any) -> Any:
    import cupy

    if isinstance(value, np.ndarray):
        return cupy.asarray(value)
    if isinstance(value, tuple):
        return tuple(to_device(v) for v in value)
    if isinstance(value, dict):
        return {key: to_device(v) for key, v in value.items()}
    return value


def to_host(value: Any) -> Any:
    """Device results back on the host; every array must be a CuPy array."""
    import cupy

    if isinstance(value, (tuple, list)):
        return tuple(to_host(v) for v in value)
    assert isinstance(value, cupy.ndarray), type(value)
    return cupy.asnumpy(value)


def upcast(value: Any) -> Any:
    """float16 arrays as float32 (exact): what every GPU wrapper hands its kernel, and the
    float32 inputs that the references are specified for."""
    if isinstance(value, np.ndarray) and value.dtype == np.float16:
        return value.astype(np.float32)
    if isinstance(value, tuple):
        return tuple(upcast(v) for v in value)
    if isinstance(value, dict):
        return {key: upcast(v) for key, v in value.items()}
    return value


def random_bytes(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Arbitrary bytes (padding bits included), fast enough for gigabytes."""
    return np.frombuffer(rng.bytes(int(np.prod(shape))), dtype=np.uint8).reshape(shape)


def floats(rng: np.random.Generator, rows: int, dim: int, dtype: Any) -> np.ndarray:
    return rng.standard_normal((rows, dim), dtype=np.float32).astype(dtype)


# ---------------------------------------------------------------- comparisons


def assert_bit_identical(got: Any, expected: Any, what: str = "") -> None:
    """Same dtype, shape and bit pattern (so -0.0 differs from 0.0), element by element."""
    if isinstance(expected, tuple):
        assert isinstance(got, tuple) and len(got) == len(expected), what
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_bit_identical(g, e, f"{what}[{i}]")
        return
    assert got.dtype == expected.dtype, (what, got.dtype, expected.dtype)
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    if expected.dtype.kind == "f":
        view = np.dtype(f"u{expected.dtype.itemsize}")
        got, expected = got.view(view), expected.view(view)
    differ = np.flatnonzero(got.ravel() != expected.ravel())
    assert differ.size == 0, (f"{what}: {differ.size} of {expected.size} elements differ, "
                              f"first at flat index {differ[0]}")


def scores_checker(q: np.ndarray, values: np.ndarray) -> Callable[[Any, Any], None]:
    atol = score_tolerance(q.astype(np.float32), values)

    def check(got: np.ndarray, expected: np.ndarray) -> None:
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=atol)

    return check


def polar_decode_check(got: np.ndarray, expected: np.ndarray) -> None:
    # float64 on both sides, rounded once to float32; CUDA's sin / cos within an ulp or two
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-30)


# ---------------------------------------------------------------- one case per kernel


@dataclass(frozen=True)
class Case:
    """Host arguments of one call and how to judge it.

    ``sample``, when given, holds the rows of the first argument that the reference runs on
    (and of every result that is compared): for kernels that treat rows independently.
    """

    args: tuple
    check: Callable[[Any, Any], None] = assert_bit_identical
    sample: np.ndarray | None = None


@dataclass(frozen=True)
class Kernel:
    """An operation of `latkv._backend.IMPLEMENTATIONS` and a builder of its inputs.

    ``build(rows, dim, dtype, rng) -> Case``; ``float_input`` says whether the data input is
    a float array (then it runs for every dtype of `FLOAT_DTYPES`, else once).
    """

    operation: str
    build: Callable[[int, int, Any, np.random.Generator], Case]
    float_input: bool = True
    variant: str = ""

    @property
    def name(self) -> str:
        return f"{self.operation}-{self.variant}" if self.variant else self.operation

    def dtypes(self) -> tuple:
        return FLOAT_DTYPES if self.float_input else (np.uint8,)


def _pack(rows, dim, dtype, rng):
    return Case((rng.integers(0, 1 << BITS, (rows, dim), dtype=np.uint8), BITS))


def _unpack(rows, dim, dtype, rng):
    return Case((random_bytes(rng, (rows, packed_length(dim, BITS))), BITS, dim))


def _hadamard(inverse):
    def build(rows, dim, dtype, rng):
        # a power of two: the whole row; dim 96: the tail stage [32, 96) (coordinates 0..31
        # copied), as RandomizedHadamard(96) runs it
        size = 1 << (dim.bit_length() - 1)
        signs = (1 - 2 * rng.integers(0, 2, size)).astype(np.float32)
        return Case((floats(rng, rows, dim, dtype), dim - size, size, signs, inverse))

    return build


def _randomized_hadamard(rows, dim, dtype, rng):
    # dim 96: a permutation, then the stages on [0, 64) and [32, 96); a power of two: one stage
    rotation = RandomizedHadamard(dim, seed=int(rng.integers(1 << 30)))
    return Case((floats(rng, rows, dim, dtype), rotation.permutation, rotation.head_signs,
                 rotation.tail_signs, False))


def _codebook_quantize(rows, dim, dtype, rng):
    x = floats(rng, rows, dim, dtype)
    norm = np.linalg.norm(x.astype(np.float32), axis=1).astype(np.float32)
    norm[::11] = 0.0                                   # divides by 1
    return Case((x, norm, sphere_codebook(dim, BITS).boundaries, BITS))


def _codebook_dequantize(rows, dim, dtype, rng):
    return Case((random_bytes(rng, (rows, packed_length(dim, BITS))),
                 sphere_codebook(dim, BITS).centroids, BITS, dim))


def _heads_and_keys(rows: int) -> tuple[int, int]:
    """The large case as 8 heads of rows / 8 keys, the small ones as one head of rows keys."""
    return (8, rows // 8) if rows >= 8 * 1024 else (1, rows)


def _codebook_scores(rows, dim, dtype, rng):
    heads, keys = _heads_and_keys(rows)
    q = rng.standard_normal((heads, QUERIES, dim), dtype=np.float32).astype(dtype)
    centroids = sphere_codebook(dim, BITS).centroids
    packed = random_bytes(rng, (heads, keys, packed_length(dim, BITS)))
    return Case((q, packed, centroids, BITS, dim), scores_checker(q, centroids))


def _sign_scores(rows, dim, dtype, rng):
    heads, keys = _heads_and_keys(rows)
    q = rng.standard_normal((heads, QUERIES, dim), dtype=np.float32).astype(dtype)
    packed = random_bytes(rng, (heads, keys, packed_length(dim, 1)))
    return Case((q, packed, dim), scores_checker(q, np.ones(1)))


def _nearest(rows, dim, dtype, rng):
    return Case(((floats(rng, rows, dim, np.float32) * 3).astype(dtype).reshape(-1, 8),))


def _polar_quantize(rows, dim, dtype, rng):
    x = floats(rng, rows, dim, dtype)
    x[0] = 0.0                                         # zero radii, angles atan2(0, 0)
    return Case((x, POLAR_LEVELS, POLAR_BITS, polar_tables(POLAR_BITS)[0]))


def _polar_dequantize(rows, dim, dtype, rng):
    radius = rng.uniform(0.0, 4.0, (rows, dim >> POLAR_LEVELS)).astype(dtype)
    return Case((polar_random_packed(rows, dim, POLAR_BITS, rng), radius, POLAR_LEVELS,
                 POLAR_BITS, polar_tables(POLAR_BITS)[1], dim), polar_decode_check)


def sample_rows(rows: int) -> np.ndarray | None:
    """Rows for the reference of a row-independent kernel on a large input: the first and the
    last 4096 (the first grid-stride round and the largest offsets) and every 61st (any
    stride); ``None`` (every row) for small inputs."""
    if rows <= 1 << 15:
        return None
    return np.unique(np.concatenate([np.arange(4096), np.arange(rows - 4096, rows),
                                     np.arange(0, rows, 61)]))


def _voronoi_encode(rows, dim, dtype, rng):
    # rows at scales 10^-2 .. 10^2 (the top rung's scale stays far below 65504)
    x = floats(rng, rows, dim, np.float32) * np.float32(10.0) ** rng.uniform(
        -2, 2, (rows, 1)).astype(np.float32)
    # The reference takes about 130 us a row (a rung search per vector, in NumPy): minutes
    # for 2**20 rows. One thread encodes one row, reading that row only and writing its
    # scale and labels only, so a wrong offset or stride shows in the sampled rows.
    return Case((x.astype(dtype), scale_ladder(BITS)[1], BITS), sample=sample_rows(rows))


def _voronoi_decode(rows, dim, dtype, rng):
    labels = rng.integers(0, 1 << BITS, (rows, dim), dtype=np.uint8)
    return Case((labels, random_scales(rng, rows).astype(dtype), BITS))


KERNELS = [
    Kernel("pack_bits", _pack, float_input=False),
    Kernel("unpack_bits", _unpack, float_input=False),
    Kernel("hadamard_segment", _hadamard(False), variant="forward"),
    Kernel("hadamard_segment", _hadamard(True), variant="inverse"),
    Kernel("randomized_hadamard", _randomized_hadamard),
    Kernel("codebook_quantize", _codebook_quantize),
    Kernel("codebook_dequantize", _codebook_dequantize, float_input=False),
    Kernel("codebook_scores", _codebook_scores),
    Kernel("sign_scores", _sign_scores),
    Kernel("nearest_d8", _nearest),
    Kernel("nearest_e8", _nearest),
    Kernel("polar_quantize", _polar_quantize),
    Kernel("polar_dequantize", _polar_dequantize),
    Kernel("voronoi_encode", _voronoi_encode),
    Kernel("voronoi_decode", _voronoi_decode),
]


def test_every_gpu_operation_has_a_case():
    """Every operation with GPU kernels is in `KERNELS` (attention has its own tests below)."""
    from latkv._backend import IMPLEMENTATIONS

    gpu_operations = {operation for operation, backend in IMPLEMENTATIONS
                      if backend in GPU_BACKENDS}
    assert gpu_operations - {"codebook_attention"} == {kernel.operation for kernel in KERNELS}


def _restrict(value: Any, sample: np.ndarray | None) -> Any:
    if sample is None:
        return value
    if isinstance(value, tuple):
        return tuple(_restrict(v, sample) for v in value)
    return value[sample]


def reference(kernel: Kernel, case: Case) -> Any:
    args = upcast(case.args)
    if case.sample is not None:
        args = (args[0][case.sample],) + args[1:]
    return implementation(kernel.operation, "numpy")(*args)


def run_on_device(kernel: Kernel, backend: str, case: Case) -> Any:
    got = to_host(implementation(kernel.operation, backend)(*to_device(case.args)))
    return _restrict(got, case.sample)


# The case and reference of the last large test: the two backends of a (kernel, dtype) run one
# after the other (the parameter order below) and share them.
_large: dict[tuple, tuple[Case, Any]] = {}


def large_case(kernel: Kernel, dtype: Any) -> tuple[Case, Any]:
    key = (kernel.name, np.dtype(dtype).name)
    if key not in _large:
        _large.clear()
        rng = np.random.default_rng(sum(map(ord, kernel.name)) + np.dtype(dtype).itemsize)
        case = kernel.build(LARGE_ROWS, LARGE_DIM, dtype, rng)
        _large[key] = (case, reference(kernel, case))
    return _large[key]


def _large_params():
    for kernel in KERNELS:
        for dtype in kernel.dtypes():
            for backend in GPU_BACKENDS:
                yield pytest.param(kernel, dtype, backend,
                                   id=f"{kernel.name}-{np.dtype(dtype).name}-{backend}")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel, dtype, backend", list(_large_params()))
def test_large_input(kernel, dtype, backend):
    """2**20 rows of 128 coordinates (8 heads of 131072 keys for the scores)."""
    case, expected = large_case(kernel, dtype)
    case.check(run_on_device(kernel, backend, case), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda kernel: kernel.name)
def test_awkward_shapes(kernel, backend):
    """1, 7, 97, 1003 and 1025 rows (keys) times dims 64, 96, 128 and 256, every dtype."""
    rng = np.random.default_rng(sum(map(ord, kernel.name)))
    for rows, dim, dtype in itertools.product(ODD_ROWS, DIMS, kernel.dtypes()):
        case = kernel.build(rows, dim, dtype, rng)
        what = f"{kernel.name} rows={rows} dim={dim} {np.dtype(dtype).name}"
        got = run_on_device(kernel, backend, case)
        try:
            case.check(got, reference(kernel, case))
        except AssertionError as error:
            raise AssertionError(f"{what}: {error}") from None


# ---------------------------------------------------------------- codes past 2**31 elements


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_codes_past_2_31_elements(backend):
    """Pack, unpack and decode ``2**24 + 1027`` rows of 128 codes: the element (and byte)
    offsets of the last rows pass ``2**31``, where a 32-bit index would wrap.

    The rows repeat a random block of 4099 rows (a prime number: an offset wrapped by 2**31 or
    2**32 elements lands on a row with other contents). Every kernel treats rows
    independently, so the rows compared (the first ones, those around element 2**31 and the
    last ones) show any wrong offset; the NumPy reference of all 2**31 codes would need tens of
    GB of host memory. Peak device memory: about 11.5 GB (the float32 output is 8.6 GB).
    """
    import cupy

    rng = np.random.default_rng(31)
    dim, period = 128, 4099
    boundary = INDEX_LIMIT // dim                  # the first row past 2**31 elements
    rows = boundary + 1027
    block = rng.integers(0, 1 << BITS, (period, dim), dtype=np.uint8)
    codes = cupy.tile(cupy.asarray(block), (-(-rows // period), 1))[:rows]
    checked = np.concatenate([np.arange(4096), np.arange(boundary - 4096, rows)])
    host_codes = block[checked % period]
    checked = cupy.asarray(checked)

    packed = implementation("pack_bits", backend)(codes, BITS)
    assert packed.shape == (rows, packed_length(dim, BITS))
    assert_bit_identical(cupy.asnumpy(packed[checked]), pack_bits_reference(host_codes, BITS),
                         "pack_bits")
    back = implementation("unpack_bits", backend)(packed, BITS, dim)
    assert_bit_identical(cupy.asnumpy(back[checked]), host_codes, "unpack_bits")
    del back, packed

    # the codes as the bytes of 8-bit codes: a float32 output of 2**31 + 131456 elements
    centroids = np.sort(rng.standard_normal(256)).astype(np.float32)
    out = implementation("codebook_dequantize", backend)(codes, cupy.asarray(centroids), 8,
                                                          dim)
    assert out.shape == (rows, dim) and out.dtype == cupy.float32
    assert_bit_identical(cupy.asnumpy(out[checked]), centroids[host_codes],
                         "codebook_dequantize")


# ---------------------------------------------------------------- attention and scores


def attention_rtol(dim: int) -> float:
    """test_gpu_attention's RTOL is twice one side's worst case at dim 128; it grows with
    the length of the dot products."""
    from test_gpu_attention import RTOL

    return RTOL * max(1.0, (dim + 3) / 131)


def run_attention(backend: str, inputs: dict) -> tuple[np.ndarray, ...]:
    return to_host(implementation("codebook_attention", backend)(**to_device(inputs)))


ATTENTION_BITS = [(4, 4), (3, 2), (5, 7), (8, 8)]   # 16-, 32-, 64-bit group loads, runtime
FLOAT_FIELDS = ("q_key", "key_factor", "key_offset", "value_factor")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_attention_odd_token_counts(backend, dtype):
    """Blocks of 97 and 1025 tokens, dims 64, 96, 128, 256, one and three queries (query
    tiles 1 and 4), shared and per-block offsets, every group-load width."""
    rng = np.random.default_rng(97 + np.dtype(dtype).itemsize)
    shapes = itertools.product((97, 1025), DIMS, (1, 3))
    for index, (block, dim, m) in enumerate(shapes):
        key_bits, value_bits = ATTENTION_BITS[index % len(ATTENTION_BITS)]
        inputs = attention_inputs(rng, heads=2, blocks=2, block=block, m=m, dim=dim,
                                  key_bits=key_bits, value_bits=value_bits,
                                  per_block_offset=index % 2 == 1)
        for name in FLOAT_FIELDS:
            inputs[name] = inputs[name].astype(dtype)
        try:
            assert_partials_close(run_attention(backend, inputs), upcast(inputs),
                                  attention_rtol(dim))
        except AssertionError as error:
            raise AssertionError(f"block={block} dim={dim} m={m} bits=({key_bits}, "
                                 f"{value_bits}): {error}") from None


def _heads(value: Any, head: int) -> Any:
    """Head ``head`` of an argument with a head axis (the centroids and numbers have none)."""
    if isinstance(value, np.ndarray) and value.ndim >= 2:
        return value[head:head + 1]
    return value


LONG_CONTEXT = [pytest.param(131072, 4, id="131072-tokens-4-bit"),
                pytest.param(262272, 8, id="262272-tokens-8-bit-past-2**31-bytes")]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("tokens, bits", LONG_CONTEXT)
def test_decode_attention_long_context(backend, tokens, bits):
    """One decode step of batch 8 x 8 KV heads (64 heads) x 4 queries per KV head, dim 128,
    blocks of 128 tokens: 8192 or 16392 (head, block) pairs in one launch.

    The reference runs on the first and the last head (about 1 s each): heads are independent
    (each pair reads its head's codes only), the last head's codes are the ones at the largest
    offsets (past 2**31 bytes in the 8-bit case), and every pair of every head is checked to be
    written (``1 <= total <= block``: the block's largest logit contributes exactly 1). The
    whole reference would need about 50 GB of host memory in float64 tolerances.
    """
    heads, block, m, dim = 64, 128, 4, 128
    rng = np.random.default_rng(tokens + bits)
    width = packed_length(dim, bits)
    if bits == 8:
        assert heads * tokens * width > INDEX_LIMIT
    inputs = dict(
        q_key=rng.standard_normal((heads, 1, m, dim), dtype=np.float32),
        key_packed=random_bytes(rng, (heads, tokens, width)),
        key_factor=rng.uniform(0.5, 2.0, (heads, tokens)).astype(np.float32),
        key_centroids=np.sort(rng.standard_normal(1 << bits) * 2 / np.sqrt(dim)).astype(
            np.float32),
        key_bits=bits,
        key_offset=rng.standard_normal((heads, 1, m), dtype=np.float32),
        value_packed=random_bytes(rng, (heads, tokens, width)),
        value_factor=rng.uniform(0.5, 2.0, (heads, tokens)).astype(np.float32),
        value_centroids=np.sort(rng.standard_normal(1 << bits) * 2 / np.sqrt(dim)).astype(
            np.float32),
        value_bits=bits, dim=dim, block=block, scale=float(1 / np.sqrt(dim)))
    acc, maximum, total = run_attention(backend, inputs)
    assert acc.shape == (heads, tokens // block, m, dim)
    assert np.all(np.isfinite(maximum)) and np.all(np.isfinite(acc))
    assert np.all(total >= 1.0) and np.all(total <= block)
    for head in (0, heads - 1):
        sliced = {key: _heads(value, head) for key, value in inputs.items()}
        got = tuple(array[head:head + 1] for array in (acc, maximum, total))
        assert_partials_close(got, sliced, attention_rtol(dim))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("operation", ["codebook_scores", "sign_scores"])
def test_decode_scores_long_context(backend, operation):
    """``(64 heads, 4 queries, 131072 + 97 keys)`` scores at dim 128 (the last key tile holds
    one key). The reference runs on the first and the last head: heads are independent (a
    block handles one head's tile of keys), and the last head's keys sit at the largest
    offsets."""
    heads, keys, m, dim = 64, 131072 + 97, 4, 128
    rng = np.random.default_rng(keys)
    q = rng.standard_normal((heads, m, dim), dtype=np.float32)
    if operation == "codebook_scores":
        centroids = sphere_codebook(dim, 4).centroids
        args = (q, random_bytes(rng, (heads, keys, packed_length(dim, 4))), centroids, 4, dim)
        check = scores_checker(q, centroids)
    else:
        args = (q, random_bytes(rng, (heads, keys, packed_length(dim, 1))), dim)
        check = scores_checker(q, np.ones(1))
    got = to_host(implementation(operation, backend)(*to_device(args)))
    assert got.shape == (heads, m, keys)
    for head in (0, heads - 1):
        sliced = tuple(_heads(value, head) for value in args)
        check(got[head:head + 1], implementation(operation, "numpy")(*sliced))


# ---------------------------------------------------------------- numba.cuda in the simulator


SIMULATOR_SHAPES = ((1, 96), (7, 96))


@needs_numba_cuda
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda kernel: kernel.name)
def test_numba_cuda_awkward_shapes(kernel):
    """1 and 7 rows (keys) of dim 96 (12 groups of 8, not a power of two), float16 input
    where the kernel takes floats: NumPy input, so in the simulator where there is no GPU."""
    rng = np.random.default_rng(sum(map(ord, kernel.name)))
    function = implementation(kernel.operation, "numba.cuda")
    for (rows, dim), dtype in itertools.product(SIMULATOR_SHAPES, kernel.dtypes()[:1]):
        case = kernel.build(rows, dim, dtype, rng)
        case.check(_restrict(function(*case.args), case.sample), reference(kernel, case))


@needs_numba_cuda
def test_numba_cuda_attention_97_tokens():
    """A block of 97 tokens (threads_for(97) = 128: 31 threads without a token), dim 12 (a
    partial group of codes), three queries, float16 queries and factors."""
    rng = np.random.default_rng(970)
    inputs = attention_inputs(rng, heads=1, blocks=1, block=97, m=3, dim=12, key_bits=3,
                              value_bits=5)
    for name in FLOAT_FIELDS:
        inputs[name] = inputs[name].astype(np.float16)
    got = implementation("codebook_attention", "numba.cuda")(**inputs)
    assert all(isinstance(array, np.ndarray) for array in got)
    assert_partials_close(got, upcast(inputs))


def test_numba_cuda_hadamard_refuses_segments_past_static_shared_memory():
    """The numba.cuda Hadamard stage keeps at least one row of its segment in shared memory:
    a segment of 2**14 float32 (64 KB) would run in the simulator but not compile for a device
    (48 KB of static shared memory per block), so the wrapper refuses it everywhere, before
    any launch, as the CuPy one refuses segments past 2**MAX_LOG_SIZE."""
    from latkv._gpu import numba_hadamard

    assert numba_hadamard.MAX_SEGMENT == 1 << 13
    assert max(numba_hadamard.TILE_ELEMENTS, numba_hadamard.MAX_SEGMENT) * 4 \
        <= numba_hadamard.STATIC_SHARED_LIMIT
    size = 1 << 14
    with pytest.raises(ValueError, match="shared memory"):
        numba_hadamard.hadamard_segment(np.zeros((1, size), np.float32), 0, size,
                                        np.ones(size, np.float32), False)
