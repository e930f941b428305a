"""PolarQuant: random preconditioning, a recursive polar transform, analytic angle codebooks.

Han, Kacham, Karbasi, Mirrokni, Zandieh (2025), arXiv 2502.02617. After a seeded random
rotation ``y = R x`` the coordinates are, in law, i.i.d. Gaussian, so the angles of the polar
transform have known densities and need no per-block scale or zero point (Sec. 3):

* level 1 pairs coordinates, ``(y_2i, y_2i+1) -> (r_i, theta_i)`` with
  ``theta = atan2(y_2i+1, y_2i)`` in ``[0, 2 pi)``, uniform;
* level ``l >= 2`` pairs radii, ``(r_2i, r_2i+1) -> (r, psi)`` with
  ``psi = atan2(r_2i+1, r_2i)`` in ``[0, pi/2]``, density ``∝ sin^(2^(l-1) - 1)(2 psi)``;
* after ``levels`` levels a block of ``2^levels`` coordinates keeps one radius (its norm).

Each level's angles are quantized with the Lloyd-Max codebook of their law
(`latkv.codebooks.polar_angle_codebook`, cached); the block radius is stored in float16.
Decoding runs the transform backwards from the radius and the angle centroids.

Numerics: squared radii are sums of squares in float64 (a float32 value squared is exact in
float64, so the sums do not depend on fused multiply-adds); angles are float64 ``arctan2`` of
float64 values; a code is the number of boundaries strictly below the angle. Codes can only
differ between math libraries for an angle within one float64 rounding of a boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from latkv._backend import array_module, implementation
from latkv.channel_split import ChannelSplitQuantizer
from latkv.checks import check_bits, check_choice, check_dashed, check_int
from latkv.codebooks import Codebook, polar_angle_codebook
from latkv.packing import pack_bits, packed_length, unpack_bits
from latkv.qjl import NORM_DTYPES, stage_seed, to_norm_dtype
from latkv.registry import register
from latkv.rotations import RandomizedHadamard, RandomOrthogonal

TWO_PI = 2 * np.pi


#: an angle of NumPy's this close to a boundary (or NaN) is recomputed with the C library's
#: ``atan2`` (`math.atan2`) before it is compared: NumPy's own ``arctan2`` is SIMD code on some
#: CPUs (SVML on AVX-512) and can differ from the C library's by a rounding, which would move
#: a code across a boundary on one machine and not on another. The numba kernel settles its
#: approximate angles within the same margin with the C library's ``atan2`` too
#: (`latkv._cpu.polar`), so the codes are the same on every machine and backend.
SETTLE_MARGIN = 1e-9


def polar_angles(blocks: Any, levels: int,
                 boundaries: tuple[Any, ...] | None = None) -> tuple[list[Any], Any]:
    """The recursive polar transform of ``blocks : (..., 2^levels)`` (float64).

    Returns ``([theta, psi_2, ..., psi_levels], radius)``: level ``l`` holds
    ``2^(levels - l)`` angles per block, ``radius : (...,)`` the block norm. With the
    quantizer's ``boundaries`` (NumPy input), the angles within `SETTLE_MARGIN` of one are the
    C library's (`settle_angles`).
    """
    xp = array_module(blocks)
    settle = boundaries is not None and xp is np
    a, b = blocks[..., 0::2], blocks[..., 1::2]
    theta = xp.arctan2(b, a)                                       # level 1, Sec. 3.1
    theta = xp.where(theta < 0, theta + TWO_PI, theta)
    angles = [settle_angles(theta, boundaries[0], b, a, wrap=True) if settle else theta]
    squared = a * a + b * b
    for level in range(2, levels + 1):                             # levels >= 2, Sec. 3.1
        first, second = squared[..., 0::2], squared[..., 1::2]
        y, x = xp.sqrt(second), xp.sqrt(first)
        psi = xp.arctan2(y, x)
        angles.append(settle_angles(psi, boundaries[level - 1], y, x) if settle else psi)
        squared = first + second
    return angles, xp.sqrt(squared[..., 0])


def settle_angles(angle: np.ndarray, edges: np.ndarray, y: np.ndarray, x: np.ndarray,
                  wrap: bool = False) -> np.ndarray:
    """``angle`` with the entries within `SETTLE_MARGIN` of an edge (or NaN) replaced by
    ``math.atan2(y, x)`` (plus ``2 pi`` where negative, with ``wrap``)."""
    edges = np.asarray(edges, dtype=np.float64)
    if edges.size == 0:
        return angle
    position = np.searchsorted(edges, angle)
    below = edges[np.maximum(position - 1, 0)]
    above = edges[np.minimum(position, edges.size - 1)]
    with np.errstate(invalid="ignore"):
        near = ~((np.abs(angle - below) > SETTLE_MARGIN) & (np.abs(angle - above) > SETTLE_MARGIN))
    if not near.any():
        return angle
    exact = np.array([math.atan2(v, u) for v, u in zip(y[near].tolist(), x[near].tolist())],
                     dtype=np.float64)
    if wrap:
        exact = np.where(exact < 0, exact + TWO_PI, exact)
    settled = angle.copy()
    settled[near] = exact
    return settled


def polar_blocks(angles: list[Any], radius: Any) -> Any:
    """The inverse transform: angles per level and block radii -> ``(..., 2^levels)``."""
    xp = array_module(radius)
    r = radius[..., None]
    for psi in angles[:0:-1]:                                      # levels L .. 2
        r = xp.stack([r * xp.cos(psi), r * xp.sin(psi)], axis=-1).reshape(*psi.shape[:-1], -1)
    theta = angles[0]
    return xp.stack([r * xp.cos(theta), r * xp.sin(theta)], axis=-1).reshape(
        *theta.shape[:-1], -1)


def polar_quantize_reference(rotated: Any, levels: int, level_bits: tuple[int, ...],
                             boundaries: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any]:
    """Codes of every level and the block radii of rotated vectors (the encode kernel).

    Parameters
    ----------
    rotated : (n, d) float32
        Preconditioned vectors; ``d`` a multiple of ``2^levels``.
    levels : int
    level_bits : tuple of int
        Bits per angle at each level.
    boundaries : tuple of (2**bits - 1,) float64
        Increasing angle boundaries per level; a code is ``sum(boundaries < angle)``.

    Returns
    -------
    packed : tuple of (n, ceil((d >> l) * b_l / 8)) uint8
        Level ``l``'s codes in block order, packed as `latkv.pack_bits` does.
    radius : (n, d >> levels) float64
        Block norms.
    """
    xp = array_module(rotated)
    n = rotated.shape[0]
    blocks = rotated.astype(xp.float64).reshape(n, -1, 1 << levels)
    angles, radius = polar_angles(blocks, levels, boundaries)
    packed = tuple(
        pack_bits(xp.searchsorted(edges, angle, side="left").astype(xp.uint8).reshape(n, -1),
                  bits, backend="numpy" if xp is np else None, check=False)
        for angle, edges, bits in zip(angles, boundaries, level_bits))
    return packed, radius


def polar_dequantize_reference(packed: tuple[Any, ...], radius: Any, levels: int,
                               level_bits: tuple[int, ...], centroids: tuple[Any, ...],
                               dim: int) -> Any:
    """The rotated-domain reconstruction ``(n, dim)`` float32 (the decode kernel).

    ``packed`` and ``radius`` as `polar_quantize_reference` returns them (``radius`` float64
    or the stored float16/float32), ``centroids`` the float64 angle centroids per level.
    """
    xp = array_module(radius)
    radius = radius.astype(xp.float64)
    n, blocks = radius.shape
    angles = []
    for level, (codes, bits, points) in enumerate(zip(packed, level_bits, centroids), start=1):
        indices = unpack_bits(codes, bits, dim >> level, backend="numpy" if xp is np else None)
        angles.append(points[indices].reshape(n, blocks, -1))
    return polar_blocks(angles, radius).reshape(n, dim).astype(xp.float32)


def _codebook_device(codebook: Codebook, xp: Any) -> tuple[Any, Any]:
    boundaries = codebook.boundaries.astype(np.float64)
    centroids = codebook.centroids.astype(np.float64)
    if xp is not np:
        return xp.asarray(boundaries), xp.asarray(centroids)
    return boundaries, centroids


@dataclass(frozen=True)
class PolarStage:
    """PolarQuant on vectors of length ``dim`` (the stage of `latkv.channel_split`)."""

    dim: int
    levels: int
    level_bits: tuple[int, ...]
    radius_dtype: str
    rotation_kind: str
    seed: int
    rotation: Any = field(init=False, repr=False, compare=False)
    codebooks: tuple[Codebook, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        integer_seed = int(stage_seed(self.seed, 0, 0).generate_state(1)[0])
        rotation = (RandomizedHadamard(self.dim, integer_seed) if self.rotation_kind == "hadamard"
                    else RandomOrthogonal(self.dim, integer_seed))
        object.__setattr__(self, "rotation", rotation)
        object.__setattr__(self, "codebooks", tuple(
            polar_angle_codebook(level, bits) for level, bits in
            enumerate(self.level_bits, start=1)))

    @property
    def block(self) -> int:
        return 1 << self.levels

    def angle_count(self, level: int) -> int:
        """Angles per vector at ``level`` (1-based)."""
        return self.dim >> level

    @property
    def nbytes(self) -> int:
        return (sum(packed_length(self.angle_count(level), bits)
                    for level, bits in enumerate(self.level_bits, start=1))
                + self.dim // self.block * np.dtype(self.radius_dtype).itemsize)

    def layout(self, lead: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], str]]:
        layout = {f"level{level}": ((*lead, packed_length(self.angle_count(level), bits)), "uint8")
                  for level, bits in enumerate(self.level_bits, start=1)}
        layout["radius"] = ((*lead, self.dim // self.block), self.radius_dtype)
        return layout

    def _tables(self, xp: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        tables = [_codebook_device(codebook, xp) for codebook in self.codebooks]
        return tuple(t[0] for t in tables), tuple(t[1] for t in tables)

    def encode(self, y: Any, backend: str) -> dict[str, Any]:
        xp = array_module(y)
        lead = y.shape[:-1]
        rotated = self.rotation.apply(y, backend=backend)          # preconditioning
        boundaries, _ = self._tables(xp)
        packed, radius = implementation("polar_quantize", backend)(
            xp.ascontiguousarray(rotated.reshape(-1, self.dim)), self.levels, self.level_bits,
            boundaries)
        arrays = {f"level{level}": codes.reshape(*lead, codes.shape[-1])
                  for level, codes in enumerate(packed, start=1)}
        arrays["radius"] = to_norm_dtype(radius.reshape(*lead, -1), self.radius_dtype,
                                         "block radius", option="radius_dtype")
        return arrays

    def rotated_estimate(self, arrays: dict[str, Any], backend: str) -> Any:
        """The decoded vectors in the rotated domain, ``(..., dim)`` float32."""
        xp = array_module(arrays["radius"])
        radius = arrays["radius"]
        lead = radius.shape[:-1]
        _, centroids = self._tables(xp)
        packed = tuple(xp.ascontiguousarray(arrays[f"level{level}"].reshape(
            -1, arrays[f"level{level}"].shape[-1])) for level in range(1, self.levels + 1))
        flat = implementation("polar_dequantize", backend)(
            packed, xp.ascontiguousarray(radius.reshape(-1, radius.shape[-1])), self.levels,
            self.level_bits, centroids, self.dim)
        return flat.reshape(*lead, self.dim)

    def decode(self, arrays: dict[str, Any], backend: str) -> Any:
        return self.rotation.inverse(self.rotated_estimate(arrays, backend), backend=backend)

    def weighted_sum(self, weights: Any, arrays: dict[str, Any], backend: str) -> Any:
        return self.rotation.inverse(weights @ self.rotated_estimate(arrays, backend),
                                     backend=backend)

    def scores(self, q: Any, arrays: dict[str, Any], backend: str) -> Any:
        # cheaper than decoding: rotate each query once and take inner products with the
        # reconstruction in the rotated domain, so no key is rotated back
        xp = array_module(q)
        rotated_q = self.rotation.apply(q, backend=backend)
        estimate = self.rotated_estimate(arrays, backend)
        return rotated_q @ xp.swapaxes(estimate, -1, -2)


def _level_bits(value: Any, levels: int) -> tuple[int, ...]:
    if value is None:
        return (4,) + (2,) * (levels - 1)
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value] * levels
    bits = tuple(check_bits(b, "level_bits")
                 for b in check_dashed(value, "level_bits", int, "4-2-2-2"))
    if len(bits) != levels:
        raise ValueError(f"level_bits must give one width per level ({levels}), got {bits}")
    return bits


@register("polar", method_id=4, main_parameter="levels")
@dataclass(frozen=True)
class PolarQuant(ChannelSplitQuantizer):
    """PolarQuant: rotation, recursive polar transform, per-level angle codebooks.

    Parameters
    ----------
    dim : int
        A multiple of ``2^levels``.
    levels : int
        Recursion depth, 1..8: blocks of ``2^levels`` coordinates keep one radius.
    level_bits : sequence of int or str, optional
        Bits of the angles at each level (``"4-2-2-2"`` in spec strings); by default 4 at
        level 1 and 2 above, the paper's choice.
    seed : int
        Seeds the preconditioning rotation.
    radius_dtype : {"float16", "float32"}
    rotation : {"hadamard", "dense"}
    center, channel_scale, stats_tokens, local_stats
        The shared per-channel pre-transform (`latkv.channel_transform`).

    Notes
    -----
    Per block of ``2^L`` coordinates: ``2^(L-l)`` angles of ``b_l`` bits at each level ``l``
    and one radius. The default in dim 128 stores 8 x 4 + 4 x 2 + 2 x 2 + 1 x 2 = 46 angle bits
    and a 16-bit radius per 16-coordinate block: exactly 3.875 bits per coordinate. Each level's
    codes are packed per vector (`latkv.pack_bits`), so a level whose codes do not fill whole
    bytes rounds up (counted in ``code_size``).

    Examples
    --------
    >>> import numpy as np, latkv
    >>> qz = latkv.PolarQuant(dim=128)
    >>> qz.bits_per_coordinate
    3.875
    >>> x = np.random.default_rng(0).standard_normal((100, 128)).astype(np.float32)
    >>> codes = qz.encode(x)
    >>> codes.nbytes == 100 * 62
    True
    """

    dim: int
    levels: int = 4
    level_bits: Any = None
    seed: int = 0
    radius_dtype: str = "float16"
    rotation: str = "hadamard"
    center: bool = False
    channel_scale: bool = False
    stats_tokens: int = 128
    local_stats: bool = False

    backends = ("numpy", "numba", "cupy", "numba.cuda")
    #: the default, two other bit allocations, and centred keys
    compare_specs = ("polar:4", "polar:4,center=True", "polar:4,level_bits=3-2-2-2",
                     "polar:4,level_bits=4-3-3-3,center=True", "polar:3,center=True")

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim", check_int(self.dim, "dim", 2))
        object.__setattr__(self, "levels", check_int(self.levels, "levels", 1, 8))
        if self.dim % (1 << self.levels):
            raise ValueError(f"dim ({self.dim}) must be a multiple of 2^levels = "
                             f"{1 << self.levels}")
        object.__setattr__(self, "level_bits", _level_bits(self.level_bits, self.levels))
        object.__setattr__(self, "seed", check_int(self.seed, "seed", 0))
        check_choice(self.radius_dtype, "radius_dtype", NORM_DTYPES)
        check_choice(self.rotation, "rotation", ("hadamard", "dense"))
        for flag in ("center", "channel_scale", "local_stats"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        object.__setattr__(self, "stats_tokens", check_int(self.stats_tokens, "stats_tokens", 1))
        object.__setattr__(self, "_stage", PolarStage(self.dim, self.levels, self.level_bits,
                                                      self.radius_dtype, self.rotation,
                                                      self.seed))

    @property
    def idempotent(self) -> bool | None:
        """Re-encoding a decoded vector refits nothing but the fp16 radius (mostly the same
        codes, False); with channel statistics it is a new quantization (None)."""
        return None if self.needs_tokens else False

    @property
    def outlier_count(self) -> int:
        return 0

    def stages(self) -> tuple[PolarStage, None]:
        return self._stage, None  # type: ignore[attr-defined]
