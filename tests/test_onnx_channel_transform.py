"""The frozen channel pre-transform in standard graphs: statistics and codes bit-identical."""

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

import latkv  # noqa: E402
import latkv.onnx  # noqa: E402

SPECS = ["turbo:4,center=True", "turbo:2,center=True,channel_scale=True",
         "turbo:3,mode=prod,center=True", "qjl:128,center=True", "e8:3,center=True",
         "turbo:4,channel_scale=True,stats_tokens=16"]


def keys_like(shape, seed):
    """Post-RoPE-like keys: a large per-channel offset and spread on top of noise."""
    rng = np.random.default_rng(seed)
    dim = shape[-1]
    return (rng.standard_normal(shape) * rng.uniform(0.2, 5, dim)
            + rng.standard_normal(dim) * 3).astype(np.float32)


def session(qz, what):
    return latkv.onnx.session(latkv.onnx.export(qz, what))


@pytest.mark.parametrize("spec", SPECS)
def test_statistics_codes_and_attention_match_the_library(spec):
    qz = latkv.quantizer(spec, dim=64)
    x = keys_like((2, 3, 150, 64), 0)
    x[1, 2, :, 7] = 1.5                         # a constant channel keeps scale 1
    codes = qz.encode(x)
    encoded = session(qz, "encode").run(None, {"x": x})
    for name, array in zip(codes.arrays, encoded):
        np.testing.assert_array_equal(array, codes[name], err_msg=name)
    x_hat = qz.decode(codes)
    (decoded,) = session(qz, "decode").run(None, dict(codes.arrays))
    np.testing.assert_allclose(decoded, x_hat, rtol=0, atol=1e-5 * np.abs(x_hat).max())
    q = np.random.default_rng(1).standard_normal((2, 3, 4, 64)).astype(np.float32)
    reference = qz.scores(q, codes)
    (scores,) = session(qz, "scores").run(None, {"q": q, **codes.arrays})
    np.testing.assert_allclose(scores, reference, rtol=0, atol=2e-6 * np.abs(reference).max())
    feeds = {"q": q, **{"key_" + k: v for k, v in codes.arrays.items()},
             **{"value_" + k: v for k, v in codes.arrays.items()}}
    (attention,) = session(qz, "attention").run(None, feeds)
    logits = reference.astype(np.float64) / 8
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    expected = (weights / weights.sum(-1, keepdims=True)) @ x_hat.astype(np.float64)
    np.testing.assert_allclose(attention, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_fewer_tokens_than_stats_tokens_and_one_leading_axis():
    qz = latkv.TurboQuant(dim=64, bits=3, center=True, channel_scale=True, stats_tokens=128)
    x = keys_like((40, 64), 2)
    codes = qz.encode(x)
    model = latkv.onnx.export(qz, "encode", leading=("tokens",))
    outputs = latkv.onnx.session(model).run(None, {"x": x})
    for name, array in zip(codes.arrays, outputs):
        np.testing.assert_array_equal(array, codes[name], err_msg=name)
