"""Outlier, scale and tail statistics of a KV set, per layer and per kind of array.

A KV set is the dict that `latkv.compare.load_kv` reads: for each layer ``l``, ``k_L{l}``
(post-RoPE keys), ``v_L{l}`` (values), both ``(kv_heads, tokens, dim)``, ``q_L{l}`` (queries,
not used here) and optionally ``k_pre_L{l}`` (pre-RoPE keys, ``(kv_heads, tokens, dim)``).
`kv_statistics` gives one row per layer and kind (``"k"``, ``"k_pre"`` where present, ``"v"``),
`summarize` reduces the rows over layers and `stats_table` renders them for ``latkv stats``.

Definitions
-----------
For one array ``x`` of shape ``(H, T, d)`` (heads, tokens, channels), computed in float64,
with every (head, channel) pair ``(h, c)`` taken over its ``T`` tokens:

    mu[h, c]    = (1/T) sum_t x[h, t, c]                              channel mean
    sigma[h, c] = sqrt((1/T) sum_t (x[h, t, c] - mu[h, c])**2)        channel std (ddof = 0)
    M[h, c]     = max_t |x[h, t, c]|                                  channel max |x|
    s           = median over all H * d pairs of sigma[h, c]          the typical channel std
    r[h, c]     = M[h, c] / s                                         channel outlier ratio

The figures of a row are

    outlier_ratio          = max_{h,c} r[h, c]
    outlier_channels       = #{(h, c) : M[h, c] > OUTLIER_THRESHOLD * s}   (of H * d channels)
    top_channels           = the TOP_CHANNELS pairs with the largest r[h, c], largest first
                             (ties in (head, channel) order)
    channel_std_spread     = max_{h,c} sigma[h, c] / s
    kurtosis               = m4 / m2**2, with m_p = (1/(H T d)) sum_{h,t,c} (x - mu[h, c])**p
    kurtosis_max_channel   = max_{h,c} m4[h, c] / sigma[h, c]**4,  m4[h, c] per pair
    offset_energy_fraction = sum_{h,c} mu[h, c]**2 / sum_{h,c} (1/T) sum_t x[h, t, c]**2
                           = sum mu**2 / sum (mu**2 + sigma**2)                 (in [0, 1])

``kurtosis`` is Pearson's (the fourth standardized moment: 3 for a Gaussian, 6 for a Laplace,
1 for symmetric +-a values), of the values after removing each channel's mean, pooled over the
layer's heads and channels. Pooling mixes channel scales: Gaussian channels with variances
``sigma**2`` pool to ``3 mean(sigma**4) / mean(sigma**2)**2 >= 3``, so read it beside
``channel_std_spread`` (scale spread) and ``kurtosis_max_channel`` (a heavy-tailed channel).

A pair whose ``sigma`` is below ``1e-9 M`` (a constant channel; float64 rounding of the mean
would otherwise leave a tiny spurious spread) counts as ``sigma = 0`` and is left out of
``kurtosis_max_channel``. Divisions by zero follow one rule: ``a / 0`` is ``inf`` for
``a > 0`` and ``nan`` for ``a = 0`` (only with more than half the channels constant).

Why these figures matter for KV quantization
--------------------------------------------
A per-token quantizer sets one scale per vector from its largest coordinate: a channel with
``r = 20`` makes that scale about 20 typical stds wide, leaving the other channels only a few
of the ``2**bits`` levels. Keys have such channels at fixed positions, which is why KIVI
(arXiv 2402.02750) quantizes keys per channel and why rotation-based quantizers (QuaRot,
SpinQuant, TurboQuant; `latkv.rotations`) multiply by an orthogonal matrix first: the rotation
spreads an outlier channel's energy over all ``d`` coordinates. ``outlier_ratio`` and
``outlier_channels`` measure the first problem, ``channel_std_spread`` a pure scale spread
(fixed by per-channel scales alone), ``kurtosis`` the heavy tails that a Gaussian-tuned
grid handles badly, and ``offset_energy_fraction`` the energy a per-channel zero point (mean
subtraction) removes for free, which a rotation alone keeps as an offset.

Pre- versus post-RoPE keys
--------------------------
RoPE rotates each channel pair of a head (``(c, c + d/2)``, or ``(2i, 2i+1)`` in the GPT-J
layout) by the angle ``t * theta_i``. A large, nearly constant pre-RoPE channel in a
high-frequency pair is turned into an oscillation of the same amplitude shared by both
channels of the pair (its offset becomes variance); in a low-frequency pair (``theta_i T`` well
below 1) it stays an offset in place. The ``k_pre`` and ``k`` rows of a layer have the same
columns and sit next to each other: a similar ``outlier_ratio`` with a lower
``offset_energy_fraction`` after RoPE means the outliers were rotated, not removed; identical
rows mean they sit in low-frequency channels. Quantizing keys before RoPE (as KVQuant does)
keeps the outliers in fixed channels, where per-channel scales catch them.

Examples
--------
>>> import numpy as np
>>> signs = np.array([1.0, -1.0] * 4)                  # 8 tokens, mean 0, std 1
>>> keys = np.tile(signs[None, :, None], (2, 1, 4))     # (2 heads, 8 tokens, 4 channels)
>>> keys[1, :, 2] *= 20.0                               # one outlier channel: head 1, ch. 2
>>> rows = kv_statistics({"k_L0": keys, "v_L0": keys + 3.0, "q_L0": keys})
>>> [(row["layer"], row["kind"]) for row in rows]
[(0, 'k'), (0, 'v')]
>>> keys_row = rows[0]
>>> keys_row["outlier_ratio"], keys_row["outlier_channels"], keys_row["channel_std_spread"]
(20.0, 1, 20.0)
>>> keys_row["top_channels"][0]
{'head': 1, 'channel': 2, 'ratio': 20.0}
>>> round(keys_row["kurtosis"], 4)    # (7 * 1 + 20**4) / 8 / ((7 * 1 + 20**2) / 8)**2
7.7275
>>> # values: every channel has mean 3; energy 3**2 + 1 per channel, 3**2 + 20**2 for one
>>> round(rows[1]["offset_energy_fraction"], 6) == round(8 * 9 / (7 * 10 + 409), 6)
True
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rich.table import Table

OUTLIER_THRESHOLD = 6.0
"""A channel is an outlier when its ``max |x|`` exceeds this many median channel stds.

For a Gaussian channel of median scale the largest of ``T`` values is about
``sqrt(2 ln(2T))`` stds (4.1 at ``T = 2048``, 4.7 at ``T = 32768``) and a single value passes 6
stds with probability 2e-9, so a count above zero means channels with a larger scale or
heavier tails than the bulk, not Gaussian extremes.
"""

TOP_CHANNELS = 3
"""How many (head, channel) pairs ``top_channels`` lists."""

KINDS = ("k", "k_pre", "v")
"""Row kinds in their order within a layer: post-RoPE keys, pre-RoPE keys, values."""

SUMMARY_FIGURES = ("outlier_ratio", "outlier_channels", "channel_std_spread", "kurtosis",
                   "kurtosis_max_channel", "offset_energy_fraction")
"""The row figures that `summarize` reduces over layers."""

_CONSTANT_CHANNEL_TOLERANCE = 1e-9
_ARRAY_KEY = re.compile(r"^(k_pre|k|v)_L(\d+)$")


def _divide(numerator: Any, denominator: float) -> Any:
    """``numerator / denominator`` with ``a / 0 = inf`` for ``a > 0`` and ``0 / 0 = nan``."""
    numerator = np.asarray(numerator, dtype=np.float64)
    if denominator > 0:
        return numerator / denominator
    return np.where(numerator > 0, np.inf, np.nan)


def _layer_arrays(data: Mapping[str, Any]) -> dict[int, dict[str, np.ndarray]]:
    """Validate the ``k_L``, ``k_pre_L`` and ``v_L`` arrays of ``data``; group them by layer."""
    if not isinstance(data, Mapping):
        raise TypeError(f"data must be a dict of arrays (a KV set), got {type(data).__name__}")
    layers: dict[int, dict[str, np.ndarray]] = {}
    for key, value in data.items():
        match = _ARRAY_KEY.match(key) if isinstance(key, str) else None
        if match is None:
            continue
        array = np.asarray(value)
        if array.dtype.kind != "f":
            raise ValueError(f"data[{key!r}] must be a float array (float16, float32 or "
                             f"float64), got dtype {array.dtype}")
        if array.ndim != 3:
            raise ValueError(f"data[{key!r}] must be 3-D (heads, tokens, dim), got shape "
                             f"{array.shape}")
        if array.shape[1] < 2:
            raise ValueError(f"data[{key!r}] has {array.shape[1]} token(s); channel statistics "
                             "need at least 2 tokens")
        if array.shape[0] < 1 or array.shape[2] < 1:
            raise ValueError(f"data[{key!r}] has no heads or no channels: shape {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError(f"data[{key!r}] contains NaN or Inf")
        layers.setdefault(int(match.group(2)), {})[match.group(1)] = array
    if not layers:
        raise ValueError("data holds no arrays named k_L<i>, k_pre_L<i> or v_L<i>: no layers "
                         "found")
    for layer, arrays in sorted(layers.items()):
        missing = [f"{kind}_L{layer}" for kind in ("k", "v") if kind not in arrays]
        if missing:
            raise ValueError(f"data layer {layer} needs k_L{layer} and v_L{layer}; missing "
                             f"{', '.join(missing)}")
        shapes = {f"{kind}_L{layer}": arrays[kind].shape for kind in KINDS if kind in arrays}
        if len(set(shapes.values())) > 1:
            listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
            raise ValueError(f"data layer {layer}: shapes differ ({listed}); keys, pre-RoPE "
                             "keys and values of a layer must all be (kv_heads, tokens, dim)")
    return dict(sorted(layers.items()))


def channel_statistics(x: np.ndarray) -> dict[str, Any]:
    """The figures of one ``(heads, tokens, dim)`` array (see the module docstring).

    Parameters
    ----------
    x : np.ndarray, shape (heads, tokens, dim), float16, float32 or float64
        Finite values with ``tokens >= 2``; not validated here (`kv_statistics` does).

    Returns
    -------
    dict
        ``heads``, ``tokens``, ``dim``, ``channels`` (``heads * dim``), ``median_channel_std``
        and the figures ``outlier_ratio``, ``outlier_channels``, ``top_channels`` (a list of
        ``{"head", "channel", "ratio"}`` dicts), ``channel_std_spread``, ``kurtosis``,
        ``kurtosis_max_channel``, ``offset_energy_fraction``; Python ints and floats.

    Examples
    --------
    >>> x = np.array([[[1.0, 3.0], [-1.0, -3.0]]])       # 1 head, 2 tokens, 2 channels
    >>> figures = channel_statistics(x)
    >>> figures["median_channel_std"], figures["outlier_ratio"], figures["kurtosis"]
    (2.0, 1.5, 1.64)
    """
    x = np.asarray(x, dtype=np.float64)
    heads, tokens, dim = x.shape
    channel_mean = x.mean(axis=1)                                   # (heads, dim)
    centred = x - channel_mean[:, None, :]
    squared = centred * centred
    second = squared.mean(axis=1)                                   # (heads, dim)
    fourth = (squared * squared).mean(axis=1)
    max_abs = np.abs(x).max(axis=1)
    constant = np.sqrt(second) <= _CONSTANT_CHANNEL_TOLERANCE * max_abs
    second = np.where(constant, 0.0, second)
    fourth = np.where(constant, 0.0, fourth)
    std = np.sqrt(second)
    median_std = float(np.median(std))

    ratio = _divide(max_abs, median_std).ravel()
    order = np.argsort(-ratio, kind="stable")[:TOP_CHANNELS]
    top_channels = [{"head": int(index // dim), "channel": int(index % dim),
                     "ratio": float(ratio[index])} for index in order]
    with np.errstate(divide="ignore", invalid="ignore"):
        per_channel_kurtosis = fourth[~constant] / second[~constant] ** 2
    return {
        "heads": heads,
        "tokens": tokens,
        "dim": dim,
        "channels": heads * dim,
        "median_channel_std": median_std,
        "outlier_ratio": float(np.nanmax(ratio)) if not np.isnan(ratio).all() else float("nan"),
        "outlier_channels": int(np.count_nonzero(max_abs > OUTLIER_THRESHOLD * median_std)),
        "top_channels": top_channels,
        "channel_std_spread": float(_divide(std.max(), median_std)),
        "kurtosis": float(_divide(fourth.mean(), float(second.mean()) ** 2)),
        "kurtosis_max_channel": (float(per_channel_kurtosis.max()) if per_channel_kurtosis.size
                                 else float("nan")),
        "offset_energy_fraction": float(_divide(np.mean(channel_mean**2),
                                                float(np.mean(x * x)))),
    }


def kv_statistics(data: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """One row of outlier, scale and tail figures per layer and kind of a KV set.

    Parameters
    ----------
    data : dict of str to np.ndarray
        A KV set (`latkv.compare.load_kv`): ``k_L{l}`` and ``v_L{l}`` of shape
        ``(kv_heads, tokens, dim)`` for every layer ``l``, optionally ``k_pre_L{l}`` of the
        same shape; float16, float32 or float64, finite, ``tokens >= 2``. ``q_L{l}`` and any
        key not of that form (metadata) are ignored.

    Returns
    -------
    list of dict
        Ordered by layer, then kind in `KINDS` order (``"k"``, ``"k_pre"`` where present,
        ``"v"``), so a layer's pre- and post-RoPE rows are adjacent with the same keys:
        ``layer``, ``kind`` and every key of `channel_statistics`. Every figure is computed in
        float64; the module docstring defines each one.

    Raises
    ------
    TypeError
        If ``data`` is not a mapping.
    ValueError
        If no layer is found, a layer lacks ``k_L`` or ``v_L``, the shapes of a layer's
        ``k``, ``k_pre`` and ``v`` differ, or an array is not a 3-D float array, has fewer
        than 2 tokens, or holds NaN or Inf.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> keys = rng.standard_normal((2, 64, 8)).astype(np.float32)
    >>> rows = kv_statistics({"k_L0": keys, "k_pre_L0": keys, "v_L0": keys, "model": "x"})
    >>> [row["kind"] for row in rows]
    ['k', 'k_pre', 'v']
    >>> rows[0]["outlier_ratio"] == rows[1]["outlier_ratio"]
    True
    """
    rows = []
    for layer, arrays in _layer_arrays(data).items():
        for kind in KINDS:
            if kind in arrays:
                rows.append({"layer": layer, "kind": kind, **channel_statistics(arrays[kind])})
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Median and maximum over layers of each figure, per kind.

    Parameters
    ----------
    rows : list of dict
        Rows of `kv_statistics`.

    Returns
    -------
    dict
        ``{kind: {"layers": count, figure: {"median": float, "max": float}, ...}}`` for each
        kind present (in `KINDS` order) and each figure in `SUMMARY_FIGURES`. ``nan`` figures
        propagate (``np.median`` and ``np.max`` semantics). Empty ``rows`` give ``{}``.

    Examples
    --------
    >>> rows = [{"layer": 0, "kind": "k", "outlier_ratio": 4.0},
    ...         {"layer": 1, "kind": "k", "outlier_ratio": 10.0},
    ...         {"layer": 2, "kind": "k", "outlier_ratio": 5.0}]
    >>> summarize(rows)["k"]["outlier_ratio"]
    {'median': 5.0, 'max': 10.0}
    """
    summary: dict[str, dict[str, Any]] = {}
    kinds = [kind for kind in KINDS if any(row["kind"] == kind for row in rows)]
    kinds += sorted({row["kind"] for row in rows} - set(kinds))
    for kind in kinds:
        selected = [row for row in rows if row["kind"] == kind]
        entry: dict[str, Any] = {"layers": len(selected)}
        for figure in SUMMARY_FIGURES:
            values = np.array([row[figure] for row in selected if figure in row], dtype=float)
            if values.size:
                entry[figure] = {"median": float(np.median(values)),
                                 "max": float(np.max(values))}
        summary[kind] = entry
    return summary


def _format_figure(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}"


STATS_COLUMNS = ("layer", "kind", "outlier ratio", "outlier channels", "channel std spread",
                 "kurtosis", "top channel (head:channel ratio)")
"""Column titles of `stats_table`, in order."""


def stats_table(rows: list[dict[str, Any]], title: str = "latkv stats") -> Table:
    """A rich table of `kv_statistics` rows, one line per layer and kind.

    Parameters
    ----------
    rows : list of dict
        Rows of `kv_statistics`.
    title : str
        The table's title (for the CLI, name the KV file).

    Returns
    -------
    rich.table.Table
        Columns `STATS_COLUMNS`; ``outlier channels`` reads ``count/channels`` and ``top
        channel`` the largest-ratio pair as ``head:channel ratio``. The caption names the kinds
        and the outlier threshold.

    Examples
    --------
    >>> import io
    >>> from rich.console import Console
    >>> keys = np.tile(np.array([1.0, -1.0])[None, :, None], (1, 4, 3))
    >>> keys[0, :, 1] *= 8.0
    >>> console = Console(file=io.StringIO(), record=True, width=120)
    >>> console.print(stats_table(kv_statistics({"k_L0": keys, "v_L0": keys})))
    >>> "0:1 8" in console.export_text()
    True
    """
    from rich.table import Table

    table = Table(title=title, caption=(
        "k: post-RoPE keys, k_pre: pre-RoPE keys, v: values; outlier channel: max|x| > "
        f"{OUTLIER_THRESHOLD:g} x the median channel std"))
    for column in STATS_COLUMNS:
        table.add_column(column, justify="left" if column in ("kind", STATS_COLUMNS[-1])
                         else "right")
    for row in rows:
        top = row["top_channels"][0] if row["top_channels"] else None
        table.add_row(
            str(row["layer"]),
            row["kind"],
            _format_figure(row["outlier_ratio"]),
            f"{row['outlier_channels']}/{row['channels']}",
            _format_figure(row["channel_std_spread"]),
            _format_figure(row["kurtosis"]),
            f"{top['head']}:{top['channel']} {_format_figure(top['ratio'])}" if top else "-",
        )
    return table
