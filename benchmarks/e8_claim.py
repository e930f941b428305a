"""Check the seed claim on the real sample: "E8 compresses 3x better than scalar under entropy coding".

The claim's source measured the zstd ratio of index streams (3.74x for E8 against 1.23x for
scalar), which is not bits at equal distortion. This study measures bits per coordinate at
*equal distortion* on the embedded SmolLM2 keys and values, in two framings:

* equal relative MSE ``sum |x - x_hat|^2 / sum |x|^2``;
* equal attention-output error (`latkv.metrics.attention_output_error`, causal GQA): keys
  quantized with exact values, and values quantized with exact keys.

Every curve is a sweep of one method over its rate; the rate is the measured size of everything
stored (each layer's sequence encoded on its own, as ``latkv compare`` does). Curves:

* ``e8-rans``: `latkv.E8Quant` with ``entropy=True`` (Hadamard rotation), targets 1 .. 6 bits;
* ``e8-rans-no-rotation``: the same with ``rotation="none"``;
* ``scalar-rans`` / ``scalar-rans-hadamard``: the same coder on a uniform scalar quantizer
  (``rint(x / step)`` with one float16 step per head, one rANS context, the model stored),
  without and with the rotation: "scalar + the same entropy coder";
* ``scalar-minmax``: `latkv.ScalarQuant` (KIVI-style per-token min-max groups of 32, fixed
  rate), 2 .. 8 bits: "fixed-rate min-max";
* ``e8-fixed``: `latkv.E8Quant` at fixed rate, 2 .. 6 bits.

For each baseline and distortion level the rate of each curve is interpolated (linear in rate
against log distortion between measured points) and the ratio ``bits(baseline) / bits(e8-rans)``
reported: the claim is a ratio of 3.

    python benchmarks/e8_claim.py [--quick] [--json benchmarks/results/e8_claim.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

import latkv
from latkv import entropy, metrics
from latkv.cli import machine_description
from latkv.compare import check_kv, chunk_bounds
from latkv.sample import load_sample

#: relative-MSE and attention-error levels at which the rates are compared
MSE_LEVELS = (0.1, 0.03, 0.01, 0.003)
ATTENTION_LEVELS = (0.3, 0.2, 0.1, 0.05)


def scalar_rans(x: np.ndarray, step_factor: float, rotate: bool) -> tuple[np.ndarray, int]:
    """Uniform scalar quantization + rANS with one context: ``(x_hat, stored bytes)``.

    ``x : (heads, tokens, dim)``; one float16 step ``sigma_head * step_factor`` per head.
    """
    dim = x.shape[-1]
    rotation = latkv.RandomizedHadamard(dim, seed=0) if rotate else None
    y = rotation.apply(x) if rotate else x.astype(np.float32)
    sigma = np.sqrt((y.astype(np.float64) ** 2).mean(axis=(1, 2)))
    step = np.maximum((sigma * step_factor).astype(np.float16).astype(np.float32), 2.0 ** -24)
    integers = np.rint(y / step[:, None, None]).astype(np.int64)
    stream, model, _ = entropy.encode_integers(integers)
    stored = len(stream) + model.nbytes + 2 * step.size
    y_hat = (integers * step[:, None, None]).astype(np.float32)
    return (rotation.inverse(y_hat) if rotate else y_hat), stored


def quantizer_codec(spec: str, dim: int) -> Callable[[np.ndarray], tuple[np.ndarray, int]]:
    qz = latkv.quantizer(spec, dim=dim)

    def codec(x: np.ndarray) -> tuple[np.ndarray, int]:
        codes = qz.encode(x)
        return qz.decode(codes), codes.nbytes

    return codec


def measure(data: dict, codec: Callable[[np.ndarray], tuple[np.ndarray, int]]) -> dict:
    """Rate and the two distortions, for keys and values separately."""
    result = {}
    for kind in ("k", "v"):
        stored = coordinates = 0
        error = energy = 0.0
        attention = []
        for layer in check_kv(data):
            for start, stop in chunk_bounds(data, layer):
                k = data[f"k_L{layer}"][:, start:stop].astype(np.float32)
                v = data[f"v_L{layer}"][:, start:stop].astype(np.float32)
                q = data[f"q_L{layer}"][:, start:stop].astype(np.float32)
                x = k if kind == "k" else v
                x_hat, nbytes = codec(x)
                stored += nbytes
                coordinates += x.size
                error += float(((x_hat.astype(np.float64) - x) ** 2).sum())
                energy += float((x.astype(np.float64) ** 2).sum())
                kv_heads, tokens, dim = k.shape
                queries = metrics.grouped_queries(q, kv_heads)
                mask = metrics.causal_mask(q.shape[1], tokens, q.shape[0] // kv_heads)
                logits = queries @ np.swapaxes(k, -1, -2) / math.sqrt(dim)
                if kind == "k":
                    logits_hat = queries @ np.swapaxes(x_hat, -1, -2) / math.sqrt(dim)
                    attention.append(metrics.attention_output_error(logits, v, logits_hat, v,
                                                                    mask))
                else:
                    attention.append(metrics.attention_output_error(logits, v, logits, x_hat,
                                                                    mask))
        result[kind] = {"bits": 8 * stored / coordinates, "relative_mse": error / energy,
                        "attention_error": float(np.mean(attention))}
    return result


def curves(data: dict, dim: int, quick: bool = False) -> dict[str, list[dict]]:
    targets = [1 + 0.25 * i for i in range(21)]                   # 1 .. 6 bits
    factors = [2.0 ** (2.5 - 0.25 * i) for i in range(23)]        # steps sigma * 5.7 .. 0.1
    scalar_bits, e8_bits = range(2, 9), range(2, 7)
    if quick:
        targets, factors, scalar_bits, e8_bits = [2, 3], factors[6:11:2], (3, 4), (3,)
    families = {
        "e8-rans": [(t, quantizer_codec(f"e8:{t},entropy=True", dim)) for t in targets],
        "e8-rans-no-rotation": [(t, quantizer_codec(f"e8:{t},entropy=True,rotation=none", dim))
                                for t in targets],
        "scalar-rans": [(f, lambda x, f=f: scalar_rans(x, f, False)) for f in factors],
        "scalar-rans-hadamard": [(f, lambda x, f=f: scalar_rans(x, f, True)) for f in factors],
        "scalar-minmax": [(b, quantizer_codec(f"scalar:{b}", dim)) for b in scalar_bits],
        "e8-fixed": [(b, quantizer_codec(f"e8:{b}", dim)) for b in e8_bits],
    }
    out: dict[str, list[dict]] = {}
    for name, points in families.items():
        started = time.perf_counter()
        out[name] = [{"setting": setting, **measure(data, codec)} for setting, codec in points]
        print(f"{name:22s} {len(points)} points  {time.perf_counter() - started:.1f} s",
              flush=True)
    return out


def rate_at(points: list[dict], kind: str, metric: str, level: float) -> float | None:
    """The rate at which a curve reaches ``level``, interpolated; None outside its range."""
    pairs = sorted((p[kind]["bits"], p[kind][metric]) for p in points)
    for (r0, d0), (r1, d1) in zip(pairs, pairs[1:]):
        if min(d0, d1) <= level <= max(d0, d1) and d0 != d1:
            t = (math.log(level) - math.log(d0)) / (math.log(d1) - math.log(d0))
            return r0 + t * (r1 - r0)
    return None


def ratios(results: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for kind in ("k", "v"):
        for metric, levels in (("relative_mse", MSE_LEVELS), ("attention_error",
                                                               ATTENTION_LEVELS)):
            for level in levels:
                row = {"kind": kind, "metric": metric, "level": level,
                       "bits": {name: rate_at(points, kind, metric, level)
                                for name, points in results.items()}}
                e8_bits = row["bits"]["e8-rans"]
                row["ratio_to_e8_rans"] = {
                    name: (bits / e8_bits if bits is not None and e8_bits else None)
                    for name, bits in row["bits"].items()}
                rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="a few points per curve (tests)")
    args = parser.parse_args()
    data = load_sample()
    dim = data["k_L0"].shape[-1]
    results = curves(data, dim, args.quick)
    table = ratios(results)
    names = list(results)
    print(f"\n{'':4s}{'metric':16s}{'level':>7s}  " + "  ".join(f"{n:>20s}" for n in names))
    for row in table:
        cells = []
        for name in names:
            bits, ratio = row["bits"][name], row["ratio_to_e8_rans"][name]
            if bits is None:
                cells.append(f"{'-':>20s}")
            elif ratio is None:
                cells.append(f"{bits:8.3f} b {'':9s}")
            else:
                cells.append(f"{bits:8.3f} b ({ratio:4.2f}x)   ")
        print(f"{row['kind']:4s}{row['metric']:16s}{row['level']:7.3f}  " + "  ".join(cells))
    ok = all(np.isfinite(p[k][m]) for points in results.values() for p in points
             for k in "kv" for m in ("bits", "relative_mse", "attention_error"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "data": "embedded SmolLM2-135M sample (5 layers, 3 kv heads, 2 x 160 tokens, dim 64)",
            "command": "python benchmarks/e8_claim.py --json benchmarks/results/e8_claim.json",
            "curves": results, "ratios": table,
            "machine": machine_description(),
        }, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
