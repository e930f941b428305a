"""latkv capture / perplexity / stats / compare on captures, through the CLI, with a tiny GGUF."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_llm import tiny_weights, write_tiny_gguf

import latkv
from latkv.capture import capture_kv, read_metadata
from latkv.cli import main
from latkv.compare import check_kv, load_kv
from latkv.llm import Model
from latkv.perplexity import perplexity, quantized_kv_transform
from latkv.sample import SAMPLE_CHUNK_TOKENS, SAMPLE_CHUNKS, SAMPLE_LAYERS, load_sample, sample_path

TEXT = "The quick brown fox jumps over the lazy dog. " * 4


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_weights(0, False))


def test_capture_layout_matches_the_forward(tiny_path):
    model = Model.load(tiny_path)
    ids = model.tokenizer.encode(TEXT)
    data = capture_kv(model, ids, chunk_tokens=10, chunks=3, layers=[1])
    assert sorted(data) == ["chunk_offsets", "k_L1", "k_pre_L1", "q_L1", "token_ids", "v_L1"]
    assert data["q_L1"].shape == (4, 30, 8) and data["k_L1"].shape == (2, 30, 8)
    assert data["chunk_offsets"].tolist() == [0, 10, 20, 30]
    np.testing.assert_array_equal(data["token_ids"], ids[:30])
    # each chunk is its own sequence: chunk 2 equals a fresh forward of its tokens
    _, caches = model.forward(ids[20:30], capture=True)
    np.testing.assert_array_equal(data["k_L1"][:, 20:30], caches[1].k)
    np.testing.assert_array_equal(data["q_L1"][:, 20:30], caches[1].q)
    assert check_kv(data) == [1]
    with pytest.raises(ValueError, match="whole chunks"):
        capture_kv(model, ids, chunk_tokens=10, chunks=ids.size)
    with pytest.raises(ValueError, match="context"):
        capture_kv(model, ids, chunk_tokens=25)
    with pytest.raises(ValueError, match="layers"):
        capture_kv(model, ids, chunk_tokens=10, layers=[2])


def test_perplexity_with_and_without_quantization(tiny_path):
    model = Model.load(tiny_path)
    ids = model.tokenizer.encode(TEXT)
    base = perplexity(model, ids, window=20)
    assert base["windows"] == ids.size // 20 and base["predicted_tokens"] == 19 * base["windows"]
    # the mean NLL is the average of the per-window NLLs computed directly
    direct = np.concatenate([model.negative_log_likelihoods(ids[i * 20:(i + 1) * 20])
                             for i in range(base["windows"])])
    assert base["perplexity"] == pytest.approx(np.exp(direct.mean()), rel=1e-12)
    # 8-bit codes barely move it; 1-bit codes move it more
    fine = latkv.quantizer("scalar:8,group=8", dim=8)
    coarse = latkv.quantizer("scalar:1,group=8", dim=8)
    near = perplexity(model, ids, window=20, kv_transform=quantized_kv_transform(fine, fine))
    far = perplexity(model, ids, window=20, kv_transform=quantized_kv_transform(coarse, coarse))
    assert abs(np.log(near["perplexity"] / base["perplexity"])) < 0.01
    assert abs(np.log(far["perplexity"] / base["perplexity"])) > \
        abs(np.log(near["perplexity"] / base["perplexity"]))
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, ids[:5], window=20)


def test_cli_capture_compare_stats_perplexity(tiny_path, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "kv.npz"
    assert main(["capture", "--model", str(tiny_path), "--text", str(text), "--out", str(out),
                 "--chunk-tokens", "12", "--chunks", "2", "--quiet"]) == 0
    data = load_kv(out)
    metadata = read_metadata(data)
    assert metadata["model_file"] == "tiny.gguf" and metadata["layers"] == [0, 1]
    assert metadata["chunk_tokens"] == 12 and len(metadata["text_sha256"]) == 64
    assert data["k_L0"].dtype == np.float16
    rows_file = tmp_path / "rows.json"
    assert main(["compare", "--kv", str(out), "--methods", "scalar,group=8", "--bits", "4",
                 "--quiet", "--json", str(rows_file)]) == 0
    rows = json.loads(rows_file.read_text())["rows"]
    assert [row["method"] for row in rows] == ["scalar:4,group=8"]
    assert 0 < rows[0]["key_relative_mse"] < 0.05 and 0 < rows[0]["top8_agreement"] <= 1
    stats_file = tmp_path / "stats.json"
    assert main(["stats", str(out), "--quiet", "--json", str(stats_file)]) == 0
    stats = json.loads(stats_file.read_text())
    assert {(row["layer"], row["kind"]) for row in stats["rows"]} == {
        (layer, kind) for layer in (0, 1) for kind in ("k", "k_pre", "v")}
    ppl_file = tmp_path / "ppl.json"
    assert main(["perplexity", "--model", str(tiny_path), "--text", str(text), "--tokens", "40",
                 "--window", "20", "--method", "scalar:4,group=8", "--quiet",
                 "--json", str(ppl_file)]) == 0
    ppl = json.loads(ppl_file.read_text())["rows"]
    assert [row["method"] for row in ppl] == ["fp32 (unquantized)", "scalar:4,group=8"]
    assert ppl[0]["predicted_tokens"] == ppl[1]["predicted_tokens"] == 38
    # token by token through a KVCache per layer
    assert main(["perplexity", "--model", str(tiny_path), "--text", str(text), "--tokens", "40",
                 "--window", "20", "--method", "turbo:4", "--cache", "4,4", "--quiet",
                 "--json", str(ppl_file)]) == 0
    streamed = json.loads(ppl_file.read_text())["rows"]
    assert streamed[1]["method"] == "turbo:4 (KVCache 4,4)"
    assert streamed[1]["predicted_tokens"] == 38
    assert abs(np.log(streamed[1]["perplexity"] / streamed[0]["perplexity"])) < 0.05
    # in chunks of 2 tokens per forward (no block of 4 with residual 3 falls due inside one)
    assert main(["perplexity", "--model", str(tiny_path), "--text", str(text), "--tokens", "40",
                 "--window", "20", "--method", "turbo:4", "--cache", "3,4", "--quiet",
                 "--json", str(ppl_file)]) == 0
    one_by_one = json.loads(ppl_file.read_text())["rows"][1]["perplexity"]
    assert main(["perplexity", "--model", str(tiny_path), "--text", str(text), "--tokens", "40",
                 "--window", "20", "--method", "turbo:4", "--cache", "3,4", "--chunk", "2",
                 "--quiet", "--json", str(ppl_file)]) == 0
    assert abs(json.loads(ppl_file.read_text())["rows"][1]["perplexity"] / one_by_one
               - 1) < 1e-4
    # errors are one line on stderr and exit status 2
    capsys.readouterr()
    assert main(["capture", "--model", str(tmp_path / "none.gguf"), "--out", str(out)]) == 2
    assert "neither a known name" in capsys.readouterr().err
    assert main(["perplexity", "--model", str(tiny_path), "--text", str(text), "--tokens", "5",
                 "--window", "20"]) == 2
    assert "fewer than one window" in capsys.readouterr().err
    assert main(["perplexity", "--model", str(tiny_path), "--text", str(text),
                 "--window", "30"]) == 2
    assert "window must lie in [2, 24]" in capsys.readouterr().err
    assert main(["perplexity", "--model", str(tiny_path), "--text", str(text),
                 "--method", "turbo:4", "--cache", "4"]) == 2
    assert "RESIDUAL,BLOCK" in capsys.readouterr().err


def test_unknown_and_uncached_models(tmp_path, monkeypatch):
    from latkv.llm.fetch import resolve_model

    monkeypatch.setenv("LATKV_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="latkv model fetch smollm2"):
        resolve_model("smollm2")
    with pytest.raises(ValueError, match="neither a known name"):
        resolve_model("gpt-5")


def test_embedded_sample_is_a_real_capture():
    data = load_sample()
    metadata = read_metadata(data)
    assert metadata["model_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert metadata["layers"] == list(SAMPLE_LAYERS)
    tokens = SAMPLE_CHUNK_TOKENS * SAMPLE_CHUNKS
    for layer in SAMPLE_LAYERS:
        assert data[f"q_L{layer}"].shape == (9, tokens, 64)
        assert data[f"k_L{layer}"].shape == data[f"k_pre_L{layer}"].shape == (3, tokens, 64)
        assert data[f"k_L{layer}"].dtype == np.float16
    import os

    assert os.path.getsize(sample_path()) < 4 * 2**20
