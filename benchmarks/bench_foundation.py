#!/usr/bin/env python
"""Foundation benchmarks of latkv: bit packing, Walsh-Hadamard rotations, ScalarQuant.

Written in the style of numba-examples: every benchmark names

* its **input generator** (what is timed on, and how it is drawn),
* its **validator**, the NumPy reference (``backend="numpy"``), which is the definition of
  the right answer and is also timed, as the ``reference`` entry,
* its **implementations** (the numba fast path, ``backend="numba"``), and
* its **baselines** (plain NumPy / BLAS operations that a user could reach for instead).

The runner refuses to time an entry whose output does not match the reference: integer
outputs must be bit-exact, float outputs ``allclose`` with ``rtol=1e-5`` and
``atol=1e-5 * max|reference|``. An entry that raises or fails validation is reported with
status ``"refused"`` and the script exits with status 1 (after writing the JSON).

Timing. These machines are shared and noisy, so the output that matters is *ratios measured
in the same run*: the entries of one benchmark are timed in interleaved rounds (round ``r``
times every entry once, starting from a different entry each round), each entry's time is
the median over the rounds (at least 5), and min/max over the rounds is reported as the
spread. Ratios (``speedup_vs_reference``, ``vs_baseline``) compare time per row, as the ratio
of the medians, with the min/max of the per-round paired ratios as their spread. Every entry
is called once untimed first (JIT compilation, page faults, validation).

The NumPy reference is one to two orders of magnitude slower than everything else, so by
default it is timed on the first ``--reference-rows`` rows (65536, a sixteenth of the default
1M rows; its inputs and temporaries are still far beyond the caches, and its time per row
measured at 65536 and at 131072 rows agrees within the noise) and compared per row;
``--reference-rows 0`` times it on all rows. Validation compares each entry's full-size output on those leading rows and on
the last 8192 rows with the reference's output there.

Usage::

    python benchmarks/bench_foundation.py                # 1M x 128, about 3 minutes on 2 cores
    python benchmarks/bench_foundation.py --quick        # 4096 rows, a few seconds (CI smoke)
    python benchmarks/bench_foundation.py --filter pack_bits,hadamard --rows 262144

Writes ``benchmarks/results/foundation.json`` (``foundation-quick.json`` with ``--quick``)
atomically; ``--json PATH`` picks another file.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "foundation.json"
QUICK_JSON = HERE / "results" / "foundation-quick.json"
SCHEMA = "latkv-bench-foundation/1"

DIM = 128
DEFAULT_ROWS = 1 << 20
QUICK_ROWS = 4096
DEFAULT_REFERENCE_ROWS = 1 << 16
TAIL_VALIDATION_ROWS = 8192
MIN_ROUNDS = 5
SCALAR_BITS = 4
SCALAR_GROUP = 32
CHANNEL_BATCH = 8
#: rows are cut at multiples of this: 8 batches x 32-token groups for the channel-axis layout
ALIGN = CHANNEL_BATCH * SCALAR_GROUP
RTOL = 1e-5
ATOL_SCALE = 1e-5


# -- the benchmark description ----------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One thing that is timed: ``fn(input) -> output``.

    ``validate`` entries must reproduce the reference on the benchmark's input. Baselines that
    compute something else (a dtype cast) set ``validate=False`` and may ``prepare`` their own
    input from the benchmark's (untimed).
    """

    name: str
    fn: Callable[[Any], Any]
    validate: bool = True
    prepare: Callable[[Any], Any] | None = None
    note: str = ""


@dataclass(frozen=True)
class Benchmark:
    name: str
    group: str
    description: str
    input_name: str
    make_input: Callable[[int, np.random.Generator], Any]  # the input generator
    reference: Entry  # the validator: the NumPy reference, also timed
    implementations: tuple[Entry, ...]
    baselines: tuple[Entry, ...] = ()
    #: rows [lo, hi) of an input / an output, as a C-contiguous copy (lo, hi multiples of ALIGN)
    take_input: Callable[[Any, int, int], Any] = field(default=None)  # type: ignore[assignment]
    take_output: Callable[[Any, int, int], Any] = field(default=None)  # type: ignore[assignment]


# -- rows of arrays and codes ----------------------------------------------------------------


def take_rows(a: Any, lo: int, hi: int) -> Any:
    """Rows ``[lo, hi)`` of a ``(rows, ...)`` array, contiguous."""
    return np.ascontiguousarray(a[lo:hi])


def take_tokens(a: Any, lo: int, hi: int) -> Any:
    """Rows ``[lo, hi)`` of a ``(CHANNEL_BATCH, rows / CHANNEL_BATCH, dim)`` array, counting
    rows as batch x tokens: tokens ``[lo / 8, hi / 8)`` of every batch."""
    return np.ascontiguousarray(a[:, lo // CHANNEL_BATCH : hi // CHANNEL_BATCH])


def take_codes(axis: str) -> Callable[[Any, int, int], Any]:
    """Rows ``[lo, hi)`` of ScalarQuant codes (token or channel layout)."""
    from latkv.container import Codes

    def take(codes: Any, lo: int, hi: int) -> Any:
        if axis == "token":
            arrays = {k: take_rows(v, lo, hi) for k, v in codes.arrays.items()}
            shape = (hi - lo, *codes.shape[1:])
        else:
            t0, t1 = lo // CHANNEL_BATCH, hi // CHANNEL_BATCH
            g0, g1 = t0 // SCALAR_GROUP, t1 // SCALAR_GROUP
            arrays = {
                "packed": np.ascontiguousarray(codes["packed"][:, t0:t1]),
                "scale": np.ascontiguousarray(codes["scale"][:, g0:g1]),
                "zero": np.ascontiguousarray(codes["zero"][:, g0:g1]),
            }
            shape = (codes.shape[0], t1 - t0, codes.shape[2])
        return Codes(codes.method, dict(codes.params), shape, codes.dtype, arrays)

    return take


def nbytes(x: Any) -> int:
    """Bytes of an array or of ``Codes`` (all its arrays)."""
    return int(x.nbytes)


# -- validation --------------------------------------------------------------------------------


def _arrays(x: Any) -> dict[str, Any]:
    if isinstance(x, np.ndarray):
        return {"": x}
    arrays = getattr(x, "arrays", None)
    if arrays is not None:
        return dict(arrays)
    raise TypeError(f"cannot validate an output of type {type(x).__name__}")


def compare(expected: Any, actual: Any) -> dict[str, Any]:
    """Integer arrays bit-exact; float arrays allclose(rtol=1e-5, atol=1e-5 * max|expected|).

    Returns ``{"ok", "exact", "max_abs_diff", "detail"}``.
    """
    want, got = _arrays(expected), _arrays(actual)
    if set(want) != set(got):
        return {"ok": False, "exact": False, "max_abs_diff": None,
                "detail": f"arrays {sorted(got)} != expected {sorted(want)}"}
    if hasattr(expected, "shape") and tuple(expected.shape) != tuple(actual.shape):
        return {"ok": False, "exact": False, "max_abs_diff": None,
                "detail": f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"}
    exact, worst = True, 0.0
    for key in sorted(want):
        e, a = np.asarray(want[key]), np.asarray(got[key])
        label = f"array {key!r}: " if key else ""
        if e.shape != a.shape or e.dtype != a.dtype:
            return {"ok": False, "exact": False, "max_abs_diff": None,
                    "detail": f"{label}{a.shape} {a.dtype} != expected {e.shape} {e.dtype}"}
        if e.dtype.kind in "uib":
            if not np.array_equal(e, a):
                bad = np.flatnonzero(e.reshape(-1) != a.reshape(-1))
                return {"ok": False, "exact": False, "max_abs_diff": None,
                        "detail": f"{label}{bad.size} of {e.size} values differ "
                                  f"(first at flat index {int(bad[0])})"}
            continue
        e64, a64 = e.astype(np.float64), a.astype(np.float64)
        scale = float(np.abs(e64).max()) if e64.size else 0.0
        atol = ATOL_SCALE * (scale if scale > 0 else 1.0)
        diff = np.abs(a64 - e64)
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
        exact = exact and bool(np.array_equal(e, a))
        if not np.allclose(a64, e64, rtol=RTOL, atol=atol, equal_nan=False):
            bad = int(np.count_nonzero(diff > atol + RTOL * np.abs(e64)))
            return {"ok": False, "exact": False, "max_abs_diff": float(diff.max()),
                    "detail": f"{label}{bad} of {e.size} values outside rtol={RTOL}, "
                              f"atol={atol:.3g} (max |diff| {float(diff.max()):.3g})"}
    return {"ok": True, "exact": exact, "max_abs_diff": worst, "detail": ""}


# -- the benchmarks --------------------------------------------------------------------------


def packing_benchmarks() -> list[Benchmark]:
    from latkv.packing import pack_bits, packed_length, unpack_bits

    out = []
    for bits in range(1, 9):
        def codes_input(rows: int, rng: np.random.Generator, bits: int = bits) -> np.ndarray:
            return rng.integers(0, 1 << bits, size=(rows, DIM), dtype=np.uint8)

        def pack(backend: str, bits: int = bits) -> Callable[[Any], Any]:
            return lambda c: pack_bits(c, bits, backend=backend, check=False)

        baselines = ()
        if bits == 1:
            baselines = (Entry("np.packbits",
                               lambda c: np.packbits(c, axis=-1, bitorder="little"),
                               note="np.packbits(codes, axis=-1, bitorder='little')"),)
        out.append(Benchmark(
            name=f"pack_bits[bits={bits}]", group="packing",
            description=f"pack (rows, {DIM}) {bits}-bit codes, LSB-first",
            input_name=f"uniform random codes in [0, 2**{bits}), (rows, {DIM}) uint8",
            make_input=codes_input,
            reference=Entry("numpy", pack("numpy"), note="pack_bits(..., backend='numpy')"),
            implementations=(Entry("numba", pack("numba"), note="pack_bits(..., backend='numba')"),),
            baselines=baselines, take_input=take_rows, take_output=take_rows,
        ))

    for bits in range(1, 9):
        width = packed_length(DIM, bits)

        def packed_input(rows: int, rng: np.random.Generator, width: int = width) -> np.ndarray:
            # DIM * bits is a multiple of 8, so every byte pattern is a valid packing
            return rng.integers(0, 256, size=(rows, width), dtype=np.uint8)

        def unpack(backend: str, bits: int = bits) -> Callable[[Any], Any]:
            return lambda p: unpack_bits(p, bits, DIM, backend=backend)

        baselines = ()
        if bits == 1:
            baselines = (Entry("np.unpackbits",
                               lambda p: np.unpackbits(p, axis=-1, count=DIM, bitorder="little"),
                               note="np.unpackbits(packed, axis=-1, count=128, bitorder='little')"),)
        out.append(Benchmark(
            name=f"unpack_bits[bits={bits}]", group="packing",
            description=f"unpack (rows, {width}) bytes into {DIM} {bits}-bit codes",
            input_name=f"uniform random bytes, (rows, {width}) uint8",
            make_input=packed_input,
            reference=Entry("numpy", unpack("numpy"), note="unpack_bits(..., backend='numpy')"),
            implementations=(Entry("numba", unpack("numba"),
                                   note="unpack_bits(..., backend='numba')"),),
            baselines=baselines, take_input=take_rows, take_output=take_rows,
        ))
    return out


def rotation_benchmarks() -> list[Benchmark]:
    import scipy.linalg

    from latkv.rotations import Hadamard, RandomizedHadamard

    def gaussian(dim: int) -> Callable[[int, np.random.Generator], np.ndarray]:
        def make(rows: int, rng: np.random.Generator) -> np.ndarray:
            return rng.standard_normal((rows, dim), dtype=np.float32)
        return make

    def apply(rotation: Any, backend: str) -> Callable[[Any], Any]:
        return lambda x: rotation.apply(x, backend=backend)

    def matmul(matrix: np.ndarray) -> Callable[[Any], Any]:
        return lambda x: x @ matrix

    hadamard = Hadamard(DIM)
    dense_h = (scipy.linalg.hadamard(DIM) / np.sqrt(DIM)).astype(np.float32)
    out = [Benchmark(
        name=f"hadamard[dim={DIM}]", group="rotations",
        description=f"Hadamard({DIM}).apply: orthonormal FWHT of each row",
        input_name=f"standard normal, (rows, {DIM}) float32",
        make_input=gaussian(DIM),
        reference=Entry("numpy", apply(hadamard, "numpy"), note="backend='numpy'"),
        implementations=(Entry("numba", apply(hadamard, "numba"), note="backend='numba'"),),
        baselines=(Entry("dense_matmul", matmul(dense_h),
                         note=f"x @ (scipy.linalg.hadamard({DIM}) / sqrt({DIM})) float32, BLAS"),),
        take_input=take_rows, take_output=take_rows,
    )]
    for dim in (96, DIM):
        rotation = RandomizedHadamard(dim, seed=0)
        dense = np.ascontiguousarray(rotation.matrix().T.astype(np.float32))
        stages = "two overlapping FWHTs of 64 after a permutation" if dim == 96 else "signs + FWHT"
        out.append(Benchmark(
            name=f"randomized_hadamard[dim={dim}]", group="rotations",
            description=f"RandomizedHadamard({dim}, seed=0).apply ({stages})",
            input_name=f"standard normal, (rows, {dim}) float32",
            make_input=gaussian(dim),
            reference=Entry("numpy", apply(rotation, "numpy"), note="backend='numpy'"),
            implementations=(Entry("numba", apply(rotation, "numba"), note="backend='numba'"),),
            baselines=(Entry("dense_matmul", matmul(dense),
                             note="x @ rotation.matrix().T as float32, BLAS"),),
            take_input=take_rows, take_output=take_rows,
        ))
    return out


def scalar_benchmarks() -> list[Benchmark]:
    from latkv.container import Codes
    from latkv.scalar import ScalarQuant

    out = []
    for axis in ("token", "channel"):
        qz = ScalarQuant(DIM, bits=SCALAR_BITS, group=SCALAR_GROUP, axis=axis)
        take = take_rows if axis == "token" else take_tokens
        shape_text = f"(rows, {DIM})" if axis == "token" else f"({CHANNEL_BATCH}, rows/{CHANNEL_BATCH}, {DIM})"

        def shape_of(rows: int, axis: str = axis) -> tuple[int, ...]:
            if axis == "token":
                return (rows, DIM)
            return (CHANNEL_BATCH, rows // CHANNEL_BATCH, DIM)

        def gaussian(rows: int, rng: np.random.Generator, shape_of=shape_of) -> np.ndarray:
            return rng.standard_normal(shape_of(rows), dtype=np.float32)

        def random_codes(rows: int, rng: np.random.Generator, qz=qz, shape_of=shape_of) -> Any:
            shape = shape_of(rows)
            layout = qz.code_layout(shape)
            arrays = {
                "packed": rng.integers(0, 256, size=layout["packed"][0], dtype=np.uint8),
                "scale": rng.uniform(0.01, 0.1, size=layout["scale"][0]).astype(np.float16),
                "zero": rng.uniform(-1.0, 0.0, size=layout["zero"][0]).astype(np.float16),
            }
            return Codes(qz.name, qz.params, shape, "float32", arrays)

        def encode(backend: str, qz=qz) -> Callable[[Any], Any]:
            return lambda x: qz.encode(x, backend=backend)

        def decode(backend: str, qz=qz) -> Callable[[Any], Any]:
            return lambda c: qz.decode(c, backend=backend)

        def fp16_like_output(codes: Any) -> np.ndarray:
            rng = np.random.default_rng(1)
            return rng.standard_normal(tuple(codes.shape), dtype=np.float32).astype(np.float16)

        label = f"bits={SCALAR_BITS},group={SCALAR_GROUP},axis={axis}"
        out.append(Benchmark(
            name=f"scalar_encode[{label}]", group="scalar",
            description=f"ScalarQuant({DIM}, {label}).encode of {shape_text} float32",
            input_name=f"standard normal, {shape_text} float32",
            make_input=gaussian,
            reference=Entry("numpy", encode("numpy"), note="backend='numpy'"),
            implementations=(Entry("numba", encode("numba"), note="backend='numba'"),),
            baselines=(Entry("astype_fp16", lambda x: x.astype(np.float16), validate=False,
                             note="x.astype(np.float16): the uncompressed fp16 cache"),),
            take_input=take, take_output=take_codes(axis),
        ))
        out.append(Benchmark(
            name=f"scalar_decode[{label}]", group="scalar",
            description=f"ScalarQuant({DIM}, {label}).decode to {shape_text} float32",
            input_name=f"random codes of {shape_text}: uniform packed bytes, fp16 scale in "
                       "[0.01, 0.1], fp16 zero in [-1, 0]",
            make_input=random_codes,
            reference=Entry("numpy", decode("numpy"), note="backend='numpy'"),
            implementations=(Entry("numba", decode("numba"), note="backend='numba'"),),
            baselines=(Entry("astype_fp32", lambda h: h.astype(np.float32), validate=False,
                             prepare=fp16_like_output,
                             note="h.astype(np.float32) of an fp16 array of the output's shape"),),
            take_input=take_codes(axis), take_output=take,
        ))
    return out


def all_benchmarks() -> list[Benchmark]:
    return packing_benchmarks() + rotation_benchmarks() + scalar_benchmarks()


# -- timing ----------------------------------------------------------------------------------


def time_calls(fn: Callable[[Any], Any], arg: Any, number: int) -> float:
    """Seconds per call, over ``number`` back-to-back calls with the garbage collector off."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(number):
            fn(arg)
        elapsed = time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()
    return elapsed / number


def summary(samples: list[float]) -> dict[str, float]:
    med = statistics.median(samples)
    return {"median": med, "min": min(samples), "max": max(samples)}


@dataclass
class Run:
    """State of one entry while its benchmark runs."""

    entry: Entry
    role: str  # "reference", "implementation", "baseline"
    arg: Any = None
    rows: int = 0
    number: int = 1
    input_bytes: int = 0
    samples: list[float] = field(default_factory=list)
    status: str = "ok"
    reason: str = ""
    validation: dict[str, Any] | None = None


def _error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 300 else text[:297] + "..."


def run_benchmark(bench: Benchmark, settings: dict[str, Any], log: Callable[[str], None]) -> dict:
    rows, reference_rows = settings["rows"], settings["reference_rows"]
    rounds, min_time = settings["rounds"], settings["min_sample_time"]
    rng = np.random.default_rng([settings["seed"], zlib.crc32(bench.name.encode())])
    started = time.perf_counter()
    data = bench.make_input(rows, rng)

    runs = [Run(bench.reference, "reference")]
    runs += [Run(e, "implementation") for e in bench.implementations]
    runs += [Run(e, "baseline") for e in bench.baselines]

    # The reference: warm up on a small piece, then run on the timed rows. Its outputs there
    # and on the tail window are what every validated entry is checked against.
    head_rows = reference_rows
    tail_lo = max(head_rows, rows - TAIL_VALIDATION_ROWS)
    reference = runs[0]
    reference.rows = head_rows
    reference.arg = data if head_rows == rows else bench.take_input(data, 0, head_rows)
    reference.input_bytes = nbytes(reference.arg)
    expected: list[tuple[int, int, Any]] = []
    try:
        bench.reference.fn(bench.take_input(data, 0, ALIGN))
        t0 = time.perf_counter()
        expected.append((0, head_rows, bench.reference.fn(reference.arg)))
        reference.number = max(1, math.ceil(min_time / max(time.perf_counter() - t0, 1e-9)))
        if tail_lo < rows:
            tail = bench.reference.fn(bench.take_input(data, tail_lo, rows))
            expected.append((tail_lo, rows, tail))
    except Exception as error:  # noqa: BLE001 - reported, not raised
        reference.status, reference.reason = "refused", "reference failed: " + _error_text(error)
    validated_rows = sum(hi - lo for lo, hi, _ in expected)

    for run in runs[1:]:
        entry = run.entry
        run.rows = rows
        if reference.status != "ok" and entry.validate:
            run.status, run.reason = "refused", "no reference output to validate against"
            continue
        try:
            run.arg = entry.prepare(data) if entry.prepare is not None else data
            run.input_bytes = nbytes(run.arg)
            # JIT compilation on a small piece, then one full-size call (validated).
            small = bench.take_input(run.arg, 0, ALIGN) if entry.prepare is None else run.arg
            entry.fn(small)
            t0 = time.perf_counter()
            output = entry.fn(run.arg)
            run.number = max(1, math.ceil(min_time / max(time.perf_counter() - t0, 1e-9)))
        except Exception as error:  # noqa: BLE001
            run.status, run.reason = "refused", "raised " + _error_text(error)
            run.arg = None
            continue
        if entry.validate:
            checks = [compare(want, bench.take_output(output, lo, hi)) for lo, hi, want in expected]
            failed = [c for c in checks if not c["ok"]]
            run.validation = {
                "ok": not failed,
                "exact": all(c["exact"] for c in checks),
                "max_abs_diff": (None if any(c["max_abs_diff"] is None for c in checks)
                                 else max(c["max_abs_diff"] for c in checks)),
                "rows_checked": validated_rows,
            }
            if failed:
                run.status = "refused"
                run.reason = "output differs from the reference: " + failed[0]["detail"]
                run.validation["detail"] = failed[0]["detail"]
                run.arg = None
        del output
    del expected

    timed = [r for r in runs if r.status == "ok"]
    for index in range(rounds):
        shift = index % len(timed) if timed else 0
        for run in timed[shift:] + timed[:shift]:
            run.samples.append(time_calls(run.entry.fn, run.arg, run.number))
    for run in runs:
        run.arg = None

    result = report(bench, runs, rows, validated_rows)
    result["wall_s"] = time.perf_counter() - started
    for run in runs:
        if run.status != "ok":
            log(f"  REFUSED {bench.name} / {run.entry.name}: {run.reason}")
    return result


def report(bench: Benchmark, runs: list[Run], rows: int, validated_rows: int) -> dict[str, Any]:
    """The JSON record of one benchmark: per entry timings, throughput and ratios."""
    reference = runs[0]
    baselines = [r for r in runs if r.role == "baseline" and r.status == "ok"]

    def per_row(run: Run) -> list[float]:
        return [s / run.rows for s in run.samples]

    def ratio(slow: Run, fast: Run) -> dict[str, float]:
        slow_rows, fast_rows = per_row(slow), per_row(fast)
        paired = [a / b for a, b in zip(slow_rows, fast_rows)]
        return {"median": statistics.median(slow_rows) / statistics.median(fast_rows),
                "min": min(paired), "max": max(paired)}

    entries = []
    for run in runs:
        record: dict[str, Any] = {
            "name": run.entry.name, "role": run.role, "call": run.entry.note,
            "status": run.status, "rows": run.rows,
        }
        if run.validation is not None:
            record["validation"] = run.validation
        if run.status != "ok":
            record["reason"] = run.reason
            entries.append(record)
            continue
        stats = summary(run.samples)
        size = run.input_bytes
        record.update({
            "input_bytes": size,
            "calls_per_sample": run.number,
            "samples_s": run.samples,
            "median_s": stats["median"],
            "min_s": stats["min"],
            "max_s": stats["max"],
            "spread": (stats["max"] - stats["min"]) / stats["median"],
            "ns_per_row": 1e9 * stats["median"] / run.rows,
            "throughput_gbs": size / stats["median"] / 1e9,
        })
        if run.rows != rows:
            record["median_s_scaled_to_rows"] = stats["median"] * rows / run.rows
        if run.role != "reference":
            if reference.status == "ok":
                record["speedup_vs_reference"] = ratio(reference, run)
            if run.role == "implementation" and baselines:
                record["vs_baseline"] = {b.entry.name: ratio(b, run) for b in baselines}
        entries.append(record)
    return {
        "name": bench.name, "group": bench.group, "description": bench.description,
        "input": bench.input_name, "rows": rows,
        "validator": f"{bench.reference.name}: {bench.reference.note}",
        "validation_rule": f"integer outputs bit-exact; float outputs allclose rtol={RTOL}, "
                           f"atol={ATOL_SCALE} * max|reference|",
        "rows_validated": validated_rows,
        "entries": entries,
    }


# -- machine, table, JSON --------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _blas() -> str | None:
    try:
        config = np.show_config(mode="dicts")  # numpy >= 2
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version', '')}".strip()
    except Exception:  # noqa: BLE001 - informational only
        return None


def _git() -> dict[str, Any] | None:
    try:
        root = HERE.parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
        return {"commit": commit, "dirty": bool(dirty)}
    except Exception:  # noqa: BLE001
        return None


def machine_info() -> dict[str, Any]:
    import numba
    import scipy

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel function has run yet
        layer = None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": layer,
        "blas": _blas(),
        "git": _git(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _ratio_text(ratio: dict[str, float] | None) -> str:
    if not ratio:
        return ""
    return f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})"


def format_table(results: list[dict[str, Any]]) -> str:
    header = ("benchmark", "entry", "rows", "median ms", "spread", "GB/s",
              "vs reference", "vs baseline")
    lines = []
    for bench in results:
        for index, entry in enumerate(bench["entries"]):
            name = bench["name"] if index == 0 else ""
            label = entry["name"] + (" (ref)" if entry["role"] == "reference" else "")
            label += " (base)" if entry["role"] == "baseline" else ""
            if entry["status"] != "ok":
                lines.append((name, label, str(entry["rows"]), "REFUSED", "", "", "",
                              entry.get("reason", "")[:60]))
                continue
            baseline = "; ".join(f"{_ratio_text(r)} {k}"
                                 for k, r in entry.get("vs_baseline", {}).items())
            lines.append((
                name, label, str(entry["rows"]), f"{1e3 * entry['median_s']:.2f}",
                f"{100 * entry['spread']:.0f}%", f"{entry['throughput_gbs']:.2f}",
                _ratio_text(entry.get("speedup_vs_reference")), baseline,
            ))
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    right = {2, 3, 4, 5}

    def fmt(row: tuple[str, ...]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(r) for r in lines)])


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same folder, then
    ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(payload, file, indent=1)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; give the usual mode
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


# -- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time latkv's numba fast paths against the NumPy reference and plain "
                    "NumPy/BLAS baselines (ratios measured in the same run).")
    parser.add_argument("--rows", type=int, default=None,
                        help=f"rows of {DIM} values per input (default {DEFAULT_ROWS}; "
                             f"a multiple of {ALIGN})")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_ROWS} rows: a smoke run of a few seconds (tests, CI)")
    parser.add_argument("--reference-rows", type=int, default=None,
                        help=f"rows the NumPy reference is timed on (default "
                             f"min(rows, {DEFAULT_REFERENCE_ROWS})); 0 = all rows")
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS,
                        help=f"interleaved timing rounds, at least {MIN_ROUNDS} (default "
                             f"{MIN_ROUNDS})")
    parser.add_argument("--min-sample-time", type=float, default=None,
                        help="repeat fast calls within a sample until it lasts this many "
                             "seconds (default 0.02; 0.002 with --quick)")
    parser.add_argument("--filter", default="",
                        help="comma-separated substrings; run the benchmarks whose name "
                             "contains one (e.g. 'pack_bits,hadamard')")
    parser.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"output file (default {DEFAULT_JSON.relative_to(HERE.parent)}, "
                             f"or {QUICK_JSON.relative_to(HERE.parent)} with --quick)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.rows is None:
        args.rows = QUICK_ROWS if args.quick else DEFAULT_ROWS
    if args.rows < ALIGN or args.rows % ALIGN:
        parser.error(f"--rows must be a positive multiple of {ALIGN}, got {args.rows}")
    if args.reference_rows is None:
        args.reference_rows = min(args.rows, DEFAULT_REFERENCE_ROWS)
    elif args.reference_rows == 0:
        args.reference_rows = args.rows
    if not ALIGN <= args.reference_rows <= args.rows or args.reference_rows % ALIGN:
        parser.error(f"--reference-rows must be 0 or a multiple of {ALIGN} in "
                     f"[{ALIGN}, {args.rows}], got {args.reference_rows}")
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS} (medians of fewer rounds are "
                     "too noisy on shared machines)")
    if args.min_sample_time is None:
        args.min_sample_time = 0.002 if args.quick else 0.02
    if args.json is None:
        args.json = QUICK_JSON if args.quick else DEFAULT_JSON
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    benchmarks = all_benchmarks()
    if args.filter:
        wanted = [w.strip() for w in args.filter.split(",") if w.strip()]
        benchmarks = [b for b in benchmarks if any(w in b.name for w in wanted)]
    if args.list:
        for bench in benchmarks:
            print(f"{bench.name:44s} {bench.description}")
        return 0
    if not benchmarks:
        print(f"no benchmark matches --filter {args.filter!r}", file=sys.stderr)
        return 2

    settings = {
        "rows": args.rows, "dim": DIM, "reference_rows": args.reference_rows,
        "rounds": args.rounds, "min_sample_time": args.min_sample_time, "seed": args.seed,
        "quick": args.quick, "filter": args.filter or None,
        "tail_validation_rows": min(TAIL_VALIDATION_ROWS, args.rows - args.reference_rows),
        "command": [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)],
    }

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log(f"latkv foundation benchmarks: {len(benchmarks)} benchmarks, {args.rows} rows "
        f"(reference on {args.reference_rows}), {args.rounds} rounds")
    started = time.perf_counter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = []
    for bench in benchmarks:
        result = run_benchmark(bench, settings, log)
        results.append(result)
        log(f"  {bench.name:44s} {result['wall_s']:6.1f} s")
    duration = time.perf_counter() - started

    machine = machine_info()
    machine["load_average_before"] = load_before
    machine["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
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
    write_json(args.json, payload)

    print(format_table(results))
    print(f"\n{machine['cpu']}, {machine['cpus_usable']} CPUs, numpy {machine['numpy']}, "
          f"numba {machine['numba']} ({machine['numba_threads']} threads); load "
          f"{load_before[0] if load_before else '?'} -> "
          f"{machine['load_average_after'][0] if load_before else '?'}; "
          f"{duration:.0f} s")
    print("median ms: per call; spread: (max - min) / median over rounds; ratios: time per row, "
          "ratio of medians (min-max of per-round paired ratios)")
    print(f"wrote {args.json}")
    if refused:
        print(f"REFUSED (not timed): {', '.join(refused)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
