"""cluster: weight sharing (Deep Compression) for Linear layers: k shared values per layer, small indices."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx, nn

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

    Centroid fine-tuning (Deep Compression's "fine-tuning the shared weights"), when optimize() is given
    train_data and `finetune` is true: the indices are fixed and only the codebook entries train; each entry's
    gradient is the sum of the gradients of the weights that share it (the autograd of
    torch.ops.graphopt.clustered_linear). The training is the distill pass's (graphopt.passes.distill): teacher =
    the graph as this pass received it (unclustered), loss alpha·T²·KL + (1 - alpha)·CE when batches carry
    labels, `val_fraction` of the batches held out and never trained on, Adam at `lr`, learning rate halved on
    a plateau, stop after `patience` epochs without improvement of the held-out loss (or `max_epochs`, or
    exactly `epochs` when given), and the best held-out loss's codebooks restored, so the held-out loss is
    never higher than k-means' own. Everything else (other layers, biases, indices) stays exactly as it was.
    Codebook entries equal to 0.0 (a pruned layer's zeros, and the padding) do not move: sparsity is kept.
    The notes give the held-out accuracy (labels) or agreement with the teacher, and the loss, before and after;
    the details each layer's w_err after fine-tuning and w_err_kmeans before it.
    """

    exact = False
    k: int = 16
    iters: int = 30
    skip: list[str] = field(default_factory=list)
    finetune: bool = True
    epochs: Optional[int] = None
    max_epochs: int = 30
    patience: int = 5
    lr: float = 1e-3
    val_fraction: float = 0.1
    temperature: float = 4.0
    alpha: float = 0.9
    seed: int = 0
    progress: bool = False

    def __post_init__(self):
        index_bits(self.k)                              # ValueError naming k unless 2 <= k <= 256
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"iters={self.iters!r}: must be an integer >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r}: must be > 0")

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        made: dict[int, tuple] = {}
        tune = self.finetune and ctx.train_data is not None
        teacher = copy.deepcopy(gm).eval() if tune else None
        originals: dict[int, torch.Tensor] = {}

        def make(lin):
            mod = ClusteredLinear(lin.weight, lin.bias, self.k, self.iters)
            w = lin.weight.detach().double()
            err = float((mod.dequantized_weight().double() - w).norm() / w.norm().clamp_min(1e-300))
            made[id(mod)] = (err, w.numel())
            if tune:
                originals[id(mod)] = w
            return mod

        new, survey = qgraph.swap_linear(gm, "weight_only", skip=self.skip, make=make)
        notes = [f"kept '{p}' in float32: " + ("conv2d is not clustered" if why.startswith("conv2d") else why)
                 for p, why in survey.skipped]
        tuned_err: dict[int, float] = {}
        if tune and survey.sites:
            notes += self._finetune(new, teacher, ctx, [new.get_submodule(s.path) for s in survey.sites])
            for site in survey.sites:
                mod = new.get_submodule(site.path)
                w = originals[id(mod)]
                tuned_err[id(mod)] = float((mod.dequantized_weight().double() - w).norm() / w.norm().clamp_min(1e-300))
        details, total_float, total_z = [], 0, 0
        for site in survey.sites:
            mod = new.get_submodule(site.path)
            err, numel = made.get(id(mod), (float("nan"), 0))
            z = _zstd_bytes(mod.indices().numpy().tobytes())
            row = {"layer": site.path, "k": mod.k, "index_bits": mod.bits, "w_err": tuned_err.get(id(mod), err)}
            if id(mod) in tuned_err:
                row["w_err_kmeans"] = err
            row.update(float_bytes=4 * numel, packed_index_bytes=int(mod.index.numel()))
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

    def _finetune(self, gm: fx.GraphModule, teacher: nn.Module, ctx: Context, layers: list) -> list[str]:
        """Train the codebooks of `layers` (ClusteredLinear) with the distill pass's loop; returns its notes."""
        from .distill import Distill

        class _Centroids(Distill):
            def _trainable(self, _gm):
                return [m.codebook for m in layers]

        kd = _Centroids(epochs=self.epochs, max_epochs=self.max_epochs, patience=self.patience, lr=self.lr,
                        val_fraction=self.val_fraction, temperature=self.temperature, alpha=self.alpha,
                        seed=self.seed, progress=self.progress)
        frozen = [(p, p.requires_grad) for p in gm.parameters()]
        for p, _ in frozen:                                 # only the codebooks need gradients
            p.requires_grad_(False)
        hooks = []
        for m in layers:                                    # the codebook becomes a parameter while training
            cb = m._buffers.pop("codebook")
            m.codebook = nn.Parameter(cb.detach().clone())
            fixed = (cb == 0).to(cb.dtype)                  # zeros (pruned weights, padding) stay exactly 0
            hooks.append(m.codebook.register_hook(lambda g, keep=1 - fixed: g * keep))
        try:
            result = kd.run(gm, dataclasses.replace(ctx, original=teacher))
        finally:
            for h in hooks:
                h.remove()
            for m in layers:
                cb = m._parameters.pop("codebook").detach()
                m.register_buffer("codebook", cb)
            for p, r in frozen:
                p.requires_grad_(r)
        return [f"centroid fine-tuning (indices fixed, teacher: the unclustered graph): {n}" for n in result.notes]
