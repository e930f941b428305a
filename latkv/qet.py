"""QET: element substitution trees, product quantization of the reordered columns, residuals.

QET ("Quantum Entanglement Trees", Wang et al., arXiv 2407.03637; the authors' research code
is QET-release/QET-release) quantizes a *matrix*: here each head's block of ``block``
consecutive tokens, ``(rows, dim)``. Three steps:

1. **Element substitution** (the "entanglement tree", depth ``layers``): each row's adjacent
   pairs ``(x_2i, x_2i+1)`` become ``min`` and ``max``, with one indicator bit
   ``x_2i < x_2i+1`` per pair; the minima form the left half of the row and the maxima the
   right half, and each half is treated the same way again, ``layers`` times. Columns of the
   reordered matrix then hold values of similar rank, which a product quantizer's column-group
   codebooks fit better. It costs ``layers * dim / 2`` indicator bits per row (0.5 bits per
   coordinate per layer) and is exactly invertible (`disentangle`).
2. **Product quantization** of the reordered matrix: ``subspaces`` groups of ``dim /
   subspaces`` consecutive columns, each with a k-means codebook of ``K`` codewords fitted to
   this block (`kmeans`, deterministic for the seed), quantized to ``codebook_bits`` bits by
   one min-max grid per codebook (the code's "CQO"), and one code of ``ceil(log2 K)`` bits per
   row and group.
3. **Residual clustering** ("RQO"): a second product quantizer, without substitution, on the
   residual ``x - x_hat``; the budget left after the indicator bits is split between the stages
   as ``stage_share`` (the code's default 0.7 / 0.3).

``K`` of each stage is the largest (at most the block's rows and ``2^16``) whose codebook,
grid and codes fit the stage's share of ``bits * rows * dim`` (1 if none does: a block too short
for the budget then exceeds it): the bits are exact and every part is counted.

This module is the NumPy reference; ``backend="numba"`` (the default for NumPy inputs)
runs k-means' nearest-codeword search and cluster sums in `latkv._cpu.kmeans`, bit-exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from latkv._backend import array_module
from latkv.checks import check_dashed, check_int, check_rate
from latkv.container import Codes
from latkv.packing import pack_bits, packed_length, unpack_bits
from latkv.quantizer import Quantizer
from latkv.registry import register

MAX_CODEWORDS = 1 << 16
GRID_BYTES = 8  # float32 minimum and step of a codebook's min-max grid


# --------------------------------------------------------------------------- substitution


def entangle(x: np.ndarray, layers: int) -> tuple[np.ndarray, np.ndarray]:
    """Element substitution tree: each row's adjacent pairs become minima and maxima.

    Level ``l`` splits every part of the previous level into the minima and maxima of its
    adjacent pairs; ``indicators[l]`` holds ``a < b`` for the pairs of all parts, part by part.
    Every reordered row is a permutation of its input row; `disentangle` inverts it exactly.

    Parameters
    ----------
    x : (rows, dim) float32
        ``dim`` a multiple of ``2^layers``.
    layers : int
        Depth of the tree, ``>= 0``.

    Returns
    -------
    reordered : (rows, dim), the dtype of ``x``
    indicators : (layers, rows, dim / 2) bool

    Examples
    --------
    The pairs ``(3, 1)`` and ``(2, 0)`` give the minima ``1, 0`` and the maxima ``3, 2``;
    a second layer splits each half again:

    >>> import numpy as np
    >>> from latkv.qet import entangle
    >>> x = np.array([[3, 1, 2, 0]], np.float32)
    >>> entangle(x, 1)
    (array([[1., 0., 3., 2.]], dtype=float32), array([[[False, False]]]))
    >>> entangle(x, 2)[0]
    array([[0., 1., 2., 3.]], dtype=float32)
    """
    parts = [x]
    indicators = []
    for _ in range(layers):
        split, level = [], []
        for part in parts:
            a, b = part[:, 0::2], part[:, 1::2]
            level.append(a < b)
            split += [np.minimum(a, b), np.maximum(a, b)]
        parts = split
        indicators.append(np.concatenate(level, axis=1))
    rows, dim = x.shape
    stacked = (np.stack(indicators) if indicators
               else np.zeros((0, rows, dim // 2), dtype=bool))
    return np.concatenate(parts, axis=1), stacked


def disentangle(y: np.ndarray, indicators: np.ndarray) -> np.ndarray:
    """The inverse of `entangle`: put every element back in its place.

    Parameters
    ----------
    y : (rows, dim)
        A reordered matrix (or its reconstruction); ``dim`` a multiple of ``2^layers``.
    indicators : (layers, rows, dim / 2) bool
        `entangle`'s indicators.

    Returns
    -------
    (rows, dim), the dtype of ``y``

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.qet import disentangle, entangle
    >>> x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    >>> reordered, indicators = entangle(x, 3)
    >>> indicators.shape, bool(np.array_equal(np.sort(reordered), np.sort(x)))
    ((3, 3, 4), True)
    >>> bool(np.array_equal(disentangle(reordered, indicators), x))
    True
    """
    layers = indicators.shape[0]
    rows, dim = y.shape
    parts = np.split(y, 1 << layers, axis=1)
    for level in range(layers - 1, -1, -1):
        flags = np.split(indicators[level], 1 << level, axis=1)
        merged = []
        for j, flag in enumerate(flags):
            small, large = parts[2 * j], parts[2 * j + 1]
            part = np.empty((rows, 2 * small.shape[1]), dtype=y.dtype)
            part[:, 0::2] = np.where(flag, small, large)
            part[:, 1::2] = np.where(flag, large, small)
            merged.append(part)
        parts = merged
    return parts[0]


# --------------------------------------------------------------------------- k-means


def nearest_codeword_reference(points: np.ndarray, codewords: np.ndarray) -> np.ndarray:
    """Index of the nearest codeword of each point: ``sum_j (p_j - c_j)^2`` in float64,
    accumulated in coordinate order; the lowest index wins ties.

    Parameters
    ----------
    points : (n, d) float64
    codewords : (k, d) float64

    Returns
    -------
    (n,) int64

    Examples
    --------
    ``0.5`` is equally far from ``0`` and ``1``; the lower index wins:

    >>> import numpy as np
    >>> from latkv.qet import nearest_codeword_reference
    >>> nearest_codeword_reference(np.array([[0.1], [0.9], [0.5]]), np.array([[0.0], [1.0]]))
    array([0, 1, 0])
    """
    distances = np.zeros((points.shape[0], codewords.shape[0]), dtype=np.float64)
    for j in range(points.shape[1]):
        distances += (points[:, None, j] - codewords[None, :, j]) ** 2
    return distances.argmin(axis=1)


def cluster_sums_reference(points: np.ndarray, labels: np.ndarray,
                           k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums (rows added in order) and counts.

    Parameters
    ----------
    points : (n, d) float64
    labels : (n,) int64
        In ``[0, k)``.
    k : int

    Returns
    -------
    sums : (k, d) float64
    counts : (k,) int64

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.qet import cluster_sums_reference
    >>> points = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    >>> sums, counts = cluster_sums_reference(points, np.array([0, 2, 0]), 3)
    >>> sums.tolist(), counts.tolist()
    ([[6.0, 8.0], [0.0, 0.0], [3.0, 4.0]], [2, 0, 1])
    """
    sums = np.zeros((k, points.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, points)
    return sums, np.bincount(labels, minlength=k).astype(np.int64)


def _kernels(backend: str) -> tuple[Any, Any]:
    if backend == "numba":
        from latkv._cpu.kmeans import cluster_sums, nearest_codeword

        return nearest_codeword, cluster_sums
    return nearest_codeword_reference, cluster_sums_reference


def nearest_codeword(points: np.ndarray, codewords: np.ndarray, backend: str = "numpy"
                     ) -> np.ndarray:
    """`nearest_codeword_reference` on ``backend`` (``"numpy"`` or ``"numba"``, bit-exact).

    Parameters
    ----------
    points : (n, d) float64
    codewords : (k, d) float64
    backend : {"numpy", "numba"}

    Returns
    -------
    (n,) int64

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.qet import nearest_codeword
    >>> points = np.array([[0.0, 0.0], [2.0, 2.0], [1.0, 1.0]])
    >>> nearest_codeword(points, np.array([[2.0, 2.0], [0.0, 0.0]]))
    array([1, 0, 0])
    """
    return _kernels(backend)[0](points, codewords)


def kmeans(points: np.ndarray, k: int, iterations: int, rng: np.random.Generator,
           backend: str = "numpy") -> np.ndarray:
    """Lloyd's k-means from the rows at ``k`` distinct indices drawn by ``rng``.

    An empty cluster keeps its centroid; stops early when no centroid moves. Deterministic
    for the state of ``rng`` (one ``rng.choice`` call), and bit-identical on both backends.

    Parameters
    ----------
    points : (n, d) float64
    k : int
        ``1 <= k <= n``.
    iterations : int
        At most this many Lloyd steps.
    rng : numpy.random.Generator
    backend : {"numpy", "numba"}
        Where `nearest_codeword` and the cluster sums run.

    Returns
    -------
    (k, d) float64
        The centroids.

    Examples
    --------
    Two clusters far apart: from any two starting rows, the centroids end at their means:

    >>> import numpy as np
    >>> from latkv.qet import kmeans
    >>> points = np.array([[0.0], [1.0], [10.0], [11.0]])
    >>> centroids = kmeans(points, 2, 10, np.random.default_rng(0))
    >>> centroids.shape, sorted(centroids[:, 0].tolist())
    ((2, 1), [0.5, 10.5])
    """
    nearest, sums_of = _kernels(backend)
    centroids = points[rng.choice(points.shape[0], size=k, replace=False)].copy()
    for _ in range(iterations):
        labels = nearest(points, centroids)
        sums, counts = sums_of(points, labels, k)
        filled = counts > 0
        updated = centroids.copy()
        updated[filled] = sums[filled] / counts[filled, None]
        if np.array_equal(updated, centroids):
            break
        centroids = updated
    return centroids


# --------------------------------------------------------------------------- budget


def code_bits(codewords: int) -> int:
    """Bits of one code: ``ceil(log2 K)``, at least 1.

    Parameters
    ----------
    codewords : int
        ``K >= 1``.

    Returns
    -------
    int

    Examples
    --------
    >>> from latkv.qet import code_bits
    >>> [code_bits(k) for k in (1, 2, 3, 4, 5, 256, 257)]
    [1, 1, 2, 2, 3, 8, 9]
    """
    return max(1, (codewords - 1).bit_length())


def wide_bytes(count: int, bits: int) -> int:
    """Bytes of ``count`` values of ``bits <= 16`` bits: a low and a high packed array.

    ``packed_length(count, min(bits, 8))`` plus ``packed_length(count, bits - 8)`` when
    ``bits > 8`` (`pack_wide`'s arrays).

    Parameters
    ----------
    count : int
    bits : int
        ``1 .. 16``.

    Returns
    -------
    int

    Examples
    --------
    Ten 12-bit values: 10 bytes of low bytes and 5 of high nibbles:

    >>> from latkv.qet import wide_bytes
    >>> wide_bytes(10, 12), wide_bytes(10, 3)
    (15, 4)
    """
    size = packed_length(count, min(bits, 8))
    return size + (packed_length(count, bits - 8) if bits > 8 else 0)


def wide_layout(name: str, lead: tuple[int, ...], count: int,
                bits: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """The arrays of `pack_wide` for ``count`` values per leading index.

    Parameters
    ----------
    name : str
        The arrays are ``{name}_low`` and, when ``bits > 8``, ``{name}_high``.
    lead : tuple of int
        Leading shape (heads, blocks).
    count : int
        Values per leading index.
    bits : int
        ``1 .. 16``.

    Returns
    -------
    dict
        ``{array name: (shape, "uint8")}``; the shapes are ``(*lead, packed length)``.

    Examples
    --------
    >>> from latkv.qet import wide_layout
    >>> wide_layout("codes", (2,), 10, 12)
    {'codes_low': ((2, 10), 'uint8'), 'codes_high': ((2, 5), 'uint8')}
    >>> wide_layout("codes", (2,), 10, 3)
    {'codes_low': ((2, 4), 'uint8')}
    """
    layout = {f"{name}_low": ((*lead, packed_length(count, min(bits, 8))), "uint8")}
    if bits > 8:
        layout[f"{name}_high"] = ((*lead, packed_length(count, bits - 8)), "uint8")
    return layout


def pack_wide(name: str, values: np.ndarray, bits: int) -> dict[str, np.ndarray]:
    """``values`` as `wide_layout`'s arrays: the low 8 bits (or all of them) packed at
    ``min(bits, 8)`` bits, the rest at ``bits - 8``.

    Parameters
    ----------
    name : str
        Prefix of the array names.
    values : (...) unsigned integer
        Below ``2^bits``; packed flat, in C order.
    bits : int
        ``1 .. 16``.

    Returns
    -------
    dict of str to (packed length,) uint8
        ``{name}_low`` and, when ``bits > 8``, ``{name}_high``; `wide_bytes` bytes in all.

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.qet import pack_wide, unpack_wide, wide_bytes
    >>> values = np.random.default_rng(0).integers(0, 4096, size=10)
    >>> arrays = pack_wide("codes", values, 12)
    >>> {k: v.shape for k, v in arrays.items()}, wide_bytes(10, 12)
    ({'codes_low': (10,), 'codes_high': (5,)}, 15)
    >>> bool(np.array_equal(unpack_wide(arrays, "codes", 12, 10), values))
    True
    """
    values = values.reshape(-1).astype(np.uint16)
    arrays = {f"{name}_low": pack_bits((values & 0xFF).astype(np.uint8), min(bits, 8),
                                       backend="numpy", check=False)}
    if bits > 8:
        arrays[f"{name}_high"] = pack_bits((values >> 8).astype(np.uint8), bits - 8,
                                           backend="numpy", check=False)
    return arrays


def unpack_wide(arrays: dict[str, np.ndarray], name: str, bits: int, count: int) -> np.ndarray:
    """The inverse of `pack_wide`.

    Parameters
    ----------
    arrays : dict of str to uint8 ndarray
        Holding ``{name}_low`` (and ``{name}_high`` when ``bits > 8``); other keys ignored.
    name : str
    bits : int
        ``1 .. 16``, as packed.
    count : int
        Number of values.

    Returns
    -------
    (count,) uint16

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.qet import pack_wide, unpack_wide
    >>> values = np.array([0, 1, 511, 65535])
    >>> unpack_wide(pack_wide("v", values, 16), "v", 16, 4)
    array([    0,     1,   511, 65535], dtype=uint16)
    """
    values = unpack_bits(arrays[f"{name}_low"], min(bits, 8), count,
                         backend="numpy").astype(np.uint16)
    if bits > 8:
        high = unpack_bits(arrays[f"{name}_high"], bits - 8, count, backend="numpy")
        values |= high.astype(np.uint16) << 8
    return values


def stage_bits(rows: int, dim: int, subspaces: int, codewords: int, codebook_bits: int) -> int:
    """Exact bits of one product-quantizer stage of a block (codebook, grid, codes).

    ``8 (wide_bytes(K dim, codebook_bits) + 8 + wide_bytes(rows subspaces, code_bits(K)))``:
    the quantized codebook, its float32 minimum and step, and one code per row and group.

    Parameters
    ----------
    rows : int
    dim : int
    subspaces : int
    codewords : int
        ``K``.
    codebook_bits : int

    Returns
    -------
    int

    Examples
    --------
    128 rows of dim 64, 4 groups of 16 codewords at 10 bits: ``16 * 64`` elements of
    ``1 + 1/4`` bytes, 8 grid bytes, ``128 * 4`` codes of 4 bits:

    >>> from latkv.qet import stage_bits
    >>> stage_bits(128, 64, 4, 16, 10) == 8 * (16 * 64 * 5 // 4 + 8 + 128 * 4 // 2)
    True
    """
    return 8 * (wide_bytes(codewords * dim, codebook_bits) + GRID_BYTES
                + wide_bytes(rows * subspaces, code_bits(codewords)))


def choose_codewords(budget: float, rows: int, dim: int, subspaces: int,
                     codebook_bits: int) -> int:
    """The largest ``K <= min(rows, 2^16)`` whose stage fits ``budget`` bits (1 if none);
    the stage's size never falls as ``K`` grows, so a bisection finds it.

    Parameters
    ----------
    budget : float
        Bits (`stage_bits`).
    rows, dim, subspaces, codebook_bits : int
        As for `stage_bits`.

    Returns
    -------
    int
        ``K``.

    Examples
    --------
    >>> from latkv.qet import choose_codewords, stage_bits
    >>> k = choose_codewords(20000, 128, 64, 4, 10)
    >>> stage_bits(128, 64, 4, k, 10) <= 20000 < stage_bits(128, 64, 4, k + 1, 10)
    True
    >>> choose_codewords(10, 128, 64, 4, 10)  # nothing fits
    1
    """
    low, high = 1, min(rows, MAX_CODEWORDS)
    while low < high:
        middle = (low + high + 1) // 2
        if stage_bits(rows, dim, subspaces, middle, codebook_bits) <= budget:
            low = middle
        else:
            high = middle - 1
    return low


# --------------------------------------------------------------------------- one stage


def quantize_codebook(codebook: np.ndarray, bits: int) -> tuple[np.ndarray, np.float32,
                                                                 np.float32]:
    """Min-max grid of ``2^bits`` levels over the whole codebook.

    ``step = (max - min) / (2^bits - 1)`` in float32 (1 if the codebook is constant) and
    ``levels = clip(rint((codebook - min) / step), 0, 2^bits - 1)``.

    Parameters
    ----------
    codebook : (...) float
    bits : int
        ``1 .. 16``.

    Returns
    -------
    levels : (...) uint16
        The shape of ``codebook``.
    minimum : numpy.float32
    step : numpy.float32

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.qet import codebook_values, quantize_codebook
    >>> levels, minimum, step = quantize_codebook(np.array([[-1.0, 0.0, 2.0]]), 2)
    >>> levels, float(minimum), float(step)
    (array([[0, 1, 3]], dtype=uint16), -1.0, 1.0)
    >>> codebook_values(levels, minimum, step)
    array([[-1.,  0.,  2.]], dtype=float32)
    """
    minimum = np.float32(codebook.min())
    step = np.float32((np.float32(codebook.max()) - minimum) / np.float32((1 << bits) - 1))
    if step == 0:
        step = np.float32(1.0)
    levels = np.clip(np.rint((codebook.astype(np.float32) - minimum) / step), 0, (1 << bits) - 1)
    return levels.astype(np.uint16), minimum, step


def codebook_values(levels: np.ndarray, minimum: Any, step: Any) -> np.ndarray:
    """The codebook of a min-max grid: ``levels * step + minimum`` in float32.

    Parameters
    ----------
    levels : (...) uint16
    minimum, step : float32 scalars
        From `quantize_codebook`.

    Returns
    -------
    (...) float32

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.qet import codebook_values
    >>> codebook_values(np.array([0, 1, 3], np.uint16), np.float32(-1), np.float32(0.5))
    array([-1. , -0.5,  0.5], dtype=float32)
    """
    return levels.astype(np.float32) * np.float32(step) + np.float32(minimum)


def fit_stage(y: np.ndarray, subspaces: int, codewords: int, codebook_bits: int,
              iterations: int, rng: np.random.Generator, backend: str = "numpy"
              ) -> tuple[np.ndarray, np.ndarray, np.float32, np.float32]:
    """Fit and apply one product quantizer to ``y``.

    One `kmeans` codebook per group of ``dim / subspaces`` consecutive columns (all drawing
    from ``rng`` in turn), one min-max grid over all of them (`quantize_codebook`), then the
    nearest quantized codeword of every row and group.

    Parameters
    ----------
    y : (rows, dim) float32
        ``dim`` a multiple of ``subspaces``.
    subspaces : int
    codewords : int
        ``K``, ``1 <= K <= rows``.
    codebook_bits : int
    iterations : int
        Lloyd iterations.
    rng : numpy.random.Generator
    backend : {"numpy", "numba"}

    Returns
    -------
    codes : (rows, subspaces) int64
        Indices into the quantized codebook, below ``K``.
    levels : (subspaces, K, dim / subspaces) uint16
    minimum : numpy.float32
    step : numpy.float32

    Examples
    --------
    With ``K = rows`` every row starts as its own centroid, so each group's reconstruction
    is within ``sqrt(width) step / 2`` of it (the grid's rounding):

    >>> import numpy as np
    >>> from latkv.qet import fit_stage, stage_reconstruction
    >>> y = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    >>> codes, levels, minimum, step = fit_stage(y, 2, 6, 4, 5, np.random.default_rng(0))
    >>> codes.shape, codes.dtype, levels.shape, levels.dtype
    ((6, 2), dtype('int64'), (2, 6, 2), dtype('uint16'))
    >>> error = y - stage_reconstruction(codes, levels, minimum, step)
    >>> bool((np.linalg.norm(error.reshape(6, 2, 2), axis=-1) <= np.sqrt(2) * step / 2).all())
    True
    """
    rows, dim = y.shape
    width = dim // subspaces
    blocks = y.astype(np.float64).reshape(rows, subspaces, width)
    codebook = np.stack([kmeans(np.ascontiguousarray(blocks[:, m]), codewords, iterations,
                                rng, backend) for m in range(subspaces)])
    levels, minimum, step = quantize_codebook(codebook, codebook_bits)
    values = codebook_values(levels, minimum, step).astype(np.float64)
    codes = np.stack([nearest_codeword(np.ascontiguousarray(blocks[:, m]), values[m], backend)
                      for m in range(subspaces)], axis=1)
    return codes, levels, minimum, step


def stage_reconstruction(codes: np.ndarray, levels: np.ndarray, minimum: Any,
                         step: Any) -> np.ndarray:
    """The reconstruction of one stage: each group's quantized codeword, groups side by side.

    Parameters
    ----------
    codes : (rows, subspaces) integer
        Below ``K``.
    levels : (subspaces, K, width) uint16
    minimum, step : float32 scalars
        The grid (`codebook_values`).

    Returns
    -------
    (rows, subspaces width) float32

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.qet import stage_reconstruction
    >>> levels = np.array([[[0], [2]], [[1], [3]]], np.uint16)  # 2 groups, K = 2, width 1
    >>> stage_reconstruction(np.array([[1, 0], [0, 1]]), levels, np.float32(0), np.float32(1))
    array([[2., 1.],
           [0., 3.]], dtype=float32)
    """
    values = codebook_values(levels, minimum, step)
    subspaces = values.shape[0]
    return np.concatenate([values[m][codes[:, m]] for m in range(subspaces)], axis=1)


# --------------------------------------------------------------------------- the quantizer


@register("qet", method_id=6, main_parameter="bits")
@dataclass(frozen=True)
class QET(Quantizer):
    """QET: element substitution tree + product quantization + a residual stage, per block.

    Parameters
    ----------
    dim : int
        A multiple of ``2^layers`` and of ``subspaces``.
    bits : float
        Budget in bits per coordinate, everything counted; 0.5..16.
    layers : int
        Depth of the substitution tree, 0..6 (``layers * 0.5`` bits per coordinate of
        indicators); the authors' default 3.
    subspaces : int
        Column groups of the product quantizers (the code's ``M``; its example uses 4).
    stage_share : sequence of float or str
        Shares of the budget left after the indicators, one per stage (``"0.7-0.3"``).
    codebook_bits : int
        Bits of each quantized codeword element, 1..16 (the code's default 10).
    block : int
        Tokens per block: each head's tokens are cut into blocks of this many rows (the last
        may be shorter), each with its own codebooks.
    iterations : int
        Lloyd iterations of k-means.
    seed : int
        Seeds k-means' starting rows (one generator per head and block).

    Notes
    -----
    Inputs are ``(..., tokens, dim)``. Per block of ``r`` rows: ``layers * r * dim / 2``
    indicator bits, then per stage a codebook of ``K`` codewords of ``dim`` elements at
    ``codebook_bits`` bits, its float32 minimum and step, and ``r * subspaces`` codes of
    ``ceil(log2 K)`` bits. ``code_size`` is for a full block.

    Examples
    --------
    >>> import numpy as np, latkv
    >>> qz = latkv.QET(dim=64, bits=4)
    >>> x = np.random.default_rng(0).standard_normal((2, 128, 64)).astype(np.float32)
    >>> codes = qz.encode(x)
    >>> 8 * codes.nbytes / x.size <= 4
    True
    >>> x_hat = qz.decode(codes)
    >>> x_hat.shape, x_hat.dtype
    ((2, 128, 64), dtype('float32'))
    """

    dim: int
    bits: Any = 4
    layers: int = 3
    subspaces: int = 4
    stage_share: Any = (0.7, 0.3)
    codebook_bits: int = 10
    block: int = 128
    iterations: int = 20
    seed: int = 0

    backends = ("numpy", "numba")

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim", check_int(self.dim, "dim", 2))
        object.__setattr__(self, "bits", check_rate(self.bits, "bits", 0.5, 16))
        object.__setattr__(self, "layers", check_int(self.layers, "layers", 0, 6))
        object.__setattr__(self, "subspaces", check_int(self.subspaces, "subspaces", 1))
        if self.dim % (1 << self.layers) or self.dim % self.subspaces:
            raise ValueError(f"dim ({self.dim}) must be a multiple of 2^layers "
                             f"({1 << self.layers}) and of subspaces ({self.subspaces})")
        share = self.stage_share
        if isinstance(share, (int, float)) and not isinstance(share, bool):
            share = (share,)
        share = tuple(float(v) for v in check_dashed(share, "stage_share", float, "0.7-0.3"))
        if not share or any(v <= 0 for v in share) or sum(share) > 1 + 1e-9:
            raise ValueError(f"stage_share must be positive shares summing to at most 1, "
                             f"got {share}")
        object.__setattr__(self, "stage_share", share)
        object.__setattr__(self, "codebook_bits", check_int(self.codebook_bits,
                                                            "codebook_bits", 1, 16))
        object.__setattr__(self, "block", check_int(self.block, "block", 1))
        object.__setattr__(self, "iterations", check_int(self.iterations, "iterations", 1))
        object.__setattr__(self, "seed", check_int(self.seed, "seed", 0))

    idempotent = None  # codebooks are refitted to whatever is encoded

    # -- sizes -------------------------------------------------------------------------------

    def codewords(self, rows: int) -> tuple[int, ...]:
        """``K`` of each stage for a block of ``rows`` rows."""
        total = float(self.bits) * rows * self.dim
        left = total - packed_length(self.layers * rows * self.dim // 2, 1) * 8
        return tuple(choose_codewords(share * left, rows, self.dim, self.subspaces,
                                      self.codebook_bits) for share in self.stage_share)

    def _block_layout(self, prefix: str, heads: tuple[int, ...],
                      rows: int) -> dict[str, tuple[tuple[int, ...], str]]:
        layout = {}
        if self.layers:
            layout[prefix + "indicators"] = (
                (*heads, packed_length(self.layers * rows * self.dim // 2, 1)), "uint8")
        for s, k in enumerate(self.codewords(rows)):
            layout.update(wide_layout(f"{prefix}codebook{s}", heads, k * self.dim,
                                      self.codebook_bits))
            layout[f"{prefix}grid{s}"] = ((*heads, 2), "float32")
            layout.update(wide_layout(f"{prefix}codes{s}", heads, rows * self.subspaces,
                                      code_bits(k)))
        return layout

    def _blocks(self, tokens: int) -> tuple[int, int]:
        return tokens // self.block, tokens % self.block

    def code_layout(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], str]]:
        if len(shape) < 2:
            raise ValueError(f"QET quantizes blocks of tokens: inputs of shape "
                             f"(..., tokens, dim), got {shape}")
        heads, tokens = tuple(shape[:-2]), shape[-2]
        full, tail = self._blocks(tokens)
        layout = {}
        if full:
            layout.update(self._block_layout("", (*heads, full), self.block))
        if tail:
            layout.update(self._block_layout("tail_", heads, tail))
        return layout

    @property
    def code_size(self) -> float:
        """Bytes per vector of a full block."""
        return self.encoded_nbytes((self.block, self.dim)) / self.block

    # -- one block ---------------------------------------------------------------------------

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, index]))

    def _encode_block(self, x: np.ndarray, rng: np.random.Generator,
                      backend: str) -> dict[str, np.ndarray]:
        rows = x.shape[0]
        arrays: dict[str, np.ndarray] = {}
        reordered, indicators = entangle(x, self.layers)
        if self.layers:
            arrays["indicators"] = pack_bits(indicators.reshape(-1).astype(np.uint8), 1,
                                             backend="numpy", check=False)
        target = reordered
        for s, k in enumerate(self.codewords(rows)):
            codes, levels, minimum, step = fit_stage(target, self.subspaces, k,
                                                     self.codebook_bits, self.iterations, rng,
                                                     backend)
            arrays.update(pack_wide(f"codebook{s}", levels, self.codebook_bits))
            arrays[f"grid{s}"] = np.array([minimum, step], dtype=np.float32)
            arrays.update(pack_wide(f"codes{s}", codes, code_bits(k)))
            target = target - stage_reconstruction(codes, levels, minimum, step)
        return arrays

    def _decode_block(self, arrays: dict[str, np.ndarray], rows: int) -> np.ndarray:
        width = self.dim // self.subspaces
        total = np.zeros((rows, self.dim), dtype=np.float32)
        for s, k in enumerate(self.codewords(rows)):
            levels = unpack_wide(arrays, f"codebook{s}", self.codebook_bits, k * self.dim)
            codes = unpack_wide(arrays, f"codes{s}", code_bits(k), rows * self.subspaces
                                ).astype(np.int64).reshape(rows, self.subspaces)
            if bool((codes >= k).any()):
                raise ValueError(f"codes array 'codes{s}' holds codeword indices of {k} or more")
            minimum, step = arrays[f"grid{s}"]
            total = total + stage_reconstruction(
                codes, levels.reshape(self.subspaces, k, width), minimum, step)
        if not self.layers:
            return total
        indicators = unpack_bits(arrays["indicators"], 1, self.layers * rows * self.dim // 2,
                                 backend="numpy").astype(bool)
        return disentangle(total, indicators.reshape(self.layers, rows, self.dim // 2))

    # -- the interface -----------------------------------------------------------------------

    def _pieces(self, shape: tuple[int, ...]) -> list[tuple[str, int, int, int]]:
        """``(prefix, block index within its arrays, first token, rows)`` of every block."""
        full, tail = self._blocks(shape[-2])
        pieces = [("", b, b * self.block, self.block) for b in range(full)]
        if tail:
            pieces.append(("tail_", -1, full * self.block, tail))
        return pieces

    def encode(self, x: Any, *, backend: str | None = None) -> Codes:
        """Encode ``x : (..., tokens, dim)`` block by block (NumPy).

        Returns
        -------
        Codes
            The arrays of ``code_layout(x.shape)``.
        """
        x = self.check_input(x, min_ndim=2)
        backend = self.check_backend(backend, x)
        if array_module(x) is not np:
            raise ValueError("QET runs on NumPy arrays (Codes.to_numpy / cupy.asnumpy first)")
        y = np.ascontiguousarray(x, dtype=np.float32)
        heads = y.shape[:-2]
        flat = y.reshape(-1, *y.shape[-2:])
        layout = self.code_layout(y.shape)
        arrays = {name: np.zeros(shape, dtype) for name, (shape, dtype) in layout.items()}
        views = {name: a.reshape(-1, *a.shape[len(heads):]) for name, a in arrays.items()}
        pieces = self._pieces(y.shape)
        for h in range(flat.shape[0]):
            for number, (prefix, b, start, rows) in enumerate(pieces):
                block = self._encode_block(flat[h, start:start + rows],
                                           self._rng(h * len(pieces) + number), backend)
                for name, value in block.items():
                    target = views[prefix + name][h]
                    if b >= 0:
                        target[b] = value
                    else:
                        target[...] = value
        return self.make_codes(x, arrays)

    def decode(self, codes: Codes, *, backend: str | None = None) -> Any:
        """Reconstruct ``x_hat : (..., tokens, dim)`` in the encoded dtype."""
        self.check_codes(codes)
        codes = codes.to_numpy()
        shape = tuple(codes.shape)
        heads = shape[:-2]
        out = np.zeros((int(math.prod(heads)), shape[-2], self.dim), dtype=np.float32)
        views = {name: a.reshape(-1, *a.shape[len(heads):]) for name, a in codes.arrays.items()}
        for h in range(out.shape[0]):
            for prefix, b, start, rows in self._pieces(shape):
                block = {name[len(prefix):]: (v[h][b] if b >= 0 else v[h])
                         for name, v in views.items()
                         if name.startswith("tail_") == (prefix == "tail_")}
                out[h, start:start + rows] = self._decode_block(block, rows)
        return out.reshape(shape).astype(codes.dtype, copy=False)
