"""benchmarks/report.py: the benchmark page of the docs regenerates from the results JSON."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "report.py"
RESULTS = ROOT / "benchmarks" / "results"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURE_LINK = re.compile(r"!\[[^\]]*\]\(figures/([^)]+)\)")


@pytest.fixture(scope="module")
def report():
    """The generator, imported from its file (``benchmarks`` is not a package)."""
    spec = importlib.util.spec_from_file_location("latkv_benchmark_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def generated(report, tmp_path_factory):
    """A full run (page and figures) on the real results into a temporary folder."""
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("report")
    assert report.main(["--results", str(RESULTS), "--out", str(out)]) == 0
    return out


def run_cli(*arguments):
    """``python benchmarks/report.py *arguments`` in a subprocess."""
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, arguments)],
                          capture_output=True, text=True, timeout=120)


def markdown_tables(markdown):
    """Every table of `markdown` as a list of rows of cells (header first, pipes unescaped)."""
    tables, current = [], None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        if set(line) <= set("|-"):
            continue
        cells = [cell.strip().replace("\\|", "|")
                 for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if current is None:
            current = [cells]
            tables.append(current)
        else:
            current.append(cells)
    return tables


def table_with_column(markdown, column):
    """The one table whose header has `column`, and that column's index."""
    found = [table for table in markdown_tables(markdown) if column in table[0]]
    assert len(found) == 1, f"{len(found)} tables with a column {column!r}"
    return found[0], found[0][0].index(column)


def assert_shows(cell, value):
    """`cell` starts with `value` rounded to the digits it shows."""
    match = re.match(r"[-+]?\d+(?:\.(\d+))?", cell)
    assert match, f"no number in {cell!r}"
    decimals = len(match.group(1) or "")
    assert abs(float(match.group()) - value) <= 0.5 * 10.0 ** -decimals + 1e-12, (cell, value)


def test_page_names_every_method_family_and_its_figures_are_pngs(generated):
    markdown = (generated / "report.md").read_text()
    study = json.loads((RESULTS / "kv_split_study.json").read_text())
    families = {row["family"] for row in study["sample"]["rows"]}
    families |= {row["family"] for row in study["perplexity"]["rows"]}
    missing = sorted(family for family in families if family not in markdown)
    assert not missing, f"families not on the page: {missing}"

    linked = FIGURE_LINK.findall(markdown)
    assert len(linked) >= 6 and len(set(linked)) == len(linked)
    assert sorted(linked) == sorted(path.name for path in (generated / "figures").iterdir())
    for name in linked:
        content = (generated / "figures" / name).read_bytes()
        assert content.startswith(PNG_SIGNATURE) and len(content) > len(PNG_SIGNATURE), name
        assert len(content) < 150_000, f"{name}: {len(content)} bytes"


def test_every_figure_and_table_says_machine_date_and_command(generated):
    blocks = (generated / "report.md").read_text().split("\n\n")
    for index, block in enumerate(blocks):
        if block.startswith("|") or block.startswith("!["):
            captions = [later for later in blocks[index + 1:index + 4]
                        if later.startswith("*Machine: ")]
            assert captions, f"no provenance under {block[:60]!r}"
            assert "Measured: " in captions[0] and "Reproduce: `" in captions[0]


def test_markdown_is_deterministic(report, generated):
    first = report.build_report(report.load_results(RESULTS), generated).markdown
    second = report.build_report(report.load_results(RESULTS), generated).markdown
    assert first.encode() == second.encode() == (generated / "report.md").read_bytes()


def test_check_mode_passes_on_a_current_page_and_fails_on_a_stale_one(report, generated,
                                                                      tmp_path):
    assert report.main(["--results", str(RESULTS), "--out", str(generated), "--check"]) == 0
    stale = tmp_path / "out"
    shutil.copytree(generated, stale)
    page = stale / "report.md"
    page.write_text(page.read_text().replace("0.", "9.", 1))
    assert report.main(["--results", str(RESULTS), "--out", str(stale), "--check"]) == 1


def test_malformed_json_exits_2_naming_the_file(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    (results / "onnx_speed.json").write_text('{"machine": {"cpu_count": 2}, "entries": [')
    completed = run_cli("--results", results, "--out", tmp_path / "out")
    assert completed.returncode == 2
    assert "onnx_speed.json" in completed.stderr and "malformed JSON" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not (tmp_path / "out" / "report.md").exists()


@pytest.mark.parametrize("damage", ["missing", "wrong structure"])
def test_missing_or_misshapen_file_exits_2_naming_it(report, tmp_path, capsys, damage):
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    target = results / "decode_attention.json"
    if damage == "missing":
        target.unlink()
    else:
        document = json.loads(target.read_text())
        del document["rows"][0]["time_vs_fp16_dense"]
        target.write_text(json.dumps(document))
    status = report.main(["--results", str(results), "--out", str(tmp_path / "out"), "--check"])
    assert status == 2
    assert "decode_attention.json" in capsys.readouterr().err


def test_decode_table_cell_is_the_ratio_of_the_measured_times(generated):
    markdown = (generated / "report.md").read_text()
    table, column = table_with_column(markdown, "fused_numba / fp16")
    row = json.loads((RESULTS / "decode_attention.json").read_text())["rows"][-1]
    seconds = row["median_seconds"]
    expected = seconds["fused_numba"] / seconds["fp16_dense"]
    [cells] = [cells for cells in table[1:]
               if cells[0] == str(row["tokens"]) and cells[1] == row["label"]]
    assert cells[column].endswith("x")
    assert_shows(cells[column], expected)


def test_onnx_table_cell_is_the_ratio_of_the_measured_times(generated):
    markdown = (generated / "report.md").read_text()
    table, column = table_with_column(markdown, "onnxruntime_standard / latkv")
    entry = json.loads((RESULTS / "onnx_speed.json").read_text())["entries"][-1]
    seconds = entry["seconds_median"]
    expected = seconds["onnxruntime_standard"] / seconds["latkv"]
    [cells] = [cells for cells in table[1:]
               if cells[0] == f"`{entry['spec']}`" and cells[1] == entry["what"]]
    assert_shows(cells[column], expected)


def test_gpu_pages_beside_the_report_are_linked(report, tmp_path):
    results = report.load_results(RESULTS)
    assert "No GPU figures have been measured yet" in report.build_report(
        results, tmp_path).markdown
    (tmp_path / "gpu-h100.md").write_text("# GPU: one H100\n\nfigures\n")
    markdown = report.build_report(results, tmp_path).markdown
    assert "[GPU: one H100](gpu-h100.md)" in markdown
    assert "No GPU figures" not in markdown
