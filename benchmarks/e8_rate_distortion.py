#!/usr/bin/env python
"""Rate-distortion of E8Quant and its neighbours on i.i.d. N(0, 1) data, dim 128.

Data: ``np.random.default_rng(0).standard_normal((n, 128))`` as float32, n = 20 000 vectors
(``--quick``: 1000). Every quantizer encodes the whole ``(n, 128)`` array at once and is
scored by

* rate: ``8 * codes.nbytes / x.size`` bits per coordinate, everything stored counted (codes,
  scales, steps, entropy models, stream headers);
* distortion: the mean squared error per coordinate of ``decode(encode(x))``;
* gap: ``rate - 0.5 log2(1 / mse)`` bits per coordinate, the distance to Shannon's bound
  ``D(R) = 2^(-2R)`` for a unit-variance Gaussian (no code at any block length beats it, so
  every gap must be positive).

Curves (names are the JSON keys):

* ``e8_entropy``: ``E8Quant(dim=128, bits=t, entropy=True)``, targets t = 0.75, 1, 1.25 ..
  4.5: E8 points coded with rANS under a model fitted to the data and stored.
* ``e8_fixed``: ``E8Quant(dim=128, bits=b)``, b = 2..5: Voronoi code, b + 16/128 bits.
* ``turbo``: ``TurboQuant(dim=128, bits=b)``, b = 1..5 (mse mode, b + 16/128 bits).
* ``scalar_minmax``: ``ScalarQuant(dim=128, bits=b)``, b = 2..5: KIVI-style min-max per
  token in groups of 32 channels (one fp16 scale and zero per group: b + 1 bits).
* ``uniform_scalar_rans``: the entropy-coded scalar reference (ECSQ): ``q = rint(x / step)``
  with a float16 ``step``, symbols ``q + K`` (``K = max |q|``) coded by the same rANS coder
  (`latkv.entropy`, one context, alphabet ``2 K + 1``); rate ``8 (len(stream) + model.nbytes
  + 2) / x.size``, reconstruction ``q * step``; steps ``2^(1.4 - k / 4)``, k = 0..16.
* ``uniform_scalar_rans_hadamard``: the same after ``RandomizedHadamard(128, seed=0)``
  (measured in the rotated domain, which the rotation's orthogonality makes the same error).
  On i.i.d. Gaussian data the rotation changes nothing; the curve checks that. It is in the
  JSON and the table, not in the plot (it would lie on top of the unrotated one).

Every encode and decode runs on latkv's default backend (numba), ``--quick`` on the NumPy
reference (a cold numba cache would otherwise spend ~25 s compiling in a smoke test; the
backends give the same codes, so the same numbers); ``--backend`` picks one.

Checks (exit status 1 if one fails; the JSON and the table are still written): every decoded
array is finite; every rANS stream of the scalar reference decodes back to its symbols; the
fixed-rate quantizers store exactly ``bits_per_coordinate``; E8's entropy-coded rate is at
most its target; along each curve the rate increases and the MSE decreases; every gap is
positive.

Usage::

    python benchmarks/e8_rate_distortion.py            # about 30 s on 2 cores
    python benchmarks/e8_rate_distortion.py --quick    # n = 1000, fewer points, seconds

The full run writes ``benchmarks/results/e8_rate_distortion.json`` and the plot
``docs/methods/e8-rate-distortion.png``; ``--quick`` writes neither unless ``--json PATH``
or ``--plot PATH`` is given. Plotting needs matplotlib (imported only to plot).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

import latkv
from latkv import entropy
from latkv._backend import default_backend

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_JSON = HERE / "results" / "e8_rate_distortion.json"
DEFAULT_PLOT = ROOT / "docs" / "methods" / "e8-rate-distortion.png"

DIM = 128
SEED = 0
FULL_VECTORS = 20_000
QUICK_VECTORS = 1_000
#: the rate window in which `best_e8_gap` is taken
BEST_GAP_WINDOW = (1.0, 3.0)

FULL_POINTS = {
    "e8_entropy": [0.75 + 0.25 * i for i in range(16)],      # 0.75 .. 4.5
    "e8_fixed": [2, 3, 4, 5],
    "turbo": [1, 2, 3, 4, 5],
    "scalar_minmax": [2, 3, 4, 5],
    "uniform_scalar_rans": [2.0 ** (1.4 - k / 4) for k in range(17)],
}
QUICK_POINTS = {
    "e8_entropy": [1.0, 1.5, 2.0, 2.5, 3.0, 4.0],
    "e8_fixed": [2, 3, 4],
    "turbo": [1, 2, 3],
    "scalar_minmax": [2, 3],
    "uniform_scalar_rans": [2.0 ** (1.4 - k / 4) for k in range(0, 17, 4)],
}

LABELS = {
    "e8_entropy": "E8 + rANS (E8Quant, entropy=True)",
    "e8_fixed": "E8 fixed rate (E8Quant, Voronoi code)",
    "turbo": "TurboQuant (mse)",
    "scalar_minmax": "ScalarQuant min-max, groups of 32",
    "uniform_scalar_rans": "uniform scalar + rANS (ECSQ)",
    "uniform_scalar_rans_hadamard": "uniform scalar + rANS after Hadamard",
}


# -- one point of each curve --------------------------------------------------------------------


def gap_bits(rate: float, mse: float) -> float:
    """Bits per coordinate above Shannon's ``D(R) = 2^(-2R)`` for unit variance."""
    return rate - 0.5 * math.log2(1.0 / mse)


def quantizer_point(qz: Any, x: np.ndarray, backend: str, failures: list[str],
                    name: str) -> dict[str, float]:
    """Encode and decode ``x`` with a latkv quantizer: measured rate and MSE."""
    codes = qz.encode(x, backend=backend)
    x_hat = qz.decode(codes, backend=backend)
    if not np.isfinite(x_hat).all():
        failures.append(f"{name}: {qz.spec} decoded to non-finite values")
    return {"rate": 8 * codes.nbytes / x.size,
            "mse": float(np.mean((x_hat.astype(np.float64) - x) ** 2))}


def uniform_scalar_rans_point(x: np.ndarray, step: float, failures: list[str],
                              name: str) -> dict[str, float]:
    """ECSQ: ``rint(x / step)`` coded with `latkv.entropy` (one context), fp16 step stored."""
    step = float(np.float16(step))
    levels = np.rint(x.astype(np.float64) / step).astype(np.int64).ravel()
    stream, model, offset = entropy.encode_integers(levels)
    if not np.array_equal(entropy.decode_integers(stream, model, offset, levels.size), levels):
        failures.append(f"{name}: the rANS stream at step {step} does not decode to its symbols")
    x_hat = (levels * step).reshape(x.shape)
    if not np.isfinite(x_hat).all():
        failures.append(f"{name}: step {step} decoded to non-finite values")
    return {"rate": 8 * (len(stream) + model.nbytes + 2) / x.size,
            "mse": float(np.mean((x_hat - x) ** 2))}


def measure_curves(x: np.ndarray, points: dict[str, list[float]], backend: str,
                   failures: list[str], log: Callable[[str], None]
                   ) -> dict[str, list[dict[str, float]]]:
    rotated = latkv.RandomizedHadamard(DIM, seed=0).apply(x, backend=backend)
    curves: dict[str, list[dict[str, float]]] = {}

    def add(name: str, target: float | int, point: dict[str, float], seconds: float) -> None:
        point = {"target": target, **point, "gap_bits": gap_bits(point["rate"], point["mse"])}
        curves.setdefault(name, []).append(point)
        log(f"  {name:30s} target {target:7.4g}  rate {point['rate']:6.3f}  "
            f"mse {point['mse']:.5f}  gap {point['gap_bits']:+.3f}  ({seconds:.1f} s)")

    for name, build in (
            ("e8_entropy", lambda t: latkv.E8Quant(dim=DIM, bits=t, entropy=True)),
            ("e8_fixed", lambda b: latkv.E8Quant(dim=DIM, bits=b)),
            ("turbo", lambda b: latkv.TurboQuant(dim=DIM, bits=b)),
            ("scalar_minmax", lambda b: latkv.ScalarQuant(dim=DIM, bits=b))):
        for target in points[name]:
            start = time.perf_counter()
            qz = build(target)
            point = quantizer_point(qz, x, backend, failures, name)
            add(name, target, point, time.perf_counter() - start)
            if name == "e8_entropy" and point["rate"] > target + 1e-12:
                failures.append(f"{name}: rate {point['rate']:.4f} above its target {target}")
            if name != "e8_entropy" and point["rate"] != qz.bits_per_coordinate:
                failures.append(f"{name}: {qz.spec} stored {point['rate']} bits per coordinate, "
                                f"not its bits_per_coordinate {qz.bits_per_coordinate}")
    for name, data in (("uniform_scalar_rans", x), ("uniform_scalar_rans_hadamard", rotated)):
        for step in points["uniform_scalar_rans"]:
            start = time.perf_counter()
            point = uniform_scalar_rans_point(data, step, failures, name)
            add(name, float(np.float16(step)), point, time.perf_counter() - start)
    return curves


def check_curves(curves: dict[str, list[dict[str, float]]], failures: list[str]) -> None:
    """Rate up, MSE down along every curve (in its sweep order), every gap positive."""
    for name, curve in curves.items():
        ordered = sorted(curve, key=lambda p: p["rate"])
        if [p["target"] for p in ordered] != [p["target"] for p in curve] and \
                [p["target"] for p in ordered] != [p["target"] for p in curve][::-1]:
            failures.append(f"{name}: the rate is not monotone in the swept parameter")
        for low, high in zip(ordered, ordered[1:]):
            if not (high["rate"] > low["rate"] and high["mse"] < low["mse"]):
                failures.append(f"{name}: rate {low['rate']:.3f} -> {high['rate']:.3f} "
                                f"takes the MSE {low['mse']:.5f} -> {high['mse']:.5f}")
        for point in curve:
            if not point["gap_bits"] > 0:
                failures.append(f"{name}: rate {point['rate']:.3f}, MSE {point['mse']:.5f} "
                                "beats Shannon's bound (the rate is miscounted)")


def best_e8_gap(curve: list[dict[str, float]]) -> dict[str, float] | None:
    low, high = BEST_GAP_WINDOW
    window = [p for p in curve if low <= p["rate"] <= high]
    if not window:
        return None
    best = min(window, key=lambda p: p["gap_bits"])
    return {"target": best["target"], "rate": best["rate"], "mse": best["mse"],
            "gap_bits": best["gap_bits"]}


# -- output ---------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    import numba

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "cpus_usable": usable, "python": platform.python_version(),
            "numpy": np.__version__, "numba": numba.__version__,
            "latkv": latkv.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def print_table(curves: dict[str, list[dict[str, float]]]) -> None:
    for name, curve in curves.items():
        print(f"\n{LABELS[name]}  [{name}]")
        print(f"  {'target':>8s}  {'rate':>6s}  {'mse':>9s}  {'D(R)':>9s}  {'gap':>6s}")
        for point in curve:
            print(f"  {point['target']:8.4g}  {point['rate']:6.3f}  {point['mse']:9.6f}  "
                  f"{2.0 ** (-2 * point['rate']):9.6f}  {point['gap_bits']:6.3f}")


def plot_curves(curves: dict[str, list[dict[str, float]]], n: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {
        "e8_entropy": dict(color="C3", marker="o", linestyle="-", linewidth=2.0, zorder=5),
        "e8_fixed": dict(color="C1", marker="s", linestyle="--"),
        "turbo": dict(color="C0", marker="^", linestyle="-"),
        "scalar_minmax": dict(color="C7", marker="v", linestyle="-"),
        "uniform_scalar_rans": dict(color="C2", marker=".", linestyle=":", linewidth=1.8),
    }
    rates = [p["rate"] for name in styles for p in curves[name]]
    grid = np.linspace(0.5, max(rates) + 0.2, 200)
    figure, (mse_axes, gap_axes) = plt.subplots(1, 2, figsize=(12, 5))
    mse_axes.plot(grid, 2.0 ** (-2 * grid), color="black", linestyle="--", linewidth=1.2,
                  label="Shannon bound $D(R) = 2^{-2R}$")
    gap_axes.axhline(0.0, color="black", linestyle="--", linewidth=1.2,
                     label="Shannon bound (gap 0)")
    for name, style in styles.items():
        curve = curves[name]
        rate = [p["rate"] for p in curve]
        mse_axes.plot(rate, [p["mse"] for p in curve], label=LABELS[name], markersize=5,
                      **style)
        gap_axes.plot(rate, [p["gap_bits"] for p in curve], label=LABELS[name], markersize=5,
                      **style)
    mse_axes.set_yscale("log")
    mse_axes.set_xlabel("rate (bits per coordinate, everything stored)")
    mse_axes.set_ylabel("MSE per coordinate (log scale)")
    mse_axes.set_title("distortion")
    mse_axes.grid(True, which="both", alpha=0.3)
    mse_axes.legend(fontsize=8, loc="lower left")
    gap_axes.set_xlabel("rate (bits per coordinate, everything stored)")
    gap_axes.set_ylabel("$R - \\frac{1}{2}\\log_2(1/D)$ (bits per coordinate)")
    gap_axes.set_title("gap to Shannon's bound")
    gap_axes.set_ylim(bottom=0.0, top=min(2.0, 0.1 + max(
        p["gap_bits"] for name in styles for p in curves[name])))
    gap_axes.grid(True, alpha=0.3)
    for axes in (mse_axes, gap_axes):
        axes.set_xlim(0.5, max(rates) + 0.2)
    figure.suptitle(f"Rate–distortion on N(0,1), dim 128  (n = {n} vectors, seed {SEED})")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, pil_kwargs={"optimize": True})
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"n = {QUICK_VECTORS} and fewer points (tests); writes nothing "
                             "unless --json / --plot")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"results file (default: {DEFAULT_JSON.relative_to(ROOT)}, "
                             "full run only)")
    parser.add_argument("--backend", choices=("numpy", "numba"), default=None,
                        help="latkv backend of every encode and decode (default: latkv's "
                             "default, numba where installed; --quick: numpy, so that a cold "
                             "numba cache does not dominate a smoke test)")
    parser.add_argument("--plot", type=Path, default=None,
                        help=f"plot file (default: {DEFAULT_PLOT.relative_to(ROOT)}, "
                             "full run only)")
    args = parser.parse_args()
    json_path = args.json or (None if args.quick else DEFAULT_JSON)
    plot_path = args.plot or (None if args.quick else DEFAULT_PLOT)
    n = QUICK_VECTORS if args.quick else FULL_VECTORS
    points = QUICK_POINTS if args.quick else FULL_POINTS

    started = time.perf_counter()
    x = np.random.default_rng(SEED).standard_normal((n, DIM)).astype(np.float32)
    backend = args.backend or ("numpy" if args.quick else default_backend(x))
    failures: list[str] = []
    print(f"i.i.d. N(0, 1), {n} x {DIM} float32, seed {SEED}, backend "
          f"{backend}", flush=True)
    curves = measure_curves(x, points, backend, failures, lambda line: print(line, flush=True))
    check_curves(curves, failures)
    best = best_e8_gap(curves["e8_entropy"])
    if best is None:
        failures.append(f"e8_entropy: no point with rate in {list(BEST_GAP_WINDOW)}")
    elapsed = time.perf_counter() - started

    print_table(curves)
    if best is not None:
        print(f"\nbest E8 + rANS gap with rate in {list(BEST_GAP_WINDOW)}: "
              f"{best['gap_bits']:.3f} bits per coordinate at rate {best['rate']:.3f}")
    print(f"measured in {elapsed:.1f} s")

    if json_path is not None:
        document = {
            "data": f"i.i.d. N(0,1) float32: np.random.default_rng({SEED})"
                    f".standard_normal(({n}, {DIM}))",
            "n": n, "dim": DIM, "seed": SEED,
            "backend": backend,
            "command": " ".join(["python", "benchmarks/e8_rate_distortion.py", *sys.argv[1:]]),
            "rate": "8 * codes.nbytes / x.size: bits per coordinate, everything stored",
            "gap_bits": "rate - 0.5 * log2(1 / mse): above Shannon's D(R) = 2^(-2R)",
            "labels": {name: LABELS[name] for name in curves},
            "curves": curves,
            "best_e8_gap": best,
            "best_e8_gap_window": list(BEST_GAP_WINDOW),
            "ok": not failures, "failures": failures,
            "elapsed_s": round(elapsed, 2),
            "machine": machine_info(),
        }
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(document, indent=1) + "\n")
        print(f"wrote {json_path}")
    if plot_path is not None:
        plot_curves(curves, n, plot_path)
        print(f"wrote {plot_path} ({plot_path.stat().st_size / 1024:.0f} KiB)")
    for failure in failures:
        print(f"CHECK FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
