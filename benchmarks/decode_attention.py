"""One decode step of attention over a long cache: from codes vs float16 (CPU).

A cache of ``--tokens`` tokens (batch 1, 8 KV heads, GQA 4: 32 query heads, head dim 128,
the shape of Llama-3-8B's layers) holds keys and values as 4-bit or 2-bit TurboQuant codes, or
KIVI keys with TurboQuant values (`PAIRS`; `latkv.KVCache`, the newest ``--residual`` tokens in
float16). One step attends a single new
query position. It is timed against dense attention over the same cache kept in float16
(NumPy: convert to float32, BLAS matmuls, float32 softmax: what NumPy offers), and against
the cache's unfused path (scores and value sums per quantizer). Each configuration is checked
first: its output against float64 attention over the decoded cache. Rounds are interleaved
(``--rounds``, median reported), and every figure is a ratio measured in the same run.

    OPENBLAS_NUM_THREADS=1 python benchmarks/decode_attention.py [--quick]
        [--json benchmarks/results/decode_attention.json]

Run it with ``OPENBLAS_NUM_THREADS=1`` (the JSON records the setting): on 2 cores an OpenBLAS
pool spinning after each matmul starves numba's threads (and the other way round), which
makes both paths erratic. The baseline's work is a float16->float32 conversion (NumPy, one
thread) and matrix-vector products, memory-bound either way.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

import latkv
from latkv.cli import machine_description

KV_HEADS, GROUP, DIM = 8, 4, 128
#: 4- and 2-bit TurboQuant keys and values, and KIVI's per-channel keys (one group per block)
#: with 3-bit TurboQuant values (the fixed-rate pair the KV cache page recommends)
PAIRS = ("turbo:4|turbo:4", "turbo:2|turbo:2", "scalar:4,axis=channel,group=128|turbo:3")


def dense_fp16_attention(q: np.ndarray, keys16: np.ndarray, values16: np.ndarray) -> np.ndarray:
    """The baseline: ``softmax(q K^T / sqrt(d)) V`` from float16 K, V (float32 compute)."""
    batch, heads, _, dim = keys16.shape
    grouped = q.astype(np.float32).reshape(batch, heads, -1, dim)
    logits = grouped @ np.swapaxes(keys16.astype(np.float32), -1, -2)
    logits *= np.float32(1 / np.sqrt(dim))
    logits -= logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    weights /= weights.sum(axis=-1, keepdims=True)
    return (weights @ values16.astype(np.float32)).reshape(q.shape)


def float64_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    batch, heads, _, dim = keys.shape
    grouped = q.astype(np.float64).reshape(batch, heads, -1, dim)
    logits = grouped @ np.swapaxes(keys.astype(np.float64), -1, -2) / np.sqrt(dim)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return (weights @ values.astype(np.float64)).reshape(q.shape)


def timed(function: Callable[[], Any]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measure(tokens: int, key_spec: str, value_spec: str, rounds: int, residual: int,
            block: int, rng: np.random.Generator) -> dict[str, Any]:
    keys = rng.standard_normal((1, KV_HEADS, tokens, DIM)).astype(np.float32)
    keys += 2 * rng.standard_normal((1, KV_HEADS, 1, DIM)).astype(np.float32)  # channel offsets
    values = rng.standard_normal((1, KV_HEADS, tokens, DIM)).astype(np.float32)
    q = (2 * rng.standard_normal((1, KV_HEADS * GROUP, 1, DIM))).astype(np.float32)
    keys16, values16 = keys.astype(np.float16), values.astype(np.float16)
    key_quantizer = latkv.quantizer(key_spec, dim=DIM)
    value_quantizer = latkv.quantizer(value_spec, dim=DIM)
    cache = latkv.KVCache(key_quantizer, value_quantizer, residual=residual, block=block)
    build = timed(lambda: cache.append(keys16, values16))
    assert cache.fused

    # correctness first: the fused step against float64 attention over the decoded cache
    # (decoded in float32: the codes record float16 input, and decode would round to it)
    decoded_k = np.concatenate([key_quantizer.decode(replace(c, dtype="float32"))
                                for c in cache.key_blocks]
                               + [keys16[:, :, cache.compressed_tokens:]], axis=2)
    decoded_v = np.concatenate([value_quantizer.decode(replace(c, dtype="float32"))
                                for c in cache.value_blocks]
                               + [values16[:, :, cache.compressed_tokens:]], axis=2)
    expected = float64_attention(q, decoded_k, decoded_v)
    fused = cache.attention(q)
    error = float(np.abs(fused - expected).max() / np.abs(expected).max())
    if error > 1e-4:
        raise AssertionError(f"fused step differs from the decoded cache's attention: {error}")
    baseline = dense_fp16_attention(q, keys16, values16)

    runs: dict[str, Callable[[], Any]] = {
        "fp16_dense": lambda: dense_fp16_attention(q, keys16, values16),
        "fused_numba": lambda: cache.attention(q),
        "unfused_numba": lambda: cache.attention(q, fused=False),
    }
    if tokens <= 16384:
        runs["fused_numpy_reference"] = lambda: cache.attention(q, backend="numpy")
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for name, run in runs.items():                      # warm-up (numba compiles, caches)
        run()
    for _ in range(rounds):                             # interleaved rounds
        for name, run in runs.items():
            seconds[name].append(timed(run))
    median = {name: float(np.median(times)) for name, times in seconds.items()}
    fp16_bytes = keys16.nbytes + values16.nbytes
    return {
        "tokens": tokens, "keys": key_quantizer.spec, "values": value_quantizer.spec,
        "label": f"K {key_spec} | V {value_spec}", "kv_heads": KV_HEADS,
        "q_heads": KV_HEADS * GROUP,
        "dim": DIM, "residual": residual, "block": block,
        "bits_per_coordinate": (key_quantizer.bits_per_coordinate
                                + value_quantizer.bits_per_coordinate) / 2,
        "cache_bytes": cache.nbytes, "fp16_bytes": fp16_bytes,
        "memory_vs_fp16": cache.nbytes / fp16_bytes,
        "max_relative_error_vs_decoded_float64": error,
        "output_relative_error_vs_fp16_cache": float(
            np.linalg.norm(fused - baseline) / np.linalg.norm(baseline)),
        "build_seconds": build,
        "median_seconds": median,
        "spread_seconds": {name: [float(min(t)), float(max(t))] for name, t in seconds.items()},
        "time_vs_fp16_dense": {name: median[name] / median["fp16_dense"] for name in median},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="4096,16384,65536")
    parser.add_argument("--pairs", default=";".join(PAIRS),
                        help="';'-separated KEY|VALUE specs (keys: TurboQuant or per-channel "
                             "ScalarQuant with group = --block; values: TurboQuant)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--residual", type=int, default=128)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="1k and 2k tokens, 3 rounds")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    token_counts = [int(t) for t in args.tokens.split(",")]
    rounds = args.rounds
    if args.quick:
        token_counts, rounds = [1024, 2048], min(rounds, 3)
    rng = np.random.default_rng(0)
    rows = []
    for tokens in token_counts:
        for pair in args.pairs.split(";"):
            key_spec, _, value_spec = pair.partition("|")
            row = measure(tokens, key_spec, value_spec, rounds, args.residual, args.block, rng)
            rows.append(row)
            ratios = "  ".join(f"{k} {v:.2f}x" for k, v in row["time_vs_fp16_dense"].items())
            print(f"{tokens:6d} tokens, {row['label']}: memory {row['memory_vs_fp16']:.3f}x fp16; "
                  f"time vs fp16 dense: {ratios} (fp16 {row['median_seconds']['fp16_dense']*1e3:.1f} ms)",
                  flush=True)
    result = {"machine": machine_description(), "date": time.strftime("%Y-%m-%d"),
              "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
              "rounds": rounds, "rows": rows}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
