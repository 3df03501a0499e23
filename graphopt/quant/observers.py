"""Activation observers: record what flows through a tensor during calibration, then choose its qparams.

An observer is an ``nn.Module`` inserted into the FX graph as a pass-through ``call_module`` node (so the
prepared graph can be inspected and run by the user). Kinds:

  minmax          the full range seen: [min over batches, max over batches]
  moving_average  exponential moving average of each batch's min and max (weight `averaging` per batch)
  percentile      clip to the `percentile`-th percentile (of |x| for symmetric int8; of x at both ends, i.e.
                  [100-p, p], for asymmetric uint8)
  mse             the clipping range (a common shrink factor of the observed range) minimising the expected
                  squared quantization error (clipping + rounding) under the observed histogram
  entropy         the symmetric threshold minimising KL(P || Q) between the |x| histogram and its quantized
                  version (the TensorRT calibration rule)

Histogram observers need two passes over the calibration data: the first finds the range, the second
fills a fixed 2048-bin histogram over it (exact counts, no re-binning). `needs_second_pass` says so; the
calibration loop in graphopt.quant.prepare runs the passes.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .qparams import ACT_DTYPES, QParams, act_qparams

__all__ = ["Observer", "MinMaxObserver", "MovingAverageObserver", "PercentileObserver", "MSEObserver",
           "EntropyObserver", "make_observer", "OBSERVERS"]

BINS = 2048


class Observer(nn.Module):
    """Base class: a pass-through module that records statistics of its input while `enabled`."""

    needs_second_pass = False
    kind = "base"

    def __init__(self, dtype: str = "uint8"):
        super().__init__()
        if dtype not in ACT_DTYPES:
            raise ValueError(f"activation dtype must be one of {sorted(ACT_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self.enabled = True
        self.phase = 0                       # 0: range pass; 1: histogram pass (two-pass observers)
        self.batches = 0
        self.min_val = math.inf
        self.max_val = -math.inf

    @property
    def symmetric(self) -> bool:
        return ACT_DTYPES[self.dtype][2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled and isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel():
            self.observe(x.detach().float())
        return x

    def observe(self, x: torch.Tensor) -> None:
        if self.phase == 0:
            self.batches += 1
            lo, hi = torch.aminmax(x)
            lo, hi = lo.item(), hi.item()
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"observer saw a non-finite value (range [{lo}, {hi}])")
            self.update_range(lo, hi)
        else:
            self.observe_histogram(x)

    def update_range(self, lo: float, hi: float) -> None:
        self.min_val = min(self.min_val, lo)
        self.max_val = max(self.max_val, hi)

    def observe_histogram(self, x: torch.Tensor) -> None:  # pragma: no cover - only two-pass observers
        pass

    def calibrated(self) -> bool:
        return self.batches > 0

    def clip_range(self) -> tuple[float, float]:
        """The float range to quantize (before widening to include 0)."""
        return self.min_val, self.max_val

    def qparams(self) -> QParams:
        if not self.calibrated():
            raise RuntimeError("observer has seen no data")
        lo, hi = self.clip_range()
        return act_qparams(lo, hi, self.dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, dtype={self.dtype}, batches={self.batches}, " \
               f"range=[{self.min_val:.4g}, {self.max_val:.4g}]"


class MinMaxObserver(Observer):
    kind = "minmax"


class MovingAverageObserver(Observer):
    kind = "moving_average"

    def __init__(self, dtype: str = "uint8", averaging: float = 0.1):
        super().__init__(dtype)
        if not 0.0 < averaging <= 1.0:
            raise ValueError(f"averaging must be in (0, 1], got {averaging}")
        self.averaging = averaging

    def update_range(self, lo: float, hi: float) -> None:
        if self.batches == 1:
            self.min_val, self.max_val = lo, hi
        else:
            c = self.averaging
            self.min_val += c * (lo - self.min_val)
            self.max_val += c * (hi - self.max_val)


class _HistogramObserver(Observer):
    """Two passes: range (phase 0), then a fixed histogram over that range (phase 1).

    abs_hist: histogram of |x| over [0, max|x|] (symmetric rules) instead of x over [min(lo,0), max(hi,0)].
    """

    needs_second_pass = True
    abs_hist = False

    def __init__(self, dtype: str = "uint8"):
        super().__init__(dtype)
        self.hist: np.ndarray | None = None

    def _use_abs(self) -> bool:
        return self.abs_hist or self.symmetric

    def hist_range(self) -> tuple[float, float]:
        lo, hi = min(self.min_val, 0.0), max(self.max_val, 0.0)
        if self._use_abs():
            return 0.0, max(-lo, hi)
        return lo, hi

    def observe_histogram(self, x: torch.Tensor) -> None:
        lo, hi = self.hist_range()
        if hi <= lo:
            return
        v = x.abs() if self._use_abs() else x
        h = torch.histc(v.double().clamp(lo, hi), bins=BINS, min=lo, max=hi).numpy()
        self.hist = h if self.hist is None else self.hist + h

    def _centers(self) -> np.ndarray:
        lo, hi = self.hist_range()
        width = (hi - lo) / BINS
        return lo + (np.arange(BINS) + 0.5) * width

    def clip_range(self) -> tuple[float, float]:
        if self.hist is None or self.hist.sum() == 0:      # constant tensor or no second pass
            return self.min_val, self.max_val
        return self.histogram_range()

    def histogram_range(self) -> tuple[float, float]:  # pragma: no cover - interface
        raise NotImplementedError


class PercentileObserver(_HistogramObserver):
    kind = "percentile"

    def __init__(self, dtype: str = "uint8", percentile: float = 99.99):
        super().__init__(dtype)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def _quantile(self, q: float) -> float:
        lo, hi = self.hist_range()
        cdf = np.cumsum(self.hist) / self.hist.sum()
        i = int(np.searchsorted(cdf, q))
        i = min(i, BINS - 1)
        prev = cdf[i - 1] if i > 0 else 0.0
        frac = (q - prev) / max(cdf[i] - prev, 1e-300)
        width = (hi - lo) / BINS
        return lo + (i + min(max(frac, 0.0), 1.0)) * width

    def histogram_range(self) -> tuple[float, float]:
        p = self.percentile / 100.0
        if self._use_abs():
            t = self._quantile(p)
            return max(self.min_val, -t), min(self.max_val, t)
        return self._quantile(1.0 - p), self._quantile(p)


class MSEObserver(_HistogramObserver):
    kind = "mse"
    steps = 100

    def histogram_range(self) -> tuple[float, float]:
        c, n = self._centers(), self.hist
        if self._use_abs():                      # |x| histogram, symmetric int8: error of |x| = error of x
            _, amax = self.hist_range()
            lo, hi = -amax, amax
        else:
            lo, hi = min(self.min_val, 0.0), max(self.max_val, 0.0)
        best, best_err = (lo, hi), math.inf
        for a in np.linspace(1.0 / self.steps, 1.0, self.steps):
            qp = act_qparams(lo * a, hi * a, self.dtype)
            q = np.clip(np.round(c / qp.scale) + qp.zero_point, qp.qmin, qp.qmax)
            err = float(np.sum(n * (c - (q - qp.zero_point) * qp.scale) ** 2))
            if err < best_err:
                best, best_err = (lo * a, hi * a), err
        return max(self.min_val, best[0]), min(self.max_val, best[1])


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """Move `eps` of mass onto the zero entries of a distribution (so KL against it is finite)."""
    zero = p == 0
    n_zero, n_nonzero = int(zero.sum()), int(p.size - zero.sum())
    if n_nonzero == 0:
        return None
    eps1 = eps * n_zero / n_nonzero
    if eps1 >= 1.0:
        return None
    out = p.astype(np.float64).copy()
    out[zero] = eps
    out[~zero] -= eps1
    return np.maximum(out, eps * 1e-3)      # tiny entries could dip below 0 after the subtraction


class EntropyObserver(_HistogramObserver):
    """KL-divergence threshold on the |x| histogram (TensorRT's rule); always symmetric around 0."""

    kind = "entropy"
    abs_hist = True
    stride = 8

    def histogram_range(self) -> tuple[float, float]:
        hist = self.hist.astype(np.float64)
        # Exact zeros (half of a ReLU output) quantize exactly at any threshold, yet as a spike in bin 0 they
        # dominate the KL divergence, which then favours thresholds that clip many values (seen: 10% of a
        # ReLU output clipped, 33% output error). Bin 0 is counted like its neighbour (as NVIDIA's
        # pytorch-quantization entropy calibrator does).
        if BINS > 1:
            hist[0] = hist[1]
        # quantization levels on the positive side: 255 for uint8 on a non-negative tensor, else 127
        levels = 255 if (self.dtype == "uint8" and self.min_val >= 0) else 127
        _, amax = self.hist_range()
        width = amax / BINS
        best_i, best_kl = BINS, math.inf
        for i in list(range(levels, BINS, self.stride)) + [BINS]:
            sliced = hist[:i]
            p = sliced.copy()
            p[-1] += hist[i:].sum()                         # outliers clipped into the last bin
            nonzero = p != 0
            group = np.minimum(np.arange(i) * levels // i, levels - 1)
            mass = np.bincount(group, weights=sliced, minlength=levels)
            count = np.bincount(group, weights=nonzero.astype(np.float64), minlength=levels)
            q = np.where(nonzero, mass[group] / np.maximum(count[group], 1.0), 0.0)
            if p.sum() == 0 or q.sum() == 0:
                continue
            ps, qs = _smooth(p / p.sum()), _smooth(q / q.sum())
            if ps is None or qs is None:
                continue
            kl = float(np.sum(ps * np.log(ps / qs)))
            if kl < best_kl:
                best_kl, best_i = kl, i
        t = best_i * width
        return max(self.min_val, -t), min(self.max_val, t)


OBSERVERS = {"minmax": MinMaxObserver, "moving_average": MovingAverageObserver,
             "percentile": PercentileObserver, "mse": MSEObserver, "entropy": EntropyObserver}


def make_observer(kind: str, dtype: str = "uint8", *, percentile: float = 99.99,
                  averaging: float = 0.1) -> Observer:
    if kind not in OBSERVERS:
        raise ValueError(f"unknown observer {kind!r}; choose one of {', '.join(OBSERVERS)}")
    if kind == "percentile":
        return PercentileObserver(dtype, percentile)
    if kind == "moving_average":
        return MovingAverageObserver(dtype, averaging)
    return OBSERVERS[kind](dtype)
