"""lowrank: factorize Linear / Conv2d weights by truncated (optionally activation-aware) SVD."""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import fx, nn

from ..analysis.flops import count_flops, count_params
from ..analysis.layer_inputs import run_collecting_inputs
from ..analysis.shapes import node_shape, propagate_shapes
from ..errors import PassError, PipelineError
from ..pipeline import Context, Pass, PassResult, register_pass

__all__ = ["LowRank", "Factorized", "energy_rank", "round_rank", "factorize"]

# Relative damping added to a calibration covariance C before it is used for whitening:
# C + _DAMP * mean(diag C) * I. It keeps directions the calibration data never visits (dead ReLU inputs)
# from being dropped outright, at a negligible cost in calibration-set error.
_DAMP = 1e-2

SPLIT_LINEAR = "linear"          # Linear(in->r, no bias) -> Linear(r->out)
SPLIT_SPATIAL_FIRST = "kxk-1x1"  # Conv kxk (in->r, stride/padding of the layer) -> Conv 1x1 (r->out)
SPLIT_CHANNEL_FIRST = "1x1-kxk"  # Conv 1x1 (in->r) -> Conv kxk (r->out, stride/padding of the layer)


# ------------------------------------------------------------------------------------------ linear algebra
def energy_rank(s2: torch.Tensor, energy: float) -> int:
    """Smallest r whose r largest squared singular values hold at least `energy` of their sum.

    `s2` are the squared singular values in descending order. energy >= 1 gives the full length (no
    truncation at all, not the numerical rank); an all-zero spectrum gives 1.
    """
    full = int(s2.numel())
    if full == 0 or energy >= 1.0:
        return full
    total = float(s2.sum())
    if total <= 0.0:
        return 1
    cum = torch.cumsum(s2.double(), 0) / total
    r = int(torch.searchsorted(cum, torch.tensor([energy - 1e-12], dtype=cum.dtype)).item()) + 1
    return max(1, min(r, full))


def round_rank(r: int, multiple: int, full: int) -> int:
    """r rounded up to a multiple of `multiple`, never above `full` (the untruncated rank)."""
    if multiple > 1:
        r = int(math.ceil(r / multiple)) * multiple
    return max(1, min(r, full))


class Factorizer:
    """Spectrum and rank-r factors of a matrix M (m x n), plain or weighted by an input covariance C.

    Plain: the truncated SVD, M_r = U_r U_rᵀ M (best rank r in Frobenius norm).
    Weighted (C = XᵀX of the inputs the matrix is applied to, X Mᵀ being the output): the truncated SVD
    of M·L with L Lᵀ = C + λI, λ = 1e-2·mean(diag C), i.e. the rank-r M_r that minimizes the output error
    ‖X (M − M_r)ᵀ‖_F on the data (plus λ‖M − M_r‖²_F): "whitened" / activation-aware SVD. It is computed
    in the equivalent projection form M_r = U_r U_rᵀ M, U_r the top-r left singular vectors of M·L (from
    the Gram M (C+λI) Mᵀ, or from QR of M·L·V_r when n < m), so L is never inverted.
    Factors are returned as (A, B), M_r = A @ B, balanced so both carry √σ per component.
    `s2` are the squared singular values (of M, or of M·L), descending.
    """

    def __init__(self, m: torch.Tensor, cov: "torch.Tensor | InputStats | None" = None):
        self.m = m
        stats = InputStats.of(cov) if isinstance(cov, torch.Tensor) else cov
        self.weighted = stats is not None
        self._chol = None
        rows, cols = m.shape
        if rows <= cols:                           # left singular vectors from the rows x rows Gram
            g = m @ m.T
            if stats is not None:
                g = stats.quad(m) + stats.damping() * g
            self._side = "left"
        else:                                      # right singular vectors from the cols x cols Gram
            if stats is None:
                g = m.T @ m
            else:
                damped = stats.dense()
                damped.diagonal().add_(stats.damping())
                self._chol = torch.linalg.cholesky(damped)
                k = m @ self._chol
                g = k.T @ k
            self._side = "right"
        g = (g + g.T) * 0.5
        evals, evecs = torch.linalg.eigh(g)        # ascending
        self.s2 = evals.flip(0).clamp_min(0.0)
        self._vecs = evecs.flip(1)

    @property
    def full_rank(self) -> int:
        return int(self.s2.numel())

    def factors(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        v = self._vecs[:, :r]
        if self._side == "left":
            a, b = v, v.T @ self.m                 # M_r = U_r U_rᵀ M
        elif self._chol is None:
            a, b = self.m @ v, v.T                 # M_r = M V_r V_rᵀ (same as U_r U_rᵀ M)
        else:
            u, _ = torch.linalg.qr((self.m @ self._chol) @ v)   # U_r of M·L
            a, b = u, u.T @ self.m
        return _balance(a, b)


class InputStats:
    """C = XᵀX of the rows X a layer multiplies by its weight (float64 when used).

    Kept as the rows themselves while there are no more rows than columns (exact, and far cheaper for deep
    conv layers whose im2col width exceeds the calibration positions), as the d x d matrix C otherwise.
    """

    def __init__(self, dim: int):
        self.dim, self.count = dim, 0
        self._rows: list[torch.Tensor] = []
        self._cov: torch.Tensor | None = None
        self._x: torch.Tensor | None = None

    @classmethod
    def of(cls, cov: torch.Tensor) -> "InputStats":
        out = cls(cov.shape[0])
        out._cov, out.count = cov.double(), -1
        return out

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.float()
        self.count += rows.shape[0]
        if self._cov is None and self.count <= self.dim:
            self._rows.append(rows)
            return
        if self._cov is None:                      # too many rows: switch to C (accumulated in float32)
            self._cov = torch.zeros(self.dim, self.dim, dtype=torch.float32, device=rows.device)
            for r in self._rows:
                self._cov.addmm_(r.T, r)
            self._rows = []
        self._cov.addmm_(rows.T, rows)

    def finish(self) -> "InputStats":
        if self._rows:
            self._x = torch.cat(self._rows).double()
            self._rows = []
        if self._cov is not None:
            self._cov = self._cov.double()
        return self

    def trace(self) -> float:
        return float((self._x ** 2).sum()) if self._x is not None else \
            float(torch.diagonal(self._cov).sum()) if self._cov is not None else 0.0

    def damping(self) -> float:
        """λ = _DAMP · mean(diag C) (1.0 for an all-zero C)."""
        lam = _DAMP * self.trace() / max(self.dim, 1)
        return lam if lam > 0.0 else 1.0

    def dense(self) -> torch.Tensor:
        """C as a new d x d tensor."""
        return self._x.T @ self._x if self._x is not None else self._cov.clone()

    def quad(self, m: torch.Tensor) -> torch.Tensor:
        """M C Mᵀ."""
        if self._x is not None:
            y = self._x @ m.T
            return y.T @ y
        return m @ self._cov @ m.T

    def trace_quad(self, e: torch.Tensor) -> float:
        """tr(E C Eᵀ) = ‖X Eᵀ‖²_F."""
        if self._x is not None:
            return float(((self._x @ e.T) ** 2).sum())
        return float(((e @ self._cov) * e).sum())

    def channels(self, cin: int, k: int) -> "InputStats":
        """Input-channel covariance (mean over the k kernel offsets) of an im2col covariance."""
        if self._x is not None:
            x = self._x.reshape(-1, cin, k)
            return InputStats.of(torch.einsum("nak,nbk->ab", x, x) / k)
        return InputStats.of(torch.einsum("ajbj->ab", self._cov.reshape(cin, k, cin, k)) / k)


def _balance(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale component i of A @ B so column i of A and row i of B have the same norm (product unchanged)."""
    na, nb = a.norm(dim=0), b.norm(dim=1)
    ok = (na > 0) & (nb > 0)
    scale = torch.where(ok, torch.sqrt(nb / torch.where(ok, na, torch.ones_like(na))), torch.ones_like(na))
    return a * scale, b / scale[:, None]


def factorize(m: torch.Tensor, r: int, cov: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors (A, B) of a matrix, M ≈ A @ B; weighted by input covariance `cov` when given."""
    return Factorizer(m.double(), None if cov is None else cov.double()).factors(r)


# ---------------------------------------------------------------------------------------- the rewrite
class Factorized(nn.Sequential):
    """The two layers a factorized Linear/Conv2d became; the graph calls `<path>.0` then `<path>.1`.

    Calling the container itself computes the same thing. `rank` and `split` say how it was made.
    """

    def __init__(self, first: nn.Module, second: nn.Module, *, rank: int, split: str, source: str):
        super().__init__(first, second)
        self.rank, self.split, self.source = rank, split, source

    def extra_repr(self) -> str:
        return f"rank={self.rank}, split={self.split!r}, source={self.source!r}"


@dataclass
class _Option:
    """One way of factorizing a layer: the split and what a rank costs."""

    split: str
    fac: Factorizer
    flops_per_rank: int       # FLOPs of the factorized pair per unit of rank, over all calls of the layer
    params_per_rank: int

    def flops(self, r: int) -> int:
        return r * self.flops_per_rank

    def params(self, r: int, bias: int) -> int:
        return r * self.params_per_rank + bias


@dataclass
class _Layer:
    path: str
    module: nn.Module
    nodes: list[fx.Node]
    kind: str
    flops_before: int
    params_before: int
    bias_params: int
    options: list[_Option] = field(default_factory=list)
    cov: InputStats | None = None       # input statistics in the Linear / im2col layout


def _plan(layer: _Layer, rank_of: Callable[[_Option], int], min_saving: float):
    """(option, rank) with the fewest FLOPs among those saving at least `min_saving` of FLOPs and params."""
    best = None
    for opt in layer.options:
        r = rank_of(opt)
        f, p = opt.flops(r), opt.params(r, layer.bias_params)
        if f <= (1.0 - min_saving) * layer.flops_before and p <= (1.0 - min_saving) * layer.params_before:
            if best is None or (f, p) < (best[0].flops(best[1]), best[0].params(best[1], layer.bias_params)):
                best = (opt, r)
    return best


def _weight_from_factors(layer: _Layer, split: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The (out, in[, kh, kw]) float64 weight that factors (A, B) of `split` compute."""
    w = layer.module.weight
    prod = a @ b
    if split == SPLIT_CHANNEL_FIRST:
        out, cin, kh, kw = w.shape
        return prod.reshape(out, kh, kw, cin).permute(0, 3, 1, 2)
    return prod.reshape(w.shape)


def _build(layer: _Layer, split: str, a: torch.Tensor, b: torch.Tensor) -> Factorized:
    mod = layer.module
    w = mod.weight
    dtype, device, grad = w.dtype, w.device, w.requires_grad
    r = a.shape[1]

    def param(t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t.to(device=device, dtype=dtype).contiguous(), requires_grad=grad)

    has_bias = mod.bias is not None
    if split == SPLIT_LINEAR:
        first = nn.Linear(mod.in_features, r, bias=False, device=device, dtype=dtype)
        second = nn.Linear(r, mod.out_features, bias=has_bias, device=device, dtype=dtype)
        first.weight, second.weight = param(b), param(a)
    elif split == SPLIT_SPATIAL_FIRST:
        first = nn.Conv2d(mod.in_channels, r, mod.kernel_size, stride=mod.stride, padding=mod.padding,
                          dilation=mod.dilation, bias=False, padding_mode=mod.padding_mode,
                          device=device, dtype=dtype)
        second = nn.Conv2d(r, mod.out_channels, 1, bias=has_bias, device=device, dtype=dtype)
        first.weight = param(b.reshape(r, *w.shape[1:]))
        second.weight = param(a.reshape(w.shape[0], r, 1, 1))
    else:  # SPLIT_CHANNEL_FIRST: a pointwise linear map without bias commutes with any padding mode
        out, cin, kh, kw = w.shape
        first = nn.Conv2d(cin, r, 1, bias=False, device=device, dtype=dtype)
        second = nn.Conv2d(r, out, mod.kernel_size, stride=mod.stride, padding=mod.padding,
                           dilation=mod.dilation, bias=has_bias, padding_mode=mod.padding_mode,
                           device=device, dtype=dtype)
        first.weight = param(b.reshape(r, cin, 1, 1))
        second.weight = param(a.reshape(out, kh, kw, r).permute(0, 3, 1, 2))
    if has_bias:
        second.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=mod.bias.requires_grad)
    first.train(mod.training)
    second.train(mod.training)
    return Factorized(first, second, rank=r, split=split, source=layer.path)


# ------------------------------------------------------------------------------------- finding layers
def _plain_forward(mod: nn.Module) -> str:
    """Kind of a Linear/Conv2d module whose forward is the stock one, else ''."""
    cls = type(mod)
    if isinstance(mod, nn.Linear) and cls.forward is nn.Linear.forward:
        return "Linear"
    if isinstance(mod, nn.Conv2d) and cls.forward is nn.Conv2d.forward and \
            cls._conv_forward is nn.Conv2d._conv_forward:
        return "Conv2d"
    return ""


_QUANT_DTYPES = {torch.int8, torch.uint8, torch.qint8, torch.quint8, torch.qint32}
for _name in ("int4", "uint4", "float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _QUANT_DTYPES.add(getattr(torch, _name))


def _quantized_tensor(t: torch.Tensor) -> bool:
    return t.is_quantized or t.dtype in _QUANT_DTYPES


def _quantization_evidence(gm: fx.GraphModule) -> str:
    """'' when the graph shows no sign of quantization, else what gives it away."""
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            name = getattr(node.target, "__name__", str(node.target))
            if "quantize" in name.lower():
                return f"node '{node.name}' calls {name}"
        elif node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            cls = type(mod)
            where = f"{cls.__module__}.{cls.__name__}"
            if "quant" in where.lower():
                return f"node '{node.name}' calls {where} ('{node.target}')"
            for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
                if _quantized_tensor(t):
                    return f"module '{node.target}' holds a {str(t.dtype).replace('torch.', '')} " \
                           f"tensor '{name}'"
        elif node.op == "get_attr":
            try:
                t = _get_attr(gm, str(node.target))
            except AttributeError:
                continue
            if isinstance(t, torch.Tensor) and _quantized_tensor(t):
                return f"node '{node.name}' reads a {str(t.dtype).replace('torch.', '')} tensor " \
                       f"'{node.target}'"
    return ""


def _get_attr(gm: nn.Module, path: str):
    obj = gm
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set_submodule(gm: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    setattr(parent, name, module)


def _numel(shape) -> int:
    return int(math.prod(shape)) if shape is not None else 0


# ------------------------------------------------------------------------------------- calibration
def _collect_covariances(gm: fx.GraphModule, layers: list[_Layer], batches: list[tuple]) -> None:
    """Run the graph on the calibration batches and store each layer's input statistics (XᵀX)."""
    for layer in layers:
        layer.cov = InputStats(layer.module.weight[0].numel())
    run_collecting_inputs(gm, dict(enumerate(l.module for l in layers)), batches,
                          lambda i, rows: layers[i].cov.add(rows))
    for layer in layers:
        layer.cov.finish()


def _rel_output_error(cov: InputStats, w: torch.Tensor, w_r: torch.Tensor) -> float:
    """‖X (W − W_r)ᵀ‖_F / ‖X Wᵀ‖_F on the calibration rows (im2col layout for convs)."""
    m = w.reshape(w.shape[0], -1)
    num = cov.trace_quad(m - w_r.reshape(w.shape[0], -1))
    den = cov.trace_quad(m)
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


def _rel_weight_error(w: torch.Tensor, w_r: torch.Tensor) -> float:
    den = float(w.norm())
    return float((w - w_r).norm()) / den if den > 0 else 0.0


# ------------------------------------------------------------------------------------------ the pass
@register_pass("lowrank")
@dataclass
class LowRank(Pass):
    """Replace Linear / Conv2d layers by two thinner layers of rank r where that cuts FLOPs and params.

    Changes: a Linear(in→out) becomes Linear(in→r, no bias) → Linear(r→out, bias kept); a Conv2d with
    kernel k×k becomes either a k×k conv (in→r, the layer's stride/padding/dilation) → 1×1 conv (r→out),
    or a 1×1 conv (in→r) → k×k conv (r→out), whichever costs fewer FLOPs at its rank. The two layers live
    in a `Factorized` container at the old module path (`<path>.0`, `<path>.1`); the old module is
    dropped, never modified. Grouped/depthwise convs, other layer types and subclasses with their own
    forward are left alone, and so is a layer whose FLOPs or params would fall by less than `min_saving`.

    `split` forces one conv split (a 1×1 conv always uses kxk-1x1, where both are the same).

    Rank choice (per layer and per split), in order of precedence:
      rank=N          exactly N (capped at the full rank; not rounded)
      ratio=f         ceil(f · full rank), rounded up to a multiple of `multiple`
      flops_budget=f / params_budget=f
                      the whole graph keeps at most f of its FLOPs / params: one energy threshold shared by
                      all layers is searched, so layers with fast-decaying spectra get lower ranks
      energy=e        the smallest r keeping e of the squared singular values, rounded up to `multiple`

    Data-aware (`data_aware=true`, needs calibration data): each layer's input covariance C = XᵀX is
    collected on the calibration batches (im2col rows for convs) and the factorization is the truncated
    SVD of W·L, L Lᵀ = C + 1e-2·mean(diag C)·I: the rank-r weight with the least output error on that data.
    `energy` then counts output energy. For the 1×1→k×k conv split the weighting uses the channel
    covariance (positions treated as independent), an approximation; the reported errors are exact.

    Keeps exactly: every other node and module, each layer's bias (moved to the second layer), its stride,
    padding (mode included) and dilation, and every call site of a module called more than once (one pair
    serves them all; FLOPs count every call).

    Approximates: outputs change by the dropped singular directions. Each replaced layer's row in the
    report gives its rank, FLOPs/params before and after, and relative errors: `weight_error`
    ‖W−W_r‖/‖W‖ always; with data-aware mode also `output_error` ‖X(W−W_r)ᵀ‖/‖XWᵀ‖ on the calibration
    data and `plain_output_error`, what plain SVD at the same rank gives. Exact (to float rounding) only
    when nothing is truncated: energy=1 or ratio=1 with no rank/budget; then replaced layers compute the
    same function (set min_saving < 0 to force replacement).

    Order: run it on float weights, before quantize (on an already quantized graph it stops with a
    PassError that says so); prune may come before or after (after, it prunes the rank dimension too);
    run before fold_bn, a BN after a conv still folds, into `<path>.1`.
    """

    exact = False

    energy: float = 0.95
    rank: int | None = None
    ratio: float | None = None
    flops_budget: float | None = None
    params_budget: float | None = None
    multiple: int = 8
    min_saving: float = 0.2
    data_aware: bool = False
    split: Literal["auto", "kxk-1x1", "1x1-kxk"] = "auto"
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not (0.0 < self.energy <= 1.0):
            raise PipelineError(f"lowrank: energy must be in (0, 1], got {self.energy}")
        if self.rank is not None and self.rank < 1:
            raise PipelineError(f"lowrank: rank must be >= 1, got {self.rank}")
        if self.ratio is not None and not (0.0 < self.ratio <= 1.0):
            raise PipelineError(f"lowrank: ratio must be in (0, 1], got {self.ratio}")
        for name in ("flops_budget", "params_budget"):
            v = getattr(self, name)
            if v is not None and not (0.0 < v <= 1.0):
                raise PipelineError(f"lowrank: {name} must be in (0, 1] (fraction of the graph's total "
                                    f"to keep), got {v}")
        given = [n for n in ("rank", "ratio") if getattr(self, n) is not None]
        if self.flops_budget is not None or self.params_budget is not None:
            given.append("flops_budget/params_budget")
        if len(given) > 1:
            raise PipelineError(f"lowrank: give at most one of rank, ratio, flops_budget/params_budget "
                                f"(got {', '.join(given)})")
        if self.split not in ("auto", SPLIT_SPATIAL_FIRST, SPLIT_CHANNEL_FIRST):
            raise PipelineError(f"lowrank: split must be auto, {SPLIT_SPATIAL_FIRST} or {SPLIT_CHANNEL_FIRST}, "
                                f"got {self.split!r}")
        if self.multiple < 1:
            raise PipelineError(f"lowrank: multiple must be >= 1, got {self.multiple}")
        if not self.min_saving < 1.0:
            raise PipelineError(f"lowrank: min_saving must be < 1, got {self.min_saving}")
        self.include, self.exclude = list(self.include or []), list(self.exclude or [])

    def is_exact(self) -> bool:
        if self.rank is not None or self.flops_budget is not None or self.params_budget is not None:
            return False
        if self.ratio is not None:
            return self.ratio >= 1.0
        return self.energy >= 1.0

    # ---------------------------------------------------------------------------------- rank choice
    def _rank_fn(self, energy: float | None = None) -> Callable[[_Option], int]:
        def rank_of(opt: _Option) -> int:
            full = opt.fac.full_rank
            if self.rank is not None:
                return min(self.rank, full)
            if self.ratio is not None:
                return round_rank(int(math.ceil(self.ratio * full - 1e-9)), self.multiple, full)
            e = self.energy if energy is None else energy
            return round_rank(energy_rank(opt.fac.s2, e), self.multiple, full)
        return rank_of

    def _budget_threshold(self, layers: list[_Layer], total_flops: int, total_params: int) -> float:
        """The largest shared energy threshold whose plan meets the FLOPs/params budget."""

        def totals(e: float) -> tuple[int, int]:
            fl, pa = total_flops, total_params
            rank_of = self._rank_fn(e)
            for layer in layers:
                plan = _plan(layer, rank_of, self.min_saving)
                if plan is not None:
                    opt, r = plan
                    fl += opt.flops(r) - layer.flops_before
                    pa += opt.params(r, layer.bias_params) - layer.params_before
            return fl, pa

        def fits(e: float) -> bool:
            fl, pa = totals(e)
            return (self.flops_budget is None or fl <= self.flops_budget * total_flops) and \
                   (self.params_budget is None or pa <= self.params_budget * total_params)

        if fits(1.0):
            return 1.0
        if not fits(0.0):
            fl, pa = totals(0.0)
            raise PassError(
                self.name, f"budget flops_budget={self.flops_budget}, params_budget={self.params_budget} "
                f"cannot be met: factorizing every eligible layer to the lowest rank still leaves "
                f"{fl / max(total_flops, 1):.3f} of the FLOPs and {pa / max(total_params, 1):.3f} of the "
                f"params ({len(layers)} eligible layers, min_saving={self.min_saving})")
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    # --------------------------------------------------------------------------------------- run
    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        evidence = _quantization_evidence(gm)
        if evidence:
            raise PassError(
                self.name, f"the graph is already quantized ({evidence}). Low-rank factorization needs the "
                f"float weights (SVD of quantized weights would drop the quantization and compound its "
                f"error): run lowrank before quantize, e.g. 'fold_bn,lowrank(energy=0.9),quantize'")
        batches = ctx.calibration_batches(needed_by="lowrank(data_aware=true)") if self.data_aware else None
        if any(n.op == "call_module" and "tensor_meta" not in n.meta for n in gm.graph.nodes):
            with torch.no_grad():      # the pass manager has done this already; direct callers may not
                propagate_shapes(gm, ctx.example_inputs)

        notes: list[str] = []
        layers = self._find_layers(gm, notes)
        if not layers:
            functional = [n.name for n in gm.graph.nodes if n.op == "call_function" and any(
                k in getattr(n.target, "__name__", str(n.target)) for k in ("linear", "conv"))]
            notes.append("no eligible Linear/Conv2d module calls in the graph" + (
                f"; left {len(functional)} functional linear/conv call(s) ({', '.join(functional[:3])}"
                f"{', ...' if len(functional) > 3 else ''}): lowrank rewrites module calls only, and an "
                f"aten-level graph (torch.export capture) has none" if functional else ""))
            return PassResult(gm, changed=False, notes=notes)

        if batches is not None:
            _collect_covariances(gm, layers, batches)
            thin = [f"{layer.path} ({layer.cov.count} rows, {layer.cov.dim} wide)" for layer in layers
                    if 0 < layer.cov.count < layer.cov.dim]
            if thin:
                notes.append(f"calibration gives fewer input rows than the input width for {len(thin)} layer(s): "
                             f"{', '.join(thin[:3])}{', ...' if len(thin) > 3 else ''}; their covariance is "
                             f"rank-deficient, so data-aware ranks fit the calibration data and may "
                             f"generalize worse: use more calibration batches")
        with torch.no_grad():
            for layer in layers:
                self._add_options(layer, notes)
        layers = [layer for layer in layers if layer.options]

        energy = None
        if self.flops_budget is not None or self.params_budget is not None:
            energy = self._budget_threshold(layers, count_flops(gm), count_params(gm))
            notes.append(f"budget met with a shared energy threshold of {energy:.4f}")
        rank_of = self._rank_fn(energy)

        details: list[dict] = []
        with torch.no_grad():
            for layer in layers:
                plan = _plan(layer, rank_of, self.min_saving)
                if plan is None:
                    notes.append(self._why_kept(layer, rank_of))
                else:
                    details.append(self._replace(gm, layer, *plan))
                layer.cov, layer.options = None, []          # free the covariances as we go

        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
        if details:
            with torch.no_grad():
                propagate_shapes(gm, ctx.example_inputs)
            fb = sum(d["flops_before"] for d in details)
            fa = sum(d["flops_after"] for d in details)
            notes.append(f"factorized {len(details)} layer(s): their FLOPs {fb:,} -> {fa:,} "
                         f"({fa / max(fb, 1) - 1:+.1%})")
        return PassResult(gm, changed=bool(details), notes=notes, details=details)

    def _find_layers(self, gm: fx.GraphModule, notes: list[str]) -> list[_Layer]:
        by_path: dict[str, _Layer] = {}
        skipped: set[str] = set()
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            path = str(node.target)
            mod = gm.get_submodule(path)
            if not isinstance(mod, (nn.Linear, nn.Conv2d)) or path in skipped:
                continue
            reason = ""
            kind = _plain_forward(mod)
            parent = path.rpartition(".")[0]
            if not kind:
                reason = f"{type(mod).__name__} overrides forward()"
            elif parent and isinstance(_get_attr(gm, parent), Factorized):
                reason = "already a factor of an earlier lowrank"
            elif self.include and not any(fnmatch.fnmatchcase(path, p) for p in self.include):
                reason = "not matched by include"
            elif any(fnmatch.fnmatchcase(path, p) for p in self.exclude):
                reason = "excluded"
            elif kind == "Conv2d" and mod.groups != 1:
                reason = f"grouped conv (groups={mod.groups})"
            elif not mod.weight.is_floating_point():
                reason = f"weight dtype {mod.weight.dtype} is not floating point"
            elif not node.args and "input" not in node.kwargs:
                reason = "called without an input argument"
            if reason:
                skipped.add(path)
                by_path.pop(path, None)
                if reason != "already a factor of an earlier lowrank":
                    notes.append(f"left '{path}': {reason}")
                continue
            x = node.args[0] if node.args else node.kwargs["input"]
            out_shape = node_shape(node)
            in_shape = node_shape(x) if isinstance(x, fx.Node) else None
            if out_shape is None or in_shape is None:
                skipped.add(path)
                by_path.pop(path, None)
                notes.append(f"left '{path}': input/output shape unknown")
                continue
            layer = by_path.get(path)
            if layer is None:
                bias = mod.bias.numel() if mod.bias is not None else 0
                layer = by_path[path] = _Layer(path, mod, [], kind, 0, mod.weight.numel() + bias, bias)
            layer.nodes.append(node)
        return list(by_path.values())

    def _add_options(self, layer: _Layer, notes: list[str]) -> None:
        mod = layer.module
        w = mod.weight.detach().double()
        cov = layer.cov
        if self.data_aware and (cov is None or cov.trace() <= 0.0):
            notes.append(f"'{layer.path}': no calibration activations reached it; plain SVD used")
            cov = layer.cov = None

        def fac(m: torch.Tensor, c: InputStats | None) -> Factorizer:
            return Factorizer(m, c)

        # per call: positions the layer's weight is applied at (output side) and at the input resolution
        outs = [node_shape(n) for n in layer.nodes]
        ins = [node_shape(n.args[0] if n.args else n.kwargs["input"]) for n in layer.nodes]
        if layer.kind == "Linear":
            out_f, in_f = w.shape
            rows = sum(_numel(s) // out_f for s in outs)
            layer.flops_before = 2 * rows * in_f * out_f
            layer.options.append(_Option(SPLIT_LINEAR, fac(w, cov), 2 * rows * (in_f + out_f), in_f + out_f))
            return
        out_c, in_c, kh, kw = w.shape
        k = kh * kw
        pos_out = sum(_numel(s) // out_c for s in outs)
        pos_in = sum(_numel(s) // in_c for s in ins)
        layer.flops_before = 2 * pos_out * out_c * in_c * k
        if k == 1 or self.split != SPLIT_CHANNEL_FIRST:
            layer.options.append(_Option(SPLIT_SPATIAL_FIRST, fac(w.reshape(out_c, in_c * k), cov),
                                         2 * pos_out * (in_c * k + out_c), in_c * k + out_c))
        if k > 1 and self.split != SPLIT_SPATIAL_FIRST:
            mb = w.permute(0, 2, 3, 1).reshape(out_c * k, in_c)
            main = fac(mb, None if cov is None else cov.channels(in_c, k))
            layer.options.append(_Option(SPLIT_CHANNEL_FIRST, main, 2 * (pos_in * in_c + pos_out * out_c * k),
                                         in_c + out_c * k))

    def _why_kept(self, layer: _Layer, rank_of: Callable[[_Option], int]) -> str:
        parts = []
        for opt in layer.options:
            r = rank_of(opt)
            fs = 1 - opt.flops(r) / max(layer.flops_before, 1)
            ps = 1 - opt.params(r, layer.bias_params) / max(layer.params_before, 1)
            parts.append(f"{opt.split} rank {r}/{opt.fac.full_rank} saves {fs:.0%} FLOPs, {ps:.0%} params")
        return f"left '{layer.path}': " + "; ".join(parts) + f" (< min_saving {self.min_saving:g})"

    def _replace(self, gm: fx.GraphModule, layer: _Layer, opt: _Option, r: int) -> dict:
        w = layer.module.weight.detach().double()
        exact = r >= opt.fac.full_rank
        # nothing truncated: the plain factorization reproduces W to rounding whatever the weighting
        fac = Factorizer(opt.fac.m) if exact and opt.fac.weighted else opt.fac
        a, b = fac.factors(r)
        w_r = _weight_from_factors(layer, opt.split, a, b)
        row = {
            "layer": layer.path, "kind": layer.kind, "split": opt.split, "shape": list(w.shape),
            "rank": r, "full_rank": opt.fac.full_rank,
            "flops_before": layer.flops_before, "flops_after": opt.flops(r),
            "saving": 1 - opt.flops(r) / max(layer.flops_before, 1),
            "params_before": layer.params_before, "params_after": opt.params(r, layer.bias_params),
            "weight_error": _rel_weight_error(w, w_r),
            "output_error": None, "plain_output_error": None,
        }
        if layer.cov is not None:
            row["output_error"] = _rel_output_error(layer.cov, w, w_r)
            plain = Factorizer(opt.fac.m) if fac is opt.fac else fac
            pa, pb = plain.factors(r)
            row["plain_output_error"] = _rel_output_error(layer.cov, w, _weight_from_factors(layer, opt.split,
                                                                                              pa, pb))
        row["rel_error"] = row["output_error"] if row["output_error"] is not None else row["weight_error"]
        row["error_of"] = "output" if row["output_error"] is not None else "weight"

        container = _build(layer, opt.split, a, b)
        _set_submodule(gm, layer.path, container)
        for node in layer.nodes:
            x = node.args[0] if node.args else node.kwargs["input"]
            with gm.graph.inserting_before(node):
                first = gm.graph.call_module(f"{layer.path}.0", (x,))
                second = gm.graph.call_module(f"{layer.path}.1", (first,))
            second.meta.update(node.meta)
            node.replace_all_uses_with(second)
            gm.graph.erase_node(node)
        return row
