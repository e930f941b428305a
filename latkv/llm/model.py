"""The NumPy forward of a Llama-family decoder (llama, qwen2), with hooks on its KV cache.

One decoder block (Touvron et al. 2023, arXiv 2302.13971, Sec. 2.2):

    h = x + W_o · attention(RoPE(W_q n(x) + b_q), RoPE(W_k n(x) + b_k), W_v n(x) + b_v)
    y = h + W_down (silu(W_gate n'(h)) * W_up n'(h))          (SwiGLU, Shazeer 2020)

with ``n``, ``n'`` RMSNorm (``x / sqrt(mean(x^2) + eps) * w``), causal grouped-query attention
(query head ``h`` reads KV head ``h // (n_heads / n_kv_heads)``), and logits
``RMSNorm(x_L) @ W_out^T`` (``W_out`` is the token embedding when the output is tied).
Everything is float32. Biases exist for ``qwen2`` only.

``kv_transform(layer, k, v) -> (k, v)`` sees every layer's post-RoPE keys and values
``(n_kv_heads, T, head_dim)`` before attention reads them: that is where a quantizer's
``decode(encode(.))`` (or, later, a compressed cache) plugs in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from latkv.llm.gguf_model import (
    LayerWeights,
    ModelConfig,
    ModelWeights,
    open_gguf,
    read_config,
    read_weights,
)
from latkv.llm.rope import apply_rope, rope_angles

KVTransform = Callable[[int, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
#: ``(layer, q, k, v) -> attended``: attention over a cache the caller keeps (q ``(H, T, d)``,
#: the new tokens' k and v ``(H_kv, T, d)``), returning ``(H, T, d)``
Attend = Callable[[int, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` (Zhang & Sennrich 2019, Eq. 4), float32."""
    mean_square = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True)
    return (x / np.sqrt(mean_square + np.float32(eps))) * weight


def silu(x: np.ndarray) -> np.ndarray:
    """``x * sigmoid(x)``, float32, without overflow warnings for large ``|x|``."""
    return x * (0.5 * (1.0 + np.tanh(0.5 * x)))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                     query_positions: np.ndarray | None = None) -> np.ndarray:
    """Grouped-query causal attention.

    Parameters
    ----------
    q : (n_heads, T_q, d) float32
    k, v : (n_kv_heads, T_k, d) float32
        ``n_heads`` a multiple of ``n_kv_heads``; query head ``h`` uses KV head
        ``h // (n_heads // n_kv_heads)``.
    query_positions : (T_q,) int, optional
        Position of each query among the keys (default: the last ``T_q`` positions). Query
        at position ``p`` attends to keys ``0..p``.

    Returns
    -------
    (n_heads, T_q, d) float32
    """
    n_heads, t_q, d = q.shape
    n_kv, t_k, _ = k.shape
    group = n_heads // n_kv
    if query_positions is None:
        query_positions = np.arange(t_k - t_q, t_k)
    grouped = q.reshape(n_kv, group * t_q, d)
    scores = (grouped @ k.swapaxes(-1, -2)).reshape(n_kv, group, t_q, t_k)
    scores *= np.float32(1.0 / np.sqrt(d))
    future = np.arange(t_k)[None, :] > np.asarray(query_positions)[:, None]   # (T_q, T_k)
    scores = np.where(future, np.float32(-np.inf), scores)
    weights = softmax(scores, axis=-1).reshape(n_kv, group * t_q, t_k)
    return (weights @ v).reshape(n_heads, t_q, d).astype(np.float32, copy=False)


@dataclass
class LayerCache:
    """What one layer computed for a sequence: ``q (n_heads, T, d)``, pre- and post-RoPE
    keys ``k_pre``, ``k`` and values ``v`` ``(n_kv_heads, T, d)``, all float32 (``k`` and
    ``v`` as attention read them, i.e. after ``kv_transform``)."""

    q: np.ndarray
    k_pre: np.ndarray
    k: np.ndarray
    v: np.ndarray


class Model:
    """A decoder loaded from GGUF, run with NumPy.

    Parameters
    ----------
    config : ModelConfig
    weights : ModelWeights
    tokenizer : latkv.llm.tokenizer.Tokenizer, optional
    source : str
        Where it came from (a path), for provenance.

    Examples
    --------
    >>> from latkv.llm import Model
    >>> model = Model.load("SmolLM2-135M-Instruct.Q4_1.gguf")   # doctest: +SKIP
    >>> ids = model.tokenizer.encode("The capital of France is")  # doctest: +SKIP
    >>> model.tokenizer.decode(model.generate(ids, 5))            # doctest: +SKIP
    ' Paris. ...'
    """

    def __init__(self, config: ModelConfig, weights: ModelWeights, tokenizer: Any = None,
                 source: str = "") -> None:
        self.config = config
        self.weights = weights
        self.tokenizer = tokenizer
        self.source = source

    @classmethod
    def random(cls, seed: int = 0, *, layers: int = 1, heads: int = 4, kv_heads: int = 2,
               head_dim: int = 8, hidden: int = 16, vocab: int = 40) -> Model:
        """A tiny Llama-style decoder with seeded random weights (examples, tests).

        Matrices are ``N(0, 1/in)``, norms 1, the output tied to the embedding, no tokenizer
        (feed token ids). Defaults: 1 layer, 4 query and 2 KV heads of dimension 8.

        Examples
        --------
        >>> from latkv.llm import Model
        >>> model = Model.random(seed=0)
        >>> model.config.n_heads, model.config.n_kv_heads, model.config.head_dim
        (4, 2, 8)
        >>> model.negative_log_likelihoods(list(range(12))).shape
        (11,)
        """
        rng = np.random.default_rng(seed)

        def matrix(rows: int, columns: int) -> np.ndarray:
            return (rng.standard_normal((rows, columns)) / np.sqrt(columns)).astype(np.float32)

        ffn = 2 * hidden
        ones = np.ones(hidden, np.float32)
        config = ModelConfig("llama", n_layers=layers, hidden=hidden, ffn_hidden=ffn,
                             n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim,
                             vocab_size=vocab, context_length=4096, rope_base=10000.0,
                             rope_dim=head_dim, rope_scale=1.0, norm_eps=1e-5)
        blocks = [LayerWeights(ones, matrix(heads * head_dim, hidden),
                               matrix(kv_heads * head_dim, hidden),
                               matrix(kv_heads * head_dim, hidden),
                               matrix(hidden, heads * head_dim), ones, matrix(ffn, hidden),
                               matrix(ffn, hidden), matrix(hidden, ffn))
                  for _ in range(layers)]
        embedding = matrix(vocab, hidden)
        return cls(config, ModelWeights(embedding, blocks, ones, embedding, tied_output=True),
                   source=f"Model.random(seed={seed})")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Model:
        """Read config, float32 weights and tokenizer from a GGUF file.

        Raises ``ValueError`` for a missing, truncated or foreign file, an unsupported
        architecture or missing tensors.
        """
        reader = open_gguf(path)
        config = read_config(reader)
        weights = read_weights(reader, config)
        tokenizer = None
        if "tokenizer.ggml.tokens" in reader.fields:
            from latkv.llm.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_gguf(reader)
        return cls(config, weights, tokenizer, source=str(path))

    # -- forward -----------------------------------------------------------------------

    def check_ids(self, ids: Any, start: int = 0) -> np.ndarray:
        """``ids`` as a 1-D int64 array of valid token ids that fit the context."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
            raise ValueError(f"ids must be a non-empty 1-D integer array, got {ids.dtype} "
                             f"{ids.shape}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"ids must lie in [0, {self.config.vocab_size}), got "
                             f"[{ids.min()}, {ids.max()}]")
        if start + ids.size > self.config.context_length:
            raise ValueError(f"{start + ids.size} tokens exceed the model's context of "
                             f"{self.config.context_length}; split the text into chunks")
        return ids.astype(np.int64)

    def forward(self, ids: Any, *, kv_transform: KVTransform | None = None,
                capture: bool = False, cache: list[LayerCache] | None = None,
                logits: str = "all", attend: Attend | None = None,
                start: int | None = None) -> tuple[np.ndarray, list[LayerCache]]:
        """Run the decoder on ``ids`` (positions continue after ``cache`` if given).

        Parameters
        ----------
        ids : (T,) int
        kv_transform : callable, optional
            ``(layer, k, v) -> (k, v)`` on the new tokens' post-RoPE keys and values.
        capture : bool
            Return every layer's `LayerCache` for the new tokens (queries included).
        cache : list of LayerCache, optional
            Keys and values of earlier positions (from a previous call with ``capture``
            or from `generate`); the new tokens attend to them.
        logits : {"all", "last"}
        attend : callable, optional
            Replaces the attention over ``cache``: ``attend(layer, q, k, v)`` receives the
            new tokens' queries, keys and values (after ``kv_transform``) and returns the
            attended ``(n_heads, T, d)``; it keeps the earlier keys and values itself (a
            `latkv.KVCache` per layer). Use ``start`` for the position of the first new token.
        start : int, optional
            Position of the first new token (default: after ``cache``, or 0).

        Returns
        -------
        logits : (T, vocab) or (1, vocab) float32
        layers : list of LayerCache
            The new tokens' caches when ``capture`` (else empty).
        """
        c = self.config
        if start is None:
            start = 0 if not cache else cache[0].k.shape[1]
        ids = self.check_ids(ids, start)
        positions = np.arange(start, start + ids.size)
        cos, sin = rope_angles(positions, c.rope_dim, c.rope_base, c.rope_scale)
        x = self.weights.token_embedding[ids]
        captured = []
        for index, layer in enumerate(self.weights.layers):
            h = rms_norm(x, layer.attn_norm, c.norm_eps)
            q, k, v = h @ layer.wq.T, h @ layer.wk.T, h @ layer.wv.T
            if layer.bq is not None:
                q, k, v = q + layer.bq, k + layer.bk, v + layer.bv
            q = q.reshape(-1, c.n_heads, c.head_dim).transpose(1, 0, 2)      # (H, T, d)
            k_pre = k.reshape(-1, c.n_kv_heads, c.head_dim).transpose(1, 0, 2)
            v = np.ascontiguousarray(v.reshape(-1, c.n_kv_heads, c.head_dim).transpose(1, 0, 2))
            q = apply_rope(q, cos, sin)
            k = apply_rope(k_pre, cos, sin)
            if kv_transform is not None:
                k, v = kv_transform(index, k, v)
                k, v = np.asarray(k, np.float32), np.asarray(v, np.float32)
            if capture:
                captured.append(LayerCache(q=q, k_pre=np.ascontiguousarray(k_pre), k=k, v=v))
            keys, values = k, v
            if cache:
                keys = np.concatenate([cache[index].k, k], axis=1)
                values = np.concatenate([cache[index].v, v], axis=1)
            if attend is not None:
                attended = np.asarray(attend(index, q, k, v), dtype=np.float32)
            else:
                attended = causal_attention(q, keys, values, positions)
            x = x + attended.transpose(1, 0, 2).reshape(ids.size, -1) @ layer.wo.T
            h = rms_norm(x, layer.ffn_norm, c.norm_eps)
            x = x + (silu(h @ layer.w_gate.T) * (h @ layer.w_up.T)) @ layer.w_down.T
        if logits == "last":
            x = x[-1:]
        out = rms_norm(x, self.weights.output_norm, c.norm_eps) @ self.weights.output.T
        return out.astype(np.float32, copy=False), captured

    def generate(self, ids: Any, n_tokens: int, *, stop_ids: tuple[int, ...] = ()) -> np.ndarray:
        """Greedy continuation: ``n_tokens`` new ids (fewer if one of ``stop_ids`` comes)."""
        ids = self.check_ids(ids)
        logits, cache = self.forward(ids, capture=True, logits="last")
        produced: list[int] = []
        for _ in range(int(n_tokens)):
            token = int(np.argmax(logits[-1]))
            produced.append(token)
            if token in stop_ids or cache[0].k.shape[1] + 1 >= self.config.context_length:
                break
            logits, new = self.forward([token], cache=cache, capture=True, logits="last")
            cache = [LayerCache(q=n.q, k_pre=n.k_pre, k=np.concatenate([o.k, n.k], axis=1),
                                v=np.concatenate([o.v, n.v], axis=1))
                     for o, n in zip(cache, new)]
        return np.asarray(produced, dtype=np.int64)

    def negative_log_likelihoods(self, ids: Any, *,
                                 kv_transform: KVTransform | None = None) -> np.ndarray:
        """``-log p(ids[t+1] | ids[:t+1])`` for ``t = 0..T-2``, float64 ``(T - 1,)``."""
        ids = self.check_ids(ids)
        logits, _ = self.forward(ids, kv_transform=kv_transform)
        logits = logits[:-1].astype(np.float64)
        top = logits.max(axis=-1)
        log_normalizer = top + np.log(np.exp(logits - top[:, None]).sum(axis=-1))
        return log_normalizer - logits[np.arange(ids.size - 1), ids[1:]]

