"""Base of the quantizers that take the channel pre-transform and an outlier-channel split.

A method built on it (`latkv.TurboQuant`, `latkv.QJL`, ...) supplies one or two *stages*:
objects that encode vectors of a given length with that method's core (a rotation and a
codebook, a sign sketch, ...). This base does what is the same for all of them:

1. the per-channel pre-transform of `latkv.channel_transform` (``center``,
   ``channel_scale``, estimated from the first ``stats_tokens`` tokens, stored in float16);
2. with ``r`` outlier channels, the split of each head's channels into the ``r`` of largest
   prefill energy, encoded by the outlier stage, and the other ``dim - r``, encoded by the main
   stage, the indices stored once per head;
3. the exact size: per-vector stage bytes plus the per-head side information (statistics,
   indices) amortised over ``stats_tokens`` tokens: ``code_size`` is exact for a sequence of
   ``stats_tokens`` tokens, and ``encoded_nbytes(shape)`` for any shape (with ``local_stats``
   every block of ``stats_tokens`` stores its own statistics, the outlier indices still once
   per head, so longer sequences store less than ``code_size`` per token);
4. ``scores`` from the stages' own ``scores`` on the transformed query (``q * scale``, plus
   ``<q, mean>``), so no key is decoded.

Stage arrays are stored under their own names (main stage) or prefixed ``outlier_``.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from latkv._backend import array_module
from latkv.channel_transform import (ChannelTransform, complement_channels,
                                     select_outlier_channels)
from latkv.container import Codes
from latkv.quantizer import Quantizer

OUTLIER_PREFIX = "outlier_"
STAT_NAMES = ("channel_mean", "channel_scale", "outlier_index")


class Stage(Protocol):
    """What a method's core offers the split: fixed-size codes of ``(..., dim)`` vectors."""

    dim: int

    @property
    def nbytes(self) -> int: ...  # exact bytes per vector

    def layout(self, lead: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], str]]: ...

    def encode(self, y: Any, backend: str) -> dict[str, Any]: ...

    def decode(self, arrays: dict[str, Any], backend: str) -> Any: ...

    def scores(self, q: Any, arrays: dict[str, Any], backend: str) -> Any: ...

    def weighted_sum(self, weights: Any, arrays: dict[str, Any], backend: str) -> Any: ...


def _gather(a: Any, index: Any) -> Any:
    """``a[..., index]`` per head: ``a : (H..., t, dim)``, ``index : (H..., k)`` -> (H..., t, k)."""
    xp = array_module(a)
    heads = np.broadcast_shapes(tuple(a.shape[:-2]), tuple(index.shape[:-1]))
    a = xp.broadcast_to(a, (*heads, *a.shape[-2:]))
    index = xp.broadcast_to(index.astype(xp.int64)[..., None, :], (*heads, a.shape[-2],
                                                                  index.shape[-1]))
    return xp.take_along_axis(a, index, axis=-1)


class ChannelSplitQuantizer(Quantizer):
    """Shared encode/decode/scores for quantizers with the channel pre-transform and outliers.

    Subclasses are frozen dataclasses with the fields ``dim``, ``center``, ``channel_scale``,
    ``stats_tokens`` and ``local_stats``, and implement ``outlier_count`` and ``stages``.
    """

    center: bool
    channel_scale: bool
    stats_tokens: int
    local_stats: bool

    # -- what a method supplies ------------------------------------------------------------

    @property
    def outlier_count(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def stages(self) -> tuple[Stage, Stage | None]:  # pragma: no cover - abstract
        """``(main, outlier)``: stages for ``dim - r`` and ``r`` channels (outlier None if r=0)."""
        raise NotImplementedError

    # -- derived ---------------------------------------------------------------------------

    @property
    def channel_transform(self) -> ChannelTransform:
        return ChannelTransform(self.dim, self.center, self.channel_scale, self.stats_tokens,
                                self.local_stats)

    @property
    def needs_tokens(self) -> bool:
        """Inputs must be ``(..., tokens, dim)``: per-head statistics or outlier channels."""
        return self.channel_transform.active or self.outlier_count > 0

    @property
    def index_dtype(self) -> str:
        return "uint8" if self.dim <= 256 else "uint16"

    @property
    def side_bytes(self) -> int:
        """Bytes per head of statistics and outlier indices (with ``local_stats`` the
        statistics repeat per block of ``stats_tokens``, the indices do not)."""
        return (self.channel_transform.block_bytes()
                + self.outlier_count * np.dtype(self.index_dtype).itemsize)

    @property
    def code_size(self) -> float:
        """Stage bytes per vector plus ``side_bytes / stats_tokens``."""
        main, outlier = self.stages()
        per_vector = main.nbytes + (outlier.nbytes if outlier is not None else 0)
        return per_vector + self.side_bytes / self.stats_tokens

    def code_layout(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], str]]:
        if self.needs_tokens and len(shape) < 2:
            raise ValueError(f"{self.name} with center, channel_scale or outliers needs "
                             f"inputs of shape (..., tokens, dim), got {shape}")
        lead = tuple(shape[:-1])
        layout = dict(self.channel_transform.layout(shape))
        main, outlier = self.stages()
        if outlier is not None:
            layout["outlier_index"] = ((*shape[:-2], self.outlier_count), self.index_dtype)
        layout.update(main.layout(lead))
        if outlier is not None:
            layout.update({OUTLIER_PREFIX + k: v for k, v in outlier.layout(lead).items()})
        return layout

    def check_codes(self, codes: Any, name: str = "codes") -> None:
        """The shared checks, plus valid outlier indices and finite statistics."""
        super().check_codes(codes, name)
        xp = codes.xp
        if "outlier_index" in codes.arrays:
            index = codes["outlier_index"].astype(xp.int64)
            if bool((index >= self.dim).any()) or bool((xp.diff(index, axis=-1) <= 0).any()):
                raise ValueError(f"{name} array 'outlier_index' must hold increasing channel "
                                 f"indices below dim {self.dim}")
        for stat in ("channel_mean", "channel_scale"):
            if stat in codes.arrays and not bool(xp.isfinite(codes[stat]).all()):
                raise ValueError(f"{name} array {stat!r} holds NaN or Inf")
        if "channel_scale" in codes.arrays and bool((codes["channel_scale"] <= 0).any()):
            raise ValueError(f"{name} array 'channel_scale' must be positive")

    # -- the split -------------------------------------------------------------------------

    def _stage_arrays(self, arrays: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        main = {k: v for k, v in arrays.items()
                if k not in STAT_NAMES and not k.startswith(OUTLIER_PREFIX)}
        outlier = {k[len(OUTLIER_PREFIX):]: v for k, v in arrays.items()
                   if k.startswith(OUTLIER_PREFIX) and k != "outlier_index"}
        return main, outlier

    def _encode_split(self, y: Any, backend: str) -> dict[str, Any]:
        main, outlier = self.stages()
        if outlier is None:
            return main.encode(y, backend)
        xp = array_module(y)
        index = select_outlier_channels(y, self.outlier_count, self.stats_tokens)
        arrays = {"outlier_index": index.astype(self.index_dtype)}
        arrays.update(main.encode(xp.ascontiguousarray(
            _gather(y, complement_channels(index, self.dim))), backend))
        outlier_arrays = outlier.encode(xp.ascontiguousarray(_gather(y, index)), backend)
        arrays.update({OUTLIER_PREFIX + k: v for k, v in outlier_arrays.items()})
        return arrays

    def _decode_split(self, arrays: dict[str, Any], shape: tuple[int, ...],
                      backend: str) -> Any:
        main, outlier = self.stages()
        main_arrays, outlier_arrays = self._stage_arrays(arrays)
        y_main = main.decode(main_arrays, backend)
        if outlier is None:
            return y_main
        return self._merge_channels(y_main, outlier.decode(outlier_arrays, backend),
                                    arrays["outlier_index"])

    def _merge_channels(self, y_main: Any, y_outlier: Any, index: Any) -> Any:
        """``(..., t, dim)`` from the main stage's channels and the outliers' (``index``)."""
        xp = array_module(y_main)
        index = index.astype(xp.int64)
        # the concatenation holds the channels in the order (rest, outliers); undo that
        order = xp.concatenate([complement_channels(index, self.dim), index], axis=-1)
        return _gather(xp.concatenate([y_main, y_outlier], axis=-1), xp.argsort(order, axis=-1))

    def _weighted_sum_split(self, weights: Any, arrays: dict[str, Any], backend: str) -> Any:
        main, outlier = self.stages()
        main_arrays, outlier_arrays = self._stage_arrays(arrays)
        y_main = main.weighted_sum(weights, main_arrays, backend)
        if outlier is None:
            return y_main
        return self._merge_channels(y_main, outlier.weighted_sum(weights, outlier_arrays,
                                                                 backend),
                                    arrays["outlier_index"])

    def _scores_split(self, q: Any, arrays: dict[str, Any], backend: str) -> Any:
        main, outlier = self.stages()
        main_arrays, outlier_arrays = self._stage_arrays(arrays)
        if outlier is None:
            return main.scores(q, main_arrays, backend)
        index = arrays["outlier_index"]
        rest = complement_channels(index, self.dim)
        return (main.scores(_gather(q, rest), main_arrays, backend)
                + outlier.scores(_gather(q, index), outlier_arrays, backend))

    # -- the interface ---------------------------------------------------------------------

    def encode(self, x: Any, *, backend: str | None = None) -> Codes:
        """Encode ``x : (..., dim)`` (``(..., tokens, dim)`` with statistics or outliers).

        Parameters
        ----------
        x : (..., dim) float16, float32 or float64, NumPy or CuPy
        backend : str, optional
            ``"numpy"`` (reference), ``"numba"``, ``"cupy"`` or ``"numba.cuda"``; by default
            the array module of ``x`` picks it.

        Returns
        -------
        Codes
            The arrays of ``code_layout(x.shape)``.
        """
        x = self.check_input(x, min_ndim=2 if self.needs_tokens else 1)
        backend = self.check_backend(backend, x)
        xp = array_module(x)
        y = xp.ascontiguousarray(x, dtype=xp.float32)
        arrays: dict[str, Any] = {}
        transform = self.channel_transform
        if transform.active:
            stats = transform.fit(y)
            arrays.update(stats)
            y = xp.ascontiguousarray(transform.apply(y, stats))
        arrays.update(self._encode_split(y, backend))
        return self.make_codes(x, arrays)

    def decode(self, codes: Codes, *, backend: str | None = None) -> Any:
        """Reconstruct ``x_hat : (..., dim)`` in the encoded dtype."""
        self.check_codes(codes)
        backend = self.check_backend(backend, next(iter(codes.arrays.values())))
        arrays = dict(codes.arrays)
        y_hat = self._decode_split(arrays, tuple(codes.shape), backend)
        transform = self.channel_transform
        if transform.active:
            y_hat = transform.invert(y_hat, {k: arrays[k] for k in transform.names})
        return y_hat.astype(codes.dtype, copy=False)

    def scores(self, q: Any, codes: Codes, *, backend: str | None = None) -> Any:
        """Estimated ``q @ x.T`` from the codes of ``x``, without decoding ``x``.

        Parameters
        ----------
        q : (..., m, dim) or (dim,) float
        codes : Codes of x with shape (..., n, dim)

        Returns
        -------
        (..., m, n) float32, or (n,) for a single query vector
        """
        self.check_codes(codes)
        q = self.check_query(q, codes)
        if len(codes.shape) < 2:
            raise ValueError("scores needs codes of shape (..., n, dim)")
        backend = self.check_backend(backend, q)
        xp = array_module(q)
        single = q.ndim == 1
        q32 = xp.ascontiguousarray(q, dtype=xp.float32)
        if single:
            q32 = q32[None, :]
        pieces = [self._scores_block(q32, arrays, stats, backend)
                  for _, arrays, stats in self._statistics_blocks(codes, backend)]
        result = pieces[0] if len(pieces) == 1 else xp.concatenate(pieces, axis=-1)
        return result[..., 0, :] if single else result

    def weighted_sum(self, weights: Any, codes: Codes, *, backend: str | None = None) -> Any:
        """``weights @ x_hat`` from the codes of ``x``, summed in the stages' rotated domain.

        ``sum_n w_n x_hat_n = R^T sum_n w_n (R x_hat_n)``: the stages sum their rotated
        estimates and rotate each of the ``m`` sums back once; the channel statistics enter
        as ``(sum_n w_n y_n) * scale + (sum_n w_n) * mean`` per statistics block.

        Parameters
        ----------
        weights : (..., m, n) float
        codes : Codes of x with shape (..., n, dim)

        Returns
        -------
        (..., m, dim) float32
        """
        self.check_codes(codes)
        weights = self.check_weights(weights, codes)
        backend = self.check_backend(backend, weights)
        xp = array_module(weights)
        w32 = xp.ascontiguousarray(weights, dtype=xp.float32)
        total = None
        for window, arrays, stats in self._statistics_blocks(codes, backend):
            part = self._weighted_sum_block(w32[..., window], arrays, stats, backend)
            total = part if total is None else total + part
        return total

    def _statistics_blocks(self, codes: Codes, backend: str):
        """``(token window, arrays of those tokens, their statistics)`` per statistics block:
        one block (all tokens) unless ``local_stats`` gives every ``stats_tokens`` their own."""
        arrays = self.scores_arrays(codes, backend)
        transform = self.channel_transform
        if not (transform.active and transform.local_stats):
            yield slice(None), arrays, arrays
            return
        n = codes.shape[-2]
        token_axis = len(codes.shape) - 2
        for block, start in enumerate(range(0, n, self.stats_tokens)):
            window = slice(start, min(start + self.stats_tokens, n))
            sliced = {k: (v if k in STAT_NAMES else v[(slice(None),) * token_axis + (window,)])
                      for k, v in arrays.items()}
            yield window, sliced, {k: arrays[k][..., block, :] for k in transform.names}

    def scores_arrays(self, codes: Codes, backend: str) -> dict[str, Any]:
        """The arrays `scores` works on (the codes' own; a method may decode some first).

        Per-token arrays keep the token axis second to last, which ``local_stats`` slices.
        """
        return dict(codes.arrays)

    def _scores_block(self, q32: Any, arrays: dict[str, Any], stats: dict[str, Any],
                      backend: str) -> Any:
        """Scores of tokens that share one set of (frozen) statistics ``(..., dim)``."""
        xp = array_module(q32)
        offset = 0
        q_scaled = q32
        if "channel_scale" in stats:
            q_scaled = q32 * stats["channel_scale"].astype(xp.float32)[..., None, :]
        if "channel_mean" in stats:
            offset = (q32 @ stats["channel_mean"].astype(xp.float32)[..., :, None])
        return self._scores_split(q_scaled, arrays, backend) + offset

    def _weighted_sum_block(self, w32: Any, arrays: dict[str, Any], stats: dict[str, Any],
                            backend: str) -> Any:
        """Weighted sum over tokens that share one set of statistics ``(..., dim)``."""
        xp = array_module(w32)
        total = self._weighted_sum_split(w32, arrays, backend)
        if "channel_scale" in stats:
            total = total * stats["channel_scale"].astype(xp.float32)[..., None, :]
        if "channel_mean" in stats:
            total = total + (w32.sum(axis=-1, keepdims=True)
                             * stats["channel_mean"].astype(xp.float32)[..., None, :])
        return total.astype(xp.float32)
