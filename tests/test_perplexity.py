"""Perplexity through a streaming KVCache: exact window = the model's own forward."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gguf")

import latkv  # noqa: E402
from latkv.llm import Model  # noqa: E402
from latkv.perplexity import streaming_negative_log_likelihoods  # noqa: E402
from test_llm import tiny_weights, write_tiny_gguf  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_weights(0, False))
    return Model.load(path)


def fp16_cache(layer, k, v):
    return k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)


def test_streaming_with_an_exact_window_is_the_fp16_forward(tiny_model):
    ids = np.arange(3, 25)                                   # 22 tokens (context 24)
    quantizer = latkv.TurboQuant(dim=8, bits=4)
    streamed = streaming_negative_log_likelihoods(tiny_model, ids, quantizer, quantizer,
                                                  residual=64, block=8)
    reference = tiny_model.negative_log_likelihoods(ids, kv_transform=fp16_cache)
    np.testing.assert_allclose(streamed, reference, rtol=1e-4, atol=1e-4)


def test_streaming_compressed_cache_reads_the_codes(tiny_model):
    ids = np.arange(3, 25)
    exact = latkv.TurboQuant(dim=8, bits=8)
    coarse = latkv.TurboQuant(dim=8, bits=1)
    reference = tiny_model.negative_log_likelihoods(ids, kv_transform=fp16_cache)
    fine = streaming_negative_log_likelihoods(tiny_model, ids, exact, exact, residual=2, block=4)
    rough = streaming_negative_log_likelihoods(tiny_model, ids, coarse, coarse, residual=2,
                                               block=4)
    # the first block is compressed when the 6th token arrives: the steps before it attend to
    # an exact window and lose exactly what the fp16 forward loses
    np.testing.assert_allclose(fine[:5], reference[:5], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rough[:5], reference[:5], rtol=1e-4, atol=1e-4)
    # later steps read the codes: 8-bit codes stay close, 1-bit codes move the losses
    # (random weights: losses of 5-35 nats)
    assert np.abs(fine - reference).max() < 0.01 * np.abs(reference).max()
    assert np.abs(rough[5:] - reference[5:]).max() > 10 * np.abs(fine[5:] - reference[5:]).max()


def test_chunked_streaming_equals_token_by_token_when_no_block_is_due_inside_a_chunk(
        tiny_model):
    ids = np.arange(3, 25)
    coarse = latkv.TurboQuant(dim=8, bits=2)
    one = streaming_negative_log_likelihoods(tiny_model, ids, coarse, coarse, residual=3,
                                             block=4)
    # block i (tokens 4i..4i+3) is compressed when 4(i+1) + 3 tokens are cached (an odd
    # count). Query t sees t + 1 tokens one by one; in chunks of 2 it sees 2 (t // 2 + 1),
    # which passes no odd count more: the same cache, the same losses
    pairs = streaming_negative_log_likelihoods(tiny_model, ids, coarse, coarse, residual=3,
                                               block=4, chunk=2)
    np.testing.assert_allclose(pairs, one, rtol=1e-4, atol=1e-4)
    # in chunks of 4, the first two queries of a chunk see a block compressed early (and the
    # difference flows on through later layers and positions); the first chunk still agrees
    fours = streaming_negative_log_likelihoods(tiny_model, ids, coarse, coarse, residual=3,
                                               block=4, chunk=4)
    np.testing.assert_allclose(fours[:4], one[:4], rtol=1e-4, atol=1e-4)
    assert np.abs(fours[4:6] - one[4:6]).min() > 1e-3
    with pytest.raises(ValueError, match="chunk"):
        streaming_negative_log_likelihoods(tiny_model, ids, coarse, coarse, chunk=0)
