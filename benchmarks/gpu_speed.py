"""GPU speed of latkv's kernels, as ratios measured in one run on one device.

Four sections (``--only``), each a list of *groups*; the entries of a group are checked first
(against the NumPy reference, or float64 attention), then timed in interleaved rounds with
CUDA events (``--rounds``, at least 7 for reported figures: median, min, max, spread):

* ``codec``: pack/unpack (bits 1, 2, 3, 4, 8), the randomized Hadamard rotation, and encode and
  decode of every fixed-rate method with GPU kernels (`CODEC_SPECS`), on ``--rows`` x 128
  float16 vectors (default 2**20: 256 MiB, past the 50-60 MB L2), through the CuPy kernels
  and the numba.cuda kernels (`NUMBA_CUDA_METHODS`: the methods that have numba.cuda kernels
  of their own; packing timed without the public range check), each against an in-run
  device-to-device copy of the input
  (``cudaMemcpy``): ``fraction_of_copy_bandwidth`` = (bytes read + written) / time over the
  copy's. Codes must be bit-identical to the NumPy reference on the first and last 4096 rows;
  decoded values within float32 rounding.
* ``attention``: one decode step of `latkv.KVCache` (batch 1 and 8, 8 KV heads, GQA 4, head
  dim 128, 8k/32k/128k tokens, everything compressed in blocks of 128) from 4-bit and 2-bit
  TurboQuant keys and values, CuPy and numba.cuda, against fp16 attention of the same shape
  (`fp16_attention`: two strided-batched cuBLAS float16 GEMMs with float32 accumulation and
  logits, a float32 softmax) and an in-run copy of the fp16 keys. Caches smaller
  than 256 MiB are replicated so that consecutive calls rotate through >= 256 MiB (no call
  runs from L2). Checked against float64 attention over the decoded cache (batch 0).
* ``onnx``: the standard-flavour graphs (encode, decode, attention) in an onnxruntime session
  with the CUDA execution provider, inputs and outputs bound on the device, against latkv's
  CuPy path on the same arrays. Recorded as skipped where onnxruntime has no CUDA provider.

Targets from issue 12 are recorded with each figure (``targets``: value, bound, met), never
asserted: ``>= 0.5`` of copy bandwidth for the codecs at 1M x 128; attention from 4-bit codes
``<= 0.65`` of the fp16 time at >= 256 MiB of fp16 KV and ``<= 1.05`` at batch 1, from 2-bit
codes ``<= 0.5``; the fp16 baseline itself ``>= 0.7`` of copy bandwidth.

    python benchmarks/gpu_speed.py [--quick] [--only codec,attention,onnx]
        [--out benchmarks/results/gpu-<device>.json] [--markdown docs/benchmarks/gpu-<device>.md]

Without a CUDA device with CuPy it exits with status 2 and says so. ``--cpu`` runs the same
code on NumPy arrays with the numba backend and a host clock (a dry run of the script's
logic, for tests; its numbers are not GPU figures). Exit status 0 when every entry was
checked and timed, 1 when some entry was refused or failed (the JSON says why).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

import latkv
from latkv.cli import machine_description

DIM, KV_HEADS, GROUP, BLOCK = 128, 8, 4, 128
CODEC_SPECS = ("scalar:4", "scalar:2", "turbo:4", "turbo:2", "qjl:256", "polar:4", "e8:4")
#: methods whose encode and decode run numba.cuda kernels of their own under
#: ``backend="numba.cuda"`` (ScalarQuant's and QJL's arithmetic is CuPy's under either
#: backend, only their packing differs, so a numba.cuda entry would time CuPy)
NUMBA_CUDA_METHODS = ("turbo", "polar", "e8")
PACK_BITS = (1, 2, 3, 4, 8)
ATTENTION_PAIRS = {"4-bit": "turbo:4|turbo:4", "2-bit": "turbo:2|turbo:2"}
ATTENTION_TOKENS = (8192, 32768, 131072)
ATTENTION_BATCHES = (1, 8)
ONNX_SPECS = ("turbo:4", "scalar:4")
ONNX_STEPS = ("encode", "decode", "attention")
WORKING_SET = 256 << 20          # bytes: past the L2 of an H100 (50 MB) or H200 (60 MB)
SAMPLE_ROWS = 4096               # rows checked against the reference at each end
MIN_REPORTED_ROUNDS = 7


# ---------------------------------------------------------------- the platform


@dataclass
class Platform:
    """Where the run happens: CuPy on a device, or NumPy on the host (``--cpu`` dry run)."""

    xp: Any
    backends: tuple[str, ...]
    device: str
    on_gpu: bool

    def host(self, array: Any) -> np.ndarray:
        return self.xp.asnumpy(array) if self.on_gpu else np.asarray(array)

    def synchronize(self) -> None:
        if self.on_gpu:
            self.xp.cuda.get_current_stream().synchronize()

    def seconds(self, call: Callable[[], Any], repeats: int) -> float:
        """Time of one call, averaged over ``repeats`` back-to-back calls: CUDA events on the
        device (so host-side gaps between launches count, as they would for a user), the host
        clock otherwise."""
        if self.on_gpu:
            cuda = self.xp.cuda
            start, end = cuda.Event(), cuda.Event()
            start.record()
            for _ in range(repeats):
                call()
            end.record()
            end.synchronize()
            return cuda.get_elapsed_time(start, end) / 1e3 / repeats
        begin = time.perf_counter()
        for _ in range(repeats):
            call()
        return (time.perf_counter() - begin) / repeats

    def copy(self, source: Any) -> Callable[[], Any]:
        """A call that copies ``source`` to a buffer of its size: cudaMemcpy device-to-device
        on the GPU, ``np.copyto`` on the host."""
        target = self.xp.empty_like(source)
        if self.on_gpu:
            nbytes = source.nbytes
            return lambda: target.data.copy_from_device_async(source.data, nbytes)
        return lambda: np.copyto(target, source)

    def free(self) -> None:
        if self.on_gpu:
            self.synchronize()
            self.xp.get_default_memory_pool().free_all_blocks()


def gpu_platform() -> Platform | None:
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        properties = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    except Exception:  # noqa: BLE001 - no CuPy, no driver, no device: all mean "no GPU"
        return None
    name = properties["name"]
    return Platform(cupy, ("cupy", "numba.cuda"),
                    name.decode() if isinstance(name, bytes) else str(name), True)


def cpu_platform() -> Platform:
    return Platform(np, ("numba",), "cpu (dry run: not GPU figures)", False)


def device_slug(device: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"`` (file names)."""
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "device"


def device_description(platform: Platform) -> dict[str, Any]:
    description: dict[str, Any] = {"device": platform.device}
    if platform.on_gpu:
        cupy = platform.xp
        runtime = cupy.cuda.runtime
        properties = runtime.getDeviceProperties(cupy.cuda.Device().id)
        description.update(
            cupy=cupy.__version__, cuda_runtime=runtime.runtimeGetVersion(),
            cuda_driver=runtime.driverGetVersion(),
            multiprocessors=properties["multiProcessorCount"],
            l2_bytes=properties["l2CacheSize"],
            memory_bytes=properties["totalGlobalMem"])
        try:
            import numba.cuda

            description["numba_cuda"] = getattr(numba.cuda, "__version__", None)
        except Exception:  # noqa: BLE001 - recorded, not needed
            pass
    return description


# ---------------------------------------------------------------- timing


def summary(samples: list[float]) -> dict[str, float]:
    median = statistics.median(samples)
    return {"median_s": median, "min_s": min(samples), "max_s": max(samples),
            "spread": (max(samples) - min(samples)) / median if median > 0 else math.inf}


def interleaved_rounds(calls: dict[str, Callable[[], Any]], rounds: int,
                       seconds: Callable[[Callable[[], Any], int], float],
                       min_sample_s: float) -> dict[str, list[float]]:
    """Time every call once per round, each round starting from the next call.

    Each call is first timed once to pick its repeats (a sample lasts at least
    ``min_sample_s``); ``seconds(call, repeats)`` returns the time of one call.
    """
    names = list(calls)
    repeats = {}
    for name in names:
        once = seconds(calls[name], 1)
        repeats[name] = max(1, math.ceil(min_sample_s / once)) if once > 0 else 1
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        for offset in range(len(names)):
            name = names[(round_index + offset) % len(names)]
            samples[name].append(seconds(calls[name], repeats[name]))
    return samples


def time_ratio(samples: dict[str, list[float]], numerator: str,
               denominator: str) -> dict[str, float]:
    """``median(numerator) / median(denominator)``, with the extremes of the per-round
    ratios (the rounds interleave the two, so a round's pair saw the same machine state)."""
    paired = [a / b for a, b in zip(samples[numerator], samples[denominator])]
    return {"median": statistics.median(samples[numerator]) / statistics.median(
        samples[denominator]), "min": min(paired), "max": max(paired)}


def target(value: float, bound: float, kind: str) -> dict[str, Any]:
    """A recorded target: ``kind`` is ``"<="`` or ``">="``."""
    met = value <= bound if kind == "<=" else value >= bound
    return {"value": value, "bound": bound, "kind": kind, "met": bool(met)}


# ---------------------------------------------------------------- groups


@dataclass
class Entry:
    name: str
    call: Callable[[], Any]
    bytes_moved: int              # read + written, for the bandwidth figures
    check: Callable[[], dict[str, Any]] | None = None   # raises AssertionError when wrong


@dataclass
class Group:
    section: str
    name: str
    description: str
    entries: list[Entry]
    copy_entry: str | None = None         # the entry that moves bytes at copy bandwidth
    ratios: list[tuple[str, str]] = field(default_factory=list)    # (numerator, denominator)
    targets: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def run_group(group: Group, platform: Platform, settings: argparse.Namespace,
              log: Callable[[str], None]) -> dict[str, Any]:
    result: dict[str, Any] = {"section": group.section, "name": group.name,
                              "description": group.description, **group.info, "entries": {}}
    calls = {}
    for entry in group.entries:
        record: dict[str, Any] = {"bytes_moved": entry.bytes_moved}
        try:
            entry.call()                         # warm-up: compilation, module load, pools
            platform.synchronize()
            if entry.check is not None:
                record["check"] = entry.check()
            record["status"] = "checked"
            calls[entry.name] = entry.call
        except AssertionError as error:
            record.update(status="refused", reason=str(error)[:500])
        except Exception as error:  # noqa: BLE001 - one broken entry must not stop the run
            record.update(status="failed", reason=f"{type(error).__name__}: {error}"[:500],
                          traceback=traceback.format_exc(limit=6)[-2000:])
        result["entries"][entry.name] = record
        if record["status"] != "checked":
            log(f"  {group.name} / {entry.name}: {record['status']}: {record['reason']}")
    if calls:
        samples = interleaved_rounds(calls, settings.rounds, platform.seconds,
                                     settings.min_sample_s)
        for name, times in samples.items():
            record = result["entries"][name]
            record.update(status="timed", samples_s=times, **summary(times))
            record["bandwidth_gb_s"] = record["bytes_moved"] / record["median_s"] / 1e9
        copy = result["entries"].get(group.copy_entry or "")
        if copy and copy.get("status") == "timed":
            for record in result["entries"].values():
                if record.get("status") == "timed":
                    record["fraction_of_copy_bandwidth"] = (
                        record["bandwidth_gb_s"] / copy["bandwidth_gb_s"])
        result["ratios"] = {f"{a}/{b}": time_ratio(samples, a, b)
                            for a, b in group.ratios if a in samples and b in samples}
        if group.targets is not None:
            result["targets"] = group.targets(result)
    return result


# ---------------------------------------------------------------- checks


def sample_rows(rows: int) -> np.ndarray:
    """The first and the last `SAMPLE_ROWS` rows (the first grid-stride round, the largest
    offsets), all rows of a small input."""
    if rows <= 2 * SAMPLE_ROWS:
        return np.arange(rows)
    return np.concatenate([np.arange(SAMPLE_ROWS), np.arange(rows - SAMPLE_ROWS, rows)])


def assert_identical(got: np.ndarray, expected: np.ndarray, what: str) -> dict[str, Any]:
    if got.shape != expected.shape or got.dtype != expected.dtype:
        raise AssertionError(f"{what}: {got.dtype}{got.shape} vs {expected.dtype}"
                             f"{expected.shape}")
    view = np.dtype(f"u{expected.dtype.itemsize}") if expected.dtype.kind == "f" else None
    a, b = (got.view(view), expected.view(view)) if view else (got, expected)
    differ = int(np.count_nonzero(a != b))
    if differ:
        raise AssertionError(f"{what}: {differ} of {expected.size} elements differ")
    return {"exact": True, "elements": int(expected.size)}


def assert_close(got: np.ndarray, expected: np.ndarray, what: str,
                 rtol: float = 1e-5) -> dict[str, Any]:
    """Elementwise within ``rtol`` of the largest reference magnitude (float32 rounding)."""
    got64, expected64 = got.astype(np.float64), expected.astype(np.float64)
    if got.shape != expected.shape or not np.all(np.isfinite(got64)):
        raise AssertionError(f"{what}: shape {got.shape} vs {expected.shape} or non-finite")
    error = float(np.abs(got64 - expected64).max()) if got.size else 0.0
    scale = float(np.abs(expected64).max()) if got.size else 0.0
    if error > rtol * max(scale, 1e-30):
        raise AssertionError(f"{what}: largest difference {error:.3g} > {rtol} x {scale:.3g}")
    return {"max_abs_error": error, "reference_max_abs": scale}


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    expected = expected.astype(np.float64)
    return float(np.linalg.norm(got.astype(np.float64) - expected) / np.linalg.norm(expected))


# ---------------------------------------------------------------- codec section


@dataclass
class Builder:
    """A group to build when its turn comes (each holds up to gigabytes of device arrays):
    ``build()`` returns the `Group`; a failure is recorded under ``section`` and ``name``."""

    section: str
    name: str
    build: Callable[[], Group]


def codec_groups(platform: Platform, rows: int, seed: int) -> list[Builder]:
    """Builders of the codec groups (each builds its inputs when called, so that only one
    group's arrays live on the device at a time)."""
    builders = []
    for bits in PACK_BITS:
        for operation in ("pack_bits", "unpack_bits"):
            builders.append(Builder("codec", f"{operation}[bits={bits}]", (
                lambda bits=bits, operation=operation: packing_group(
                    platform, operation, bits, rows, seed))))
    builders.append(Builder("codec", f"randomized_hadamard[dim={DIM}]",
                            lambda: rotation_group(platform, rows, seed)))
    for spec in CODEC_SPECS:
        for step in ("encode", "decode"):
            builders.append(Builder("codec", f"{step}[{spec}]", (
                lambda spec=spec, step=step: quantizer_group(platform, spec, step, rows,
                                                             seed))))
    return builders


@functools.lru_cache(maxsize=1)
def float16_rows(rows: int, seed: int) -> np.ndarray:
    """``(rows, DIM)`` standard normal float16, made in slices (no float32 copy of it all),
    once for every group of a run (read-only)."""
    rng = np.random.default_rng(seed)
    x = np.empty((rows, DIM), np.float16)
    for start in range(0, rows, 1 << 16):
        stop = min(start + (1 << 16), rows)
        x[start:stop] = rng.standard_normal((stop - start, DIM), dtype=np.float32)
    x.flags.writeable = False
    return x


def sampled(platform: Platform, rows: int) -> Callable[[Any], np.ndarray]:
    """The host copy of an array's `sample_rows`."""
    sample = sample_rows(rows)
    index = platform.xp.asarray(sample)
    return lambda array: platform.host(array[index])


def packing_group(platform: Platform, operation: str, bits: int, rows: int,
                  seed: int) -> Group:
    rng = np.random.default_rng(seed + bits)
    codes_host = rng.integers(0, 1 << bits, (rows, DIM), dtype=np.uint8)
    packed_host = latkv.pack_bits(codes_host, bits, backend="numpy")
    codes, packed = platform.xp.asarray(codes_host), platform.xp.asarray(packed_host)
    restrict, sample = sampled(platform, rows), sample_rows(rows)
    expected = (packed_host if operation == "pack_bits" else codes_host)[sample]
    entries = [Entry("copy", platform.copy(codes), 2 * codes.nbytes)]
    for backend in platform.backends:
        if operation == "pack_bits":
            # the kernel alone: check=False skips the public range check of the codes (a
            # pass over them and a device-to-host sync)
            call = (lambda backend=backend: latkv.pack_bits(codes, bits, backend=backend,
                                                            check=False))
        else:
            call = (lambda backend=backend: latkv.unpack_bits(packed, bits, DIM,
                                                              backend=backend))
        check = (lambda call=call, backend=backend:
                 assert_identical(restrict(call()), expected, backend))
        entries.append(Entry(backend, call, codes.nbytes + packed.nbytes, check))
    return _codec_group(f"{operation}[bits={bits}]",
                        f"({rows}, {DIM}) uint8 codes <-> packed bytes", entries)


def rotation_group(platform: Platform, rows: int, seed: int) -> Group:
    x_host = float16_rows(rows, seed)
    x = platform.xp.asarray(x_host)
    restrict = sampled(platform, rows)
    rotation = latkv.RandomizedHadamard(DIM, seed=seed)
    expected = rotation.apply(x_host[sample_rows(rows)].astype(np.float32), backend="numpy")
    entries = [Entry("copy", platform.copy(x), 2 * x.nbytes)]
    for backend in platform.backends:
        call = (lambda backend=backend: rotation.apply(x, backend=backend))
        check = (lambda call=call, backend=backend:
                 assert_close(restrict(call()), expected, backend))
        entries.append(Entry(backend, call, 3 * x.nbytes, check))  # float16 in, float32 out
    return _codec_group(f"randomized_hadamard[dim={DIM}]",
                        f"({rows}, {DIM}) float16 -> float32", entries)


def quantizer_group(platform: Platform, spec: str, step: str, rows: int, seed: int) -> Group:
    """``encode`` or ``decode`` of ``spec`` on ``(rows, DIM)`` float16 vectors."""
    x_host = float16_rows(rows, seed)
    x = platform.xp.asarray(x_host)
    restrict = sampled(platform, rows)
    quantizer = latkv.quantizer(spec, dim=DIM)
    expected_codes = quantizer.encode(x_host[sample_rows(rows)], backend="numpy")
    moved = x.nbytes + quantizer.encoded_nbytes(x.shape)       # exact for fixed-rate codes
    backends = [b for b in platform.backends
                if b != "numba.cuda" or quantizer.name in NUMBA_CUDA_METHODS]
    entries = [Entry("copy", platform.copy(x), 2 * x.nbytes)]
    for backend in backends:
        if step == "encode":
            call = (lambda backend=backend: quantizer.encode(x, backend=backend))

            def check(call=call, backend=backend):
                got = call().arrays
                return {name: assert_identical(restrict(got[name]), expected, f"{backend} {name}")
                        for name, expected in expected_codes.arrays.items()}
        else:
            # the codes to decode are made at the entry's first call (its warm-up), so that a
            # backend whose encode fails fails its own entry only
            encoded: dict[str, Any] = {}

            def call(backend=backend, encoded=encoded):
                if "codes" not in encoded:
                    encoded["codes"] = quantizer.encode(x, backend=backend)
                return quantizer.decode(encoded["codes"], backend=backend)

            expected = quantizer.decode(expected_codes, backend="numpy")
            check = (lambda call=call, backend=backend, expected=expected:
                     assert_close(restrict(call()), expected, backend))
        entries.append(Entry(backend, call, moved, check))
    return _codec_group(f"{step}[{spec}]", f"({rows}, {DIM}) float16, "
                        f"{quantizer.bits_per_coordinate:g} bits per coordinate", entries)


def _codec_group(name: str, description: str, entries: list[Entry]) -> Group:
    backends = [e.name for e in entries if e.name != "copy"]
    ratios = [(backends[1], backends[0])] if len(backends) == 2 else []

    def targets(result: dict[str, Any]) -> dict[str, Any]:
        found = {}
        for backend in backends:
            record = result["entries"][backend]
            if "fraction_of_copy_bandwidth" in record:
                found[f"{backend} fraction of copy bandwidth"] = target(
                    record["fraction_of_copy_bandwidth"], 0.5, ">=")
        return found

    return Group("codec", name, description, entries, copy_entry="copy", ratios=ratios,
                 targets=targets)


# ---------------------------------------------------------------- attention section


# cuBLAS enumerations (cublas_api.h, library_types.h)
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUDA_R_32F, CUDA_R_16F = 0, 2
CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT = 68, -1


def gemm_strided_batched(platform: Platform, transpose_a: bool, m: int, n: int, k: int,
                         a: Any, lda: int, stride_a: int, b: Any, ldb: int, stride_b: int,
                         c: Any, ldc: int, stride_c: int, count: int) -> None:
    """``C_i = op(A_i) B_i`` for ``i < count``, column-major as cuBLAS has it: float16 ``A``,
    ``B`` and float32 ``C`` and arithmetic (``cublasGemmStridedBatchedEx``) on the device.

    ``a``, ``b``, ``c`` are C-contiguous arrays whose flat buffers hold the matrices at the
    strides given (in elements), each with its leading dimension. CuPy's ``matmul`` cannot be
    the baseline: for more than two axes it converts float16 operands to float32 copies. On
    the host (the dry run) the same call is computed from strided NumPy views, so the layout
    arguments are checked there too.
    """
    if platform.on_gpu:
        from cupy.cuda import device
        from cupy_backends.cuda.libs import cublas

        one, zero = np.ones((), np.float32), np.zeros((), np.float32)
        cublas.gemmStridedBatchedEx(
            device.get_cublas_handle(), CUBLAS_OP_T if transpose_a else CUBLAS_OP_N,
            CUBLAS_OP_N, m, n, k, one.ctypes.data, a.data.ptr, CUDA_R_16F, lda, stride_a,
            b.data.ptr, CUDA_R_16F, ldb, stride_b, zero.ctypes.data, c.data.ptr, CUDA_R_32F,
            ldc, stride_c, count, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)
        return
    flat_a, flat_b, flat_c = a.reshape(-1), b.reshape(-1), c.reshape(-1)

    def matrix(flat: np.ndarray, start: int, rows: int, columns: int, ld: int) -> np.ndarray:
        size = flat.itemsize
        return np.lib.stride_tricks.as_strided(flat[start:], (rows, columns), (size, ld * size))

    for i in range(count):
        op_a = (matrix(flat_a, i * stride_a, k, m, lda).T if transpose_a
                else matrix(flat_a, i * stride_a, m, k, lda))
        op_b = matrix(flat_b, i * stride_b, k, n, ldb)
        out = matrix(flat_c, i * stride_c, m, n, ldc)
        out[...] = op_a.astype(np.float32) @ op_b.astype(np.float32)


def fp16_attention(platform: Platform, q16: Any, k16: Any, v16: Any, scale: float) -> Any:
    """The baseline: ``softmax(q K^T scale) V`` from float16 ``q16 : (batch, kv_heads, group,
    dim)`` and ``k16, v16 : (batch, kv_heads, tokens, dim)``: two strided-batched cuBLAS
    float16 matmuls (float32 accumulation and logits) and a float32 softmax; float32 out.

    Row-major ``(tokens, dim)`` is column-major ``(dim, tokens)``, so the logits ``(group,
    tokens)`` of a head are the column-major ``K Q^T`` (``A = K`` transposed) and the output
    ``(group, dim)`` the column-major ``V^T W^T``.
    """
    xp = platform.xp
    batch, heads, group, dim = q16.shape
    tokens, count = k16.shape[2], batch * heads
    logits = xp.empty((batch, heads, group, tokens), dtype=xp.float32)
    gemm_strided_batched(platform, True, tokens, group, dim, k16, dim, tokens * dim, q16, dim,
                         group * dim, logits, tokens, group * tokens, count)
    logits *= xp.float32(scale)
    logits -= logits.max(axis=-1, keepdims=True)
    weights = xp.exp(logits)
    weights /= weights.sum(axis=-1, keepdims=True)
    weights16 = weights.astype(xp.float16)
    out = xp.empty((batch, heads, group, dim), dtype=xp.float32)
    gemm_strided_batched(platform, False, dim, group, tokens, v16, dim, tokens * dim, weights16,
                         tokens, group * tokens, out, dim, group * dim, count)
    return out


def float64_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """``q : (kv_heads, group, dim)``, ``k, v : (kv_heads, tokens, dim)``: float64."""
    logits = q.astype(np.float64) @ np.swapaxes(k.astype(np.float64), -1, -2) * scale
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return weights @ v.astype(np.float64)


def attention_groups(platform: Platform, tokens_list: tuple[int, ...],
                     batches: tuple[int, ...], seed: int) -> list[Builder]:
    """One group per (tokens, batch), built lazily (each holds gigabytes of caches)."""
    return [Builder("attention", f"decode_attention[tokens={tokens},batch={batch}]", (
        lambda tokens=tokens, batch=batch: attention_group(platform, tokens, batch, seed)))
        for tokens in tokens_list for batch in batches]


def first_batch(codes: latkv.Codes) -> latkv.Codes:
    """The codes of batch entry 0 of ``(batch, heads, tokens, dim)`` TurboQuant codes (every
    array has the batch axis first), to decode in float32: `decode` returns the codes' dtype,
    float16 here, whose rounding (2**-11 relative) would dominate the comparison."""
    return dataclasses.replace(codes, shape=(1, *codes.shape[1:]), dtype="float32",
                               arrays={name: array[:1] for name, array in codes.arrays.items()})


def attention_group(platform: Platform, tokens: int, batch: int, seed: int) -> Group:
    xp = platform.xp
    rng = xp.random.default_rng(seed + tokens + batch) if platform.on_gpu else \
        np.random.default_rng(seed + tokens + batch)
    scale = 1.0 / math.sqrt(DIM)
    shape = (batch, KV_HEADS, tokens, DIM)
    kv_bytes = 2 * math.prod(shape) * 2
    copies = max(1, math.ceil(WORKING_SET / kv_bytes))
    sets = []
    for _ in range(copies):
        offsets = 2 * rng.standard_normal((batch, KV_HEADS, 1, DIM), dtype=xp.float32)
        k16 = (rng.standard_normal(shape, dtype=xp.float32) + offsets).astype(xp.float16)
        v16 = rng.standard_normal(shape, dtype=xp.float32).astype(xp.float16)
        q = rng.standard_normal((batch, KV_HEADS * GROUP, 1, DIM), dtype=xp.float32)
        caches = {}
        for label, pair in ATTENTION_PAIRS.items():
            key_spec, value_spec = pair.split("|")
            cache = latkv.KVCache(latkv.quantizer(key_spec, dim=DIM),
                                  latkv.quantizer(value_spec, dim=DIM), residual=0, block=BLOCK)
            cache.append(k16, v16)
            caches[label] = cache
        sets.append({"q": q, "q16": q.reshape(batch, KV_HEADS, GROUP, DIM).astype(xp.float16),
                     "k16": k16, "v16": v16, "caches": caches})
    platform.synchronize()

    def rotating(step: Callable[[int, dict[str, Any]], Any]) -> Callable[[], Any]:
        """A call that runs ``step(index, set)`` on the next input set each time."""
        state = {"next": 0}

        def call() -> Any:
            index = state["next"] % len(sets)
            state["next"] += 1
            return step(index, sets[index])

        return call

    first = sets[0]

    def reference_of(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        q0 = platform.host(first["q"][0, :, 0]).reshape(KV_HEADS, GROUP, DIM)
        return float64_attention(q0, keys, values, scale)

    fp16_reference = reference_of(platform.host(first["k16"][0]), platform.host(first["v16"][0]))

    def check_fp16() -> dict[str, Any]:
        got = platform.host(fp16_attention(platform, first["q16"], first["k16"], first["v16"],
                                           scale)[0])
        error = relative_error(got, fp16_reference)
        if not error < 5e-3:             # float16 weights: 2**-11 relative each
            raise AssertionError(f"fp16 attention: relative error {error:.3g} >= 5e-3")
        return {"relative_error": error}

    copy_calls = [platform.copy(s["k16"]) for s in sets]
    entries = [Entry("copy", rotating(lambda index, s: copy_calls[index]()),
                     kv_bytes),                # the keys: read + written = bytes of K + V
               Entry("fp16", rotating(lambda index, s: fp16_attention(
                   platform, s["q16"], s["k16"], s["v16"], scale)), kv_bytes, check_fp16)]
    info: dict[str, Any] = {"tokens": tokens, "batch": batch, "kv_heads": KV_HEADS,
                            "group": GROUP, "dim": DIM, "block": BLOCK,
                            "fp16_kv_bytes": kv_bytes, "rotated_copies": copies}
    for label, cache in first["caches"].items():
        key_whole, value_whole = cache.key_blocks.whole(), cache.value_blocks.whole()
        decoded_keys = platform.host(cache.key_quantizer.decode(first_batch(key_whole))[0])
        decoded_values = platform.host(cache.value_quantizer.decode(first_batch(value_whole))[0])
        reference = reference_of(decoded_keys, decoded_values)
        code_bytes = cache.key_blocks.nbytes + cache.value_blocks.nbytes
        info[f"{label}_code_bytes"] = code_bytes
        for backend in platform.backends:
            step = (lambda index, s, label=label, backend=backend:
                    s["caches"][label].attention(s["q"], backend=backend))

            def check(label=label, backend=backend, reference=reference):
                got = platform.host(first["caches"][label].attention(
                    first["q"], backend=backend)[0, :, 0]).reshape(KV_HEADS, GROUP, DIM)
                error = relative_error(got, reference)
                if not error < 1e-4:            # float32 arithmetic: far below 1e-4
                    raise AssertionError(f"{label} {backend}: relative error {error:.3g} "
                                         f">= 1e-4 against float64 attention")
                return {"relative_error": error, "fused": first["caches"][label].fused}

            entries.append(Entry(f"{label} {backend}", rotating(step), code_bytes, check))
    backends = platform.backends
    ratios = [(f"{label} {backend}", "fp16") for label in ATTENTION_PAIRS for backend in backends]
    if len(backends) == 2:
        ratios += [(f"{label} {backends[1]}", f"{label} {backends[0]}")
                   for label in ATTENTION_PAIRS]

    def targets(result: dict[str, Any]) -> dict[str, Any]:
        found = {}
        fp16 = result["entries"]["fp16"]
        if "fraction_of_copy_bandwidth" in fp16:
            found["fp16 fraction of copy bandwidth"] = target(
                fp16["fraction_of_copy_bandwidth"], 0.7, ">=")
        for label in ATTENTION_PAIRS:
            ratio = result["ratios"].get(f"{label} {backends[0]}/fp16")
            if ratio is None:
                continue
            bound = 0.5 if label == "2-bit" else (0.65 if kv_bytes >= WORKING_SET else None)
            if label == "4-bit" and batch == 1:
                found[f"{label} over fp16 at batch 1"] = target(ratio["median"], 1.05, "<=")
            if bound is not None:
                found[f"{label} over fp16"] = target(ratio["median"], bound, "<=")
        return found

    return Group("attention", f"decode_attention[tokens={tokens},batch={batch}]",
                 f"one decode step, batch {batch}, {KV_HEADS} KV heads x GQA {GROUP}, "
                 f"{tokens} tokens, dim {DIM}", entries, copy_entry="copy", ratios=ratios,
                 targets=targets, info=info)


# ---------------------------------------------------------------- onnx section


def onnx_groups(platform: Platform, tokens: int, seed: int) -> tuple[list[Group], str | None]:
    """Groups comparing onnxruntime sessions to latkv, or ``([], why not)``."""
    try:
        import onnxruntime
        from onnx_speed import feeds_for, latkv_step   # benchmarks/, beside this script

        import latkv.onnx
    except ImportError as error:
        return [], f"onnxruntime is not installed ({error})"
    provider = "CUDAExecutionProvider" if platform.on_gpu else "CPUExecutionProvider"
    if provider not in onnxruntime.get_available_providers():
        return [], (f"onnxruntime {onnxruntime.__version__} has no {provider} (providers: "
                    f"{onnxruntime.get_available_providers()})")
    xp, groups = platform.xp, []
    rng = np.random.default_rng(seed)
    x_host = rng.standard_normal((1, KV_HEADS, tokens, DIM), dtype=np.float32)
    q_host = rng.standard_normal((1, KV_HEADS, GROUP, DIM), dtype=np.float32)
    x, q = xp.asarray(x_host), xp.asarray(q_host)
    for spec in ONNX_SPECS:
        quantizer = latkv.quantizer(spec, dim=DIM)
        codes = quantizer.encode(x)
        for step in ONNX_STEPS:
            model = latkv.onnx.export(quantizer, step, flavour="standard")
            session = onnxruntime.InferenceSession(model.SerializeToString(),
                                                   providers=[provider])
            binding = _bind(session, feeds_for(step, x, q, codes), platform)

            def run_session(session=session, binding=binding):
                session.run_with_iobinding(binding)
                return binding

            latkv_call = latkv_step(quantizer, step, x, q, codes)

            def check(step=step, binding=binding, latkv_call=latkv_call, session=session):
                session.run_with_iobinding(binding)
                got = binding.copy_outputs_to_cpu()
                expected = latkv_call()
                if step == "encode":
                    return {name: assert_identical(np.asarray(array), platform.host(
                        expected.arrays[name]), name)
                        for name, array in zip(expected.arrays, got)}
                return assert_close(np.asarray(got[0]), platform.host(expected), step, 1e-4)

            moved = x.nbytes + sum(a.nbytes for a in codes.arrays.values())
            entries = [Entry("latkv", latkv_call, moved),
                       Entry("onnxruntime", run_session, moved, check)]
            groups.append(Group("onnx", f"onnx[{quantizer.label}] {step}",
                                f"standard graph on {provider}, inputs bound on the device, "
                                f"(1, {KV_HEADS}, {tokens}, {DIM})", entries,
                                ratios=[("onnxruntime", "latkv")]))
    return groups, None


def _bind(session: Any, feeds: dict[str, Any], platform: Platform) -> Any:
    """An IOBinding with every input bound by pointer where it lives (the same call on the
    device and in the dry run) and every output allocated there."""
    binding = session.io_binding()
    device = "cuda" if platform.on_gpu else "cpu"
    kept = []                                  # the bound arrays must outlive the binding
    for name, array in feeds.items():
        array = platform.xp.ascontiguousarray(array)
        kept.append(array)
        pointer = array.data.ptr if platform.on_gpu else array.ctypes.data
        binding.bind_input(name, device, 0, array.dtype.type, list(array.shape), pointer)
    for output in session.get_outputs():
        binding.bind_output(output.name, device)
    binding.bound_arrays = kept
    return binding


# ---------------------------------------------------------------- report


def table_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    """Cells (group, entry, median ms, spread, GB/s, of copy) of one group's entries, ratios
    and targets, for the terminal table and the docs page alike."""
    rows = []
    group = result["name"]
    for name, record in result["entries"].items():
        if record.get("status") != "timed":
            rows.append((group, name, f"{record['status'].upper()}: "
                         f"{record.get('reason', '')[:60]}", "", "", ""))
            continue
        fraction = record.get("fraction_of_copy_bandwidth")
        rows.append((group, name, f"{record['median_s'] * 1e3:.3f}", f"{record['spread']:.2f}",
                     f"{record['bandwidth_gb_s']:.1f}",
                     "" if fraction is None else f"{fraction:.2f}"))
    for ratio, value in result.get("ratios", {}).items():
        rows.append((group, f"ratio {ratio}", f"{value['median']:.3f} "
                     f"[{value['min']:.3f}, {value['max']:.3f}]", "", "", ""))
    for what, value in result.get("targets", {}).items():
        rows.append((group, f"target: {what} {value['kind']} {value['bound']}",
                     f"{value['value']:.3f}", "met" if value["met"] else "MISSED", "", ""))
    return rows


HEADER = ("group", "entry", "median ms", "spread", "GB/s", "of copy")


def format_table(results: list[dict[str, Any]]) -> str:
    rows = [HEADER] + [row for result in results for row in table_rows(result)]
    widths = (44, 46, 24, 7, 8, 7)
    return "\n".join(" ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in rows)


def markdown(document: dict[str, Any]) -> str:
    """The docs page: device, date, command, then one table per section."""
    machine, settings = document["machine"], document["settings"]
    out = [f"# GPU benchmarks: {machine['device']}", "",
           f"Measured {machine['date']} on {machine['device']} "
           f"({machine.get('multiprocessors', '?')} SMs, CuPy {machine.get('cupy', '-')}, "
           f"CUDA runtime {machine.get('cuda_runtime', '-')}), latkv {machine['latkv']}, "
           f"{settings['rounds']} interleaved rounds (medians; spread = (max - min) / median).",
           "", "```bash", settings["command"], "```", "",
           "Every entry was checked before it was timed (codes bit-identical to the NumPy "
           "reference, values within float32 rounding, attention against float64); "
           "`of copy` is (bytes read + written) / time over an in-run device-to-device "
           "copy's. Targets are issue 12's.", ""]
    for section in ("codec", "attention", "onnx"):
        results = [r for r in document["results"] if r["section"] == section]
        if not results:
            if section in document.get("skipped", {}):
                out += [f"## {section}", "", f"Not run: {document['skipped'][section]}", ""]
            continue
        out += [f"## {section}", "", "| " + " | ".join(HEADER) + " |",
                "|---|---|---:|---:|---:|---:|"]
        out += ["| " + " | ".join(row) + " |" for result in results
                for row in table_rows(result)]
        notes = [f"- {result['name']} / {name}: {record.get('reason', '')}"
                 for result in results for name, record in result["entries"].items()
                 if record.get("status") != "timed"]
        out += [""] + notes + ([""] if notes else [])
    return "\n".join(out)


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small inputs (2**14 rows, 8k tokens at batch 1, 3 rounds): a "
                             "smoke run, not figures to report")
    parser.add_argument("--cpu", action="store_true",
                        help="dry run on the host with NumPy arrays (tests the script)")
    parser.add_argument("--only", default="codec,attention,onnx",
                        help="comma-separated sections: codec, attention, onnx")
    parser.add_argument("--rows", type=int, default=None, help="codec rows (default 2**20)")
    parser.add_argument("--tokens", default=None,
                        help="attention cache lengths, comma-separated (default 8192,32768,"
                             "131072)")
    parser.add_argument("--batches", default=None, help="attention batches (default 1,8)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (9)")
    parser.add_argument("--min-sample-s", type=float, default=None,
                        help="each timed sample lasts at least this long (0.05 s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON (default benchmarks/results/gpu-<device>.json)")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="also write the docs page here (docs/benchmarks/gpu-<device>.md)")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - {"codec", "attention", "onnx"})
    if unknown or not sections:
        parser.error(f"--only takes codec, attention, onnx; got {args.only!r}")
    args.sections = sections
    quick = args.quick or args.cpu
    args.rows = args.rows or (1 << 14 if quick else 1 << 20)
    args.tokens = tuple(int(t) for t in args.tokens.split(",")) if args.tokens else (
        (2048,) if args.cpu else (8192,) if quick else ATTENTION_TOKENS)
    args.batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else (
        (1,) if quick else ATTENTION_BATCHES)
    args.rounds = args.rounds or (3 if quick else 9)
    args.min_sample_s = args.min_sample_s if args.min_sample_s is not None else (
        0.002 if quick else 0.05)
    if args.rows < 1 or args.rounds < 1 or any(t % BLOCK or t < BLOCK for t in args.tokens):
        parser.error(f"--rows and --rounds must be positive and --tokens multiples of {BLOCK}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    platform = cpu_platform() if args.cpu else gpu_platform()
    if platform is None:
        print("gpu_speed: no CUDA device with CuPy here (install cupy-cuda12x or "
              "cupy-cuda13x on a machine with an NVIDIA GPU; --cpu runs a dry run)",
              file=sys.stderr)
        return 2

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    machine = {**machine_description(), **device_description(platform)}
    log(f"gpu_speed on {platform.device}: sections {args.sections}")
    results: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    builders: list[Builder] = []
    if "codec" in args.sections:
        builders += codec_groups(platform, args.rows, args.seed)
    if "attention" in args.sections:
        builders += attention_groups(platform, args.tokens, args.batches, args.seed)
    for builder in builders:
        try:
            group = builder.build()
        except Exception as error:  # noqa: BLE001 - a group that cannot be built is recorded
            results.append({"section": builder.section, "name": builder.name, "entries": {
                "build": {"status": "failed", "reason": f"{type(error).__name__}: {error}",
                          "traceback": traceback.format_exc(limit=6)[-2000:]}}})
            log(f"  {builder.name}: build failed: {error}")
            platform.free()
            continue
        log(f"{group.name}")
        results.append(run_group(group, platform, args, log))
        del group
        platform.free()
    if "onnx" in args.sections:
        groups, why_not = onnx_groups(platform, 65536 if not args.quick and not args.cpu
                                      else 1024, args.seed)
        if why_not:
            skipped["onnx"] = why_not
            log(f"onnx: skipped: {why_not}")
        for group in groups:
            log(f"{group.name}")
            results.append(run_group(group, platform, args, log))
    document = {
        "machine": machine,
        "settings": {"rows": args.rows, "tokens": list(args.tokens),
                     "batches": list(args.batches), "rounds": args.rounds,
                     "min_sample_s": args.min_sample_s, "seed": args.seed,
                     "sections": args.sections, "quick": args.quick, "cpu": args.cpu,
                     "reportable": platform.on_gpu and not args.quick
                     and args.rounds >= MIN_REPORTED_ROUNDS,
                     "command": "python benchmarks/gpu_speed.py " + " ".join(
                         sys.argv[1:] if argv is None else argv)},
        "results": results,
        "skipped": skipped,
    }
    out = args.out or Path("benchmarks/results") / f"gpu-{device_slug(platform.device)}.json"
    write_atomically(out, json.dumps(document, indent=1) + "\n")
    if args.markdown is not None:
        write_atomically(args.markdown, markdown(document) + "\n")
    print(format_table(results))
    bad = [(r["name"], n) for r in results for n, e in r["entries"].items()
           if e.get("status") != "timed"]
    print(f"wrote {out}" + (f" and {args.markdown}" if args.markdown else "")
          + (f"; {len(bad)} entries not timed" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
