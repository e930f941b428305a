"""Metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from latkv import metrics


def test_relative_mse():
    assert metrics.relative_mse(np.array([3.0, 4.0]), np.array([3.0, 3.0])) == pytest.approx(1 / 25)


def test_centred_logit_error_ignores_per_query_shifts():
    logits = np.array([[[1.0, 2.0, 3.0]]])
    assert metrics.centred_logit_error(logits, logits + 5.0) == pytest.approx(0.0)
    # error (0, 0, 3) centred is (-1, -1, 2): mean square 2; logits centred (-1, 0, 1): 2/3
    assert metrics.centred_logit_error(logits, logits + np.array([0, 0, 3.0])) == pytest.approx(
        np.sqrt(2 / (2 / 3)))


def test_causal_mask():
    mask = metrics.causal_mask(queries=2, tokens=4, group=2)
    expected = np.array([[1, 1, 1, 0], [1, 1, 1, 1]] * 2, dtype=bool)
    assert np.array_equal(mask, expected)


def test_attention_output_error_zero_for_exact_and_positive_otherwise(rng):
    logits = rng.standard_normal((2, 3, 5))
    v = rng.standard_normal((2, 5, 4))
    assert metrics.attention_output_error(logits, v, logits, v) == 0.0
    # uniform attention over two keys with values 1 and 3 -> output 2; change one value to 5
    logits = np.zeros((1, 1, 2))
    v = np.array([[[1.0], [3.0]]])
    assert metrics.attention_output_error(logits, v, logits, np.array([[[1.0], [5.0]]])) == 0.5


def test_top_k_agreement():
    logits = np.array([[[5.0, 4.0, 3.0, 2.0, 1.0]]])
    assert metrics.top_k_agreement(logits, logits, k=2) == 1.0
    swapped = np.array([[[5.0, 1.0, 3.0, 2.0, 4.0]]])  # top-2 {0, 4} vs true {0, 1}
    assert metrics.top_k_agreement(logits, swapped, k=2) == 0.5


def test_grouped_queries_rejects_bad_gqa():
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        metrics.grouped_queries(np.zeros((5, 2, 8)), 2)
