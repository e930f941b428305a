"""Regenerate the benchmark report of the docs site from the JSON files of ``benchmarks/results``.

One command rebuilds ``docs/benchmarks/report.md`` (a mkdocs page) and its figures
(``docs/benchmarks/figures/*.png``, matplotlib with the Agg backend) from the results that the
benchmark scripts wrote. Every number on the page is read from the JSON; under each figure and
table the page names the machine, the date of the measurement and the command that reproduces
it.

    python benchmarks/report.py [--results DIR] [--out DIR] [--check]

``--check`` writes nothing and exits with status 1 when the generated markdown differs from
the page on disk (or a figure it shows is missing): the CI's test that the page is current.
A missing or malformed results file is reported by name with exit status 2. The markdown is
deterministic (the same JSON gives the same bytes); the PNGs are written without the software
tag, so a given matplotlib version gives the same bytes too. Files are written atomically
(a temporary file in the same folder, then ``os.replace``). Plotting needs matplotlib, which
is imported only to draw.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_OUT = ROOT / "docs" / "benchmarks"
REPORT_NAME = "report.md"
FIGURES_FOLDER = "figures"

#: The results files the page is built from, in the order the page uses them.
RESULT_FILES = (
    "e8_rate_distortion.json",
    "e8_claim.json",
    "kv_split_study.json",
    "key_study.json",
    "qet_study.json",
    "foundation.json",
    "turbo_qjl.json",
    "polar.json",
    "decode_attention.json",
    "onnx_speed.json",
)

#: The commands that wrote the results files that do not record their own (benchmarks/README).
COMMAND_OF_RESULT = {
    "kv_split_study.json": "python benchmarks/kv_split_study.py --perplexity --chunk 32 "
                           "--json benchmarks/results/kv_split_study.json",
    "decode_attention.json": "OPENBLAS_NUM_THREADS=1 python benchmarks/decode_attention.py "
                             "--json benchmarks/results/decode_attention.json",
    "onnx_speed.json": "OPENBLAS_NUM_THREADS=1 python benchmarks/onnx_speed.py "
                       "--json benchmarks/results/onnx_speed.json",
}

#: Scripts whose name is not the results file's stem (used only when the JSON has no command).
SCRIPT_OF_RESULT = {
    "foundation.json": "bench_foundation.py",
    "turbo_qjl.json": "bench_turbo_qjl.py",
    "polar.json": "bench_turbo_qjl.py",
}

#: ``machine`` keys shown under a figure or table, in this order, with how each is written.
MACHINE_FIELDS = (
    ("cpu", "{}"),
    ("cpu_count", "{} CPUs"),
    ("platform", "{}"),
    ("python", "Python {}"),
    ("numpy", "NumPy {}"),
    ("scipy", "SciPy {}"),
    ("numba", "numba {}"),
    ("numba_threads", "{} numba threads"),
    ("blas", "BLAS {}"),
)

#: How the ``kind`` of a curve point of ``e8_claim.json`` is written on the page.
KIND_NAMES = {"k": "keys", "v": "values"}

FIGURE_DPI = 110
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h", "<", ">", "p")
LINE_STYLES = ("-", "--", ":", "-.")


class ReportError(Exception):
    """A results file is missing, is not JSON, or does not have the structure the page needs."""


# --------------------------------------------------------------------------------------------
# Reading the results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """One results file: its name, where it was read from, and its parsed JSON.

    Attributes
    ----------
    name : str
        File name, e.g. ``"foundation.json"``.
    path : Path
        The file that was read.
    data : dict
        The parsed JSON document.
    """

    name: str
    path: Path
    data: dict[str, Any]


#: Figure file name -> (its results file, the function drawing it from that file as PNG bytes).
Figures = dict[str, tuple[Result, Callable[[Result], bytes]]]


def load_result(path: Path) -> Result:
    """Read one results file.

    Parameters
    ----------
    path : Path
        The JSON file.

    Returns
    -------
    Result
        Its name, path and parsed document.

    Raises
    ------
    ReportError
        If the file is missing, unreadable, not valid JSON or not a JSON object.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"{path}: results file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ReportError(f"{path}: cannot read the results file ({error})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ReportError(f"{path}: malformed JSON ({error.msg} at line {error.lineno}, "
                          f"column {error.colno})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: malformed results file (the top level is not a JSON object)")
    return Result(path.name, path, data)


def load_results(results_dir: Path) -> dict[str, Result]:
    """Read every file of `RESULT_FILES` from `results_dir`.

    Parameters
    ----------
    results_dir : Path
        The folder of the benchmark results.

    Returns
    -------
    dict of str to Result
        The results by file name.
    """
    return {name: load_result(results_dir / name) for name in RESULT_FILES}


@contextlib.contextmanager
def reading(result: Result) -> Iterator[None]:
    """Turn a structural error while using `result` into a `ReportError` naming its file."""
    try:
        yield
    except ReportError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
        raise ReportError(f"{result.path}: unexpected structure "
                          f"({type(error).__name__}: {error})") from None


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def format_number(value: float, digits: int = 3) -> str:
    """`value` with `digits` significant digits and no exponent (whole numbers from 10**digits).

    >>> format_number(8.51190), format_number(0.066040), format_number(111.108)
    ('8.51', '0.0660', '111')
    """
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(digits - 1 - magnitude, 0)
    return f"{value:.{decimals}f}"


def format_ratio(value: float | None) -> str:
    """A time ratio as ``"8.51x"``; ``"-"`` for a missing one."""
    return "-" if value is None else f"{format_number(value)}x"


def format_spread(summary: dict[str, float]) -> str:
    """A ``{"median", "min", "max"}`` ratio summary as ``"8.51x (7.43-9.27)"``."""
    return (f"{format_ratio(summary['median'])} "
            f"({format_number(summary['min'])}-{format_number(summary['max'])})")


def table_cell(text: object) -> str:
    """`text` made safe for a markdown table cell (pipes escaped, no line breaks)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table of `header` and `rows`, every cell escaped with `table_cell`."""
    lines = ["| " + " | ".join(table_cell(cell) for cell in header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(table_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_description(data: dict[str, Any]) -> str:
    """The machine of a results document: `MACHINE_FIELDS` that its ``machine`` entry has."""
    machine = data.get("machine")
    if not isinstance(machine, dict):
        return "machine not recorded"
    parts = [template.format(machine[key]) for key, template in MACHINE_FIELDS
             if machine.get(key) is not None]
    return ", ".join(parts) if parts else "machine not recorded"


def measurement_date(data: dict[str, Any]) -> str:
    """The date of the measurement: ``machine.date``, else the top-level ``date``."""
    machine = data.get("machine")
    if isinstance(machine, dict) and machine.get("date"):
        return str(machine["date"])
    if data.get("date"):
        return str(data["date"])
    return "date not recorded"


def reproduce_command(result: Result) -> str:
    """The command that reproduces `result`.

    The JSON's ``command`` (a string, or an argv list in ``settings.command``), else the
    documented command of `COMMAND_OF_RESULT`, else ``python benchmarks/<script>.py`` named
    after the file.
    """
    data = result.data
    command = data.get("command")
    if command is None and isinstance(data.get("settings"), dict):
        command = data["settings"].get("command")
    if isinstance(command, str) and command.strip():
        return command.strip()
    if isinstance(command, list) and command:
        script = str(command[0])
        if "/" not in script:
            script = f"benchmarks/{script}"
        return " ".join(["python", script, *map(str, command[1:])])
    script = SCRIPT_OF_RESULT.get(result.name, Path(result.name).stem + ".py")
    if result.name in COMMAND_OF_RESULT:
        return COMMAND_OF_RESULT[result.name]
    return f"python benchmarks/{script}"


def provenance(result: Result) -> str:
    """The line under a figure or table: machine, date, reproducing command, source file."""
    return (f"*Machine: {machine_description(result.data)}. "
            f"Measured: {measurement_date(result.data)}. "
            f"Reproduce: `{reproduce_command(result)}`. "
            f"Source: `{result.name}`.*")


def figure_markdown(file_name: str, alt_text: str) -> str:
    """The image link of a figure of the page (relative to ``docs/benchmarks``)."""
    return f"![{alt_text}]({FIGURES_FOLDER}/{file_name})"


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (imported only when a figure is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 7,
        "xtick.labelsize": 7, "ytick.labelsize": 7, "figure.dpi": FIGURE_DPI,
        "savefig.dpi": FIGURE_DPI, "axes.grid": True, "grid.alpha": 0.3,
        "lines.markersize": 4, "lines.linewidth": 1.2,
    })
    return plt


def label_log_axis(axes: Any) -> None:
    """Put `axes` on a log y scale with plain-number labels at 1, 2 and 5 times powers of 10."""
    from matplotlib import ticker

    axes.set_yscale("log")
    axes.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axes.yaxis.set_minor_formatter(ticker.NullFormatter())


def series_style(index: int) -> dict[str, Any]:
    """Colour, marker and line style of the `index`-th series of a figure (stable order)."""
    return {"color": f"C{index % 10}", "marker": MARKERS[index % len(MARKERS)],
            "linestyle": LINE_STYLES[(index // 10) % len(LINE_STYLES)]}


def png_bytes(figure: Any) -> bytes:
    """`figure` as a compact PNG (256-colour palette, no software tag), then closed.

    The palette keeps the figures small (plots have few colours; anti-aliased edges are what
    would otherwise bloat them) and, like the missing tag, keeps the bytes the same from run to
    run.
    """
    from PIL import Image

    rendered = io.BytesIO()
    figure.savefig(rendered, format="png", dpi=FIGURE_DPI, metadata={"Software": None})
    pyplot().close(figure)
    rendered.seek(0)
    with Image.open(rendered) as image:
        palette = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                                dither=Image.Dither.NONE)
    compact = io.BytesIO()
    palette.save(compact, format="PNG", optimize=True)
    return compact.getvalue()


def lower_envelope(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The ``(bits, value)`` points that no other point beats with at most as many bits.

    >>> lower_envelope([(3.0, 0.2), (2.0, 0.5), (3.0, 0.4), (4.0, 0.3)])
    [(2.0, 0.5), (3.0, 0.2)]
    """
    envelope: list[tuple[float, float]] = []
    for bits, value in sorted(points):
        if not envelope or value < envelope[-1][1]:
            envelope.append((bits, value))
    return envelope


def plot_family(axes: Any, points: list[tuple[float, float]], label: str, index: int) -> None:
    """Draw one family's ``(bits, value)`` points, a line joining its `lower_envelope`.

    A family that sweeps one method over its rate is drawn as a curve; a family of K/V splits
    (several configurations at about the same bits) keeps every point as a marker, the line
    joining only the best ones.
    """
    style = series_style(index)
    envelope = lower_envelope(points)
    others = sorted(set(points) - set(envelope))
    axes.plot([bits for bits, _ in envelope], [value for _, value in envelope], label=label,
              **style)
    if others:
        axes.plot([bits for bits, _ in others], [value for _, value in others],
                  color=style["color"], marker=style["marker"], linestyle="none")


def group_in_order(rows: Iterable[dict[str, Any]], key: str) -> dict[Any, list[dict[str, Any]]]:
    """`rows` grouped by ``row[key]``, groups in order of first appearance."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    return groups


# --------------------------------------------------------------------------------------------
# Rate-distortion (e8_rate_distortion.json, e8_claim.json)
# --------------------------------------------------------------------------------------------


def has_shannon_gap(curves: dict[str, list[dict[str, float]]]) -> bool:
    """Whether every point carries ``gap_bits = rate - log2(1 / mse) / 2``.

    That gap is measured from Shannon's bound ``D(R) = 2^(-2R)`` for unit-variance Gaussian
    data, so the bound belongs in the figure exactly when the file reports it.
    """
    points = [point for curve in curves.values() for point in curve]
    return bool(points) and all(
        "gap_bits" in point and point["mse"] > 0
        and abs(point["rate"] - 0.5 * math.log2(1.0 / point["mse"]) - point["gap_bits"]) < 1e-6
        for point in points)


def figure_rate_distortion_gaussian(result: Result) -> bytes:
    """MSE (log scale) and gap to Shannon's bound against the rate, every curve of the file."""
    plt = pyplot()
    data = result.data
    curves, labels = data["curves"], data.get("labels", {})
    with_bound = has_shannon_gap(curves)
    figure, (mse_axes, gap_axes) = rate_distortion_axes(plt, with_bound)
    rates = [point["rate"] for curve in curves.values() for point in curve]
    if with_bound:
        low, high = min(rates), max(rates)
        grid = [low + (high - low) * step / 100 for step in range(101)]
        mse_axes.plot(grid, [2.0 ** (-2 * rate) for rate in grid], color="black",
                      linestyle="--", linewidth=1.0, label="Shannon bound $D(R)=2^{-2R}$")
        gap_axes.axhline(0.0, color="black", linestyle="--", linewidth=1.0)
    for index, (name, curve) in enumerate(curves.items()):
        style = series_style(index)
        label = labels.get(name, name)
        rate = [point["rate"] for point in curve]
        mse_axes.plot(rate, [point["mse"] for point in curve], label=label, **style)
        if with_bound:
            gap_axes.plot(rate, [point["gap_bits"] for point in curve], label=label, **style)
    mse_axes.set_yscale("log")
    mse_axes.set_xlabel("bits per coordinate (everything stored)")
    mse_axes.set_ylabel("MSE per coordinate (log)")
    mse_axes.set_title("distortion")
    mse_axes.legend(loc="lower left")
    if with_bound:
        gap_axes.set_xlabel("bits per coordinate (everything stored)")
        gap_axes.set_ylabel("gap to Shannon's bound (bits)")
        gap_axes.set_title("$R - \\frac{1}{2}\\log_2(1/D)$")
    figure.tight_layout()
    return png_bytes(figure)


def rate_distortion_axes(plt: Any, with_bound: bool) -> tuple[Any, tuple[Any, Any]]:
    """A figure with a distortion panel and, when `with_bound`, a gap panel beside it."""
    if with_bound:
        figure, (mse_axes, gap_axes) = plt.subplots(1, 2, figsize=(8.6, 3.4))
        return figure, (mse_axes, gap_axes)
    figure, mse_axes = plt.subplots(1, 1, figsize=(5.0, 3.4))
    return figure, (mse_axes, None)


def figure_rate_distortion_kv(result: Result) -> bytes:
    """Relative MSE and attention error against the rate on real keys and values (log y)."""
    plt = pyplot()
    curves = result.data["curves"]
    kinds = sorted({kind for curve in curves.values() for point in curve
                    for kind in point if kind != "setting"})
    metrics = [metric for metric in ("relative_mse", "attention_error")
               if any(metric in point[kind] for curve in curves.values()
                      for point in curve for kind in kinds)]
    figure, grid = plt.subplots(len(metrics), len(kinds), figsize=(8.6, 2.6 * len(metrics)),
                                squeeze=False)
    for row, metric in enumerate(metrics):
        for column, kind in enumerate(kinds):
            axes = grid[row][column]
            for index, (name, curve) in enumerate(curves.items()):
                points = sorted((point[kind]["bits"], point[kind][metric]) for point in curve
                                if point[kind].get(metric, 0) > 0)
                axes.plot([bits for bits, _ in points], [value for _, value in points],
                          label=name, **series_style(index))
            axes.set_yscale("log")
            axes.set_title(f"{KIND_NAMES.get(kind, kind)}: {metric.replace('_', ' ')}")
            axes.set_xlabel("bits per coordinate (everything stored)")
            axes.set_ylabel(f"{metric.replace('_', ' ')} (log)")
    grid[0][-1].legend(loc="upper right")
    figure.tight_layout()
    return png_bytes(figure)


def table_e8_claim_ratios(result: Result) -> str:
    """Bits each curve needs to reach each distortion level, and their ratio to E8 + rANS."""
    ratios = result.data["ratios"]
    curve_names = list(dict.fromkeys(name for entry in ratios for name in entry["bits"]))
    rows = []
    for entry in ratios:
        cells = []
        for name in curve_names:
            bits = entry["bits"].get(name)
            ratio = entry["ratio_to_e8_rans"].get(name)
            cells.append("not reached" if bits is None
                         else f"{bits:.2f} ({format_ratio(ratio)})")
        rows.append([KIND_NAMES.get(entry["kind"], entry["kind"]),
                     entry["metric"].replace("_", " "), format_number(entry["level"]), *cells])
    return markdown_table(["data", "distortion", "level", *curve_names], rows)


def section_rate_distortion(gaussian: Result, real_kv: Result,
                            figures: Figures) -> list[str]:
    """The rate-distortion section: Gaussian data, then the real keys and values."""
    lines = ["## Rate-distortion", ""]
    with reading(gaussian):
        data = gaussian.data
        figures["rate_distortion_gaussian.png"] = (gaussian, figure_rate_distortion_gaussian)
        curve_names = [data.get("labels", {}).get(name, name) for name in data["curves"]]
        lines += ["### Gaussian data", "",
                  f"Data: {data.get('data', 'not recorded')}. "
                  f"Rate: {data.get('rate', 'bits per coordinate')}.",
                  "",
                  figure_markdown("rate_distortion_gaussian.png",
                                  "MSE against bits per coordinate on Gaussian data"), "",
                  "Curves: " + "; ".join(curve_names) + "."]
        if has_shannon_gap(data["curves"]):
            lines[-1] += (" The dashed line is Shannon's bound D(R) = 2^(-2R) for unit-variance "
                          "Gaussian data; the right panel is each point's gap to it.")
        best = data.get("best_e8_gap")
        if isinstance(best, dict):
            window = data.get("best_e8_gap_window")
            lines[-1] += (f" Smallest E8 gap: {best['gap_bits']:.3f} bits at "
                          f"{best['rate']:.3f} bits per coordinate"
                          + (f" (searched between {window[0]:g} and {window[1]:g} bits)."
                             if window else "."))
        if "ok" in data:
            failures = data.get("failures") or []
            lines[-1] += (" The script's checks passed." if data["ok"] and not failures
                          else f" The script's checks failed: {'; '.join(map(str, failures))}.")
        lines += ["", provenance(gaussian), ""]
    with reading(real_kv):
        data = real_kv.data
        figures["rate_distortion_kv.png"] = (real_kv, figure_rate_distortion_kv)
        lines += ["### Real keys and values", "",
                  f"Data: {data.get('data', 'not recorded')}.", "",
                  figure_markdown("rate_distortion_kv.png",
                                  "Relative MSE and attention error against bits per "
                                  "coordinate on real keys and values"), "",
                  "Curves: " + ", ".join(f"`{name}`" for name in data["curves"]) + ". "
                  "Keys are quantized with exact values and values with exact keys.", "",
                  provenance(real_kv), ""]
        if data.get("ratios"):
            reference = next(iter(data["ratios"][0]["ratio_to_e8_rans"]))
            lines += [f"Bits per coordinate each curve needs to reach a distortion level "
                      f"(interpolated), and in brackets their ratio to `{reference}`:", "",
                      table_e8_claim_ratios(real_kv), "", provenance(real_kv), ""]
    return lines


# --------------------------------------------------------------------------------------------
# KV pairs on the SmolLM2 sample and perplexity (kv_split_study.json)
# --------------------------------------------------------------------------------------------


def figure_attention_error(result: Result) -> bytes:
    """Attention-output error against measured bits per coordinate, one series per family."""
    plt = pyplot()
    families = group_in_order(result.data["sample"]["rows"], "family")
    figure, axes = plt.subplots(figsize=(8.6, 4.2))
    for index, (family, rows) in enumerate(families.items()):
        points = [(row["measured_bits_per_coordinate"], row["attention_error"])
                  for row in rows if row["attention_error"] > 0]
        if points:
            plot_family(axes, points, family, index)
    axes.set_yscale("log")
    axes.set_xlabel("bits per coordinate (keys and values, everything stored)")
    axes.set_ylabel("attention-output error (log)")
    axes.set_title("attention-output error on the SmolLM2 sample")
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    return png_bytes(figure)


def table_attention_best_per_family(result: Result) -> str:
    """For each family and bit budget, the configuration of least attention error."""
    best = result.data["sample"]["best_per_family"]
    budgets = sorted({float(budget) for per_budget in best.values() for budget in per_budget})
    rows = []
    for family, per_budget in best.items():
        by_budget = {float(budget): row for budget, row in per_budget.items()}
        cells = [f"{by_budget[budget]['attention_error']:.3f} ({by_budget[budget]['label']})"
                 if budget in by_budget else "-" for budget in budgets]
        rows.append([family, *cells])
    return markdown_table(["family", *(f"<= {budget:g} bits" for budget in budgets)], rows)


def increase_percent(row: dict[str, Any]) -> float:
    """A perplexity row's increase over the unquantized model, in percent."""
    return 100.0 * (row["ratio"] - 1.0)


def figure_perplexity(result: Result) -> bytes:
    """Perplexity increase against bits per coordinate, one series per family."""
    plt = pyplot()
    rows = [row for row in result.data["perplexity"]["rows"] if row["ratio"] != 1.0]
    families = group_in_order(rows, "family")
    figure, axes = plt.subplots(figsize=(8.6, 4.0))
    for index, (family, family_rows) in enumerate(families.items()):
        points = [(row["bits_per_coordinate"], increase_percent(row)) for row in family_rows]
        plot_family(axes, points, family, index)
    if all(increase_percent(row) > 0 for row in rows):
        axes.set_yscale("log")
        axes.set_ylabel("perplexity increase (%, log)")
    else:
        axes.axhline(0.0, color="black", linewidth=0.8)
        axes.set_ylabel("perplexity increase (%)")
    axes.set_xlabel("bits per coordinate (keys and values)")
    axes.set_title("perplexity increase of SmolLM2-135M with a compressed KV cache")
    axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    return png_bytes(figure)


def table_perplexity_rows(result: Result) -> str:
    """Every perplexity measurement: family, configuration, bits, perplexity, increase."""
    rows = [[row["family"], row["label"], f"{row['bits_per_coordinate']:g}",
             f"{row['perplexity']:.3f}", f"{increase_percent(row):+.2f}%"]
            for row in result.data["perplexity"]["rows"]]
    return markdown_table(["family", "configuration", "bits per coordinate", "perplexity",
                           "increase"], rows)


def table_perplexity_thresholds(result: Result) -> str:
    """The fewest bits per coordinate at which each family stays within each threshold."""
    crossings = result.data["perplexity"]["least_bits_within"]
    thresholds = list(dict.fromkeys(level for per_family in crossings.values()
                                    for level in per_family))
    rows = [[family, *("not reached" if per_family.get(level) is None
                       else f"{per_family[level]:g}" for level in thresholds)]
            for family, per_family in crossings.items()]
    return markdown_table(["family", *(f"within {level}" for level in thresholds)], rows)


def section_kv_pairs(result: Result, figures: Figures) -> list[str]:
    """Attention error on the SmolLM2 sample and perplexity, for every method family."""
    lines: list[str] = []
    with reading(result):
        sample = result.data["sample"]
        families = list(group_in_order(sample["rows"], "family"))
        not_drawn = sorted({row["family"] for row in sample["rows"]
                            if row["attention_error"] <= 0})
        in_budget_table = set(sample.get("best_per_family", {}))
        figures["attention_error.png"] = (result, figure_attention_error)
        lines += ["## Attention error on the SmolLM2 sample", "",
                  "Keys and values with their own quantizers on the embedded SmolLM2 KV "
                  "sample: the causal attention-output error against the bits per coordinate "
                  "actually stored (keys and values, side information included).", "",
                  figure_markdown("attention_error.png",
                                  "Attention error against bits per coordinate per family"), "",
                  "Families: " + "; ".join(families) + ". Each family's line joins its "
                  "points that no other point of the family beats with as few bits."]
        if not_drawn:
            lines[-1] += (" Not drawn on the log axis (zero error, the reference): "
                          + "; ".join(not_drawn) + ".")
        lines += ["", provenance(result), ""]
        if in_budget_table:
            others = [family for family in families
                      if family not in in_budget_table and family not in not_drawn]
            lines += ["Least attention error of each family within a budget of bits per "
                      "coordinate (configuration in brackets):", "",
                      table_attention_best_per_family(result), ""]
            if others:
                lines += ["In the figure only (no budget rows): " + "; ".join(others) + ".", ""]
            lines += [provenance(result), ""]
    if "perplexity" not in result.data:
        return lines + ["No perplexity was measured in this results file.", ""]
    with reading(result):
        perplexity = result.data["perplexity"]
        references = [row for row in perplexity["rows"] if row["ratio"] == 1.0]
        figures["perplexity.png"] = (result, figure_perplexity)
        lines += ["## Perplexity", "",
                  f"Model `{Path(str(perplexity.get('model', 'not recorded'))).name}` on "
                  f"{perplexity.get('tokens', '?')} tokens of {perplexity.get('text', 'text')}; "
                  f"window {perplexity.get('window', '?')}, the newest "
                  f"{perplexity.get('residual', '?')} tokens exact, blocks of "
                  f"{perplexity.get('block', '?')} tokens compressed as they age out."]
        for reference in references:
            lines[-1] += (f" Reference ({reference['label']}): perplexity "
                          f"{reference['perplexity']:.3f}.")
        lines += ["", figure_markdown("perplexity.png",
                                      "Perplexity increase against bits per coordinate"), "",
                  "Each family's line joins its points that no other point of the family "
                  "beats with as few bits; the reference is not drawn.", "",
                  provenance(result), "", table_perplexity_rows(result), "",
                  provenance(result), ""]
        if perplexity.get("least_bits_within"):
            lines += ["Fewest bits per coordinate at which each family stays within a "
                      "perplexity increase:", "", table_perplexity_thresholds(result), "",
                      provenance(result), ""]
    return lines


# --------------------------------------------------------------------------------------------
# Key and QET studies (key_study.json, qet_study.json)
# --------------------------------------------------------------------------------------------


def table_key_study(result: Result) -> str:
    """Attention error of each key quantizer (values exact) at each nominal bit width."""
    rows = result.data["rows"]
    widths = list(dict.fromkeys(row["bits"] for row in rows))
    with_sink = any("attention_error_exact_first_token" in row for row in rows)
    cells: dict[str, dict[Any, str]] = {}
    for row in rows:
        text = f"{row['attention_error']:.3f}"
        if with_sink and row.get("attention_error_exact_first_token") is not None:
            text += f" / {row['attention_error_exact_first_token']:.3f}"
        text += f" ({row['measured_bits_per_coordinate']:g} b)"
        cells.setdefault(row["label"], {})[row["bits"]] = text
    table_rows = [[label, *(per_width.get(width, "-") for width in widths)]
                  for label, per_width in cells.items()]
    return markdown_table(["keys", *(f"{width} bits" for width in widths)], table_rows)


def figure_qet_study(result: Result) -> bytes:
    """Relative MSE against measured bits per coordinate, one panel per data set and block."""
    plt = pyplot()
    rows = result.data["rows"]
    data_sets = list(dict.fromkeys(row["data"] for row in rows))
    blocks = list(dict.fromkeys(row["block"] for row in rows))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    figure, grid = plt.subplots(len(blocks), len(data_sets),
                                figsize=(8.6, 1.0 + 2.3 * len(blocks)), squeeze=False)
    for row_index, block in enumerate(blocks):
        for column, data_set in enumerate(data_sets):
            axes = grid[row_index][column]
            for index, method in enumerate(methods):
                points = sorted((row["bits"], row["relative_mse"]) for row in rows
                                if row["method"] == method and row["block"] == block
                                and row["data"] == data_set)
                axes.plot([bits for bits, _ in points], [mse for _, mse in points],
                          label=method, **series_style(index))
            axes.set_yscale("log")
            axes.set_title(f"{data_set}, block {block}")
            axes.set_xlabel("bits per coordinate")
            if column == 0:
                axes.set_ylabel("relative MSE (log)")
    handles, labels = grid[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=6, fontsize=6)
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    return png_bytes(figure)


def section_studies(key_study: Result, qet_study: Result,
                    figures: Figures) -> list[str]:
    """Key quantizers with exact values, and QET against product quantization."""
    lines = ["## Other studies", ""]
    with reading(key_study):
        data = key_study.data
        lines += ["### Key quantizers", "",
                  f"Attention-output error with only the keys quantized (values exact) on the "
                  f"{data.get('data', 'sample')}; after the slash the error with the first "
                  "token kept exact, in brackets the bits per coordinate stored:", "",
                  table_key_study(key_study), "", provenance(key_study), ""]
    with reading(qet_study):
        methods = list(dict.fromkeys(row["method"] for row in qet_study.data["rows"]))
        figures["qet_study.png"] = (qet_study, figure_qet_study)
        lines += ["### QET and product quantization", "",
                  figure_markdown("qet_study.png",
                                  "Relative MSE against bits per coordinate for QET, PQ and "
                                  "the other quantizers"), "",
                  "Methods: " + "; ".join(methods) + ".", "", provenance(qet_study), ""]
    return lines


# --------------------------------------------------------------------------------------------
# Speed (foundation.json, turbo_qjl.json, polar.json, decode_attention.json, onnx_speed.json)
# --------------------------------------------------------------------------------------------


def table_kernel_ratios(result: Result) -> str:
    """Each implementation's speed against the NumPy reference and against the baselines."""
    rows = []
    for benchmark in result.data["benchmarks"]:
        implementations = [entry for entry in benchmark["entries"]
                           if entry["role"] == "implementation"]
        name = f"`{benchmark['name']}`"
        if not implementations:
            rows.append([name, "-", benchmark.get("note", "no implementation timed"), "-"])
        for entry in implementations:
            if entry["status"] != "ok":
                reason = entry.get("reason", entry["status"])
                rows.append([name, entry["name"], f"REFUSED: {reason}", "-"])
                continue
            baselines = "; ".join(f"{format_spread(summary)} {baseline}"
                                  for baseline, summary in entry.get("vs_baseline", {}).items())
            rows.append([name, entry["name"], format_spread(entry["speedup_vs_reference"]),
                         baselines or "-"])
    return markdown_table(["benchmark", "implementation", "vs NumPy reference",
                           "vs baseline"], rows)


def kernel_settings(result: Result) -> str:
    """One sentence on the rows and rounds of a kernel benchmark run."""
    settings = result.data.get("settings", {})
    parts = []
    if "rows" in settings:
        parts.append(f"{settings['rows']} rows of dim {settings.get('dim', '?')}")
    if settings.get("reference_rows"):
        parts.append(f"the NumPy reference on {settings['reference_rows']} rows")
    if "rounds" in settings:
        parts.append(f"median of {settings['rounds']} interleaved rounds")
    refused = result.data.get("refused") or []
    if refused:
        parts.append(f"refused: {', '.join(map(str, refused))}")
    return ("Settings: " + "; ".join(parts) + ".") if parts else ""


def decode_ratio_columns(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The paths of ``time_vs_fp16_dense`` split into the baseline (always 1) and the others."""
    paths = list(dict.fromkeys(path for row in rows for path in row["time_vs_fp16_dense"]))
    baselines = [path for path in paths
                 if all(row["time_vs_fp16_dense"].get(path, 1.0) == 1.0 for row in rows)]
    return baselines, [path for path in paths if path not in baselines]


def table_decode_attention(result: Result) -> str:
    """One decode step: time of each path over the fp16 dense baseline, per cache length."""
    rows = result.data["rows"]
    _, paths = decode_ratio_columns(rows)
    table_rows = []
    for row in rows:
        ratios = row["time_vs_fp16_dense"]
        table_rows.append([row["tokens"], row["label"], f"{row['bits_per_coordinate']:g}",
                           f"{row['memory_vs_fp16']:.3f}",
                           *(format_ratio(ratios[path]) if path in ratios else "not run"
                             for path in paths)])
    return markdown_table(["tokens", "keys | values", "bits per coordinate", "memory vs fp16",
                           *(f"{path} / fp16" for path in paths)], table_rows)


def figure_decode_attention(result: Result) -> bytes:
    """Bars of each path's decode-step time over fp16 dense attention, per cache and length."""
    plt = pyplot()
    rows = result.data["rows"]
    baselines, paths = decode_ratio_columns(rows)
    pairs = group_in_order(rows, "label")
    figure, grid = plt.subplots(1, len(pairs), figsize=(8.6, 3.2), squeeze=False, sharey=True)
    width = 0.8 / max(len(paths), 1)
    for column, (label, pair_rows) in enumerate(pairs.items()):
        axes = grid[0][column]
        for index, path in enumerate(paths):
            positions = [position + (index - (len(paths) - 1) / 2) * width
                         for position, row in enumerate(pair_rows)
                         if path in row["time_vs_fp16_dense"]]
            values = [row["time_vs_fp16_dense"][path] for row in pair_rows
                      if path in row["time_vs_fp16_dense"]]
            axes.bar(positions, values, width, label=path, color=f"C{index}")
        axes.axhline(1.0, color="black", linestyle="--", linewidth=1.0,
                     label=" / ".join(baselines) + " = 1" if baselines else None)
        axes.set_xticks(range(len(pair_rows)), [str(row["tokens"]) for row in pair_rows])
        label_log_axis(axes)
        axes.set_xlabel("tokens in the cache")
        axes.set_title(label, fontsize=7)
        axes.grid(False, axis="x")
    grid[0][0].set_ylabel("time / fp16 dense (log)")
    handles, labels = grid[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels))
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    return png_bytes(figure)


def onnx_ratio_columns(entries: list[dict[str, Any]]) -> list[str]:
    """The ratio keys (``*_over_*``) of the ONNX entries: those over latkv first, then the rest.

    Within each group the keys keep their order of first appearance.
    """
    keys = list(dict.fromkeys(key for entry in entries for key in entry if "_over_" in key))
    return sorted(keys, key=lambda key: not key.endswith("_over_latkv"))


def table_onnx_speed(result: Result) -> str:
    """onnxruntime's time over latkv's per quantizer and step, and latkv over astype(fp16)."""
    entries = result.data["entries"]
    columns = onnx_ratio_columns(entries)
    rows = []
    for entry in entries:
        skipped = entry.get("skipped") or {}
        cells = []
        for column in columns:
            runner = column.split("_over_")[0]
            if column in entry:
                cells.append(format_ratio(entry[column]))
            else:
                cells.append(f"skipped: {skipped[runner]}" if runner in skipped else "-")
        rows.append([f"`{entry['spec']}`", entry["what"], entry["tokens"], *cells])
    return markdown_table(["quantizer", "step", "tokens",
                           *(column.replace("_over_", " / ") for column in columns)], rows)


def section_speed(kernels: Sequence[Result], decode: Result, onnx: Result,
                  figures: Figures) -> list[str]:
    """Speed ratios: kernels against their references, decode attention, ONNX Runtime."""
    lines = ["## Speed", "",
             "Every speed figure is a ratio of times measured in the same run (the machines are "
             "shared, so absolute times are noisy). In the kernel tables, above 1x the "
             "implementation is faster than the reference or baseline; the min-max of the "
             "per-round paired ratios is in brackets.", ""]
    titles = {"foundation.json": "Foundation kernels", "turbo_qjl.json": "TurboQuant and QJL",
              "polar.json": "PolarQuant"}
    for result in kernels:
        with reading(result):
            lines += [f"### {titles.get(result.name, Path(result.name).stem)}", "",
                      table_kernel_ratios(result), ""]
            settings = kernel_settings(result)
            if settings:
                lines += [settings, ""]
            lines += [provenance(result), ""]
    with reading(decode):
        data = decode.data
        figures["decode_attention.png"] = (decode, figure_decode_attention)
        first = data["rows"][0] if data["rows"] else {}
        shape = (f" {first['kv_heads']} KV heads, {first['q_heads']} query heads, head dim "
                 f"{first['dim']}, the newest {first['residual']} tokens in fp16."
                 if {"kv_heads", "q_heads", "dim", "residual"} <= set(first) else "")
        lines += ["### Decode-step attention", "",
                  "One decode step of attention computed from the compressed cache, as a time "
                  "ratio to dense attention over the same cache kept in fp16 (below 1x the "
                  f"compressed cache is faster).{shape} Median of {data.get('rounds', '?')} "
                  "interleaved rounds; "
                  f"OPENBLAS_NUM_THREADS={data.get('openblas_threads', 'not recorded')}.", "",
                  table_decode_attention(decode), "", provenance(decode), "",
                  figure_markdown("decode_attention.png",
                                  "Decode-step time over fp16 dense attention"), "",
                  provenance(decode), ""]
    with reading(onnx):
        data = onnx.data
        shape = "x".join(map(str, data["shape"])) if data.get("shape") else "not recorded"
        lines += ["### ONNX Runtime against latkv", "",
                  f"onnxruntime {data.get('onnxruntime', '(version not recorded)')} running "
                  "latkv's exported graphs (standard and custom-op flavours) over latkv's own "
                  f"CPU path, cache shape {shape}, {data.get('queries_per_head', '?')} queries "
                  "per KV head. `onnxruntime_* / latkv`: onnxruntime's time over latkv's (above "
                  "1x latkv is faster); `latkv / astype_float16`: latkv's time over "
                  "`astype(float16)` of the same input, a memory-speed yardstick; "
                  "-: not measured for that step.", "",
                  table_onnx_speed(onnx), "", provenance(onnx), ""]
    return lines


# --------------------------------------------------------------------------------------------
# GPU pages and the whole report
# --------------------------------------------------------------------------------------------


def page_title(path: Path) -> str:
    """The first ``# `` heading of a markdown page, else its file name."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem


def section_gpu(out_dir: Path) -> list[str]:
    """Links to the ``gpu-*.md`` pages beside the report, or a note that there are none."""
    pages = sorted(out_dir.glob("gpu-*.md"))
    lines = ["## GPU", ""]
    if not pages:
        return lines + ["No GPU figures have been measured yet: no session so far was lent a "
                        "GPU. `benchmarks/gpu_speed.py` measures them and "
                        "`benchmarks/GPU.md` says how to run it on a lent machine; its page "
                        "then appears here.", ""]
    lines += [f"- [{page_title(page)}]({page.name})" for page in pages]
    return lines + [""]


@dataclass
class Report:
    """The generated page and the figures it shows.

    Attributes
    ----------
    markdown : str
        The page.
    figures : dict of str to (Result, callable)
        Figure file name to its results file and the function that draws the figure from that
        file and returns the PNG bytes.
    """

    markdown: str
    figures: Figures


def build_report(results: dict[str, Result], out_dir: Path) -> Report:
    """Build the page from the results; the figures are drawn only when asked for.

    Parameters
    ----------
    results : dict of str to Result
        The results files by name (`load_results`).
    out_dir : Path
        The folder the page goes to (where ``gpu-*.md`` pages are looked for).

    Returns
    -------
    Report
        The markdown and the figure drawers.
    """
    figures: Figures = {}
    lines = ["# Benchmark report", "",
             "This page is generated by `python benchmarks/report.py` from the JSON files of "
             "`benchmarks/results/`: edit the generator or rerun a benchmark, not this page. "
             "Under every figure and table: the machine, the date of the measurement and the "
             "command that reproduces it.", ""]
    lines += section_rate_distortion(results["e8_rate_distortion.json"],
                                     results["e8_claim.json"], figures)
    lines += section_kv_pairs(results["kv_split_study.json"], figures)
    lines += section_studies(results["key_study.json"], results["qet_study.json"], figures)
    lines += section_speed([results["foundation.json"], results["turbo_qjl.json"],
                            results["polar.json"]], results["decode_attention.json"],
                           results["onnx_speed.json"], figures)
    lines += section_gpu(out_dir)
    markdown = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip("\n") + "\n"
    return Report(markdown, figures)


def write_atomic(path: Path, content: bytes) -> None:
    """Write `content` to `path` through a temporary file in the same folder and `os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(content)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def check_report(report: Report, out_dir: Path) -> list[str]:
    """What differs between `report` and the files in `out_dir` (empty when up to date)."""
    problems = []
    page = out_dir / REPORT_NAME
    if not page.exists():
        problems.append(f"{page} does not exist")
    elif page.read_text(encoding="utf-8") != report.markdown:
        problems.append(f"{page} differs from what the results give")
    problems += [f"{out_dir / FIGURES_FOLDER / name} does not exist"
                 for name in report.figures if not (out_dir / FIGURES_FOLDER / name).exists()]
    return problems


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                        help="folder of the results JSON (default: benchmarks/results)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder of the page and its figures/ (default: docs/benchmarks)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the page on disk is not current")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Generate (or with ``--check`` verify) the report; the exit status.

    Returns
    -------
    int
        0 on success, 1 when ``--check`` finds the page out of date, 2 when a results file is
        missing or malformed.
    """
    arguments = parse_arguments(argv)
    try:
        report = build_report(load_results(arguments.results), arguments.out)
        if arguments.check:
            problems = check_report(report, arguments.out)
            for problem in problems:
                print(f"report.py: {problem}; run python benchmarks/report.py", file=sys.stderr)
            return 1 if problems else 0
        for name, (result, draw) in report.figures.items():
            with reading(result):
                content = draw(result)
            write_atomic(arguments.out / FIGURES_FOLDER / name, content)
        write_atomic(arguments.out / REPORT_NAME, report.markdown.encode("utf-8"))
    except ReportError as error:
        print(f"report.py: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {arguments.out / REPORT_NAME} and {len(report.figures)} figures in "
          f"{arguments.out / FIGURES_FOLDER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
