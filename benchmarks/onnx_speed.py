"""ONNX Runtime running latkv's exported graphs vs latkv's own CPU path (numba).

For each quantizer in `SPECS` and each exported step (encode, decode, scores, attention), the
same inputs run through an onnxruntime CPU session of the standard-flavour graph, of the
custom-flavour graph (latkv itself inside an onnxruntime-extensions op; encode and attention
only, it is slow by construction) and through latkv (``backend="numba"``, the default for
NumPy inputs). KV-cache shapes: batch 1, 8 KV heads, ``--tokens`` tokens, head dim 128, and
for scores and attention 4 query rows per KV head (GQA 4, one decode step). Each entry is
checked first (codes bit-identical; values within float32 rounding), rounds are interleaved
(``--rounds``, median and spread), and every figure is a ratio measured in the same run:
onnxruntime's time over latkv's (below 1: onnxruntime is faster), plus latkv's time over
``astype(float16)`` of the same input as a memory-speed yardstick.

    OPENBLAS_NUM_THREADS=1 python benchmarks/onnx_speed.py [--quick]
        [--json benchmarks/results/onnx_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import latkv
import latkv.onnx
from latkv._backend import array_module
from latkv.cli import machine_description

KV_HEADS, GROUP, DIM = 8, 4, 128
SPECS = ("turbo:4", "turbo:2", "turbo:4,mode=prod", "turbo:4,center=True", "qjl:256",
         "scalar:4", "scalar:4,axis=channel,group=128", "polar", "e8:4")
WHATS = ("encode", "decode", "scores", "attention")


def softmax(logits: Any) -> Any:
    """Over the last axis, in the array's module (NumPy or CuPy: gpu_speed.py calls it too)."""
    xp = array_module(logits)
    logits = logits - logits.max(axis=-1, keepdims=True)
    weights = xp.exp(logits)
    return weights / weights.sum(axis=-1, keepdims=True)


def latkv_step(qz: Any, what: str, x: np.ndarray, q: np.ndarray, codes: Any) -> Callable:
    """latkv's own call for ``what`` (attention: its scores, softmax, weighted_sum)."""
    if what == "encode":
        return lambda: qz.encode(x)
    if what == "decode":
        return lambda: qz.decode(codes)
    if what == "scores":
        return lambda: qz.scores(q, codes)
    scale = np.float32(1 / np.sqrt(qz.dim))
    return lambda: qz.weighted_sum(softmax(qz.scores(q, codes) * scale), codes)


def feeds_for(what: str, x: np.ndarray, q: np.ndarray, codes: Any) -> dict[str, np.ndarray]:
    if what == "encode":
        return {"x": x}
    arrays = dict(codes.arrays)
    if what == "decode":
        return arrays
    if what == "scores":
        return {"q": q, **arrays}
    return {"q": q, **{"key_" + k: v for k, v in arrays.items()},
            **{"value_" + k: v for k, v in arrays.items()}}


def check(what: str, got: list[np.ndarray], expected: Any, codes: Any) -> None:
    """Codes bit-identical; values within float32 rounding of the largest magnitude."""
    if what == "encode":
        for array, name in zip(got, codes.arrays):
            if not np.array_equal(array, expected[name]):
                raise AssertionError(f"{name} differs from latkv's encode")
        return
    reference = np.asarray(expected, dtype=np.float64)
    error = np.abs(got[0] - reference).max()
    if error > 1e-4 * max(np.abs(reference).max(), 1e-30):
        raise AssertionError(f"{what} differs from latkv by {error}")


def timed(call: Callable) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def measure(spec: str, tokens: int, rounds: int) -> list[dict[str, Any]]:
    qz = latkv.quantizer(spec, dim=DIM)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, KV_HEADS, tokens, DIM)).astype(np.float32)
    q = rng.standard_normal((1, KV_HEADS, GROUP, DIM)).astype(np.float32)
    codes = qz.encode(x)
    entries = []
    for what in WHATS:
        calls: dict[str, Callable] = {"latkv": latkv_step(qz, what, x, q, codes),
                                      "astype_float16": lambda: x.astype(np.float16)}
        feeds = feeds_for(what, x, q, codes)
        skipped = {}
        for flavour in ("standard", "custom"):
            if flavour == "custom" and what in ("decode", "scores"):
                continue
            try:
                session = latkv.onnx.session(latkv.onnx.export(qz, what, flavour=flavour),
                                             providers=["CPUExecutionProvider"])
            except ValueError as error:
                skipped[flavour] = str(error)
                continue
            expected = calls["latkv"]()
            check(what, session.run(None, feeds), expected, codes)
            calls[f"onnxruntime_{flavour}"] = (
                lambda session=session, feeds=feeds: session.run(None, feeds))
        for call in calls.values():   # warm-up: numba compilation, ORT allocations
            call()
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                times[name].append(timed(call))
        medians = {name: float(np.median(t)) for name, t in times.items()}
        entry = {"spec": qz.label, "what": what, "tokens": tokens,
                 "seconds_median": medians,
                 "seconds_spread": {n: [float(min(t)), float(max(t))]
                                    for n, t in times.items()},
                 "latkv_over_astype_float16": medians["latkv"] / medians["astype_float16"],
                 "skipped": skipped}
        for flavour in ("standard", "custom"):
            name = f"onnxruntime_{flavour}"
            if name in medians:
                entry[f"{name}_over_latkv"] = medians[name] / medians["latkv"]
        entries.append(entry)
        ratios = {k: round(v, 2) for k, v in entry.items() if k.endswith("_over_latkv")}
        print(f"{qz.label:34s} {what:9s} latkv {medians['latkv'] * 1e3:8.2f} ms  {ratios}",
              flush=True)
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--specs", nargs="+", default=list(SPECS))
    parser.add_argument("--quick", action="store_true", help="small sizes, two specs")
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    specs = arguments.specs
    if arguments.quick:
        arguments.tokens, arguments.rounds, specs = 64, 2, ("turbo:4", "qjl:256")
    import onnxruntime

    entries = [e for spec in specs for e in measure(spec, arguments.tokens, arguments.rounds)]
    document = {
        "benchmark": "onnx_speed", "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d"), "onnxruntime": onnxruntime.__version__,
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "shape": [1, KV_HEADS, arguments.tokens, DIM], "queries_per_head": GROUP,
        "rounds": arguments.rounds, "entries": entries, "ok": True,
    }
    if arguments.json:
        arguments.json.parent.mkdir(parents=True, exist_ok=True)
        arguments.json.write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
