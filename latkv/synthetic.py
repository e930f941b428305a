"""A seeded generator of synthetic KV caches with the structure that makes real ones hard.

Real post-RoPE keys carry large per-channel offsets and a few heavy-tailed outlier channels
(about 60% of key energy in channel means for SmolLM2); values are closer to isotropic.
`synthetic_kv` imitates that: it is the default data of ``latkv compare`` until a real
sample is embedded, and a stress test for the quantizers.
"""

from __future__ import annotations

import numpy as np


def synthetic_kv(layers: int = 4, kv_heads: int = 3, query_groups: int = 3, tokens: int = 256,
                 queries: int = 32, dim: int = 64, outlier_channels: int = 4,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic keys, values and queries per layer, as ``latkv compare`` reads them.

    Keys: per-channel means (a few channels large, carrying most of the key energy) plus
    Gaussian noise with log-normal per-channel scales, and Student-t (3 degrees of freedom)
    noise in ``outlier_channels`` channels. Values: Gaussian with mild per-channel scales.
    Queries: aligned with the key means plus noise, so attention is peaked as in real models.

    Returns
    -------
    dict
        ``k_L{i}``, ``v_L{i}`` : (kv_heads, tokens, dim) float32; ``q_L{i}`` :
        (kv_heads * query_groups, queries, dim) float32, the queries of the last ``queries``
        positions (attend causally).
    """
    rng = np.random.default_rng(seed)
    data: dict[str, np.ndarray] = {}
    for layer in range(layers):
        channel_scale = np.exp(rng.normal(0.0, 0.5, size=(kv_heads, 1, dim)))
        channel_mean = rng.normal(0.0, 0.3, size=(kv_heads, 1, dim))
        outliers = rng.choice(dim, size=outlier_channels, replace=False)
        channel_mean[..., outliers] = rng.normal(0.0, 6.0, size=(kv_heads, 1, outlier_channels))
        noise = rng.standard_normal((kv_heads, tokens, dim)) * channel_scale
        noise[..., outliers] = rng.standard_t(3, size=(kv_heads, tokens, outlier_channels)) * 2.0
        keys = channel_mean + noise
        values = rng.standard_normal((kv_heads, tokens, dim)) * np.exp(
            rng.normal(0.0, 0.3, size=(kv_heads, 1, dim)))
        direction = np.repeat(channel_mean / np.linalg.norm(channel_mean, axis=-1, keepdims=True),
                              query_groups, axis=0)
        q_heads = kv_heads * query_groups
        query = 2.0 * direction + rng.standard_normal((q_heads, queries, dim)) * 0.6
        data[f"k_L{layer}"] = keys.astype(np.float32)
        data[f"v_L{layer}"] = values.astype(np.float32)
        data[f"q_L{layer}"] = query.astype(np.float32)
    return data
