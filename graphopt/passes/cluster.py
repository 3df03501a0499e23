"""cluster: weight sharing (Deep Compression) for Linear layers: k shared values per layer, small indices."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from ..pipeline import Context, Pass, PassResult, register_pass
from ..quant import graph as qgraph
from ..quant.cluster import ClusteredLinear, index_bits

__all__ = ["Cluster"]


def _zstd_bytes(data: bytes) -> int | None:
    try:
        import zstandard
    except ImportError:
        return None
    return len(zstandard.ZstdCompressor(level=19).compress(data))


@register_pass("cluster")
@dataclass
class Cluster(Pass):
    """Replace every Linear by a ClusteredLinear: its weights take one of `k` float32 values, a codebook
    found by 1-D k-means over the layer's weights (linear initialisation, `iters` Lloyd iterations,
    deterministic); each weight stores its index, 4 bits for k <= 16 (two per byte), else 8 bits.

    Keeps exactly: biases, every non-Linear op, exact zeros (a pruned layer keeps an exact 0.0 entry and only
    its other weights are clustered, so prune -> cluster keeps the sparsity).
    Approximates: each weight by its nearest codebook entry; the details give each layer's weight rel. L2
    error (w_err), its codebook size, and the zstd-coded size of its indices (what
    graphopt.compressed.save stores; needs the zstandard package), against the float32 bytes.
    On LLVM CPU targets the kernels read the indices and look the codebook up inside the GEMM loop
    (graphopt.backends.tvm.weight_only). Conv2d layers are left float (noted). Layers matching a `skip`
    pattern (fnmatch on module path or node name) stay float.
    """

    exact = False
    k: int = 16
    iters: int = 30
    skip: list[str] = field(default_factory=list)

    def __post_init__(self):
        index_bits(self.k)                              # ValueError naming k unless 2 <= k <= 256
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"iters={self.iters!r}: must be an integer >= 1")

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        made: dict[int, tuple] = {}

        def make(lin):
            mod = ClusteredLinear(lin.weight, lin.bias, self.k, self.iters)
            w = lin.weight.detach().double()
            err = float((mod.dequantized_weight().double() - w).norm() / w.norm().clamp_min(1e-300))
            made[id(mod)] = (err, w.numel())
            return mod

        new, survey = qgraph.swap_linear(gm, "weight_only", skip=self.skip, make=make)
        notes = [f"kept '{p}' in float32: " + ("conv2d is not clustered" if why.startswith("conv2d") else why)
                 for p, why in survey.skipped]
        details, total_float, total_z = [], 0, 0
        for site in survey.sites:
            mod = new.get_submodule(site.path)
            err, numel = made.get(id(mod), (float("nan"), 0))
            z = _zstd_bytes(mod.indices().numpy().tobytes())
            row = {"layer": site.path, "k": mod.k, "index_bits": mod.bits, "w_err": err,
                   "float_bytes": 4 * numel, "packed_index_bytes": int(mod.index.numel())}
            if z is not None:
                row["zstd_index_bytes"] = z
                total_z += z + 4 * mod.codebook.numel()
            total_float += 4 * numel
            details.append(row)
        if not survey.sites:
            notes.append("no Linear layer found: graph unchanged")
        elif total_z:
            notes.append(f"clustered {len(survey.sites)} Linear layer(s), k={self.k}: weights {total_float:,} B "
                         f"float32 -> {total_z:,} B zstd-coded indices + codebooks "
                         f"({total_float / total_z:.1f}x)")
        return PassResult(new, changed=bool(survey.sites), notes=notes, details=details)
