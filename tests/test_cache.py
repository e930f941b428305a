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
    for a, b in zip([*streamed.key_blocks, *streamed.value_blocks],
                    [*prefilled.key_blocks, *prefilled.value_blocks]):
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
    codes = sum(c.nbytes for c in [*cache.key_blocks, *cache.value_blocks])
    assert cache.nbytes == codes + 2 * (2 * 2 * 22 * 32 * 2)    # 22 exact tokens, K and V


def test_the_window_does_not_keep_compressed_tokens_alive():
    """After a prefill of 1024 tokens with residual 128, the float16 window owns 128 tokens'
    memory, not the whole prefill's (a view of the prefill would hold 8x what `nbytes`
    counts, defeating the compression)."""
    rng = np.random.default_rng(4)
    cache = latkv.KVCache(latkv.TurboQuant(dim=32, bits=4), latkv.TurboQuant(dim=32, bits=4),
                          residual=128, block=128)
    k = rng.standard_normal((1, 2, 1024, 32)).astype(np.float16)
    cache.append(k, k)
    for array in cache.window:
        root = array
        while root.base is not None:
            root = root.base
        assert array.shape[2] == 128 and root.nbytes == array.nbytes
    assert not np.shares_memory(cache.window[0], k)


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


FUSED_PAIRS = [("turbo:4", "turbo:4"), ("turbo:2", "turbo:3"),
               ("turbo:4,center=True", "turbo:2,center=True"),
               ("turbo:3,center=True,channel_scale=True", "turbo:4,channel_scale=True"),
               ("turbo:3,scale=eden,rotation=dense", "turbo:2,scale=eden-mse,center=True"),
               ("scalar:4,axis=channel,group=32", "turbo:3"),
               ("scalar:2,axis=channel,group=32", "turbo:2,center=True,channel_scale=True")]


@pytest.mark.parametrize("key_spec,value_spec", FUSED_PAIRS)
@pytest.mark.parametrize("residual", [0, 16])
def test_fused_step_equals_the_reference_step(key_spec, value_spec, residual, kv):
    k, v, rng = kv
    cache = latkv.KVCache(latkv.quantizer(key_spec, dim=32), latkv.quantizer(value_spec, dim=32),
                          residual=residual, block=32)
    cache.append(k[:, :, :128 + residual + 3], v[:, :, :128 + residual + 3])
    assert cache.fused and cache.compressed_tokens == 128
    for q_heads, tq in ((2, 1), (6, 1), (4, 3)):   # MHA, GQA, a short causal chunk
        q = (3 * rng.standard_normal((2, q_heads, tq, 32))).astype(np.float32)
        reference = cache.attention(q, fused=False, backend="numpy")
        for backend in ("numpy", "numba"):
            np.testing.assert_allclose(cache.attention(q, backend=backend, fused=True),
                                       reference, rtol=2e-4, atol=2e-5)


def test_fused_step_is_refused_where_it_cannot_run(kv):
    k, v, rng = kv
    unfusable = make()                                   # scalar values
    unfusable.append(k, v)
    assert not unfusable.fused
    for key_spec in ("scalar:4,axis=channel,group=16", "scalar:4", "turbo:4,mode=prod",
                     "turbo:4,outlier_channels=4", "turbo:4,center=True,local_stats=True"):
        assert not latkv.KVCache(latkv.quantizer(key_spec, dim=32), latkv.TurboQuant(dim=32),
                                 block=32).fused, key_spec
    q = rng.standard_normal((2, 2, 1, 32)).astype(np.float32)
    with pytest.raises(ValueError, match="cannot run fused"):
        unfusable.attention(q, fused=True)
    cache = latkv.KVCache(latkv.TurboQuant(dim=32), latkv.TurboQuant(dim=32), residual=0,
                          block=32)
    cache.append(k[:, :, :64], v[:, :, :64])
    # a 2-token causal chunk: the first query must not see the last compressed token
    with pytest.raises(ValueError, match="visible"):
        cache.attention(rng.standard_normal((2, 2, 2, 32)).astype(np.float32), fused=True)
    chunk = rng.standard_normal((2, 2, 2, 32)).astype(np.float32)
    k_hat = np.concatenate([cache.key_quantizer.decode(c) for c in cache.key_blocks], axis=2)
    v_hat = np.concatenate([cache.value_quantizer.decode(c) for c in cache.value_blocks], axis=2)
    np.testing.assert_allclose(cache.attention(chunk), dense_attention(chunk, k_hat, v_hat),
                               rtol=1e-3, atol=1e-3)


def test_block_codes_are_the_codes_of_each_block(kv):
    k, v, _ = kv
    for spec, whole in (("turbo:3,center=True", False), ("turbo:3", True),
                        ("scalar:2,axis=channel,group=16", True), ("e8:2,entropy=True", False)):
        qz = latkv.quantizer(spec, dim=32)
        cache = latkv.KVCache(qz, qz, residual=5, block=32)
        for start in range(0, 150, 7):
            cache.append(k[:, :, start:start + 7], v[:, :, start:start + 7])
        assert len(cache.key_blocks) == 4
        for index, codes in enumerate(cache.key_blocks):
            expected = qz.encode(k[:, :, 32 * index:32 * (index + 1)].astype(np.float16))
            assert codes.shape == expected.shape and set(codes.arrays) == set(expected.arrays)
            for name in codes.arrays:
                assert np.array_equal(codes[name], expected[name]), (spec, name)
        assert (cache.key_blocks.whole() is not None) == whole
        if whole:
            np.testing.assert_array_equal(
                qz.decode(cache.key_blocks.whole()),
                np.concatenate([qz.decode(c) for c in cache.key_blocks], axis=2))
        with pytest.raises(IndexError):
            cache.key_blocks[4]


def test_a_refused_append_leaves_the_cache_unchanged(kv):
    k, v, rng = kv
    cache = make()
    cache.append(k[:, :, :60], v[:, :, :60])
    before = (len(cache), cache.nbytes, cache.compressed_tokens)
    q = rng.standard_normal((2, 2, 1, 32)).astype(np.float32)
    expected = cache.attention(q)
    bad_values = v[:, :, 60:70].copy()
    bad_values[1, 1, 3, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cache.append(k[:, :, 60:70], bad_values)
    with pytest.raises(ValueError, match="batch and heads"):
        cache.append(k[:, :1, 60:70], v[:, :1, 60:70])
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        cache.append(k[:, :, 60:70].astype(np.int32), v[:, :, 60:70])
    with pytest.raises(ValueError, match="same array module|both be"):
        cache.append(k[:, :, 60:70], v[:, :, 60:69])
    assert (len(cache), cache.nbytes, cache.compressed_tokens) == before
    np.testing.assert_array_equal(cache.attention(q), expected)
    with pytest.raises(TypeError, match="q must be float"):
        cache.attention(q.astype(np.int64))
    with pytest.raises(ValueError, match="last dimension 32"):
        cache.attention(q[..., :16])


def test_an_append_a_quantizer_refuses_leaves_the_cache_unchanged(kv):
    k, v, rng = kv
    # TurboQuant refuses a vector whose norm overflows its float16 norm
    cache = latkv.KVCache(latkv.TurboQuant(dim=32), latkv.TurboQuant(dim=32), residual=4,
                          block=32)
    cache.append(k[:, :, :30], v[:, :, :30])
    before = (len(cache), cache.nbytes, cache.compressed_tokens)
    loud = np.full((2, 2, 10, 32), 30000.0, np.float32)         # float16, but norm 170k
    with pytest.raises(ValueError, match="norm exceeds the float16 range"):
        cache.append(loud, v[:, :, 30:40])
    with pytest.raises(ValueError, match="v holds values beyond the float16 range"):
        cache.append(k[:, :, 30:40], v[:, :, 30:40] * 1e6)
    assert (len(cache), cache.nbytes, cache.compressed_tokens) == before
    cache.append(k[:, :, 30:40], v[:, :, 30:40])
    assert (len(cache), cache.compressed_tokens) == (40, 32)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cupy", "numba.cuda"])
@pytest.mark.parametrize("key_spec,value_spec", FUSED_PAIRS[:4] + [("scalar:4", "turbo:3")])
def test_a_cache_of_cupy_arrays_attends_like_one_of_numpy_arrays(key_spec, value_spec, backend):
    import cupy

    rng = np.random.default_rng(1)
    k = rng.standard_normal((2, 4, 700, 128)).astype(np.float16)
    v = rng.standard_normal((2, 4, 700, 128)).astype(np.float16)
    q = rng.standard_normal((2, 16, 1, 128)).astype(np.float32)
    caches = [latkv.KVCache(latkv.quantizer(key_spec, dim=128),
                            latkv.quantizer(value_spec, dim=128), residual=60, block=128)
              for _ in range(2)]
    caches[0].append(k, v)
    caches[1].append(cupy.asarray(k), cupy.asarray(v))
    for host, device in zip([*caches[0].key_blocks, *caches[0].value_blocks],
                            [*caches[1].key_blocks, *caches[1].value_blocks]):
        for name in host.arrays:          # the GPU encodes bit for bit as the CPU does
            assert np.array_equal(host[name], cupy.asnumpy(device[name])), name
    expected = caches[0].attention(q)
    got = caches[1].attention(cupy.asarray(q), backend=backend)
    assert isinstance(got, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(got), expected, rtol=1e-4, atol=1e-5)
