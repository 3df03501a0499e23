"""Dynamic dimensions: which input dims may vary at run time, their bounds, and what depends on them.

    optimize(model, example_inputs=(ids, mask), dynamic={"batch": (1, 32), "seq": (8, 512)})
    optimize(model, example_inputs=(ids,), dynamic={"input_ids": {0: "batch", 1: "seq"},
                                                    "batch": (1, 32), "seq": (8, 512)})
    optimize(model, example_inputs=(x,), dynamic={"x": {0: torch.export.Dim("batch", min=1, max=64)}})
    optimize(model, example_inputs=(x,), dynamic=({0: Dim("batch", max=64)},))   # torch.export's form

Forms of `dynamic` (a dict, or a tuple/list with one entry per input):
  - key = an input (forward() argument name or position) -> that input's dynamic axes: {axis: dim} or a
    sequence with one entry per axis (None = static). A dim is a name (its bounds given by a top-level
    entry), a torch.export `Dim`, `(min, max)` (named `<input>_<axis>`) or `(name, min, max)`.
  - key = any other name -> the bounds `(min, max)` (or a `Dim`) of the dim of that name. A named dim that
    no input entry places follows the usual convention: "batch" is axis 0 of every tensor input, "seq" /
    "sequence" / "seq_len" axis 1 of every tensor input of rank >= 2; any other unplaced name is an error.
Every dim needs an upper bound (memory is planned for it). Inputs sharing a dim name must agree at run time.

DynamicSpec is what the rest of graphopt reads: `dynamic_shapes()` for torch.export, `trace_examples()`
(example inputs with every dynamic dim at a distinct size >= 2: torch.export specializes sizes 0 and 1, and
equal sizes could be taken for the same symbol), `variants()` (the example inputs resized to other sizes inside
the bounds, for checking each pass and the compiled module), `check()` (bounds of a call: InputError naming
input, dim and bound), and a JSON form for artifacts.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .errors import DynamicShapeError, InputError

__all__ = ["DynamicSpec", "DimBound", "parse_dynamic", "DynamicShapeError"]

_CONVENTION = {"batch": 0, "seq": 1, "sequence": 1, "seq_len": 1}
_UNBOUNDED_HINT = "give every dynamic dim an upper bound, e.g. dynamic={'batch': (1, 64)}"


@dataclass(frozen=True)
class DimBound:
    name: str
    min: int
    max: int

    def to_dict(self) -> dict:
        return {"min": self.min, "max": self.max}


@dataclass
class DynamicSpec:
    """Dynamic dims of a model's inputs: {input position: {axis: dim name}} and {dim name: DimBound}."""

    axes: dict[int, dict[int, str]]
    dims: dict[str, DimBound]
    input_names: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------------------------------ queries
    def __bool__(self) -> bool:
        return bool(self.axes)

    def input_name(self, i: int) -> str:
        return self.input_names[i] if i < len(self.input_names) and self.input_names[i] else f"input {i}"

    def dim_of(self, i: int, axis: int) -> str | None:
        return self.axes.get(i, {}).get(axis)

    def dynamic_shapes(self, n_inputs: int) -> tuple:
        """torch.export's dynamic_shapes: one {axis: Dim} (or None) per input, Dims shared by name."""
        from torch.export import Dim

        made = {name: Dim(_identifier(name), min=b.min, max=b.max) for name, b in self.dims.items()}
        return tuple({a: made[n] for a, n in self.axes[i].items()} if i in self.axes else None
                     for i in range(n_inputs))

    # ---------------------------------------------------------------------------------------- examples
    def sizes_of(self, example_inputs: Sequence) -> dict[str, int]:
        """The size each dim has in `example_inputs`; InputError when inputs sharing a dim disagree."""
        sizes: dict[str, int] = {}
        for i, axes in self.axes.items():
            x = example_inputs[i]
            for a, n in axes.items():
                s = int(x.shape[a])
                if sizes.setdefault(n, s) != s:
                    raise DynamicShapeError(f"dim '{n}' is {sizes[n]} in one example input and {s} in "
                                            f"{self.input_name(i)} (axis {a}): inputs sharing a dim must agree")
        return sizes

    def resize(self, example_inputs: Sequence, sizes: dict[str, int]) -> tuple:
        """The example inputs with each dynamic dim set to `sizes[name]`: rows are repeated or dropped along
        that axis (so integer inputs stay valid indices / masks)."""
        out = []
        for i, x in enumerate(example_inputs):
            for a, n in self.axes.get(i, {}).items():
                x = _resize_axis(x, a, sizes[n])
            out.append(x)
        return tuple(out)

    def trace_examples(self, example_inputs: Sequence) -> tuple:
        """Example inputs for torch.export: each dynamic dim at a size >= 2, distinct from every other dynamic
        dim's size and from the inputs' static sizes (torch.export specializes 0/1 and may merge equal sizes)."""
        sizes = self.sizes_of(example_inputs)
        static = {int(s) for i, x in enumerate(example_inputs) if isinstance(x, torch.Tensor)
                  for a, s in enumerate(x.shape) if a not in self.axes.get(i, {})}
        used: set[int] = set()
        chosen: dict[str, int] = {}
        for name, b in self.dims.items():
            want = sizes.get(name, max(b.min, 2))
            candidates = [want] + list(range(max(2, b.min), b.max + 1))
            pick = next((c for c in candidates if 2 <= c <= b.max and c >= b.min and c not in used
                         and c not in static), None)
            if pick is None:
                pick = next((c for c in candidates if 2 <= c <= b.max and c >= b.min and c not in used), None)
            if pick is None:
                raise DynamicShapeError(f"dim '{name}' has bounds {b.min}..{b.max}: a dynamic dim needs room for "
                                        f"a size >= 2 (torch.export specializes sizes 0 and 1)")
            used.add(pick)
            chosen[name] = pick
        return self.resize(example_inputs, chosen)

    def variants(self, example_inputs: Sequence, count: int = 2) -> list[tuple]:
        """Up to `count` copies of the example inputs at other sizes inside the bounds: every dim at its lower
        bound, then at example + example//2 + 1 (an odd size: exercises tails), capped at the upper bound."""
        base = self.sizes_of(example_inputs)
        plans = [{n: b.min for n, b in self.dims.items()},
                 {n: min(b.max, base.get(n, b.min) + base.get(n, b.min) // 2 + 1) for n, b in self.dims.items()}]
        out, seen = [], {tuple(sorted(base.items()))}
        for plan in plans[:count]:
            key = tuple(sorted(plan.items()))
            if key in seen:
                continue
            seen.add(key)
            out.append(self.resize(example_inputs, plan))
        return out

    # ------------------------------------------------------------------------------------------- calls
    def check(self, args: Sequence, names: Sequence[str] | None = None) -> dict[str, int]:
        """InputError unless every dynamic dim of `args` is inside its bounds and dims shared by inputs agree.
        Returns {dim name: size}."""
        seen: dict[str, tuple[int, int, int]] = {}
        for i, axes in self.axes.items():
            if i >= len(args) or not isinstance(args[i], torch.Tensor):
                continue
            x = args[i]
            label = (names[i] if names and i < len(names) and names[i] else self.input_name(i))
            for a, n in axes.items():
                if a >= x.dim():
                    continue            # rank mismatches are reported by the caller's signature check
                s = int(x.shape[a])
                b = self.dims[n]
                if not b.min <= s <= b.max:
                    raise InputError(f"input {i} ('{label}') dim {a} ('{n}') is {s}, outside its bounds "
                                     f"{b.min}..{b.max} (compiled with dynamic {n} in [{b.min}, {b.max}]; "
                                     f"shape {tuple(x.shape)})")
                if n in seen and seen[n][0] != s:
                    j, aj = seen[n][1], seen[n][2]
                    raise InputError(f"input {i} ('{label}') dim {a} ('{n}') is {s} but input {j} dim {aj} "
                                     f"('{n}') is {seen[n][0]}: inputs sharing dim '{n}' must agree")
                seen.setdefault(n, (s, i, a))
        return {n: v[0] for n, v in seen.items()}

    # -------------------------------------------------------------------------------------------- json
    def to_dict(self) -> dict:
        return {"dims": {n: b.to_dict() for n, b in self.dims.items()},
                "axes": {str(i): {str(a): n for a, n in axes.items()} for i, axes in self.axes.items()},
                "input_names": list(self.input_names)}

    @classmethod
    def from_dict(cls, d: dict) -> "DynamicSpec":
        dims = {n: DimBound(n, int(b["min"]), int(b["max"])) for n, b in d["dims"].items()}
        axes = {int(i): {int(a): str(n) for a, n in ax.items()} for i, ax in d["axes"].items()}
        return cls(axes, dims, [str(s) for s in d.get("input_names", [])])

    def describe(self) -> str:
        dims = ", ".join(f"{n} in [{b.min}, {b.max}]" for n, b in self.dims.items())
        where = "; ".join(f"{self.input_name(i)}: " + ", ".join(f"axis {a}={n}" for a, n in sorted(ax.items()))
                          for i, ax in sorted(self.axes.items()))
        return f"{dims} ({where})"


# ---------------------------------------------------------------------------------------------- parsing
def _identifier(name: str) -> str:
    out = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)
    return out if out and not out[0].isdigit() else f"d_{out}"


def _is_torch_dim(x: Any) -> bool:
    try:
        from torch.export.dynamic_shapes import Dim as _TorchDim
    except ImportError:                                         # pragma: no cover - old torch
        return False
    return isinstance(x, _TorchDim) or (isinstance(x, type) and hasattr(x, "min") and hasattr(x, "max")
                                        and hasattr(x, "__name__"))


def _bounds(value: Any, name: str) -> tuple[int, int]:
    if _is_torch_dim(value):
        lo, hi = getattr(value, "min", None), getattr(value, "max", None)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        lo, hi = value
    else:
        raise DynamicShapeError(f"dynamic dim '{name}': bounds must be (min, max) or a torch.export Dim, got "
                                f"{value!r}")
    try:
        lo = 1 if lo is None else int(lo)
    except Exception:                                 # noqa: BLE001 - reported below
        raise DynamicShapeError(f"dynamic dim '{name}': lower bound {lo!r} is not an integer") from None
    try:
        hi_i = None if hi is None else int(hi)
    except Exception:                                 # torch's int_oo (a Dim without max) does not convert
        hi_i = None
    if hi_i is None or hi_i > 1 << 40:
        raise DynamicShapeError(f"dynamic dim '{name}' has no upper bound: {_UNBOUNDED_HINT}")
    if lo < 0 or hi_i < lo:
        raise DynamicShapeError(f"dynamic dim '{name}': bounds {lo}..{hi_i} are not a range (0 <= min <= max)")
    return lo, hi_i


def _input_names(model: Any, n_inputs: int) -> list[str]:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError, AttributeError):
        return [""] * n_inputs
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return (names + [""] * n_inputs)[:n_inputs]


def parse_dynamic(dynamic: Any, example_inputs: Sequence, model: Any = None) -> DynamicSpec | None:
    """The DynamicSpec of `dynamic` (see the module docstring) for these example inputs, or None if empty.

    Raises DynamicShapeError naming the offending entry."""
    if dynamic is None or (hasattr(dynamic, "__len__") and len(dynamic) == 0):
        return None
    n = len(example_inputs)
    names = _input_names(model, n) if model is not None else [""] * n
    dims: dict[str, DimBound] = {}
    axes: dict[int, dict[int, str]] = {}
    per_input: dict[int, Any] = {}
    named: dict[str, Any] = {}

    if isinstance(dynamic, (tuple, list)):
        if len(dynamic) != n:
            raise DynamicShapeError(f"dynamic= as a sequence needs one entry per input ({n}), got {len(dynamic)}")
        per_input = {i: d for i, d in enumerate(dynamic) if d}
    elif isinstance(dynamic, dict):
        for key, value in dynamic.items():
            if isinstance(key, int) and not isinstance(key, bool):
                if not 0 <= key < n:
                    raise DynamicShapeError(f"dynamic= names input {key}, but the model takes {n} input(s)")
                per_input[key] = value
            elif isinstance(key, str) and key in names:
                per_input[names.index(key)] = value
            elif isinstance(key, str):
                named[key] = value
            else:
                raise DynamicShapeError(f"dynamic= key {key!r}: use an input name/position or a dim name")
    else:
        raise DynamicShapeError(f"dynamic= must be a dict or a sequence (one entry per input), got "
                                f"{type(dynamic).__name__}")

    for name, value in named.items():
        if isinstance(value, dict):
            raise DynamicShapeError(f"dynamic= key '{name}' is neither an input of the model ({', '.join(n_ for n_ in names if n_) or 'unnamed'}) nor a dim (a dim takes (min, max))")
        lo, hi = _bounds(value, name)
        dims[name] = DimBound(name, lo, hi)

    def place(i: int, axis: int, spec: Any) -> None:
        x = example_inputs[i]
        label = names[i] or f"input {i}"
        if not isinstance(x, torch.Tensor):
            raise DynamicShapeError(f"dynamic= marks {label} ({type(x).__name__}), which is not a tensor")
        if not -x.dim() <= axis < x.dim():
            raise DynamicShapeError(f"dynamic= marks axis {axis} of {label}, which has {x.dim()} dims "
                                    f"(shape {tuple(x.shape)})")
        axis %= x.dim()
        if spec is None:
            return
        if isinstance(spec, str):
            if spec not in dims:
                if spec not in named:
                    raise DynamicShapeError(f"dynamic= puts dim '{spec}' on {label} axis {axis} but gives it no "
                                            f"bounds: add '{spec}': (min, max)")
            name = spec
        elif _is_torch_dim(spec):
            name = spec.__name__
            lo, hi = _bounds(spec, name)
            old = dims.get(name)
            if old is not None and (old.min, old.max) != (lo, hi):
                raise DynamicShapeError(f"dim '{name}' has bounds {old.min}..{old.max} and {lo}..{hi}")
            dims[name] = DimBound(name, lo, hi)
        elif isinstance(spec, (tuple, list)) and len(spec) == 3 and isinstance(spec[0], str):
            name = spec[0]
            lo, hi = _bounds(tuple(spec[1:]), name)
            dims[name] = DimBound(name, lo, hi)
        elif isinstance(spec, (tuple, list)) and len(spec) == 2:
            name = f"{names[i] or f'input{i}'}_{axis}"
            lo, hi = _bounds(spec, name)
            dims[name] = DimBound(name, lo, hi)
        else:
            raise DynamicShapeError(f"dynamic= entry for {label} axis {axis}: {spec!r} is not a dim name, a "
                                    f"torch.export Dim, (min, max) or (name, min, max)")
        axes.setdefault(i, {})[axis] = name

    for i, value in per_input.items():
        if isinstance(value, dict):
            for axis, spec in value.items():
                if not isinstance(axis, int):
                    raise DynamicShapeError(f"dynamic= entry for {names[i] or f'input {i}'}: axis {axis!r} "
                                            f"is not an integer")
                place(i, axis, spec)
        elif isinstance(value, (tuple, list)):
            for axis, spec in enumerate(value):
                place(i, axis, spec)
        else:
            raise DynamicShapeError(f"dynamic= entry for {names[i] or f'input {i}'} must be {{axis: dim}} or a "
                                    f"sequence per axis, got {value!r}")

    placed = {name for ax in axes.values() for name in ax.values()}
    for name in dims:
        if name in placed:
            continue
        axis = _CONVENTION.get(name)
        if axis is None:
            raise DynamicShapeError(f"dim '{name}' is not placed on any input: write e.g. "
                                    f"dynamic={{'{names[0] or 0}': {{1: '{name}'}}, '{name}': "
                                    f"({dims[name].min}, {dims[name].max})}} (only 'batch' = axis 0 and 'seq' = "
                                    f"axis 1 are placed by convention)")
        for i, x in enumerate(example_inputs):
            if isinstance(x, torch.Tensor) and x.dim() > axis and axis not in axes.get(i, {}):
                axes.setdefault(i, {})[axis] = name
    unused = [name for name in dims if not any(name in ax.values() for ax in axes.values())]
    if unused:
        raise DynamicShapeError(f"dim(s) {', '.join(unused)} fit no input (no tensor input has that axis)")
    if not axes:
        return None
    spec = DynamicSpec(axes, dims, names)
    sizes = spec.sizes_of(example_inputs)
    for name, s in sizes.items():
        b = dims[name]
        if not b.min <= s <= b.max:
            raise DynamicShapeError(f"the example inputs have dim '{name}' = {s}, outside its bounds "
                                    f"{b.min}..{b.max}")
    return spec


def _resize_axis(x: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    cur = int(x.shape[axis])
    if cur == size:
        return x
    if cur == 0:
        raise DynamicShapeError(f"cannot grow an empty example along axis {axis}: give a non-empty example")
    if size < cur:
        return x.narrow(axis, 0, size).contiguous()
    reps = [1] * x.dim()
    reps[axis] = -(-size // cur)
    return x.repeat(*reps).narrow(axis, 0, size).contiguous()


# ------------------------------------------------------------------------------------------ export errors
def export_dynamic(model: torch.nn.Module, spec: DynamicSpec, example_inputs: Sequence, what: str = ""):
    """torch.export `model` with the dynamic dims of `spec` (on trace_examples). Raises DynamicShapeError
    naming the dim, the source line and op that made it static (or branched on data) when export fails."""
    examples = spec.trace_examples(example_inputs)
    shapes = spec.dynamic_shapes(len(examples))
    try:
        with torch.no_grad():
            return torch.export.export(model, tuple(examples), dynamic_shapes=shapes, strict=False)
    except Exception as e:
        raise DynamicShapeError(explain_export_failure(model, examples, shapes, e, spec, what)) from e


def _first_line(text: str, limit: int = 300) -> str:
    text = str(text).strip()
    line = text.splitlines()[0] if text else text
    return line if len(line) <= limit else line[:limit] + "..."


def _symbol_names(spec: DynamicSpec, sources: dict) -> dict[str, str]:
    """{torch symbol: 'dim (input x axis a)'} from a draft_export failure's symbol_to_sources."""
    import re

    out = {}
    for sym, src in (sources or {}).items():
        m = re.search(r"L\['([^']+)'\]\.size\(\)\[(\d+)\]", str(src))
        if not m:
            continue
        arg, axis = m.group(1), int(m.group(2))
        i = spec.input_names.index(arg) if arg in spec.input_names else None
        if i is None and arg.startswith("args"):
            digits = "".join(ch for ch in arg if ch.isdigit())
            i = int(digits) if digits else None
        dim = spec.dim_of(i, axis) if i is not None else None
        out[sym] = f"{dim}" if dim else f"{arg}.size({axis})"
    return out


def explain_export_failure(model, examples, shapes, error: Exception, spec: DynamicSpec, what: str = "") -> str:
    """One message for a failed dynamic export: which dim, where in the model's code, which op/line.

    torch's own message says which dim was specialized but not where; torch.export.draft_export records the
    guard or data-dependent expression with the user's source line, which is what we report."""
    import re

    head = f"{what or type(model).__name__}: "
    torch_msg = _first_line(getattr(error, "msg", None) or str(error))
    detail = " ".join(ln.strip() for ln in str(error).splitlines()[1:3] if ln.strip().startswith("-"))
    found = []
    try:
        import logging
        import warnings

        logging.disable(logging.WARNING)
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                report = torch.export.draft_export(model, tuple(examples), dynamic_shapes=shapes,
                                                   strict=False)._report
        finally:
            logging.disable(logging.NOTSET)
        files = getattr(report, "str_to_filename", {}) or {}
        for f in report.failures:
            data = f.data if isinstance(f.data, dict) else {}
            stack = data.get("user_stack") or []
            frame = next((s for s in reversed(stack) if files.get(s.get("filename"), "").find("torch/nn/") < 0),
                         stack[-1] if stack else None)
            expr = str(data.get("expr", ""))
            for sym, label in _symbol_names(spec, data.get("symbol_to_sources") or {}).items():
                expr = re.sub(rf"\b{sym}\b", label, expr)
            kind = str(getattr(f.failure_type, "name", f.failure_type))
            where = ""
            if frame:
                fname = files.get(frame.get("filename"), str(frame.get("filename", "?")))
                where = f"in {frame.get('name', '?')} ({fname}:{frame.get('line', '?')}): `{frame.get('loc', '').strip()}`"
            op = _framework_op(data.get("stack") or [])
            if kind == "DATA_DEPENDENT_ERROR":
                found.append(f"the model branches on tensor data (`{expr}`) {where}; op aten.item / bool(tensor)"
                             f" — data-dependent control flow cannot be captured for any shape")
            elif kind == "GUARD_ADDED":
                found.append(f"guard `{expr}` {where}" + (f" (op {op})" if op else ""))
            else:
                found.append(f"{kind.lower()} `{expr}` {where}")
    except Exception:                     # draft_export itself failed: torch's message is all we have
        pass
    if isinstance(error, torch.fx.experimental.symbolic_shapes.GuardOnDataDependentSymNode) and not found:
        found.append(f"data-dependent control flow: {torch_msg}")
    dims = re.findall(r"Constraints violated \(([^)]*)\)", str(error))
    lead = (f"dim(s) {dims[0]} cannot be dynamic" if dims else "the model cannot be exported with dynamic dims")
    msg = head + lead + f" ({spec.describe()})"
    if detail:
        msg += f": {detail.lstrip('- ').strip()}"
    elif not found:
        msg += f": {type(error).__name__}: {torch_msg}"
    if found:
        msg += "; found: " + "; ".join(found[:3])
    return msg


def _framework_op(stack: list) -> str:
    """The torch function a guard came from (reshape/view/expand...), from draft_export's framework stack."""
    names = [s.get("name", "") for s in stack]
    for n in names:
        n2 = n.strip("_")
        for op in ("reshape", "view", "expand", "narrow", "slice", "split", "repeat", "index", "cat", "arange",
                   "pad", "interpolate", "unflatten", "flatten"):
            if op in n2:
                return n2
    return ""
