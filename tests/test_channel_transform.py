"""The shared per-channel pre-transform and outlier-channel selection."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from latkv.channel_transform import (ChannelTransform, complement_channels,
                                     select_outlier_channels)


@given(center=st.booleans(), scale=st.booleans(), local=st.booleans(),
       tokens=st.integers(1, 40), stats_tokens=st.integers(1, 16), seed=st.integers(0, 999))
def test_apply_then_invert_is_the_identity(center, scale, local, tokens, stats_tokens, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((2, tokens, 12)) * rng.uniform(0.1, 9, 12)
         + rng.normal(0, 10, 12)).astype(np.float32)
    transform = ChannelTransform(12, center, scale, stats_tokens, local)
    stats = transform.fit(x)
    assert {k: (v.shape, str(v.dtype)) for k, v in stats.items()} == {
        k: (shape, dtype) for k, (shape, dtype) in transform.layout(x.shape).items()}
    y = transform.apply(x, stats)
    np.testing.assert_allclose(transform.invert(y, stats), x, rtol=1e-5, atol=1e-4)
    if center and not local and tokens >= stats_tokens:
        # the prefill is centred up to the float16 rounding of the stored mean
        prefill_mean = y[:, :stats_tokens].mean(axis=1)
        scale_ = stats["channel_scale"].astype(np.float32) if scale else 1
        assert np.all(np.abs(prefill_mean) * scale_ <= 1e-3 * (np.abs(x).max() + 1))


def test_constant_channel_keeps_scale_one_and_fp16_overflow_is_refused():
    x = np.ones((4, 3), np.float32)
    stats = ChannelTransform(3, center=True, channel_scale=True, stats_tokens=4).fit(x)
    assert stats["channel_scale"].tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="float16 range"):
        ChannelTransform(3, center=True).fit(np.full((2, 3), 1e5, np.float32))


def test_outlier_selection_and_complement():
    y = np.zeros((2, 5, 6), np.float32)
    y[0, :, 4] = 3
    y[0, :, 1] = 2
    y[1, :2, 0] = 5   # inside the prefill
    y[1, 2:, 5] = 50  # after it: ignored
    y[1, :2, 3] = 1
    index = select_outlier_channels(y, 2, tokens=2)
    assert index.tolist() == [[1, 4], [0, 3]]
    assert complement_channels(index, 6).tolist() == [[0, 2, 3, 5], [1, 2, 4, 5]]
