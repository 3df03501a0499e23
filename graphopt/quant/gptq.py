"""GPTQ weight rounding: int8 weights on the usual per-channel grid, each rounding error compensated by the
weights of the same output channel not rounded yet, in proportion to how the layer's inputs correlate.

For a layer y = W x and calibration inputs X (rows: samples; a convolution's im2col patches, in the order of
its weight's flattened input dims), rounding to nearest minimises each weight's own error, not the error of
W X^T. GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", 2023; the Optimal Brain Quantizer of Frantar & Alistarh 2022 made fast) rounds one input column
at a time and spreads its error over the remaining columns through the inverse of H = 2 X^T X (damped by 1% of
its mean diagonal; computed in the equivalent LDL form, _gptq), 128 columns per block; columns go in
descending order of H's diagonal (the inputs with the most energy first, "act order"). The grid (scale per
output channel, [-qmax, qmax]) is the nearest rounding's, so the result is an ordinary int8 weight: the
quantized modules, their PyTorch reference and the compiled kernels do not change, only which integers they
hold.

Measured (scratch script, 2-core AVX2 EPYC; timm / transformers models with random init from
benchmarks/ecosystem_coverage.py, `fold_bn,cleanup`, then `quantize(reduce_range=true)` with 32 calibration
inputs, the quantized graphs run in PyTorch against float over 8 other inputs; mean relative L2 error of the
output, nearest -> GPTQ, and the pass's time): 7-bit weights ([-64, 64], the AVX2 / AVX-512BW pair limit)
MobileNetV3-L 0.346 -> 0.131 (mean cosine 0.934 -> 0.990; 8-bit nearest 0.109), ResNet-50 0.047 -> 0.006,
BERT-base 0.031 -> 0.019, EfficientNet-B0 0.090 -> 0.090. The pass's time, nearest / GPTQ (the same script,
twenty-ninth session, a 2-core Zen 4 EPYC): MobileNetV3-L 0.98 / 1.74 s, ResNet-50 3.1 / 16.7 s, BERT-base
9.0 / 26.7 s, where the first GPTQ version took 4.1, 33.4 and 41.2 s (it inverted H and ran the batches a
second time for X^T X; now the LDL form and the calibration's own forward passes; X^T X and the column loop
of the widest layers remain).
With 8-bit weights it did not help reliably (a float64 prototype: MobileNetV3-L 0.109 -> 0.200, EfficientNet-B0
0.118 -> 0.089), so the quantize pass applies it where weights are 7-bit (`weight_rounding`). int4 weight-only
and W4A8 weights (gptq_round_groups: asymmetric groups, quantize_groups' grid) take it when calibration data
is given: MobileNetV2 (graphopt.models, fold_bn) with pointwise_convs=true, int4 groups of 128, 8 calibration
and 4 other random images: 0.223 -> 0.165 (both modes); bench_weight_only's small encoder 0.102 -> 0.097; its
MLP's 4 calibration rows are too few (MIN_ROWS).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn as nn

__all__ = ["HessianAccumulator", "accumulators", "collecting", "gptq_round", "gptq_round_groups", "input_hessians",
           "round_static_layers", "supports", "uses_gptq"]

DAMP = 0.01          # of the mean diagonal of H, added to its diagonal
MAX_ROWS = 8192      # input rows per layer (sampled evenly over the calibration batches)
MIN_ROWS = 32        # fewer input rows say too little about how the inputs correlate: round to nearest
BLOCK = 128          # columns per lazy-update block


def supports(module: nn.Module) -> bool:
    """Whether `module` is a dense Linear or Conv2d (groups=1) whose weight GPTQ can round. Not subclasses:
    sparsify's layers keep a zero pattern that compensation would fill in."""
    return type(module) is nn.Linear or (type(module) is nn.Conv2d and module.groups == 1)


class HessianAccumulator:
    """Σ x x^T over the input rows of one layer (at most `max_rows` of them, sampled evenly over `calls`
    forward passes with a fixed seed), for gptq_round."""

    def __init__(self, module: nn.Module, calls: int, max_rows: int | None = None, seed: int = 0):
        self.module = module
        self.fan_in = module.weight[0].numel()
        self.per_call = max(1, math.ceil((max_rows or MAX_ROWS) / max(calls, 1)))
        self.sum = torch.zeros(self.fan_in, self.fan_in)
        self.rows = 0
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, rows: torch.Tensor) -> None:
        """Accumulate input rows (N, fan_in): graphopt.analysis.layer_inputs.weight_rows of a forward input."""
        rows = rows.float()
        if rows.shape[0] > self.per_call:
            rows = rows[torch.randperm(rows.shape[0], generator=self.gen)[:self.per_call]]
        self.sum.addmm_(rows.T, rows)        # in place: 3x faster than += rows.T @ rows for 64 rows of 3,072
        self.rows += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        return 2 * self.sum / max(self.rows, 1)

    def enough(self) -> bool:
        """Whether it saw MIN_ROWS input rows (fewer say too little about how the inputs correlate)."""
        return self.rows >= MIN_ROWS


def uses_gptq(weight_rounding: str, *, seven_bit: bool = False, int4: bool = False, calibrated: bool = True
              ) -> bool:
    """The quantize pass's `weight_rounding` policy, for the pass and bits=mixed alike: "gptq" always,
    "auto" for 7-bit static int8 grids and for int4 grids, when calibration data is given; "nearest" never."""
    return weight_rounding == "gptq" or (weight_rounding == "auto" and calibrated and (seven_bit or int4))


def accumulators(layers: Mapping[str, nn.Module], calls: int) -> dict[str, HessianAccumulator]:
    """{key: HessianAccumulator} for the modules among `layers` ({key: module}) that GPTQ supports, to be
    filled by `collecting` over `calls` forward passes (modules sharing one weight share one accumulator: its
    integers are the same wherever it is used)."""
    by_weight: dict[int, HessianAccumulator] = {}
    out = {}
    for k, m in layers.items():
        if supports(m):
            if m.weight.data_ptr() not in by_weight:        # one per weight: it holds fan_in² floats
                by_weight[m.weight.data_ptr()] = HessianAccumulator(m, calls)
            out[k] = by_weight[m.weight.data_ptr()]
    return out


@contextmanager
def collecting(accs: Mapping[str, HessianAccumulator]) -> Iterator[None]:
    """Within the block, every call of an accumulator's module adds its input rows to it (once per call,
    however many keys name the module)."""
    from ..analysis.layer_inputs import collecting_inputs

    by_module = {id(a.module): a for a in accs.values()}
    with collecting_inputs({i: a.module for i, a in by_module.items()}, lambda i, rows: by_module[i].add(rows)):
        yield


def input_hessians(gm: nn.Module, layers: dict, batches: Sequence[tuple]) -> dict:
    """{module: HessianAccumulator} of the modules among `layers` ({name: module}) that GPTQ supports, from
    their inputs over `batches` run through `gm` (accumulators)."""
    accs = accumulators(layers, len(batches))
    with collecting(accs), torch.no_grad():
        for batch in batches:
            gm(*batch)
    return {layers[k]: a for k, a in accs.items()}


def round_static_layers(conv, layers: list[str], batches: Sequence[tuple], qmax: int,
                        hessians: dict | None = None) -> int:
    """Round the weights of static int8 `layers` of graphopt.quant.graph.Converter `conv` by GPTQ (into
    conv.rounded, on weight_qparams' per-channel grid for [-qmax, qmax]) from each layer's inputs in the float
    graph over `batches` (or from `hessians`, {path: HessianAccumulator}, already collected); returns how
    many layers took it (dense Linear / Conv2d seen in at least MIN_ROWS input rows, however many inputs they
    have: the damping covers a rank-deficient H, and ResNet-50's classifier, 32 rows for 2,048 inputs, still
    gained)."""
    from .qparams import weight_qparams

    if hessians is None:
        float_g = conv.build([])             # observers out; the layers are the prepared graph's own modules
        mods = {p: float_g.get_submodule(p) for p in layers}
        acc = input_hessians(float_g, mods, batches)
        hessians = {p: acc[m] for p, m in mods.items() if m in acc}
    done = 0
    for path in layers:
        a = hessians.get(path)
        if a is None or not a.enough():
            continue
        w = a.module.weight
        scale = weight_qparams(w, qmax)
        conv.rounded[path] = (gptq_round(w, a.hessian(), scale, qmax), scale)
        done += 1
    return done


def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """int8 weights (shape of `weight`) in [-qmax, qmax] on the grid scale[c] per output channel (dim 0),
    rounded by GPTQ against input second moments `hessian` [fan_in, fan_in] (module docstring). With a
    diagonal hessian every column is independent and the result is round-to-nearest (quantize_weight's)."""
    w = weight.detach().reshape(weight.shape[0], -1)
    q = _gptq(w, hessian, scale.reshape(-1, 1), None, -qmax, qmax, None)
    return q.reshape(weight.shape).to(torch.int8)


def gptq_round_groups(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int16 [N, K], scales, zeros) of a weight-only weight [N, K] (graphopt.quant.weight_only: int8
    symmetric or int4 asymmetric, groups of `group_size` inputs, None: per channel), on quantize_groups' own
    grid (its scales and zero points), with the integers rounded by GPTQ against `hessian`."""
    from .weight_only import BITS, quantize_groups

    _, scales, zeros = quantize_groups(weight, bits, group_size)
    qmin, qmax = BITS[bits]
    q = _gptq(weight.detach(), hessian, scales, zeros, qmin, qmax, group_size)
    return q.to(torch.int16), scales, zeros


def _gptq(w: torch.Tensor, hessian: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, qmin: int,
          qmax: int, group_size: int | None) -> torch.Tensor:
    """The integers (float32 [N, K]) of weight w [N, K] on the grid q -> (q - zeros[n, g]) · scales[n, g],
    g = k // group_size (one group when None), q in [qmin, qmax], rounded as quantize_groups / quantize_weight
    round (float64 w / s, then + z), each error compensated GPTQ's way.

    In the LDL form of Chee et al. ("QuIP", 2023; their theorem: OPTQ's rounding is LDLQ's): with H = Ũ Ũᵀ, Ũ
    upper triangular (the Cholesky factor of H with rows and columns reversed) and F = Ũ diag(Ũ)⁻¹ - I, column
    k is rounded from w_k + Σ_{j<k} (w_j - ŵ_j) F_jk, the errors of the original weights. The same integers as
    GPTQ's update through the Cholesky factor of H⁻¹ (up to float32 rounding: 0.2% of them differed on random
    layers, at the same output error), with one Cholesky factorization and no inverse: a 3,072-input layer
    0.47 s -> 0.14 s, the whole rounding 2.5-2.7x faster (scratch timings, 2-core Zen 4 EPYC)."""
    w = w.float().clone()
    n = w.shape[1]
    gs = n if group_size is None else group_size
    group = torch.arange(n) // gs
    s64 = scales.double()
    z64 = torch.zeros_like(s64) if zeros is None else zeros.double()
    h = hessian.float().clone()
    dead = torch.diag(h) == 0                     # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diag(h), descending=True, stable=True)
    w, h, group = w[:, order], h[order][:, order], group[order]
    h += DAMP * torch.mean(torch.diag(h)) * torch.eye(n, dtype=h.dtype)
    upper = torch.linalg.cholesky(h.flip(0, 1)).flip(0, 1)          # H = Ũ Ũᵀ
    feedback = upper / torch.diagonal(upper)[None, :]                  # I + F: unit upper triangular
    wt = w.T.contiguous()                       # [K, N]: input column k of w is the contiguous row wt[k]
    fed = torch.zeros_like(wt)                  # Σ over earlier blocks of (w_j - ŵ_j) F_jk
    q = torch.empty(n, w.shape[0], dtype=torch.float64)
    # row views made once (indexing a tensor costs microseconds: it was a third of the loop's time)
    w_rows, q_rows, groups = wt.unbind(0), q.unbind(0), group.tolist()
    s_rows, z_rows = s64.T.contiguous().unbind(0), z64.T.contiguous().unbind(0)
    for a in range(0, n, BLOCK):
        b = min(a + BLOCK, n)
        cur, err, fb = wt[a:b] + fed[a:b], torch.empty(b - a, wt.shape[1]), feedback[a:b, a:b]
        cur_rows, err_rows = cur.unbind(0), err.unbind(0)
        for j in range(b - a):
            s_g, z_g, qj = s_rows[groups[a + j]], z_rows[groups[a + j]], q_rows[a + j]
            torch.div(cur_rows[j], s_g, out=qj).round_().add_(z_g).clamp_(qmin, qmax)
            torch.sub(w_rows[a + j], (qj - z_g).mul_(s_g), out=err_rows[j])
            if j + 1 < b - a:
                cur[j + 1:].addr_(fb[j, j + 1:], err_rows[j])
        if b < n:
            fed[b:].addmm_(feedback[a:b, b:].T, err)
    out = torch.empty_like(q)
    out[order] = q
    return out.T.float()
