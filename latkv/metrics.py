"""Quality measures of a quantizer on KV caches: distortion, logits, attention outputs.

Shapes follow a decoder layer: keys and values ``(kv_heads, tokens, dim)``, queries
``(q_heads, queries, dim)`` with ``q_heads`` a multiple of ``kv_heads`` (grouped-query
attention: query head ``h`` reads KV head ``h // (q_heads // kv_heads)``). Logits are
``q k^T / sqrt(dim)``. With ``causal=True`` the queries are the last ``queries`` positions of
the ``tokens`` (query ``i`` sees keys ``0 .. tokens - queries + i``).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def relative_mse(x: Any, x_hat: Any) -> float:
    """``||x - x_hat||^2 / ||x||^2`` over all elements (float64 accumulation)."""
    x = np.asarray(x, dtype=np.float64)
    x_hat = np.asarray(x_hat, dtype=np.float64)
    return float(((x - x_hat) ** 2).sum() / (x**2).sum())


def grouped_queries(q: np.ndarray, kv_heads: int) -> np.ndarray:
    """``(q_heads, m, dim) -> (kv_heads, group * m, dim)``: queries sharing a KV head together."""
    q_heads, m, dim = q.shape
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    return q.reshape(kv_heads, (q_heads // kv_heads) * m, dim)


def causal_mask(queries: int, tokens: int, group: int = 1) -> np.ndarray:
    """``(group * queries, tokens)`` bool, True where the query may attend the key."""
    position = np.arange(queries) + (tokens - queries)
    mask = np.arange(tokens)[None, :] <= position[:, None]
    return np.tile(mask, (group, 1))


def centred_logit_error(logits: np.ndarray, logits_hat: np.ndarray,
                        mask: np.ndarray | None = None) -> float:
    """Relative RMS error of logits after removing each query's mean error.

    Softmax ignores a per-query constant, so the error that matters is
    ``e = (L_hat - L) - mean_keys(L_hat - L)``; it is reported relative to the spread of the
    true logits, ``sqrt(mean(e^2) / mean((L - mean_keys L)^2))``. Masked-out pairs are ignored.
    """
    logits = np.asarray(logits, dtype=np.float64)
    error = np.asarray(logits_hat, dtype=np.float64) - logits
    if mask is None:
        mask = np.ones(logits.shape[-2:], dtype=bool)
    weight = np.broadcast_to(mask, logits.shape).astype(np.float64)
    count = weight.sum(axis=-1, keepdims=True)

    def centred(a: np.ndarray) -> np.ndarray:
        return (a - (a * weight).sum(axis=-1, keepdims=True) / count) * weight

    return float(np.sqrt((centred(error) ** 2).sum() / (centred(logits) ** 2).sum()))


def softmax(logits: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Row softmax in float64 with masked entries set to zero probability."""
    logits = np.asarray(logits, dtype=np.float64)
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    logits = logits - logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=-1, keepdims=True)


def attention_output_error(logits: np.ndarray, v: np.ndarray, logits_hat: np.ndarray,
                           v_hat: np.ndarray, mask: np.ndarray | None = None) -> float:
    """``||O - O_hat||_F / ||O||_F`` with ``O = softmax(L) V`` and ``O_hat = softmax(L_hat) V_hat``.

    ``logits : (kv_heads, queries, tokens)`` already scaled by ``1/sqrt(dim)``,
    ``v : (kv_heads, tokens, dim)``.
    """
    output = softmax(logits, mask) @ np.asarray(v, dtype=np.float64)
    output_hat = softmax(logits_hat, mask) @ np.asarray(v_hat, dtype=np.float64)
    return float(np.linalg.norm(output - output_hat) / np.linalg.norm(output))


def top_k_agreement(logits: np.ndarray, logits_hat: np.ndarray, k: int = 8,
                    mask: np.ndarray | None = None) -> float:
    """Mean fraction of each query's ``k`` highest-logit keys that the estimate also ranks top ``k``."""
    enough = np.ones(logits.shape[:-1], dtype=bool)
    if mask is not None:
        mask = np.broadcast_to(mask, logits.shape)
        logits = np.where(mask, logits, -np.inf)
        logits_hat = np.where(mask, logits_hat, -np.inf)
        enough = mask.sum(axis=-1) >= k  # queries that see fewer than k keys are skipped
    k = min(k, logits.shape[-1])
    true_top = np.argpartition(-logits, k - 1, axis=-1)[..., :k]
    estimated_top = np.argpartition(-logits_hat, k - 1, axis=-1)[..., :k]
    hits = (true_top[..., :, None] == estimated_top[..., None, :]).any(axis=-1)
    return float(hits.mean(axis=-1)[enough].mean())
