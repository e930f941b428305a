"""E8Quant: randomized Hadamard rotation, then 8-d groups on the E8 lattice.

Each vector is rotated (`latkv.RandomizedHadamard`, so that every 8-coordinate group is
near-isotropic), cut into ``dim / 8`` groups, divided by a stored step and snapped to the
nearest point of E8 (`latkv.lattice.nearest_e8`). Two storage forms:

Fixed rate (``entropy=False``): a Voronoi code
    The codebook is ``C_b = {λ ∈ E8 : nearest_e8((λ - a) / q) = 0}`` with ``q = 2^b``: the
    E8 points in the Voronoi cell of ``q E8`` (Conway and Sloane, "A fast encoding method
    for lattice codes and quantizers", IEEE Trans. Inf. Theory 29, 1983). It holds exactly
    ``q^8 = 2^(8b)`` points, one per coset of ``q E8``; the small offset
    ``a = (2^-12, 2^-11, ..., 2^-5)`` keeps every ``(λ - a) / q`` off the cell boundaries, so
    no tie rule is involved (``<a, r>`` is never an integer for a root ``r``). A point is
    stored as its 8 labels ``k = λ G^-1 mod q`` (``b`` bits each: exactly ``b`` bits per
    coordinate) with ``G`` the generator matrix of SPLAG ch. 4 eq. (102) (`GENERATOR`), and
    decoded as ``y - q nearest_e8((y - a) / q)`` with ``y = k G``.

    Each vector stores one float16 scale ``s``: a rung of a fixed ladder of candidates
    (`scale_ladder`), the lowest that a coarse-then-fine search (`voronoi_encode_reference`)
    finds at which *every* group's nearest lattice point ``nearest_e8(x / s)`` lies in ``C_b``
    (no overload; the rung just below never fits). Since ``C_b`` is part of E8, that point is then the exact
    nearest codebook point. Why a Voronoi code and not the ``2^(8b)`` shortest vectors or
    QuIP#'s E8P: it exists for every ``b`` (E8P is a 2-bit construction, and a shell-ordered
    codebook of ``2^24`` points has no exact search cheaper than enumeration), encoding and
    decoding are two and one calls of ``nearest_e8``, and the labels are plain ``b``-bit
    integers. Its price is shaping: every group of the vector must fit in the same cell.

Entropy-coded (``entropy=True``): rANS streams
    One float16 step per head (the rows of the token axis share it) scales the rotated
    vectors, ``nearest_e8`` snaps every group, and the points are entropy coded with
    `latkv.entropy` under a static model built from the data and stored. The model uses the
    lattice: a point ``λ = u + c/2`` is its coset bit ``c`` and an integer vector ``u`` with
    an even sum, so ``u_8 ≡ u_1 + ... + u_7 (mod 2)``; the streams are

    * ``coset_stream``: ``c`` of every group (context 0);
    * ``coordinate_stream``: ``u_1 .. u_7`` of every group, offset by ``K = max |u|``
      (context ``1 + c``);
    * ``last_stream``: ``(u_8 - p) / 2 + K`` with ``p`` the parity of ``u_1 + ... + u_7``
      (context ``3 + 2 c + p``): the eighth coordinate costs about one bit less.

    The alphabet is ``2 K + 1``; the model (`latkv.entropy.Model.to_bytes`, 7 contexts) and
    the three streams are stored as variable-length ``uint8`` arrays. ``bits`` is the target:
    the step multiplier is searched (`E8Stage`) so that the measured size of
    everything stored (streams, model, steps, channel statistics) is at most ``bits`` per
    coordinate, as large as the ladder allows. Inputs too small to pay for the model and
    stream headers land above the target; ``Codes.nbytes`` is always the true size. The
    streams are a host-side storage form (NumPy and numba backends); ``decode`` and
    ``scores`` decode them first.

``scores`` use the rotated query and the lattice points times their scale: no key is
rotated back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from latkv import entropy
from latkv._backend import array_module, implementation, resolve_backend
from latkv.channel_split import ChannelSplitQuantizer
from latkv.channel_transform import ChannelTransform
from latkv.checks import check_bits, check_choice, check_int, check_rate
from latkv.lattice import nearest_e8
from latkv.packing import pack_bits, packed_length, unpack_bits
from latkv.registry import register
from latkv.rotations import RandomizedHadamard

#: SPLAG ch. 4, eq. (102): the rows generate E8 (determinant 1)
GENERATOR = np.array(
    [[2, 0, 0, 0, 0, 0, 0, 0],
     [-1, 1, 0, 0, 0, 0, 0, 0],
     [0, -1, 1, 0, 0, 0, 0, 0],
     [0, 0, -1, 1, 0, 0, 0, 0],
     [0, 0, 0, -1, 1, 0, 0, 0],
     [0, 0, 0, 0, -1, 1, 0, 0],
     [0, 0, 0, 0, 0, -1, 1, 0],
     [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]], dtype=np.float64)
#: its inverse; entries are multiples of 1/2, so ``λ G^-1`` is exact in float64
GENERATOR_INVERSE = np.linalg.inv(GENERATOR).round(6)
#: the offset that keeps the Voronoi code's points off the cell boundaries
TIE_OFFSET = (2.0 ** (np.arange(8) - 12)).astype(np.float32)
#: smallest positive float16: the floor of every stored scale and step
SMALLEST_SCALE = 2.0 ** -24
LARGEST_SCALE = 65504.0
#: fixed-rate scale ladder: candidates s = fp16(max|x| / q * 2^(j / 32)) (`scale_ladder`)
SCALE_LADDER = 32
#: entropy step ladder: step = fp16(sigma * sqrt(2 pi e) * 2^-bits * 2^(j / 64)), |j| <= 640
STEP_LADDER = 64
STEP_RANGE = 640
#: the largest |u| the entropy model takes (alphabet 2 K + 1)
MAX_COORDINATE = 4095
NUM_CONTEXTS = 7
STREAMS = ("coset_stream", "coordinate_stream", "last_stream")
ROTATIONS = ("hadamard", "none")


# --------------------------------------------------------------------------- Voronoi code


def voronoi_labels(points: Any, bits: int) -> Any:
    """Labels ``k = λ G^-1 mod 2^bits`` of E8 points ``λ`` (`GENERATOR` is ``G``).

    Two points get the same labels exactly when they differ by a point of ``2^bits E8``, so
    on the Voronoi code ``C_bits`` (one point per coset) the labels are a bijection onto
    ``[0, 2^bits)^8``; `voronoi_points` inverts it.

    Parameters
    ----------
    points : (..., 8) float, NumPy or CuPy
        Points of E8 (half-integers); any float dtype (computed in float64).
    bits : int
        ``q = 2^bits``.

    Returns
    -------
    (..., 8) int64
        In ``[0, 2^bits)``.

    Examples
    --------
    The rows of ``G`` have the unit label vectors, and adding ``q E8`` changes nothing:

    >>> import numpy as np
    >>> from latkv.e8 import GENERATOR, voronoi_labels
    >>> labels = voronoi_labels(GENERATOR, 2)
    >>> labels.dtype, bool(np.array_equal(labels, np.eye(8)))
    (dtype('int64'), True)
    >>> bool(np.array_equal(voronoi_labels(GENERATOR + 4 * GENERATOR[::-1], 2), labels))
    True
    """
    xp = array_module(points)
    k = xp.rint(points.astype(xp.float64) @ xp.asarray(GENERATOR_INVERSE))
    return k.astype(xp.int64) % (1 << bits)


def voronoi_points(labels: Any, bits: int, *, backend: str | None = None) -> Any:
    """The code point of each label vector: ``y - q nearest_e8((y - a) / q)``, ``y = k G``.

    The inverse of `voronoi_labels` on the code ``C_bits`` (``q = 2^bits``, ``a`` =
    `TIE_OFFSET`).

    Parameters
    ----------
    labels : (..., 8) integer, NumPy or CuPy
        In ``[0, 2^bits)``.
    bits : int
        ``q = 2^bits``.
    backend : str, optional
        Where `latkv.lattice.nearest_e8` runs (by default the array module of ``labels``
        picks; all backends give the same points).

    Returns
    -------
    (..., 8) float32
        Points of ``C_bits``.

    Examples
    --------
    At ``bits=1`` the ``2^8`` label vectors give ``2^8`` distinct points of the code, and
    `voronoi_labels` gives the labels back:

    >>> import numpy as np
    >>> from latkv.e8 import in_voronoi_code, voronoi_labels, voronoi_points
    >>> labels = np.array(list(np.ndindex(*[2] * 8)))
    >>> points = voronoi_points(labels, 1, backend="numpy")
    >>> points.shape, points.dtype, len(np.unique(points, axis=0))
    ((256, 8), dtype('float32'), 256)
    >>> bool(in_voronoi_code(points, 1, backend="numpy").all())
    True
    >>> bool(np.array_equal(voronoi_labels(points, 1), labels))
    True
    """
    xp = array_module(labels)
    q = float(1 << bits)
    y = (labels.astype(xp.float64) @ xp.asarray(GENERATOR)).astype(xp.float32)
    shift = nearest_e8((y - xp.asarray(TIE_OFFSET)) / xp.float32(q), backend=backend)
    return y - xp.float32(q) * shift


def in_voronoi_code(points: Any, bits: int, *, backend: str | None = None) -> Any:
    """Whether each E8 point lies in ``C_bits``: ``nearest_e8((λ - a) / 2^bits) == 0``.

    Parameters
    ----------
    points : (..., 8) float32, NumPy or CuPy
        Points of E8.
    bits : int
        ``q = 2^bits``.
    backend : str, optional
        Where `latkv.lattice.nearest_e8` runs.

    Returns
    -------
    (...,) bool

    Examples
    --------
    ``±(2, 2, 0, ..., 0)`` differ by ``4 (1, 1, 0, ..., 0)`` (a point of ``4 E8``) and lie
    on the boundary of the cell of ``4 E8``: the offset `TIE_OFFSET` admits exactly one of
    them. ``4 (1, 1, 0, ..., 0)`` is in the coset of the origin, whose representative is the
    origin:

    >>> import numpy as np
    >>> from latkv.e8 import in_voronoi_code
    >>> points = np.array([[2, 2, 0, 0, 0, 0, 0, 0], [-2, -2, 0, 0, 0, 0, 0, 0],
    ...                    [4, 4, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]], np.float32)
    >>> in_voronoi_code(points, 2, backend="numpy")
    array([ True, False, False,  True])
    """
    xp = array_module(points)
    shift = nearest_e8((points - xp.asarray(TIE_OFFSET)) / xp.float32(1 << bits),
                       backend=backend)
    return ~(shift != 0).any(axis=-1)


def scale_ladder(bits: int) -> tuple[int, np.ndarray]:
    """``(low, multipliers)``: the rungs ``j = low .. high`` as float64 ``2^(j / 32)``.

    Below ``low`` no vector fits, at ``high`` every vector does. With ``m = 2^(j / 32)`` and
    ``s = max|x| m / q``: a group ``x_g`` has ``|x_g| >= max|x|``, its nearest point ``|λ| >=
    |x_g| / s - 1`` (E8's covering radius is 1) and a code point ``|λ| <= q + |a|``, so ``m >=
    q / (q + 1.04)`` is needed; ``|x_g| <= sqrt(8) max|x|`` and ``|λ - a| < q / sqrt(2)`` (the
    inradius of ``q V``) is enough, which ``m >= sqrt(8) q / (q / sqrt(2) - 1.05)``
    guarantees (a 1% margin covers the float16 rounding of ``s``). Every backend takes the
    multipliers from this table, so none depends on its own ``pow``.

    Parameters
    ----------
    bits : int
        ``q = 2^bits``.

    Returns
    -------
    low : int
        ``floor(32 log2(q / (q + 1.04)))``, negative.
    multipliers : (high - low + 1,) float64
        ``multipliers[i] = 2^((low + i) / 32)``, increasing; ``high = ceil(32 log2(1.01
        sqrt(8) q / (q / sqrt(2) - 1.05)))``.

    Examples
    --------
    >>> import math
    >>> from latkv.e8 import scale_ladder
    >>> low, multipliers = scale_ladder(2)
    >>> low == math.floor(32 * math.log2(4 / 5.04)), float(multipliers[-low])
    (True, 1.0)
    >>> bool(multipliers[-1] >= 1.01 * math.sqrt(8) * 4 / (4 / math.sqrt(2) - 1.05))
    True
    """
    q = 1 << bits
    low = math.floor(SCALE_LADDER * math.log2(q / (q + 1.04)))
    high = math.ceil(SCALE_LADDER * math.log2(1.01 * math.sqrt(8) * q / (q / math.sqrt(2) - 1.05)))
    return low, 2.0 ** (np.arange(low, high + 1, dtype=np.float64) / SCALE_LADDER)


def scale_candidate(base: Any, multiplier: Any) -> Any:
    """``max(fp16(base * multiplier), 2^-24)`` as float32 (one rounding, float64 to float16).

    Parameters
    ----------
    base : (...) float64, NumPy or CuPy
        ``max |x| / 2^bits`` of each vector.
    multiplier : float64 scalar or array broadcasting against ``base``
        Rungs of `scale_ladder`.

    Returns
    -------
    (...) float32
        Float16 values, at least the smallest positive float16 ``2^-24``.

    Examples
    --------
    ``1/3`` rounds to the float16 ``1365 / 4096``; tiny products are floored at ``2^-24``:

    >>> import numpy as np
    >>> from latkv.e8 import scale_candidate
    >>> s = scale_candidate(np.array([1.0, 1 / 3, 1e-9]), 1.0)
    >>> s.dtype, s.tolist() == [1.0, 1365 / 4096, 2.0 ** -24]
    (dtype('float32'), True)
    """
    xp = array_module(base)
    s = (base * multiplier).astype(xp.float16).astype(xp.float32)
    return xp.maximum(s, xp.float32(SMALLEST_SCALE))


def voronoi_encode_reference(rotated: Any, multipliers: Any, bits: int, *,
                             backend: str = "numpy") -> tuple[Any, Any]:
    """Scale and labels of each vector: the first fitting rung of the ladder, then its labels.

    Parameters
    ----------
    rotated : (n, dim) float32, ``dim`` a multiple of 8, finite
    multipliers : (r,) float64, `scale_ladder` ``(bits)[1]``
    bits : int, 1..8
    backend : str
        Where `nearest_e8` runs (all backends give the same points).

    Returns
    -------
    scale : (n,) float32 holding float16 values
        With ``base = float64(max_i |x_i|) / 2^bits`` and ``s_i = max(fp16(base *
        multipliers[i]), 2^-24)``: the *coarse* pass tries ``i = 0, 8, 16, ...`` below
        ``r - 1`` and keeps the first rung that fits (``r - 1`` if none does); the *fine* pass
        tries the 7 rungs below it, lowest first, ``i >= 0`` only, and keeps the first that
        fits (else the coarse rung). A rung *fits* when every group's ``λ =
        nearest_e8(float32(x_g / s))`` is in ``C_bits`` (`in_voronoi_code`). Either pass has
        tried the rung just below the chosen one (if there is one), so it does not fit.
    labels : (n, dim) uint8
        `voronoi_labels` of the groups' ``λ`` at the chosen scale.

    Examples
    --------
    The scale is a rung of the ladder, every label has ``bits`` bits, and at the rung just
    below (none of these vectors chose rung 0) some group of the vector overloads (its
    nearest point leaves the code):

    >>> import numpy as np
    >>> from latkv.e8 import (in_voronoi_code, scale_candidate, scale_ladder,
    ...                       voronoi_encode_reference)
    >>> from latkv.lattice import nearest_e8
    >>> x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    >>> _, multipliers = scale_ladder(2)
    >>> scale, labels = voronoi_encode_reference(x, multipliers, 2)
    >>> scale.shape, scale.dtype, labels.shape, labels.dtype, int(labels.max()) < 4
    ((3,), dtype('float32'), (3, 16), dtype('uint8'), True)
    >>> base = np.abs(x).max(axis=1).astype(np.float64) / 4
    >>> rung = np.array([np.flatnonzero(scale_candidate(b, multipliers) == s)[0]
    ...                  for b, s in zip(base, scale)])
    >>> below = scale_candidate(base, multipliers[rung - 1])
    >>> points = nearest_e8(x.reshape(3, 2, 8) / below[:, None, None], backend="numpy")
    >>> in_voronoi_code(points, 2, backend="numpy").all(axis=-1)
    array([False, False, False])
    """
    xp = array_module(rotated)
    n, dim = rotated.shape
    groups = rotated.reshape(n, dim // 8, 8)
    base = xp.abs(rotated).max(axis=-1).astype(xp.float64) / (1 << bits)
    multipliers = xp.asarray(multipliers)
    last = multipliers.shape[0] - 1

    def points_at(rows: Any, rung: Any) -> Any:
        s = scale_candidate(base[rows], multipliers[rung])
        return nearest_e8(groups[rows] / s[:, None, None], backend=backend)

    def fits(rows: Any, rung: Any) -> Any:
        return in_voronoi_code(points_at(rows, rung), bits, backend=backend).all(axis=-1)

    coarse = xp.full(n, last, dtype=xp.int64)
    pending = xp.arange(n)
    for rung in range(0, last, 8):
        if pending.size == 0:
            break
        ok = fits(pending, xp.full(pending.shape[0], rung, dtype=xp.int64))
        coarse[pending[ok]] = rung
        pending = pending[~ok]
    chosen = coarse.copy()
    pending = xp.arange(n)
    for step in range(7, 0, -1):            # rungs coarse - 7 .. coarse - 1, lowest first
        if pending.size == 0:
            break
        rung = coarse[pending] - step
        ok = (rung >= 0) & fits(pending, xp.maximum(rung, 0))
        chosen[pending[ok]] = rung[ok]
        pending = pending[~ok]
    everything = xp.arange(n)
    labels = voronoi_labels(points_at(everything, chosen), bits).reshape(n, dim)
    return scale_candidate(base, multipliers[chosen]), labels.astype(xp.uint8)


def voronoi_decode_reference(labels: Any, scale: Any, bits: int, *,
                             backend: str = "numpy") -> Any:
    """`voronoi_points` of each 8-label group times its vector's scale.

    Parameters
    ----------
    labels : (n, dim) uint8
        Below ``2^bits``; ``dim`` a multiple of 8.
    scale : (n,) float32
    bits : int
        Bits per label, as encoded.
    backend : str
        Where `latkv.lattice.nearest_e8` runs.

    Returns
    -------
    (n, dim) float32

    Examples
    --------
    Each group was snapped to its nearest E8 point at its scale, and E8's covering radius is
    1, so every group of the decoded vector lies within ``scale`` of the input's:

    >>> import numpy as np
    >>> from latkv.e8 import scale_ladder, voronoi_decode_reference, voronoi_encode_reference
    >>> x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    >>> scale, labels = voronoi_encode_reference(x, scale_ladder(2)[1], 2)
    >>> x_hat = voronoi_decode_reference(labels, scale, 2)
    >>> x_hat.shape, x_hat.dtype
    ((3, 16), dtype('float32'))
    >>> error = np.linalg.norm((x - x_hat).reshape(3, 2, 8), axis=-1)
    >>> bool((error <= scale[:, None]).all())
    True
    """
    n, dim = labels.shape
    points = voronoi_points(labels.reshape(n, dim // 8, 8), bits, backend=backend)
    return (points * scale[:, None, None]).reshape(n, dim)


# --------------------------------------------------------------------------- lattice symbols


def lattice_symbols(points: Any, offset: int) -> tuple[np.ndarray, ...]:
    """The three symbol streams of E8 points and their contexts (module docstring).

    A point ``λ = u + c/2`` becomes its coset bit ``c``, ``u_1 .. u_7`` and ``(u_8 - p) / 2``
    with ``p`` the parity of ``u_1 + ... + u_7`` (exact: ``u`` has an even sum).

    Parameters
    ----------
    points : (g, 8) float, NumPy
        Points of E8 (half-integers; any float dtype) with ``|λ_i| <= offset``, so that the
        offset symbols lie in ``[0, 2 K]``.
    offset : int
        ``K``: added to the coordinate and last symbols.

    Returns
    -------
    coset : (g,) int64
        ``c``, 0 or 1 (context 0).
    coordinates : (7 g,) int64
        ``u_1 + K .. u_7 + K`` of every group, group by group.
    last : (g,) int64
        ``(u_8 - p) / 2 + K``.
    coordinate_contexts : (7 g,) int64
        ``1 + c``.
    last_contexts : (g,) int64
        ``3 + 2 c + p``.

    Examples
    --------
    ``0.5 * 1`` and ``(-1.5, 0.5, ..., 0.5)`` are in the half-integer coset; ``(1, 0, ...,
    0, 3)`` has ``u_1 + ... + u_7 = 1`` odd, so its last symbol is ``(3 - 1) / 2 + K``:

    >>> import numpy as np
    >>> from latkv.e8 import lattice_symbols, points_from_symbols
    >>> points = np.array([[0.5] * 8, [1, 0, 0, 0, 0, 0, 0, 3], [-1.5] + [0.5] * 7],
    ...                   np.float32)
    >>> coset, coordinates, last, coordinate_contexts, last_contexts = lattice_symbols(
    ...     points, 3)
    >>> coset, last, last_contexts
    (array([1, 0, 1]), array([3, 4, 3]), array([5, 4, 5]))
    >>> coordinates.reshape(3, 7)[:, 0], coordinate_contexts.reshape(3, 7)[:, 0]
    (array([3, 4, 1]), array([2, 1, 2]))
    >>> bool(np.array_equal(points_from_symbols(coset, coordinates, last, 3), points))
    True
    """
    doubled = np.rint(points.astype(np.float64) * 2).astype(np.int64)
    coset = doubled[:, 0] & 1
    u = (doubled - coset[:, None]) // 2
    parity = u[:, :7].sum(axis=1) & 1
    last = (u[:, 7] - parity) // 2
    return (coset, (u[:, :7] + offset).ravel(), last + offset,
            np.repeat(1 + coset, 7), 3 + 2 * coset + parity)


def points_from_symbols(coset: np.ndarray, coordinates: np.ndarray, last: np.ndarray,
                        offset: int) -> np.ndarray:
    """The inverse of `lattice_symbols`: the E8 points of the three symbol streams.

    Parameters
    ----------
    coset : (g,) int64
        0 or 1.
    coordinates : (7 g,) int64
        Offset by ``offset``.
    last : (g,) int64
        Offset by ``offset``.
    offset : int
        The ``K`` that `lattice_symbols` added.

    Returns
    -------
    (g, 8) float32

    Examples
    --------
    All symbols at the offset (coset 0, ``u_1 .. u_7 = 0``, parity 0) give the origin;
    coset 1 gives ``0.5 * 1``:

    >>> import numpy as np
    >>> from latkv.e8 import points_from_symbols
    >>> points = points_from_symbols(np.array([0, 1]), np.full(14, 2), np.full(2, 2), 2)
    >>> points.dtype, points.tolist() == [[0.0] * 8, [0.5] * 8]
    (dtype('float32'), True)
    """
    u = np.empty((coset.shape[0], 8), dtype=np.int64)
    u[:, :7] = coordinates.reshape(-1, 7) - offset
    parity = u[:, :7].sum(axis=1) & 1
    u[:, 7] = 2 * (last - offset) + parity
    return (u + 0.5 * coset[:, None]).astype(np.float32)


def _stream_header_bytes(symbols: int) -> int:
    return 1 + 4 * min(entropy.DEFAULT_LANES, max(symbols, 1))


# --------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class E8Stage:
    """E8 on vectors of length ``dim`` (a multiple of 8): the stage inside `E8Quant`.

    Unlike the other stages it needs the input's leading shape to decode (the entropy-coded
    steps are per head), so `E8Quant` calls `rotated_estimate` with it instead of a
    ``decode`` / ``scores`` pair.

    Parameters
    ----------
    dim : int
        A multiple of 8.
    bits : int or float
        Label bits per coordinate (fixed rate) or the target rate (``entropy_coded``).
    entropy_coded : bool
        rANS streams instead of fixed-size labels (module docstring).
    rotation_kind : {"hadamard", "none"}
    seed : int
        Seeds the `latkv.RandomizedHadamard` rotation.
    side_bits : float
        Bits per vector of channel statistics, charged to the entropy target.

    Examples
    --------
    Fixed rate, without the rotation: ``packed_length(16, 2) + 2 = 6`` bytes per vector, and
    every group of the estimate lies within its vector's scale of the input:

    >>> import numpy as np
    >>> from latkv.e8 import E8Stage
    >>> stage = E8Stage(dim=16, bits=2, entropy_coded=False, rotation_kind="none", seed=0)
    >>> stage.nbytes, stage.layout((3,))
    (6, {'labels': ((3, 4), 'uint8'), 'scale': ((3,), 'float16')})
    >>> x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    >>> arrays = stage.encode(x, "numpy")
    >>> arrays["labels"].shape, arrays["scale"].dtype
    ((3, 4), dtype('float16'))
    >>> estimate = stage.rotated_estimate(arrays, (3,), "numpy")
    >>> error = np.linalg.norm((x - estimate).reshape(3, 2, 8), axis=-1)
    >>> bool((error <= arrays["scale"].astype(np.float32)[:, None]).all())
    True
    """

    dim: int
    bits: float
    entropy_coded: bool
    rotation_kind: str
    seed: int
    side_bits: float = 0.0  # bits per vector of channel statistics (entropy target)
    rotation: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rotation", RandomizedHadamard(self.dim, self.seed)
                           if self.rotation_kind == "hadamard" else None)

    @property
    def nbytes(self) -> float:
        """Bytes per vector: ``packed_length(dim, bits) + 2`` at fixed rate; the target
        ``dim bits / 8`` when entropy coded."""
        if self.entropy_coded:
            return self.dim * self.bits / 8     # the target
        return packed_length(self.dim, int(self.bits)) + 2

    def layout(self, lead: tuple[int, ...]) -> dict[str, tuple[tuple[int | None, ...], str]]:
        """``{name: (shape, dtype)}`` of the arrays for inputs ``(*lead, dim)``.

        Fixed rate: ``labels (*lead, packed_length(dim, bits))`` uint8 and ``scale lead``
        float16. Entropy coded: ``step lead[:-1]`` float16 (one per head) and the
        variable-length uint8 ``model`` and `STREAMS` (shape ``(None,)``).
        """
        if not self.entropy_coded:
            return {"labels": ((*lead, packed_length(self.dim, int(self.bits))), "uint8"),
                    "scale": (lead, "float16")}
        layout: dict[str, tuple[tuple[int | None, ...], str]] = {
            "step": (tuple(lead[:-1]), "float16"), "model": ((None,), "uint8")}
        layout.update({name: ((None,), "uint8") for name in STREAMS})
        return layout

    def rotate(self, y: Any, backend: str) -> Any:
        """``y : (..., dim)`` rotated (or as contiguous float32 with ``rotation_kind="none"``),
        ``(..., dim)`` float32."""
        xp = array_module(y)
        if self.rotation is None:
            return xp.ascontiguousarray(y, dtype=xp.float32)
        return self.rotation.apply(y, backend=backend)

    def unrotate(self, y: Any, backend: str) -> Any:
        """The inverse of `rotate` on ``y : (..., dim)`` float32 (``y`` itself without a
        rotation)."""
        return y if self.rotation is None else self.rotation.inverse(y, backend=backend)

    # -- fixed rate --------------------------------------------------------------------------

    def _encode_fixed(self, rotated: Any, backend: str) -> dict[str, Any]:
        xp = array_module(rotated)
        bits = int(self.bits)
        lead = rotated.shape[:-1]
        flat = xp.ascontiguousarray(rotated.reshape(-1, self.dim))
        _, multipliers = scale_ladder(bits)
        if bool((xp.abs(flat).max() / (1 << bits) * multipliers[-1] >= LARGEST_SCALE)):
            raise ValueError(f"x holds values too large for a float16 scale at bits={bits} "
                             f"(max |rotated x| must stay below "
                             f"{LARGEST_SCALE * (1 << bits) / multipliers[-1]:.4g})")
        scale, labels = implementation("voronoi_encode", backend)(
            flat, multipliers if xp is np else xp.asarray(multipliers), bits)
        packed = pack_bits(labels, bits, backend=backend, check=False)
        return {"labels": packed.reshape(*lead, packed.shape[-1]),
                "scale": scale.astype(xp.float16).reshape(lead)}

    def _fixed_estimate(self, arrays: dict[str, Any], backend: str) -> Any:
        packed = arrays["labels"]
        lead = packed.shape[:-1]
        xp = array_module(packed)
        bits = int(self.bits)
        labels = unpack_bits(xp.ascontiguousarray(packed.reshape(-1, packed.shape[-1])), bits,
                             self.dim, backend=backend)
        scale = arrays["scale"].astype(xp.float32).reshape(-1)
        points = implementation("voronoi_decode", backend)(labels, scale, bits)
        return points.reshape(*lead, self.dim)

    # -- entropy coded -----------------------------------------------------------------------

    def _steps(self, sigma: np.ndarray, j: int) -> np.ndarray:
        factor = math.sqrt(2 * math.pi * math.e) * 2.0 ** (-self.bits + j / STEP_LADDER)
        with np.errstate(over="ignore"):    # a step past float16 is inf: refused by the caller
            steps = (sigma * factor).astype(np.float16)
        return np.maximum(steps.astype(np.float32), np.float32(SMALLEST_SCALE))

    def _points(self, heads: np.ndarray, steps: np.ndarray, backend: str) -> np.ndarray | None:
        """E8 points ``(g, 8)`` of ``heads : (h, t, dim)`` at the steps, None if too fine."""
        scaled = heads / steps[:, None, None]
        if float(np.abs(scaled).max(initial=0.0)) >= MAX_COORDINATE - 2:
            return None
        return nearest_e8(scaled.reshape(-1, 8), backend=backend)

    def _symbol_bits(self, points: np.ndarray) -> tuple[float, tuple[Any, ...]]:
        """Ideal bits of the streams plus the model's and headers' bytes; and the streams."""
        offset = max(1, int(np.abs(points).max(initial=0.0) + 0.5))
        streams = lattice_symbols(points, offset)
        coset, coordinates, last, coordinate_contexts, last_contexts = streams
        symbols = np.concatenate([coset, coordinates, last])
        contexts = np.concatenate([np.zeros_like(coset), coordinate_contexts, last_contexts])
        model = entropy.build_model(symbols, contexts, 2 * offset + 1, NUM_CONTEXTS)
        headers = sum(_stream_header_bytes(s.size) for s in (coset, coordinates, last))
        bits = entropy.ideal_bits(symbols, contexts, model) + 8 * (model.nbytes + headers)
        return bits, (model, offset, streams)

    def _encode_entropy(self, rotated: Any, backend: str) -> dict[str, Any]:
        lead = rotated.shape[:-1]
        heads = np.ascontiguousarray(rotated.reshape(-1, lead[-1] if lead else 1, self.dim))
        sigma = np.sqrt((heads.astype(np.float64) ** 2).mean(axis=(1, 2)))
        vectors = heads.shape[0] * heads.shape[1]
        budget = vectors * (self.dim * self.bits - self.side_bits) - 16 * heads.shape[0]

        tried: dict[int, tuple[float, Any, np.ndarray] | None] = {}

        def attempt(j: int) -> tuple[float, Any, np.ndarray] | None:
            """Ideal size, symbols and steps at rung ``j`` (each rung computed once)."""
            if j not in tried:
                steps = self._steps(sigma, j)
                points = self._points(heads, steps, backend)
                tried[j] = None if points is None else (*self._symbol_bits(points), steps)
            return tried[j]

        # the smallest rung whose ideal size fits the budget (bisection: the size falls as the
        # step grows), then the measured streams, one rung coarser while they overshoot
        low, high = -STEP_RANGE, STEP_RANGE
        while high - low > 1:
            middle = (low + high) // 2
            result = attempt(middle)
            if result is not None and result[0] <= budget:
                high = middle
            else:
                low = middle
        j = high
        while True:
            result = attempt(j)
            if result is None:
                raise ValueError("x has values too far above its heads' RMS for the entropy "
                                 f"model (|x| / step must stay below {MAX_COORDINATE})")
            _, (model, offset, streams), steps = result
            if not np.isfinite(steps).all():
                # a step past float16 scales the points to 0: tiny streams that decode to
                # nothing (the codes would be refused at decode); refuse the input instead
                raise ValueError(
                    f"x is too large for the entropy code's float16 step: a head's RMS "
                    f"({float(sigma.max()):.4g}) needs a step above {LARGEST_SCALE:g} at "
                    f"{self.bits} bits; scale the input down")
            coset, coordinates, last, coordinate_contexts, last_contexts = streams
            encoded = {
                "coset_stream": entropy.encode(coset, np.zeros_like(coset), model),
                "coordinate_stream": entropy.encode(coordinates, coordinate_contexts, model),
                "last_stream": entropy.encode(last, last_contexts, model),
            }
            size = 8 * (sum(len(v) for v in encoded.values()) + model.nbytes)
            if size <= budget or j >= STEP_RANGE:
                break
            j += 1
        arrays = {name: np.frombuffer(data, dtype=np.uint8).copy()
                  for name, data in encoded.items()}
        arrays["model"] = np.frombuffer(model.to_bytes(), dtype=np.uint8).copy()
        arrays["step"] = steps.astype(np.float16).reshape(lead[:-1])
        return arrays

    def _entropy_estimate(self, arrays: dict[str, Any], lead: tuple[int, ...]) -> np.ndarray:
        """Decode the streams: the rotated estimate ``(*lead, dim)`` float32."""
        try:
            model = entropy.Model.from_bytes(arrays["model"].tobytes())
        except ValueError as error:
            raise ValueError(f"codes array 'model' is not a valid model: {error}") from None
        if (model.num_contexts != NUM_CONTEXTS or model.alphabet % 2 == 0
                or model.alphabet < 3):
            raise ValueError(f"codes array 'model' has {model.num_contexts} contexts and "
                             f"alphabet {model.alphabet}; E8 streams need {NUM_CONTEXTS} "
                             "contexts and an odd alphabet of at least 3")
        offset = model.alphabet // 2
        groups = int(np.prod(lead, dtype=np.int64)) * (self.dim // 8)

        def read(name: str, contexts: np.ndarray) -> np.ndarray:
            try:
                return entropy.decode(arrays[name].tobytes(), contexts, model)
            except ValueError as error:
                raise ValueError(f"codes array {name!r} does not decode: {error}") from None

        coset = read("coset_stream", np.zeros(groups, dtype=np.int64))
        if bool((coset > 1).any()):
            raise ValueError("codes array 'coset_stream' holds a coset other than 0 or 1")
        coordinates = read("coordinate_stream", np.repeat(1 + coset, 7))
        parity = (coordinates.reshape(-1, 7) - offset).sum(axis=1) & 1
        last = read("last_stream", 3 + 2 * coset + parity)
        points = points_from_symbols(coset, coordinates, last, offset)
        steps = arrays["step"].astype(np.float32).reshape(-1)
        tokens = lead[-1] if lead else 1
        estimate = points.reshape(steps.shape[0], tokens, self.dim) * steps[:, None, None]
        return estimate.reshape(*lead, self.dim)

    # -- the Stage protocol ------------------------------------------------------------------

    def encode(self, y: Any, backend: str) -> dict[str, Any]:
        """Rotate ``y : (..., dim)`` float32 and quantize it: the arrays of `layout`
        (``(..., tokens, dim)`` when entropy coded: the steps are per head)."""
        rotated = self.rotate(y, backend)
        if self.entropy_coded:
            return self._encode_entropy(rotated, backend)
        return self._encode_fixed(rotated, backend)

    def rotated_estimate(self, arrays: dict[str, Any], lead: tuple[int, ...],
                         backend: str) -> Any:
        """The lattice points times their scale, in the rotated domain: ``(*lead, dim)``
        float32 from the arrays of `encode` (``lead``: the input's leading shape)."""
        if self.entropy_coded:
            return self._entropy_estimate(arrays, lead)
        return self._fixed_estimate(arrays, backend)


def _check_target_bits(bits: Any, entropy_coded: bool) -> int | float:
    if not entropy_coded:
        return check_bits(bits, "bits", 2, 8)
    return check_rate(bits, "bits (the target rate with entropy=True)", 0.5, 8)


@register("e8", method_id=5, main_parameter="bits")
@dataclass(frozen=True)
class E8Quant(ChannelSplitQuantizer):
    """E8 lattice quantization after a randomized Hadamard rotation; fixed-rate or rANS-coded.

    Parameters
    ----------
    dim : int
        A multiple of 8.
    bits : int or float
        ``entropy=False``: bits per coordinate of the labels, 2..8 (a Voronoi code of
        ``2^(8 bits)`` points per group) plus one float16 scale per vector.
        ``entropy=True``: the target rate in bits per coordinate, 0.5..8, of everything stored.
    seed : int
        Seeds the rotation.
    entropy : bool
        Store rANS streams (variable rate, host-side) instead of fixed-size labels.
    rotation : {"hadamard", "none"}
        ``"none"`` quantizes the raw coordinates (to measure what the rotation does).
    center, channel_scale, stats_tokens, local_stats
        The shared per-channel pre-transform (`latkv.channel_transform`).

    Notes
    -----
    Fixed rate: ``dim bits / 8 + 2`` bytes per vector (4.125 bits per coordinate at
    ``bits=4``, dim 128). Entropy-coded: ``code_size`` is the target; ``Codes.nbytes`` is the
    measured size of the streams, the model, the per-head steps and any statistics. See the
    module docstring for the codebook, the ladder of scales and the stream format.

    Examples
    --------
    >>> import numpy as np, latkv
    >>> x = np.random.default_rng(0).standard_normal((4, 512, 128)).astype(np.float32)
    >>> fixed = latkv.E8Quant(dim=128, bits=3)
    >>> fixed.bits_per_coordinate
    3.125
    >>> coded = latkv.E8Quant(dim=128, bits=2.5, entropy=True)
    >>> codes = coded.encode(x)
    >>> rate = 8 * codes.nbytes / x.size
    >>> bool(2.4 < rate <= 2.5)
    True
    >>> mse = float(((coded.decode(codes) - x) ** 2).mean())
    >>> gap = rate - 0.5 * np.log2(1 / mse)  # bits above Shannon's R(D) for N(0, 1)
    >>> bool(0.1 < gap < 0.25)
    True
    """

    dim: int
    bits: Any = 4
    seed: int = 0
    entropy: bool = False
    rotation: str = "hadamard"
    center: bool = False
    channel_scale: bool = False
    stats_tokens: int = 128
    local_stats: bool = False

    backends = ("numpy", "numba", "cupy", "numba.cuda")
    #: fixed-rate and entropy-coded rows, with centred keys, without the rotation, and
    #: entropy-coded keys with TurboQuant values (per-vector norms suit values better)
    compare_specs = ("e8", "e8,center=True", "e8,entropy=True", "e8,entropy=True,center=True",
                     "e8:2.5,entropy=True,center=True", "e8,entropy=True,rotation=none",
                     "e8,entropy=True,center=True|turbo",
                     "e8:3.5,entropy=True,center=True",
                     "e8:4,entropy=True,center=True|turbo:3")

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim", check_int(self.dim, "dim", 8))
        if self.dim % 8:
            raise ValueError(f"dim must be a multiple of 8 (E8 groups), got {self.dim}")
        for flag in ("entropy", "center", "channel_scale", "local_stats"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        object.__setattr__(self, "bits", _check_target_bits(self.bits, self.entropy))
        object.__setattr__(self, "seed", check_int(self.seed, "seed", 0))
        check_choice(self.rotation, "rotation", ROTATIONS)
        object.__setattr__(self, "stats_tokens", check_int(self.stats_tokens, "stats_tokens", 1))
        transform = ChannelTransform(self.dim, self.center, self.channel_scale,
                                     self.stats_tokens, self.local_stats)
        side_bits = 8 * transform.block_bytes() / self.stats_tokens
        object.__setattr__(self, "_stage", E8Stage(self.dim, self.bits, self.entropy,
                                                   self.rotation, self.seed, side_bits))

    @property
    def variable_rate(self) -> bool:
        return self.entropy

    @property
    def idempotent(self) -> bool | None:
        """None: re-encoding is a new quantization. A decoded vector ``λ s`` usually fits at a
        smaller scale than ``s`` (its groups are now lattice points, not the overloading
        originals), so the smallest fitting rung moves the points; the entropy-coded step is
        refitted to the target rate."""
        return None

    @property
    def outlier_count(self) -> int:
        return 0

    def stages(self) -> tuple[E8Stage, None]:
        return self._stage, None  # type: ignore[attr-defined]

    @property
    def supported_backends(self) -> tuple[str, ...]:
        """All four at fixed rate; the host backends for the rANS streams (``entropy=True``)."""
        return ("numpy", "numba") if self.entropy else type(self).backends

    def check_backend(self, backend: str | None, x: Any) -> str:
        if self.entropy and resolve_backend(backend, x) in ("cupy", "numba.cuda"):
            raise ValueError("E8Quant with entropy=True writes host-side rANS streams: encode "
                             "and decode NumPy arrays (Codes.to_numpy), or use entropy=False "
                             "on the GPU")
        return super().check_backend(backend, x)

    def check_codes(self, codes: Any, name: str = "codes") -> None:
        super().check_codes(codes, name)
        for key in ("scale", "step"):
            if key in codes.arrays:
                value = codes[key]
                if not bool(codes.xp.isfinite(value).all()) or bool((value <= 0).any()):
                    raise ValueError(f"{name} array {key!r} must hold positive finite values")
        if self.entropy and codes.xp is not np:
            raise ValueError(f"{name}: E8 streams are host-side; call Codes.to_numpy first")

    # -- the split base's hooks -------------------------------------------------------------

    def _decode_split(self, arrays: dict[str, Any], shape: tuple[int, ...],
                      backend: str) -> Any:
        stage = self._stage  # type: ignore[attr-defined]
        estimate = stage.rotated_estimate(arrays, tuple(shape[:-1]), backend)
        return stage.unrotate(estimate, backend)

    def scores_arrays(self, codes: Any, backend: str) -> dict[str, Any]:
        """The statistics plus ``estimate``: the lattice points times their scales, rotated."""
        stage = self._stage  # type: ignore[attr-defined]
        arrays = {k: v for k, v in codes.arrays.items() if k in self.channel_transform.names}
        arrays["estimate"] = stage.rotated_estimate(dict(codes.arrays), tuple(codes.shape[:-1]),
                                                    backend)
        return arrays

    def _weighted_sum_split(self, weights: Any, arrays: dict[str, Any], backend: str) -> Any:
        stage = self._stage  # type: ignore[attr-defined]
        return stage.unrotate(weights @ arrays["estimate"], backend)

    def _scores_split(self, q: Any, arrays: dict[str, Any], backend: str) -> Any:
        xp = array_module(q)
        rotated_q = self._stage.rotate(q, backend)  # type: ignore[attr-defined]
        return xp.matmul(rotated_q, xp.swapaxes(arrays["estimate"], -1, -2))
