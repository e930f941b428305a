"""Capture real KV caches from a GGUF model: ``latkv capture`` and the embedded sample.

The text is tokenized once and cut into chunks of ``chunk_tokens`` consecutive tokens; each
chunk is an independent sequence (positions from 0, causal attention inside the chunk). The
arrays of all chunks are concatenated along the token axis and ``chunk_offsets`` marks where
each chunk starts:

``q_L{l}`` : (q_heads, T, d)
    Post-RoPE queries of layer ``l``.
``k_L{l}``, ``k_pre_L{l}`` : (kv_heads, T, d)
    Keys after and before RoPE. Channel order is HuggingFace's: RoPE rotates the pairs
    ``(i, i + d/2)`` (see `latkv.llm.gguf_model`).
``v_L{l}`` : (kv_heads, T, d)
    Values.
``chunk_offsets`` : (n_chunks + 1,) int64
    Chunk ``c`` is tokens ``[chunk_offsets[c], chunk_offsets[c + 1])``.
``token_ids`` : (T,) int32
``metadata`` : 0-d str
    JSON: model name, file and SHA-256, architecture, layers captured, chunking, text source
    and the SHA-256 of the text.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

#: stdlib modules whose documentation is the default text: present wherever Python is
DEFAULT_TEXT_MODULES = ("json", "collections", "functools", "itertools", "textwrap", "argparse",
                        "pathlib", "dataclasses", "heapq", "bisect", "contextlib", "string",
                        "fractions", "statistics", "shutil", "csv", "logging", "difflib")


def default_text() -> tuple[str, str]:
    """``(text, source)``: docstrings of `DEFAULT_TEXT_MODULES` and their public members."""
    parts = []
    for name in DEFAULT_TEXT_MODULES:
        module = importlib.import_module(name)
        doc = inspect.getdoc(module)
        if doc:
            parts.append(doc)
        for member_name in sorted(getattr(module, "__all__", [])):
            member = getattr(module, member_name, None)
            member_doc = inspect.getdoc(member) if member is not None else None
            if member_doc and (inspect.isclass(member) or inspect.isfunction(member)):
                parts.append(f"{member_name}: {member_doc}")
    source = "docstrings of Python stdlib modules " + ", ".join(DEFAULT_TEXT_MODULES)
    return "\n\n".join(parts), source


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def capture_kv(model: Any, ids: Any, *, chunk_tokens: int = 256, chunks: int | None = None,
               layers: Iterable[int] | None = None, dtype: Any = np.float32,
               progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """Run ``model`` on consecutive chunks of ``ids`` and collect every layer's Q, K, V.

    Parameters
    ----------
    model : latkv.llm.Model
    ids : (N,) int
        Token ids; the first ``chunks * chunk_tokens`` are used (all whole chunks by default).
    chunk_tokens : int
        Tokens per chunk (each chunk is its own sequence; at most the model's context).
    chunks : int, optional
        How many chunks (default: as many whole chunks as ``ids`` holds).
    layers : iterable of int, optional
        Layers to keep (default all).
    dtype : float16 or float32
        Stored dtype of the arrays.
    progress : callable, optional
        Called as ``progress(done, total)`` after each chunk.

    Returns
    -------
    dict of arrays in the layout of the module docstring (without ``metadata``).

    Examples
    --------
    A tiny random decoder stands in for a real one (``Model.load(path)``): 1 layer, 4 query
    and 2 KV heads of dimension 8, 40 tokens.

    >>> import numpy as np, latkv
    >>> from latkv.llm import Model
    >>> model = Model.random(seed=0)
    >>> rng = np.random.default_rng(1)
    >>> ids = np.arange(30)
    >>> data = capture_kv(model, ids, chunk_tokens=10, chunks=3)
    >>> sorted(data)
    ['chunk_offsets', 'k_L0', 'k_pre_L0', 'q_L0', 'token_ids', 'v_L0']
    >>> data["q_L0"].shape, data["k_L0"].shape, data["chunk_offsets"].tolist()
    ((4, 30, 8), (2, 30, 8), [0, 10, 20, 30])
    >>> _, caches = model.forward(ids[20:30], capture=True)     # chunk 2: its own sequence
    >>> bool((data["k_L0"][:, 20:30] == caches[0].k).all())
    True
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    if chunk_tokens < 2:
        raise ValueError(f"chunk_tokens must be >= 2, got {chunk_tokens}")
    if chunk_tokens > model.config.context_length:
        raise ValueError(f"chunk_tokens {chunk_tokens} exceeds the model's context of "
                         f"{model.config.context_length}")
    available = ids.size // chunk_tokens
    if chunks is None:
        chunks = available
    if chunks < 1 or chunks > available:
        raise ValueError(f"the text has {ids.size} tokens: {available} whole chunks of "
                         f"{chunk_tokens}, cannot take {chunks}")
    n_layers = model.config.n_layers
    layers = list(range(n_layers)) if layers is None else sorted(set(int(i) for i in layers))
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise ValueError(f"layers must lie in [0, {n_layers}), got {layers}")
    collected: dict[str, list[np.ndarray]] = {}
    for chunk in range(chunks):
        piece = ids[chunk * chunk_tokens : (chunk + 1) * chunk_tokens]
        _, caches = model.forward(piece, capture=True, logits="last")
        for layer in layers:
            cache = caches[layer]
            for name, array in (("q", cache.q), ("k", cache.k), ("k_pre", cache.k_pre),
                                ("v", cache.v)):
                collected.setdefault(f"{name}_L{layer}", []).append(array.astype(dtype))
        if progress is not None:
            progress(chunk + 1, chunks)
    data = {key: np.concatenate(parts, axis=1) for key, parts in collected.items()}
    data["chunk_offsets"] = np.arange(chunks + 1, dtype=np.int64) * chunk_tokens
    data["token_ids"] = ids[: chunks * chunk_tokens].astype(np.int32)
    return data


def capture_metadata(model: Any, *, text: str, source: str, chunk_tokens: int, chunks: int,
                     layers: list[int], dtype: Any, model_name: str) -> dict[str, Any]:
    """Provenance of a capture (stored as JSON in ``metadata``)."""
    from latkv.llm.fetch import file_sha256

    path = Path(model.source)
    return {
        "format": "latkv-kv-capture/1",
        "model": model_name,
        "model_file": path.name,
        "model_sha256": file_sha256(path) if path.is_file() else None,
        "model_config": {key: value for key, value in vars(model.config).items()},
        "layers": layers,
        "chunk_tokens": chunk_tokens,
        "chunks": chunks,
        "dtype": np.dtype(dtype).name,
        "text_source": source,
        "text_sha256": text_sha256(text),
        "channel_order": "huggingface (RoPE pairs (i, i + d/2))",
        "bos": False,
    }


def save_capture(path: str | os.PathLike, data: dict[str, np.ndarray],
                 metadata: dict[str, Any]) -> None:
    """Write ``data`` and ``metadata`` to an ``.npz`` atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(data)
    arrays["metadata"] = np.array(json.dumps(metadata, sort_keys=True))
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
    os.close(handle)
    try:
        np.savez_compressed(temporary, **arrays)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def read_metadata(data: dict[str, np.ndarray]) -> dict[str, Any]:
    """The JSON ``metadata`` of a capture, or ``{}`` when it has none."""
    if "metadata" not in data:
        return {}
    try:
        return json.loads(str(data["metadata"]))
    except json.JSONDecodeError as error:
        raise ValueError(f"capture metadata is not valid JSON: {error}") from None
