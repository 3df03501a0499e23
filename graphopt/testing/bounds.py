"""Out-of-bounds accesses a compiled kernel makes whatever its inputs' values: a static check of TIR.

`eager_out_of_bounds(func, target)` lowers a scheduled TIR PrimFunc through TVM's block lowering and simplifier
(what every build runs before code generation) and bounds the index of every buffer access that is always
evaluated: code under an `if` and the branches of `if_then_else` (both lazy) are skipped, the operands of a
`Select` (both evaluated) are not. An access counts as out of bounds when its first or last element, over all
values of the enclosing loop variables, falls outside the buffer's memory (flat offsets: a vector load over
the last index may run on into the next rows, as `vload` does). Indices read from memory (a `take` of token
ids) are unbounded here; graphopt checks those at call time (InputError), so they are reported apart. Buffers
of symbolic (dynamic) shape are not checked: TVM's analyzer proves too few of their accesses in bounds (a
prototype flagged most reads of the fixed dynamic softmax, e.g. x[i, 8 * ko + l] for ko < n // 8).

Why: a Select's both sides are evaluated, and TIR's simplifier uses its condition inside each side, so a read
guarded by `Select(i < n, x[min(i, n - 1)], 0)` becomes `x[i]`, out of bounds for i >= n. LLVM may then
bound a loop's trip count by such a read (the softmax kernel dropped its rows' tails on AVX-512 that way).
TVM's own `OOBChecker` also flags guarded accesses (tail tiles under `if`), so it cannot audit whole builds.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Access", "eager_out_of_bounds", "lower_module", "lowered"]

# attributes holding the children of the TIR nodes visited generically (everything but the node kinds handled
# explicitly in _Walker.visit)
_CHILDREN = ("seq", "body", "value", "a", "b", "args", "condition", "true_value", "false_value", "base", "stride",
             "extent", "min", "indices")


@dataclass(frozen=True)
class Access:
    """An access whose flat element range [first, last] leaves its buffer of `size` elements; `data_dependent`
    when an index reads memory (no static bound)."""
    kind: str
    buffer: str
    indices: str
    first: int
    last: int
    size: int
    data_dependent: bool

    def __str__(self) -> str:
        where = "data-dependent index" if self.data_dependent else f"elements [{self.first}, {self.last}]"
        return f"{self.kind} {self.buffer}[{self.indices}]: {where}, buffer of {self.size}"


def lower_module(mod, target):
    """The TIR functions of `mod` after TVM's block lowering and simplification (before buffers are flattened)."""
    import tvm
    import tvm.s_tir

    s_tir, tirx = tvm.s_tir.transform, tvm.tirx.transform
    passes = [s_tir.LowerInitBlock(), s_tir.PlanAndUpdateBufferAllocationLocation(), s_tir.ConvertBlocksToOpaque(),
              s_tir.CompactBufferAllocation(), s_tir.LowerMatchBuffer(), s_tir.LowerOpaqueBlock(),
              tirx.StmtSimplify()]
    with tvm.target.Target(target):
        return tvm.ir.transform.Sequential(passes)(mod)


def lowered(func, target):
    """PrimFunc `func` lowered as lower_module does."""
    import tvm

    return lower_module(tvm.IRModule({"main": func}), target)["main"]


def eager_out_of_bounds(func, target) -> list[Access]:
    """The always-evaluated accesses of scheduled PrimFunc `func` that can leave their buffer (module docstring)."""
    walker = _Walker()
    walker.visit(lowered(func, target).body)
    return walker.found


class _Walker:
    def __init__(self):
        from tvm.sym.analyzer import Analyzer

        self.analyzer = Analyzer()
        self.found: list[Access] = []
        self.data_vars: set = set()                    # variables whose values are read from memory

    def visit(self, n) -> None:
        import tvm
        from tvm import ir

        if n is None:
            return
        kind = type(n).__name__
        if isinstance(n, (list, tuple)) or kind == "Array":
            for x in n:
                self.visit(x)
            return
        if kind == "For":
            self.visit(n.min)
            self.visit(n.extent)
            if hasattr(n.extent, "value") and int(n.extent) <= 0:
                return                                 # an empty loop (a tail of no iterations)
            if _reads_memory(n.min, self.data_vars) or _reads_memory(n.extent, self.data_vars):
                self.data_vars.add(n.loop_var)         # a sparse row's range, read from its index pointers
            else:
                self.analyzer.bind(n.loop_var, ir.Range.from_min_extent(n.min, n.extent))
            self.visit(n.body)
            return
        if kind == "IfThenElse":                       # lazy branches
            self.visit(n.condition)
            return
        if kind == "Call" and getattr(n.op, "name", "") == "prim.if_then_else":
            self.visit(n.args[0])
            return
        if kind in ("LetStmt", "Let"):
            self.visit(n.value)
            if _reads_memory(n.value, self.data_vars):
                self.data_vars.add(n.var)
            else:
                self.analyzer.bind(n.var, n.value)
            self.visit(n.body)
            return
        if kind == "BufferStore":
            self._check("store", n.buffer, n.indices)
        elif kind in ("TensorLoad", "BufferLoad"):
            self._check("load", n.source if hasattr(n, "source") else n.buffer, n.indices)
        for name in _CHILDREN:
            child = getattr(n, name, None)
            if isinstance(child, (tvm.runtime.Object, list, tuple)):
                self.visit(child)

    def _bounds(self, e) -> tuple[int, int] | None:
        if _reads_memory(e, self.data_vars):
            return None
        b = self.analyzer.const_int_bound(e)
        return int(b.min_value), int(b.max_value)

    def _check(self, kind: str, buf, indices) -> None:
        shape = list(buf.shape)
        if len(indices) != len(shape) or not all(hasattr(e, "value") for e in shape):
            return                                     # symbolic shapes: not bounded here
        dims = [int(e) for e in shape]
        size = 1
        for e in dims:
            size *= e
        first = last = 0
        stride = 1
        for d in reversed(range(len(dims))):
            idx = indices[d]
            if type(idx).__name__ == "Ramp":
                if not hasattr(idx.stride, "value"):
                    return
                b = self._bounds(idx.base)
                if b is not None:
                    step, lanes = int(idx.stride), int(idx.lanes)
                    b = (min(b[0], b[0] + step * (lanes - 1)), max(b[1], b[1] + step * (lanes - 1)))
            else:
                b = self._bounds(idx)
            text = ", ".join(str(i) for i in indices)
            if b is None:
                self.found.append(Access(kind, buf.name, text, 0, 0, size, True))
                return
            first += b[0] * stride
            last += b[1] * stride
            stride *= dims[d]
        if first < 0 or last >= size:
            self.found.append(Access(kind, buf.name, ", ".join(str(i) for i in indices), first, last, size, False))


def _reads_memory(e, data_vars=frozenset()) -> bool:
    """Whether expression `e` loads from a buffer or uses a variable in `data_vars` (its value is data, not a
    function of loop variables)."""
    stack = [e]
    while stack:
        n = stack.pop()
        if type(n).__name__ in ("TensorLoad", "BufferLoad") or any(n.same_as(v) for v in data_vars):
            return True
        for name in ("a", "b", "value", "args", "base", "condition", "true_value", "false_value", "indices"):
            child = getattr(n, name, None)
            if child is None:
                continue
            if isinstance(child, (list, tuple)) or type(child).__name__ == "Array":
                stack.extend(child)
            elif type(child).__module__.startswith("tvm"):
                stack.append(child)
    return False
