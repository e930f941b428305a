"""The ``latkv`` command: ``latkv compare``, ``latkv info``."""

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
    ("K rel MSE", "key_relative_mse", 3),
    ("V rel MSE", "value_relative_mse", 3),
    ("logit err", "logit_error", 3),
    ("attn-out err", "attention_error", 3),
    ("top-8", "top8_agreement", 3),
    ("encode Mvec/s", "encode_mvectors_per_s", 3),
)


def command_compare(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from latkv.compare import compare, default_specs, expand_specs, load_kv
    from latkv.synthetic import synthetic_kv

    console = Console(quiet=args.quiet)
    if not console.is_terminal:
        console.width = max(console.width, 150)
    if args.kv is not None:
        data, source = load_kv(args.kv), str(args.kv)
    else:
        data = synthetic_kv(seed=args.seed, tokens=args.tokens)
        source = f"synthetic_kv(seed={args.seed}, tokens={args.tokens})"
    bits = [int(b) for b in args.bits.split(",")]
    specs = args.methods.split(";") if args.methods else default_specs()
    total = len(expand_specs(specs, bits))
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total}"), TimeElapsedColumn(), console=console,
                  disable=args.quiet, transient=True) as progress:
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
    if args.json is not None:
        _write_json_atomically(args.json, {"data": source, "machine": machine_description(),
                                           "bits": bits, "rows": rows})
        console.print(f"wrote {args.json}")
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
    compare.add_argument("--kv", type=Path, default=None,
                         help="an .npz with k_L<i>, v_L<i> (kv_heads, tokens, dim) and q_L<i> "
                              "(q_heads, queries, dim); default: the synthetic generator")
    compare.add_argument("--methods", default=None,
                         help="';'-separated specs, e.g. 'scalar;scalar,axis=channel|scalar'; a "
                              "spec without its main value is run at each --bits; 'K|V' pairs "
                              "give keys and values their own quantizers (default: every "
                              "registered method)")
    compare.add_argument("--bits", default="2,3,4", help="bit widths, comma-separated")
    compare.add_argument("--backend", default=None,
                         choices=("numpy", "numba", "cupy", "numba.cuda"))
    compare.add_argument("--seed", type=int, default=0, help="seed of the synthetic KV set")
    compare.add_argument("--tokens", type=int, default=256, help="tokens of the synthetic KV set")
    compare.add_argument("--json", type=Path, default=None, help="also write the rows here")
    compare.add_argument("--quiet", action="store_true", help="print nothing (use with --json)")
    compare.set_defaults(run=command_compare)

    info = commands.add_parser("info", help="list registered methods and available backends")
    info.set_defaults(run=command_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"latkv {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
