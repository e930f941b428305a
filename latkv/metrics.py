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
    """``||x - x_hat||^2 / ||x||^2`` over all elements (float64 accumulation).

    Parameters
    ----------
    x, x_hat : array_like of the same shape, float
        The exact and the reconstructed values.

    Returns
    -------
    float

    Examples
    --------
    >>> from latkv.metrics import relative_mse
    >>> relative_mse([3.0, 4.0], [3.0, 3.0])                  # 1 / 25
    0.04
    """
    x = np.asarray(x, dtype=np.float64)
    x_hat = np.asarray(x_hat, dtype=np.float64)
    return float(((x - x_hat) ** 2).sum() / (x**2).sum())


def grouped_queries(q: np.ndarray, kv_heads: int) -> np.ndarray:
    """``(q_heads, m, dim) -> (kv_heads, group * m, dim)``: queries sharing a KV head together.

    Parameters
    ----------
    q : (q_heads, m, dim) array
    kv_heads : int
        A divisor of ``q_heads``; ``group = q_heads // kv_heads``.

    Returns
    -------
    (kv_heads, group * m, dim) array
        A view where possible: query head ``h``'s rows are rows ``(h % group) * m ..`` of KV
        head ``h // group``.

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.metrics import grouped_queries
    >>> q = np.arange(8.0).reshape(4, 2, 1)                   # 4 query heads, 2 queries each
    >>> grouped_queries(q, 2)[..., 0]                         # heads 0, 1 | heads 2, 3
    array([[0., 1., 2., 3.],
           [4., 5., 6., 7.]])
    """
    q_heads, m, dim = q.shape
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    return q.reshape(kv_heads, (q_heads // kv_heads) * m, dim)


def causal_mask(queries: int, tokens: int, group: int = 1) -> np.ndarray:
    """``(group * queries, tokens)`` bool, True where the query may attend the key.

    The queries are the last ``queries`` of ``tokens`` positions; the mask repeats for each
    of the ``group`` query heads of a KV head (`grouped_queries`).

    Parameters
    ----------
    queries, tokens : int
        ``queries <= tokens``.
    group : int
        Query heads per KV head.

    Returns
    -------
    (group * queries, tokens) bool

    Examples
    --------
    >>> from latkv.metrics import causal_mask
    >>> causal_mask(2, 4)
    array([[ True,  True,  True, False],
           [ True,  True,  True,  True]])
    >>> causal_mask(2, 4, group=3).shape
    (6, 4)
    """
    position = np.arange(queries) + (tokens - queries)
    mask = np.arange(tokens)[None, :] <= position[:, None]
    return np.tile(mask, (group, 1))


def centred_logit_error(logits: np.ndarray, logits_hat: np.ndarray,
                        mask: np.ndarray | None = None) -> float:
    """Relative RMS error of logits after removing each query's mean error.

    Softmax ignores a per-query constant, so the error that matters is
    ``e = (L_hat - L) - mean_keys(L_hat - L)``; it is reported relative to the spread of the
    true logits, ``sqrt(mean(e^2) / mean((L - mean_keys L)^2))``. Masked-out pairs are ignored.

    Parameters
    ----------
    logits, logits_hat : (..., queries, tokens) float
        True and estimated logits.
    mask : (queries, tokens) bool, optional
        `causal_mask`; broadcast against the logits.

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.metrics import centred_logit_error
    >>> logits = np.array([[0.0, 1.0, 2.0]])
    >>> centred_logit_error(logits, logits + 10)             # a shift softmax ignores
    0.0
    >>> round(centred_logit_error(logits, np.array([[0.0, 1.0, 3.0]])), 6)   # sqrt(1/3)
    0.57735
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
    """Row softmax in float64 with masked entries set to zero probability.

    Parameters
    ----------
    logits : (..., tokens) float
    mask : bool array broadcasting against ``logits``, optional
        True where a key may be attended; every row needs one.

    Returns
    -------
    float64 array of ``logits``' shape, each row summing to 1.

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.metrics import causal_mask, softmax
    >>> softmax(np.array([[0.0, np.log(3.0)]]))
    array([[0.25, 0.75]])
    >>> softmax(np.zeros((2, 3)), causal_mask(2, 3)).round(4)
    array([[0.5   , 0.5   , 0.    ],
           [0.3333, 0.3333, 0.3333]])
    """
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

    Parameters
    ----------
    logits, logits_hat : (kv_heads, queries, tokens) float
        True and estimated logits, scaled.
    v, v_hat : (kv_heads, tokens, dim) float
        True and reconstructed values.
    mask : (queries, tokens) bool, optional
        `causal_mask`.

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.metrics import attention_output_error
    >>> rng = np.random.default_rng(0)
    >>> logits, v = rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 5, 4))
    >>> attention_output_error(logits, v, logits, v)
    0.0
    >>> round(attention_output_error(logits, v, logits, 1.1 * v), 6)   # values 10% too large
    0.1
    """
    output = softmax(logits, mask) @ np.asarray(v, dtype=np.float64)
    output_hat = softmax(logits_hat, mask) @ np.asarray(v_hat, dtype=np.float64)
    return float(np.linalg.norm(output - output_hat) / np.linalg.norm(output))


def top_k_agreement(logits: np.ndarray, logits_hat: np.ndarray, k: int = 8,
                    mask: np.ndarray | None = None) -> float:
    """Mean share of each query's ``k`` highest-logit keys that the estimate also ranks top ``k``.

    Parameters
    ----------
    logits, logits_hat : (..., queries, tokens) float
        True and estimated logits.
    k : int
        Keys compared per query (at most ``tokens``).
    mask : (queries, tokens) bool, optional
        `causal_mask`; queries that see fewer than ``k`` keys are left out.

    Returns
    -------
    float
        In ``[0, 1]``.

    Examples
    --------
    >>> import numpy as np
    >>> from latkv.metrics import top_k_agreement
    >>> logits, estimate = np.array([[4.0, 3, 2, 1]]), np.array([[4.0, 2, 3, 1]])
    >>> top_k_agreement(logits, estimate, k=2), top_k_agreement(logits, estimate, k=3)
    (0.5, 1.0)
    """
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
