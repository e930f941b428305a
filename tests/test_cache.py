"""KVCache: streaming equals prefill, attention equals dense attention over the decoded cache."""

from __future__ import annotations

import math

import numpy as np
import pytest

import latkv


def dense_attention(q, k, v, scale=None):
    """Reference: causal GQA attention of the last tq positions, float64."""
    batch, q_heads, tq, dim = q.shape
    kv_heads, n = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    k = np.repeat(k.astype(np.float64), group, axis=1)
    v = np.repeat(v.astype(np.float64), group, axis=1)
    logits = q.astype(np.float64) @ np.swapaxes(k, -1, -2)
    logits *= (1 / math.sqrt(dim)) if scale is None else scale
    mask = np.arange(n)[None, :] <= np.arange(n - tq, n)[:, None]
    logits = np.where(mask, logits, -np.inf)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return weights @ v


def make(bits=4, residual=16, block=32):
    return latkv.KVCache(latkv.TurboQuant(dim=32, bits=bits), latkv.ScalarQuant(dim=32, bits=bits),
                         residual=residual, block=block)


@pytest.fixture
def kv():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((2, 2, 150, 32)).astype(np.float32),
            rng.standard_normal((2, 2, 150, 32)).astype(np.float32), rng)


def test_streaming_appends_equal_one_prefill(kv):
    k, v, rng = kv
    streamed, prefilled = make(), make()
    for t in range(k.shape[2]):
        streamed.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    prefilled.append(k, v)
    assert len(streamed) == len(prefilled) == 150
    assert streamed.compressed_tokens == prefilled.compressed_tokens == 128
    assert streamed.nbytes == prefilled.nbytes
    for a, b in zip(streamed.key_blocks + streamed.value_blocks,
                    prefilled.key_blocks + prefilled.value_blocks):
        for name in a.arrays:
            assert np.array_equal(a[name], b[name])
    q = rng.standard_normal((2, 6, 1, 32)).astype(np.float32)
    np.testing.assert_allclose(streamed.attention(q), prefilled.attention(q), rtol=1e-5,
                               atol=1e-5)


def test_attention_equals_dense_attention_over_the_decoded_cache(kv):
    k, v, rng = kv
    cache = make()
    cache.append(k[:, :, :100], v[:, :, :100])
    cache.append(k[:, :, 100:], v[:, :, 100:])
    decoded_k = np.concatenate([cache.key_quantizer.decode(c) for c in cache.key_blocks]
                               + [k[:, :, 128:].astype(np.float16)], axis=2)
    decoded_v = np.concatenate([cache.value_quantizer.decode(c) for c in cache.value_blocks]
                               + [v[:, :, 128:].astype(np.float16)], axis=2)
    for tq, q_heads in ((1, 2), (1, 6), (5, 4), (150, 2)):      # decode, GQA, causal prefill
        q = rng.standard_normal((2, q_heads, tq, 32)).astype(np.float32)
        expected = dense_attention(q, decoded_k, decoded_v)
        # the compressed keys' scores come from the rotated domain in float32, the reference
        # from decoded keys in float64: logits agree to about 1e-4
        np.testing.assert_allclose(cache.attention(q), expected, rtol=1e-3, atol=1e-3)


def test_residual_window_only_is_fp16_attention(kv):
    k, v, rng = kv
    cache = make(residual=1000)
    cache.append(k, v)
    assert cache.compressed_tokens == 0
    assert cache.nbytes == 2 * k.size * 2                       # float16 keys and values
    q = rng.standard_normal((2, 4, 3, 32)).astype(np.float32)
    expected = dense_attention(q, k.astype(np.float16), v.astype(np.float16), scale=0.3)
    np.testing.assert_allclose(cache.attention(q, scale=0.3), expected, rtol=1e-5, atol=1e-5)


def test_nbytes_counts_codes_and_window(kv):
    k, v, _ = kv
    cache = make()
    cache.append(k, v)
    codes = sum(c.nbytes for c in cache.key_blocks + cache.value_blocks)
    assert cache.nbytes == codes + 2 * (2 * 2 * 22 * 32 * 2)    # 22 exact tokens, K and V


def test_bad_inputs_are_refused(kv):
    k, v, _ = kv
    cache = make()
    with pytest.raises(ValueError, match="empty"):
        cache.attention(np.zeros((2, 2, 1, 32), np.float32))
    with pytest.raises(ValueError, match="dim"):
        cache.append(k[..., :16], v[..., :16])
    cache.append(k[:, :, :10], v[:, :, :10])
    with pytest.raises(ValueError, match="batch and heads"):
        cache.append(k[:1, :, :1], v[:1, :, :1])
    with pytest.raises(ValueError, match="multiple of 2"):
        cache.attention(np.zeros((2, 3, 1, 32), np.float32))
    with pytest.raises(ValueError, match="positions"):
        cache.attention(np.zeros((2, 2, 11, 32), np.float32))
    with pytest.raises(TypeError, match="quantizer"):
        latkv.KVCache("turbo", latkv.TurboQuant(dim=32))
    with pytest.raises(ValueError, match="different dims"):
        latkv.KVCache(latkv.TurboQuant(dim=32), latkv.TurboQuant(dim=64))


@pytest.mark.parametrize("key_spec", ["qjl:64", "e8:3", "e8:3,entropy=True", "polar:4",
                                      "scalar:3,axis=channel,group=32", "qet:4",
                                      "turbo:3,mode=prod,center=True"])
def test_every_key_quantizer_attends_like_its_decoded_keys(key_spec, kv):
    k, v, rng = kv
    key_quantizer = latkv.quantizer(key_spec, dim=32)
    cache = latkv.KVCache(key_quantizer, latkv.TurboQuant(dim=32, bits=4), residual=16,
                          block=32)
    cache.append(k, v)
    decoded_k = np.concatenate([key_quantizer.decode(c) for c in cache.key_blocks]
                               + [k[:, :, 128:].astype(np.float16)], axis=2)
    decoded_v = np.concatenate([cache.value_quantizer.decode(c) for c in cache.value_blocks]
                               + [v[:, :, 128:].astype(np.float16)], axis=2)
    q = rng.standard_normal((2, 4, 3, 32)).astype(np.float32)
    np.testing.assert_allclose(cache.attention(q), dense_attention(q, decoded_k, decoded_v),
                               rtol=1e-3, atol=1e-3)
