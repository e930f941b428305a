"""KV statistics against hand-derived values and sampling theory.

Deterministic cases use balanced signs: each (head, channel) column holds a random permutation
of ``tokens/2`` values +1 and ``tokens/2`` values -1, so its mean is exactly 0, its std (ddof 0)
exactly 1, its max |x| exactly 1 and its kurtosis exactly 1. Random cases compare the sample
kurtosis with its population value within 4 standard errors from the delta method.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from latkv.kv_stats import (
    KINDS,
    OUTLIER_THRESHOLD,
    STATS_COLUMNS,
    SUMMARY_FIGURES,
    TOP_CHANNELS,
    kv_statistics,
    stats_table,
    summarize,
)


def balanced_signs(rng: np.random.Generator, heads: int, tokens: int, dim: int) -> np.ndarray:
    """``(heads, tokens, dim)`` float64 of +-1, each column exactly half +1."""
    column = np.repeat([1.0, -1.0], tokens // 2)
    signs = np.empty((heads, tokens, dim))
    for head in range(heads):
        for channel in range(dim):
            signs[head, :, channel] = rng.permutation(column)
    return signs


def kurtosis_standard_error(m2: float, m4: float, m6: float, m8: float, n: int) -> float:
    """Delta-method standard error of ``m4 / m2**2`` from ``n`` values of a symmetric law.

    With ``g(a, b) = b / a**2``: ``n Var = (m8 - m4**2) / m2**4 + 4 m4**2 (m4 - m2**2) / m2**6
    - 4 m4 (m6 - m4 m2) / m2**5`` (mean estimation adds only odd-moment terms, zero here).
    Gaussian moments (1, 3, 15, 105) give the textbook ``sqrt(24 / n)``.
    """
    variance = ((m8 - m4**2) / m2**4 + 4 * m4**2 * (m4 - m2**2) / m2**6
                - 4 * m4 * (m6 - m4 * m2) / m2**5)
    return float(np.sqrt(variance / n))


def one_layer(keys: np.ndarray, values: np.ndarray | None = None) -> dict[str, np.ndarray]:
    return {"k_L0": keys, "v_L0": keys if values is None else values}


def test_standard_error_formula_reduces_to_gaussian_textbook_value():
    assert kurtosis_standard_error(1, 3, 15, 105, 600) == pytest.approx(np.sqrt(24 / 600))


def test_gaussian_keys_have_kurtosis_three_and_no_outliers():
    heads, tokens, dim = 2, 2048, 32
    keys = np.random.default_rng(0).standard_normal((heads, tokens, dim))
    row = kv_statistics(one_layer(keys))[0]
    n = heads * tokens * dim
    assert abs(row["kurtosis"] - 3.0) < 4 * np.sqrt(24 / n)
    # a Gaussian of median scale passes 6 stds with probability 2e-9 per value
    assert row["outlier_channels"] == 0
    assert row["outlier_ratio"] < OUTLIER_THRESHOLD
    # sample stds of equal-scale channels differ by about 1/sqrt(2T) = 0.016
    assert row["channel_std_spread"] < 1 + 6 / np.sqrt(2 * tokens)
    # the channel means are noise: E[mu^2] = 1/T against E[x^2] = 1
    assert row["offset_energy_fraction"] < 2 / tokens


def test_laplace_values_have_kurtosis_six():
    heads, tokens, dim = 4, 4096, 32
    values = np.random.default_rng(1).laplace(size=(heads, tokens, dim))
    row = kv_statistics(one_layer(values))[0]
    # Laplace(b = 1) moments E x^(2k) = (2k)!: 2, 24, 720, 40320 -> n Var = 1188
    error = kurtosis_standard_error(2, 24, 720, 40320, heads * tokens * dim)
    assert error == pytest.approx(np.sqrt(1188 / (heads * tokens * dim)))
    assert abs(row["kurtosis"] - 6.0) < 4 * error


def test_pooled_kurtosis_of_mixed_channel_scales():
    # a quarter of the channels std 2, the rest std 1, all Gaussian: pooled kurtosis
    # 3 mean(s^4) / mean(s^2)^2 = 3 (3/4 + 16/4) / (3/4 + 4/4)^2 = 3 * 4.75 / 1.75^2
    heads, tokens, dim = 2, 4096, 32
    scale = np.where(np.arange(dim) % 4 == 0, 2.0, 1.0)
    keys = np.random.default_rng(2).standard_normal((heads, tokens, dim)) * scale
    row = kv_statistics(one_layer(keys))[0]
    # moments of the mixture 3/4 N(0, 1) + 1/4 N(0, 4), E x^(2k) = (2k-1)!! E s^(2k);
    # stratified sampling (fixed channel scales) has at most the i.i.d. mixture's variance
    weights, variances = np.array([0.75, 0.25]), np.array([1.0, 4.0])
    m2, m4, m6, m8 = (double_factorial * (weights * variances**k).sum()
                      for k, double_factorial in ((1, 1), (2, 3), (3, 15), (4, 105)))
    error = kurtosis_standard_error(m2, m4, m6, m8, heads * tokens * dim)
    assert abs(row["kurtosis"] - 3 * 4.75 / 1.75**2) < 4 * error
    # each channel alone is Gaussian: SE sqrt(24/T) = 0.077, and 1.0 leaves room for the
    # largest of 64 channels
    assert abs(row["kurtosis_max_channel"] - 3.0) < 1.0
    # median std is a unit channel's, the largest std a scale-2 channel's; sample stds vary
    # by 1/sqrt(2T) relative
    assert row["channel_std_spread"] == pytest.approx(2.0, rel=6 / np.sqrt(2 * tokens))


def test_planted_outlier_channel_exact_figures():
    heads, tokens, dim = 2, 64, 16
    keys = balanced_signs(np.random.default_rng(3), heads, tokens, dim)
    keys[1, :, 5] *= 20.0
    row = kv_statistics(one_layer(keys))[0]
    channels = heads * dim
    assert row["median_channel_std"] == 1.0
    assert row["outlier_ratio"] == 20.0
    assert row["outlier_channels"] == 1
    assert row["channels"] == channels
    assert row["top_channels"][0] == {"head": 1, "channel": 5, "ratio": 20.0}
    # the remaining channels tie at ratio 1 and are listed in (head, channel) order
    assert row["top_channels"][1:] == [{"head": 0, "channel": 0, "ratio": 1.0},
                                       {"head": 0, "channel": 1, "ratio": 1.0}]
    assert len(row["top_channels"]) == TOP_CHANNELS
    assert row["channel_std_spread"] == 20.0
    # every centred value is +-1 except one channel's +-20
    expected = ((channels - 1) + 20.0**4) / channels / (((channels - 1) + 20.0**2) / channels) ** 2
    assert row["kurtosis"] == pytest.approx(expected, rel=1e-12)
    assert row["kurtosis_max_channel"] == pytest.approx(1.0, rel=1e-12)
    assert row["offset_energy_fraction"] == 0.0


def test_planted_outlier_channel_in_gaussian_noise():
    heads, tokens, dim = 4, 1024, 32
    noise = np.random.default_rng(4).standard_normal((heads, tokens, dim))
    keys = noise.copy()
    keys[2, :, 7] *= 20.0
    row = kv_statistics(one_layer(keys))[0]
    top = row["top_channels"][0]
    assert (top["head"], top["channel"]) == (2, 7)
    # ratio = 20 max|g| / median std, the median std being 1 within a single channel's
    # standard error of the std, 1/sqrt(2T), taken 4 times
    expected = 20.0 * np.abs(noise[2, :, 7]).max()
    assert top["ratio"] == pytest.approx(expected, rel=4 / np.sqrt(2 * tokens))
    assert row["outlier_ratio"] == top["ratio"]
    assert row["outlier_channels"] == 1


@pytest.mark.parametrize(("factor", "counted"), [(6.0, 0), (6.5, 1)])
def test_outlier_threshold_is_strict(factor, counted):
    keys = balanced_signs(np.random.default_rng(5), 1, 8, 8)
    keys[0, :, 3] *= factor
    row = kv_statistics(one_layer(keys))[0]
    assert OUTLIER_THRESHOLD == 6.0
    assert row["outlier_channels"] == counted
    assert row["outlier_ratio"] == factor


def test_offset_energy_fraction_of_channel_means():
    # channel means 3 on even channels, 0 on odd ones, +-1 around them: energy per channel
    # 3^2 + 1 = 10 or 1, offset energy 9 or 0, so the fraction is 9 / (10 + 1) = 9/11
    heads, tokens, dim = 2, 16, 8
    signs = balanced_signs(np.random.default_rng(6), heads, tokens, dim)
    offsets = np.where(np.arange(dim) % 2 == 0, 3.0, 0.0)
    row = kv_statistics(one_layer(signs + offsets))[0]
    assert row["offset_energy_fraction"] == pytest.approx(9 / 11, rel=1e-12)
    assert row["outlier_ratio"] == 4.0          # max |3 +- 1| over std 1
    assert row["outlier_channels"] == 0
    assert row["channel_std_spread"] == 1.0
    assert row["kurtosis"] == pytest.approx(1.0, rel=1e-12)   # centring removes the offsets


def test_constant_channel_counts_as_zero_std_and_is_left_out_of_channel_kurtosis():
    keys = balanced_signs(np.random.default_rng(7), 1, 10, 5)
    keys[0, :, 0] = 0.1       # constant: the float64 mean of ten 0.1s is not exactly 0.1
    row = kv_statistics(one_layer(keys))[0]
    assert row["median_channel_std"] == 1.0
    assert row["kurtosis_max_channel"] == pytest.approx(1.0, rel=1e-12)
    assert row["channel_std_spread"] == 1.0


def test_k_pre_rows_present_and_absent():
    rng = np.random.default_rng(8)
    pre = balanced_signs(rng, 2, 8, 4)
    pre[0, :, 1] *= 10.0
    post = balanced_signs(rng, 2, 8, 4)
    data = {"k_L0": post, "k_pre_L0": pre, "v_L0": post, "q_L0": post,
            "k_L1": post, "v_L1": post, "q_L1": post}
    rows = kv_statistics(data)
    assert [(row["layer"], row["kind"]) for row in rows] == [
        (0, "k"), (0, "k_pre"), (0, "v"), (1, "k"), (1, "v")]
    assert len({tuple(row) for row in rows}) == 1          # the same columns in every row
    by_kind = {(row["layer"], row["kind"]): row for row in rows}
    assert by_kind[0, "k_pre"]["outlier_ratio"] == 10.0
    assert by_kind[0, "k_pre"]["top_channels"][0] == {"head": 0, "channel": 1, "ratio": 10.0}
    assert by_kind[0, "k"]["outlier_ratio"] == 1.0
    assert set(KINDS) == {"k", "k_pre", "v"}


def test_float16_input_matches_its_float64_values():
    keys = np.random.default_rng(9).standard_normal((2, 32, 8)).astype(np.float16)
    half = kv_statistics(one_layer(keys))[0]
    double = kv_statistics(one_layer(keys.astype(np.float64)))[0]
    assert half == double


def test_queries_and_metadata_are_ignored():
    keys = balanced_signs(np.random.default_rng(10), 1, 4, 2)
    data = {"k_L0": keys, "v_L0": keys, "q_L0": np.zeros((3, 1, 7), dtype=np.int32),
            "model": np.array("SmolLM2"), "token_ids": np.arange(4), "k_L0_note": "text"}
    assert [row["kind"] for row in kv_statistics(data)] == ["k", "v"]


GOOD = np.ones((2, 4, 3)) * np.array([1.0, -1.0, 1.0, -1.0])[None, :, None]


@pytest.mark.parametrize(("data", "message"), [
    ({}, "no layers found"),
    ({"q_L0": GOOD, "model": np.array("x")}, "no layers found"),
    ({"k_L0": GOOD}, "missing v_L0"),
    ({"k_pre_L3": GOOD, "v_L3": GOOD}, "missing k_L3"),
    ({"k_L0": GOOD, "v_L0": GOOD[:, :, :2]}, r"shapes differ \(k_L0 \(2, 4, 3\), v_L0"),
    ({"k_L0": GOOD, "k_pre_L0": GOOD[:1], "v_L0": GOOD}, r"k_pre_L0 \(1, 4, 3\)"),
    ({"k_L0": GOOD.astype(np.int64), "v_L0": GOOD}, r"'k_L0'\] must be a float array"),
    ({"k_L0": GOOD.astype(np.complex64), "v_L0": GOOD}, "must be a float array"),
    ({"k_L0": GOOD, "v_L0": np.where(GOOD > 0, np.nan, GOOD)}, r"'v_L0'\] contains NaN or Inf"),
    ({"k_L0": GOOD, "k_pre_L0": GOOD * np.inf, "v_L0": GOOD}, "'k_pre_L0'.*NaN or Inf"),
    ({"k_L0": GOOD[:, :1], "v_L0": GOOD[:, :1]}, "1 token.*at least 2 tokens"),
    ({"k_L0": GOOD[0], "v_L0": GOOD[0]}, r"must be 3-D \(heads, tokens, dim\)"),
    ({"k_L0": GOOD[:, :, :0], "v_L0": GOOD[:, :, :0]}, "no heads or no channels"),
])
def test_validation_errors(data, message):
    with pytest.raises(ValueError, match=message):
        kv_statistics(data)


def test_data_must_be_a_mapping():
    with pytest.raises(TypeError, match="data must be a dict"):
        kv_statistics([("k_L0", GOOD)])


def test_summarize_medians_and_maxima_per_kind():
    rng = np.random.default_rng(11)
    data = {}
    for layer, factor in enumerate([3.0, 10.0, 5.0]):
        keys = balanced_signs(rng, 1, 8, 4)
        keys[0, :, 2] *= factor
        data[f"k_L{layer}"] = keys
        data[f"v_L{layer}"] = balanced_signs(rng, 1, 8, 4)
    data["k_pre_L1"] = data["v_L1"]
    summary = summarize(kv_statistics(data))
    assert list(summary) == ["k", "k_pre", "v"]
    assert summary["k"]["layers"] == 3
    assert summary["k"]["outlier_ratio"] == {"median": 5.0, "max": 10.0}
    assert summary["k"]["outlier_channels"] == {"median": 0.0, "max": 1.0}
    assert summary["k_pre"]["layers"] == 1
    assert summary["v"]["outlier_ratio"] == {"median": 1.0, "max": 1.0}
    assert set(summary["v"]) == {"layers", *SUMMARY_FIGURES}
    assert summarize([]) == {}


def test_table_renders_one_line_per_row():
    from rich.console import Console

    keys = balanced_signs(np.random.default_rng(12), 2, 8, 16)
    keys[1, :, 5] *= 20.0
    data = {"k_L0": keys, "k_pre_L0": keys, "v_L0": keys, "k_L1": keys, "v_L1": keys}
    rows = kv_statistics(data)
    console = Console(file=io.StringIO(), record=True, width=200)
    console.print(stats_table(rows, title="stats of kv.npz"))
    text = console.export_text()
    assert "stats of kv.npz" in text
    for column in STATS_COLUMNS:
        assert column in text
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines()
             if line.count("│") == len(STATS_COLUMNS) + 1]
    assert [(cell[0], cell[1]) for cell in cells] == [
        ("0", "k"), ("0", "k_pre"), ("0", "v"), ("1", "k"), ("1", "v")]
    for cell in cells:
        assert cell[2:] == ["20", "1/32", "20", cell[5], "1:5 20"]
        assert float(cell[5]) == pytest.approx((31 + 20**4) / 32 / ((31 + 20**2) / 32) ** 2,
                                               rel=1e-3)
    assert re.search(r"max\|x\| > 6 x the median channel std", text)


small_layers = st.tuples(st.integers(1, 2), st.integers(2, 6), st.integers(1, 4)).flatmap(
    lambda shape: hnp.arrays(np.int64, shape, elements=st.integers(-1000, 1000)))


@settings(max_examples=40, deadline=None)
@given(small_layers, st.randoms(use_true_random=False))
def test_figures_are_invariant_to_scale_and_token_order(integers, random):
    keys = integers / 8.0                       # exact in float64: sums of any order are exact
    order = list(range(keys.shape[1]))
    random.shuffle(order)
    base = kv_statistics(one_layer(keys))[0]
    for changed in (keys * 4.0, keys[:, order, :]):
        row = kv_statistics(one_layer(changed))[0]
        for figure in SUMMARY_FIGURES + ("channel_std_spread",):
            np.testing.assert_allclose(row[figure], base[figure], rtol=1e-9, equal_nan=True)
        assert [(t["head"], t["channel"]) for t in row["top_channels"]] == [
            (t["head"], t["channel"]) for t in base["top_channels"]]


@settings(max_examples=40, deadline=None)
@given(small_layers)
def test_figures_respect_their_bounds(integers):
    row = kv_statistics(one_layer(integers / 8.0))[0]
    ratios = [t["ratio"] for t in row["top_channels"]]
    assert len(ratios) == min(TOP_CHANNELS, row["channels"])
    np.testing.assert_equal(row["outlier_ratio"], ratios[0])
    assert all(a >= b for a, b in zip(ratios, ratios[1:]) if not np.isnan(b))
    assert 0 <= row["outlier_channels"] <= row["channels"]
    if np.isfinite(row["kurtosis"]):
        assert row["kurtosis"] >= 1 - 1e-12            # Jensen: m4 >= m2^2
    if np.isfinite(row["kurtosis_max_channel"]):
        assert row["kurtosis_max_channel"] >= 1 - 1e-12
    if np.isfinite(row["offset_energy_fraction"]):
        assert -1e-12 <= row["offset_energy_fraction"] <= 1 + 1e-12
    if np.isfinite(row["outlier_ratio"]) and np.isfinite(row["channel_std_spread"]):
        assert row["outlier_ratio"] >= row["channel_std_spread"] * (1 - 1e-12)  # max|x| >= std


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.data())
def test_planted_channel_is_found_anywhere(heads, dim, data):
    if heads * dim < 3:
        dim = 3                                # the median std is then a unit channel's
    head = data.draw(st.integers(0, heads - 1))
    channel = data.draw(st.integers(0, dim - 1))
    factor = data.draw(st.sampled_from([7.0, 12.5, 40.0]))
    keys = balanced_signs(np.random.default_rng(13), heads, 4, dim)
    keys[head, :, channel] *= factor
    row = kv_statistics(one_layer(keys))[0]
    assert row["top_channels"][0] == {"head": head, "channel": channel, "ratio": factor}
    assert row["outlier_channels"] == 1
