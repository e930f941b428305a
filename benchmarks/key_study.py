"""TurboQuant keys against KIVI per-channel keys on the embedded SmolLM2 sample.

Values stay exact (float16) so that only the keys differ; each row reports the exact bits per
key coordinate, the bits actually stored on the sample (160-token sequences, so per-sequence
statistics are amortised over 160 tokens) and the causal GQA attention-output error
(`latkv.metrics.attention_output_error`). ``--sink`` also reports the error when the first
token of each sequence is kept exact (what a cache with an fp16 sink token would see).

    python benchmarks/key_study.py [--bits 2,3,4] [--json benchmarks/results/key_study.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import latkv
from latkv import metrics
from latkv.cli import machine_description
from latkv.compare import chunk_bounds, check_kv
from latkv.sample import load_sample

KEY_SPECS = (
    ("KIVI per-channel, groups of 32 tokens", "scalar:{b},axis=channel,group=32"),
    ("KIVI per-channel, groups of 128 tokens", "scalar:{b},axis=channel,group=128"),
    ("TurboQuant", "turbo:{b}"),
    ("TurboQuant, frozen centre", "turbo:{b},center=True"),
    ("TurboQuant, frozen centre + scale", "turbo:{b},center=True,channel_scale=True"),
    ("TurboQuant, centre per 32 tokens", "turbo:{b},center=True,local_stats=True,stats_tokens=32"),
    ("TurboQuant, centre per 128 tokens",
     "turbo:{b},center=True,local_stats=True,stats_tokens=128"),
    ("TurboQuant, centre + scale per 32 tokens",
     "turbo:{b},center=True,channel_scale=True,local_stats=True,stats_tokens=32"),
    ("TurboQuant-prod, frozen centre", "turbo:{b},mode=prod,center=True"),
    ("QJL m = 2d, frozen centre", "qjl:{m},center=True"),
    ("PolarQuant 4-2-2-2 (3.875 b)", "polar:4"),
    ("PolarQuant 4-2-2-2, frozen centre", "polar:4,center=True"),
    ("PolarQuant 4-3-3-3, frozen centre", "polar:4,level_bits=4-3-3-3,center=True"),
)


def key_errors(data: dict, spec: str, exact_first: int = 0) -> dict:
    layers = check_kv(data)
    dim = data[f"k_L{layers[0]}"].shape[-1]
    qz = latkv.quantizer(spec, dim=dim)
    errors, stored, coordinates = [], 0, 0
    for layer in layers:
        for start, stop in chunk_bounds(data, layer):
            k = data[f"k_L{layer}"][:, start:stop].astype(np.float32)
            v = data[f"v_L{layer}"][:, start:stop].astype(np.float16).astype(np.float32)
            q = data[f"q_L{layer}"][:, start:stop].astype(np.float32)
            kv_heads, tokens, _ = k.shape
            queries = metrics.grouped_queries(q, kv_heads)
            mask = metrics.causal_mask(q.shape[1], tokens, q.shape[0] // kv_heads)
            codes = qz.encode(k)
            stored += codes.nbytes
            coordinates += k.size
            logits = queries @ np.swapaxes(k, -1, -2) / np.sqrt(dim)
            logits_hat = qz.scores(queries, codes) / np.sqrt(dim)
            if exact_first:
                logits_hat[..., :exact_first] = logits[..., :exact_first]
            errors.append(metrics.attention_output_error(logits, v, logits_hat, v, mask))
    return {"spec": qz.spec, "bits_per_coordinate": qz.bits_per_coordinate,
            "measured_bits_per_coordinate": 8 * stored / coordinates,
            "attention_error": float(np.mean(errors))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--sink", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    data = load_sample()
    dim = data["k_L0"].shape[-1]
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        for label, template in KEY_SPECS:
            if template.startswith("qjl") and bits != 2:
                continue
            if template.startswith("polar") and bits != 4:  # fixed widths: listed once
                continue
            spec = template.format(b=bits, m=2 * dim)
            row = {"bits": bits, "label": label, **key_errors(data, spec)}
            if args.sink:
                row["attention_error_exact_first_token"] = key_errors(data, spec, 1)[
                    "attention_error"]
            rows.append(row)
            sink = (f"  sink-exact {row['attention_error_exact_first_token']:.4f}"
                    if args.sink else "")
            print(f"{bits}  {label:44s} {row['bits_per_coordinate']:6.3f} "
                  f"{row['measured_bits_per_coordinate']:6.3f}  {row['attention_error']:.4f}{sink}",
                  flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/key_study.py " + " ".join(sys.argv[1:])
        args.json.write_text(json.dumps({"data": "embedded SmolLM2 sample", "command": command,
                                         "machine": machine_description(), "rows": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
