"""KIVI-style asymmetric min-max scalar quantization (the baseline).

KIVI (Liu et al., 2024, arXiv 2402.02750, Sec. 3) quantizes keys per channel (groups of
tokens share a scale and zero for each channel) and values per token (groups of channels
share them). For a group ``g`` of elements with minimum ``m`` and maximum ``M`` and
``L = 2**bits - 1`` levels:

    zero_g  = fp16 rounded down (m)
    scale_g = fp16 rounded up ((M - zero_g) / L)
    code    = clip(rint((x - zero_g) / scale_g), 0, L)
    x_hat   = code * scale_g + zero_g

(and one fp16 step more in the rare case that float32 rounding of the division leaves
``scale_g * L < M - zero_g``, e.g. a subnormal range whose step underflows to 0).
Rounding the stored fp16 zero down and the scale up keeps ``[m, M]`` inside the grid, so
``|x - x_hat| <= scale_g / 2`` for every element (up to float32 rounding). All arithmetic is
float32; float16 and float64 inputs are converted first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from latkv._backend import array_module
from latkv.checks import check_bits, check_choice, check_int
from latkv.container import Codes
from latkv.packing import pack_bits, packed_length, unpack_bits
from latkv.quantizer import Quantizer
from latkv.registry import register

AXES = ("token", "channel")


def _next_float16_up(h: Any) -> Any:
    """The next float16 above each element of ``h`` (finite inputs), via the bit pattern."""
    xp = array_module(h)
    bits = h.view(xp.uint16)
    positive = (bits & xp.uint16(0x8000)) == 0
    is_zero = (bits & xp.uint16(0x7FFF)) == 0
    stepped = xp.where(positive, bits + xp.uint16(1), bits - xp.uint16(1))
    return xp.where(is_zero, xp.uint16(1), stepped).astype(xp.uint16).view(xp.float16)


FLOAT16_VALUE_ERROR = ("x has values beyond the float16 range (|x| > 65504): the fp16 scale "
                       "and zero of ScalarQuant cannot represent them")
FLOAT16_RANGE_ERROR = ("x has values or ranges beyond float16 (|x| or max - min over 65504): "
                       "the fp16 scale and zero of ScalarQuant cannot represent them")


def scale_and_zero(minimum: Any, maximum: Any, bits: int) -> tuple[Any, Any]:
    """fp16 ``(scale, zero)`` per group from float32 group minima and maxima (see module doc).

    Signed zeros are made ``+0.0`` first, so the stored bits do not depend on which of two
    equal zeros a min or max reduction returns.
    """
    xp = array_module(minimum)
    levels = xp.float32((1 << bits) - 1)
    largest = float(np.finfo(np.float16).max)
    if bool((minimum < -largest).any()) or bool((maximum > largest).any()):
        raise ValueError(FLOAT16_VALUE_ERROR)
    minimum, maximum = minimum + xp.float32(0.0), maximum + xp.float32(0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        zero = minimum.astype(xp.float16)
        zero = xp.where(zero.astype(xp.float32) > minimum, -_next_float16_up(-zero), zero)
        step = (maximum - zero.astype(xp.float32)) / levels
        scale = step.astype(xp.float16)
        scale = xp.where(scale.astype(xp.float32) < step, _next_float16_up(scale), scale)
        # the float32 division may have rounded the step down (to 0 for tiny subnormal ranges)
        span = maximum - zero.astype(xp.float32)
        scale = xp.where(scale.astype(xp.float32) * levels < span, _next_float16_up(scale), scale)
    if not (bool(xp.isfinite(zero).all()) and bool(xp.isfinite(scale).all())):
        raise ValueError(FLOAT16_RANGE_ERROR)
    return scale.astype(xp.float16), zero.astype(xp.float16)


def quantize(x: Any, scale: Any, zero: Any, bits: int) -> Any:
    """``clip(rint((x - zero) / scale), 0, 2**bits - 1)`` in float32, as uint8.

    ``x``, ``scale`` and ``zero`` are float32 and broadcast; a zero scale (constant group)
    gives code 0.
    """
    xp = array_module(x)
    safe_scale = xp.where(scale == 0, xp.float32(1), scale)
    codes = xp.rint((x - zero) / safe_scale)
    return xp.clip(codes, 0, (1 << bits) - 1).astype(xp.uint8)


def _pad_to_groups(x: Any, axis: int, group: int) -> Any:
    """Repeat the last element along ``axis`` up to a multiple of ``group`` (keeps min/max)."""
    xp = array_module(x)
    length = x.shape[axis]
    missing = -length % group
    if missing == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, missing)
    return xp.pad(x, widths, mode="edge")


@register("scalar", method_id=1, main_parameter="bits")
@dataclass(frozen=True)
class ScalarQuant(Quantizer):
    """KIVI-style asymmetric min-max quantization with fp16 scale and zero per group.

    Parameters
    ----------
    dim : int
        Vector dimension (head dim).
    bits : int
        Bits per code, 1..8.
    group : int
        Group size: channels per group along ``dim`` for ``axis="token"`` (the last group may
        be shorter), tokens per group along the token axis for ``axis="channel"``.
    axis : {"token", "channel"}
        ``"token"``: each vector has its own scales (KIVI's values). ``"channel"``: each
        channel has a scale per group of ``group`` consecutive tokens (KIVI's keys); inputs are
        then ``(..., tokens, dim)``.

    Notes
    -----
    Exact size per vector (``code_size``, bytes), with ``P = ceil(dim * bits / 8)``:

    * ``axis="token"``: ``P + 4 * ceil(dim / group)`` (an fp16 scale and zero per group);
    * ``axis="channel"``: ``P + 4 * dim / group``, amortised over a full group of tokens; a
      block of ``n`` tokens takes ``n * P + 4 * dim * ceil(n / group)`` bytes.

    ``bits_per_coordinate = 8 * code_size / dim``: e.g. ``bits + 32 / group`` when ``group``
    divides ``dim`` (4.5 for 4 bits in groups of 64).

    Equivalent to `quantize` with `scale_and_zero` per group, then
    `latkv.pack_bits` on each vector's codes.

    Examples
    --------
    >>> import numpy as np, latkv
    >>> qz = latkv.ScalarQuant(dim=64, bits=4, group=32)
    >>> x = np.random.default_rng(0).standard_normal((10, 64)).astype(np.float32)
    >>> codes = qz.encode(x)
    >>> codes.nbytes == 10 * qz.code_size == 10 * (32 + 4 * 2)
    True
    >>> float(np.abs(qz.decode(codes) - x).max()) < 0.3
    True
    """

    dim: int
    bits: int = 4
    group: int = 32
    axis: str = "token"

    backends = ("numpy", "numba", "cupy", "numba.cuda")
    #: re-encoding decoded vectors refits fp16 scales, so codes may move by one level
    idempotent = False
    #: rows of ``latkv compare``: per-token, per-channel, and KIVI (channel keys, token values)
    #: with groups of 32, and with KIVI's cheaper groups (128-token keys, 64-channel values)
    compare_specs = ("scalar", "scalar,axis=channel", "scalar,axis=channel|scalar",
                     "scalar,axis=channel,group=128|scalar,group=64",
                     "scalar:4,axis=channel,group=128|turbo:3")

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim", check_int(self.dim, "dim", 1))
        object.__setattr__(self, "bits", check_bits(self.bits))
        object.__setattr__(self, "group", check_int(self.group, "group", 1))
        check_choice(self.axis, "axis", AXES)
        if self.axis == "token" and self.group > self.dim:
            raise ValueError(f"group must be <= dim ({self.dim}) for axis='token', got {self.group}")

    # -- sizes ----------------------------------------------------------------------------

    @property
    def packed_bytes(self) -> int:
        """``P = ceil(dim * bits / 8)``: bytes of packed codes per vector."""
        return packed_length(self.dim, self.bits)

    @property
    def code_size(self) -> float:
        if self.axis == "token":
            return self.packed_bytes + 4 * (-(-self.dim // self.group))
        return self.packed_bytes + 4 * self.dim / self.group

    def _groups_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.axis == "token":
            return (*shape[:-1], -(-self.dim // self.group))
        return (*shape[:-2], -(-shape[-2] // self.group), self.dim)

    def code_layout(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], str]]:
        if self.axis == "channel" and len(shape) < 2:
            raise ValueError(f"axis='channel' needs shape (..., tokens, dim), got {shape}")
        groups = self._groups_shape(shape)
        return {
            "packed": ((*shape[:-1], self.packed_bytes), "uint8"),
            "scale": (groups, "float16"),
            "zero": (groups, "float16"),
        }

    # -- reference --------------------------------------------------------------------------

    def _grouped(self, x: Any) -> Any:
        """``x`` (float32) padded and reshaped so that axis -1 (token) or -2 (channel) is a group."""
        if self.axis == "token":
            x = _pad_to_groups(x, -1, self.group)
            return x.reshape(*x.shape[:-1], -1, self.group)
        x = _pad_to_groups(x, -2, self.group)
        return x.reshape(*x.shape[:-2], -1, self.group, self.dim)

    def _codes_reference(self, x: Any) -> tuple[Any, Any, Any]:
        reduce_axis = -1 if self.axis == "token" else -2
        grouped = self._grouped(x)
        scale, zero = scale_and_zero(grouped.min(axis=reduce_axis), grouped.max(axis=reduce_axis),
                                     self.bits)
        expand = (..., None) if self.axis == "token" else (..., slice(None), None, slice(None))
        codes = quantize(grouped, scale.astype(np.float32)[expand],
                         zero.astype(np.float32)[expand], self.bits)
        if self.axis == "token":
            codes = codes.reshape(*x.shape[:-1], -1)[..., : self.dim]
        else:
            codes = codes.reshape(*x.shape[:-2], -1, self.dim)[..., : x.shape[-2], :]
        return codes, scale, zero

    def _expanded(self, side: Any, shape: tuple[int, ...]) -> Any:
        """Per-group ``scale`` or ``zero`` broadcast to one value per element of ``shape``."""
        xp = array_module(side)
        side = side.astype(xp.float32)
        if self.axis == "token":
            return xp.repeat(side, self.group, axis=-1)[..., : self.dim]
        return xp.repeat(side, self.group, axis=-2)[..., : shape[-2], :]

    # -- the interface ----------------------------------------------------------------------

    def encode(self, x: Any, *, backend: str | None = None) -> Codes:
        """Encode ``x : (..., dim)`` (``(..., tokens, dim)`` for ``axis="channel"``).

        Parameters
        ----------
        x : (..., dim) float16, float32 or float64, NumPy or CuPy
        backend : str, optional
            ``"numpy"``, ``"numba"``, ``"cupy"`` or ``"numba.cuda"``; by default the array
            module of the input picks it (NumPy -> ``"numba"``, CuPy -> ``"cupy"``).

        Returns
        -------
        Codes
            ``packed : (..., ceil(dim*bits/8)) uint8``; ``scale``, ``zero`` float16 of shape
            ``(..., ceil(dim/group))`` (token) or ``(..., ceil(tokens/group), dim)`` (channel).
        """
        x = self.check_input(x, min_ndim=2 if self.axis == "channel" else 1)
        backend = self.check_backend(backend, x)
        xp = array_module(x)
        x32 = xp.ascontiguousarray(x, dtype=xp.float32)
        if backend == "numba":
            from latkv._cpu import scalar as kernels

            packed, scale, zero = kernels.encode(x32, self.bits, self.group, self.axis)
        else:
            codes, scale, zero = self._codes_reference(x32)
            pack_backend = "numpy" if backend == "numpy" else backend
            packed = pack_bits(codes, self.bits, backend=pack_backend, check=False)
        return self.make_codes(x, {"packed": packed, "scale": scale, "zero": zero})

    def decode(self, codes: Codes, *, backend: str | None = None) -> Any:
        """Reconstruct ``x_hat : (..., dim)`` in the encoded dtype: ``code * scale + zero``."""
        self.check_codes(codes)
        packed = codes["packed"]
        backend = self.check_backend(backend, packed)
        xp = array_module(packed)
        if backend == "numba":
            from latkv._cpu import scalar as kernels

            x_hat = kernels.decode(packed, codes["scale"], codes["zero"], self.bits, self.dim,
                                   self.group, self.axis)
        else:
            unpack_backend = "numpy" if backend == "numpy" else backend
            integer = unpack_bits(packed, self.bits, self.dim, backend=unpack_backend)
            shape = tuple(codes.shape)
            x_hat = (integer.astype(xp.float32) * self._expanded(codes["scale"], shape)
                     + self._expanded(codes["zero"], shape))
        return x_hat.astype(codes.dtype, copy=False)

    def scores(self, q: Any, codes: Codes, *, backend: str | None = None) -> Any:
        """``q @ x_hat.T`` from the integer codes and per-group sides, without forming ``x_hat``.

        Token groups: ``<q, x_hat> = sum_g scale_g <q_g, c_g> + zero_g sum(q_g)``. Channel
        groups: ``<q, x_hat> = <q * scale_t, c> + <q, zero_t>`` with ``t`` the token's group.

        Parameters
        ----------
        q : (..., m, dim) or (dim,) float
        codes : Codes of x with shape (..., n, dim)

        Returns
        -------
        (..., m, n) float32, or (n,) for a single query vector
            Equal to ``q @ decode(codes).T`` up to float32 rounding.
        """
        self.check_codes(codes)
        q = self.check_query(q, codes)
        if len(codes.shape) < 2:
            raise ValueError("scores needs codes of shape (..., n, dim)")
        xp = array_module(q)
        single = q.ndim == 1
        q32 = q.astype(xp.float32)[None, :] if single else q.astype(xp.float32)
        unpack_backend = "numpy" if backend == "numpy" else None
        integer = unpack_bits(codes["packed"], self.bits, self.dim,
                              backend=unpack_backend).astype(xp.float32)
        scale = codes["scale"].astype(xp.float32)
        zero = codes["zero"].astype(xp.float32)
        if self.axis == "token":
            q_groups = self._grouped_zero_padded(q32)                        # (..., m, G, k)
            c_groups = self._grouped_zero_padded(integer)                    # (..., n, G, k)
            dots = xp.einsum("...mgk,...ngk->...mng", q_groups, c_groups)     # (..., m, n, G)
            sums = q_groups.sum(axis=-1)                                     # (..., m, G)
            result = (dots * scale[..., None, :, :]).sum(-1) + xp.einsum(
                "...mg,...ng->...mn", sums, zero)
        else:
            n = integer.shape[-2]
            tokens = _pad_to_groups(integer, -2, self.group)
            tokens = tokens.reshape(*tokens.shape[:-2], -1, self.group, self.dim)  # (..., T, k, d)
            weighted = q32[..., None, :, :] * scale[..., :, None, :]               # (..., T, m, d)
            dots = xp.einsum("...tmd,...tkd->...mtk", weighted, tokens)
            offsets = xp.einsum("...md,...td->...mt", q32, zero)
            result = (dots + offsets[..., None]).reshape(*dots.shape[:-2], -1)[..., :n]
        return result[..., 0, :] if single else result

    def _grouped_zero_padded(self, a: Any) -> Any:
        xp = array_module(a)
        missing = -self.dim % self.group
        if missing:
            a = xp.concatenate([a, xp.zeros((*a.shape[:-1], missing), dtype=a.dtype)], axis=-1)
        return a.reshape(*a.shape[:-1], -1, self.group)
