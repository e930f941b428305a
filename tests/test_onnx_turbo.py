"""TurboQuant's standard ONNX graphs: codes bit-identical to ``encode``, values close."""

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

import latkv
import latkv.onnx

SPECS = ["turbo:4", "turbo:2", "turbo:8", "turbo:3,mode=prod", "turbo:1,mode=prod",
         "turbo:4,scale=eden", "turbo:3,scale=eden-mse", "turbo:4,rotation=dense"]


def run(qz, what, feeds, **options):
    session = latkv.onnx.session(latkv.onnx.export(qz, what, **options))
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def scores_tolerance(q, x_hat):
    """float32 rounding of a dot product of ``dim`` terms: dim * eps * |q| |x_hat|."""
    dim = q.shape[-1]
    return 4 * dim * np.finfo(np.float32).eps * (
        np.linalg.norm(q, axis=-1).max() * np.linalg.norm(x_hat, axis=-1).max())


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dim", [64, 96])
def test_encode_decode_scores_match_the_library(spec, dim):
    qz = latkv.quantizer(spec, dim=dim)
    rng = np.random.default_rng(dim)
    scales = rng.uniform(0.1, 9, (2, 3, 37, 1))
    x = (rng.standard_normal((2, 3, 37, dim)) * scales).astype(np.float32)
    x[0, 0, 0] = 0.0                                   # a zero vector divides by 1
    codes = qz.encode(x)
    encoded = run(qz, "encode", {"x": x})
    assert list(encoded) == list(codes.arrays)
    for name, array in encoded.items():
        np.testing.assert_array_equal(array, codes[name], err_msg=name)
        assert array.dtype == codes[name].dtype
    decoded = run(qz, "decode", dict(codes.arrays))["x_hat"]
    x_hat = qz.decode(codes)
    np.testing.assert_allclose(decoded, x_hat, rtol=0, atol=1e-5 * np.abs(x_hat).max())
    q = rng.standard_normal((2, 3, 4, dim)).astype(np.float32)
    scores = run(qz, "scores", {"q": q, **codes.arrays})["scores"]
    np.testing.assert_allclose(scores, qz.scores(q, codes), rtol=0,
                               atol=scores_tolerance(q, x_hat))


@pytest.mark.parametrize("spec", ["turbo:4", "turbo:3,mode=prod"])
def test_float16_inputs_and_other_leading_axes(spec):
    qz = latkv.quantizer(spec, dim=128)
    x = np.random.default_rng(1).standard_normal((300, 128)).astype(np.float16)
    codes = qz.encode(x)
    encoded = run(qz, "encode", {"x": x}, dtype="float16", leading=("tokens",))
    for name in codes.arrays:
        np.testing.assert_array_equal(encoded[name], codes[name], err_msg=name)
    decoded = run(qz, "decode", dict(codes.arrays), dtype="float16", leading=("tokens",))
    assert decoded["x_hat"].dtype == np.float16
    np.testing.assert_allclose(decoded["x_hat"].astype(np.float32),
                               qz.decode(codes).astype(np.float32), rtol=0, atol=2e-3)


def test_one_graph_serves_any_batch_and_token_count():
    qz = latkv.TurboQuant(dim=64, bits=3)
    session = latkv.onnx.session(latkv.onnx.export(qz, "encode"))
    for shape in [(1, 1, 1, 64), (3, 2, 129, 64)]:
        x = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)
        packed, norm = session.run(None, {"x": x})
        np.testing.assert_array_equal(packed, qz.encode(x)["packed"])
        np.testing.assert_array_equal(norm, qz.encode(x)["norm"])


def test_outliers_and_local_statistics_have_no_standard_graph():
    with pytest.raises(ValueError, match="flavour='custom'"):
        latkv.onnx.export(latkv.TurboQuant(dim=64, bits=2, outlier_channels=16), "encode")
    with pytest.raises(ValueError, match="flavour='custom'"):
        latkv.onnx.export(latkv.TurboQuant(dim=64, bits=4, center=True, local_stats=True),
                          "encode")
