"""latkv.onnx.export / session: both flavours, attention graphs, refused models and inputs."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_extensions")

import latkv
import latkv.onnx
from latkv.onnx import FORMAT_VERSION

# one configuration per method the custom flavour runs, statistics and outliers included
CUSTOM_SPECS = ["turbo:4", "turbo:3,mode=prod", "turbo:2,outlier_channels=16,center=True",
                "qjl:128,outliers=4", "scalar:4", "scalar:2,axis=channel,group=16", "polar",
                "e8:3"]


def softmax(logits):
    logits = logits - logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=-1, keepdims=True)


def reference_attention(q, keys, key_codes, values, value_codes, scale):
    """float64 ``softmax(scale q K_hat^T) V_hat`` from latkv's own scores and decode."""
    logits = keys.scores(q, key_codes).astype(np.float64) * scale
    return softmax(logits) @ values.decode(value_codes).astype(np.float64)


def outputs(session, feeds):
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def sample(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("spec", CUSTOM_SPECS)
def test_custom_flavour_runs_latkv_bit_exactly(spec):
    qz = latkv.quantizer(spec, dim=64)
    x, q = sample((2, 3, 40, 64)), sample((2, 3, 4, 64), 1)
    codes = qz.encode(x)
    encoded = outputs(latkv.onnx.session(latkv.onnx.export(qz, "encode", flavour="custom")),
                      {"x": x})
    assert list(encoded) == list(codes.arrays)
    for name in codes.arrays:
        np.testing.assert_array_equal(encoded[name], codes[name], err_msg=name)
        assert encoded[name].dtype == codes[name].dtype
    decode = latkv.onnx.session(latkv.onnx.export(qz, "decode", flavour="custom"))
    np.testing.assert_allclose(decode.run(None, dict(codes.arrays))[0], qz.decode(codes),
                               rtol=0, atol=1e-6 * np.abs(x).max())
    scores = latkv.onnx.session(latkv.onnx.export(qz, "scores", flavour="custom"))
    reference = qz.scores(q, codes)
    np.testing.assert_allclose(scores.run(None, {"q": q, **codes.arrays})[0], reference,
                               rtol=0, atol=1e-5 * np.abs(reference).max())


def test_custom_entropy_coded_e8_encodes_and_refuses_decode_graphs():
    qz = latkv.quantizer("e8:4,entropy=True", dim=64)
    x = sample((1, 2, 64, 64))
    codes = qz.encode(x)
    session = latkv.onnx.session(latkv.onnx.export(qz, "encode", flavour="custom"))
    for name, array in outputs(session, {"x": x}).items():
        np.testing.assert_array_equal(array, codes[name], err_msg=name)
    with pytest.raises(ValueError, match="streams"):
        latkv.onnx.export(qz, "decode", flavour="custom")
    with pytest.raises(ValueError, match="no standard-flavour|rANS|entropy"):
        latkv.onnx.export(qz, "encode")


@pytest.mark.parametrize("flavour", ["standard", "custom"])
@pytest.mark.parametrize("pair", ["turbo:4|turbo:4", "turbo:4,mode=prod|turbo:3",
                                  "qjl:128|turbo:2"])
def test_attention_graph_equals_softmax_of_scores_times_decode(flavour, pair):
    keys, values = (latkv.quantizer(part, dim=64) for part in pair.split("|"))
    k, v, q = sample((1, 2, 70, 64)), sample((1, 2, 70, 64), 1), sample((1, 2, 4, 64), 2)
    key_codes, value_codes = keys.encode(k), values.encode(v)
    session = latkv.onnx.session(latkv.onnx.export((keys, values), "attention",
                                                   flavour=flavour))
    feeds = {"q": q, **{"key_" + n: a for n, a in key_codes.arrays.items()},
             **{"value_" + n: a for n, a in value_codes.arrays.items()}}
    (result,) = session.run(None, feeds)
    expected = reference_attention(q, keys, key_codes, values, value_codes, 1 / 8)
    assert result.shape == (1, 2, 4, 64) and result.dtype == np.float32
    # float32 logits (error ~ dim eps |q||k| / 8) move the softmax weights by that much
    np.testing.assert_allclose(result, expected, rtol=0, atol=2e-5 * np.abs(expected).max())


def test_attention_scale_and_float16_inputs():
    qz = latkv.TurboQuant(dim=64, bits=4)
    k, v = sample((1, 1, 50, 64), 3, np.float16), sample((1, 1, 50, 64), 4, np.float16)
    q = sample((1, 1, 2, 64), 5, np.float16)
    model = latkv.onnx.export(qz, "attention", dtype="float16", scale=0.3)
    kc, vc = qz.encode(k), qz.encode(v)
    feeds = {"q": q, **{"key_" + n: a for n, a in kc.arrays.items()},
             **{"value_" + n: a for n, a in vc.arrays.items()}}
    (result,) = latkv.onnx.session(model).run(None, feeds)
    assert result.dtype == np.float16
    expected = reference_attention(q, qz, kc, qz, vc, 0.3)
    np.testing.assert_allclose(result.astype(np.float64), expected, rtol=0, atol=2e-3)


def test_metadata_and_checker():
    model = latkv.onnx.export(latkv.TurboQuant(dim=64, bits=4), "scores")
    entries = {p.key: p.value for p in model.metadata_props}
    assert entries["latkv_format"] == str(FORMAT_VERSION)
    assert entries["latkv_what"] == "scores" and entries["latkv_flavour"] == "standard"
    assert latkv.quantizer(entries["latkv_spec"]) == latkv.TurboQuant(dim=64, bits=4)
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    (scores,) = inferred.graph.output
    dims = [d.dim_param or d.dim_value for d in scores.type.tensor_type.shape.dim]
    assert dims == ["batch", "heads", "queries", "tokens"]


def test_write_is_atomic_and_session_reads_the_file(tmp_path):
    qz = latkv.TurboQuant(dim=64, bits=2)
    path = tmp_path / "encode.onnx"
    latkv.onnx.export(qz, "encode", path)
    assert [p.name for p in tmp_path.iterdir()] == ["encode.onnx"]
    x = sample((1, 1, 5, 64))
    packed, _ = latkv.onnx.session(path).run(None, {"x": x})
    np.testing.assert_array_equal(packed, qz.encode(x)["packed"])
    with pytest.raises(ValueError, match="opset"):
        latkv.onnx.export(qz, "encode", tmp_path / "old.onnx", opset=9)
    assert [p.name for p in tmp_path.iterdir()] == ["encode.onnx"]


def _with_metadata(model, **changes):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    kept = [(p.key, p.value) for p in copy.metadata_props if p.key not in changes]
    del copy.metadata_props[:]
    for key, value in kept + [(k, v) for k, v in changes.items() if v is not None]:
        entry = copy.metadata_props.add()
        entry.key, entry.value = key, value
    return copy


@pytest.mark.parametrize("changes, message", [
    ({"latkv_format": "0"}, "format 0"),
    ({"latkv_format": None}, "lacks latkv metadata"),
    ({"latkv_spec": "turbo:4,dim=64,bits=99"}, "not a valid quantizer"),
    ({"latkv_what": "compress"}, "latkv_what"),
])
def test_models_from_other_versions_or_with_wrong_metadata_are_refused(changes, message):
    model = latkv.onnx.export(latkv.TurboQuant(dim=64, bits=4), "encode")
    with pytest.raises(ValueError, match=message):
        latkv.onnx.session(_with_metadata(model, **changes))


def test_custom_nodes_with_wrong_attributes_are_refused():
    from onnx import helper

    model = latkv.onnx.export(latkv.TurboQuant(dim=64, bits=4), "encode", flavour="custom")
    node = next(n for n in model.graph.node if n.domain == "ai.onnx.contrib")
    assert node.op_type == "LatkvEncode2"
    for name, value, message in [("spec", "turbo:3,dim=64", "'spec'"),
                                 ("latkv_format", 0, "latkv_format"),
                                 ("colour", "blue", "unknown attributes")]:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        target = next(n for n in copy.graph.node if n.domain == "ai.onnx.contrib")
        kept = [a for a in target.attribute if a.name != name]
        del target.attribute[:]
        target.attribute.extend(kept + [helper.make_attribute(name, value)])
        with pytest.raises(ValueError, match=message):
            latkv.onnx.session(copy)


def test_truncated_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "model.onnx"
    latkv.onnx.export(latkv.TurboQuant(dim=64, bits=4), "encode", path)
    data = path.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="truncated or corrupted|lacks latkv"):
        latkv.onnx.session(tmp_path / "cut.onnx")
    (tmp_path / "noise.onnx").write_bytes(b"\x00\xff" * 50)
    with pytest.raises(ValueError):
        latkv.onnx.session(tmp_path / "noise.onnx")
    with pytest.raises(TypeError, match="path, bytes"):
        latkv.onnx.session(42)


@pytest.mark.parametrize("flavour", ["standard", "custom"])
def test_bad_feeds_raise_value_errors(flavour):
    qz = latkv.TurboQuant(dim=64, bits=4)
    x = sample((1, 1, 8, 64))
    codes = qz.encode(x)
    encode = latkv.onnx.session(latkv.onnx.export(qz, "encode", flavour=flavour))
    bad = x.copy()
    bad[0, 0, 3, 5] = np.nan
    with pytest.raises(ValueError, match="NaN|finite"):
        encode.run(None, {"x": bad})
    decode = latkv.onnx.session(latkv.onnx.export(qz, "decode", flavour=flavour))
    with pytest.raises(ValueError, match="norm"):
        decode.run(None, {"packed": codes["packed"],
                          "norm": codes["norm"].astype(np.float32)})
    with pytest.raises(ValueError, match="missing"):
        decode.run(None, {"packed": codes["packed"]})
    other = latkv.TurboQuant(dim=64, bits=2).encode(x)
    with pytest.raises(ValueError, match="packed"):
        decode.run(None, dict(other.arrays))


def test_a_failing_custom_op_raises_instead_of_aborting():
    from onnxruntime import InferenceSession, SessionOptions
    from onnxruntime_extensions import get_library_path

    from latkv.onnx import custom

    qz = latkv.TurboQuant(dim=64, bits=4)
    model = latkv.onnx.export(qz, "encode", flavour="custom")
    session = latkv.onnx.session(model)           # registers the ops
    x = np.full((1, 1, 2, 64), 60000, dtype=np.float32)   # norms past float16: encode refuses
    with pytest.raises(ValueError, match="float16"):
        session.run(None, {"x": x})
    # a plain InferenceSession (the unchecked path a foreign pipeline takes) gets NaN, no abort
    options = SessionOptions()
    options.register_custom_ops_library(get_library_path())
    plain = InferenceSession(model.SerializeToString(), options,
                             providers=["CPUExecutionProvider"])
    custom.take_errors()
    plain.run(None, {"x": x})
    assert any("float16" in message for message in custom.take_errors())


@pytest.mark.parametrize("arguments, error, message", [
    (("turbo:4,dim=64", "compress"), ValueError, "what"),
    (("turbo:4,dim=64", "encode"), None, None),
    ((3.5, "encode"), TypeError, "quantizer"),
])
def test_export_arguments(arguments, error, message):
    if error is None:
        latkv.onnx.export(*arguments)
        return
    with pytest.raises(error, match=message):
        latkv.onnx.export(*arguments)


def test_export_option_errors():
    qz = latkv.TurboQuant(dim=64, bits=4)
    with pytest.raises(ValueError, match="flavour"):
        latkv.onnx.export(qz, "encode", flavour="fancy")
    with pytest.raises(ValueError, match="dtype"):
        latkv.onnx.export(qz, "encode", dtype="float64")
    with pytest.raises(ValueError, match="leading"):
        latkv.onnx.export(qz, "encode", leading=("a", "a"))
    with pytest.raises(ValueError, match="only for what='attention'"):
        latkv.onnx.export(qz, "encode", values=qz)
    with pytest.raises(ValueError, match="same dim"):
        latkv.onnx.export(qz, "attention", values=latkv.TurboQuant(dim=32, bits=4))
    with pytest.raises(ValueError, match="dynamic axes"):
        latkv.onnx.export(latkv.quantizer("qet:3", dim=64), "encode", flavour="custom")


def test_the_docs_pipeline_example_runs(capsys):
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parent.parent / "docs" / "onnx.md"
    block = re.search(r"```python\n(.*?)```", page.read_text(), re.DOTALL).group(1)
    exec(compile(block, str(page), "exec"), {})   # its own assert checks the codes
    assert capsys.readouterr().out.strip() == "0.2"


def test_attention_with_the_exact_window_equals_the_kv_cache():
    keys, values = latkv.TurboQuant(dim=64, bits=4), latkv.TurboQuant(dim=64, bits=3)
    cache = latkv.KVCache(keys, values, residual=16, block=32)
    k, v = sample((1, 2, 100, 64), 6, np.float16), sample((1, 2, 100, 64), 7, np.float16)
    cache.append(k, v)
    assert cache.compressed_tokens == 64 and cache.window[0].shape == (1, 2, 36, 64)
    q = sample((1, 8, 1, 64), 8)                       # GQA 4: query head h reads kv h // 4
    expected = cache.attention(q, backend="numpy").reshape(1, 2, 4, 64)
    model = latkv.onnx.export((keys, values), "attention", window=True)
    key_window, value_window = cache.window
    feeds = {"q": q.reshape(1, 2, 4, 64), "key_window": key_window.astype(np.float32),
             "value_window": value_window.astype(np.float32),
             **{"key_" + n: a for n, a in cache.key_blocks.whole().arrays.items()},
             **{"value_" + n: a for n, a in cache.value_blocks.whole().arrays.items()}}
    (result,) = latkv.onnx.session(model).run(None, feeds)
    np.testing.assert_allclose(result, expected, rtol=0, atol=2e-5 * np.abs(expected).max())
    with pytest.raises(ValueError, match="window=True"):
        latkv.onnx.export(keys, "scores", window=True)
