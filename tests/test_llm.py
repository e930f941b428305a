"""latkv.llm: GGUF loading, the Q/K row order, RoPE, causal GQA attention, the forward, errors.

A tiny random model is written with the ``gguf`` package's writer, its Q/K rows permuted the
way llama.cpp's converter permutes Llama weights; the test's own loop-by-loop forward (complex
RoPE on the HuggingFace pairs, explicit per-head attention) must give the same logits.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from latkv.llm import Model
from latkv.llm.gguf_model import unpermute_qk_rows
from latkv.llm.model import causal_attention
from latkv.llm.rope import apply_rope, rope_angles

gguf = pytest.importorskip("gguf")

TINY = {"n_layers": 2, "hidden": 32, "ffn": 48, "heads": 4, "kv_heads": 2, "head_dim": 8,
        "vocab": 260, "context": 24, "base": 500.0, "eps": 1e-5}


def gpt2_byte_symbols() -> list[str]:
    """GPT-2's bytes_to_unicode symbols in byte order (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def hf_to_gguf_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation (LlamaModel.permute): HF row s*d/2+i -> row 2i+s."""
    rows = weight.shape[0]
    rest = weight.shape[1:]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *rest).swapaxes(1, 2).reshape(
        rows, *rest)


def tiny_weights(seed: int, biases: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = TINY
    q_rows, kv_rows = t["heads"] * t["head_dim"], t["kv_heads"] * t["head_dim"]

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    weights = {"token_embd.weight": rng.standard_normal((t["vocab"], t["hidden"])).astype(
        np.float32), "output_norm.weight": (1 + 0.1 * rng.standard_normal(t["hidden"])).astype(
        np.float32)}
    for layer in range(t["n_layers"]):
        p = f"blk.{layer}."
        weights[p + "attn_norm.weight"] = (1 + 0.1 * rng.standard_normal(t["hidden"])).astype(
            np.float32)
        weights[p + "ffn_norm.weight"] = (1 + 0.1 * rng.standard_normal(t["hidden"])).astype(
            np.float32)
        weights[p + "attn_q.weight"] = 2 * matrix(q_rows, t["hidden"])
        weights[p + "attn_k.weight"] = 2 * matrix(kv_rows, t["hidden"])
        weights[p + "attn_v.weight"] = matrix(kv_rows, t["hidden"])
        weights[p + "attn_output.weight"] = matrix(t["hidden"], q_rows)
        weights[p + "ffn_gate.weight"] = matrix(t["ffn"], t["hidden"])
        weights[p + "ffn_up.weight"] = matrix(t["ffn"], t["hidden"])
        weights[p + "ffn_down.weight"] = matrix(t["hidden"], t["ffn"])
        if biases:
            for name, rows in (("attn_q", q_rows), ("attn_k", kv_rows), ("attn_v", kv_rows)):
                weights[p + name + ".bias"] = (0.3 * rng.standard_normal(rows)).astype(np.float32)
    return weights


def write_tiny_gguf(path: Path, weights: dict[str, np.ndarray], architecture: str = "llama",
                    permute: bool = True) -> Path:
    t = TINY
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(t["n_layers"])
    writer.add_context_length(t["context"])
    writer.add_embedding_length(t["hidden"])
    writer.add_feed_forward_length(t["ffn"])
    writer.add_head_count(t["heads"])
    writer.add_head_count_kv(t["kv_heads"])
    writer.add_rope_freq_base(t["base"])
    writer.add_rope_dimension_count(t["head_dim"])
    writer.add_layer_norm_rms_eps(t["eps"])
    writer.add_vocab_size(t["vocab"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    tokens = gpt2_byte_symbols() + ["ĠĠ", "ab", "<|im_start|>", "<|im_end|>"]
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 258 + [3, 3])
    writer.add_token_merges(["Ġ Ġ", "a b"])
    writer.add_bos_token_id(258)
    writer.add_eos_token_id(259)
    writer.add_add_bos_token(False)
    for name, array in weights.items():
        if permute and (".attn_q." in name or ".attn_k." in name):
            heads = t["heads"] if ".attn_q." in name else t["kv_heads"]
            array = hf_to_gguf_rows(array, heads)
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def reference_logits(weights: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """Loop-by-loop forward in float64 with HF-layout weights and complex-number RoPE."""
    t = TINY
    d, heads, kv_heads = t["head_dim"], t["heads"], t["kv_heads"]
    w = {name: array.astype(np.float64) for name, array in weights.items()}

    def norm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x) + t["eps"]) * weight

    def rope(vector: np.ndarray, position: int) -> np.ndarray:
        # pair (i, i + d/2) as the complex number x_i + j x_{i+d/2}, times exp(j m theta_i)
        half = d // 2
        theta = t["base"] ** (-2.0 * np.arange(half) / d)
        z = (vector[:half] + 1j * vector[half:]) * np.exp(1j * position * theta)
        return np.concatenate([z.real, z.imag])

    x = [w["token_embd.weight"][token].copy() for token in ids]
    for layer in range(t["n_layers"]):
        p = f"blk.{layer}."
        qs, ks, vs = [], [], []
        for position, row in enumerate(x):
            h = norm(row, w[p + "attn_norm.weight"])
            q = w[p + "attn_q.weight"] @ h + w.get(p + "attn_q.bias", 0)
            k = w[p + "attn_k.weight"] @ h + w.get(p + "attn_k.bias", 0)
            v = w[p + "attn_v.weight"] @ h + w.get(p + "attn_v.bias", 0)
            qs.append([rope(q[i * d:(i + 1) * d], position) for i in range(heads)])
            ks.append([rope(k[i * d:(i + 1) * d], position) for i in range(kv_heads)])
            vs.append([v[i * d:(i + 1) * d] for i in range(kv_heads)])
        new_x = []
        for position, row in enumerate(x):
            outputs = []
            for head in range(heads):
                kv = head // (heads // kv_heads)      # grouped-query attention
                scores = np.array([qs[position][head] @ ks[j][kv] / np.sqrt(d)
                                   for j in range(position + 1)])   # causal: keys 0..position
                weights_ = np.exp(scores - scores.max())
                weights_ /= weights_.sum()
                outputs.append(sum(weights_[j] * vs[j][kv] for j in range(position + 1)))
            row = row + w[p + "attn_output.weight"] @ np.concatenate(outputs)
            h = norm(row, w[p + "ffn_norm.weight"])
            gate = w[p + "ffn_gate.weight"] @ h
            row = row + w[p + "ffn_down.weight"] @ (gate / (1 + np.exp(-gate))
                                                    * (w[p + "ffn_up.weight"] @ h))
            new_x.append(row)
        x = new_x
    return np.array([w["token_embd.weight"] @ norm(row, w["output_norm.weight"]) for row in x])


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    weights = tiny_weights(0, biases=False)
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", weights)
    return Model.load(path), weights


def test_config_is_read(tiny_llama):
    model, _ = tiny_llama
    c = model.config
    assert (c.architecture, c.n_layers, c.hidden, c.n_heads, c.n_kv_heads, c.head_dim) == \
        ("llama", 2, 32, 4, 2, 8)
    assert c.group_size == 2 and c.rope_base == 500.0 and c.vocab_size == 260
    assert model.weights.tied_output


def test_forward_matches_the_loop_reference(tiny_llama):
    model, weights = tiny_llama
    ids = [3, 17, 200, 5, 5, 99, 42, 7, 0, 255]
    logits, _ = model.forward(ids)
    expected = reference_logits(weights, ids)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_wrong_rope_pairing_would_be_caught(tiny_llama, tmp_path):
    # the same weights written WITHOUT the converter's permutation are read as if permuted:
    # the loader's un-permutation then scrambles Q/K and the logits disagree
    _, weights = tiny_llama
    path = write_tiny_gguf(tmp_path / "unpermuted.gguf", weights, permute=False)
    logits, _ = Model.load(path).forward([3, 17, 200, 5, 5, 99])
    expected = reference_logits(weights, [3, 17, 200, 5, 5, 99])
    assert np.abs(logits - expected).max() > 1e-2 * np.abs(expected).max()


def test_qwen2_biases_and_unpermuted_rows(tmp_path):
    weights = tiny_weights(1, biases=True)
    path = write_tiny_gguf(tmp_path / "tiny-qwen2.gguf", weights, architecture="qwen2",
                           permute=False)
    model = Model.load(path)
    assert model.config.architecture == "qwen2"
    ids = [1, 2, 3, 250, 4]
    expected = reference_logits(weights, ids)
    np.testing.assert_allclose(model.forward(ids)[0], expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())
    # qwen2 needs its biases
    del weights["blk.0.attn_q.bias"]
    with pytest.raises(ValueError, match="attn_q.bias"):
        Model.load(write_tiny_gguf(tmp_path / "no-bias.gguf", weights, "qwen2", permute=False))


def test_unpermute_inverts_the_converter(rng):
    w = rng.standard_normal((3 * 8, 5))
    np.testing.assert_array_equal(unpermute_qk_rows(hf_to_gguf_rows(w, 3), 3), w)
    # row 2i+s of a GGUF head is HF row s*d/2+i: GGUF rows 0,1 are HF rows 0 and 4 (d = 8)
    gguf_rows = hf_to_gguf_rows(w, 3)
    np.testing.assert_array_equal(gguf_rows[1], w[4])
    np.testing.assert_array_equal(gguf_rows[2], w[1])


def test_rope_is_complex_rotation_of_half_pairs(rng):
    d, positions = 16, np.array([0, 1, 7, 300])
    x = rng.standard_normal((2, positions.size, d)).astype(np.float32)
    cos, sin = rope_angles(positions, d, 10000.0)
    got = apply_rope(x, cos, sin)
    theta = 10000.0 ** (-np.arange(0, d, 2) / d)
    z = (x[..., : d // 2] + 1j * x[..., d // 2:]) * np.exp(1j * positions[:, None] * theta)
    np.testing.assert_allclose(got, np.concatenate([z.real, z.imag], axis=-1), atol=2e-5)
    # norms are kept, position 0 is the identity
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=1e-5)
    np.testing.assert_array_equal(got[:, 0], x[:, 0])
    # linear scaling divides the positions
    cos2, sin2 = rope_angles(positions * 4, d, 10000.0, scale=4.0)
    np.testing.assert_allclose(cos2, cos, atol=1e-6)


def test_attention_is_causal_and_grouped(rng):
    q = rng.standard_normal((6, 5, 4)).astype(np.float32)
    k = rng.standard_normal((2, 5, 4)).astype(np.float32)
    v = rng.standard_normal((2, 5, 4)).astype(np.float32)
    out = causal_attention(q, k, v)
    for head in range(6):
        kv = head // 3                       # 6 query heads over 2 KV heads: groups of 3
        for t in range(5):
            scores = k[kv, : t + 1] @ q[head, t] / 2.0
            p = np.exp(scores - scores.max())
            np.testing.assert_allclose(out[head, t], (p / p.sum()) @ v[kv, : t + 1], rtol=1e-5,
                                       atol=1e-6)


def test_future_tokens_do_not_change_past_logits(tiny_llama):
    model, _ = tiny_llama
    a, _ = model.forward([5, 6, 7, 8, 9, 10])
    b, _ = model.forward([5, 6, 7, 200, 201, 202])
    np.testing.assert_allclose(a[:3], b[:3], rtol=1e-6, atol=1e-6)
    assert np.abs(a[3:] - b[3:]).max() > 1e-3


def test_incremental_cache_equals_full_forward(tiny_llama):
    model, _ = tiny_llama
    ids = [11, 12, 13, 14, 15, 16, 17]
    full, _ = model.forward(ids)
    _, cache = model.forward(ids[:4], capture=True)
    rest, _ = model.forward(ids[4:], cache=cache)
    np.testing.assert_allclose(rest, full[4:], rtol=1e-5, atol=1e-5)
    # greedy generation follows the argmax of the full forward
    produced = model.generate(ids, 3)
    extended, _ = model.forward(list(ids) + produced[:2].tolist())
    assert produced[0] == np.argmax(full[-1])
    assert produced[1:].tolist() == np.argmax(extended[-2:], axis=-1).tolist()


def test_capture_and_kv_transform(tiny_llama):
    model, _ = tiny_llama
    ids = [1, 2, 3, 4, 5]
    _, caches = model.forward(ids, capture=True)
    assert caches[0].q.shape == (4, 5, 8) and caches[0].k.shape == (2, 5, 8)
    # post-RoPE keys are the pre-RoPE keys rotated
    cos, sin = rope_angles(np.arange(5), 8, 500.0)
    np.testing.assert_allclose(caches[1].k, apply_rope(caches[1].k_pre, cos, sin), atol=1e-6)
    seen = []

    def zero_values(layer, k, v):
        seen.append((layer, k.shape, v.shape))
        return k, np.zeros_like(v)

    changed, caches2 = model.forward(ids, kv_transform=zero_values, capture=True)
    assert seen == [(0, (2, 5, 8), (2, 5, 8)), (1, (2, 5, 8), (2, 5, 8))]
    assert (caches2[0].v == 0).all()
    assert not np.allclose(changed, model.forward(ids)[0])


def test_bad_files_and_inputs(tiny_llama, tmp_path):
    model, weights = tiny_llama
    with pytest.raises(ValueError, match="does not exist"):
        Model.load(tmp_path / "missing.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="not a GGUF file"):
        Model.load(tmp_path / "empty.gguf")
    (tmp_path / "text.gguf").write_text("hello, not a model")
    with pytest.raises(ValueError, match="not a GGUF file"):
        Model.load(tmp_path / "text.gguf")
    whole = Path(model.source).read_bytes()
    for cut in (8, 100, len(whole) // 2, len(whole) - 7):
        (tmp_path / "cut.gguf").write_bytes(whole[:cut])
        with pytest.raises(ValueError, match="damaged or truncated|lacks|GGUF"):
            Model.load(tmp_path / "cut.gguf")
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        Model.load(write_tiny_gguf(tmp_path / "gpt2.gguf", weights, architecture="gpt2"))
    with pytest.raises(ValueError, match="exceed the model's context of 24"):
        model.forward(list(range(25)))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 260\)"):
        model.forward([1, 260])
    with pytest.raises(ValueError, match="non-empty 1-D integer"):
        model.forward([])


# ------------------------------------------------------------------------------------------
# the real model, when its file is cached


def smollm2_path() -> Path | None:
    from latkv.llm.fetch import cached_path

    path = Path(os.environ.get("LATKV_SMOLLM2_GGUF") or cached_path("smollm2"))
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF not cached: run `latkv model fetch smollm2` (about 98 MB)")
    return Model.load(path)


def test_smollm2_perplexity_and_continuation(smollm2):
    import json

    from latkv.perplexity import perplexity

    text = json.__doc__ + "\n" + json.dumps.__doc__
    ids = smollm2.tokenizer.encode(text)
    assert smollm2.tokenizer.decode(ids) == text
    # a correct forward gives about 10-25 on docstrings; a wrong RoPE pairing about 200-300
    result = perplexity(smollm2, ids[:256], window=256)
    assert 3 < result["perplexity"] < 30
    prompt = smollm2.tokenizer.encode("The capital of France is")
    continuation = smollm2.tokenizer.decode(smollm2.generate(prompt, 4))
    assert "Paris" in continuation
