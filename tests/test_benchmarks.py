"""The benchmarks run on small inputs and every implementation passes its validator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_benchmark(tmp_path, script, *arguments):
    """Run ``benchmarks/<script> *arguments --json FILE``; its exit status must be 0; the JSON."""
    out = tmp_path / (Path(script).stem + ".json")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *arguments,
                             "--json", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads(out.read_text())


def test_foundation_benchmark_quick_run_validates(tmp_path):
    document = run_benchmark(tmp_path, "bench_foundation.py", "--quick")
    assert document["benchmarks"], "no benchmark ran"


def test_turbo_qjl_benchmark_quick_run_validates(tmp_path):
    import latkv

    document = run_benchmark(tmp_path, "bench_turbo_qjl.py", "--quick")
    assert document["ok"] and len(document["benchmarks"]) == 18
    for bench in document["benchmarks"]:
        method = {"qjl": latkv.QJL, "polar": latkv.PolarQuant}.get(
            bench["name"].split("[")[0], latkv.TurboQuant)
        # the fast path is timed exactly where the quantizer lists it
        assert bench["fast_backend"] == ("numba" if "numba" in method.backends else None)
        roles = [e["role"] for e in bench["entries"]]
        assert roles.count("implementation") == (bench["fast_backend"] is not None)
        assert all(e["status"] == "ok" for e in bench["entries"])


def test_e8_claim_quick_run(tmp_path):
    document = run_benchmark(tmp_path, "e8_claim.py", "--quick")
    assert set(document["curves"]) == {"e8-rans", "e8-rans-no-rotation", "scalar-rans",
                                       "scalar-rans-hadamard", "scalar-minmax", "e8-fixed"}
    # E8 + rANS is never worse in rate than fixed-rate min-max scalar at equal MSE
    for row in document["ratios"]:
        ratio = row["ratio_to_e8_rans"]["scalar-minmax"]
        if row["metric"] == "relative_mse" and ratio is not None:
            assert ratio > 1


def test_e8_rate_distortion_quick_run(tmp_path):
    document = run_benchmark(tmp_path, "e8_rate_distortion.py", "--quick")
    assert document["ok"] and not document["failures"]
    assert set(document["curves"]) == {
        "e8_entropy", "e8_fixed", "turbo", "scalar_minmax", "uniform_scalar_rans",
        "uniform_scalar_rans_hadamard"}
    assert all(len(curve) >= 2 for curve in document["curves"].values())
    # n = 1000 pays more for the stored model than the full run (which gets 0.16 bits)
    best = document["best_e8_gap"]
    assert 1 <= best["rate"] <= 3 and best["gap_bits"] < 0.3


def test_qet_study_quick_run(tmp_path):
    rows = run_benchmark(tmp_path, "qet_study.py", "--quick", "--blocks", "128")["rows"]
    methods = {row["method"] for row in rows}
    assert {"PQ M=4", "QET M=4", "PQ best M", "QET best M", "TurboQuant"} <= methods
    # on full blocks every QET / PQ configuration stays within its bit budget (short tail
    # blocks of the 160-token sample sequences may not fit even one codeword per stage)
    for row in rows:
        if row["method"].startswith(("PQ", "QET")) and row["data"] == "gaussian":
            assert row["bits"] <= row["target_bits"] + 1e-9


def test_decode_attention_quick_run(tmp_path):
    rows = run_benchmark(tmp_path, "decode_attention.py", "--quick", "--rounds", "1")["rows"]
    assert [(r["tokens"], r["label"]) for r in rows] == [
        (tokens, f"K {pair.replace('|', ' | V ')}") for tokens in (1024, 2048)
        for pair in ("turbo:4|turbo:4", "turbo:2|turbo:2",
                     "scalar:4,axis=channel,group=128|turbo:3")]
    for row in rows:
        # checked before timing: the fused step equals attention over the decoded cache
        assert row["max_relative_error_vs_decoded_float64"] < 1e-4
        # 128 fp16 tokens + whole blocks of 128 tokens of codes
        expected = (128 * 16 + (row["tokens"] - 128) // 128 * 128
                    * row["bits_per_coordinate"]) / (row["tokens"] * 16)
        assert abs(row["memory_vs_fp16"] - expected) < 1e-9
        assert set(row["time_vs_fp16_dense"]) >= {"fp16_dense", "fused_numba", "unfused_numba"}


def test_kv_split_study_quick_run(tmp_path):
    sample = run_benchmark(tmp_path, "kv_split_study.py", "--quick")["sample"]
    rows = {(r["family"], r["label"]): r for r in sample["rows"]}
    assert rows[("fp16", "fp16")]["bytes_vs_fp16"] == 1.0
    # top-8 agreement depends on the keys alone: K4V2 ranks keys exactly as K4V4 does
    split, symmetric = rows[("TurboQuant K/V split", "K4V2")], rows[(
        "TurboQuant (keys centred)", "K4V4")]
    assert split["top8_agreement"] == symmetric["top8_agreement"]
    assert split["attention_error"] > symmetric["attention_error"]
    assert rows[("TurboQuant K/V split", "K8V4")]["attention_error"] < symmetric[
        "attention_error"]
    for family, budgets in sample["best_per_family"].items():
        for budget, row in budgets.items():
            assert row["measured_bits_per_coordinate"] <= float(budget) + 1e-9


def test_onnx_speed_benchmark_quick_run_validates(tmp_path):
    pytest.importorskip("onnxruntime")
    document = run_benchmark(tmp_path, "onnx_speed.py", "--quick")
    assert document["ok"] and len(document["entries"]) == 8
    for entry in document["entries"]:
        # every step was checked against latkv and timed through the standard graph
        assert entry["onnxruntime_standard_over_latkv"] > 0
        assert not entry["skipped"]
