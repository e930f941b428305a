"""benchmarks/gpu_speed.py without a GPU: its pure parts, and a dry run of the whole script on
the host (NumPy arrays, the numba backend, a host clock), which exercises every check, the
interleaving, the ratios, the targets, the JSON and the docs page."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gpu_speed  # noqa: E402

import latkv  # noqa: E402


def test_interleaved_rounds_start_each_round_at_the_next_call():
    order = []

    def seconds(call, repeats):
        order.append((call(), repeats))
        return {"a": 0.001, "b": 0.004, "c": 0.02}[call()]

    calls = {name: (lambda name=name: name) for name in "abc"}
    samples = gpu_speed.interleaved_rounds(calls, rounds=4, seconds=seconds, min_sample_s=0.01)
    # one calibration call each, then rounds starting at a, b, c, a
    assert [name for name, _ in order[:3]] == ["a", "b", "c"]
    assert [name for name, _ in order[3:]] == list("abc" "bca" "cab" "abc")
    # repeats make a sample last at least min_sample_s: 10 x 1 ms, 3 x 4 ms, 1 x 20 ms
    assert {name: repeats for name, repeats in order[3:6]} == {"a": 10, "b": 3, "c": 1}
    assert samples == {"a": [0.001] * 4, "b": [0.004] * 4, "c": [0.02] * 4}


def test_summary_ratio_and_target():
    assert gpu_speed.summary([1.0, 3.0, 2.0]) == {"median_s": 2.0, "min_s": 1.0, "max_s": 3.0,
                                                  "spread": 1.0}
    ratio = gpu_speed.time_ratio({"x": [1.0, 2.0, 3.0], "y": [2.0, 2.0, 2.0]}, "x", "y")
    assert ratio == {"median": 1.0, "min": 0.5, "max": 1.5}
    assert gpu_speed.target(0.6, 0.65, "<=")["met"] is True
    assert gpu_speed.target(0.7, 0.65, "<=")["met"] is False
    assert gpu_speed.target(0.4, 0.5, ">=")["met"] is False


def test_device_slug_and_sample_rows():
    assert gpu_speed.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gpu_speed.device_slug("???") == "device"
    np.testing.assert_array_equal(gpu_speed.sample_rows(10), np.arange(10))
    rows = gpu_speed.sample_rows(1 << 20)
    assert rows.size == 2 * gpu_speed.SAMPLE_ROWS and rows[0] == 0 and rows[-1] == (1 << 20) - 1


def test_identical_compares_bit_patterns_and_close_compares_to_the_scale():
    gpu_speed.assert_identical(np.array([0.0, 1.0], np.float32), np.array([0.0, 1.0], np.float32),
                               "x")
    with pytest.raises(AssertionError, match="1 of 2 elements differ"):
        gpu_speed.assert_identical(np.array([-0.0, 1.0], np.float32),
                                   np.array([0.0, 1.0], np.float32), "x")
    with pytest.raises(AssertionError, match="uint8"):
        gpu_speed.assert_identical(np.zeros(2, np.uint8), np.zeros(2, np.int8), "x")
    expected = np.array([100.0, 1.0])
    gpu_speed.assert_close(expected + 5e-4, expected, "x", rtol=1e-5)   # 5e-4 < 1e-5 * 100
    with pytest.raises(AssertionError, match="largest difference"):
        gpu_speed.assert_close(expected + 2e-3, expected, "x", rtol=1e-5)
    with pytest.raises(AssertionError, match="non-finite"):
        gpu_speed.assert_close(np.array([np.nan, 1.0]), expected, "x")


def test_a_wrong_or_broken_entry_is_not_timed(tmp_path):
    platform = gpu_speed.cpu_platform()
    settings = gpu_speed.parse_args(["--cpu", "--rounds", "2", "--min-sample-s", "0"])

    def wrong():
        raise AssertionError("codes differ")

    def broken():
        raise RuntimeError("kernel launch failed")

    group = gpu_speed.Group("codec", "g", "", [
        gpu_speed.Entry("copy", lambda: None, 8),
        gpu_speed.Entry("wrong", lambda: None, 8, wrong),
        gpu_speed.Entry("broken", broken, 8)], copy_entry="copy",
        ratios=[("wrong", "copy")])
    result = gpu_speed.run_group(group, platform, settings, lambda text: None)
    entries = result["entries"]
    assert entries["copy"]["status"] == "timed" and len(entries["copy"]["samples_s"]) == 2
    assert entries["wrong"] == {"bytes_moved": 8, "status": "refused", "reason": "codes differ"}
    assert entries["broken"]["status"] == "failed"
    assert "RuntimeError: kernel launch failed" in entries["broken"]["reason"]
    assert result["ratios"] == {}


def test_arguments_are_checked():
    for argv in (["--only", "codec,speed"], ["--tokens", "1000"], ["--rounds", "-1"]):
        with pytest.raises(SystemExit):
            gpu_speed.parse_args(argv)
    args = gpu_speed.parse_args([])
    assert (args.rows, args.tokens, args.batches, args.rounds) == (
        1 << 20, gpu_speed.ATTENTION_TOKENS, gpu_speed.ATTENTION_BATCHES, 9)


def test_without_a_gpu_it_exits_with_status_2(tmp_path, capsys):
    if gpu_speed.gpu_platform() is not None:
        pytest.skip("this machine has a CUDA device: the script would run")
    assert gpu_speed.main(["--quick", "--out", str(tmp_path / "x.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_dry_run_on_the_host_checks_and_times_every_entry(tmp_path):
    out, page = tmp_path / "gpu.json", tmp_path / "gpu.md"
    rows = 1024
    status = gpu_speed.main(["--cpu", "--rows", str(rows), "--tokens", "256", "--rounds", "2",
                             "--only", "codec,attention", "--out", str(out),
                             "--markdown", str(page)])
    assert status == 0
    document = json.loads(out.read_text())
    names = [result["name"] for result in document["results"]]
    assert len(names) == 2 * len(gpu_speed.PACK_BITS) + 1 + 2 * len(gpu_speed.CODEC_SPECS) + 1
    for result in document["results"]:
        for name, record in result["entries"].items():
            assert record["status"] == "timed", (result["name"], name, record)
            if name != "copy":
                assert "fraction_of_copy_bandwidth" in record
        assert result["targets"], result["name"]
    # each quantizer group ran its own method: the bytes it moves are its input and its codes
    for spec in gpu_speed.CODEC_SPECS:
        code_size = latkv.quantizer(spec, dim=gpu_speed.DIM).code_size
        for step in ("encode", "decode"):
            (result,) = [r for r in document["results"] if r["name"] == f"{step}[{spec}]"]
            assert result["entries"]["numba"]["bytes_moved"] == rows * (2 * gpu_speed.DIM
                                                                        + code_size)
    (attention,) = [r for r in document["results"] if r["section"] == "attention"]
    for label in gpu_speed.ATTENTION_PAIRS:
        check = attention["entries"][f"{label} numba"]["check"]
        assert check["fused"] and check["relative_error"] < 1e-4
    assert attention["rotated_copies"] * attention["fp16_kv_bytes"] >= gpu_speed.WORKING_SET
    assert set(attention["targets"]) == {"fp16 fraction of copy bandwidth",
                                         "4-bit over fp16 at batch 1", "2-bit over fp16"}
    assert document["settings"]["reportable"] is False
    text = page.read_text()
    assert text.startswith("# GPU benchmarks: cpu (dry run")
    assert "| decode_attention[tokens=256,batch=1] | ratio 4-bit numba/fp16 |" in text


def test_dry_run_binds_onnxruntime_inputs_by_pointer_and_checks_them(tmp_path):
    out = tmp_path / "onnx.json"
    assert gpu_speed.main(["--cpu", "--only", "onnx", "--rounds", "1", "--min-sample-s", "0",
                           "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["name"] for r in results] == [
        f"onnx[{latkv.quantizer(spec, dim=gpu_speed.DIM).label}] {step}"
        for spec in gpu_speed.ONNX_SPECS for step in gpu_speed.ONNX_STEPS]
    for result in results:
        record = result["entries"]["onnxruntime"]
        assert record["status"] == "timed" and record["check"], result["name"]
        assert "onnxruntime/latkv" in result["ratios"]


def test_a_group_that_cannot_be_built_is_recorded_in_its_section(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_speed, "CODEC_SPECS", ("nosuch:4",))
    monkeypatch.setattr(gpu_speed, "PACK_BITS", ())
    out = tmp_path / "x.json"
    assert gpu_speed.main(["--cpu", "--rows", "64", "--rounds", "1", "--only", "codec",
                           "--out", str(out)]) == 1
    results = json.loads(out.read_text())["results"]
    assert [(r["section"], r["name"]) for r in results] == [
        ("codec", "randomized_hadamard[dim=128]"), ("codec", "encode[nosuch:4]"),
        ("codec", "decode[nosuch:4]")]
    assert results[1]["entries"]["build"]["status"] == "failed"
    assert "nosuch" in results[1]["entries"]["build"]["reason"]


def test_the_host_gemm_is_cublas_column_major_strided_batched():
    """The dry run's stand-in for cublasGemmStridedBatchedEx: column-major matrices at
    strides in flat buffers, A optionally transposed (so the baseline's layout arguments are
    checked without a GPU)."""
    rng = np.random.default_rng(3)
    platform = gpu_speed.cpu_platform()
    count, m, n, k = 3, 5, 2, 4
    a = rng.standard_normal((count, m, k)).astype(np.float16)   # row-major (m, k) = col-major
    b = rng.standard_normal((count, n, k)).astype(np.float16)   # (k, m) and (k, n), ld k
    c = np.full((count, n, m), np.nan, np.float32)              # col-major (m, n), ld m
    gpu_speed.gemm_strided_batched(platform, True, m, n, k, a, k, m * k, b, k, n * k, c, m,
                                   n * m, count)
    expected = np.einsum("imk,ink->inm", a.astype(np.float64), b.astype(np.float64))
    np.testing.assert_allclose(c, expected, rtol=1e-6)
    # not transposed: A col-major (m, k) with ld m is row-major (k, m)
    a2 = rng.standard_normal((count, k, m)).astype(np.float16)
    gpu_speed.gemm_strided_batched(platform, False, m, n, k, a2, m, m * k, b, k, n * k, c, m,
                                   n * m, count)
    np.testing.assert_allclose(c, np.einsum("ikm,ink->inm", a2.astype(np.float64),
                                            b.astype(np.float64)), rtol=1e-6)
