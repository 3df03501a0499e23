"""distill: fine-tune the compressed graph with the original model as teacher."""
from __future__ import annotations

import fnmatch
import itertools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import CalibrationError
from ..pipeline import Context, Pass, PassResult, register_pass


def split_batch(item, n_inputs: int) -> tuple[tuple, torch.Tensor | None]:
    """(inputs, labels or None) from a tensor, a tuple of inputs, or an (inputs..., labels) tuple."""
    if isinstance(item, torch.Tensor):
        return (item,), None
    if isinstance(item, dict):
        raise CalibrationError("distill: training batches must be tensors or tuples, got a dict")
    item = tuple(item)
    if len(item) == n_inputs:
        return item, None
    if len(item) == n_inputs + 1:
        return item[:-1], item[-1]
    if len(item) == 2 and isinstance(item[0], (tuple, list)) and len(item[0]) == n_inputs:
        return tuple(item[0]), item[1]
    raise CalibrationError(f"distill: a training batch has {len(item)} elements; the model takes {n_inputs} "
                           f"inputs (give inputs, or inputs followed by labels)")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, kind: str) -> torch.Tensor:
    """Hinton's T²·KL(softmax(t/T) ‖ softmax(s/T)) over the last dim, or MSE for regression outputs."""
    if kind == "mse":
        return F.mse_loss(student, teacher)
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                    reduction="batchmean", log_target=True) * (t * t)


class _FeatureTap:
    """Records the outputs of named submodules during a forward pass."""

    def __init__(self, module: nn.Module, names: list[str]):
        self.values: dict[str, torch.Tensor] = {}
        self.handles = [dict(module.named_modules())[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(_m, _i, out):
            self.values[name] = out
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


@register_pass("distill")
@dataclass
class Distill(Pass):
    """Fine-tune the (compressed) graph, the original model acting as teacher.

    loss = alpha·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha)·cross-entropy(student, labels)
    (the task term only when batches carry labels; `loss=mse` replaces KL for regression outputs), plus
    `feature_weight`·MSE between student and teacher outputs of the modules matching `features` (name
    patterns present in both with equal shapes). Data: optimize(..., train_data=iterable of inputs or
    (inputs, labels)). Trains `epochs` passes over the data (or `steps` batches) with Adam/AdamW/SGD on
    every parameter of the graph; BN (if any) and dropout stay in eval mode unless `train_mode`.
    Approximate by design: it changes weights to pull outputs back toward the teacher. Never touches the
    user's model or the teacher.
    """

    exact = False
    epochs: int = 1
    steps: int | None = None
    lr: float = 1e-3
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = 0.0
    temperature: float = 4.0
    alpha: float = 0.9
    loss: Literal["kl", "mse"] = "kl"
    features: list[str] | None = None
    feature_weight: float = 1.0
    train_mode: bool = False
    progress: bool = True

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        if ctx.train_data is None:
            raise CalibrationError("distill needs training data: pass train_data=<iterable of inputs or "
                                   "(inputs, labels) batches> to graphopt.optimize()")
        if not 0.0 <= self.alpha <= 1.0 or self.temperature <= 0:
            raise ValueError(f"distill: alpha must be in [0, 1] and temperature > 0 "
                             f"(got alpha={self.alpha}, temperature={self.temperature})")
        teacher = ctx.original
        n_inputs = len(ctx.example_inputs)
        params = [p for p in gm.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[self.optimizer]
        kw = {"momentum": 0.9} if self.optimizer == "sgd" else {}
        optim = opt_cls(params, lr=self.lr, weight_decay=self.weight_decay, **kw)
        matched = self._matched_features(gm, teacher)
        s_tap, t_tap = _FeatureTap(gm, matched), _FeatureTap(teacher, matched)
        gm.train(self.train_mode)
        batches = self._batches(ctx)
        bar = _progress(batches, self.progress)
        history: list[dict] = []
        total, seen, labelled, skipped = 0.0, 0, False, set()
        try:
            for step, item in enumerate(bar):
                inputs, labels = split_batch(item, n_inputs)
                with torch.no_grad():
                    t_out = teacher(*inputs)
                s_out = gm(*inputs)
                s_logits, t_logits = _main_tensor(s_out), _main_tensor(t_out)
                loss = self.alpha * kd_loss(s_logits, t_logits, self.temperature, self.loss)
                if labels is not None and self.alpha < 1.0:
                    labelled = True
                    loss = loss + (1 - self.alpha) * F.cross_entropy(s_logits, labels)
                for name in matched:
                    s_feat, t_feat = s_tap.values[name], t_tap.values[name]
                    if s_feat.shape != t_feat.shape:     # e.g. a pruned layer: nothing to match
                        skipped.add(name)
                        continue
                    loss = loss + self.feature_weight * F.mse_loss(s_feat, t_feat)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                total += loss.item()
                seen += 1
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                if seen % 50 == 0:
                    history.append({"step": seen, "mean_loss": total / 50})
                    total = 0.0
        finally:
            s_tap.close()
            t_tap.close()
            gm.eval()
            for p in params:
                p.requires_grad_(False)
        if seen == 0:
            raise CalibrationError("distill: train_data yielded no batches")
        if seen % 50:
            history.append({"step": seen, "mean_loss": total / (seen % 50)})
        notes = [f"trained {seen} steps ({self.optimizer}, lr={self.lr:g}, T={self.temperature:g}, "
                 f"alpha={self.alpha:g}{', with labels' if labelled else ', teacher only'}); "
                 f"loss {history[0]['mean_loss']:.4g} -> {history[-1]['mean_loss']:.4g}"]
        if matched:
            used = [n for n in matched if n not in skipped]
            notes.append("feature distillation on: " + (", ".join(used) or "(none)"))
            if skipped:
                notes.append("feature shapes differ (not matched): " + ", ".join(sorted(skipped)))
        return PassResult(gm, notes=notes, details=history)

    def _batches(self, ctx: Context):
        data = ctx.train_data
        if self.steps is not None:
            return itertools.islice(itertools.cycle(list(data)), self.steps)
        return itertools.chain.from_iterable(data for _ in range(self.epochs))

    def _matched_features(self, gm: nn.Module, teacher: nn.Module) -> list[str]:
        if not self.features:
            return []
        s_names, t_names = dict(gm.named_modules()), dict(teacher.named_modules())
        out = [n for n in s_names if n and n in t_names and any(fnmatch.fnmatch(n, p) for p in self.features)]
        if not out:
            raise ValueError(f"distill: no module matches features={self.features} in both student and teacher")
        return out


def _main_tensor(out) -> torch.Tensor:
    from ..analysis.compare import flatten_outputs

    tensors = flatten_outputs(out)
    if not tensors:
        raise ValueError("distill: the model returned no tensor")
    return tensors[0]


def _progress(it, enabled: bool):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return it
    return tqdm(it, desc="distill", unit="step", leave=False)
