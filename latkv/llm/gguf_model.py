"""Read a Llama-family decoder from a GGUF file: configuration, float32 weights, tokenizer.

Tensors are dequantized to float32 with the ``gguf`` package's own dequantizer
(``gguf.quants.dequantize``), so every GGML quantization type it knows (F32, F16, BF16,
Q4_0, Q4_1, Q8_0, K-quants, ...) is read the way llama.cpp defines it.

Q/K row order
-------------
For ``llama`` models, llama.cpp's converter (``convert_hf_to_gguf.py``, ``LlamaModel.permute``)
reorders the rows of ``attn_q`` and ``attn_k`` inside each head from the HuggingFace layout,
where RoPE rotates the pairs ``(i, i + d/2)`` ("rotate half"), to an interleaved layout where
it rotates the adjacent pairs ``(2i, 2i + 1)``: HF row ``s * d/2 + i`` becomes GGUF row
``2 i + s``. `load_model` undoes that permutation, so the runner uses rotate-half RoPE and
**the queries and keys it produces (and `latkv capture` saves) are in the HuggingFace channel
order**, the order KV-cache papers and other toolkits see. ``qwen2`` weights are not permuted
by the converter (llama.cpp runs them with NeoX-style, i.e. rotate-half, RoPE) and are used as
they are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: architectures the runner implements: the GGUF ``general.architecture`` values
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a decoder, read from the GGUF metadata.

    Attributes
    ----------
    architecture : str
        ``"llama"`` or ``"qwen2"``.
    n_layers, hidden, ffn_hidden, n_heads, n_kv_heads, head_dim, vocab_size, context_length : int
    rope_base : float
        ``theta`` of RoPE: frequency ``theta ** (-2 i / rope_dim)`` for pair ``i``.
    rope_dim : int
        Leading channels of each head that RoPE rotates (``head_dim`` for these models).
    rope_scale : float
        Linear RoPE scaling factor (positions are divided by it); 1 without scaling.
    norm_eps : float
        RMSNorm epsilon.
    name : str
        ``general.name``.

    Examples
    --------
    `Model.load` reads it from a GGUF file (`read_config`); SmolLM2-135M has 9 query heads
    sharing 3 KV heads:

    >>> from latkv.llm import Model
    >>> Model.load("SmolLM2-135M-Instruct.Q4_1.gguf").config.group_size  # doctest: +SKIP
    3

    It can also be written out, e.g. for a tiny random `Model`:

    >>> from latkv.llm import ModelConfig
    >>> config = ModelConfig("llama", n_layers=1, hidden=16, ffn_hidden=32, n_heads=4,
    ...                      n_kv_heads=2, head_dim=8, vocab_size=40, context_length=64,
    ...                      rope_base=10000.0, rope_dim=8, rope_scale=1.0, norm_eps=1e-5)
    >>> config.group_size, config.name
    (2, '')
    """

    architecture: str
    n_layers: int
    hidden: int
    ffn_hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rope_base: float
    rope_dim: int
    rope_scale: float
    norm_eps: float
    name: str = ""

    @property
    def group_size(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads


@dataclass
class LayerWeights:
    """float32 weights of one decoder block; matrices are ``(out, in)``: ``y = x @ w.T``."""

    attn_norm: np.ndarray
    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    ffn_norm: np.ndarray
    w_gate: np.ndarray
    w_up: np.ndarray
    w_down: np.ndarray
    bq: np.ndarray | None = None
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None


@dataclass
class ModelWeights:
    """All float32 weights: embeddings ``(vocab, hidden)``, blocks, final norm, output."""

    token_embedding: np.ndarray
    layers: list[LayerWeights]
    output_norm: np.ndarray
    output: np.ndarray = field(repr=False)  # (vocab, hidden); the embedding when tied
    tied_output: bool = False


def _field(reader: Any, name: str, required: bool = True, default: Any = None) -> Any:
    entry = reader.fields.get(name)
    if entry is None:
        if required:
            raise ValueError(f"GGUF metadata lacks {name!r}")
        return default
    return entry.contents()


def open_gguf(path: str | os.PathLike) -> Any:
    """Open ``path`` with ``gguf.GGUFReader`` after checking it exists and is a GGUF file.

    Raises ``ValueError`` for a missing, empty, foreign or truncated file.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model file {str(path)!r} does not exist")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{str(path)!r} is not a GGUF file (starts with {magic!r}, "
                         f"expected {GGUF_MAGIC!r})")
    try:
        return gguf.GGUFReader(path)
    except Exception as error:  # gguf raises ValueError, IndexError, struct errors on damage
        raise ValueError(f"{str(path)!r} is a damaged or truncated GGUF file: "
                         f"{type(error).__name__}: {error}") from None


def read_config(reader: Any) -> ModelConfig:
    """`ModelConfig` from the metadata; ``ValueError`` for an unsupported architecture."""
    architecture = str(_field(reader, "general.architecture"))
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {architecture!r}: latkv.llm runs "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    a = architecture
    n_heads = int(_field(reader, f"{a}.attention.head_count"))
    n_kv_heads = int(_field(reader, f"{a}.attention.head_count_kv", False, n_heads))
    hidden = int(_field(reader, f"{a}.embedding_length"))
    head_dim = int(_field(reader, f"{a}.attention.key_length", False, hidden // n_heads))
    if n_heads % n_kv_heads:
        raise ValueError(f"head_count {n_heads} is not a multiple of head_count_kv {n_kv_heads}")
    scaling = str(_field(reader, f"{a}.rope.scaling.type", False, "none"))
    if scaling not in ("none", "linear"):
        raise ValueError(f"unsupported RoPE scaling {scaling!r} (latkv.llm supports none, linear)")
    rope_scale = 1.0
    if scaling == "linear":
        rope_scale = float(_field(reader, f"{a}.rope.scaling.factor", False, 1.0))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = int(_field(reader, f"{a}.vocab_size", False, len(tokens.data) if tokens else 0))
    return ModelConfig(
        architecture=architecture,
        n_layers=int(_field(reader, f"{a}.block_count")),
        hidden=hidden,
        ffn_hidden=int(_field(reader, f"{a}.feed_forward_length")),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        context_length=int(_field(reader, f"{a}.context_length")),
        rope_base=float(_field(reader, f"{a}.rope.freq_base", False, 10000.0)),
        rope_dim=int(_field(reader, f"{a}.rope.dimension_count", False, head_dim)),
        rope_scale=rope_scale,
        norm_eps=float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon")),
        name=str(_field(reader, "general.name", False, "")),
    )


def unpermute_qk_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: GGUF row ``2 i + s`` -> HF row ``s * d/2 + i``.

    ``weight : (n_heads * d, ...)`` (a matrix or a bias); returns a new array.
    """
    rows = weight.shape[0]
    head_dim = rows // n_heads
    rest = weight.shape[1:]
    return np.ascontiguousarray(
        weight.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest))


def read_weights(reader: Any, config: ModelConfig) -> ModelWeights:
    """Dequantize every tensor the forward needs to float32 and check its shape."""
    from gguf.quants import dequantize

    tensors = {tensor.name: tensor for tensor in reader.tensors}

    def tensor(name: str, shape: tuple[int, ...], required: bool = True) -> np.ndarray | None:
        if name not in tensors:
            if required:
                raise ValueError(f"GGUF file lacks tensor {name!r}")
            return None
        item = tensors[name]
        try:
            values = dequantize(item.data, item.tensor_type)
        except Exception as error:
            raise ValueError(f"cannot dequantize {name!r} ({item.tensor_type.name}): {error}") \
                from None
        values = np.asarray(values, dtype=np.float32).reshape(values.shape)
        if values.shape != shape:
            raise ValueError(f"tensor {name!r} has shape {values.shape}, expected {shape}")
        if not np.isfinite(values).all():
            raise ValueError(f"tensor {name!r} contains NaN or Inf")
        return values

    c = config
    q_rows, kv_rows = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    permuted = c.architecture == "llama"
    layers = []
    for index in range(c.n_layers):
        p = f"blk.{index}."
        wq = tensor(p + "attn_q.weight", (q_rows, c.hidden))
        wk = tensor(p + "attn_k.weight", (kv_rows, c.hidden))
        bq = tensor(p + "attn_q.bias", (q_rows,), required=c.architecture == "qwen2")
        bk = tensor(p + "attn_k.bias", (kv_rows,), required=c.architecture == "qwen2")
        if permuted:
            wq, wk = unpermute_qk_rows(wq, c.n_heads), unpermute_qk_rows(wk, c.n_kv_heads)
            bq = None if bq is None else unpermute_qk_rows(bq, c.n_heads)
            bk = None if bk is None else unpermute_qk_rows(bk, c.n_kv_heads)
        layers.append(LayerWeights(
            attn_norm=tensor(p + "attn_norm.weight", (c.hidden,)),
            wq=wq, wk=wk,
            wv=tensor(p + "attn_v.weight", (kv_rows, c.hidden)),
            wo=tensor(p + "attn_output.weight", (c.hidden, q_rows)),
            ffn_norm=tensor(p + "ffn_norm.weight", (c.hidden,)),
            w_gate=tensor(p + "ffn_gate.weight", (c.ffn_hidden, c.hidden)),
            w_up=tensor(p + "ffn_up.weight", (c.ffn_hidden, c.hidden)),
            w_down=tensor(p + "ffn_down.weight", (c.hidden, c.ffn_hidden)),
            bq=bq, bk=bk,
            bv=tensor(p + "attn_v.bias", (kv_rows,), required=c.architecture == "qwen2"),
        ))
    embedding = tensor("token_embd.weight", (c.vocab_size, c.hidden))
    output = tensor("output.weight", (c.vocab_size, c.hidden), required=False)
    return ModelWeights(
        token_embedding=embedding,
        layers=layers,
        output_norm=tensor("output_norm.weight", (c.hidden,)),
        output=embedding if output is None else output,
        tied_output=output is None,
    )
