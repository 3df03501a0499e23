"""Observers on known distributions: the ranges they choose, and qparams that cover them."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.quant.observers import (EntropyObserver, MinMaxObserver, MovingAverageObserver, MSEObserver,
                                      PercentileObserver, make_observer)
from graphopt.quant.qparams import act_qparams, quantize_ref


def feed(obs, batches):
    for x in batches:
        obs(x)
    if obs.needs_second_pass:
        obs.phase = 1
        for x in batches:
            obs(x)
        obs.phase = 0
    return obs


def quant_mse(x: torch.Tensor, lo: float, hi: float, dtype: str) -> float:
    qp = act_qparams(lo, hi, dtype)
    q = quantize_ref(x.numpy(), qp).astype(np.float64)
    return float(np.mean((x.numpy() - (q - qp.zero_point) * qp.scale) ** 2))


def test_minmax_is_the_exact_range_over_batches():
    batches = [torch.tensor([-1.0, 2.0]), torch.tensor([0.5, 3.0]), torch.tensor([-4.0, 0.0])]
    obs = feed(MinMaxObserver("uint8"), batches)
    assert obs.clip_range() == (-4.0, 3.0)
    qp = obs.qparams()
    assert qp.scale == pytest.approx(7.0 / 255, rel=1e-6)
    assert qp.zero_point == round(4.0 / qp.scale)


def test_moving_average_follows_the_ema_formula():
    obs = MovingAverageObserver("uint8", averaging=0.5)
    feed(obs, [torch.tensor([-2.0, 2.0]), torch.tensor([0.0, 4.0]), torch.tensor([-1.0, 1.0])])
    # min: -2 -> -2 + .5(0 - -2) = -1 -> -1 + .5(-1 - -1) = -1 ; max: 2 -> 3 -> 2
    assert obs.clip_range() == pytest.approx((-1.0, 2.0))


@pytest.mark.parametrize("dtype,expected", [("uint8", 2.3263), ("int8", 2.5758)])
def test_percentile_on_a_gaussian(dtype, expected):
    torch.manual_seed(0)
    obs = feed(PercentileObserver(dtype, percentile=99.0), [torch.randn(100_000) for _ in range(4)])
    lo, hi = obs.clip_range()
    # uint8: [1%, 99%] quantiles of x (±2.326); int8: 99% quantile of |x| (2.576), symmetric
    assert hi == pytest.approx(expected, rel=0.02)
    assert lo == pytest.approx(-expected, rel=0.02)


def test_mse_clips_heavy_tails_and_beats_minmax_on_them():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((2_000_000,))
    amax = x.abs().max().item()                        # ~ ln(2e6) = 14.5
    lo, hi = feed(MSEObserver("int8"), [x]).clip_range()
    # the MSE-optimal 8-bit clip of a Laplace(b=1) is ~9.89 b (Banner et al., ACIQ)
    assert 8.5 < hi < 11.5 and lo == -hi and hi < amax - 2
    assert quant_mse(x, lo, hi, "int8") < 0.8 * quant_mse(x, -amax, amax, "int8")


def test_mse_keeps_the_full_range_of_a_uniform():
    torch.manual_seed(0)
    x = torch.rand(100_000) * 2 - 1
    lo, hi = feed(MSEObserver("uint8"), [x]).clip_range()
    assert lo < -0.95 and hi > 0.95


def test_entropy_is_not_pulled_down_by_the_zeros_of_a_relu():
    """Half of a ReLU output is exactly 0, which quantizes exactly at any threshold. As a spike in the first
    histogram bin it dominated the KL divergence, and the threshold clipped ~10% of a trained CNN's ReLU
    outputs (33% output error on this AMD host; test_quantize's entropy case failed)."""
    torch.manual_seed(0)
    x = torch.relu(torch.randn(200_000)) * torch.rand(200_000) ** 2       # a long tail, like a trained net's
    lo, hi = feed(EntropyObserver("uint8"), [x]).clip_range()
    assert lo == 0.0 and (x > hi).float().mean().item() < 0.002, hi      # was 8% before bin 0 was evened out


def test_entropy_ignores_rare_outliers():
    torch.manual_seed(0)
    x = torch.randn(200_000)
    x[:5] = 60.0
    lo, hi = feed(EntropyObserver("int8"), [x]).clip_range()
    assert 2.5 < hi < 8.0 and lo == -hi
    # the minmax range would waste almost every level on the outliers
    assert quant_mse(x[5:], lo, hi, "int8") < 0.1 * quant_mse(x[5:], -60.0, 60.0, "int8")


def test_histogram_observer_without_second_pass_falls_back_to_the_range():
    obs = PercentileObserver("uint8")
    obs(torch.tensor([-1.0, 5.0]))
    assert obs.clip_range() == (-1.0, 5.0)


def test_observer_errors():
    with pytest.raises(ValueError, match="activation dtype"):
        MinMaxObserver("int4")
    with pytest.raises(ValueError, match="unknown observer"):
        make_observer("kmeans")
    with pytest.raises(RuntimeError, match="no data"):
        MinMaxObserver().qparams()
    with pytest.raises(ValueError, match="non-finite"):
        MinMaxObserver()(torch.tensor([1.0, float("inf")]))


def test_observer_is_a_pass_through_and_ignores_integer_tensors():
    obs = MinMaxObserver()
    x = torch.randn(3)
    assert obs(x) is x
    obs(torch.arange(5))
    assert obs.batches == 1


@settings(max_examples=200, deadline=None)
@given(lo=st.floats(-1e4, 0.0, allow_nan=False), hi=st.floats(0.0, 1e4, allow_nan=False),
       dtype=st.sampled_from(["uint8", "int8"]))
def test_qparams_cover_the_range_and_represent_zero(lo, hi, dtype):
    qp = act_qparams(lo, hi, dtype)
    assert qp.qmin <= qp.zero_point <= qp.qmax
    zero = quantize_ref(np.zeros(1, np.float32), qp)[0]
    assert int(zero) == qp.zero_point                  # 0.0 is exact: zero padding == zero-point padding
    rlo, rhi = qp.range()
    if hi - lo > 1e-30:
        assert rlo <= lo + qp.scale and rhi >= hi - qp.scale
    if dtype == "int8":
        assert qp.zero_point == 0
    assert math.isfinite(qp.inv_scale)
