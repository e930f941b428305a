"""TurboQuant: a random rotation, then the Lloyd-Max codebook of a rotated unit vector.

Zandieh, Daliri, Hadian, Mirrokni (2025), arXiv 2504.19874.

``mode="mse"`` (Algorithm 1). Rotate, normalise, quantize each coordinate with the ``b``-bit
Lloyd-Max codebook for the law of one coordinate of a uniform unit vector in ``R^d``
(`latkv.codebooks.sphere_codebook`), and store the norm:

    u = R x / ||x||,   c_j = argmin_i |u_j - centroid_i|,   x_hat = ||x|| R^T centroid[c]

Theorem 1 bounds ``E||x - x_hat||^2 / ||x||^2 <= sqrt(3) pi / 2 * 4^-b``; the codebook's own
distortion ``d * D_b`` (0.361, 0.116, 0.0340, 0.00932 for d = 128, b = 1..4) is the exact
figure under a uniformly random rotation.

``mode="prod"`` (Algorithm 2). The ``(b-1)``-bit mse stage, then QJL with ``m = d`` on the
residual ``r = u - u_hat`` and its norm ``gamma = ||r||`` (Theorem 2: unbiased inner products,
``Var <= pi / (2 d) ||q||^2 ||x||^2 * gamma^2``):

    x_hat = ||x|| R^T (u_hat + sqrt(pi/2) / d * gamma * S^T sign(S r))

The QJL sketch acts in the rotated domain; ``S R`` is again a Gaussian matrix, so this is the
paper's estimator with one rotation of the query serving both terms.

``scale="eden"`` / ``"eden-mse"`` (EDEN, Vargaftik et al. 2022; DRIVE 2021): the stored
per-vector factor is ``||x|| <u, u> / <u, u_hat>`` (unbiased: ``E[x_hat] = x`` over the
rotation) or ``||x|| <u, u_hat> / <u_hat, u_hat>`` (least squares) instead of ``||x||``; the
same one float16 per vector. ``scale="none"`` is TurboQuant-mse, EDEN with scale 1.

Outlier channels (Sec. 4.3): ``outlier_channels=r`` splits each head's channels into the ``r``
of largest prefill energy, encoded at ``outlier_bits``, and the rest at ``bits``: two
independent TurboQuant instances, each with its own rotation, codebook and norm.

Numerics: the randomized Hadamard rotation is float32 and bit-identical on every backend
(``rotation="dense"`` is a BLAS matmul, whose rounding depends on the library); ``||x||`` is
summed in float64; ``u = (R x) / ||x||`` is one float32 division; a code is the number of codebook
boundaries strictly below ``u_j``. The prod sketch is applied in float64, as in `latkv.qjl`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from latkv._backend import array_module, implementation
from latkv.channel_split import ChannelSplitQuantizer
from latkv.checks import check_bits, check_choice, check_int
from latkv.codebooks import Codebook, sphere_codebook
from latkv.packing import pack_bits, packed_length, unpack_bits
from latkv.qjl import (QJL_SCALE, gaussian_sketch, sign_bits, signs_from_bits, sketched_query,
                       stage_seed, to_norm_dtype, vector_norms)
from latkv.registry import register
from latkv.rotations import RandomizedHadamard, RandomOrthogonal

MODES = ("mse", "prod")
SCALES = ("none", "eden", "eden-mse")
ROTATIONS = ("hadamard", "dense")


def codebook_quantize_reference(rotated: Any, norm: Any, boundaries: Any, bits: int) -> Any:
    """Packed codes of ``u = rotated / norm`` against a scalar codebook (Algorithm 1, line 5).

    Parameters
    ----------
    rotated : (n, d) float32
        Rotated vectors ``R x``.
    norm : (n,) float32
        Their norms; a zero norm divides by 1 instead.
    boundaries : (2**bits - 1,) float32
        Increasing cell edges; the code of ``u_j`` is ``sum(boundaries < u_j)``.
    bits : int

    Returns
    -------
    (n, ceil(d * bits / 8)) uint8, packed as `latkv.pack_bits` does.
    """
    xp = array_module(rotated)
    safe = xp.where(norm > 0, norm, xp.float32(1)).astype(xp.float32)
    u = rotated / safe[:, None]
    codes = xp.searchsorted(boundaries, u, side="left").astype(xp.uint8)
    return pack_bits(codes, bits, backend="numpy" if xp is np else None, check=False)


def codebook_dequantize_reference(packed: Any, centroids: Any, bits: int, dim: int) -> Any:
    """``centroids[codes]`` : (n, dim) float32 from packed codes ``(n, ceil(dim*bits/8))``."""
    xp = array_module(packed)
    return centroids[unpack_bits(packed, bits, dim, backend="numpy" if xp is np else None)]


def codebook_scores_reference(q: Any, packed: Any, centroids: Any, bits: int, dim: int) -> Any:
    """``q @ centroids[codes].T`` without the norms: ``q : (B, m, d)``, ``packed : (B, n, P)``.

    Returns ``(B, m, n)`` float32.
    """
    xp = array_module(q)
    batches, n, width = packed.shape
    u_hat = codebook_dequantize_reference(packed.reshape(batches * n, width), centroids, bits,
                                          dim).reshape(batches, n, dim)
    return (q @ xp.swapaxes(u_hat, -1, -2)).astype(xp.float32)


def batched(q: Any, per_key: Any) -> tuple[Any, Any, tuple[int, ...]]:
    """``q : (..., m, d)`` and ``per_key : (..., n, k)`` broadcast and flattened to 3-D."""
    xp = array_module(q)
    heads = np.broadcast_shapes(tuple(q.shape[:-2]), tuple(per_key.shape[:-2]))
    q3 = xp.ascontiguousarray(xp.broadcast_to(q, (*heads, *q.shape[-2:])).reshape(
        -1, *q.shape[-2:]))
    k3 = xp.ascontiguousarray(xp.broadcast_to(per_key, (*heads, *per_key.shape[-2:])).reshape(
        -1, *per_key.shape[-2:]))
    return q3, k3, heads


@dataclass(frozen=True)
class TurboStage:
    """TurboQuant on vectors of length ``dim`` (one stage of the channel split)."""

    dim: int
    bits: int
    mode: str
    scale: str
    rotation_kind: str
    seed: int
    stage: int
    rotation: Any = field(init=False, repr=False, compare=False)
    codebook: Codebook | None = field(init=False, repr=False, compare=False)
    sketch: np.ndarray | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rotation_seed, sketch_seed = (stage_seed(self.seed, self.stage, part) for part in (0, 1))
        integer_seed = int(rotation_seed.generate_state(1)[0])
        rotation = (RandomizedHadamard(self.dim, integer_seed) if self.rotation_kind == "hadamard"
                    else RandomOrthogonal(self.dim, integer_seed))
        object.__setattr__(self, "rotation", rotation)
        object.__setattr__(self, "codebook", sphere_codebook(self.dim, self.mse_bits)
                           if self.mse_bits else None)
        object.__setattr__(self, "sketch", gaussian_sketch(
            self.dim, self.dim, np.random.default_rng(sketch_seed))
            if self.mode == "prod" else None)

    @property
    def mse_bits(self) -> int:
        return self.bits if self.mode == "mse" else self.bits - 1

    @property
    def nbytes(self) -> int:
        size = packed_length(self.dim, self.mse_bits) + 2
        if self.mode == "prod":
            size += packed_length(self.dim, 1) + 2
        return size

    def layout(self, lead: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], str]]:
        layout = {}
        if self.mse_bits:
            layout["packed"] = ((*lead, packed_length(self.dim, self.mse_bits)), "uint8")
        layout["norm"] = (lead, "float16")
        if self.mode == "prod":
            layout["signs"] = ((*lead, packed_length(self.dim, 1)), "uint8")
            layout["residual_norm"] = (lead, "float16")
        return layout

    def _device(self, array: np.ndarray, xp: Any) -> Any:
        return array if xp is np else xp.asarray(array)

    def _centroids(self, arrays: dict[str, Any], xp: Any, backend: str) -> Any:
        """``u_hat`` (float32) from the packed codes; zeros for a 0-bit mse stage."""
        lead = arrays["norm"].shape
        if not self.mse_bits:
            return xp.zeros((*lead, self.dim), dtype=xp.float32)
        packed = arrays["packed"]
        flat = implementation("codebook_dequantize", backend)(
            xp.ascontiguousarray(packed.reshape(-1, packed.shape[-1])),
            self._device(self.codebook.centroids, xp), self.mse_bits, self.dim)
        return flat.reshape(*lead, self.dim)

    def encode(self, y: Any, backend: str) -> dict[str, Any]:
        xp = array_module(y)
        lead = y.shape[:-1]
        rotated = self.rotation.apply(y, backend=backend)
        norm = vector_norms(y)                                     # float64
        arrays: dict[str, Any] = {}
        u_hat = None
        if self.mse_bits:                                          # Algorithm 1, lines 5-6
            packed = implementation("codebook_quantize", backend)(
                xp.ascontiguousarray(rotated.reshape(-1, self.dim)),
                norm.astype(xp.float32).reshape(-1),
                self._device(self.codebook.boundaries, xp), self.mse_bits)
            arrays["packed"] = packed.reshape(*lead, packed.shape[-1])
        factor = norm
        if self.scale != "none" or self.mode == "prod":
            safe = xp.where(norm > 0, norm, 1).astype(xp.float32)
            u = rotated / safe[..., None]
            u_hat = self._centroids({**arrays, "norm": norm}, xp, backend)
        if self.scale != "none":
            u64, u_hat64 = u.astype(xp.float64), u_hat.astype(xp.float64)
            dot = (u64 * u_hat64).sum(-1)
            if self.scale == "eden":
                numerator, denominator = (u64 * u64).sum(-1), dot
            else:
                numerator, denominator = dot, (u_hat64 * u_hat64).sum(-1)
            factor = norm * numerator / xp.where(denominator > 0, denominator, 1)
        arrays["norm"] = to_norm_dtype(factor, "float16", option=None)
        if self.mode == "prod":
            residual = u - u_hat                                   # Algorithm 2, line 6
            arrays["signs"] = sign_bits(residual, self._device(self.sketch, xp))
            arrays["residual_norm"] = to_norm_dtype(vector_norms(residual), "float16",
                                                    "residual norm", option=None)
        return arrays

    def rotated_estimate(self, arrays: dict[str, Any], backend: str) -> Any:
        """``u_hat`` plus the QJL term (prod), unscaled, in the rotated domain (float32)."""
        xp = array_module(arrays["norm"])
        u_hat = self._centroids(arrays, xp, backend)
        if self.mode == "prod":
            z = signs_from_bits(arrays["signs"], self.dim).astype(xp.float64)
            gamma = arrays["residual_norm"].astype(xp.float64)
            qjl = (QJL_SCALE / self.dim) * gamma[..., None] * (z @ self._device(self.sketch, xp))
            u_hat = (u_hat + qjl).astype(xp.float32)
        return u_hat

    def decode(self, arrays: dict[str, Any], backend: str) -> Any:
        xp = array_module(arrays["norm"])
        estimate = (self.rotated_estimate(arrays, backend)
                    * arrays["norm"].astype(xp.float32)[..., None])
        return self.rotation.inverse(estimate, backend=backend)

    def weighted_sum(self, weights: Any, arrays: dict[str, Any], backend: str) -> Any:
        xp = array_module(weights)
        estimate = (self.rotated_estimate(arrays, backend)
                    * arrays["norm"].astype(xp.float32)[..., None])
        return self.rotation.inverse(weights @ estimate, backend=backend)  # once per query

    def scores(self, q: Any, arrays: dict[str, Any], backend: str) -> Any:
        xp = array_module(q)
        rotated_q = self.rotation.apply(q, backend=backend)       # one rotation per query
        result = 0  # a 0-bit mse stage (prod with bits=1): the QJL term alone
        if self.mse_bits:
            q3, packed3, heads = batched(rotated_q, arrays["packed"])
            result = implementation("codebook_scores", backend)(
                q3, packed3, self._device(self.codebook.centroids, xp), self.mse_bits, self.dim)
            result = result.reshape(*heads, *result.shape[-2:])
        if self.mode == "prod":
            sq = sketched_query(rotated_q, self._device(self.sketch, xp))
            q3, signs3, heads = batched(sq, arrays["signs"])
            qjl = implementation("sign_scores", backend)(q3, signs3, self.dim)
            gamma = arrays["residual_norm"].astype(xp.float32)[..., None, :]
            result = result + (QJL_SCALE / self.dim) * gamma * qjl.reshape(
                *heads, *qjl.shape[-2:])
        return result * arrays["norm"].astype(xp.float32)[..., None, :]


@register("turbo", method_id=2, main_parameter="bits")
@dataclass(frozen=True)
class TurboQuant(ChannelSplitQuantizer):
    """TurboQuant (mse or prod), with EDEN scales, outlier channels and channel statistics.

    Parameters
    ----------
    dim : int
        Vector dimension, >= 2.
    bits : int
        Bits per coordinate of the codes, 1..8 (prod: ``bits - 1`` for the mse stage and 1
        for the QJL signs).
    mode : {"mse", "prod"}
    seed : int
        Seeds the rotation and the prod sketch (independent streams per stage).
    outlier_channels : int
        ``r``: channels of largest prefill energy encoded at ``outlier_bits`` (0: none).
    outlier_bits : int, optional
        Bits of the outlier stage; by default ``min(bits + 1, 8)``.
    scale : {"none", "eden", "eden-mse"}
        Per-vector factor stored in the norm's place (mse mode only).
    rotation : {"hadamard", "dense"}
        `latkv.RandomizedHadamard` (fast) or `latkv.RandomOrthogonal` (exact Haar).
    center, channel_scale, stats_tokens, local_stats
        The shared per-channel pre-transform (`latkv.channel_transform`).

    Notes
    -----
    Bytes per vector for a stage of ``d`` channels: ``ceil(d b / 8) + 2`` (mse) or
    ``ceil(d (b-1) / 8) + ceil(d / 8) + 4`` (prod: codes, signs, two fp16 norms). Outliers add
    the outlier stage and one index per outlier channel per head (over ``stats_tokens``
    tokens). For dim 128: ``turbo:4`` is 4.125 bits per coordinate; the split
    ``turbo:2,outlier_channels=32,outlier_bits=3`` (the paper's "2.5-bit" example) is
    2.25 bits of codes + 0.25 of norms + 0.016 of indices; ``outlier_channels=64`` gives the
    real 2.5 (3.5 with ``bits=3, outlier_bits=4``) bits of codes.

    Examples
    --------
    >>> import numpy as np, latkv
    >>> qz = latkv.TurboQuant(dim=128, bits=3, seed=0)
    >>> qz.bits_per_coordinate
    3.125
    >>> x = np.random.default_rng(0).standard_normal((2000, 128)).astype(np.float32)
    >>> x /= np.linalg.norm(x, axis=1, keepdims=True)
    >>> error = ((qz.decode(qz.encode(x)) - x) ** 2).sum(axis=1).mean()
    >>> bool(abs(error - 0.0340) < 0.002)
    True
    """

    dim: int
    bits: int = 4
    mode: str = "mse"
    seed: int = 0
    outlier_channels: int = 0
    outlier_bits: int | None = None
    scale: str = "none"
    rotation: str = "hadamard"
    center: bool = False
    channel_scale: bool = False
    stats_tokens: int = 128
    local_stats: bool = False

    backends = ("numpy", "numba", "cupy", "numba.cuda")

    @property
    def idempotent(self) -> bool | None:
        """Re-encoding a decoded vector keeps the codes up to the refitted norm (plain mse:
        False, "nearly"); prod decodes to an estimate, and statistics or outlier channels are
        refitted to the decoded data, so re-encoding is a new quantization (None)."""
        if self.mode == "prod" or self.needs_tokens:
            return None
        return False
    #: rows of ``latkv compare``: mse, prod and EDEN forms with and without centring, the real
    #: 2.5- and 3.5-bit channel splits, K/V pairings against KIVI and K/V bit splits
    compare_specs = (
        "turbo", "turbo,center=True", "turbo,mode=prod", "turbo,mode=prod,center=True",
        "turbo,scale=eden", "turbo,scale=eden,center=True",
        *(f"turbo:{b},outlier_channels={{dim/2}},outlier_bits={b + 1}{options}"
          for b in (2, 3)
          for options in ("", ",center=True", ",mode=prod,center=True",
                          ",scale=eden,center=True")),
        "scalar,axis=channel,group=128|turbo",
        "turbo,center=True|turbo",
        "turbo,center=True,channel_scale=True|turbo",
        # keys are the sensitive half: K/V bit splits
        "turbo:4,center=True|turbo:2", "turbo:4,center=True|turbo:3",
        "turbo:8,center=True|turbo:4",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim", check_int(self.dim, "dim", 2))
        object.__setattr__(self, "bits", check_bits(self.bits))
        check_choice(self.mode, "mode", MODES)
        check_choice(self.scale, "scale", SCALES)
        check_choice(self.rotation, "rotation", ROTATIONS)
        object.__setattr__(self, "seed", check_int(self.seed, "seed", 0))
        if self.mode == "prod" and self.scale != "none":
            raise ValueError("scale must be 'none' with mode='prod' (its QJL term is already "
                             "unbiased)")
        object.__setattr__(self, "outlier_channels",
                           check_int(self.outlier_channels, "outlier_channels", 0, self.dim))
        if self.outlier_channels and not 2 <= self.outlier_channels <= self.dim - 2:
            raise ValueError(f"outlier_channels must be 0 or in [2, dim - 2] = [2, "
                             f"{self.dim - 2}] (each stage needs 2 channels), got "
                             f"{self.outlier_channels}")
        if self.outlier_bits is not None:
            object.__setattr__(self, "outlier_bits", check_bits(self.outlier_bits,
                                                                "outlier_bits"))
        for flag in ("center", "channel_scale", "local_stats"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        object.__setattr__(self, "stats_tokens", check_int(self.stats_tokens, "stats_tokens", 1))
        main = TurboStage(self.dim - self.outlier_channels, self.bits, self.mode, self.scale,
                          self.rotation, self.seed, 0)
        outlier = None
        if self.outlier_channels:
            outlier_bits = self.outlier_bits if self.outlier_bits is not None else min(
                self.bits + 1, 8)
            outlier = TurboStage(self.outlier_channels, outlier_bits, self.mode, self.scale,
                                 self.rotation, self.seed, 1)
        object.__setattr__(self, "_stages", (main, outlier))

    @property
    def outlier_count(self) -> int:
        return self.outlier_channels

    def stages(self) -> tuple[TurboStage, TurboStage | None]:
        return self._stages  # type: ignore[attr-defined]
