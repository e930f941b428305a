"""QJL's standard ONNX graphs: sign bits bit-identical to ``encode``; scores close."""

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

import latkv
import latkv.onnx


def run(qz, what, feeds, **options):
    session = latkv.onnx.session(latkv.onnx.export(qz, what, **options))
    return session.run(None, feeds)


@pytest.mark.parametrize("spec", ["qjl:128", "qjl:200,norm_dtype=float32",
                                  "qjl:64,orthogonal=True"])
def test_encode_decode_scores_match_the_library(spec):
    qz = latkv.quantizer(spec, dim=64)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 2, 41, 64)).astype(np.float32)
    codes = qz.encode(x)
    signs, norm = run(qz, "encode", {"x": x})
    np.testing.assert_array_equal(signs, codes["signs"])
    np.testing.assert_array_equal(norm, codes["norm"])
    assert norm.dtype == codes["norm"].dtype
    (decoded,) = run(qz, "decode", dict(codes.arrays))
    x_hat = qz.decode(codes)
    np.testing.assert_allclose(decoded, x_hat, rtol=0, atol=1e-5 * np.abs(x_hat).max())
    q = rng.standard_normal((2, 2, 3, 64)).astype(np.float32)
    (scores,) = run(qz, "scores", {"q": q, **codes.arrays})
    reference = qz.scores(q, codes)
    # float32 sums of m = sketch_dim terms of size |S q| ||k|| sqrt(pi/2) / m
    bound = 8 * qz.sketch_dim * np.finfo(np.float32).eps * np.abs(reference).max()
    np.testing.assert_allclose(scores, reference, rtol=0, atol=bound + 1e-6)


def test_outlier_sketch_has_no_standard_graph():
    with pytest.raises(ValueError, match="flavour='custom'"):
        latkv.onnx.export(latkv.QJL(dim=64, sketch_dim=64, outliers=4), "encode")
