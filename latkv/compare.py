"""Compare quantizers on a KV set: exact bits, distortion, logits, attention outputs, speed.

A KV set maps ``k_L{i}``, ``v_L{i}`` : ``(kv_heads, tokens, dim)`` and ``q_L{i}`` :
``(q_heads, queries, dim)`` for each layer ``i`` (the layout of ``--kv file.npz`` and of
`latkv.capture`); the queries are the last ``queries`` positions and attend causally. An
optional ``chunk_offsets`` (captures of several independent sequences concatenated along the
tokens; queries then cover every token) splits the arrays into chunks that are encoded and
measured separately, each with its own causal attention. Other arrays (``k_pre_L{i}``,
``token_ids``, ``metadata``) are ignored. Every method is measured on the same arrays.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from latkv import metrics
from latkv.quantizer import Quantizer
from latkv.registry import METHODS, parse_spec, quantizer

FP16 = "fp16"
_LAYER_KEY = re.compile(r"^([kvq])_L(\d+)$")


def check_kv(data: dict[str, np.ndarray], source: str = "kv") -> list[int]:
    """Validate a KV set; return its layer indices in order."""
    layers: dict[int, set[str]] = {}
    for key in data:
        match = _LAYER_KEY.match(key)
        if match:
            layers.setdefault(int(match.group(2)), set()).add(match.group(1))
    if not layers:
        raise ValueError(f"{source} holds no arrays named k_L<i>, v_L<i>, q_L<i>")
    for layer, kinds in sorted(layers.items()):
        if kinds != {"k", "v", "q"}:
            raise ValueError(f"{source} layer {layer} needs k_L{layer}, v_L{layer} and q_L{layer}, "
                             f"found {sorted(kinds)}")
        k, v, q = (data[f"{kind}_L{layer}"] for kind in "kvq")
        for name, array in (("k", k), ("v", v), ("q", q)):
            if array.ndim != 3 or array.dtype.kind != "f":
                raise ValueError(f"{source} {name}_L{layer} must be a 3-D float array "
                                 f"(heads, tokens, dim), got {array.dtype} {array.shape}")
            if not np.isfinite(array).all():
                raise ValueError(f"{source} {name}_L{layer} contains NaN or Inf")
        if k.shape != v.shape:
            raise ValueError(f"{source} layer {layer}: k {k.shape} and v {v.shape} differ")
        if q.shape[-1] != k.shape[-1] or q.shape[0] % k.shape[0] or q.shape[1] > k.shape[1]:
            raise ValueError(f"{source} layer {layer}: q {q.shape} does not fit k {k.shape} "
                             "(same dim, q_heads a multiple of kv_heads, queries <= tokens)")
    offsets = data.get("chunk_offsets")
    if offsets is not None:
        tokens = data[f"k_L{min(layers)}"].shape[1]
        offsets = np.asarray(offsets)
        if (offsets.ndim != 1 or offsets.size < 2 or offsets.dtype.kind not in "iu"
                or offsets[0] != 0 or offsets[-1] != tokens or (np.diff(offsets) <= 0).any()):
            raise ValueError(f"{source} chunk_offsets must rise strictly from 0 to the "
                             f"{tokens} tokens, got {offsets.tolist()[:8]}")
        for layer in layers:
            if data[f"q_L{layer}"].shape[1] != tokens:
                raise ValueError(f"{source} q_L{layer} must cover all {tokens} tokens when "
                                 "chunk_offsets is given")
    return sorted(layers)


def chunk_bounds(data: dict[str, np.ndarray], layer: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` token ranges of the independent sequences in ``data``."""
    offsets = data.get("chunk_offsets")
    if offsets is None:
        return [(0, data[f"k_L{layer}"].shape[1])]
    offsets = np.asarray(offsets).tolist()
    return list(zip(offsets[:-1], offsets[1:]))


def load_kv(path: str | Path) -> dict[str, np.ndarray]:
    """Read and validate a KV set from an ``.npz`` file."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            data = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read KV set {str(path)!r}: {error}") from None
    check_kv(data, str(path))
    return data


def expand_specs(specs: Iterable[str], bits: Iterable[int]) -> list[str]:
    """Specs without their main value (``"scalar,axis=channel"``) get one per bit width.

    ``"KEY_SPEC|VALUE_SPEC"`` gives keys and values their own quantizers; both sides are
    expanded with the same bit width.
    """
    bits = list(bits)
    expanded: list[str] = []
    for spec in specs:
        if "|" in spec:
            key_spec, _, value_spec = spec.partition("|")
            keys, values = expand_specs([key_spec], bits), expand_specs([value_spec], bits)
            if len(keys) != len(values):
                raise ValueError(f"spec pair {spec!r}: give both sides a value or neither")
            expanded.extend(f"{k}|{v}" for k, v in zip(keys, values))
            continue
        if spec == FP16:
            expanded.append(spec)
            continue
        name, arguments = parse_spec(spec)
        main = METHODS[name].main_parameter
        if main in arguments:
            expanded.append(spec)
        else:
            head, *options = spec.split(",")
            expanded.extend(",".join([f"{head}:{b}", *options]) for b in bits)
    return expanded


def instantiate(spec: str, dim: int) -> str:
    """Fill the placeholders ``{dim}``, ``{2dim}``, ``{dim/2}`` of a template (``"qjl:{2dim}"``)."""
    return (spec.replace("{2dim}", str(2 * dim)).replace("{dim/2}", str(dim // 2))
            .replace("{dim}", str(dim)))


def default_specs() -> list[str]:
    """One spec template per registered method variant (each class's ``compare_specs``).

    Templates may hold ``{dim}``, ``{2dim}`` or ``{dim/2}`` (`instantiate`): QJL's sketch sizes are
    relative to the head dimension of the data.
    """
    specs = [FP16]
    for cls in METHODS.values():
        specs.extend(getattr(cls, "compare_specs", (cls.name,)))
    return specs


def _fp16_row(data: dict[str, np.ndarray], layers: list[int]) -> dict[str, Any]:
    return _measure(FP16, None, None, data, layers, None)


def _measure(label: str, key_quantizer: Quantizer | None, value_quantizer: Quantizer | None,
             data: dict[str, np.ndarray], layers: list[int], backend: str | None) -> dict[str, Any]:
    key_errors, value_errors, logit_errors, output_errors, agreements = [], [], [], [], []
    encode_seconds, vectors, stored_bytes, coordinates = 0.0, 0, 0, 0
    pieces = [(layer, start, stop) for layer in layers
              for start, stop in chunk_bounds(data, layer)]
    for layer, start, stop in pieces:
        k, v = (np.asarray(data[f"{kind}_L{layer}"][:, start:stop], np.float32) for kind in "kv")
        q = np.asarray(data[f"q_L{layer}"], np.float32)
        if "chunk_offsets" in data:
            q = q[:, start:stop]
        kv_heads, tokens, dim = k.shape
        group = q.shape[0] // kv_heads
        queries = metrics.grouped_queries(q, kv_heads)
        mask = metrics.causal_mask(q.shape[1], tokens, group)
        logits = queries @ np.swapaxes(k, -1, -2) / np.sqrt(dim)
        if key_quantizer is None:
            k_hat = k.astype(np.float16).astype(np.float32)
            v_hat = v.astype(np.float16).astype(np.float32)
            logits_hat = queries @ np.swapaxes(k_hat, -1, -2) / np.sqrt(dim)
            stored_bytes += 2 * (k.nbytes + v.nbytes) // 4
        else:
            start = time.perf_counter()
            key_codes = key_quantizer.encode(k, backend=backend)
            value_codes = value_quantizer.encode(v, backend=backend)
            encode_seconds += time.perf_counter() - start
            k_hat = key_quantizer.decode(key_codes, backend=backend)
            v_hat = value_quantizer.decode(value_codes, backend=backend)
            logits_hat = key_quantizer.scores(queries, key_codes, backend=backend) / np.sqrt(dim)
            stored_bytes += key_codes.nbytes + value_codes.nbytes
        vectors += 2 * kv_heads * tokens
        coordinates += k.size + v.size
        key_errors.append(metrics.relative_mse(k, k_hat))
        value_errors.append(metrics.relative_mse(v, v_hat))
        logit_errors.append(metrics.centred_logit_error(logits, logits_hat, mask))
        output_errors.append(metrics.attention_output_error(logits, v, logits_hat, v_hat, mask))
        agreements.append(metrics.top_k_agreement(logits, logits_hat, 8, mask))
    return {
        "method": label,
        "spec": (f"{key_quantizer.spec}|{value_quantizer.spec}"
                 if key_quantizer is not None else FP16),
        "bits_per_coordinate": ((key_quantizer.bits_per_coordinate
                                 + value_quantizer.bits_per_coordinate) / 2
                                if key_quantizer is not None else 16.0),
        "measured_bits_per_coordinate": 8 * stored_bytes / coordinates,
        "key_relative_mse": float(np.mean(key_errors)),
        "value_relative_mse": float(np.mean(value_errors)),
        "logit_error": float(np.mean(logit_errors)),
        "attention_error": float(np.mean(output_errors)),
        "top8_agreement": float(np.mean(agreements)),
        "encode_mvectors_per_s": (vectors / encode_seconds / 1e6) if encode_seconds else None,
    }


def compare(specs: Iterable[str], data: dict[str, np.ndarray], *, bits: Iterable[int] = (2, 3, 4),
            backend: str | None = None,
            progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measure each spec on the KV set ``data``; one row (a dict) per expanded spec.

    Row fields: ``method``, ``spec``, ``bits_per_coordinate`` (the quantizer's exact figure),
    ``measured_bits_per_coordinate`` (bytes actually stored / coordinates), key and value
    relative MSE, ``logit_error`` (`latkv.metrics.centred_logit_error`, logits from
    ``scores``), ``attention_error`` (`latkv.metrics.attention_output_error`),
    ``top8_agreement`` and ``encode_mvectors_per_s``.

    Parameters
    ----------
    specs : iterable of str
        Spec strings (`latkv.quantizer`), ``"fp16"`` (the float16 baseline),
        ``"KEY_SPEC|VALUE_SPEC"`` pairs, and specs without their main value (expanded to one
        per ``bits``); ``{dim}``, ``{2dim}`` and ``{dim/2}`` stand for the head dimension.
    data : dict of str to array
        A KV set (module docstring): ``k_L{i}``, ``v_L{i}`` : (kv_heads, tokens, dim) and
        ``q_L{i}`` : (q_heads, queries, dim) float arrays, optionally ``chunk_offsets``.
    bits : iterable of int
        Bit widths for the specs without a main value.
    backend : str, optional
        Runs ``encode``, ``decode`` and ``scores``.
    progress : callable, optional
        Called with each expanded spec before it is measured.

    Returns
    -------
    list of dict
        One row per expanded spec, in order.

    Examples
    --------
    >>> from latkv.compare import compare
    >>> from latkv.synthetic import synthetic_kv
    >>> data = synthetic_kv(layers=1, tokens=64, queries=8, dim=64)
    >>> rows = compare(["fp16", "scalar,group=32", "turbo:4"], data, bits=(2, 4))
    >>> [(row["method"], row["measured_bits_per_coordinate"]) for row in rows]
    [('fp16', 16.0), ('scalar:2', 3.0), ('scalar:4', 5.0), ('turbo:4', 4.25)]
    >>> errors = [row["attention_error"] for row in rows]
    >>> bool(errors[0] < errors[3] < errors[1]), bool(errors[2] < errors[1])
    (True, True)
    """
    layers = check_kv(data)
    dim = data[f"k_L{layers[0]}"].shape[-1]
    rows = []
    for spec in expand_specs(specs, bits):
        spec = instantiate(spec, dim)
        if progress is not None:
            progress(spec)
        if spec == FP16:
            rows.append(_fp16_row(data, layers))
            continue
        key_spec, _, value_spec = spec.partition("|")
        key_quantizer = quantizer(key_spec, dim=dim)
        value_quantizer = quantizer(value_spec or key_spec, dim=dim)
        label = key_quantizer.label
        if value_spec:
            label = f"K {key_quantizer.label} | V {value_quantizer.label}"
        warm = data[f"k_L{layers[0]}"][:1, :8]
        for qz in (key_quantizer, value_quantizer):
            qz.decode(qz.encode(warm, backend=backend), backend=backend)  # compile before timing
        rows.append(_measure(label, key_quantizer, value_quantizer, data, layers, backend))
    return rows


#: bit budgets (measured bits per coordinate, keys and values together) of `best_at_budgets`
BUDGETS = (2.0, 2.5, 3.0, 3.5, 4.0, 5.0)


def best_at_budgets(rows: list[dict[str, Any]], budgets: Iterable[float] = BUDGETS,
                    metric: str = "attention_error") -> list[dict[str, Any]]:
    """For each budget, the measured row of least ``metric`` within it.

    A row fits a budget when its ``measured_bits_per_coordinate`` (everything stored, keys and
    values together) is at most the budget; the fp16 row is left out. Budgets no row fits are
    skipped. Returns ``{"budget", "method", "measured_bits_per_coordinate", metric}`` dicts.
    """
    best = []
    for budget in budgets:
        fitting = [row for row in rows if row["method"] != FP16
                   and row["measured_bits_per_coordinate"] <= budget + 1e-9]
        if fitting:
            row = min(fitting, key=lambda r: r[metric])
            best.append({"budget": budget, "method": row["method"],
                         "measured_bits_per_coordinate": row["measured_bits_per_coordinate"],
                         metric: row[metric]})
    return best
