"""distill: fine-tune the compressed graph with the original model as teacher."""
from __future__ import annotations

import fnmatch
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
    """Fine-tune the (compressed) graph, the original model acting as teacher, until it stops improving.

    loss = alpha·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha)·cross-entropy(student, labels)
    (the task term only when batches carry labels; `loss=mse` replaces KL for regression outputs), plus
    `feature_weight`·MSE between student and teacher outputs of the modules matching `features` (name
    patterns present in both with equal shapes). Data: optimize(..., train_data=iterable of inputs or
    (inputs, labels) batches), read once into memory.

    Validation: `val_fraction` of the batches (at least one, spread evenly over the data) are held out and
    never trained on; with fewer than two batches (or val_fraction=0) the training batches themselves are
    evaluated instead. The monitored quantity is the loss above (without the feature term) on those
    batches, evaluated before training and after every epoch.

    Length: by default trains epoch after epoch (batch order shuffled with `seed`) until the monitored loss
    has not improved by more than `min_delta` (relative) for `patience` epochs, or `max_epochs` is reached.
    `epochs=N` trains exactly N epochs, `steps=N` exactly N batches (both without early stopping). The
    learning rate follows `schedule`: plateau (halved after `patience`//2 epochs without improvement),
    cosine (annealed to 0 over the planned epochs) or constant. With `restore_best` the weights of the best
    evaluation (the starting weights included) are kept, so the result is never worse on the monitored loss
    than what the pass was given. The report's notes say epochs run, why it stopped, which epoch was kept,
    and the validation loss and accuracy (labels) or top-1 agreement with the teacher (no labels) before
    and after; details hold one row per epoch.

    Optimizer: Adam/AdamW/SGD on every parameter of the graph; BN (if any) and dropout stay in eval mode
    unless `train_mode`. Approximate by design: it changes weights to pull outputs back toward the teacher.
    Never touches the user's model or the teacher.
    """

    exact = False
    epochs: int | None = None
    max_epochs: int = 50
    patience: int = 5
    min_delta: float = 0.01
    val_fraction: float = 0.1
    schedule: Literal["plateau", "cosine", "constant"] = "plateau"
    restore_best: bool = True
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
    seed: int = 0
    progress: bool = True

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        if ctx.train_data is None:
            raise CalibrationError("distill needs training data: pass train_data=<iterable of inputs or "
                                   "(inputs, labels) batches> to graphopt.optimize()")
        self._check_options()
        teacher = ctx.original
        n_inputs = len(ctx.example_inputs)
        data = [split_batch(item, n_inputs) for item in ctx.train_data]
        if not data:
            raise CalibrationError("distill: train_data yielded no batches")
        train, val = holdout(data, self.val_fraction)
        monitor = val if val else train
        labelled = any(lab is not None for _, lab in data) and self.alpha < 1.0
        teacher_out = _TeacherCache(teacher)

        params = self._trainable(gm)
        for p in params:
            p.requires_grad_(True)
        opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[self.optimizer]
        kw = {"momentum": 0.9} if self.optimizer == "sgd" else {}
        optim = opt_cls(params, lr=self.lr, weight_decay=self.weight_decay, **kw)
        planned = self._planned_epochs(len(train))
        sched = self._scheduler(optim, planned)
        matched = self._matched_features(gm, teacher)
        s_tap, t_tap = _FeatureTap(gm, matched), _FeatureTap(teacher, matched)
        skipped: set[str] = set()
        rng = torch.Generator().manual_seed(self.seed)

        start = self._evaluate(gm, monitor, teacher_out)
        best, best_epoch, ref, bad = start["loss"], 0, start["loss"], 0
        best_state = _snapshot(gm) if self.restore_best else None
        history: list[dict] = [{"epoch": 0, "steps": 0, "train_loss": float("nan"), **start,
                                "lr": optim.param_groups[0]["lr"]}]
        seen, epoch, reason = 0, 0, ""
        bar = _progress(planned, self.progress)
        try:
            while True:
                epoch += 1
                gm.train(self.train_mode)
                total, n = 0.0, 0
                for i in torch.randperm(len(train), generator=rng).tolist():
                    inputs, labels = train[i]
                    with torch.no_grad():
                        t_out = teacher(*inputs) if matched else None
                    t_logits = _main_tensor(t_out) if matched else teacher_out(("train", i), inputs)
                    s_logits = _main_tensor(gm(*inputs))
                    loss = self._loss(s_logits, t_logits, labels)
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
                    n += 1
                    seen += 1
                    if self.steps is not None and seen >= self.steps:
                        break
                ev = self._evaluate(gm, monitor, teacher_out)
                lr_used = optim.param_groups[0]["lr"]
                if sched is not None:
                    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                        sched.step(ev["loss"])
                    else:
                        sched.step()
                history.append({"epoch": epoch, "steps": seen, "train_loss": total / max(n, 1), **ev,
                                "lr": lr_used})
                if hasattr(bar, "update"):
                    bar.update(1)
                    bar.set_postfix(val_loss=f"{ev['loss']:.4f}")
                if ev["loss"] < best:                     # the weights kept: the lowest loss seen
                    best, best_epoch = ev["loss"], epoch
                    if self.restore_best:
                        best_state = _snapshot(gm)
                if _improves(ev["loss"], ref, self.min_delta):   # patience: improvements beyond min_delta
                    ref, bad = ev["loss"], 0
                else:
                    bad += 1
                if self.steps is not None and seen >= self.steps:
                    reason = f"steps={self.steps} done"
                elif self.steps is None and self.epochs is not None and epoch >= self.epochs:
                    reason = f"epochs={self.epochs} done"
                elif self.steps is None and self.epochs is None and bad >= self.patience:
                    reason = (f"plateau: {'validation' if val else 'training'} loss did not improve "
                              f"for {self.patience} epochs")
                elif self.steps is None and self.epochs is None and epoch >= self.max_epochs:
                    reason = f"max_epochs={self.max_epochs} reached"
                if reason:
                    break
        finally:
            if hasattr(bar, "close"):
                bar.close()
            s_tap.close()
            t_tap.close()
            gm.eval()
            for p in params:
                p.requires_grad_(False)
        kept = epoch
        if self.restore_best and best_epoch != epoch:
            gm.load_state_dict(best_state)
            kept = best_epoch
        end = history[kept]
        notes = [self._summary(seen, epoch, reason, kept, labelled, optim, history),
                 self._validation_note(val, train, start, end, teacher_out)]
        if matched:
            used = [n for n in matched if n not in skipped]
            notes.append("feature distillation on: " + (", ".join(used) or "(none)"))
            if skipped:
                notes.append("feature shapes differ (not matched): " + ", ".join(sorted(skipped)))
        return PassResult(gm, notes=notes, details=history)

    # ------------------------------------------------------------------------------------------ pieces
    def _trainable(self, gm: nn.Module) -> list[nn.Parameter]:
        """The parameters trained (all of the graph's; a pass reusing this machinery may train fewer)."""
        return list(gm.parameters())

    def _check_options(self):
        if not 0.0 <= self.alpha <= 1.0 or self.temperature <= 0:
            raise ValueError(f"distill: alpha must be in [0, 1] and temperature > 0 "
                             f"(got alpha={self.alpha}, temperature={self.temperature})")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"distill: val_fraction must be in [0, 1) (got {self.val_fraction})")
        for name in ("epochs", "steps", "max_epochs", "patience"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"distill: {name} must be at least 1 (got {v})")

    def _planned_epochs(self, n_train: int) -> int:
        if self.steps is not None:
            return -(-self.steps // n_train)
        return self.epochs if self.epochs is not None else self.max_epochs

    def _scheduler(self, optim, planned: int):
        if self.schedule == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(
                optim, mode="min", factor=0.5, patience=max(0, self.patience // 2 - 1),
                threshold=self.min_delta, threshold_mode="rel")
        if self.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=max(1, planned))
        return None

    def _loss(self, s_logits, t_logits, labels):
        loss = self.alpha * kd_loss(s_logits, t_logits, self.temperature, self.loss)
        if labels is not None and self.alpha < 1.0:
            loss = loss + (1 - self.alpha) * F.cross_entropy(s_logits, labels)
        return loss

    @torch.no_grad()
    def _evaluate(self, gm, batches, teacher_out) -> dict:
        """Mean loss over `batches`, accuracy vs labels and top-1 agreement with the teacher (NaN if n/a)."""
        gm.eval()
        loss, n, correct, labelled, agree = 0.0, 0, 0, 0, 0
        for inputs, labels in batches:
            t_logits = teacher_out(("eval", id(inputs)), inputs)    # batches live as long as the pass
            s_logits = _main_tensor(gm(*inputs))
            k = s_logits.shape[0] if s_logits.dim() > 0 else 1
            loss += self._loss(s_logits, t_logits, labels).item() * k
            n += k
            if s_logits.dim() >= 1 and self.loss == "kl":
                top1 = s_logits.argmax(-1)
                agree += (top1 == t_logits.argmax(-1)).float().mean().item() * k
                if _class_labels(labels, s_logits):
                    correct += (top1 == labels).float().mean().item() * k
                    labelled += k
        nan = float("nan")
        return {"loss": loss / max(n, 1), "accuracy": 100.0 * correct / labelled if labelled else nan,
                "agreement": 100.0 * agree / n if self.loss == "kl" and n else nan}

    def _summary(self, seen, epochs, reason, kept, labelled, optim, history) -> str:
        last_lr = optim.param_groups[0]["lr"]
        lr = f"lr={self.lr:g}" + (f"->{last_lr:.3g}" if last_lr != self.lr else "")
        if kept == epochs:
            which = "kept the last epoch's weights"
        elif kept == 0:
            which = "no epoch improved on the starting weights: kept them"
        else:
            which = f"restored epoch {kept} (best monitored loss)"
        return (f"trained {epochs} epoch{'s' * (epochs != 1)}, {seen} steps ({self.optimizer}, {lr}, "
                f"schedule={self.schedule}, T={self.temperature:g}, alpha={self.alpha:g}"
                f"{', with labels' if labelled else ', teacher only'}); stopped: {reason}; {which}")

    def _validation_note(self, val, train, start, end, teacher_out) -> str:
        if val:
            where = f"validation ({len(val)} of {len(val) + len(train)} batches held out)"
        else:
            where = "training batches (too few to hold any out)"
        parts = [f"loss {start['loss']:.4g} -> {end['loss']:.4g}"]
        if start["accuracy"] == start["accuracy"]:
            parts.insert(0, f"accuracy {start['accuracy']:.2f}% -> {end['accuracy']:.2f}%")
        if start["agreement"] == start["agreement"]:
            parts.append(f"top-1 agreement with teacher {start['agreement']:.2f}% -> {end['agreement']:.2f}%")
        return f"{where}: " + ", ".join(parts)

    def _matched_features(self, gm: nn.Module, teacher: nn.Module) -> list[str]:
        if not self.features:
            return []
        s_names, t_names = dict(gm.named_modules()), dict(teacher.named_modules())
        out = [n for n in s_names if n and n in t_names and any(fnmatch.fnmatch(n, p) for p in self.features)]
        if not out:
            raise ValueError(f"distill: no module matches features={self.features} in both student and teacher")
        return out


def holdout(batches: list, fraction: float) -> tuple[list, list]:
    """(train, validation): round(fraction·n) batches (at least one) spread evenly over the list, or no
    validation when fewer than two batches or fraction is 0."""
    n = len(batches)
    if fraction <= 0 or n < 2:
        return list(batches), []
    n_val = min(n - 1, max(1, round(fraction * n)))
    val_idx = {int((i + 0.5) * n / n_val) for i in range(n_val)}
    return ([b for i, b in enumerate(batches) if i not in val_idx],
            [b for i, b in enumerate(batches) if i in val_idx])


class _TeacherCache:
    """The teacher's main output per batch, computed once (the teacher is frozen and in eval mode), up to
    `budget` bytes; beyond that it is recomputed."""

    def __init__(self, teacher: nn.Module, budget: int = 256 << 20):
        self.teacher, self.budget, self.used = teacher, budget, 0
        self.cache: dict = {}

    @torch.no_grad()
    def __call__(self, key, inputs) -> torch.Tensor:
        if key in self.cache:
            return self.cache[key]
        out = _main_tensor(self.teacher(*inputs)).detach()
        size = out.numel() * out.element_size()
        if self.used + size <= self.budget:
            self.cache[key] = out
            self.used += size
        return out


def _improves(value: float, best: float, min_delta: float) -> bool:
    """value beats best by more than min_delta of |best|."""
    return value < best - min_delta * abs(best)


def _snapshot(gm: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in gm.state_dict().items()}


def _class_labels(labels, logits) -> bool:
    return (isinstance(labels, torch.Tensor) and not labels.is_floating_point()
            and tuple(labels.shape) == tuple(logits.shape[:-1]))


def _main_tensor(out) -> torch.Tensor:
    from ..analysis.compare import flatten_outputs

    tensors = flatten_outputs(out)
    if not tensors:
        raise ValueError("distill: the model returned no tensor")
    return tensors[0]


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc="distill", unit="epoch", leave=False)
