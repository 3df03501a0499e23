"""Pass base class, registry, pipeline text <-> objects, and the pass manager.

A pass is a dataclass whose fields are its options; the registry maps a name to the class. A pipeline is a
list of configured passes that round-trips through text::

    p = Pipeline.parse("fold_bn,prune(ratio=0.5,criterion=l1),lowrank(energy=0.9)")
    assert Pipeline.parse(str(p)) == p

The pass manager owns the cross-cutting work so passes stay small: timing, shape propagation, params and
FLOPs, running the graph on the example inputs and comparing with the original model, and failing loudly
(with the pass's name) when a pass breaks the graph or an exact pass changes the outputs.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Sequence

import torch
from torch import fx, nn

from .capture import cloned
from .errors import CalibrationError, GraphoptError, PassError, PipelineError

__all__ = [
    "Context", "PassResult", "Pass", "register_pass", "get_pass", "available_passes", "Pipeline",
    "PassManager",
]


# ----------------------------------------------------------------------------------------------- context
@dataclass
class Context:
    """What every pass may read: the original model, example inputs, calibration data, target.

    `reference_outputs` are the original model's outputs on `example_inputs`, computed once.
    """

    original: nn.Module
    example_inputs: tuple
    calibration: Iterable | None = None
    train_data: Iterable | None = None   # (inputs[, labels]) batches for passes that train (distill)
    target: str = "torch"
    exact_rtol: float = 1e-4          # an exact pass may change outputs by at most this * max|reference|
    reference_outputs: Any = None
    notes: list[str] = field(default_factory=list)
    dynamic: Any = None               # graphopt.dynamic.DynamicSpec: dims that vary at run time, or None
    precision: str = "float32"        # the compile precision (backends/tvm/precision.py), for passes that time kernels
    # with dynamic dims: the example inputs at other sizes inside the bounds, and the original's outputs there
    variant_inputs: list = field(default_factory=list)
    variant_outputs: list = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.example_inputs, tuple):
            self.example_inputs = (self.example_inputs,)
        # the original may change its inputs in place: it runs on copies
        if self.reference_outputs is None:
            with torch.no_grad():
                self.reference_outputs = self.original(*cloned(self.example_inputs))
        if self.dynamic and not self.variant_inputs:
            self.variant_inputs = self.dynamic.variants(self.example_inputs)
            with torch.no_grad():
                self.variant_outputs = [self.original(*cloned(v)) for v in self.variant_inputs]

    def calibration_batches(self, limit: int | None = None, *, needed_by: str = "") -> list[tuple]:
        """Calibration data as a list of input tuples. Raises CalibrationError when there is none.

        Accepts an iterable of tensors, of tuples/lists of tensors, or of (inputs, label) pairs from a
        DataLoader whose first element matches the model's input count.
        """
        if self.calibration is None:
            raise CalibrationError(
                f"{needed_by or 'this pass'} needs calibration data: pass calibration=<iterable of model "
                f"inputs> to graphopt.optimize()")
        n_inputs = len(self.example_inputs)
        batches: list[tuple] = []
        for item in self.calibration:
            if isinstance(item, torch.Tensor):
                batch = (item,)
            elif isinstance(item, (tuple, list)):
                batch = tuple(item)
                if len(batch) != n_inputs and len(batch) == 2 and n_inputs == 1:
                    batch = (batch[0],)       # (input, label) from a labelled DataLoader
                    if isinstance(batch[0], (tuple, list)):
                        batch = tuple(batch[0])
            elif isinstance(item, dict):
                raise CalibrationError("calibration items must be tensors or tuples of tensors, got a dict")
            else:
                raise CalibrationError(
                    f"calibration items must be tensors or tuples of tensors, got {type(item).__name__}")
            if len(batch) != n_inputs:
                raise CalibrationError(
                    f"calibration batch has {len(batch)} inputs, the model takes {n_inputs}")
            batches.append(batch)
            if limit is not None and len(batches) >= limit:
                break
        if not batches:
            raise CalibrationError(f"{needed_by or 'this pass'} got an empty calibration iterable")
        return batches


@dataclass
class PassResult:
    """What a pass returns: the rewritten graph plus what it wants in the report.

    `details` are per-layer rows (dicts with the same keys), `notes` short sentences, e.g. what was
    left alone and why.
    """

    gm: fx.GraphModule
    changed: bool = True
    notes: list[str] = field(default_factory=list)
    details: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- passes
class Pass:
    """Base class of a graph pass. Subclasses are dataclasses; their fields are the pass's options.

    Class attributes:
      name:  set by @register_pass.
      exact: True if the pass keeps outputs equal up to float rounding; the manager checks it.
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def is_exact(self) -> bool:
        """Whether this configured instance claims exactness (may depend on options, e.g. ratio=0)."""
        return self.exact

    # --- text form
    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def non_default_options(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            value = getattr(self, f.name)
            if default is dataclasses.MISSING or value != default:
                out[f.name] = value
        return out

    def __str__(self) -> str:
        opts = self.non_default_options()
        if not opts:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={_format_value(v)}" for k, v in opts.items()) + ")"


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(name: str, *, override: bool = False) -> Callable[[type], type]:
    """Class decorator: register a Pass subclass under `name` (turning it into a dataclass if needed).

    User passes registered from outside the package behave exactly like built-in ones.
    """
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", name):
        raise PipelineError(f"invalid pass name {name!r}: use letters, digits, '_', '-', '.'")

    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise PipelineError(f"@register_pass({name!r}) must decorate a subclass of graphopt.Pass")
        if not dataclasses.is_dataclass(cls):
            cls = dataclass(cls)
        old = _REGISTRY.get(name)
        if old is not None and not override and (old.__module__, old.__qualname__) != (
                cls.__module__, cls.__qualname__):
            raise PipelineError(
                f"pass name {name!r} is already registered by {old.__module__}.{old.__qualname__}; "
                f"pick another name or use register_pass({name!r}, override=True)")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _ensure_builtin_passes() -> None:
    from . import passes  # noqa: F401  (importing the package registers the built-in passes)


def available_passes() -> dict[str, type[Pass]]:
    _ensure_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    _ensure_builtin_passes()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PipelineError(
            f"unknown pass {name!r}; registered passes: {', '.join(sorted(_REGISTRY)) or '(none)'}") from None


def make_pass(name: str, options: dict[str, Any] | None = None) -> Pass:
    """Instantiate a registered pass, coercing option values to the declared field types."""
    cls = get_pass(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in (options or {}).items():
        if key not in fields:
            raise PipelineError(
                f"pass {name!r} has no option {key!r}; its options: "
                + (", ".join(f"{k}: {_type_name(hints.get(k))}" for k in fields) or "(none)"))
        try:
            kwargs[key] = _coerce(value, hints.get(key, Any))
        except (TypeError, ValueError) as e:
            raise PipelineError(f"pass {name!r}, option {key!r}: {e}") from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise PipelineError(f"pass {name!r}: {e}") from None


# ------------------------------------------------------------------------------------------- pipeline
class Pipeline:
    """An ordered list of configured passes. `str(p)` is its text form; `Pipeline.parse` reads it back."""

    def __init__(self, passes: Sequence[Pass] = ()):
        self.passes: list[Pass] = list(passes)

    @classmethod
    def parse(cls, text: str) -> "Pipeline":
        return cls([make_pass(n, o) for n, o in _Parser(text).parse_pipeline()])

    @classmethod
    def coerce(cls, spec: "Pipeline | str | Sequence | None") -> "Pipeline":
        """Accept a Pipeline, its text, or a list of Pass objects / texts / {"name":..., **options} dicts."""
        if spec is None:
            return cls()
        if isinstance(spec, Pipeline):
            return spec
        if isinstance(spec, str):
            return cls.parse(spec)
        if isinstance(spec, Pass):
            return cls([spec])
        out: list[Pass] = []
        for item in spec:
            if isinstance(item, Pass):
                out.append(item)
            elif isinstance(item, str):
                out.extend(cls.parse(item).passes)
            elif isinstance(item, dict):
                item = dict(item)
                if "name" not in item:
                    raise PipelineError(f"pipeline entry {item!r} has no 'name'")
                name = item.pop("name")
                opts = item.pop("options", {})
                out.append(make_pass(name, {**opts, **item}))
            else:
                raise PipelineError(f"cannot read pipeline entry {item!r} ({type(item).__name__})")
        return cls(out)

    def to_data(self) -> list[dict]:
        return [{"name": p.name, **p.non_default_options()} for p in self.passes]

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes)

    def __repr__(self) -> str:
        return f"Pipeline({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and [(p.name, p.options()) for p in self.passes] == [
            (p.name, p.options()) for p in other.passes]

    def __iter__(self):
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)


# ---- text form: name(opt=value,...),name,...   values: numbers, true/false, none, words, "quoted", [lists]
_WORD = re.compile(r"[A-Za-z0-9_.+\-*/:?]+")


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_format_value(x) for x in v) + "]"
    s = str(v)
    if _WORD.fullmatch(s) and _literal(s) is _NOT_LITERAL:
        return s
    return json.dumps(s)


_NOT_LITERAL = object()


def _literal(word: str) -> Any:
    low = word.lower()
    if low == "true":
        return True
    if low == "false":
        return False
    if low in ("none", "null"):
        return None
    if re.fullmatch(r"[+-]?\d+", word):
        return int(word)
    if re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", low):
        return float(word)
    return _NOT_LITERAL


class _Parser:
    def __init__(self, text: str):
        if not isinstance(text, str):
            raise PipelineError(f"pipeline text must be a str, got {type(text).__name__}")
        self.text, self.i = text, 0

    def error(self, msg: str) -> PipelineError:
        return PipelineError(f"{msg} at column {self.i + 1} of pipeline {self.text!r}")

    def skip_ws(self):
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.i] if self.i < len(self.text) else ""

    def expect(self, ch: str):
        if self.peek() != ch:
            raise self.error(f"expected {ch!r}")
        self.i += 1

    def name(self) -> str:
        self.skip_ws()
        m = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*").match(self.text, self.i)
        if not m:
            raise self.error("expected a name")
        self.i = m.end()
        return m.group(0)

    def value(self) -> Any:
        ch = self.peek()
        if ch == "[":
            self.i += 1
            items = []
            if self.peek() == "]":
                self.i += 1
                return items
            while True:
                items.append(self.value())
                if self.peek() == ",":
                    self.i += 1
                    continue
                self.expect("]")
                return items
        if ch in "\"'":
            end = self.i + 1
            while end < len(self.text) and self.text[end] != ch:
                end += 2 if self.text[end] == "\\" else 1
            if end >= len(self.text):
                raise self.error("unterminated string")
            raw = self.text[self.i:end + 1]
            self.i = end + 1
            return json.loads('"' + raw[1:-1].replace('"', '\\"') + '"') if ch == "'" else json.loads(raw)
        m = _WORD.match(self.text, self.i)
        if not m:
            raise self.error("expected a value")
        self.i = m.end()
        lit = _literal(m.group(0))
        return m.group(0) if lit is _NOT_LITERAL else lit

    def parse_pipeline(self) -> list[tuple[str, dict]]:
        out: list[tuple[str, dict]] = []
        if not self.peek():
            return out
        while True:
            name = self.name()
            opts: dict[str, Any] = {}
            if self.peek() == "(":
                self.i += 1
                if self.peek() != ")":
                    while True:
                        key = self.name()
                        if key in opts:
                            raise self.error(f"option {key!r} given twice")
                        self.expect("=")
                        opts[key] = self.value()
                        if self.peek() == ",":
                            self.i += 1
                            continue
                        break
                self.expect(")")
            out.append((name, opts))
            ch = self.peek()
            if not ch:
                return out
            if ch != ",":
                raise self.error("expected ',' between passes")
            self.i += 1


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any) -> Any:
    """Coerce a parsed value to a dataclass field type (int, float, bool, str, Optional, list, Literal)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError(f"{value!r} is not a {_type_name(tp)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ValueError(f"{value!r} is not one of {', '.join(map(str, args))}")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{value!r} is not a list")
        inner = args[0] if args else Any
        items = [_coerce(v, inner) for v in value]
        return tuple(items) if origin is tuple or tp is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{value!r} is not true/false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{value!r} is not an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{value!r} is not a number")
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        if value is None or isinstance(value, (list, tuple, dict)):
            raise ValueError(f"{value!r} is not a string")
        return _format_value(value)
    return value


# ------------------------------------------------------------------------------------------ manager
class PassManager:
    """Runs a pipeline over a GraphModule and instruments every pass (see module docstring)."""

    def __init__(self, pipeline: Pipeline | str | Sequence | None, *, verify: bool = True):
        self.pipeline = Pipeline.coerce(pipeline)
        self.verify = verify

    def run(self, gm: fx.GraphModule, ctx: Context):
        from .analysis.compare import compare_outputs
        from .analysis.shapes import propagate_shapes
        from .report import Report, PassRecord

        report = Report(pipeline=str(self.pipeline))
        with torch.no_grad():
            outputs = propagate_shapes(gm, ctx.example_inputs)
        report.add(PassRecord.measure("(original)", gm, compare_outputs(outputs, ctx.reference_outputs),
                                      seconds=0.0, exact=True))
        previous = outputs      # an exact pass is checked against the graph it was given
        with torch.no_grad():   # ... at the other dynamic sizes too
            variant_previous = [gm(*v) for v in ctx.variant_inputs]
        for p in self.pipeline:
            start = time.perf_counter()
            try:
                result = p.run(gm, ctx)
            except GraphoptError as e:
                if isinstance(e, PassError):
                    raise
                raise type(e)(f"pass '{p.name}': {e}") from e
            except Exception as e:  # a bug in the pass, reported with its name
                raise PassError(p.name, f"{type(e).__name__}: {e}") from e
            if not isinstance(result, PassResult):
                raise PassError(p.name, f"run() must return a PassResult, got {type(result).__name__}")
            new_gm = result.gm
            seconds = time.perf_counter() - start
            try:
                new_gm.graph.lint()
                new_gm.recompile()
                with torch.no_grad():
                    outputs = propagate_shapes(new_gm, ctx.example_inputs)
            except Exception as e:
                raise PassError(p.name, f"left a graph that does not run: {type(e).__name__}: {e}") from e
            diff = compare_outputs(outputs, ctx.reference_outputs)
            if diff.structure_error:
                raise PassError(p.name, f"changed the model's outputs: {diff.structure_error}")
            step = compare_outputs(outputs, previous)
            if self.verify and p.is_exact() and step.max_rel > ctx.exact_rtol:
                raise PassError(
                    p.name, f"is declared exact but changed the outputs: max |Δ| = {step.max_abs:.3g} "
                    f"({step.max_rel:.3g} of max |reference|, allowed {ctx.exact_rtol:g})")
            previous = outputs
            notes = list(result.notes)
            if ctx.variant_inputs:
                notes += self._check_variants(p, new_gm, ctx, diff, variant_previous)
            report.add(PassRecord.measure(str(p), new_gm, diff, seconds=seconds, exact=p.is_exact(),
                                          notes=notes, details=result.details))
            gm = new_gm
        return gm, report

    def _check_variants(self, p: Pass, gm: fx.GraphModule, ctx: Context, diff, previous: list) -> list[str]:
        """Dynamic dims: run the pass's graph at the other sizes too (ctx.variant_inputs). It must run; an
        exact pass must stay exact there against `previous` (the graph before it, at each size; updated here);
        an approximating one must not drift from the original far beyond what it showed on the inputs it was
        measured on: 4x its relative error there, plus exact_rtol, at least 0.05. An error is taken relative to
        the larger of that input's and the example's output magnitudes, so a size whose outputs are merely
        smaller, e.g. two logits of one short sentence, does not inflate the same absolute error. One input is
        a noisy measure of an approximation (quantization's error differs 4-5x between random sentences of one
        length), so a size over the example's allowance is measured again against the largest error over the
        example and up to 8 calibration batches resized to the example's sizes (when there are any) before it
        is a PassError. Returns a note with the errors seen."""
        from .analysis.compare import compare_outputs
        seen, baseline = [], None
        for i, (inputs, reference) in enumerate(zip(ctx.variant_inputs, ctx.variant_outputs)):
            shapes = ", ".join(str(tuple(x.shape)) for x in inputs if isinstance(x, torch.Tensor))
            try:
                with torch.no_grad():
                    out = gm(*inputs)
            except Exception as e:
                raise PassError(p.name, f"left a graph that fails at input shape(s) {shapes}, inside the dynamic "
                                        f"bounds: {type(e).__name__}: {e}") from e
            vd = compare_outputs(out, reference)
            if vd.structure_error:
                raise PassError(p.name, f"changed the outputs' structure at input shape(s) {shapes}: "
                                        f"{vd.structure_error}")
            allowed = ctx.exact_rtol if p.is_exact() else 4 * diff.max_rel + ctx.exact_rtol
            # an exact pass against the graph before it (as at the example shape): after an approximating pass
            # the original's outputs are no reference for exactness
            step = compare_outputs(out, previous[i])
            previous[i] = out
            if self.verify and p.is_exact() and step.max_rel > allowed:
                raise PassError(p.name, f"is declared exact but changed the outputs at input shape(s) {shapes}: "
                                        f"{step.max_rel:.3g} of max |reference| (allowed {allowed:g})")
            drift = vd.max_abs / max(vd.max_ref, diff.max_ref, 1e-12)   # diff: at the example
            if self.verify and not p.is_exact() and drift > max(allowed, 0.05):
                if baseline is None:
                    baseline = self._calibration_error(gm, ctx, diff)
                allowed = max(allowed, 4 * baseline + ctx.exact_rtol)
            if self.verify and not p.is_exact() and drift > max(allowed, 0.05):
                measured = (f"{diff.max_rel:.3g} of max |reference|" if not baseline or baseline <= diff.max_rel
                            else f"{diff.max_rel:.3g} of max |reference|; up to {baseline:.3g} on calibration data")
                raise PassError(p.name, f"is accurate at the example shape ({measured})"
                                        f" but not at input shape(s) {shapes} (max |Δ| {vd.max_abs:.3g}: {drift:.3g}"
                                        f" of the larger max |reference|, {vd.max_rel:.3g} of its own)")
            seen.append(f"{shapes}: {vd.max_rel:.2g}")
        return [f"checked at other dynamic sizes (max rel |Δ|): {'; '.join(seen)}"] if seen else []

    @staticmethod
    def _calibration_error(gm: fx.GraphModule, ctx: Context, diff, limit: int = 8) -> float:
        """The pass's largest relative error (as in _check_variants) over the example and up to `limit`
        calibration batches, each resized to the example's sizes first (a graph wrong only at other sizes must
        not raise its own allowance); the example's alone when there is no calibration data."""
        from .analysis.compare import compare_outputs
        worst = diff.max_rel
        if ctx.calibration is None:
            return worst
        try:
            batches = ctx.calibration_batches(limit)
            sizes = ctx.dynamic.sizes_of(ctx.example_inputs)
        except GraphoptError:
            return worst
        with torch.no_grad():
            for batch in batches:
                try:
                    batch = ctx.dynamic.resize(batch, sizes)
                    ref, out = ctx.original(*batch), gm(*batch)
                except Exception:       # a batch that cannot take the example's sizes is no measure
                    continue
                d = compare_outputs(out, ref)
                if not d.structure_error:
                    worst = max(worst, d.max_abs / max(d.max_ref, diff.max_ref, 1e-12))
        return worst
