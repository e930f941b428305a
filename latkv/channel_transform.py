"""Per-channel key normalisation from the prefill, and outlier-channel selection.

Post-RoPE keys of real decoders carry large per-channel offsets (on SmolLM2 about 60% of key
energy sits in the channel means) and a few channels of much larger spread. A rotation-based
quantizer spreads both over every coordinate, where they cost bits. The shared pre-transform
removes them first, per head (every leading index of ``(..., tokens, dim)``):

    y = (x - mean) / scale        mean, scale : (dim,) per head, stored as float16

``mean`` is the per-channel mean of the first ``stats_tokens`` tokens (the prefill) and
``scale`` their per-channel root mean square after centring; both are frozen for the rest of
the sequence (``local_stats=True`` re-estimates them for every block of ``stats_tokens``
tokens instead, as KIVI's per-channel groups do). The quantizer then encodes ``y``; decoding
gives ``x_hat = y_hat * scale + mean``, and a query needs only one transform for exact scores,

    <q, x_hat> = <q * scale, y_hat> + <q, mean>.

Outlier channels (TurboQuant's split bit widths, QJL's outlier sketch) are the ``count``
channels of largest energy in the prefill of ``y``, chosen per head and stored as indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from latkv._backend import array_module

FLOAT16_MAX = float(np.finfo(np.float16).max)


def _round_float16(values: Any, name: str) -> Any:
    xp = array_module(values)
    if bool((xp.abs(values) > FLOAT16_MAX).any()):
        raise ValueError(f"the per-channel {name} exceeds the float16 range (65504); "
                         "inputs of such magnitude cannot use center/channel_scale")
    return values.astype(xp.float16)


@dataclass(frozen=True)
class ChannelTransform:
    """The frozen per-channel ``(x - mean) / scale`` pre-transform (see the module docstring).

    Parameters
    ----------
    dim : int
    center : bool
        Subtract the per-channel mean.
    channel_scale : bool
        Divide by the per-channel root mean square (after centring when ``center``).
    stats_tokens : int
        Tokens the statistics are estimated from (the prefill), or the block length when
        ``local_stats``.
    local_stats : bool
        Re-estimate the statistics for each block of ``stats_tokens`` tokens.

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.channel_transform import ChannelTransform
    >>> t = ChannelTransform(4, center=True, channel_scale=True, stats_tokens=2)
    >>> x = np.array([[[1, 2, 3, 4], [3, 2, 5, 0], [9, 9, 9, 9]]], dtype=np.float32)
    >>> stats = t.fit(x)
    >>> stats["channel_mean"], stats["channel_scale"]
    (array([[2., 2., 4., 2.]], dtype=float16), array([[1., 1., 1., 2.]], dtype=float16))
    >>> t.apply(x, stats)[0, 2]
    array([7. , 7. , 5. , 3.5], dtype=float32)
    """

    dim: int
    center: bool = False
    channel_scale: bool = False
    stats_tokens: int = 128
    local_stats: bool = False

    @property
    def active(self) -> bool:
        return self.center or self.channel_scale

    @property
    def names(self) -> tuple[str, ...]:
        return (("channel_mean",) if self.center else ()) + (
            ("channel_scale",) if self.channel_scale else ())

    def blocks(self, tokens: int) -> int:
        """Statistics blocks for a sequence of ``tokens`` tokens (1 when frozen)."""
        return -(-tokens // self.stats_tokens) if self.local_stats else 1

    def layout(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], str]]:
        """Arrays written for an input of ``shape = (..., tokens, dim)``."""
        if not self.active:
            return {}
        stats_shape = (*shape[:-2], self.dim) if not self.local_stats else (
            *shape[:-2], self.blocks(shape[-2]), self.dim)
        return {name: (stats_shape, "float16") for name in self.names}

    def block_bytes(self) -> int:
        """Bytes of statistics per head and per block (per sequence when frozen)."""
        return 2 * self.dim * len(self.names)

    def _blocked(self, x: Any) -> Any:
        """``x : (..., n, dim)`` -> ``(..., B, stats_tokens, dim)`` (local) or the prefill."""
        xp = array_module(x)
        if not self.local_stats:
            return x[..., None, : self.stats_tokens, :]
        n = x.shape[-2]
        blocks = self.blocks(n)
        missing = blocks * self.stats_tokens - n
        if missing:  # pad with NaN, ignored by the nan-aware reductions
            pad = xp.full((*x.shape[:-2], missing, self.dim), xp.nan, dtype=x.dtype)
            x = xp.concatenate([x, pad], axis=-2)
        return x.reshape(*x.shape[:-2], blocks, self.stats_tokens, self.dim)

    def fit(self, x: Any) -> dict[str, Any]:
        """Statistics of ``x : (..., tokens, dim)`` float32 as float16 arrays (``layout``)."""
        xp = array_module(x)
        blocked = self._blocked(x).astype(xp.float64)
        stats: dict[str, Any] = {}
        mean = xp.zeros(blocked.shape[:-2] + (self.dim,), dtype=xp.float64)
        if self.center:
            stats["channel_mean"] = _round_float16(xp.nanmean(blocked, axis=-2), "mean")
            mean = stats["channel_mean"].astype(xp.float64)
        if self.channel_scale:
            rms = xp.sqrt(xp.nanmean((blocked - mean[..., None, :]) ** 2, axis=-2))
            scale = _round_float16(rms, "scale")
            # a constant channel (or one whose spread underflows float16) keeps scale 1
            stats["channel_scale"] = xp.where(scale > 0, scale, xp.float16(1))
        if not self.local_stats:
            stats = {k: v[..., 0, :] for k, v in stats.items()}
        return stats

    def expanded(self, stats: dict[str, Any], tokens: int) -> tuple[Any, Any]:
        """float32 ``(mean, scale)`` broadcastable against ``(..., tokens, dim)``."""
        if not stats:
            return np.float32(0.0), np.float32(1.0)
        xp = array_module(next(iter(stats.values())))

        def per_token(name: str, default: float) -> Any:
            if name not in stats:
                return xp.float32(default)
            value = stats[name].astype(xp.float32)
            if not self.local_stats:
                return value[..., None, :]
            return xp.repeat(value, self.stats_tokens, axis=-2)[..., :tokens, :]

        return per_token("channel_mean", 0.0), per_token("channel_scale", 1.0)

    def apply(self, x: Any, stats: dict[str, Any]) -> Any:
        """``(x - mean) / scale`` (float32) for ``x : (..., tokens, dim)``."""
        mean, scale = self.expanded(stats, x.shape[-2])
        return ((x - mean) / scale).astype(array_module(x).float32)

    def invert(self, y: Any, stats: dict[str, Any]) -> Any:
        """``y * scale + mean`` (float32)."""
        mean, scale = self.expanded(stats, y.shape[-2])
        return (y * scale + mean).astype(array_module(y).float32)


def select_outlier_channels(y: Any, count: int, tokens: int) -> Any:
    """Indices of the ``count`` channels of largest energy in the first ``tokens`` tokens.

    Parameters
    ----------
    y : (..., n, dim) float32
        The transformed keys (every leading index a head).
    count : int
        Channels to pick per head, at most ``dim``.
    tokens : int
        Leading tokens whose energy ``sum_t y[..., t, c]**2`` ranks the channels (the prefill).

    Returns
    -------
    (..., count) int64, increasing along the last axis; ties go to the lower channel.

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.channel_transform import select_outlier_channels
    >>> y = np.array([[[0, 3, 1, 0, 2],
    ...                [0, 3, 0, 1, 2],
    ...                [9, 0, 0, 0, 0]]], np.float32)     # one head, 3 tokens, dim 5
    >>> select_outlier_channels(y, 2, tokens=2)          # energies 0, 18, 1, 1, 8
    array([[1, 4]])
    >>> select_outlier_channels(y, 2, tokens=3)          # channel 0 now has 81
    array([[0, 1]])
    >>> select_outlier_channels(np.ones((1, 4, 6), np.float32), 3, tokens=4)   # all tied
    array([[0, 1, 2]])
    """
    xp = array_module(y)
    prefill = y[..., :tokens, :].astype(xp.float64)
    energy = (prefill * prefill).sum(axis=-2)                           # (..., dim)
    order = xp.argsort(-energy, axis=-1, kind="stable")[..., :count]
    return xp.sort(order, axis=-1)


def complement_channels(index: Any, dim: int) -> Any:
    """The channels not in ``index : (..., r)`` (increasing), shape ``(..., dim - r)``."""
    xp = array_module(index)
    channels = xp.arange(dim)
    mask = (index[..., :, None].astype(xp.int64) == channels).any(axis=-2).astype(xp.int8)
    return xp.argsort(mask, axis=-1, kind="stable")[..., : dim - index.shape[-1]]
