#!/usr/bin/env python
"""TurboQuant, QJL and PolarQuant benchmarks: encode, decode and scores, against the NumPy
reference, float16/BLAS baselines and Faiss's own TurboQuant codes.

The same runner as ``bench_foundation.py`` (imported from it, not copied): every benchmark
names its input generator, its validator (the NumPy reference, ``backend="numpy"``, also
timed), its implementations (the fast CPU path, ``backend="numba"``) and its baselines; an
implementation whose output differs from the reference is refused, not timed; the entries of
one benchmark are timed in interleaved rounds and compared as ratios of medians of time per
row (see ``benchmarks/README.md``).

Quantizers (dim 128): ``TurboQuant`` mse 2, 3, 4 bits and prod 3 bits (default
``rotation="hadamard"``), ``QJL(sketch_dim=256)``, ``PolarQuant()`` (levels 4, 4-2-2-2 bits;
``python benchmarks/bench_turbo_qjl.py --filter polar --json benchmarks/results/polar.json``
writes its figures on their own).

* ``*_encode``: standard normal ``(rows, 128)`` float32 (100 000 rows; ``--quick`` 2048).
  Baselines ``x.astype(np.float16)`` and, where Faiss >= 1.15 is importable, Faiss's
  ``IndexScalarQuantizer(128, QT_{b}bit_tqmse).sa_encode`` (mse) or ``QT_{b}bit_tq`` (prod) of
  the same rows normalised to unit length (untimed): Faiss's tqmse rotates and normalises
  nothing, so it does less work than TurboQuant's encode. QJL has no Faiss counterpart.
* ``*_decode``: random codes of ``(rows, 128)`` (uniform packed bytes and sign bits, float16
  norms in [5, 15], residual norms in [0.05, 0.5]). Baselines ``h.astype(np.float32)`` of a
  float16 array of the output's shape and Faiss's ``sa_decode`` of its own codes of the rows.
* ``*_scores``: ``q : (8, 16, 128)`` float32 queries against the codes of ``(8, 4096, 128)``
  keys (quick: 128 keys per head), through ``scores`` (no key is decoded). Baseline: the
  float32 BLAS product ``q @ k.transpose(0, 2, 1)`` of float32 keys of the same shape. A
  "row" of a scores benchmark is one key.

The fast path is used only where the quantizer lists it: ``"numba" in type(qz).backends``
(TurboQuant and QJL fall back to the reference silently otherwise). Where it does not, the
benchmark records ``fast_backend: null`` and times the reference against the baselines alone.
Every benchmark also records ``reference_vs_baseline``: baseline / reference, time per row.

Usage::

    python benchmarks/bench_turbo_qjl.py            # 100 000 rows
    python benchmarks/bench_turbo_qjl.py --quick    # 2048 rows, a few seconds (tests / CI)
    python benchmarks/bench_turbo_qjl.py --list
    python benchmarks/bench_turbo_qjl.py --filter encode,qjl --rows 262144

Writes ``benchmarks/results/turbo_qjl.json`` (``turbo_qjl-quick.json`` with ``--quick``)
atomically; ``--json PATH`` picks another file. Exit status 0 when every entry was validated
and timed, 1 when one was refused, 2 for a ``--filter`` that matches nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_foundation as foundation  # noqa: E402  (the shared runner)
from bench_foundation import Benchmark, Entry, take_rows  # noqa: E402

DEFAULT_JSON = HERE / "results" / "turbo_qjl.json"
QUICK_JSON = HERE / "results" / "turbo_qjl-quick.json"
SCHEMA = "latkv-bench-turbo-qjl/1"

DIM = 128
DEFAULT_ROWS = 100_000
QUICK_ROWS = 2048
DEFAULT_REFERENCE_ROWS = 1 << 16
HEADS, QUERIES, KEYS, QUICK_KEYS = 8, 16, 4096, 128
FAST = "numba"
#: (label, TurboQuant options, Faiss ScalarQuantizer type) ; QJL is added separately
TURBO_CONFIGS = (
    ("mse,bits=2", {"bits": 2, "mode": "mse"}, "QT_2bit_tqmse"),
    ("mse,bits=3", {"bits": 3, "mode": "mse"}, "QT_3bit_tqmse"),
    ("mse,bits=4", {"bits": 4, "mode": "mse"}, "QT_4bit_tqmse"),
    ("prod,bits=3", {"bits": 3, "mode": "prod"}, "QT_3bit_tq"),
)
QJL_SKETCH = 256


# -- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoresInput:
    """Queries ``(B, m, d)`` and the codes (or float32 keys) of ``(B, n, d)`` keys."""

    q: np.ndarray
    keys: Any

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes) + int(self.keys.nbytes)


def take_codes_rows(codes: Any, lo: int, hi: int) -> Any:
    """Rows ``[lo, hi)`` of codes of a ``(rows, dim)`` input (every array leads with rows)."""
    from latkv.container import Codes

    arrays = {k: take_rows(v, lo, hi) for k, v in codes.arrays.items()}
    return Codes(codes.method, dict(codes.params), (hi - lo, *codes.shape[1:]), codes.dtype,
                 arrays)


def take_keys(data: ScoresInput, lo: int, hi: int) -> ScoresInput:
    """Keys ``[lo, hi)`` counted as heads x keys: keys ``[lo / B, hi / B)`` of every head."""
    from latkv.container import Codes

    k0, k1 = lo // HEADS, hi // HEADS
    codes = data.keys
    arrays = {k: np.ascontiguousarray(v[:, k0:k1]) for k, v in codes.arrays.items()}
    sliced = Codes(codes.method, dict(codes.params), (codes.shape[0], k1 - k0, codes.shape[2]),
                   codes.dtype, arrays)
    return ScoresInput(data.q, sliced)


def take_score_columns(scores: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return np.ascontiguousarray(scores[..., lo // HEADS : hi // HEADS])


def random_codes(qz: Any, shape: tuple[int, ...], rng: np.random.Generator) -> Any:
    """Codes with uniform packed bytes / sign bits and plausible float16 norms."""
    from latkv.container import Codes

    arrays = {}
    for name, (array_shape, dtype) in qz.code_layout(shape).items():
        if dtype == "uint8":
            arrays[name] = rng.integers(0, 256, size=array_shape, dtype=np.uint8)
        elif name == "residual_norm":
            arrays[name] = rng.uniform(0.05, 0.5, size=array_shape).astype(dtype)
        else:
            arrays[name] = rng.uniform(5.0, 15.0, size=array_shape).astype(dtype)
    return Codes(qz.name, qz.params, shape, "float32", arrays)


def gaussian_rows(rows: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((rows, DIM), dtype=np.float32)


def unit_rows(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True))


# -- Faiss -------------------------------------------------------------------------------------


def faiss_module() -> Any | None:
    """Faiss >= 1.15 (with the TurboQuant scalar quantizers), or None."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss if hasattr(faiss.ScalarQuantizer, "QT_1bit_tqmse") else None


def faiss_index(faiss: Any, qtype: str) -> Any:
    index = faiss.IndexScalarQuantizer(DIM, getattr(faiss.ScalarQuantizer, qtype))
    index.train(unit_rows(np.random.default_rng(0).standard_normal((256, DIM)).astype(
        np.float32)))
    return index


# -- the benchmarks ----------------------------------------------------------------------------


def fast_entries(qz: Any, call: Callable[[str], Callable[[Any], Any]], what: str
                 ) -> tuple[Entry, ...]:
    if FAST not in type(qz).backends:
        return ()
    return (Entry(FAST, call(FAST), note=f"{what}(..., backend='{FAST}')"),)


def quantizer_benchmarks(label: str, qz: Any, faiss_type: str | None, keys: int
                         ) -> list[Benchmark]:
    faiss = faiss_module() if faiss_type else None
    method = type(qz).__name__
    spec = f"{method}({qz.label}, dim={DIM})"
    out = []

    def encode(backend: str) -> Callable[[Any], Any]:
        return lambda x: qz.encode(x, backend=backend)

    def decode(backend: str) -> Callable[[Any], Any]:
        return lambda c: qz.decode(c, backend=backend)

    def scores(backend: str) -> Callable[[Any], Any]:
        return lambda s: qz.scores(s.q, s.keys, backend=backend)

    encode_baselines = [Entry("astype_fp16", lambda x: x.astype(np.float16), validate=False,
                              note="x.astype(np.float16): the uncompressed fp16 cache")]
    decode_baselines = [Entry("astype_fp32", lambda h: h.astype(np.float32), validate=False,
                              prepare=lambda codes: np.random.default_rng(1).standard_normal(
                                  tuple(codes.shape), dtype=np.float32).astype(np.float16),
                              note="h.astype(np.float32) of an fp16 array of the output's "
                                   "shape")]
    if faiss is not None:
        index = faiss_index(faiss, faiss_type)
        encode_baselines.append(Entry(
            "faiss", lambda u: index.sa_encode(u), validate=False, prepare=unit_rows,
            note=f"faiss.IndexScalarQuantizer(128, {faiss_type}).sa_encode of the rows "
                 "normalised to unit length (no rotation, no norm)"))
        decode_baselines.append(Entry(
            "faiss", lambda c: index.sa_decode(c), validate=False,
            prepare=lambda codes: index.sa_encode(unit_rows(gaussian_rows(
                codes.shape[0], np.random.default_rng(2)))),
            note=f"faiss.IndexScalarQuantizer(128, {faiss_type}).sa_decode of its codes"))

    out.append(Benchmark(
        name=f"{label}_encode", group="encode",
        description=f"{spec}.encode of (rows, {DIM}) float32",
        input_name=f"standard normal, (rows, {DIM}) float32",
        make_input=gaussian_rows,
        reference=Entry("numpy", encode("numpy"), note="backend='numpy'"),
        implementations=fast_entries(qz, encode, f"{method}.encode"),
        baselines=tuple(encode_baselines),
        take_input=take_rows, take_output=take_codes_rows,
    ))
    out.append(Benchmark(
        name=f"{label}_decode", group="decode",
        description=f"{spec}.decode to (rows, {DIM}) float32",
        input_name=f"random codes of (rows, {DIM}): uniform packed bytes, fp16 norms in "
                   "[5, 15] (residual norms in [0.05, 0.5])",
        make_input=lambda rows, rng: random_codes(qz, (rows, DIM), rng),
        reference=Entry("numpy", decode("numpy"), note="backend='numpy'"),
        implementations=fast_entries(qz, decode, f"{method}.decode"),
        baselines=tuple(decode_baselines),
        take_input=take_codes_rows, take_output=take_rows,
    ))

    def scores_input(rows: int, rng: np.random.Generator) -> ScoresInput:
        q = rng.standard_normal((HEADS, QUERIES, DIM), dtype=np.float32)
        return ScoresInput(q, random_codes(qz, (HEADS, rows // HEADS, DIM), rng))

    def float_keys(data: ScoresInput) -> ScoresInput:
        rng = np.random.default_rng(3)
        return ScoresInput(data.q, rng.standard_normal(tuple(data.keys.shape),
                                                       dtype=np.float32))

    out.append(Benchmark(
        name=f"{label}_scores", group="scores",
        description=f"{spec}.scores: q ({HEADS}, {QUERIES}, {DIM}) against the codes of "
                    f"({HEADS}, {keys}, {DIM}) keys",
        input_name=f"standard normal q ({HEADS}, {QUERIES}, {DIM}) float32; random codes of "
                   f"({HEADS}, keys, {DIM}); a row is a key",
        make_input=scores_input,
        reference=Entry("numpy", scores("numpy"), note="backend='numpy'"),
        implementations=fast_entries(qz, scores, f"{method}.scores"),
        baselines=(Entry("blas_fp32", lambda s: np.matmul(s.q, s.keys.transpose(0, 2, 1)),
                         validate=False, prepare=float_keys,
                         note="q @ k.transpose(0, 2, 1), float32 keys of the same shape "
                              "(BLAS)"),),
        take_input=take_keys, take_output=take_score_columns,
    ))
    return out


def quantizers() -> list[tuple[str, Any, str | None]]:
    """``(label, quantizer, Faiss type)`` of every benchmarked configuration."""
    import latkv

    out = [(f"turbo[{label}]", latkv.TurboQuant(dim=DIM, seed=0, **options), faiss_type)
           for label, options, faiss_type in TURBO_CONFIGS]
    out.append((f"qjl[sketch_dim={QJL_SKETCH}]",
                latkv.QJL(dim=DIM, sketch_dim=QJL_SKETCH, seed=0), None))
    out.append(("polar[4-2-2-2]", latkv.PolarQuant(dim=DIM, seed=0), None))
    return out


def all_benchmarks(keys: int) -> list[Benchmark]:
    return [bench for label, qz, faiss_type in quantizers()
            for bench in quantizer_benchmarks(label, qz, faiss_type, keys)]


# -- ratios when only the reference exists ----------------------------------------------------


def reference_ratios(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``baseline / reference`` time per row (as `bench_foundation.report` computes
    ``vs_baseline`` for an implementation): what the reference costs when it is all there is."""
    entries = {e["name"]: e for e in result["entries"] if e["status"] == "ok"}
    reference = next((e for e in result["entries"] if e["role"] == "reference"), None)
    if reference is None or reference["status"] != "ok":
        return {}
    ref = [s / reference["rows"] for s in reference["samples_s"]]
    out = {}
    for entry in result["entries"]:
        if entry["role"] != "baseline" or entry["name"] not in entries:
            continue
        base = [s / entry["rows"] for s in entry["samples_s"]]
        paired = [b / r for b, r in zip(base, ref)]
        out[entry["name"]] = {"median": statistics.median(base) / statistics.median(ref),
                              "min": min(paired), "max": max(paired)}
    return out


def summary_table(results: list[dict[str, Any]]) -> str:
    """One line per benchmark: the fast backend (or, where there is none or it was refused,
    the reference) against everything else."""
    lines = [("benchmark", "timed", "vs numpy", "vs fp16/blas", "vs faiss")]
    for bench in results:
        fast = next((e for e in bench["entries"] if e["role"] == "implementation"), None)
        if fast is not None and fast["status"] == "ok":
            ratios = fast.get("vs_baseline", {})
            timed = fast["name"]
            vs_ref = foundation._ratio_text(fast.get("speedup_vs_reference"))
        else:
            ratios = bench.get("reference_vs_baseline", {})
            timed = "numpy (only)" if fast is None else f"numpy ({fast['name']} REFUSED)"
            vs_ref = ""
        cast = next((ratios[k] for k in ("astype_fp16", "astype_fp32", "blas_fp32")
                     if k in ratios), None)
        lines.append((bench["name"], timed, vs_ref, foundation._ratio_text(cast),
                      foundation._ratio_text(ratios.get("faiss")) or "n/a"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    text = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


# -- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time TurboQuant and QJL encode/decode/scores: the fast backend against "
                    "the NumPy reference, float16/BLAS baselines and Faiss (ratios measured "
                    "in the same run).")
    parser.add_argument("--rows", type=int, default=None,
                        help=f"rows of {DIM} values to encode/decode (default {DEFAULT_ROWS}; "
                             f"--quick {QUICK_ROWS})")
    parser.add_argument("--keys", type=int, default=None,
                        help=f"keys per head for scores (default {KEYS}; --quick {QUICK_KEYS})")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--reference-rows", type=int, default=None,
                        help=f"rows the NumPy reference is timed on (default min(rows, "
                             f"{DEFAULT_REFERENCE_ROWS})); 0 = all rows")
    parser.add_argument("--rounds", type=int, default=foundation.MIN_ROUNDS,
                        help=f"interleaved timing rounds, at least {foundation.MIN_ROUNDS}")
    parser.add_argument("--min-sample-time", type=float, default=None,
                        help="repeat fast calls within a sample until it lasts this many "
                             "seconds (default 0.02; 0.002 with --quick)")
    parser.add_argument("--filter", default="",
                        help="comma-separated substrings of benchmark names to run")
    parser.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"output file (default {DEFAULT_JSON.relative_to(HERE.parent)}, "
                             f"or {QUICK_JSON.relative_to(HERE.parent)} with --quick)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.rows is None:
        args.rows = QUICK_ROWS if args.quick else DEFAULT_ROWS
    if args.keys is None:
        args.keys = QUICK_KEYS if args.quick else KEYS
    if args.rows < foundation.ALIGN:
        parser.error(f"--rows must be at least {foundation.ALIGN}, got {args.rows}")
    if args.keys < foundation.ALIGN // HEADS:
        parser.error(f"--keys must be at least {foundation.ALIGN // HEADS}, got {args.keys}")
    if args.reference_rows is None:
        args.reference_rows = min(args.rows, DEFAULT_REFERENCE_ROWS)
    elif args.reference_rows == 0:
        args.reference_rows = args.rows
    if not foundation.ALIGN <= args.reference_rows <= args.rows:
        parser.error(f"--reference-rows must be 0 or in [{foundation.ALIGN}, {args.rows}], "
                     f"got {args.reference_rows}")
    if args.rounds < foundation.MIN_ROUNDS:
        parser.error(f"--rounds must be at least {foundation.MIN_ROUNDS}")
    if args.min_sample_time is None:
        args.min_sample_time = 0.002 if args.quick else 0.02
    if args.json is None:
        args.json = QUICK_JSON if args.quick else DEFAULT_JSON
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    benchmarks = all_benchmarks(args.keys)
    if args.filter:
        wanted = [w.strip() for w in args.filter.split(",") if w.strip()]
        benchmarks = [b for b in benchmarks if any(w in b.name for w in wanted)]
    if args.list:
        for bench in benchmarks:
            print(f"{bench.name:36s} {bench.description}")
        return 0
    if not benchmarks:
        print(f"no benchmark matches --filter {args.filter!r}", file=sys.stderr)
        return 2

    import latkv

    faiss = faiss_module()
    specs = {f"{label}_{op}": qz.spec for label, qz, _ in quantizers()
             for op in ("encode", "decode", "scores")}
    score_rows = HEADS * args.keys
    settings = {
        "rows": args.rows, "dim": DIM, "reference_rows": args.reference_rows,
        "scores": {"heads": HEADS, "queries": QUERIES, "keys_per_head": args.keys,
                   "rows": score_rows},
        "rounds": args.rounds, "min_sample_time": args.min_sample_time, "seed": args.seed,
        "quick": args.quick, "filter": args.filter or None,
        "fast_backend": FAST,
        "backends": {"TurboQuant": list(latkv.TurboQuant.backends),
                     "QJL": list(latkv.QJL.backends),
                     "PolarQuant": list(latkv.PolarQuant.backends)},
        "command": [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)],
    }

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    for method, backends in settings["backends"].items():
        if FAST not in backends:
            log(f"{method}: no {FAST!r} backend yet (backends {tuple(backends)}); only the "
                "NumPy reference is timed against the baselines")
    log(f"latkv TurboQuant/QJL/PolarQuant benchmarks: {len(benchmarks)} benchmarks, {args.rows} rows "
        f"(reference on {args.reference_rows}), scores {HEADS}x{QUERIES} queries x "
        f"{HEADS}x{args.keys} keys, {args.rounds} rounds"
        + ("" if faiss is not None else "; Faiss >= 1.15 not importable, no Faiss baseline"))
    started = time.perf_counter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = []
    for bench in benchmarks:
        rows = score_rows if bench.group == "scores" else args.rows
        bench_settings = dict(settings, rows=rows,
                              reference_rows=min(rows, args.reference_rows),
                              tail_validation_rows=min(foundation.TAIL_VALIDATION_ROWS,
                                                       rows - min(rows, args.reference_rows)))
        result = foundation.run_benchmark(bench, bench_settings, log)
        result["quantizer"] = specs[bench.name]
        result["fast_backend"] = FAST if bench.implementations else None
        if not bench.implementations:
            result["note"] = (f"only the NumPy reference exists ({FAST!r} not in the "
                              "quantizer's backends)")
        # baseline / reference, time per row: what the reference alone costs
        result["reference_vs_baseline"] = reference_ratios(result)
        results.append(result)
        log(f"  {bench.name:36s} {result['wall_s']:6.1f} s")
    duration = time.perf_counter() - started

    machine = foundation.machine_info()
    machine["load_average_before"] = load_before
    machine["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    machine["faiss"] = None if faiss is None else {
        "version": faiss.__version__, "omp_max_threads": faiss.omp_get_max_threads()}
    machine["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    refused = [f"{b['name']} / {e['name']}" for b in results for e in b["entries"]
               if e["status"] != "ok"]
    payload = {
        "schema": SCHEMA,
        "machine": machine,
        "settings": settings,
        "duration_s": duration,
        "ok": not refused,
        "refused": refused,
        "benchmarks": results,
    }
    foundation.write_json(args.json, payload)

    print(foundation.format_table(results))
    print()
    print(summary_table(results))
    print(f"\n{machine['cpu']}, {machine['cpus_usable']} CPUs, numpy {machine['numpy']}, "
          f"numba {machine['numba']} ({machine['numba_threads']} threads), faiss "
          f"{machine['faiss']['version'] if machine['faiss'] else 'absent'}; load "
          f"{load_before[0] if load_before else '?'} -> "
          f"{machine['load_average_after'][0] if load_before else '?'}; {duration:.0f} s")
    print("ratios: time per row (a scores row is a key), ratio of medians (min-max of "
          "per-round paired ratios); above 1: the timed entry is faster")
    print(f"wrote {args.json}")
    if refused:
        print(f"REFUSED (not timed): {', '.join(refused)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
