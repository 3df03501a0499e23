"""sparsify: weight pruning (unstructured, N:M, block), one-shot or gradual with distillation."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import CalibrationError, PipelineError
from ..pipeline import Context, Pass, PassResult, register_pass
from ._sparse import SparseConv2d, SparseLinear, count_groups, masks_from_scores, parse_pattern

__all__ = ["Sparsify", "cubic_sparsity"]

CRITERIA = ("magnitude", "gradient", "obs")


def cubic_sparsity(step: int, s0: float, s_final: float, start: int, end: int) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_0 - s_f)(1 - (t - t_0)/(t_1 - t_0))^3, s_0 before t_0, s_f after t_1."""
    if step <= start:
        return s0
    if step >= end:
        return s_final
    frac = (step - start) / (end - start)
    return s_final + (s0 - s_final) * (1.0 - frac) ** 3


@register_pass("sparsify")
@dataclass
class Sparsify(Pass):
    """Zero individual weights of Linear and Conv2d layers in a pattern, and keep them zero.

    Changes: every selected layer becomes a SparseLinear / SparseConv2d (passes/_sparse.py) holding a boolean
    mask; it computes with weight * mask and the masked weights are set to exactly 0. The layer's weight
    ([out, in] or [out, in/groups·kh·kw] for convs) is cut in `pattern` groups:
      unstructured   single weights;
      N:M            in every M consecutive input weights of an output row exactly N are kept (2:4, 4:8,
                     sparsity fixed at 1 - N/M; a layer whose input width is not a multiple of M is left
                     dense, noted);
      block(RxC)     R consecutive output features x C consecutive input features (1x16, 16x1, 4x4); edge
                     blocks of a ragged layer are partial blocks and count as blocks.
    Exactly round(sparsity · groups) groups are removed per layer (scope=layer), or over all selected layers
    together (scope=global, ranking all groups by one score), the lowest-scoring first (ties: lower index).
    Scores per weight (a group scores the sum of its weights' scores):
      magnitude   |w|
      gradient    Σ_batches |w · ∂L/∂w| (first-order Taylor), L = cross-entropy against the batch labels,
                  or against the model's own top-1 when the batches have none; needs calibration or
                  train_data
      obs         w² · H_qq with H = E[x xᵀ] the layer-input Hessian of the squared-error reconstruction
                  loss, diagonal only (OBS/OBD saliency w²/[H⁻¹]_qq with a diagonal H; the criterion of
                  SparseGPT/Wanda-style one-shot pruning); H_qq from `batches` calibration batches
    Gradual (steps > 0): trains on train_data for `steps` optimizer steps with the original model as
    distillation teacher (distill's loss: alpha·T²·KL + (1-alpha)·CE with labels), raising sparsity
    along Zhu & Gupta's cubic schedule from `initial_sparsity` to `sparsity` between steps
    prune_start·steps and prune_end·steps, re-selecting the masks every `prune_every` steps from the
    current scores, and fine-tuning with the final masks fixed for the remaining steps. Masks only grow
    (a pruned weight is zero and has zero gradient, so it never scores above a live one). BatchNorm and
    dropout stay in eval mode while training (fold_bn first folds BN away); the report notes validation
    accuracy / agreement with the teacher before and after. Followed by `quantize`, the pruned layers become
    ordinary int8 layers (zeros kept, dense int8 kernels).

    Keeps exactly: every unmasked weight (one-shot; gradual trains them), biases, every other layer, the
    graph's inputs/outputs. Masked weights stay 0 through later fine-tuning (distill), since the layer
    multiplies by its mask. Approximates: outputs change (measured by the pass manager, not bounded here).
    sparsity=0 leaves the graph unchanged (exact). Skips: layers matching `exclude` (fnmatch on module
    paths), layers other than `layers` selects, and N:M-incompatible widths, each named in the notes.

    Backend: `kernel` tells the TVM backend what to run for a SparseLinear / SparseConv2d: auto (a block-sparse kernel only
    when it measures faster than the dense kernel for that layer's shape on the target; the decision per
    layer is in the report), sparse (always the sparse kernel: weights stored as values + indices), dense.
    A SparseConv2d (groups=1) runs as im2col + the same kernel when chosen; grouped convs run dense.

    Report: one row per layer (shape, groups, sparsity reached, criterion), and the overall sparsity.

    Options:
      sparsity          fraction of groups removed (default 0.5; N:M patterns fix it at 1 - N/M)
      pattern           unstructured | N:M | RxC | "block(RxC)" (parentheses need quotes in pipeline text)
      criterion         magnitude | gradient | obs          scope   layer | global
      layers            all | linear | conv                  exclude module path patterns left dense
      batches           calibration / train batches read by the gradient and obs criteria
      kernel            auto | sparse | dense (TVM backend, see above)
      steps             0: one-shot; > 0: gradual pruning with distillation for this many optimizer steps
      initial_sparsity, prune_start, prune_end, prune_every
                        the cubic schedule (s0, start and end as fractions of steps, steps between mask
                        updates; 0 = 16 updates over the ramp)
      lr, temperature, alpha, val_fraction, seed
                        training (Adam), distillation loss, held-out share for the before/after note
    """

    sparsity: float | None = None
    pattern: str = "unstructured"
    criterion: Literal["magnitude", "gradient", "obs"] = "magnitude"
    scope: Literal["layer", "global"] = "layer"
    layers: Literal["all", "linear", "conv"] = "all"
    exclude: list[str] = field(default_factory=list)
    batches: int = 8
    kernel: Literal["auto", "sparse", "dense"] = "auto"
    steps: int = 0
    initial_sparsity: float = 0.0
    prune_start: float = 0.0
    prune_end: float = 0.7
    prune_every: int = 0
    lr: float = 1e-3
    temperature: float = 4.0
    alpha: float = 0.7
    val_fraction: float = 0.1
    seed: int = 0

    exact = False

    def __post_init__(self):
        self._pattern = parse_pattern(self.pattern)
        fixed = self._pattern.fixed_sparsity()
        if self.sparsity is None:
            self.sparsity = fixed if fixed is not None else 0.5
        elif fixed is not None and abs(self.sparsity - fixed) > 1e-9:
            raise PipelineError(f"sparsify: pattern {self.pattern} fixes sparsity at {fixed:g}; got "
                                f"sparsity={self.sparsity}")
        if not 0.0 <= self.sparsity < 1.0:
            raise PipelineError(f"sparsify: sparsity must be in [0, 1), got {self.sparsity}")
        if self.criterion not in CRITERIA:
            raise PipelineError(f"sparsify: criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if self.scope not in ("layer", "global"):
            raise PipelineError(f"sparsify: scope must be 'layer' or 'global', got {self.scope!r}")
        if self.scope == "global" and self._pattern.kind == "nm":
            raise PipelineError("sparsify: scope=global does not apply to an N:M pattern (N of every M is kept "
                                "in every layer)")
        if self.layers not in ("all", "linear", "conv"):
            raise PipelineError(f"sparsify: layers must be all, linear or conv, got {self.layers!r}")
        if self.kernel not in ("auto", "sparse", "dense"):
            raise PipelineError(f"sparsify: kernel must be auto, sparse or dense, got {self.kernel!r}")
        if self.batches < 1 or self.steps < 0 or self.prune_every < 0:
            raise PipelineError("sparsify: batches must be >= 1, steps and prune_every >= 0")
        if not 0.0 <= self.initial_sparsity <= self.sparsity:
            raise PipelineError(f"sparsify: initial_sparsity must be in [0, sparsity], got {self.initial_sparsity}")
        if not 0.0 <= self.prune_start < self.prune_end <= 1.0:
            raise PipelineError(f"sparsify: need 0 <= prune_start < prune_end <= 1, got {self.prune_start}, "
                                f"{self.prune_end}")
        if not 0.0 <= self.alpha <= 1.0 or self.temperature <= 0 or self.lr <= 0:
            raise PipelineError("sparsify: alpha must be in [0, 1], temperature and lr > 0")
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]
        self.exclude = list(self.exclude)

    def is_exact(self) -> bool:
        return self.sparsity == 0 and self.steps == 0

    # ------------------------------------------------------------------------------------------- run
    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        if self.is_exact():
            return PassResult(gm, changed=False, notes=["sparsity=0: graph unchanged"])
        targets, notes = self._select_layers(gm)
        if not targets:
            return PassResult(gm, changed=False, notes=notes + ["no Linear/Conv2d layer to sparsify"])
        dense_before = {p: _dense_count(m) for p, m in targets.items()}
        # wrap every target (all-ones mask unless it already had one) so training keeps masks
        for path, mod in targets.items():
            old = getattr(mod, "mask", None)
            mask = old if old is not None else torch.ones_like(mod.weight, dtype=torch.bool)
            _replace(gm, path, self._wrap(mod, mask))
        layers = {p: gm.get_submodule(p) for p in targets}
        if self.steps > 0:
            notes += self._gradual(gm, layers, ctx)
        else:
            hdiag = self._hessian_diag(gm, layers, ctx) if self.criterion == "obs" else None
            grads = self._gradients(gm, layers, ctx) if self.criterion == "gradient" else None
            self._apply_masks(layers, self.sparsity, hdiag, grads)
        gm.recompile()
        details, total, zeros = [], 0, 0
        for path, mod in layers.items():
            n, z = mod.weight.numel(), int((~mod.mask).sum())
            total, zeros = total + n, zeros + z
            details.append({"layer": path, "type": type(mod).__name__.replace("Sparse", ""),
                            "shape": "x".join(map(str, mod.weight.shape)), "pattern": str(self._pattern),
                            "groups": count_groups(tuple(mod.weight.shape), self._pattern),
                            "sparsity": round(z / n, 4), "was": round(1 - dense_before[path] / n, 4),
                            "kernel": self.kernel if isinstance(mod, SparseLinear) or mod.groups == 1 else "dense (grouped)"})
        all_w = sum(p.numel() for n, p in gm.named_parameters() if n.endswith("weight"))
        notes.insert(0, f"{len(layers)} layers, {str(self._pattern)} pattern, criterion={self.criterion}, "
                        f"scope={self.scope}: {zeros / total:.2%} of their weights are zero "
                        f"({zeros / max(all_w, 1):.2%} of all weights)")
        return PassResult(gm, notes=notes, details=details)

    # --------------------------------------------------------------------------------------- layers
    def _select_layers(self, gm: fx.GraphModule) -> tuple[dict[str, nn.Module], list[str]]:
        targets, skipped, notes = {}, [], []
        kinds = {"all": (nn.Linear, nn.Conv2d), "linear": (nn.Linear,), "conv": (nn.Conv2d,)}[self.layers]
        for node in gm.graph.nodes:
            if node.op != "call_module" or node.target in targets:
                continue
            mod = gm.get_submodule(node.target)
            if not isinstance(mod, kinds) or type(mod) not in (nn.Linear, nn.Conv2d, SparseLinear, SparseConv2d):
                continue
            if any(fnmatch.fnmatch(node.target, p) for p in self.exclude):
                skipped.append(f"{node.target} (exclude)")
                continue
            if self._pattern.kind == "nm":
                width = mod.weight[0].numel()
                if width % self._pattern.m:
                    skipped.append(f"{node.target} (input width {width} is not a multiple of "
                                   f"{self._pattern.m})")
                    continue
            targets[node.target] = mod
        if skipped:
            notes.append("left dense: " + ", ".join(skipped))
        return targets, notes

    def _wrap(self, mod: nn.Module, mask: torch.Tensor) -> nn.Module:
        if isinstance(mod, nn.Linear):
            block = self._pattern.block
            return SparseLinear.from_linear(mod, mask, block, self.kernel)
        return SparseConv2d.from_conv(mod, mask, self._pattern.block, self.kernel)

    # --------------------------------------------------------------------------------------- scores
    def _scores(self, layers, hdiag, grads) -> dict[str, torch.Tensor]:
        out = {}
        for path, mod in layers.items():
            w = (mod.weight.detach() * mod.mask).float()
            if self.criterion == "magnitude":
                s = w.abs()
            elif self.criterion == "gradient":
                s = grads[path].clone()
            else:
                s = w.pow(2) * hdiag[path]
            s = torch.where(mod.mask, s, torch.zeros_like(s))            # masked weights rank lowest
            out[path] = s.reshape(s.shape[0], -1)
        return out

    def _apply_masks(self, layers, sparsity: float, hdiag, grads) -> None:
        scores = self._scores(layers, hdiag, grads)
        shapes = {p: tuple(s.shape) for p, s in scores.items()}
        masks = masks_from_scores(scores, shapes, self._pattern, sparsity, self.scope)
        with torch.no_grad():
            for path, mod in layers.items():
                m = masks[path].reshape(mod.weight.shape) & mod.mask        # masks only grow
                mod.mask.copy_(m)
                mod.weight.mul_(m)

    # ----------------------------------------------------------------------------------------- data
    def _data(self, ctx: Context, what: str) -> list[tuple[tuple, torch.Tensor | None]]:
        from .distill import split_batch

        n_inputs = len(ctx.example_inputs)
        if ctx.calibration is not None:
            return [(b, None) for b in ctx.calibration_batches(self.batches, needed_by=what)]
        if ctx.train_data is not None:
            out = []
            for item in ctx.train_data:
                out.append(split_batch(item, n_inputs))
                if len(out) >= self.batches:
                    break
            if out:
                return out
        raise CalibrationError(f"{what} needs data: pass calibration=<iterable of model inputs> or "
                               f"train_data=<(inputs, labels) batches> to graphopt.optimize()")

    @torch.no_grad()
    def _hessian_diag(self, gm, layers, ctx) -> dict[str, torch.Tensor]:
        """diag E[x xᵀ] of every layer's input, shaped like its weight (per output row's group for convs)."""
        sums = {p: None for p in layers}
        counts = {p: 0 for p in layers}

        def hook(path):
            def fn(mod, args, _out):
                x = args[0].detach().float()
                if isinstance(mod, nn.Conv2d):
                    cols = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # [B, I*kh*kw, L]
                    sq, n = cols.pow(2).sum(dim=(0, 2)), cols.shape[0] * cols.shape[2]
                else:
                    flat = x.reshape(-1, x.shape[-1])
                    sq, n = flat.pow(2).sum(0), flat.shape[0]
                sums[path] = sq if sums[path] is None else sums[path] + sq
                counts[path] += n
            return fn

        handles = [m.register_forward_hook(hook(p)) for p, m in layers.items()]
        try:
            gm.eval()
            for inputs, _ in self._data(ctx, "sparsify(criterion=obs)"):
                gm(*inputs)
        finally:
            for h in handles:
                h.remove()
        out = {}
        for path, mod in layers.items():
            if sums[path] is None:
                raise CalibrationError(f"sparsify(criterion=obs): layer '{path}' never ran on the calibration data")
            d = sums[path] / max(counts[path], 1)
            if isinstance(mod, nn.Conv2d):
                g = mod.groups
                per = d.reshape(g, -1)                                        # [groups, in/g * kh * kw]
                rows = torch.arange(mod.out_channels) // (mod.out_channels // g)
                out[path] = per[rows].reshape(mod.weight.shape)
            else:
                out[path] = d.expand_as(mod.weight)
        return out

    def _gradients(self, gm, layers, ctx) -> dict[str, torch.Tensor]:
        acc = {p: torch.zeros_like(m.weight) for p, m in layers.items()}
        data = self._data(ctx, "sparsify(criterion=gradient)")
        params = [m.weight for m in layers.values()]
        req = [p.requires_grad for p in params]
        gm.eval()
        try:
            for p in params:
                p.requires_grad_(True)
            for inputs, labels in data:
                from .distill import _main_tensor

                logits = _main_tensor(gm(*inputs))
                loss = _task_loss(logits, labels)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for (path, mod), g in zip(layers.items(), grads):
                    if g is not None:
                        acc[path] += (g * mod.weight.detach()).abs()
        finally:
            for p, r in zip(params, req):
                p.requires_grad_(r)
        return acc

    # -------------------------------------------------------------------------------------- gradual
    def _gradual(self, gm, layers, ctx: Context) -> list[str]:
        from .distill import Distill, _TeacherCache, _main_tensor, holdout, split_batch

        if ctx.train_data is None:
            raise CalibrationError("sparsify(steps>0) trains: pass train_data=<iterable of inputs or "
                                   "(inputs, labels) batches> to graphopt.optimize()")
        n_inputs = len(ctx.example_inputs)
        data = [split_batch(item, n_inputs) for item in ctx.train_data]
        if not data:
            raise CalibrationError("sparsify: train_data yielded no batches")
        train, val = holdout(data, self.val_fraction)
        monitor = val if val else train
        kd = Distill(temperature=self.temperature, alpha=self.alpha, progress=False)
        teacher = _TeacherCache(ctx.original)
        hdiag = self._hessian_diag(gm, layers, ctx) if self.criterion == "obs" else None
        start_eval = kd._evaluate(gm, monitor, teacher)

        t0 = int(round(self.prune_start * self.steps))
        t1 = max(t0 + 1, int(round(self.prune_end * self.steps)))
        every = self.prune_every or max(1, (t1 - t0) // 16)
        params = list(gm.parameters())
        for p in params:
            p.requires_grad_(True)
        optim = torch.optim.Adam(params, lr=self.lr)
        grad_acc = {p: torch.zeros_like(m.weight) for p, m in layers.items()} if self.criterion == "gradient" else None
        rng = torch.Generator().manual_seed(self.seed)
        updates, step, current = 0, 0, -1.0
        order: list[int] = []
        try:
            while step < self.steps:
                if step >= t0 and (step == t0 or (step - t0) % every == 0 or step == t1) and current < self.sparsity:
                    target = cubic_sparsity(step, self.initial_sparsity, self.sparsity, t0, t1)
                    if self._pattern.kind == "nm":
                        target = self.sparsity
                    if target > current:
                        self._apply_masks(layers, target, hdiag, grad_acc)
                        current, updates = target, updates + 1
                        if grad_acc is not None:
                            for g in grad_acc.values():
                                g.zero_()
                if not order:
                    order = torch.randperm(len(train), generator=rng).tolist()
                i = order.pop()
                inputs, labels = train[i]
                gm.train(False)
                logits = _main_tensor(gm(*inputs))
                loss = kd._loss(logits, teacher(("train", i), inputs), labels)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                if grad_acc is not None:
                    for path, mod in layers.items():
                        if mod.weight.grad is not None:
                            grad_acc[path] += (mod.weight.grad * mod.weight.detach()).abs()
                optim.step()
                with torch.no_grad():                      # Adam's momentum must not move masked weights
                    for mod in layers.values():
                        mod.weight.mul_(mod.mask)
                step += 1
            if current < self.sparsity:                   # steps ended before t1 (tiny step counts)
                self._apply_masks(layers, self.sparsity, hdiag, grad_acc)
                updates += 1
        finally:
            gm.eval()
            for p in params:
                p.requires_grad_(False)
        end_eval = kd._evaluate(gm, monitor, teacher)
        where = f"validation ({len(val)} of {len(data)} batches held out)" if val else "training batches"

        def fmt(ev):
            acc = f"accuracy {ev['accuracy']:.2f}%, " if ev["accuracy"] == ev["accuracy"] else ""
            return f"{acc}agreement {ev['agreement']:.2f}%, loss {ev['loss']:.4g}"

        return [f"gradual pruning: {self.steps} steps (Adam lr={self.lr:g}, distillation T={self.temperature:g}, "
                f"alpha={self.alpha:g}), cubic schedule {self.initial_sparsity:g} -> {self.sparsity:g} over steps "
                f"{t0}..{t1}, {updates} mask updates, then {max(0, self.steps - t1)} fine-tuning steps",
                f"{where}: before {fmt(start_eval)}; after {fmt(end_eval)}"]


def _task_loss(logits: torch.Tensor, labels) -> torch.Tensor:
    if isinstance(labels, torch.Tensor) and not labels.is_floating_point() and logits.dim() >= 2 \
            and tuple(labels.shape) == tuple(logits.shape[:-1]):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    if logits.dim() >= 2 and logits.is_floating_point():
        pseudo = logits.detach().argmax(-1)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), pseudo.reshape(-1))
    return 0.5 * logits.pow(2).sum()


def _dense_count(mod: nn.Module) -> int:
    mask = getattr(mod, "mask", None)
    if mask is not None:
        return int(mask.sum())
    return int((mod.weight != 0).sum())


def _replace(gm: fx.GraphModule, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, new)
