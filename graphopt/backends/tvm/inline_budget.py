"""How big a kernel's expressions get when its elementwise blocks are inlined, and which blocks to keep.

`compute_inline` substitutes a producer's whole expression at every place its consumer reads it. TVM legalizes
`fast_exp`, `fast_tanh`, softplus (`where(x > t, x, log(1 + exp(x)))`), `erf` and friends into blocks that read
their input several times (fast_exp's polynomial re-derives its reduced argument ~7 times), so inlining a chain
of them multiplies: mish (x * tanh(softplus(x))) -> residual add -> gelu_tanh in one fused kernel became one
14.8 MB expression (~10^6 nodes), which TVM's TIR passes walk as a tree: 95 s of lowering for a 10x10 image.

`plan_inlining` decides, in block order, which blocks to inline so that no expression grows past `BUDGET` nodes:
a block is inlined when its own expanded size times the number of times its consumers read it stays within the
budget; otherwise it keeps its buffer (computed once, read by its consumers), which is also what a CSE would
have made of it. The estimate counts the nodes of each block's stored value with every read of an inlined
producer replaced by that producer's (expanded) expression. Results are unchanged: inlining or not, each
element is the same arithmetic.
"""
from __future__ import annotations

__all__ = ["BUDGET", "block_expr_stats", "plan_inlining", "expanded_size"]

# Expression nodes (leaves included) one block may reach after inlining. Every fused kernel of the torchvision
# classifiers and transformer blocks stays far below it; a chain of three or more transcendental activations
# without it grows past 10^5.
BUDGET = 4096


def _buffer_key(buf) -> str:
    return str(buf.name)


def block_expr_stats(stmt) -> tuple[int, dict[str, int]]:
    """(expression nodes, {buffer name: reads}) of a block body (its stored value and indices)."""
    import tvm
    import tvm_ffi

    expr_type = tvm.ir.expr.Expr
    count = [0]
    loads: dict[str, int] = {}

    def visit(v):
        if isinstance(v, expr_type):
            count[0] += 1
            if type(v).__name__ in ("TensorLoad", "BufferLoad"):
                src = getattr(v, "source", None)
                if src is None:
                    src = getattr(v, "buffer", None)
                if src is not None:
                    key = _buffer_key(src)
                    loads[key] = loads.get(key, 0) + 1

    tvm_ffi.structural_walk(stmt, visit)
    return count[0], loads


def _writes(sch, block) -> list[str]:
    return [_buffer_key(w.source) for w in sch.get(block).writes]


def plan_inlining(sch, blocks: list, candidates: list, budget: int = BUDGET) -> tuple[list, dict[str, int]]:
    """Which of `candidates` (a subset of `blocks`, in the schedule `sch`) to inline.

    `blocks` in program order (producers first). Returns (blocks to inline, {written buffer: expanded size}).
    A candidate is inlined when its expanded size times the reads of its buffer by the other blocks is within
    `budget`."""
    stats = [block_expr_stats(sch.get(b).body) for b in blocks]
    reads: dict[str, int] = {}
    for _, loads in stats:
        for k, n in loads.items():
            reads[k] = reads.get(k, 0) + n
    inlined: dict[str, int] = {}          # buffer written by an inlined block -> its expanded size
    sizes: dict[str, int] = {}
    chosen = []
    for b, (own, loads) in zip(blocks, stats):
        size = own + sum(n * (inlined[k] - 1) for k, n in loads.items() if k in inlined)
        outs = _writes(sch, b)
        for k in outs:
            sizes[k] = size
        stmt = sch.get(b)
        if any(stmt.same_as(sch.get(c)) for c in candidates) and len(outs) == 1:
            if size * max(reads.get(outs[0], 0), 1) <= budget:
                inlined[outs[0]] = size
                chosen.append(b)
    return chosen, sizes


def expanded_size(sch, blocks: list, candidates: list) -> int:
    """The largest expression any block would hold if every one of `candidates` were inlined."""
    _, sizes = plan_inlining(sch, blocks, candidates, budget=1 << 62)
    return max(sizes.values(), default=0)
