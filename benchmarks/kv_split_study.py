"""Keys and values with their own quantizers: K/V bit splits, mixed pairs, and perplexity.

Part 1 (``--sample``, the default): every configuration of `CONFIGURATIONS` on the embedded
SmolLM2 KV sample through `latkv.compare.compare`: attention-output error, top-8 agreement and
the exact bytes stored (keys and values, side information included) as a fraction of float16.
For each family and each budget of `BUDGETS` the report keeps the configuration of least
attention error whose measured bits fit the budget.

Part 2 (``--perplexity``): SmolLM2-135M-Instruct's perplexity on the default text (docstrings
of Python standard-library modules) with a `latkv.KVCache` per layer (``--residual`` exact
tokens, blocks of ``--block`` compressed as they age out, chunks of ``--chunk`` tokens per
forward), against the unquantized forward, and the bits at which each family crosses +1%,
+5% and +20%.

    python benchmarks/kv_split_study.py [--quick] [--perplexity] [--tokens 4096]
        [--json benchmarks/results/kv_split_study.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from latkv.cli import machine_description
from latkv.compare import FP16, compare
from latkv.sample import load_sample

BUDGETS = (2.0, 2.5, 3.0, 3.5, 4.0)
THRESHOLDS = (0.01, 0.05, 0.20)

KIVI_KEYS = "scalar:{k},axis=channel,group=128"
KIVI_VALUES = "scalar:{v},group=64"


def turbo_keys(bits: int | float) -> str:
    if bits == int(bits):
        return f"turbo:{int(bits)},center=True"
    low = int(bits)
    return f"turbo:{low},outlier_channels={{dim/2}},outlier_bits={low + 1},center=True"


def turbo_values(bits: int | float) -> str:
    if bits == int(bits):
        return f"turbo:{int(bits)}"
    low = int(bits)
    return f"turbo:{low},outlier_channels={{dim/2}},outlier_bits={low + 1}"


def configurations(quick: bool = False) -> list[tuple[str, str, str]]:
    """``(family, label, "KEY_SPEC|VALUE_SPEC")`` rows of the study."""
    rows: list[tuple[str, str, str]] = []

    def add(family: str, label: str, keys: str, values: str) -> None:
        rows.append((family, label, f"{keys}|{values}"))

    widths = (2, 3, 4) if quick else (2, 2.5, 3, 3.5, 4)
    for b in widths:                                          # symmetric families
        add("TurboQuant (keys centred)", f"K{b}V{b}", turbo_keys(b), turbo_values(b))
        add("E8 + rANS (centred)", f"K{b}V{b}", f"e8:{b},entropy=True,center=True",
            f"e8:{b},entropy=True,center=True")
        add("QET", f"K{b}V{b}", f"qet:{b}", f"qet:{b}")
    for b in (1, 2, 3, 4):
        add("KIVI (per-channel K, per-token V)", f"K{b}V{b}", KIVI_KEYS.format(k=b),
            KIVI_VALUES.format(v=b))
    for b in (2, 3, 4):
        add("E8 fixed rate (keys centred)", f"K{b}V{b}", f"e8:{b},center=True", f"e8:{b}")
    for level_bits in ("3-2-2-2", "4-2-2-2", "4-3-3-3"):
        add("PolarQuant (centred)", level_bits, f"polar:4,level_bits={level_bits},center=True",
            f"polar:4,level_bits={level_bits},center=True")
    splits = ((4, 2), (2, 4), (3, 2), (4, 3), (8, 4), (8, 2)) if not quick else ((4, 2), (8, 4))
    for k, v in splits:                                       # K/V bit splits
        add("TurboQuant K/V split", f"K{k}V{v}", turbo_keys(k), turbo_values(v))
        add("KIVI K/V split", f"K{k}V{v}", KIVI_KEYS.format(k=k), KIVI_VALUES.format(v=v))
    mixed = ((2, 2), (3, 2), (3, 3), (4, 2), (4, 3), (4, 4)) if not quick else ((3, 3),)
    for k, v in mixed:                                        # mixed pairs
        add("KIVI keys + TurboQuant values", f"K{k}V{v}", KIVI_KEYS.format(k=k),
            turbo_values(v))
        add("E8 + rANS keys + TurboQuant values", f"K{k}V{v}",
            f"e8:{k},entropy=True,center=True", turbo_values(v))
    for m in (("{dim}", "{2dim}") if not quick else ("{dim}",)):
        for v in (2, 3):
            add("QJL keys + TurboQuant values", f"m={m.strip('{}')} V{v}", f"qjl:{m},center=True",
                turbo_values(v))
    for v in (2, 3, 4):                                       # values alone (keys ~exact)
        add("values alone: TurboQuant", f"K8V{v}", "turbo:8,center=True", turbo_values(v))
        add("values alone: per-token scalar", f"K8V{v}", "turbo:8,center=True",
            KIVI_VALUES.format(v=v))
        add("values alone: E8 + rANS", f"K8V{v}", "turbo:8,center=True",
            f"e8:{v},entropy=True,center=True")
    return rows


def perplexity_configurations(quick: bool = False) -> list[tuple[str, str, str]]:
    """The rows of part 2: each family at the bits that bracket its +1/+5/+20% crossings."""
    keep = {
        "TurboQuant (keys centred)": None, "KIVI (per-channel K, per-token V)": {"K2V2", "K3V3",
                                                                               "K4V4"},
        "E8 + rANS (centred)": {"K2V2", "K3V3", "K4V4"}, "E8 fixed rate (keys centred)": None,
        "PolarQuant (centred)": {"4-2-2-2"}, "TurboQuant K/V split": {"K4V2", "K2V4", "K8V4"},
        "KIVI K/V split": {"K4V2", "K8V4"},
        "KIVI keys + TurboQuant values": {"K4V2", "K3V3", "K4V3"},
        "E8 + rANS keys + TurboQuant values": {"K3V2", "K4V3"},
        "QJL keys + TurboQuant values": {"m=2dim V3"},
    }
    if quick:
        keep = {"TurboQuant (keys centred)": {"K4V4"}}
    return [(family, label, spec) for family, label, spec in configurations()
            if family in keep and (keep[family] is None or label in keep[family])]


def best_per_family(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{family: {budget: row of least attention error within it}}``."""
    table: dict[str, dict[str, Any]] = {}
    for row in rows:
        family = row["family"]
        for budget in BUDGETS:
            if row["measured_bits_per_coordinate"] > budget + 1e-9:
                continue
            best = table.setdefault(family, {}).get(str(budget))
            if best is None or row["attention_error"] < best["attention_error"]:
                table[family][str(budget)] = row
    return table


def sample_study(quick: bool) -> dict[str, Any]:
    data = load_sample()
    configs = configurations(quick)
    rows = []
    start = time.perf_counter()
    measured = compare([spec for _, _, spec in configs] + [FP16], data)
    for (family, label, spec), row in zip(configs + [("fp16", "fp16", FP16)], measured):
        row.update(family=family, label=label, spec_template=spec,
                   bytes_vs_fp16=row["measured_bits_per_coordinate"] / 16.0)
        rows.append(row)
    return {"rows": rows, "best_per_family": best_per_family(rows),
            "seconds": time.perf_counter() - start}


def perplexity_study(tokens: int, window: int, residual: int, block: int, chunk: int,
                     quick: bool) -> dict[str, Any]:
    from latkv.capture import default_text
    from latkv.llm import Model
    from latkv.llm.fetch import resolve_model
    from latkv.perplexity import perplexity
    from latkv.registry import quantizer

    model = Model.load(resolve_model("smollm2"))
    text, source = default_text()
    ids = model.tokenizer.encode(text)[:tokens]
    dim = model.config.head_dim
    baseline = perplexity(model, ids, window=window)
    rows = [{"family": "fp32", "label": "fp32", "spec": "fp32", **baseline,
             "ratio": 1.0, "bits_per_coordinate": 32.0}]
    configs = perplexity_configurations(quick)
    for family, label, spec in configs:
        key_spec, _, value_spec = spec.replace("{dim/2}", str(dim // 2)).replace(
            "{2dim}", str(2 * dim)).replace("{dim}", str(dim)).partition("|")
        keys, values = quantizer(key_spec, dim=dim), quantizer(value_spec, dim=dim)
        start = time.perf_counter()
        result = perplexity(model, ids, window=window, cache=(keys, values, residual, block),
                            chunk=chunk)
        rows.append({"family": family, "label": label, "spec": f"{keys.spec}|{values.spec}",
                     **result, "ratio": result["perplexity"] / baseline["perplexity"],
                     "bits_per_coordinate": (keys.bits_per_coordinate
                                             + values.bits_per_coordinate) / 2,
                     "seconds": time.perf_counter() - start})
        print(f"{family:40s} {label:12s} {rows[-1]['bits_per_coordinate']:.3f} b  "
              f"ppl {result['perplexity']:.3f} ({rows[-1]['ratio']:.4f}x) "
              f"{rows[-1]['seconds']:.0f} s", flush=True)
    crossings: dict[str, dict[str, float | None]] = {}
    for family in dict.fromkeys(row["family"] for row in rows[1:]):
        members = [row for row in rows if row["family"] == family]
        crossings[family] = {
            f"+{round(100 * t)}%": min((row["bits_per_coordinate"] for row in members
                                        if row["ratio"] <= 1 + t), default=None)
            for t in THRESHOLDS}
    return {"model": str(model.source), "text": source, "tokens": len(ids), "window": window,
            "residual": residual, "block": block, "chunk": chunk, "rows": rows,
            "least_bits_within": crossings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer configurations")
    parser.add_argument("--perplexity", action="store_true", help="also run part 2")
    parser.add_argument("--no-sample", action="store_true", help="skip part 1")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--residual", type=int, default=128)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"machine": machine_description(),
                              "date": time.strftime("%Y-%m-%d")}
    if not args.no_sample:
        result["sample"] = sample_study(args.quick)
        for family, budgets in result["sample"]["best_per_family"].items():
            cells = "  ".join(f"{b}: {row['attention_error']:.3f} ({row['label']})"
                              for b, row in budgets.items())
            print(f"{family:40s} {cells}")
    if args.perplexity:
        result["perplexity"] = perplexity_study(args.tokens, args.window, args.residual,
                                                args.block, args.chunk, args.quick)
        for family, crossing in result["perplexity"]["least_bits_within"].items():
            print(f"{family:40s} {crossing}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=float) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
