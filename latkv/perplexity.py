"""The model's own quality with a quantized KV cache: ``latkv perplexity``.

Perplexity is ``exp(mean NLL)`` of each next token given the ones before it, over windows
of ``window`` tokens (each window an independent sequence, no BOS token: SmolLM2's GGUF says
``add_bos_token=false``). With a quantizer, every key and value a layer caches goes through
``decode(encode(.))`` before attention reads it (`latkv.llm.Model.forward`'s
``kv_transform``): the whole cache of a window, keys per the key quantizer and values per the
value quantizer, the queries untouched. Baseline and quantized runs use the same tokens.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def quantized_kv_transform(key_quantizer: Any, value_quantizer: Any,
                           backend: str | None = None) -> Callable:
    """``(layer, k, v) -> (k_hat, v_hat)`` with ``decode(encode(.))`` of each quantizer."""

    def transform(layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k_hat = key_quantizer.decode(key_quantizer.encode(k, backend=backend), backend=backend)
        v_hat = value_quantizer.decode(value_quantizer.encode(v, backend=backend),
                                       backend=backend)
        return k_hat, v_hat

    return transform


def streaming_negative_log_likelihoods(model: Any, ids: Any, key_quantizer: Any,
                                       value_quantizer: Any, *, residual: int = 128,
                                       block: int = 128, chunk: int = 1,
                                       backend: str | None = None) -> np.ndarray:
    """``-log p(ids[t+1] | ids[:t+1])`` decoding through a `latkv.KVCache` per layer.

    Each token's key and value are appended as it is produced, older blocks are compressed as
    they age out of the ``residual`` window, and every step attends from the codes
    (`latkv.KVCache.attention`). ``ids : (T,)`` -> float64 ``(T - 1,)``.

    Unlike ``kv_transform``, which quantizes a whole window before any query reads it, every
    query here sees the cache as a decoder would at its step: its newest ``residual`` or more
    tokens exact. With ``chunk > 1`` the tokens go through the model ``chunk`` at a time (a
    chunked prefill: one forward per chunk, causal attention within it); a query then sees
    the cache as it is after its whole chunk was appended, so up to ``chunk - 1`` tokens more
    may be compressed than when decoding one token at a time (``chunk = 1``, exact streaming).

    Parameters
    ----------
    model : latkv.llm.Model
    ids : (T,) int
        Token ids, at most the model's context.
    key_quantizer, value_quantizer : Quantizer
        Of the model's head dimension.
    residual, block : int
        The `latkv.KVCache`'s exact window and block length.
    chunk : int
        Tokens per forward (1: exact token-by-token decoding).
    backend : str, optional
        The backend of the caches' attention.

    Returns
    -------
    (T - 1,) float64
        The negative log-likelihood (nats) of each next token.

    Examples
    --------
    A tiny random decoder stands in for a real one (``Model.load(path)``): 1 layer, 4 query
    and 2 KV heads of dimension 8, 40 tokens.

    >>> import numpy as np, latkv
    >>> from latkv.llm import Model
    >>> model = Model.random(seed=0)
    >>> rng = np.random.default_rng(1)
    >>> ids = rng.integers(0, 40, size=20)
    >>> qz = latkv.TurboQuant(dim=8, bits=2)
    >>> fp16 = lambda layer, k, v: (k.astype(np.float16).astype(np.float32),
    ...                             v.astype(np.float16).astype(np.float32))
    >>> reference = model.negative_log_likelihoods(ids, kv_transform=fp16)
    >>> window = streaming_negative_log_likelihoods(model, ids, qz, qz, residual=32, block=4)
    >>> window.shape, bool(np.allclose(window, reference, atol=1e-4))   # all in the fp16 window
    ((19,), True)

    With ``residual=2, block=4`` the first block is compressed when the 6th token arrives: the
    first 5 steps read the exact window only, the later ones the 2-bit codes too.

    >>> coded = streaming_negative_log_likelihoods(model, ids, qz, qz, residual=2, block=4)
    >>> error = np.abs(coded - reference)
    >>> bool(error[:5].max() < 1e-4), bool(error[5:].min() > 1e-3)
    (True, True)
    """
    from latkv.cache import KVCache
    from latkv.checks import check_int

    ids = model.check_ids(ids)
    chunk = check_int(chunk, "chunk", 1)
    caches = [KVCache(key_quantizer, value_quantizer, residual=residual, block=block)
              for _ in range(model.config.n_layers)]

    def attend(layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        caches[layer].append(k[None], v[None])
        return caches[layer].attention(q[None], backend=backend)[0]

    nll = np.empty(ids.size - 1, dtype=np.float64)
    for start in range(0, ids.size - 1, chunk):
        stop = min(start + chunk, ids.size - 1)
        logits, _ = model.forward(ids[start:stop], attend=attend, start=start, logits="all")
        rows = logits.astype(np.float64)
        top = rows.max(axis=-1)
        log_partition = top + np.log(np.exp(rows - top[:, None]).sum(axis=-1))
        nll[start:stop] = log_partition - rows[np.arange(stop - start), ids[start + 1:stop + 1]]
    return nll


def perplexity(model: Any, ids: Any, *, window: int = 512, kv_transform: Callable | None = None,
               progress: Callable[[int, int], None] | None = None,
               cache: tuple[Any, Any, int, int] | None = None, chunk: int = 1,
               backend: str | None = None) -> dict[str, Any]:
    """Perplexity of ``model`` on ``ids`` cut into whole windows of ``window`` tokens.

    Parameters
    ----------
    model : latkv.llm.Model
    ids : (N,) int
        At least ``window`` tokens; a shorter tail is left out.
    window : int
        Tokens per window (at most the model's context).
    kv_transform : callable, optional
        See `latkv.llm.Model.forward`; `quantized_kv_transform` builds one.
    progress : callable, optional
        ``progress(done, total)`` after each window.
    cache : (key_quantizer, value_quantizer, residual, block), optional
        Decode each window token by token through a `latkv.KVCache` per layer
        (`streaming_negative_log_likelihoods`) instead of one forward pass; excludes
        ``kv_transform``.
    chunk : int
        With ``cache``: tokens per forward (1: exact token-by-token decoding).
    backend : str, optional
        With ``cache``: the backend of the cache's attention.

    Returns
    -------
    dict
        ``perplexity``, ``mean_nll`` (nats), ``predicted_tokens``, ``windows``, ``window``.

    Examples
    --------
    A tiny random decoder stands in for a real one (``Model.load(path)``): 1 layer, 4 query
    and 2 KV heads of dimension 8, 40 tokens.

    >>> import numpy as np, latkv
    >>> from latkv.llm import Model
    >>> model = Model.random(seed=0)
    >>> rng = np.random.default_rng(1)
    >>> ids = rng.integers(0, 40, size=50)
    >>> base = perplexity(model, ids, window=16)        # 3 windows, the last 2 tokens left out
    >>> base["windows"], base["predicted_tokens"]
    (3, 45)
    >>> bool(np.isclose(base["perplexity"], np.exp(base["mean_nll"])))
    True

    Keys and values through 8-bit codes barely move it; 1-bit codes move it more, and so does
    a streaming cache of 1-bit blocks (``cache``):

    >>> from latkv.perplexity import quantized_kv_transform
    >>> fine = latkv.quantizer("scalar:8,group=8", dim=8)
    >>> coarse = latkv.quantizer("scalar:1,group=8", dim=8)
    >>> near = perplexity(model, ids, window=16, kv_transform=quantized_kv_transform(fine, fine))
    >>> far = perplexity(model, ids, window=16,
    ...                  kv_transform=quantized_kv_transform(coarse, coarse))
    >>> streamed = perplexity(model, ids, window=16, cache=(coarse, coarse, 4, 4))
    >>> change = lambda run: abs(np.log(run["perplexity"] / base["perplexity"]))
    >>> bool(change(near) < 0.001), bool(change(far) > 0.05), bool(change(streamed) > 0.05)
    (True, True, True)
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    if not 2 <= window <= model.config.context_length:
        raise ValueError(f"window must lie in [2, {model.config.context_length}], got {window}")
    if cache is not None and kv_transform is not None:
        raise ValueError("give kv_transform or cache, not both")
    windows = ids.size // window
    if windows < 1:
        raise ValueError(f"the text has {ids.size} tokens, fewer than one window of {window}")
    losses = []
    for index in range(windows):
        piece = ids[index * window : (index + 1) * window]
        if cache is not None:
            key_quantizer, value_quantizer, residual, block = cache
            losses.append(streaming_negative_log_likelihoods(
                model, piece, key_quantizer, value_quantizer, residual=residual, block=block,
                chunk=chunk, backend=backend))
        else:
            losses.append(model.negative_log_likelihoods(piece, kv_transform=kv_transform))
        if progress is not None:
            progress(index + 1, windows)
    nll = np.concatenate(losses)
    return {"perplexity": float(np.exp(nll.mean())), "mean_nll": float(nll.mean()),
            "predicted_tokens": int(nll.size), "windows": windows, "window": window}
