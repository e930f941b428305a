"""QET against product quantization, ScalarQuant and TurboQuant at matched bits.

The QET paper (arXiv 2407.03637) reports the MSE of QET as a fraction of the MSE of product
quantization (PQ) at the same compression ratio: 12.3% in v3; 5.05% / 13.33% / 11.89% for
weights / K cache / V cache in v4. This study measures that ratio, and the MSE of the other
methods at the same bits, on

* Gaussian data: 16 heads x 512 tokens x dim 128, N(0, 1);
* the embedded SmolLM2 sample: keys and values, each layer's 160-token sequences per head.

Every method reports its measured bits per coordinate (everything stored). QET and PQ are
`latkv.QET` configurations: PQ is ``layers=0`` with one stage (k-means codebooks per block, the
paper's reference), "PQ + residual" ``layers=0`` with the two default stages, "QET vanilla"
``layers=3`` with one stage, "QET" the default (``layers=3``, two stages). PQ and QET run at
``subspaces`` 4 (the authors' example), 8, 16, 32 and 64, and the best of each is reported
beside the M = 4 figures: the column-group width decides more than anything else. ``--blocks`` sets
QET's rows per block (the codebooks are amortised over a block; the sample's sequences have
160 tokens, so blocks above 160 are whole sequences there); the Gaussian set has as many
tokens per head as the largest block.

    python benchmarks/qet_study.py [--blocks 128,512,2048] [--json benchmarks/results/qet_study.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import latkv
from latkv.cli import machine_description
from latkv.compare import check_kv, chunk_bounds
from latkv.sample import load_sample


SUBSPACES = (4, 8, 16, 32, 64)


def qet_specs(bits: float, block: int, subspaces: int) -> dict[str, str]:
    options = f"block={block},subspaces={subspaces}"
    specs = {"PQ": f"qet:{bits},layers=0,stage_share=1.0,{options}",
             "QET": f"qet:{bits},{options}"}
    if subspaces == 4:  # the authors' example setting
        specs["PQ + residual"] = f"qet:{bits},layers=0,{options}"
        specs["QET vanilla"] = f"qet:{bits},stage_share=1.0,{options}"
    return specs


def measure(arrays: list[np.ndarray], spec: str, dim: int) -> dict:
    qz = latkv.quantizer(spec, dim=dim)
    stored = coordinates = 0
    error = energy = 0.0
    started = time.perf_counter()
    for x in arrays:
        codes = qz.encode(x)
        x_hat = qz.decode(codes).astype(np.float64)
        stored += codes.nbytes
        coordinates += x.size
        error += float(((x_hat - x) ** 2).sum())
        energy += float((x.astype(np.float64) ** 2).sum())
    return {"spec": qz.spec, "bits": 8 * stored / coordinates, "relative_mse": error / energy,
            "seconds": time.perf_counter() - started}


def datasets(quick: bool, tokens: int) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    heads, tokens = (4, 256) if quick else (max(1, 8192 // tokens), tokens)
    data = load_sample()
    keys, values = [], []
    for layer in check_kv(data):
        for start, stop in chunk_bounds(data, layer):
            keys.append(data[f"k_L{layer}"][:, start:stop].astype(np.float32))
            values.append(data[f"v_L{layer}"][:, start:stop].astype(np.float32))
    sets = {"gaussian": [rng.standard_normal((heads, tokens, 128)).astype(np.float32)],
            "keys": keys, "values": values}
    return {name: arrays[:2] if quick else arrays for name, arrays in sets.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", default="128,2048")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    rows = []
    for name, arrays in datasets(args.quick, max(blocks)).items():
        dim = arrays[0].shape[-1]
        for block in blocks:
            if name != "gaussian" and block > 160 and block != max(blocks):
                continue  # whole 160-token sequences: the same as the largest block
            for bits in ((3,) if args.quick else (2, 3, 4)):
                turbo = latkv.TurboQuant(dim=dim, bits=bits)
                matched = turbo.bits_per_coordinate
                specs = {"TurboQuant": turbo.spec,
                         "ScalarQuant (groups of dim)": f"scalar:{bits},group={dim}"}
                for m in SUBSPACES:
                    if dim % m == 0:
                        specs.update({f"{label} M={m}": spec for label, spec in
                                      qet_specs(matched, block, m).items()})
                measured = []
                for label, spec in specs.items():
                    row = {"data": name, "block": block, "target_bits": matched,
                           "method": label, **measure(arrays, spec, dim)}
                    rows.append(row)
                    measured.append(row)
                best = {}
                for family in ("PQ", "QET"):
                    candidates = [r for r in measured if r["method"].startswith(family + " M=")]
                    best[family] = min(candidates, key=lambda r: r["relative_mse"])
                    rows.append({**best[family], "method": f"{family} best M",
                                 "best_of": best[family]["method"]})
                for row in measured:
                    print(f"{name:9s} {block:5d} {matched:6.3f}  {row['method']:28s} "
                          f"{row['bits']:6.3f} b  rel. MSE {row['relative_mse']:.4f}  "
                          f"{row['seconds']:.1f} s", flush=True)
                same = {r["method"]: r for r in measured}
                ratio4 = same["QET M=4"]["relative_mse"] / same["PQ M=4"]["relative_mse"]
                ratio = best["QET"]["relative_mse"] / best["PQ"]["relative_mse"]
                print(f"{'':22s}QET / PQ MSE at M=4: {100 * ratio4:.1f}%, best M each: "
                      f"{100 * ratio:.1f}% ({best['QET']['method']} vs {best['PQ']['method']}; "
                      f"paper: 12.3%, v4 13.33% K, 11.89% V)", flush=True)
    ok = all(np.isfinite(r["relative_mse"]) for r in rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": f"python benchmarks/qet_study.py --blocks {args.blocks} --json {args.json}",
            "blocks": blocks, "rows": rows,
            "machine": machine_description(),
        }, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
