"""QJL: 1-bit Johnson-Lindenstrauss sketches with an unbiased inner-product estimator.

Zandieh, Daliri, Han (2024), arXiv 2406.03482. A key ``k in R^d`` is stored as the signs of
a Gaussian sketch and its norm (Definition 1):

    S in R^{m x d}, S_ij ~ N(0, 1)          z = sign(S k) in {-1, +1}^m,   ||k||

and the inner product with a query ``q`` (kept in full precision) is estimated asymmetrically
(Lemma 2, Lemma 3):

    est(q, k) = sqrt(pi / 2) / m * ||k|| * <S q, z>
    E[est] = <q, k>,     Var[est] <= pi / (2 m) * ||q||^2 ||k||^2.

``decode`` returns the vector the estimator is the inner product with,
``sqrt(pi/2)/m * ||k|| * S^T z``: ``q @ decode(codes).T == scores(q, codes)``.
Key-outlier handling (Sec. 4) keeps the ``outliers`` channels of largest prefill energy in a
second sketch of ``outlier_sketch_dim`` rows with its own norm; the estimate is the sum of the
two (`latkv.channel_split`).

Numerics: ``S k`` is computed in float64 on every backend, so the sign of a projection is the
same wherever it is computed (a float32 product would flip the sign of near-zero projections
between BLAS libraries); ``sign(0) = +1``. Bit ``j`` of a vector's ``signs`` (LSB-first, see
`latkv.pack_bits`) is 1 where ``(S k)_j >= 0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from latkv._backend import array_module, implementation
from latkv.channel_split import ChannelSplitQuantizer
from latkv.checks import check_choice, check_int
from latkv.packing import pack_bits, packed_length, unpack_bits
from latkv.registry import register

#: ``sqrt(pi / 2)``: ``E[|g|] = sqrt(2 / pi)`` for ``g ~ N(0, 1)`` (QJL Lemma 2)
QJL_SCALE = float(np.sqrt(np.pi / 2))
NORM_DTYPES = ("float16", "float32")


def gaussian_sketch(rows: int, dim: int, rng: np.random.Generator,
                    orthogonal: bool = False) -> np.ndarray:
    """A ``(rows, dim)`` float64 JL sketch with i.i.d. ``N(0, 1)`` rows (marginally).

    With ``orthogonal``, each block of ``dim`` rows is orthogonal (QR of a Gaussian block,
    signs fixed) and every row is rescaled by the norm of an independent ``N(0, I_dim)``
    vector, so each row is still exactly ``N(0, I_dim)`` (uniform direction times a chi
    length) and the estimator stays unbiased, while rows within a block no longer overlap.
    The QJL authors' code orthogonalises its sketch in this way.
    """
    gaussian = rng.standard_normal((rows, dim))
    if not orthogonal:
        return gaussian
    blocks = []
    for start in range(0, rows, dim):
        block = gaussian[start : start + dim]
        q, r = np.linalg.qr(block.T)                 # (dim, k): orthonormal columns
        q = q * np.sign(np.diag(r))
        blocks.append(q.T)
    directions = np.concatenate(blocks, axis=0)
    lengths = np.linalg.norm(rng.standard_normal((rows, dim)), axis=1)
    return directions * lengths[:, None]


def vector_norms(y: Any) -> Any:
    """``||y||`` over the last axis, summed in float64 (float64 result)."""
    xp = array_module(y)
    y64 = y.astype(xp.float64)
    return xp.sqrt((y64 * y64).sum(axis=-1))


def to_norm_dtype(norms: Any, dtype: str, name: str = "norm",
                  option: str | None = "norm_dtype") -> Any:
    """Round float64 norms to the stored dtype; refuse what float16 cannot hold.

    ``option`` names the quantizer's parameter that stores them in float32 (None where it has
    none), for the error message."""
    if dtype == "float16" and bool((norms > np.finfo(np.float16).max).any()):
        remedy = f"use {option}='float32' or scale the input" if option else "scale the input"
        raise ValueError(f"a vector {name} exceeds the float16 range (65504); {remedy}")
    return norms.astype(dtype)


def sign_bits(y: Any, sketch: Any) -> Any:
    """Packed ``sign(y S^T)``: ``y : (..., d)`` float32, ``sketch : (m, d)`` float64.

    Returns ``(..., ceil(m / 8))`` uint8, bit ``j`` set where ``(S y)_j >= 0``.
    """
    xp = array_module(y)
    projection = y.astype(xp.float64) @ sketch.T
    return pack_bits((projection >= 0).astype(xp.uint8), 1,
                     backend="numpy" if xp is np else None, check=False)


def signs_from_bits(packed: Any, rows: int) -> Any:
    """``(..., ceil(m/8))`` uint8 -> ``(..., m)`` float32 of ``+-1``."""
    xp = array_module(packed)
    bits = unpack_bits(packed, 1, rows, backend="numpy" if xp is np else None)
    bits = bits.astype(xp.float32)
    return 2 * bits - 1


def sign_scores_reference(q: Any, packed: Any, rows: int) -> Any:
    """``<q, z>`` for ``q : (B, m, rows)`` float32 and packed signs ``(B, n, ceil(rows/8))``.

    ``z = 2 * bit - 1``; returns ``(B, m, n)`` float32.
    """
    xp = array_module(q)
    return (q @ xp.swapaxes(signs_from_bits(packed, rows), -1, -2)).astype(xp.float32)


def sketched_query(q: Any, sketch: Any) -> Any:
    """``S q`` for ``q : (..., d)`` (float64 product, float32 result)."""
    xp = array_module(q)
    return (q.astype(xp.float64) @ sketch.T).astype(xp.float32)


@dataclass(frozen=True)
class SignSketch:
    """QJL's core on vectors of length ``dim``: ``m`` sign bits and the norm (a split stage)."""

    dim: int
    rows: int
    seed: Any
    orthogonal: bool = False
    norm_dtype: str = "float16"
    sketch: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        object.__setattr__(self, "sketch",
                           gaussian_sketch(self.rows, self.dim, rng, self.orthogonal))

    @property
    def nbytes(self) -> int:
        return packed_length(self.rows, 1) + np.dtype(self.norm_dtype).itemsize

    def layout(self, lead: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"signs": ((*lead, packed_length(self.rows, 1)), "uint8"),
                "norm": (lead, self.norm_dtype)}

    def device_sketch(self, xp: Any) -> Any:
        return self.sketch if xp is np else xp.asarray(self.sketch)

    def encode(self, y: Any, backend: str) -> dict[str, Any]:
        xp = array_module(y)
        # QJL Definition 1: z = sign(S k), and ||k||
        return {"signs": sign_bits(y, self.device_sketch(xp)),
                "norm": to_norm_dtype(vector_norms(y), self.norm_dtype)}

    def decode(self, arrays: dict[str, Any], backend: str) -> Any:
        xp = array_module(arrays["signs"])
        z = signs_from_bits(arrays["signs"], self.rows).astype(xp.float64)
        coefficient = QJL_SCALE / self.rows * arrays["norm"].astype(xp.float64)
        return (coefficient[..., None] * (z @ self.device_sketch(xp))).astype(xp.float32)

    def weighted_sum(self, weights: Any, arrays: dict[str, Any], backend: str) -> Any:
        # sum_n w_n c_n S^T z_n = ((w * c) @ Z) @ S: the sketch is applied once per query
        xp = array_module(arrays["signs"])
        z = signs_from_bits(arrays["signs"], self.rows).astype(xp.float64)
        coefficient = QJL_SCALE / self.rows * arrays["norm"].astype(xp.float64)
        summed = (weights.astype(xp.float64) * coefficient[..., None, :]) @ z
        return (summed @ self.device_sketch(xp)).astype(xp.float32)

    def scores(self, q: Any, arrays: dict[str, Any], backend: str) -> Any:
        from latkv.turbo import batched

        xp = array_module(q)
        # QJL Lemma 3: sqrt(pi/2)/m * ||k|| * <S q, z>
        sq = sketched_query(q, self.device_sketch(xp))                    # (..., m_q, rows)
        q3, signs3, heads = batched(sq, arrays["signs"])
        dots = implementation("sign_scores", backend)(q3, signs3, self.rows)
        coefficient = (QJL_SCALE / self.rows) * arrays["norm"].astype(xp.float32)
        return dots.reshape(*heads, *dots.shape[-2:]) * coefficient[..., None, :]


def stage_seed(seed: int, *path: int) -> np.random.SeedSequence:
    """An independent random stream for each part of each stage of one quantizer."""
    return np.random.SeedSequence([seed, *path])


@register("qjl", method_id=3, main_parameter="sketch_dim")
@dataclass(frozen=True)
class QJL(ChannelSplitQuantizer):
    """QJL: sign bits of a Gaussian sketch plus the norm; unbiased ``scores``.

    Parameters
    ----------
    dim : int
    sketch_dim : int
        ``m``, sign bits per vector (the sketch's rows).
    seed : int
        Seeds the sketch (and the outlier sketch, from an independent stream).
    outliers : int
        Channels of largest prefill energy kept in a separate sketch (0: none).
    outlier_sketch_dim : int, optional
        Rows of the outlier sketch; by default ``sketch_dim``.
    norm_dtype : {"float16", "float32"}
        Storage of the norms.
    orthogonal : bool
        Orthogonalise the sketch rows in blocks of ``dim`` (still unbiased; see
        `gaussian_sketch`).
    center, channel_scale, stats_tokens, local_stats
        The shared per-channel pre-transform (`latkv.channel_transform`).

    Notes
    -----
    Bytes per vector: ``ceil(m/8) + s`` with ``s`` the norm's bytes, plus ``ceil(m_o/8) + s``
    with outliers, plus the per-head side information (statistics, outlier indices) over
    ``stats_tokens`` tokens. For dim 128, m = 256, fp16 norm: ``(256 + 16) / 128 = 2.125``
    bits per coordinate.

    Examples
    --------
    >>> import numpy as np, latkv
    >>> qz = latkv.QJL(dim=128, sketch_dim=256, seed=0)
    >>> qz.bits_per_coordinate
    2.125
    >>> rng = np.random.default_rng(0)
    >>> k = rng.standard_normal((1000, 128)).astype(np.float32)
    >>> q = rng.standard_normal(128).astype(np.float32)
    >>> s = qz.scores(q, qz.encode(k))
    >>> bool(np.allclose(s, qz.decode(qz.encode(k)) @ q, rtol=1e-3, atol=1e-2))
    True
    """

    dim: int
    sketch_dim: int = 256
    seed: int = 0
    outliers: int = 0
    outlier_sketch_dim: int | None = None
    norm_dtype: str = "float16"
    orthogonal: bool = False
    center: bool = False
    channel_scale: bool = False
    stats_tokens: int = 128
    local_stats: bool = False

    backends = ("numpy", "numba", "cupy", "numba.cuda")
    #: decoded vectors are estimates, not grid points: re-encoding one draws a new estimate
    idempotent = None
    compare_specs = ("qjl:{dim}", "qjl:{2dim}", "qjl:{2dim},center=True")

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim", check_int(self.dim, "dim", 1))
        object.__setattr__(self, "sketch_dim", check_int(self.sketch_dim, "sketch_dim", 1))
        object.__setattr__(self, "seed", check_int(self.seed, "seed", 0))
        object.__setattr__(self, "outliers", check_int(self.outliers, "outliers", 0,
                                                       self.dim - 1))
        if self.outlier_sketch_dim is not None:
            check_int(self.outlier_sketch_dim, "outlier_sketch_dim", 1)
        check_choice(self.norm_dtype, "norm_dtype", NORM_DTYPES)
        for flag in ("orthogonal", "center", "channel_scale", "local_stats"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        object.__setattr__(self, "stats_tokens", check_int(self.stats_tokens, "stats_tokens", 1))
        main = SignSketch(self.dim - self.outliers, self.sketch_dim, stage_seed(self.seed, 0),
                          self.orthogonal, self.norm_dtype)
        outlier = None
        if self.outliers:
            outlier = SignSketch(self.outliers, self.outlier_sketch_dim or self.sketch_dim,
                                 stage_seed(self.seed, 1), self.orthogonal, self.norm_dtype)
        object.__setattr__(self, "_stages", (main, outlier))

    @property
    def outlier_count(self) -> int:
        return self.outliers

    def stages(self) -> tuple[SignSketch, SignSketch | None]:
        return self._stages  # type: ignore[attr-defined]
