"""Default CPU schedules: what makes untuned graphopt code fast on an LLVM CPU target.

TVM 0.27 schedules nothing on CPU by default: after LegalizeOps every conv/matmul is a naive scalar loop nest
(ResNet-18 ~100x slower than PyTorch). dlight's CPU rules cover only GEMV and row reductions. This module adds:

  relax_layout_passes(target)   before legalization: conv2d in NHWC activations / HWIO weights (channels
                                innermost, so the output-channel axis is contiguous and vectorizes); pooling
                                follows the layout (ConvertLayout propagates it), transposes stay at the edges;
                                4-D batched matmuls kept 4-D (batch_matmul_views.py); the float32 last-axis
                                softmax as graphopt's kernel (softmax_lower.py); attention and inverted
                                residual blocks as one hand-written kernel each (fused_attention.py,
                                fused_inverted_residual.py).
  PackedGemm                    every kernel with one reduction block whose output's innermost axis is a
                                spatial axis: conv2d (incl. 1x1, strided, grouped/depthwise), dense/matmul,
                                batch matmul, pooling (channels-last max pooling: WindowMax first), spatial
                                means. Register-tiled micro-kernel: a tile of `rows` output rows x `nvec`
                                SIMD vectors of accumulators kept in registers (a < 1 KiB stack buffer,
                                unrolled), the reduction loops around it, the fused
                                elementwise epilogue (bias, residual add, ReLU, ...) applied when a tile is
                                written back, parallel over the outer tiles. Constant weights (relax
                                constants, `layout_free_buffers`) are repacked into contiguous panels
                                [N/tile, ..., tile] (a layout-rewrite block that `finalize_passes` splits out
                                of the kernel and FoldConstant evaluates at build time: no run-time cost).
  WindowMax (pool_schedule.py)  max pooling, channels last: one output pixel's channels per register tile.
  DynamicRows                   row reductions over a dynamic extent RowGroups declines: one pass per block
                                over the whole tensor, vector tails partitioned off.
  RowGroups                     row reductions (layer norm, softmax, means) over a static or dynamic row
                                length and row count: groups of rows at a time, one accumulation chain per row
                                interleaved (latency hidden, order kept).
  dlight.cpu.Reduction          the row reductions RowGroups leaves (one row, odd counts): TVM's rule.
  ScalarMinMax                  whole-tensor max / min to one value: SIMD running extrema (rfactor), exact.
  Injective                     everything else without a reduction (elementwise, transpose, reshape,
                                layout transforms, padding): parallel outer loop, vectorized inner loop.

Contract: every rule only reorders/tiles/vectorizes loops and changes buffer layouts of temporaries and
constants; the arithmetic of each output element is the same expression in the same reduction order (no
reassociation; ScalarMinMax regroups a max/min, which is exact), so results equal the unscheduled kernel's bit for bit, up to LLVM contracting a*b+c into one
FMA (one rounding less: within float32 rounding of the reference). A rule that cannot handle a kernel returns
None and the next rule is tried; a kernel no rule takes stays unscheduled (correct, slow) and is counted in
the statistics `apply_default_schedules` returns. Kernels already marked `tirx.is_scheduled` (graphopt's
hand-written int8 kernels, MetaSchedule-tuned kernels) are left alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .inline_budget import BUDGET, expanded_size, plan_inlining
from .inplace_rowwise import ROWWISE_ATTR, WHOLE_ROWS_ATTR
from .parallel_guard import PARALLEL_MIN, SERIAL_BELOW_ATTR
from .unchecked_schedule import schedule as unchecked_schedule

# a short-vector injective kernel keeps its last outer loop serial where this many parallel tasks remain
_SHORT_VECTOR_TASKS = 64

__all__ = ["CpuVector", "cpu_vector", "PackedGemm", "DynamicRows", "RowGroups", "ScalarMinMax", "Injective",
           "default_rules", "relax_layout_passes",
           "nhwc_layout_passes", "legalize_passes", "apply_default_schedules", "finalize_passes", "ScheduleStats"]


# ----------------------------------------------------------------------------------------- target facts
@dataclass(frozen=True)
class CpuVector:
    """SIMD facts of an LLVM CPU target that the micro-kernel shapes depend on."""

    bytes: int          # SIMD register width in bytes (64 AVX-512, 32 AVX2, 16 SSE/NEON)
    registers: int      # architectural SIMD registers (32 with AVX-512 or AArch64, else 16)

    def lanes(self, dtype: str) -> int:
        bits = _dtype_bits(dtype)
        return max(1, self.bytes * 8 // bits)

    @property
    def fmas_in_flight(self) -> int:
        """Independent accumulators that keep the FMA units busy (latency x ports): 5 x 2 on AVX2 cores
        (Haswell to Zen 3), 4 x 2 with AVX-512 (Skylake-SP, Zen 4) and on NEON cores (Neoverse N1)."""
        return 10 if self.bytes == 32 else 8


def _row_bytes(ext: list, reduce_: list, dtype: str) -> int | None:
    """Bytes of one output row's operand (the reduction's extents x the element size), None where dynamic."""
    if any(ext[i] is None for i in reduce_):
        return None
    return _dtype_bits(dtype) // 8 * math.prod(ext[i] for i in reduce_)


def _dtype_bits(dtype: Any) -> int:
    text = str(dtype)
    digits = "".join(ch for ch in text if ch.isdigit())
    return int(digits) if digits else 32


_CPU_VECTORS: dict[str, CpuVector] = {}


def cpu_vector(target) -> CpuVector:
    """SIMD width and register count of `target` (a tvm.target.Target of kind llvm); asked for every kernel,
    so kept per target (LLVM's feature query takes ~0.2 ms)."""
    key = str(target)
    found = _CPU_VECTORS.get(key)
    if found is None:
        found = _CPU_VECTORS[key] = _cpu_vector(target)
    return found


def _cpu_vector(target) -> CpuVector:
    from tvm.target import codegen

    def has(feature: str) -> bool:
        try:
            return bool(codegen.target_has_features(feature, target))
        except Exception:
            return False

    triple = str(target.attrs.get("mtriple", "") or "")
    if triple.startswith(("aarch64", "arm64")) or has("neon"):
        return CpuVector(16, 32)
    if has("avx512f"):
        return CpuVector(64, 32)
    if has("avx2") or has("avx"):
        return CpuVector(32, 16)
    return CpuVector(16, 16)


# ------------------------------------------------------------------------------------------ TIR helpers
def _merge_axes_map(ndim: int, k: int, width: int):
    """IndexMap merging axes k and k+1 (rows, width) of an ndim-axis space into one: (.., h, w, ..) ->
    (.., h * width + w, ..)."""
    from tvm import tirx

    def fmap(*a):
        return [*a[:k], a[k] * width + a[k + 1], *a[k + 2:]]

    return tirx.IndexMap.from_func(fmap, ndim=ndim)


def _root_blocks(sch):
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _is_reduction_block(sch, block) -> bool:
    from tvm import tirx

    return any(int(iv.iter_type) == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _one_reduction_block(sch):
    """(root blocks, the only reduction block among them), or None when there is not exactly one."""
    blocks = _root_blocks(sch)
    mains = [b for b in blocks if _is_reduction_block(sch, b)]
    return (blocks, mains[0]) if len(mains) == 1 else None


def _int(x) -> int | None:
    try:
        return int(x)
    except Exception:
        return None


def _extent(sch, loop) -> int | None:
    return _int(sch.get(loop).extent)


def _same(a, b) -> bool:
    return a.same_as(b)


def _loops_are_iters(sch, block) -> bool:
    """Whether the block's loop nest is one loop per block iter var, in order, with the same extents
    (what LegalizeOps/te.create_prim_func produce; the tiling below relies on it)."""
    loops = sch.get_loops(block)
    ivs = sch.get(block).iter_vars
    if len(loops) != len(ivs):
        return False
    for loop, iv in zip(loops, ivs):
        e, d = _extent(sch, loop), _int(iv.dom.extent)
        if e is None and d is None:            # symbolic extents (dynamic dims): the same expression
            if not _same_expr(sch.get(loop).extent, iv.dom.extent):
                return False
            continue
        if e is None or d is None or e != d:
            return False
    return True


def _same_expr(a, b) -> bool:
    if a.same_as(b):
        return True
    from tvm.sym.analyzer import Analyzer

    try:
        return bool(Analyzer().can_prove_equal(a, b))
    except Exception:
        return False


def _vectorize_inner(sch, block, lanes: int, parallel_min: int = PARALLEL_MIN) -> None:
    """Injective block: vectorize the innermost loop (split to `lanes` when it divides, else to its largest
    power-of-two divisor below `lanes` when that is at least 4), fuse the outer loops and run them in
    parallel when the block is large enough to pay for the fork."""
    loops = sch.get_loops(block)
    if not loops:
        return
    extents = [_extent(sch, lp) for lp in loops]
    if any(e is None for e in extents):
        _vectorize_symbolic(sch, loops, extents, lanes, parallel_min, _picks_at_symbolic_offset(sch, block))
        return
    inner = loops[-1]
    outer = list(loops[:-1])
    if extents[-1] % lanes == 0 and extents[-1] > lanes:
        lo, li = sch.split(inner, [None, lanes])
        sch.vectorize(li)
        outer.append(lo)
    elif 1 < extents[-1] <= lanes:
        sch.vectorize(inner)
        if len(outer) >= 2 and extents[-1] < lanes and math.prod(extents[:-2]) >= _SHORT_VECTOR_TASKS:
            # a short vector (an NHWC image's 3-4 channels): one parallel task per vector spent more on finding
            # its pixel (div / mod of the fused index) than on the vector; the next loop stays serial in each
            # task. int8 MobileNetV2's input quantize (224x224x3 float32 NCHW -> padded NHWC uint8 codes)
            _parallel_outer(sch, outer[:-1], extents, parallel_min)
            return
    elif (t := _pow2_divisor(extents[-1], lanes)) >= 4:   # e.g. 144 uint8 channels, 64 lanes: 9 x 16
        lo, li = sch.split(inner, [None, t])
        sch.vectorize(li)
        outer.append(lo)
    else:
        outer.append(inner)
    _parallel_outer(sch, outer, extents, parallel_min)


def _picks_at_symbolic_offset(sch, block) -> bool:
    """Whether the block picks between operands by index AND reads one at a symbolic offset of its index:
    if_then_else(v >= k, B[v - k], A[v]), a concat along a dynamic axis. (Padding copies, if_then_else(v < n,
    A[v], 0), and value selects such as where(mask, x, y) do not: LoopPartition splits those right.)"""
    import re

    blk = sch.get(block)
    text = str(blk.body)
    if "if_then_else" not in text and "Select(" not in text:
        return False
    # an iteration variable minus a name (a symbolic size), not minus a literal
    return any(re.search(rf"\b{re.escape(iv.var.name)} - (?!T\.int64\()[A-Za-z_]", text) for iv in blk.iter_vars)


# _vectorize_symbolic: a static row's vectors stay serial inside the parallel loop of a dynamic kernel (False:
# fused into it, as before; kept for A/B runs). Small encoder, dynamic build, kernel_profile, interleaved:
# its (b, s, 4, 64) -> (b, 4, s, 64) transposes 131 -> 42 us per pass at 1 x 128 and 867 -> 207 us at 8 x 128
# (x86:haswell), 2289 -> 1033 us at 32 x 128 (host AVX-512); whole pass 5.57 -> 5.40 ms, 38.5 -> 37.5 ms.
SERIAL_ROWS = True
ROW_RUN = 16


def _serial_runs(sch, loop, n: int) -> list:
    """The part of a row's vector loop (`n` vectors) that joins the parallel loop: none for a row of up to
    ROW_RUN vectors (it stays serial), else the outer loop of runs of the largest divisor of n <= ROW_RUN."""
    if n <= ROW_RUN:
        return []
    run = max(d for d in range(1, ROW_RUN + 1) if n % d == 0)
    runs, _ = sch.split(loop, [None, run])
    return [runs]


def _vectorize_symbolic(sch, loops: list, extents: list, lanes: int, parallel_min: int,
                        picks: bool = False) -> None:
    """Injective block with a symbolic (dynamic) extent: a static innermost loop is vectorized as in
    _vectorize_inner; a symbolic one is split by `lanes` (the partial last vector guarded by a predicate) and
    vectorized. The outer loops are fused and run in parallel unless the static part alone is too small to
    pay for it at the smallest size (each dynamic dim counts as 1). `picks`: the block picks between operands
    by index, one read at a symbolic offset (_picks_at_symbolic_offset; see below)."""
    inner, outer = loops[-1], list(loops[:-1])
    e = extents[-1]
    serial_rows = SERIAL_ROWS and any(x is None for x in extents[:-1])
    if e is not None:
        # the row's vectors stay a serial loop inside the parallel one, in runs of up to ROW_RUN vectors:
        # fused into it, each vector paid for the index arithmetic of the fused loop, divisions by the symbolic
        # extents (a dynamic transpose's 64-float rows: 8 vectors, 8 runtime divisions where one does); a
        # longer row keeps its runs in the parallel loop (a batch-1 row of 4096 floats still splits)
        if e % lanes == 0 and e > lanes:
            lo, li = sch.split(inner, [None, lanes])
            sch.vectorize(li)
            outer += _serial_runs(sch, lo, e // lanes) if serial_rows else [lo]
        elif 1 < e <= lanes:
            sch.vectorize(inner)
        elif (t := _pow2_divisor(e, lanes)) >= 4:
            lo, li = sch.split(inner, [None, t])
            sch.vectorize(li)
            outer += _serial_runs(sch, lo, e // t) if serial_rows else [lo]
        else:
            outer.append(inner)
    else:
        lo, li = sch.split(inner, [None, lanes])
        sch.vectorize(li)
        # TIR's LoopPartition splits the vector loop into whole vectors and one guarded tail; unmarked, the
        # guard sits inside every vector and the vectorizer gives up (scalar code): small encoder at 8x128,
        # 1 thread, its dynamic transpose 4.8 -> 0.69 ms, its scaling multiply 2.4 -> 0.3 ms. The marked loop
        # stays out of the fused parallel loop (a fused loop has no partition point). Not where the value picks
        # between operands by the loop index (a concat along the dynamic axis: if_then_else(v >= k, B[v - k],
        # A[v])): TVM 0.27's LoopPartition then gives wrong values (every element read from B, seen for
        # float32 and uint8), so such a kernel keeps the guard inside each vector.
        if not picks:
            sch.annotate(lo, "pragma_loop_partition_hint", 1)
        if not outer:
            return
    if outer:
        static = math.prod(x for x in extents if x is not None)
        # each dynamic dim counts as a few dozen: any one makes a block of 256+ static elements large enough,
        # two (batch x sequence: the padded operand copies of a dynamic attention matmul, 4 x 64 static)
        # make even a small static part large enough (those copies ran serial: the 1 x 128 attention matmul
        # of the small encoder took 2x its static build's time at 2 threads)
        if static * 64 ** sum(x is None for x in extents) >= parallel_min:
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def _parallel_outer(sch, outer: list, extents: list[int], parallel_min: int) -> None:
    """Fuse the `outer` loops into one parallel loop when the block (loop `extents`) is large enough to pay
    for waking the thread pool."""
    if outer and math.prod(extents) >= parallel_min:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def _pow2_divisor(n: int, limit: int) -> int:
    """The largest power of two <= limit that divides n."""
    t = 1
    while t * 2 <= limit and n % (t * 2) == 0:
        t *= 2
    return t


def _tile_transpose(sch, block, lanes: int, parallel_min: int = PARALLEL_MIN) -> bool:
    """Injective block that reads a tensor across its innermost axis (a transpose / layout change such as
    NHWC -> NCHW): walking the output row by row touches a new cache line of the input for every element,
    so each input line is fetched up to `lanes` times (measured 1.7-4.4 GB/s on a 3 MB NHWC->NCHW copy).
    Tile the two axes involved (the output's innermost loop and the loop that indexes the input's innermost
    dimension) by up to `lanes` each, so one tile's input lines and output lines stay in L1; the tile's inner
    row is vectorized, the outer tiles run in parallel. Returns False (block untouched) when the block is not
    such a transpose."""
    if not _loops_are_iters(sch, block):
        return False
    stmt = sch.get(block)
    ivs = list(stmt.iter_vars)
    loops = sch.get_loops(block)
    ext = [_extent(sch, lp) for lp in loops]
    if len(ivs) < 2 or any(e is None for e in ext):
        return False
    inner_var = ivs[-1].var
    cross = None
    for region in stmt.reads:
        if not region.region:
            continue
        last = region.region[-1].min
        j = next((i for i, iv in enumerate(ivs) if last.same_as(iv.var)), None)
        if j is not None and j != len(ivs) - 1 and any(_mentions(r.min, inner_var) for r in region.region[:-1]):
            cross = j
            break
    if cross is None:
        return False
    t_in = _pow2_divisor(ext[cross], lanes)
    t_out = _pow2_divisor(ext[-1], lanes)
    if t_in < 4 or t_out < 4:
        return False
    c_o, c_i = sch.split(loops[cross], [None, t_in])
    w_o, w_i = sch.split(loops[-1], [None, t_out])
    outer = [c_o if i == cross else lp for i, lp in enumerate(loops[:-1])] + [w_o]
    sch.reorder(*outer, c_i, w_i)
    sch.vectorize(w_i)
    _parallel_outer(sch, outer, ext, parallel_min)
    return True


def _iter_index(ivs, expr) -> int | None:
    """The position in `ivs` (block iter vars) of the iter var that `expr` is, or None."""
    return next((i for i, iv in enumerate(ivs) if expr.same_as(iv.var)), None)


def _mentions(expr, var) -> bool:
    from tvm import tirx

    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


def _is_pad_block(sch, block) -> bool:
    name = sch.get(block).name_hint
    return name.startswith("pad") or name.endswith("pad") or "pad_temp" in name


def _inline_bool_producers(sch, block) -> None:
    """Inline into `block` every producer chain of boolean buffers (comparisons, logical ops) that it reads:
    one instruction per element to recompute, and no rule schedules them as blocks of their own. Left in the
    kernel as plain loops they were computed once, but LLVM turned those loops into <N x i1> vector code, which
    on AVX2 (no mask registers) took it seconds: the row check of PyTorch's safe softmax, `any(not(x == -inf))`
    over 8 x 7 x 7 attention scores, compiled in 2.2 s for x86:haswell, 0.19 s inlined (0.06 s for AVX-512).
    Same values: each element is the same expression where it is read."""
    progress = True
    while progress:
        progress = False
        for b in sch.get_producers(block):
            stmt = sch.get(b)
            if (len(stmt.writes) == 1 and str(stmt.writes[0].source.dtype) == "bool"
                    and "if_then_else" not in str(stmt.body) and not _is_pad_block(sch, b)):
                try:
                    sch.compute_inline(b)
                except Exception:       # not inlinable (e.g. a reduction): left as it is
                    continue
                progress = True
                break


def _clamp_pad_block(sch, block) -> bool:
    """Rewrite a padding block of pad_einsum, `P[i..] = if_then_else(i < n and .., A[i..], 0)`, into a clamped
    copy `P[i..] = A[min(i, n - 1)..]`; True when rewritten. For padding along the OUTPUT's spatial axes only
    (a GEMM's dynamic rows or columns): the padded rows / columns of the result are computed from repeated
    real data instead of zeros and never written back (the copy out is guarded), so values are unchanged,
    while the clamped copy inlines into the micro-kernel as a plain load: no padded copy of the operand
    (a dynamic-row 1024 x 1024 x 256 GEMM copied 4 MB per call) and no guard in the inner loop."""
    from tvm import ir, s_tir, tirx

    blk = sch.get(block)
    store = blk.body
    if not isinstance(store, tirx.BufferStore) or not isinstance(store.value, ir.Call):
        return False
    call = store.value
    if getattr(call.op, "name", "") != "prim.if_then_else" or len(call.args) != 3:
        return False
    cond, load = call.args[0], call.args[1]
    if not isinstance(load, ir.expr.TensorLoad):         # what tirx.BufferLoad builds in TVM 0.27
        return False
    terms, stack = [], [cond]
    while stack:
        c = stack.pop()
        if isinstance(c, tirx.And):
            stack += [c.a, c.b]
        elif isinstance(c, tirx.LT) and isinstance(c.a, tirx.Var):
            terms.append(c)
        else:
            return False
    idx = list(load.indices)
    iters = {iv.var for iv in blk.iter_vars}
    for t in terms:
        hits = [d for d, e in enumerate(idx) if isinstance(e, tirx.Var) and e.same_as(t.a)]
        if len(hits) != 1 or t.a not in iters or hits[0] == len(idx) - 1:
            return False            # (a clamped innermost index would turn the vector loads into gathers)
        idx[hits[0]] = tirx.Min(t.a, t.b - 1)
    new_load = tirx.BufferLoad(load.source, idx)
    reads = [tirx.BufferRegion(load.source, [ir.Range.from_min_extent(e, 1) for e in idx])]
    new_blk = s_tir.SBlock(blk.iter_vars, reads, blk.writes, blk.name_hint,
                           tirx.BufferStore(store.buffer, new_load, store.indices), blk.init,
                           blk.alloc_buffers, blk.match_buffers, blk.annotations)
    sch.state.replace(sch.get_sref(block), new_blk, {blk: new_blk})
    return True


# ------------------------------------------------------------------------------------------------ rules
class _CpuRule:
    """dlight's ScheduleRule protocol for graphopt's CPU rules: `apply(func, target, tunable)` returns the
    subclass's `_apply(func, target)` schedule, or None when the rule does not take the kernel or any TIR
    shape it does not understand makes scheduling fail (the next rule is tried).

    `whole_rows`: the rule's row-wise kernels compute each row on one thread, every read of the row's input
    before the row's first write (what inplace_rowwise needs to write a result over its input).
    `serial_below`: the work (innermost statement executions) below which the rule's static schedules stay
    serial; a dynamic kernel it scheduled gets a serial copy for calls below it (parallel_guard.py); 0: none."""

    whole_rows = False
    serial_below = 0

    def apply(self, func, target, tunable: bool = False):
        try:
            return self._apply(func, target)
        except Exception:
            return None

    def is_target_available(self, target) -> bool:
        return target.kind.name == "llvm"

    def _apply(self, func, target):
        raise NotImplementedError


class PackedGemm(_CpuRule):
    """Register-tiled schedule for kernels with one reduction block (conv, dense, matmul, pooling, means).

    Tile choice: the output's innermost axis (output channels / columns) is split into [outer, nvec, lanes]
    (lanes = SIMD width of the output dtype); the next output axis with extent > 1 (output width / rows) into
    [outer, rows]; rows x nvec accumulators are held in registers, chosen to maximize FMAs per load
    (rows*nvec / (rows+nvec)) within the register file. Everything else of the output is parallel, in one
    loop: channel blocks outermost, so one weight panel serves every pixel tile in turn; for channel-wise
    kernels (depthwise conv, pooling: no weight panel to reuse) innermost, so each input line is read once
    (MobileNetV2 7.36 -> 6.80 ms, interleaved). Where the row count's divisors allow only a clearly worse
    tile (AVX2's 16 registers at 56/28/7-wide images), the rows take the better tile anyway: the row tiles
    become a serial loop inside the parallel one and the last, partial tile is guarded (`_row_tail_tile`).
    Tried and not taken (hand-written TIR of the same 6 x 2 micro-kernel, 3x3 convs, one AVX2 thread, A/B
    interleaved): input channels in chunks of 16-32 with the partial sums kept in the output between chunks, so a
    chunk's weights stay in L1 across all pixel tiles as in MLAS's NCHWc kernels: 256-ch 14x14 2.27 -> 2.29 ms,
    512-ch 7x7 3.82 -> 3.79, 64-ch 56x56 2.54 -> 2.94; MLAS's 3 x 4 tile: LLVM spills it (3.2x slower).
    """

    def __init__(self, pack_weights: bool = True, max_accumulators: int | None = None, pad: str = "auto",
                 row_tails: bool | None = None):
        self.pack_weights = pack_weights
        self.max_accumulators = max_accumulators
        self.pad = pad          # "auto" | "at" (per tile) | "inline" (guarded loads) | "separate"
        self.row_tails = self.row_tails_default if row_tails is None else row_tails

    def _apply(self, func, target):
        import tvm_ffi
        from tvm import tirx

        plan = {}
        sch = self._large(func, target, plan)
        if sch is None or "rows" not in plan or not self.small_rows:
            return sch
        # Dynamic rows padded to whole register tiles: the tile best for many rows can waste much of a small
        # row count (AVX-512's 3 x 4 vectors computes 18 rows for 16, AVX2's 6 x 2 12 for 8), which the static
        # build for that size does not. A second tile for up to small_rows rows runs in the same kernel
        # (_branch_kernels). Both read one packed copy of the weights, in panels as wide as the small
        # tile (the large one reads two at a time): panels of the large tile's width, read by a narrower tile,
        # made the small one no faster inside the encoder (each of its tiles streamed half of every line).
        # Dynamic columns too (attention scores, sequence x sequence): the small tile is one vector wide and
        # runs where both counts are small (the large 7 x 2 tile computed 14 x 32 scores for 8 x 8).
        rows, nvec = plan["tile"]
        columns = plan["columns"]
        vec = cpu_vector(target)
        small = self._choose_tile(1 if columns is not None else nvec, self.small_rows, vec)
        if small is None or small == (rows, nvec) or (columns is None and self.small_rows % rows == 0):
            return sch
        width = None if plan["panel"] is None else plan["panel"] * small[1] // nvec
        large = sch if width == plan["panel"] else self._large(func, target, {}, panel=width)
        small_sch = self._schedule(func, target, {}, force_tile=small, panel=width)
        if small_sch is None or large is None:
            return sch
        cond = plan["rows"] <= self.small_rows
        few = small_sch.mod["main"]
        if columns is not None and not tvm_ffi.structural_equal(columns, plan["rows"]):
            cond = tirx.And(cond, columns <= self.small_rows)
        elif columns is None and not plan["rows_outer"]:
            cond = tirx.And(cond, self._faster_for(plan["rows"], small, (rows, nvec), vec))
        elif columns is None:
            # Where the large schedule takes rows outermost, panels outermost is the faster order for every
            # count up to small_rows (see _schedule), and each count takes the better of the two tiles in that
            # order: the small tile alone made the small encoder's 16-row GEMMs ~10% slower than the static
            # build's 6 x 2 (AVX2, 2 threads, perf samples per kernel).
            same_order = self._schedule(func, target, {}, force_tile=(rows, nvec), panel=width)
            if same_order is not None:
                both = _branch_kernels(same_order.mod["main"], few,
                                       self._faster_for(plan["rows"], small, (rows, nvec), vec))
                few = few if both is None else both
        merged = _branch_kernels(large.mod["main"], few, cond)
        return sch if merged is None else unchecked_schedule(merged)

    def _large(self, func, target, plan: dict, panel=None):
        """The schedule of `func` for any row count (`plan`, `panel`: as _schedule's). Where its dynamic rows
        are taken in chunks (_row_chunk), a second copy without chunks runs while the rows' operand fits the
        caches: a constant chunk size over a few rows left the rest of the chunk as empty iterations (10 of a
        12-row GEMM's 96 us, one thread)."""
        from tvm import tirx

        sch = self._schedule(func, target, plan, panel=panel)
        if sch is None or "chunk_when" not in plan:
            return sch
        plain = self._schedule(func, target, {}, panel=panel, chunks=False)
        merged = None if plain is None else _branch_kernels(sch.mod["main"], plain.mod["main"],
                                                            tirx.Not(plan["chunk_when"]))
        return sch if merged is None else unchecked_schedule(merged)

    @staticmethod
    def _faster_for(n, small: tuple[int, int], large: tuple[int, int], vec: CpuVector):
        """Whether register tile `small` computes `n` rows (a PrimExpr; each tile pads them to its whole tiles)
        sooner than `large`: padded rows / FMA throughput, which is full with at least vec.fmas_in_flight
        accumulators (rows x vectors) and falls in proportion below, compared in integers. AVX2: 4 x 2 (8 of
        10) for 1-4 and 7-8 rows, 6 x 2 for 5-6 and 9-16 (4 x 2 for every count up to 16 made the small
        encoder's 16-row GEMMs 11-13% slower than the static build's 6 x 2, one thread); AVX-512: 4 x 2 (8 of
        8) for 4, 7-8 and 16 rows, 3 x 4 otherwise."""
        def padded(rows):
            return (n + (rows - 1)) // rows * rows
        (rs, vs), (rl, vl) = small, large
        need = vec.fmas_in_flight
        return padded(rs) * min(rl * vl, need) < padded(rl) * min(rs * vs, need)

    def _schedule(self, func, target, plan: dict, force_tile=None, panel=None, chunks: bool = True):
        """The schedule of `func` (None: not taken). `plan` receives, for a kernel whose dynamic rows are
        padded to whole register tiles: "rows" (the row count, a PrimExpr), "columns" (the column count where
        dynamic too, else None), "tile" (rows, vectors) and "panel" (the width of the packed weight's panels,
        None where no weight is packed). `force_tile` overrides the register tile, `panel` the width of the
        weight panels (a divisor or multiple of the tile's)."""
        from tvm import tirx

        vec = cpu_vector(target)
        sch = unchecked_schedule(func)
        found = _one_reduction_block(sch)
        if found is None:
            return None
        blocks, main = found
        if not _loops_are_iters(sch, main):
            return None
        outputs = sch.get_output_blocks(sch.get_sblock("root"))
        if len(outputs) != 1:
            return None
        main_stmt = sch.get(main)
        if len(main_stmt.writes) != 1:
            return None

        # epilogue: inline every elementwise block after the reduction except the function's output block
        # (not when that would grow an expression past inline_budget.BUDGET: the next rule gets the kernel)
        after, epilogue = False, []
        for b in blocks:
            if _same(sch.get(b), main_stmt):
                after = True
                continue
            if after and not _same(sch.get(b), sch.get(outputs[0])):
                epilogue.append(b)
        if epilogue and len(plan_inlining(sch, blocks, epilogue)[0]) != len(epilogue):
            return None
        for b in epilogue:
            sch.compute_inline(b)
        # prologue: inline producers that are plain copies/transposes/reshapes (no padding condition)
        pads = []
        for b in sch.get_producers(main):
            if _is_pad_block(sch, b):
                pads.append(b)
                continue
            if "if_then_else" in str(sch.get(b).body):
                return None
            sch.compute_inline(b)
        _inline_bool_producers(sch, main)

        blk = sch.get(main)
        ivs = list(blk.iter_vars)
        ext = [_int(iv.dom.extent) for iv in ivs]          # None: a symbolic extent (a dynamic dim)
        axes = self._output_axes(blk)
        if axes is None:
            return None
        vi, ri = axes

        spatial = [i for i, iv in enumerate(ivs) if int(iv.iter_type) == tirx.IterVar.DataPar]
        reduce_ = [i for i, iv in enumerate(ivs) if int(iv.iter_type) == tirx.IterVar.CommReduce]
        if len(spatial) + len(reduce_) != len(ivs):
            return None

        # ---- tile sizes
        # A symbolic extent (dynamic batch / sequence) is tiled by constants like a static one; its last,
        # partial tile is guarded by the predicate TVM's split adds (the tail's rows / columns are skipped).
        # The outer tile loops stay fused into one parallel loop: nesting a dynamic one un-fused lets the
        # register tile's buffer take a dynamic size (it is no longer compacted to the tile).
        out_dtype = blk.writes[0].source.dtype
        lanes = vec.lanes(out_dtype)
        E = ext[vi]
        while E is not None and lanes > 1 and E % lanes:
            lanes //= 2
        n_vectors = E // lanes if E is not None else None
        Er = ext[ri] if ri is not None else 1
        # dynamic rows padded to whole tiles (pad_dynamic) take any row count, like static rows with a tail
        # a depthwise conv on a 16-register ISA keeps a register spare beside its tile and weights (see
        # _choose_tile)
        spare = 1 if vec.registers <= 16 and self._channel_wise(blk, vi, ri) else 0
        tile_shape = self._choose_tile(n_vectors, Er, vec,
                                       row_choices=range(1, 9) if self.pad_dynamic else (1, 2, 4, 8), spare=spare)
        if tile_shape is None:
            return None
        if force_tile is not None:
            tile_shape = force_tile
        rows, nvec = tile_shape
        tail, flat = self._plan_rows(sch, main, func, n_vectors, vec, tile_shape, ext, spatial, vi, ri, bool(pads))
        if flat is not None:
            # one pixel axis (rows x width) in place of two: its extent takes the better tile
            (h, width, _), tail = flat
            blk = sch.get(main)
            ivs = list(blk.iter_vars)
            ext = [_int(iv.dom.extent) for iv in ivs]
            ri = h
            vi = vi - 1 if vi > h else vi
            spatial = [i for i, iv in enumerate(ivs) if int(iv.iter_type) == tirx.IterVar.DataPar]
            reduce_ = [i for i, iv in enumerate(ivs) if int(iv.iter_type) == tirx.IterVar.CommReduce]
            Er = ext[ri]
        if tail is not None:
            rows, nvec = tail
        tile = nvec * lanes
        padded_tile = None
        main_is_output = _same(sch.get(outputs[0]), sch.get(main))
        pad_rows = False
        row_bytes = _row_bytes(ext, reduce_, out_dtype)
        if (tail is not None and flat is None and chunks and force_tile is None and self.static_pad_rows
                and self._has_weight(blk, func) and not self._channel_wise(blk, vi, ri)
                and row_bytes is not None and ext[ri] * row_bytes > self.row_chunk_bytes):
            # Static rows whose operand outgrows L2 (a sequence's 512 rows; not an image row of a conv): padded to
            # whole tiles like dynamic ones rather than a serial loop of tiles + tail inside each (batch, panel)
            # iteration, which re-read all those rows once per panel, and whose tail guard sat in every tile once
            # split into chunks (_row_chunk). The static encoder at 32 x 512 (4 layers, kernel_profile): QKV and
            # output projections 364 -> 186 ms, FFN 372 + 236 -> 188 + 174 ms; whole model 1406 -> 986 ms
            # (interleaved A/B; the encoder at 8 x 128 49.6 -> 44.4 ms; ResNet-18, MobileNetV2, BERT-base
            # 1 x 128 and 8 x 128 within 0.7%)
            pad_rows, tail = True, None
        # (a GEMM; a mean or pool only where every padded operand is read clamped in place: it reads its
        # operand once, so a padded copy would double its traffic, while the guarded tail it keeps otherwise
        # sits in its reduction loop: a row mean over a dynamic sequence ran at half the static build's speed)
        if pad_rows or self.pad_dynamic and ((ri is not None and ext[ri] is None) or E is None) and (
                self._has_weight(blk, func) or self._pads_in_place(sch, main, ivs, ext, vi, ri, rows, tile)):
            row_count = ivs[ri].dom.extent if ri is not None else None
            column_count = ivs[vi].dom.extent
            padded_tile = self._pad_dynamic(sch, main, ivs, ext, vi, ri, rows, tile)
            if padded_tile is not None:
                blk = sch.get(main)
                ivs = list(blk.iter_vars)

        # ---- constant weights -> contiguous panels [E/tile, ..., tile] (split out and folded at build time)
        channel_wise = self._channel_wise(blk, vi, ri)
        panels_inner = channel_wise or self._small_weights(ext, reduce_, E, out_dtype)
        loops = sch.get_loops(main)
        panel = panel or tile
        packed = False
        if (self.pack_weights and E is not None and E > panel and func.attrs is not None
                and "layout_free_buffers" in func.attrs):
            params = list(func.params)
            free = [params[int(i)] for i in func.attrs["layout_free_buffers"]]
            for r_index, region in enumerate(blk.reads):
                if not any(region.source.same_as(p) for p in free):
                    continue
                idx = [r.min for r in region.region]
                users = [_iter_index(ivs, e) for e in idx]
                if users[-1] != vi or (ri is not None and ri in users) or any(
                        u is None and _int(e) is None for u, e in zip(users, idx)):
                    continue
                cached = sch.cache_read(main, r_index, "global")
                lead = len(users) - 2
                if self.batch_first_panels and lead > 0 and panels_inner and all(
                        u is not None and u in spatial for u in users[:lead]):
                    # a batched weight (Winograd's transformed planes [36, C, K]) whose column blocks run
                    # innermost: batch axes first, so the panels of consecutive (batch, column block)
                    # iterations lie back to back in memory (one stream for the prefetcher, not a jump of
                    # the whole batch between panels; ResNet-18's Winograd GEMMs, whole model, 1 thread)
                    sch.transform_layout(main, ("read", r_index),
                                         lambda *a: (*a[:-2], a[-1] // panel, a[-2], a[-1] % panel))
                else:
                    sch.transform_layout(main, ("read", r_index),
                                         lambda *a: (a[-1] // panel, *a[:-1], a[-1] % panel))
                sch.annotate(cached, "meta_schedule.layout_rewrite_preproc", 1)
                packed = True
                break
            loops = sch.get_loops(main)
        if padded_tile is not None and ri is not None and ext[ri] is None and tail is None and flat is None:
            plan.update(rows=row_count, columns=column_count if E is None else None, tile=(rows, nvec),
                        panel=panel if packed else None, rows_outer=panels_inner)

        # ---- tiling
        v_o, v_n, v_l = sch.split(loops[vi], [None, nvec, lanes])      # a dynamic axis: guarded tail
        inner = [v_n, v_l]
        outer = [loops[i] for i in spatial if i not in (vi, ri)]
        if ri is not None:
            r_o, r_i = sch.split(loops[ri], [None, rows])
            outer.append(r_o)
            inner.insert(0, r_i)
        serial = []
        chunk = None
        batch = [i for i in spatial if i not in (vi, ri)]
        position = self._panel_position(blk, ivs, vi, ri, batch)   # the column blocks' place among batch axes
        if chunks and tail is None and not panels_inner and force_tile is None:  # (force_tile: <= small_rows)
            # (not with a tail: split, the serial row loop no longer partitions into full tiles + tail, and its
            # guard in every tile made the static encoder's FFN at 32 x 512 1.7x slower)
            # the batch axes whose rows every panel pass reads: none outside the panels' own batch (attention's
            # K / V per head: a pass reads one head's rows; counting every head chunked the small encoder's
            # dynamic 32 x 128 scores, 8.1 -> 13.2 ms against the static build)
            read = [i for i in spatial if i not in batch[:position]]
            chunk = self._row_chunk(ext, read, vi, ri, rows, E, nvec * lanes, row_bytes)
            if chunk is not None and ext[ri] is None and "rows" in plan:
                # a dynamic row count: chunks where the rows' operand outgrows the caches at run time (_large)
                all_rows = plan["rows"]
                for i in read:
                    if i not in (vi, ri):
                        all_rows = all_rows * ivs[i].dom.extent
                plan["chunk_when"] = all_rows * row_bytes > self.resident_bytes
        if chunk is not None:
            # rows in chunks that stay in L2 while every column panel passes over them (_row_chunk); a chunk's
            # tiles are a serial loop in each (chunk, panel) iteration
            r_oo, serial_rows = sch.split(outer.pop(), [None, chunk])
            outer.append(r_oo)
            serial = [serial_rows]
        if tail is not None:
            serial = [outer.pop()]          # the row tiles: a serial loop, partitioned into full tiles + tail
        if force_tile is not None and ri is not None and ext[ri] is None and not channel_wise:
            # the second tile's few dynamic rows (<= small_rows): each column panel computes them all in turn,
            # the row tiles a serial loop in the parallel one over panels (rows outermost, as _small_weights
            # orders them, every (row tile, panel) task read its panel anew)
            serial = [outer.pop()]
            panels_inner = False
        if ri is not None and ext[ri] is None and chunk is None and not serial and position > 0:
            # dynamic rows of a batched product (attention's scores and context per head): the row tiles a
            # serial loop in each (batch, panel) task, as in the static schedule, not fused into the parallel
            # loop (where every tile found its batch, panel and rows again from the fused index, by run-time
            # divisions). With the staged write-back below, the small encoder's dynamic attention scores at
            # 32 x 128 took 10.5 ms per forward pass against 14.5 with the tiles fused (static build: 7.3)
            serial = [outer.pop()]
            panels_inner = False
        if panels_inner or chunk is not None:
            outer.append(v_o)
        else:
            # column blocks outermost, except outside the batch axes their operand is indexed by: a panel that
            # belongs to one batch (attention's K and V per head) serves only that batch's rows
            outer.insert(position, v_o)
        sch.reorder(*outer, *serial, *[loops[i] for i in reduce_], *inner)
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(fused)
        n_outer = 1 + len(serial)
        write_back = sch.cache_write(main, 0, self.acc_scope)
        if flat is not None:
            # the register tile's buffer and its write-back follow the flattened pixel axis, so a tile's
            # accumulators have constant offsets (registers) and the write-back covers exactly its pixels
            out_ndim = len(sch.get(write_back).iter_vars)
            merge = _merge_axes_map(out_ndim, flat[0][2], flat[0][1])
            sch.transform_layout(main, ("write", 0), merge)
            sch.transform_block_layout(write_back, merge)
        sch.reverse_compute_at(write_back, serial[0] if serial else fused)
        if padded_tile is not None:
            sch.reverse_compute_inline(padded_tile[1])   # the copy out of the padded result: guarded
            pads.extend(padded_tile[0])
        if not main_is_output:
            sch.reverse_compute_inline(outputs[0])
        if E is None and nvec > 1:
            # dynamic columns: the write-back's whole vectors and its guarded last one are split apart at a
            # run-time column (LoopPartition, below), so it reads the tile at run-time offsets, and LLVM then
            # kept the accumulators in memory through the reduction loop (stored and reloaded every step,
            # spilled and rotated through the registers: the small encoder's dynamic attention scores at
            # 32 x 128 took 17.0 ms per forward pass against the static build's 7.3). The tile is first copied
            # whole to a buffer of its own ("local": not merged with the accumulators by StorageRewrite), so
            # every accumulator access has a constant offset: 14.5 ms (10.5 with the serial row tiles above)
            acc = sch.get(main).writes[0].source.name
            stage = sch.cache_read(write_back, next(i for i, r in enumerate(sch.get(write_back).reads)
                                                    if r.source.name == acc), "local")
            staged = sch.get_loops(stage)[n_outer:]
            if all(_extent(sch, lp) is not None for lp in staged):
                so, si = sch.split(sch.fuse(*staged) if len(staged) > 1 else staged[0], [None, lanes])
                sch.vectorize(si)
                sch.unroll(so)
            else:
                sch.compute_inline(stage)       # a tile of run-time extent: the write-back as it was
        loops = sch.get_loops(main)
        sch.vectorize(loops[-1])
        for lp in loops[-len(inner):-1]:
            sch.unroll(lp)
        if reduce_:
            sch.decompose_reduction(main, loops[n_outer])

        # ---- padding: one parallel padded copy for convolutions, inline for depthwise convs and pooling
        reduce_size = 1
        for i in reduce_:
            reduce_size *= ext[i] if ext[i] is not None else 1 << 10
        for pad in pads:
            mode = self.pad
            if padded_tile is not None and any(_same(sch.get(pad), sch.get(b)) for b in padded_tile[0]):
                _vectorize_inner(sch, pad, lanes)    # whole-tile padding of a dynamic extent: one parallel copy
                continue
            if mode == "auto":
                # a padded copy pays off when each copied element feeds many multiply-adds (a reduction over
                # input channels); depthwise convs and pools read it a handful of times. One whole copy beat
                # per-tile copies ("at") on every ResNet-18 conv (1 thread, x86:haswell: 3x3 512-ch at 7x7
                # 69 -> 87 GF/s, 64-ch at 56x56 87 -> 95; whole model 22.6 -> 20.3 ms, 2 threads, A/B)
                mode = self.weighted_pad if self._has_weight(blk, func) and reduce_size >= 64 else "inline"
                if "if_then_else" not in str(sch.get(pad).body):
                    # no padding at all (a 1x1 or unpadded conv: TOPI's pad block is then a plain copy): the
                    # input is read in place. The copy cost 3-25% of such a conv (1x1, stride 1 and 2, ResNet-18
                    # and MobileNetV2 shapes, x86 and x86:haswell, kernel_profile, one run each)
                    mode = "inline"
            if mode == "inline":
                sch.compute_inline(pad)
                continue
            if mode == "at":
                sch.compute_at(pad, fused)
                pad_loops = sch.get_loops(pad)[1:]
            else:
                pad_loops = sch.get_loops(pad)
            last = pad_loops[-1]
            e = _extent(sch, last)
            if e is not None and e % lanes == 0:
                lo, li = sch.split(last, [None, lanes])
                sch.vectorize(li)
                pad_loops = pad_loops[:-1] + [lo]
            if mode == "separate" and len(pad_loops) > 1:
                # parallel over the rows only: fused down to single vectors, every vector paid a div/mod
                # chain to find its pixel (ResNet-18's 56x56x64 padded copy: 26,912 one-vector iterations)
                rows = pad_loops[:-2] if len(pad_loops) > 2 else pad_loops
                sch.parallel(sch.fuse(*rows) if len(rows) > 1 else rows[0])

        # ---- write-back (+ epilogue): vectorized
        wb_loops = sch.get_loops(write_back)[n_outer:]
        if wb_loops and (E is None or Er is None):
            # a guarded tail: vectorize the columns only, so the rows' guard stays outside the vector loop
            # (a fused rows x columns loop puts the guard on every lane and the vectorizer gives up)
            lo, li = sch.split(wb_loops[-1], [None, lanes])
            sch.vectorize(li)
            if E is None:
                # dynamic columns: LoopPartition splits off the partial last vector, so the whole vectors
                # store without a per-lane guard (the small encoder's dynamic attention scores, 1 x 128,
                # 1 thread: 0.105 -> 0.090 ms)
                sch.annotate(lo, "pragma_loop_partition_hint", 1)
        elif wb_loops:
            flat = sch.fuse(*wb_loops) if len(wb_loops) > 1 else wb_loops[0]
            _, li = sch.split(flat, [None, lanes])
            sch.vectorize(li)
        return sch

    def _choose_tile(self, n_vectors: int | None, Er: int | None, vec: CpuVector,
                     row_choices=(1, 2, 4, 8), spare: int = 0) -> tuple[int, int] | None:
        """(rows, nvec) of the register tile: `rows` output rows (pixels) x `nvec` SIMD vectors of output
        channels, maximizing FMAs per load (rows*nvec / (rows+nvec)) within the register file; `rows`
        divides Er and `nvec` divides n_vectors (None: a symbolic extent). `spare`: registers kept free
        beyond the tile and its nvec weight vectors. A depthwise conv (one input vector per FMA, its taps a
        short loop that LLVM unrolls) took 4 x 3 on AVX2's 16 registers (12 accumulators + 3 weights) and
        LLVM spilled accumulators and taps between the unrolled taps (MobileNetV2's 56x56x144 depthwise conv:
        3.2% of the model's kernel samples in such loops); with one spare, 4 x 2: MobileNetV2 on a 2-core AVX2
        EPYC 1.9-4.5% faster at batch 1, 2.6-2.8% at batch 8 (saved builds interleaved, the same outputs bit
        for bit)."""
        max_acc = self.max_accumulators or (vec.registers - 4)
        if self.tile_bytes:
            max_acc = min(max_acc, self.tile_bytes // vec.bytes)
        best = None
        for nvec in range(1, 9):
            if n_vectors is None and nvec > 2:
                break                       # symbolic columns: short vector rows keep the guarded tail small
            if n_vectors is not None and n_vectors % nvec:
                continue
            for rows in (range(1, Er + 1) if Er is not None else row_choices):
                if ((Er is not None and Er % rows) or rows * nvec > max_acc
                        or rows * nvec + nvec + spare >= vec.registers):
                    continue
                score = (rows * nvec / (rows + nvec), rows * nvec)
                if best is None or score > best[0]:
                    best = (score, rows, nvec)
        return None if best is None else (best[1], best[2])

    def _plan_rows(self, sch, main, func, n_vectors, vec, tile_shape, ext, spatial, vi, ri, padded):
        """(tail tile, merged pixel axis), at most one of them not None: a better register tile over the
        output rows with a guarded tail (`_row_tail_tile`), else on 16-register targets one over rows x width
        (`_flatten_pixels`); (None, None) keeps `tile_shape`."""
        tail = self._row_tail_tile(n_vectors, ext[ri] if ri is not None else 1, vec, tile_shape, ext, spatial,
                                   vi, ri, padded)
        if tail is not None:
            return tail, None
        return None, self._flatten_pixels(sch, main, func, n_vectors, vec, tile_shape, ext, spatial, vi, ri)

    def _serial_rows_tile(self, n_vectors, rows, vec, tile_shape, parallel_others, padded):
        """The best register tile of up to 8 rows for `rows` output rows run as a serial loop of full tiles and
        one guarded tail, or None where it is not clearly better than `tile_shape` (score x 1.1) or costs
        more than it gains: < 4 column blocks (1x1 convs to 16-32 channels: measured 5-30% slower); a tail
        that runs below speed (too few accumulators to hide the FMA latency) unless it is small, still has
        half a tile's rows, or the kernel reads no padded input; fewer than `min_parallel` iterations left
        in the parallel loop (`parallel_others`: the other parallel axes' extent) without the row tiles."""
        best = self._choose_tile(n_vectors, None, vec, row_choices=range(1, 9))
        if best is None or rows < best[0] or n_vectors // best[1] < 4:
            return None
        tail_rows = rows % best[0]
        if not (tail_rows * 2 >= best[0] or tail_rows * 16 <= rows or not padded):
            return None
        if n_vectors // best[1] * parallel_others < self.min_parallel:
            return None
        score = lambda t: t[0] * t[1] / (t[0] + t[1])
        return best if score(best) > score(tile_shape) * 1.1 else None

    def _row_tail_tile(self, n_vectors, Er, vec, tile_shape, ext, spatial, vi, ri, padded):
        """A larger register tile whose rows do not divide the row count, for when the rows' divisors allow
        only a poor one (AVX2's 16 registers: 56-, 28-, 14- and 7-wide images get 4x2 or 7x1 tiles where 6x2
        fits): the row tiles become a serial loop split into full tiles and one guarded tail. None: keep."""
        if not self.row_tails or n_vectors is None or Er is None or ri is None or any(
                ext[i] is None for i in spatial):
            return None
        others = math.prod(ext[i] for i in spatial if i not in (vi, ri))
        best = self._serial_rows_tile(n_vectors, Er, vec, tile_shape, others, padded)
        return best if best is not None and Er % best[0] else None

    def _flatten_pixels(self, sch, main, func, n_vectors, vec, tile_shape, ext, spatial, vi, ri):
        """For a kernel reducing over channels whose output rows and width are static and adjacent (NHWC conv
        output [n, h, w, c]) and whose width allows only a poor tile even with a tail (7- and 14-wide
        images on AVX2), merge h and w into one pixel axis of the block (TIR transform_block_layout) and
        tile that: ((rows iter, width, rows axis of the output), tile) or None when not worth it. 1 thread,
        x86:haswell, A/B: 3x3 conv 512-ch at 7x7 90 -> 103 GF/s, 256-ch at 14x14 100 -> 111, 1x1 960->320 at
        7x7 80 -> 91; ResNet-18 2 threads 19.96 -> 18.25 ms."""
        from tvm import tirx

        if not (self.row_tails and self.flatten_pixels) or ri is None or n_vectors is None \
                or vec.registers > 16 or not self._has_weight(sch.get(main), func):
            return None         # 32 registers (AVX-512): a 7-wide row already takes 7x3; measured 2-9% slower
        blk = sch.get(main)
        ivs = list(blk.iter_vars)
        out_index = [r.min for r in blk.writes[0].region]
        pos = [_iter_index(ivs, e) for e in out_index]
        if len(pos) < 3 or pos[-1] != vi or pos[-2] != ri:
            return None
        h = pos[-3]
        if h is None or h != ri - 1 or int(ivs[h].iter_type) != tirx.IterVar.DataPar or ext[h] is None \
                or ext[h] < 2 or ext[ri] is None or self._channel_wise(blk, vi, ri):
            return None
        others = math.prod(ext[i] for i in spatial if i not in (vi, ri, h))
        best = self._serial_rows_tile(n_vectors, ext[h] * ext[ri], vec, tile_shape, others, padded=True)
        if best is None:
            return None
        width = ext[ri]
        sch.transform_block_layout(main, _merge_axes_map(len(ivs), h, width))
        return (h, width, len(pos) - 3), best

    def _pads_in_place(self, sch, main, ivs, ext, vi, ri, rows, tile) -> bool:
        """Whether _pad_dynamic would read every padded operand clamped in place (no copy), tried on a copy."""
        if not self.clamp_dynamic:
            return False
        trial = sch.copy()
        try:
            done = self._pad_dynamic(trial, main, ivs, ext, vi, ri, rows, tile)
        except Exception:                       # noqa: BLE001
            return False
        return done is not None and not done[0]

    def _pad_dynamic(self, sch, main, ivs, ext, vi, ri, rows, tile):
        """Dynamic rows / columns: pad the block's iteration domain to whole register tiles (TIR pad_einsum),
        so the micro-kernel carries no tail predicate; the operands' padded copies are separate parallel
        blocks and the copy back to the unpadded output is guarded per row in the write-back. Returns
        (producer pad blocks, consumer copy block) or None when the block is not an einsum."""
        padding = [1] * len(ivs)
        if ri is not None and (ext[ri] is None or ext[ri] % rows):
            padding[ri] = rows
        if ext[vi] is None:
            padding[vi] = tile
        producers_before = {sch.get(b).name_hint for b in sch.get_producers(main)}
        try:
            sch.pad_einsum(main, padding)
        except Exception:                       # noqa: BLE001 - not an einsum: keep the guarded tail
            return None
        new_pads = [b for b in sch.get_producers(main) if sch.get(b).name_hint not in producers_before]
        if self.clamp_dynamic:
            kept = []
            for b in new_pads:
                if _clamp_pad_block(sch, b):
                    sch.compute_inline(b)
                else:
                    kept.append(b)
            new_pads = kept
        consumers = sch.get_consumers(main)
        return new_pads, consumers[0]

    # Where the register tile lives. TVM 0.27 (LowerTVMBuiltin) turns every "local" allocation, and every one
    # of 1 KiB or more, into a heap workspace (TVMBackendAllocWorkspace); a constant "global" one under 1 KiB
    # becomes a stack alloca, which LLVM promotes to registers. A workspace tile stays in registers only while
    # LLVM can prove no other access aliases it: when an input is itself a workspace (a padded copy), every
    # FMA also stores its accumulator and reloads its broadcast. 1 thread, interleaved A/B: MobileNetV2
    # x86:haswell 9.28 -> 7.67 ms, x86 (AVX-512) 7.63 -> 6.20 ms (tile capped at 15 zmm), ResNet-18 36.7 ->
    # 36.0 / 33.1 -> 32.8 ms; a dynamic-row Linear 1024x256x1024 11.7 -> 4.8 ms (static build: 5.7 ms).
    acc_scope = "global"
    tile_bytes = 1023
    # dynamic kernels: nests below Injective's threshold (the operands' padded copies, a GEMM of a few rows)
    # get a serial copy (parallel_guard.py). The small encoder at 1 x 16 (2 threads): 64 -> 50 thread-pool
    # launches per forward pass; 0.5-1.7% faster in four interleaved runs of saved builds, other grid points
    # (4 x 8 to 32 x 16, 8 x 128) within +-1%.
    serial_below = PARALLEL_MIN
    pad_dynamic = True          # dynamic rows / columns padded to whole tiles (_pad_dynamic)
    clamp_dynamic = True        # ... and their operands read clamped in place, not copied (_clamp_pad_block)
    # Weights up to this size take pixel tiles outermost (_small_weights). 384 KiB: 3/4 of the 512 KiB L2 of
    # AMD Zen 2/3 cores (Zen 4 and Intel server cores have 1-2 MiB). On a real AVX2 EPYC (znver2), ResNet-18's
    # 3x3 stride-2 conv 64 -> 128 at 56x56 (288 KiB of weights, an 841 KiB padded input that the other order
    # re-reads from L3 once per channel block) took 0.87 -> 0.70 ms, the whole model 21.7 -> 21.4 ms (two
    # interleaved A/B runs); MobileNetV2, the small encoder and ResNet-18 at batch 8 unchanged within 2%.
    small_weight_bytes = 384 << 10
    # Rows in chunks under column panels (_row_chunk): the rows' operand per chunk (L2 with room to spare), the
    # fewest rows per chunk, and the operand size above which a panel pass no longer finds it in cache. 1 MiB:
    # twice a Zen 2 core's L2; on the AVX2 EPYC (znver2, 16 MiB L3) the small encoder's FFN up-projection
    # (x [4096, 256] @ w [256, 1024], 4 MiB of rows) ran at 140 GF/s from L3 and 178 in chunks, 2,048 rows at
    # 163 -> 184 (2 threads, interleaved); the dynamic encoder at 8 x 512 and 32 x 128 5% and 7% faster than
    # with 4 MiB, ResNet-18 / MobileNetV2 (batch 1 and 8) and BERT-base (1 and 8 x 128) within 1%.
    row_chunk_bytes = 192 << 10
    min_chunk_rows = 128
    resident_bytes = 1 << 20
    static_pad_rows = True         # static rows past L2 that would take a tail: padded to whole tiles instead
    row_tails_default = True
    min_parallel = 8
    flatten_pixels = True
    weighted_pad = "separate"      # padding of weighted convs under pad="auto"
    batch_first_panels = True      # batched constant weights packed [batch, column block, K, lanes]
    small_rows = 16                # dynamic rows: a second register tile for up to this many rows (0: none)

    def _small_weights(self, ext: list, reduce_: list, E: int | None, dtype: str) -> bool:
        """Whether every channel block's weights together (reduction size x output channels) stay in the
        L2 cache: then the pixel tiles go outermost and each tile computes all its channel blocks in turn,
        so an output pixel's channels are written together (whole cache lines, one pass over the output)
        rather than one channel block per pass over the whole output (MobileNetV2's 1x1 expansions)."""
        row_bytes = _row_bytes(ext, reduce_, dtype)
        return E is not None and row_bytes is not None and E * row_bytes <= self.small_weight_bytes

    @staticmethod
    def _output_axes(blk) -> tuple[int, int | None] | None:
        """Indices into blk.iter_vars of the output's innermost axis (a spatial iter: channels / columns,
        vectorized) and of the next output axis with extent > 1 (width / rows: the register-tile rows, or
        None); None when the innermost output index is not a plain spatial iter."""
        from tvm import tirx

        ivs = list(blk.iter_vars)
        out_index = [r.min for r in blk.writes[0].region]
        vi = _iter_index(ivs, out_index[-1])
        if vi is None or int(ivs[vi].iter_type) != tirx.IterVar.DataPar:
            return None
        for expr in reversed(out_index[:-1]):
            j = _iter_index(ivs, expr)
            if j is not None and (_int(ivs[j].dom.extent) or 2) > 1:      # symbolic: a dynamic dim, > 1
                return vi, j
        return vi, None

    @staticmethod
    def _channel_wise(blk, vi: int, ri: int | None) -> bool:
        """Whether an input is read at the output's channel and pixel (depthwise conv, pooling), rather than
        reduced over its channels (conv, grouped conv, dense). Then each channel block needs only its own
        input lines: taking all channel blocks of one tile of pixels in turn reads every input line once,
        where the weight-panel order (channel block outermost) re-reads the input once per channel block."""
        from tvm import tirx

        if ri is None:
            return False
        ivs = list(blk.iter_vars)
        reduced = [iv.var for iv in ivs if int(iv.iter_type) == tirx.IterVar.CommReduce
                   and (_int(iv.dom.extent) or 2) > 1]
        written = blk.writes[0].source
        for region in blk.reads:
            if region.source.same_as(written) or not region.region:
                continue
            last = region.region[-1].min
            if _mentions(last, ivs[vi].var) and not any(_mentions(last, v) for v in reduced) and any(
                    _mentions(r.min, ivs[ri].var) for r in region.region[:-1]):
                return True
        return False

    def _row_chunk(self, ext: list, spatial: list, vi: int, ri: int | None, rows: int, E: int | None, tile: int,
                   row_bytes: int | None) -> int | None:
        """Register tiles per chunk of rows, or None for no chunking. With column panels outermost every panel
        pass re-reads the rows' whole operand (every batch, every row: rows x reduction). Where that operand
        outgrows the caches (`resident_bytes`), each pass streams it from memory again: the small encoder's
        FFN at 32 x 512 read its 16 MiB of activations once per each of 64 panels. Chunks of rows go outermost
        instead and all panels pass over one chunk (at most `row_chunk_bytes` of it, so it stays in L2, but at
        least `min_chunk_rows` rows, so the weights, now read once per chunk, are read over enough rows), then
        the next: the activations are read once, the weights once per chunk. A dynamic row count may always
        grow that large: it gets chunks of the same constant size, run only past `resident_bytes` (_large)."""
        if ri is None or (E is not None and E <= tile) or row_bytes is None:
            return None
        chunk_rows = max(self.row_chunk_bytes // row_bytes, self.min_chunk_rows)
        tiles = -(-chunk_rows // rows)
        if ext[ri] is None:
            return tiles
        if any(ext[i] is None for i in spatial if i not in (vi, ri)):
            return None
        all_rows = math.prod(ext[i] for i in spatial if i != vi)
        if all_rows * row_bytes <= self.resident_bytes:
            return None                 # the activations stay in cache from one panel pass to the next
        return min(tiles, -(-ext[ri] // rows))

    @staticmethod
    def _panel_position(blk, ivs, vi: int, ri: int | None, batch: list[int]) -> int:
        """Where the column-block loop goes among the outer loops (`batch`: the outer spatial iters, in loop
        order; the row tiles follow them): after the last batch axis the panel operand (read at the output's
        columns, not at its rows) is indexed by, so each panel is used by all its rows before the next one is
        read. 0 for a weight shared by every batch (dense, conv). With column blocks outermost the small
        encoder's dynamic attention (8 x 512) read each head's queries / probabilities once per column block
        from memory: 53 / 39 ms against the static build's 40 / 27 (4 layers, kernel_profile)."""
        written = blk.writes[0].source
        position = 0
        for region in blk.reads:
            if region.source.same_as(written) or not region.region:
                continue
            index = [r.min for r in region.region]
            if not _mentions(index[-1], ivs[vi].var) or (ri is not None and any(
                    _mentions(e, ivs[ri].var) for e in index)):
                continue
            for k, i in enumerate(batch):
                if any(_mentions(e, ivs[i].var) for e in index):
                    position = max(position, k + 1)
        return position

    @staticmethod
    def _has_weight(blk, func) -> bool:
        """Whether the reduction multiplies two tensors (conv/matmul) rather than folding one (pool/mean)."""
        written = blk.writes[0].source
        sources = []
        for region in blk.reads:
            if not region.source.same_as(written) and not any(region.source.same_as(s) for s in sources):
                sources.append(region.source)
        return len(sources) >= 2


class Injective(_CpuRule):
    """Kernels without a reduction (elementwise, transpose, reshape, padding, layout transforms): inline the
    intermediate blocks, then per remaining block a vectorized inner loop and a parallel outer loop;
    transposes are tiled so both sides stay in cache (`_tile_transpose`)."""

    serial_below = PARALLEL_MIN     # _vectorize_inner's and _tile_transpose's threshold

    def _apply(self, func, target):
        vec = cpu_vector(target)
        sch = unchecked_schedule(func)
        blocks = _root_blocks(sch)
        if not blocks or any(_is_reduction_block(sch, b) for b in blocks):
            return None
        outputs = sch.get_output_blocks(sch.get_sblock("root"))
        inner = [b for b in blocks if not any(_same(sch.get(b), sch.get(o)) for o in outputs)]
        for b in plan_inlining(sch, blocks, inner)[0]:      # a block that would blow up keeps its buffer
            try:
                sch.compute_inline(b)
            except Exception:
                pass
        for b in _root_blocks(sch):
            dtype = sch.get(b).writes[0].source.dtype if sch.get(b).writes else "float32"
            if not _tile_transpose(sch, b, vec.lanes(dtype)):
                _vectorize_inner(sch, b, vec.lanes(dtype))
        return sch


def _row_reduction_kernel(func):
    """(schedule, blocks, reductions, output block) of a row-wise kernel: one output, at least one reduction,
    every reduction over its innermost iteration axis only (softmax, layer norm, row means); else None."""
    from tvm import tirx

    sch = unchecked_schedule(func)
    blocks = _root_blocks(sch)
    reductions = [b for b in blocks if _is_reduction_block(sch, b)]
    outputs = sch.get_output_blocks(sch.get_sblock("root"))
    if not reductions or len(outputs) != 1:
        return None
    for b in reductions:
        ivs = list(sch.get(b).iter_vars)
        if not ivs or int(ivs[-1].iter_type) != tirx.IterVar.CommReduce or sum(
                int(iv.iter_type) == tirx.IterVar.CommReduce for iv in ivs) != 1:
            return None
    return sch, blocks, reductions, outputs[0]


def _inline_single_use_elementwise(sch, blocks, out) -> None:
    """Inline the elementwise blocks read by one consumer (not the output); one that cannot be inlined keeps
    its own pass."""
    for b in blocks:
        if not _is_reduction_block(sch, b) and not _same(sch.get(b), sch.get(out)) \
                and len(sch.get_consumers(b)) == 1:
            try:
                sch.compute_inline(b)
            except Exception:                             # noqa: BLE001
                pass


class DynamicRows(_CpuRule):
    """Row-wise kernels over a dynamic (symbolic) extent: softmax, layer norm, means over the last axis of a
    dynamic sequence. dlight's Reduction rule computes every block per row: with a dynamic row length each
    intermediate row buffer is a heap workspace allocated once per row, and every vector of the row carries
    the tail guard, so the vectorizer gives up (scalar code). Here each block is one pass over the whole
    tensor instead: elementwise intermediates read once are inlined; reductions run parallel over rows and
    sequentially along the row, in the reference order (bit for bit); elementwise blocks are vectorized with
    their dynamic tail partitioned off; an intermediate read twice (softmax's exponentials) stays a whole
    tensor, allocated once per call. Only for kernels with a symbolic extent whose reductions all run over
    the innermost axis; anything else is left to the next rule. Small encoder 8x128, 1 thread: attention
    softmax 21.0 -> 3.0 ms (static build 3.6), layer norm 5.0 -> 4.1 ms. A reduction over a static row length
    takes its rows in groups of `group`, their accumulation chains interleaved (as RowGroups does)."""

    group = 8
    whole_rows = True               # each block one pass over all rows, the output's last

    def _apply(self, func, target):
        found = _row_reduction_kernel(func)
        if found is None:
            return None
        sch, blocks, _, out = found
        vec = cpu_vector(target)
        if all(_extent(sch, lp) is not None for b in blocks for lp in sch.get_loops(b)):
            return None                                   # static: RowGroups / dlight's rule
        _inline_single_use_elementwise(sch, blocks, out)
        for b in _root_blocks(sch):
            loops = sch.get_loops(b)
            if _is_reduction_block(sch, b):
                if len(loops) > 1:
                    rows = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
                    if self.group > 1 and _extent(sch, loops[-1]) is not None:
                        # rows in groups (RowGroups): the row length is static, the row count symbolic;
                        # TIR's LoopPartition splits the whole groups from the guarded last one
                        rows, in_group = sch.split(rows, [None, self.group])
                        sch.reorder(loops[-1], in_group)
                        sch.unroll(in_group)
                        sch.annotate(rows, "pragma_loop_partition_hint", 1)
                    sch.parallel(rows)
                continue
            _vectorize_inner(sch, b, vec.lanes(sch.get(b).writes[0].source.dtype), parallel_min=0)
        return sch


class RowGroups(_CpuRule):
    """Row-wise kernels over static extents (layer norm, softmax, means and sums over the last axis): groups of
    `rows` rows at a time, in parallel over the groups. Within a group every block runs at the group
    (compute_at); a reduction's loop order is (reduced axis, rows of the group), the rows unrolled: `rows`
    independent accumulation chains, each in the reference order (bit for bit), so the adder's latency is
    hidden instead of one row's chain waiting on it (dlight's Reduction rule: one row at a time, a chain of
    dependent scalar adds). Elementwise blocks are vectorized along the row. Only for kernels whose every
    reduction runs over the innermost iteration axis and whose last row axis divides by 8, 4 or 2 or is
    dynamic (groups of 8, the last one guarded); anything else goes to DynamicRows (a dynamic row length the
    group cannot take, e.g. a concat along it) or dlight's rule. Small encoder (64 x 256), AVX2 code, 1 thread:
    layer norm 34 -> 6 us, attention softmax (with its quantize) 30 -> 13.5 us.

    A dynamic row length too: the attention softmax of a dynamic sequence, whose rows are as long as the
    sequence. The group's temporaries are then (rows x length) and the row's vectors are split off from its
    guarded tail (TIR's LoopPartition); DynamicRows' whole-tensor passes went through memory once per block.
    Small encoder, dynamic build (batch 1-32 x seq 8-512) on a Zen 4, 2 threads, the softmax kernels of one
    forward pass (kernel_profile): x86:haswell 3.06 -> 2.33 ms at 1 x 512, 1.36 -> 1.20 ms at 8 x 128; host
    (AVX-512) 3.06 -> 1.99 ms at 1 x 512 (the static build's 2.0), 31.2 -> 21.3 at 8 x 512, 6.57 -> 5.56 at
    32 x 128, 1.61 -> 1.14 at 8 x 128, 0.025 -> 0.016 at 1 x 16. (A bare TE softmax, without the NaN-
    propagating max of the real kernels, had suggested the opposite at 32 x 128 with 16-float vectors.)
    `dynamic_length = False` leaves such kernels to DynamicRows.

    A reduction that keeps running results per lane (softmax_te's row max and sum: a buffer of the output's
    rank whose last axis is the lanes) runs row by row, each row's lanes one vector and the reduced axis
    outside it; the reduction that then combines each row's lanes keeps its rows one after another.
    """

    ROWS = (8, 4, 2)
    whole_rows = True               # a group's rows on one thread, its output block computed last
    GROUP_ELEMENTS = 1 << 16        # a group's rows (and their temporaries) stay in L2
    dynamic_length = True           # rows of a dynamic length too

    def _apply(self, func, target):
        sch, lead = self._schedule(func, target, lead_outer=False)
        if sch is None or lead is None:
            return sch
        # a dynamic row count under leading axes (batch, heads): with two or more leading rows, those run in
        # parallel outermost and each one's groups in order (its rows one stretch of memory); with one, the
        # groups in parallel (a core idle otherwise)
        static = _int(lead)
        if static is not None and static < 2:
            return sch
        alt, _ = self._schedule(func, target, lead_outer=True)
        if alt is None or static is not None:
            return alt or sch
        merged = _branch_kernels(sch.mod["main"], alt.mod["main"], lead >= 2)
        return sch if merged is None else unchecked_schedule(merged)

    def _schedule(self, func, target, lead_outer: bool):
        """(schedule or None, the leading rows' count where the row count is dynamic under leading axes, else
        None). `lead_outer`: that case with the leading axes in parallel outermost (else the groups)."""
        found = _row_reduction_kernel(func)
        if found is None:
            return None, None
        sch, blocks, reductions, out = found
        vec = cpu_vector(target)
        dynamic_length = self.dynamic_length          # rows of a dynamic length taken too
        if any(not _loops_are_iters(sch, b) or (_extent(sch, sch.get_loops(b)[-1]) is None
                                                 and not dynamic_length) for b in reductions):
            return None, None                             # DynamicRows
        _inline_single_use_elementwise(sch, blocks, out)
        loops = sch.get_loops(out)
        extents = [_extent(sch, lp) for lp in loops]
        if len(loops) < 2 or (extents[-1] is None and (not dynamic_length or any(
                _picks_at_symbolic_offset(sch, b) for b in _root_blocks(sch)))):
            return None, None                             # (LoopPartition miscompiles such picks: see there)
        if extents[-2] is None:
            # a dynamic row count: groups of ROWS[0], the last one guarded (its missing rows skipped)
            group = next(r for r in self.ROWS if r == 2 or r * (extents[-1] or 1024) <= self.GROUP_ELEMENTS)
            n_rows = None
        else:
            n_rows = math.prod(e if e is not None else 1 << 10 for e in extents[:-1])
            group = next((r for r in self.ROWS if extents[-2] % r == 0 and n_rows >= 2 * r
                          and (r == 2 or r * extents[-1] <= self.GROUP_ELEMENTS)), None)
            if group is None:
                return None, None                         # one row (or an odd count): dlight's rule
        outer, in_group = sch.split(loops[-2], [None, group])   # a group: rows of one slice (a box)
        above = 0                                         # loops above a group's own ones, besides `outer`
        at = None                                         # the loop the other blocks are computed at (`outer`)
        lead_rows = None
        if n_rows is None and len(loops) > 2:
            lead_rows = math.prod([sch.get(lp).extent for lp in loops[:-2]])
        if lead_rows is not None and lead_outer:
            # the leading rows in parallel, each one's groups in order (see _apply)
            sch.annotate(outer, "pragma_loop_partition_hint", 1)
            lead = sch.fuse(*loops[:-2]) if len(loops) > 3 else loops[0]
            sch.parallel(lead)
            at, above = outer, 1
        elif n_rows is None:
            # the last group of a dynamic row count is guarded (rows past the end skipped); TIR's LoopPartition
            # splits the group loop into whole groups (no guard: the rows' chains and the vector loops compile
            # as in the static case) and that one. (Guards in every group left the kernel scalar: 8 x n x 256
            # layer norm, AVX2, 1 thread, n=128: 351 us, partitioned 101 us, the static build 97 us.) A
            # partitioned loop cannot be fused with the leading (batch) axes, so here the group loop goes
            # outermost and runs in parallel, the batch axes inside it (the batch loop in parallel left a core
            # idle at batch 1; groups in parallel under a serial batch loop paid one thread-pool launch per
            # batch row). That strides through memory (the small encoder's layer norms at 32 x 128 took twice
            # the static build's time): with two or more leading rows the other schedule runs (_apply).
            sch.annotate(outer, "pragma_loop_partition_hint", 1)
            sch.parallel(outer)
            if len(loops) > 2:
                lead = sch.fuse(*loops[:-2]) if len(loops) > 3 else loops[0]
                sch.reorder(outer, lead)
                at = lead
                above = 1
        else:
            outer = sch.fuse(*loops[:-2], outer) if len(loops) > 2 else outer
        inner = sch.get_loops(out)[-1]
        lanes = vec.lanes(sch.get(out).writes[0].source.dtype)
        if _is_reduction_block(sch, out):
            sch.reorder(inner, in_group)
            sch.unroll(in_group)
        elif extents[-1] is not None:
            self._vectorize_row(sch, inner, extents[-1], lanes)
        if n_rows is not None and n_rows // group > 1:
            sch.parallel(outer)
        for b in reversed(_root_blocks(sch)[:-1]):
            sch.compute_at(b, at if at is not None else outer, preserve_unit_loops=False)
        lane_buffers: set = set()
        for b in _root_blocks(sch)[:-1]:
            own = sch.get_loops(b)[above + 1:]
            if any(_extent(sch, lp) is None for lp in own[:-1]) or (own and _extent(sch, own[-1]) is None
                                                                   and not dynamic_length):
                return None, None                         # the group's region is not a fixed box
            if _is_reduction_block(sch, b):
                if len(own) >= 3 and self._lane_axis(sch, b, own, len(loops)):
                    # running results per lane (softmax_te's first step): each row's lanes are one vector,
                    # the reduced axis outside it, the group's rows one after another
                    sch.reorder(own[-1], own[-2])
                    sch.vectorize(own[-2])
                    lane_buffers.add(sch.get(b).writes[0].source.name)
                elif any(r.source.name in lane_buffers for r in sch.get(b).reads):
                    pass        # the lanes of each row summed up (a few elements): row by row, as they are
                    # (interleaved and unrolled, LLVM's SLP vectorizer made invalid IR of them at 16-long rows)
                elif len(own) >= 2:
                    sch.reorder(own[-1], *own[:-1])       # reduced axis outside, the group's rows inside
                    for lp in own[:-1]:
                        sch.unroll(lp)
            elif own:
                dtype = sch.get(b).writes[0].source.dtype
                self._vectorize_row(sch, own[-1], _extent(sch, own[-1]), vec.lanes(dtype))
        if extents[-1] is None and not _is_reduction_block(sch, out):
            # a dynamic row: the output's row split into vectors only now, after the other blocks were
            # computed at the group (split first, their regions ran to the padded end: guards in every vector)
            self._vectorize_row(sch, sch.get_loops(out)[-1], None, lanes)
        return sch, lead_rows

    @staticmethod
    def _lane_axis(sch, block, own: list, out_rank: int) -> bool:
        """Whether `block` keeps running results per lane: it writes a buffer of the output's rank whose last
        index is its last spatial iter var, a short static axis (<= 16) that `own[-2]` (the loop just
        outside the reduced one, compute_at's loops in iter var order) runs over whole."""
        from tvm import tirx

        stmt = sch.get(block)
        write = stmt.writes[0]
        spatial = [iv for iv in stmt.iter_vars if int(iv.iter_type) == tirx.IterVar.DataPar]
        ext, dim = _extent(sch, own[-2]), _int(write.source.shape[-1])
        return (len(write.region) == out_rank and bool(spatial) and write.region[-1].min.same_as(spatial[-1].var)
                and ext is not None and 1 < ext <= 16 and ext == dim)

    @staticmethod
    def _vectorize_row(sch, loop, extent: int | None, lanes: int) -> None:
        if extent is None:                                # a dynamic row: whole vectors, the tail split off
            outer, inner = sch.split(loop, [None, lanes])
            sch.vectorize(inner)
            sch.annotate(outer, "pragma_loop_partition_hint", 1)
            return
        if not extent or extent < 2:
            return
        if extent % lanes == 0 and extent > lanes:
            sch.vectorize(sch.split(loop, [None, lanes])[1])
        elif extent <= lanes:
            sch.vectorize(loop)
        elif (t := _pow2_divisor(extent, lanes)) >= 4:
            sch.vectorize(sch.split(loop, [None, t])[1])


class GateBroadcast(_CpuRule):
    """One reduction whose small result, after elementwise steps on its own shape, is broadcast into a larger
    output: a squeeze-excitation gate (the GEMV of its second 1x1 conv, bias, hard-sigmoid / sigmoid) times the
    feature map, which FuseOps puts in one kernel. dlight's Reduction rule computed the reduction inside the
    output's loop nest, once per output row, in scalar dependent chains: MobileNetV3-L's gates ran 14 GEMVs of
    168 x 672 for a 14-row map, 7.9 of its 14.0 ms of kernels at batch 1 (kernel profile). Here every block but the output runs once at the root (the
    reduction with its innermost spatial axis moved inside the reduction loops and vectorized), then the output
    is one injective loop (parallel outer, vectorized inner). Each element's arithmetic and reduction order are
    unchanged (bit for bit the unscheduled kernel's)."""

    min_ratio = 4           # output elements per reduction result, at least

    def _apply(self, func, target):
        from tvm import tirx

        vec = cpu_vector(target)
        sch = unchecked_schedule(func)
        blocks = _root_blocks(sch)
        reds = [b for b in blocks if _is_reduction_block(sch, b)]
        outputs = sch.get_output_blocks(sch.get_sblock("root"))
        if len(reds) != 1 or len(outputs) != 1 or _same(sch.get(reds[0]), sch.get(outputs[0])):
            return None
        red, out = reds[0], outputs[0]

        def volume(b) -> int | None:
            writes = sch.get(b).writes
            if len(writes) != 1:
                return None
            extents = [_int(e) for e in writes[0].source.shape]
            return None if any(e is None for e in extents) else math.prod(extents)

        out_volume = volume(out)
        others = [volume(b) for b in blocks if not _same(sch.get(b), sch.get(out))]
        if out_volume is None or any(v is None or v * self.min_ratio > out_volume for v in others):
            return None
        if not _loops_are_iters(sch, red):
            return None
        loops = sch.get_loops(red)
        kinds = [int(iv.iter_type) for iv in sch.get(red).iter_vars]
        spatial = [lp for lp, k in zip(loops, kinds) if k == tirx.IterVar.DataPar]
        reduce_ = [lp for lp, k in zip(loops, kinds) if k == tirx.IterVar.CommReduce]
        if not spatial or not reduce_ or len(spatial) + len(reduce_) != len(loops):
            return None
        # the spatial axis innermost (the reduction loops around it), then vectorized: a GEMV over the
        # reduction's rows, each output summed in its own order as before
        lanes = vec.lanes(str(sch.get(red).writes[0].source.dtype))
        inner = spatial[-1]
        sch.reorder(*spatial[:-1], *reduce_, inner)
        extent = _extent(sch, inner)
        if extent is not None and extent % lanes == 0 and extent > lanes:
            _, li = sch.split(inner, [None, lanes])
            sch.vectorize(li)
        for b in _root_blocks(sch):
            if not _is_reduction_block(sch, b):
                _vectorize_inner(sch, b, vec.lanes(str(sch.get(b).writes[0].source.dtype)))
        return sch


class ScalarMinMax(_CpuRule):
    """Whole-tensor max / min to one value (`x.max()`, `x.amin()`, dynamic quantization's per-call activation
    range): the reduction loops fused and split by a multiple of the SIMD width, rfactor'ed into that many
    running extrema (a vectorized loop), then one short loop folds them. max/min are associative and
    commutative, NaN-propagating ones too (numerics.nan_propagating_minmax runs after scheduling), so the
    result is the unscheduled kernel's exactly. Sums are left alone (reassociation changes their rounding).
    Without this rule such a kernel stayed an unvectorized loop (16K floats: ~20 µs on one core)."""

    def _apply(self, func, target):
        from tvm import tirx

        sch = unchecked_schedule(func)
        blocks = _root_blocks(sch)
        reductions = [b for b in blocks if _is_reduction_block(sch, b)]
        if len(reductions) != 1 or not _same(sch.get(blocks[-1]), sch.get(reductions[0])):
            return None
        for b in blocks[:-1]:                 # elementwise producers (abs before amax): read in the loop
            sch.compute_inline(b)
        block = reductions[0]
        stmt = sch.get(block)
        if len(stmt.writes) != 1 or any(_int(r.extent) != 1 for r in stmt.writes[0].region):
            return None
        if any(int(iv.iter_type) != tirx.IterVar.CommReduce for iv in stmt.iter_vars
               if _int(iv.dom.extent) != 1):
            return None
        body = stmt.body
        value = getattr(body, "value", None)
        if not isinstance(value, (tirx.Max, tirx.Min)):
            return None
        loops = sch.get_loops(block)
        extents = [_extent(sch, lp) for lp in loops]
        if any(e is None for e in extents):
            return None
        total = math.prod(extents)
        lanes = cpu_vector(target).lanes(stmt.writes[0].source.dtype)
        width = next((w for w in (4 * lanes, 2 * lanes, lanes) if total % w == 0 and total >= 2 * w), None)
        if width is None:
            return None
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        outer, inner = sch.split(fused, [None, width])
        partial = sch.rfactor(inner, factor_axis=0)          # loops [outer (reduce), inner (spatial)]
        rf_outer, rf_inner = sch.get_loops(partial)
        sch.vectorize(rf_inner)
        return sch


def default_rules() -> list:
    """The CPU rules, in the order they are tried."""
    from tvm.s_tir.dlight import cpu as dlight_cpu

    from .pool_schedule import WindowMax

    return [WindowMax(), PackedGemm(), RowGroups(), DynamicRows(), GateBroadcast(), dlight_cpu.Reduction(),
            ScalarMinMax(), Injective()]


# ------------------------------------------------------------------------------------------ module level
def _scalar(expr) -> float | None:
    """The number of a constant scalar Relax argument (a FloatImm/IntImm in TVM 0.27), else None."""
    value = getattr(expr, "value", None)
    value = getattr(value, "value", value)        # older TVM: PrimValue(FloatImm)
    return float(value) if isinstance(value, (int, float)) else None


def _relax_function_pass(rewriter_cls, name: str):
    """Module pass applying the PyExprMutator `rewriter_cls` to every Relax function of the module."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod, ctx):
        rewriter = rewriter_cls(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get()

    return _pass


def rewrite_elementwise():
    """Relax pass: spell clip, GELU and sigmoid with ops the CPU schedules handle well.

      R.clip(x, lo, hi)   -> R.minimum(R.maximum(x, lo), hi)    ConvertLayout has no layout rule for clip:
                             without this every ReLU6 of an NHWC network is wrapped in two transposes
      R.nn.gelu(x)        -> x * (0.5 + 0.5 * erf(x / sqrt(2)))  the erf then becomes fast_erf (vectorizable)
      R.nn.gelu_tanh(x)   -> x * (0.5 + 0.5 * tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
      R.sigmoid(x)        -> 1 / (1 + exp(-x))                     float32: the exp becomes fast_exp (LLVM
                             lowers sigmoid itself to a scalar expf call per element: EfficientNet-B0's
                             kernels 23.1 -> 13.3 ms at batch 1, kernel_profile, one run each)
    Same values, except that the exps become fast_exp later (relax_layout_passes states its bounds).
    """
    import math

    import tvm
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor

    @expr_functor.mutator
    class _Rewriter(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op) or not call.args:
                return call
            x = call.args[0]
            info = getattr(x, "ty", None) or getattr(x, "struct_info", None)
            dtype = str(getattr(info, "dtype", "") or "")
            if not dtype.startswith("float"):
                return call
            name = call.op.name

            def const(v):
                return relax.const(v, dtype)

            if name == "relax.clip" and len(call.args) == 3:
                lo, hi = _scalar(call.args[1]), _scalar(call.args[2])
                if lo is not None and hi is not None:
                    return relax.op.minimum(relax.op.maximum(x, const(lo)), const(hi))
            if name == "relax.nn.gelu":
                e = relax.op.erf(relax.op.multiply(x, const(1.0 / math.sqrt(2.0))))
                return relax.op.multiply(x, relax.op.add(const(0.5), relax.op.multiply(const(0.5), e)))
            if name == "relax.nn.gelu_tanh":
                cube = relax.op.multiply(relax.op.multiply(x, x), x)
                inner = relax.op.multiply(const(math.sqrt(2.0 / math.pi)),
                                          relax.op.add(x, relax.op.multiply(const(0.044715), cube)))
                t = relax.op.tanh(inner)
                return relax.op.multiply(x, relax.op.add(const(0.5), relax.op.multiply(const(0.5), t)))
            if name == "relax.sigmoid" and dtype == "float32":
                return relax.op.divide(const(1.0), relax.op.add(const(1.0), relax.op.exp(relax.op.negative(x))))
            return call

    return _relax_function_pass(_Rewriter, "GraphoptRewriteElementwise")


def nonnegative_squeeze_axes():
    """Relax pass: `R.squeeze(x, axis=[-2])` spelled with axes counted from the front (same op, same value).
    TVM 0.27's ConvertLayout infers squeeze's layout from the raw axis and dies with std::bad_alloc on a
    negative one: any network with a convolution and an nn.MultiheadAttention (whose export squeezes
    axis -2) then kept all its convolutions in NCHW."""
    import tvm
    from tvm import relax
    from tvm.relax import PyExprMutator, expr_functor

    @expr_functor.mutator
    class _Rewriter(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.squeeze" and call.attrs.axis):
                return call
            info = getattr(call.args[0], "ty", None) or getattr(call.args[0], "struct_info", None)
            ndim = getattr(info, "ndim", -1)
            axes = [int(a) for a in call.attrs.axis]
            if ndim is None or ndim < 0 or all(a >= 0 for a in axes):
                return call
            return relax.op.squeeze(call.args[0], [a + ndim if a < 0 else a for a in axes])

    return _relax_function_pass(_Rewriter, "GraphoptNonnegativeSqueezeAxes")


def relax_layout_passes(target) -> list:
    """Relax passes run before legalization: conv2d in NHWC/HWIO (channels innermost), with the
    elementwise ops between convolutions following that layout; exp/erf/tanh/softmax as TVM's vectorizable
    fast_* polynomials (LLVM cannot vectorize libm's expf/erff/tanhf: exact GELU alone was 20% of BERT).

    Approximation (tests/backends/test_schedules.py checks these bounds against float64 on dense grids): on
    targets with FMA (AVX2, AVX-512) fast_exp is within 1.1e-6 relative for x in [-87.3, 88.3] (measured
    3.1e-7), fast_erf and fast_tanh within 4e-7 absolute and relative (measured 3.3e-7, 3.1e-7); without FMA
    (baseline x86-64) within 5e-6 (exp, measured 4.1e-6) and 5e-7 (erf, tanh). sigmoid is 1 / (1 + fast_exp(-x))
    (rewrite_elementwise), within fast_exp's relative bound on [-12, 12] (tested). For comparison glibc's expf,
    erff, tanhf: 6e-8, 7e-8, 1.6e-7 relative.
    Edges: fast_exp returns inf for x > 88.376 (expf is finite up to 88.72) and loses the subnormal results
    (x < -87.33) to 0 or a few ulps; fast_erf and fast_tanh may pass +-1 by up to 3 ulps near their clamps
    (|x| ~ 4 and ~ 9). NaN: their input clamps are float max/min, which propagate NaN on CPU targets
    (numerics.nan_propagating_minmax), so fast_erf(NaN) and fast_tanh(NaN) are NaN as in PyTorch."""
    from tvm import relax

    from .batch_matmul_views import collapse_batched_matmul_views   # 4-D matmuls fuse their epilogues
    from .elementwise_views import elementwise_before_views     # ... and so do 2-D ones behind a view
    from .fused_attention import fuse_attention                 # q k v -> o in one kernel
    from .fused_inverted_residual import fuse_inverted_residuals    # expand -> depthwise -> project in one
    from .softmax_lower import graphopt_softmax         # float32 softmax: graphopt's cheaper kernel
    from .symbolic import reshape_views         # dynamic dims: reshapes as views (no copy kernels)

    lanes = cpu_vector(target).lanes("float32")
    cores = max(1, int(target.attrs.get("num-cores", 1)))
    return [collapse_batched_matmul_views()] + nhwc_layout_passes() + [
        fuse_inverted_residuals(lanes, cores), elementwise_before_views(), fuse_attention(lanes), graphopt_softmax(),
        relax.transform.FastMathTransform(), reshape_views()]


def nhwc_layout_passes() -> list:
    """The part of relax_layout_passes that puts convolutions in NHWC/HWIO (with the spellings ConvertLayout
    needs first); precision="winograd" runs it before its rewrite, which takes NHWC convolutions."""
    return [rewrite_elementwise(), nonnegative_squeeze_axes(), convert_conv_layout()]


def _calls_op(mod, name: str) -> bool:
    """Whether a Relax function of `mod` calls the op `name`."""
    import tvm
    from tvm import relax

    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name:
            found.append(expr)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return bool(found)


def convert_conv_layout():
    """Module pass: relax.transform.ConvertLayout to NHWC/HWIO convolutions, only where the module has a 2-D
    convolution. ConvertLayout walks every op's layout rule, and TVM 0.27 dies with std::bad_alloc on some of
    them (a negative squeeze axis, as in nn.MultiheadAttention: nonnegative_squeeze_axes runs first); on any
    such failure the module is kept in its own layout (correct, the convolutions just vectorize less well)."""
    import warnings

    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="GraphoptConvertConvLayout")
    def _pass(mod, ctx):
        if not _calls_op(mod, "relax.nn.conv2d"):
            return mod
        try:
            return relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})(mod)
        except Exception as e:           # a layout rule TVM lacks: keep the model's layout
            warnings.warn(f"graphopt: NHWC layout conversion failed ({type(e).__name__}: {str(e)[:200]}); "
                          f"convolutions stay NCHW", stacklevel=2)
            return mod

    return _pass


def legalize_passes(target) -> list:
    """Legalize, fold the constant (weight) arithmetic (its kernels compiled together: fold_constants.py),
    fuse, and mark the constant buffers of each kernel (`layout_free_buffers`: what may be repacked at build
    time)."""
    from tvm import relax

    from .fold_constants import fold_constant_calls

    return [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), fold_constant_calls(),
            relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination(), attach_layout_free_buffers()]


def attach_layout_free_buffers():
    """relax.transform.AttachAttrLayoutFreeBuffers, except for hand-written kernels with symbolic shapes.

    TVM 0.27's pass copies every called PrimFunc through tir::RenewDefs, which gives a buffer whose shape holds a
    symbolic variable (the dynamic row count of quant_lower's int8 GEMM) a layout over a renamed variable that
    nothing defines ("variables (m,) are used, but are not passed in as API arguments" at build). Those
    kernels are already scheduled and read pre-packed weights, so they need the attribute only: the pass runs
    as usual, then each of them is put back as written, with the attribute the pass computed for its call."""
    import tvm
    from tvm import relax, tirx

    inner = relax.transform.AttachAttrLayoutFreeBuffers()

    def symbolic_scheduled(func) -> bool:
        return (isinstance(func, tirx.PrimFunc) and is_scheduled(func)
                and any(not isinstance(d, tirx.IntImm) for b in func.params for d in (getattr(b, "shape", None) or ())))

    def calls(func):
        return [b.value for blk in func.body.blocks for b in blk.bindings
                if isinstance(b.value, relax.Call) and b.value.op.name == "relax.call_tir"] \
            if isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr) else []

    @tvm.transform.module_pass(opt_level=0, name="GraphoptAttachLayoutFreeBuffers")
    def _pass(mod, _ctx):
        out = inner(mod)
        fixed = {}
        kept = {g.name_hint for g in out.get_global_vars()}
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function) or gv.name_hint not in kept:
                continue
            for old, new in zip(calls(func), calls(out[gv.name_hint])):
                kernel = mod[old.args[0]]
                if symbolic_scheduled(kernel) and new.args[0].name_hint.startswith(old.args[0].name_hint) \
                        and len(out[new.args[0]].params) == len(kernel.params):     # the same call, renamed
                    attrs = out[new.args[0]].attrs
                    fixed[new.args[0]] = kernel.with_attr("layout_free_buffers", attrs["layout_free_buffers"])
        for gv, func in fixed.items():
            out[gv] = func
        return out

    return _pass


def finalize_passes(target) -> list:
    """After scheduling: move the weight-repacking blocks out of the kernels into their own functions,
    evaluate them on the constants at build time (all in one compiled module: fold_constants.py), drop what is
    left unused."""
    from tvm import relax

    from .fold_constants import fold_constant_calls

    return [split_layout_rewrite_preproc(), fold_constant_calls(), relax.transform.FoldConstant(),
            relax.transform.DeadCodeElimination()]


def split_layout_rewrite_preproc():
    """relax.transform.SplitLayoutRewritePreproc over the kernels it changes. That pass requires a root
    block with compute blocks in every PrimFunc of the module, also in those it does not change; kernels
    without a weight-repacking block are set aside while it runs and put back after: the hand-written int8 ones
    of quant_lower.py (plain loops), and TOPI's scan kernels such as cumsum (a root block over bare loops:
    RoBERTa's position ids), where the pass stops with "There should be a compute block if there is only one
    subtree under the root"."""
    import tvm
    from tvm import relax, tirx

    @tvm.transform.module_pass(opt_level=0, name="GraphoptSplitLayoutRewritePreproc")
    def _pass(mod, ctx):
        aside = {gv: func for gv, func in mod.functions_items()
                 if isinstance(func, tirx.PrimFunc) and not _has_layout_rewrite_preproc(func)}
        if not aside:
            return relax.transform.SplitLayoutRewritePreproc()(mod)
        rest = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv not in aside}, attrs=mod.attrs,
                           global_infos=mod.global_infos)
        out = relax.transform.SplitLayoutRewritePreproc()(rest)
        for gv, func in aside.items():
            out[gv] = func
        return out

    return _pass


def _has_layout_rewrite_preproc(func) -> bool:
    """Whether a PrimFunc holds a block marked meta_schedule.layout_rewrite_preproc (a weight repack that
    SplitLayoutRewritePreproc moves into its own function)."""
    return bool(_preproc_blocks(func.body))


@dataclass
class ScheduleStats:
    """Which rule scheduled how many kernels (for the report)."""

    by_rule: dict
    unscheduled: list

    def summary(self) -> str:
        parts = [f"{n} {rule}" for rule, n in sorted(self.by_rule.items())]
        if self.unscheduled:
            parts.append(f"{len(self.unscheduled)} unscheduled ({', '.join(self.unscheduled[:5])}"
                         f"{', ...' if len(self.unscheduled) > 5 else ''})")
        return ", ".join(parts) if parts else "none left for the default rules"


def is_scheduled(func) -> bool:
    attrs = func.attrs
    return attrs is not None and "tirx.is_scheduled" in attrs and bool(attrs["tirx.is_scheduled"])


def _inlining_oversized(func) -> bool:
    """Whether inlining every elementwise non-output block of `func` grows an expression past
    inline_budget.BUDGET (reductions are never inlined: their consumers read their buffers)."""
    try:
        sch = unchecked_schedule(func)
        blocks = _root_blocks(sch)
        outputs = sch.get_output_blocks(sch.get_sblock("root"))
        inner = [b for b in blocks if not any(_same(sch.get(b), sch.get(o)) for o in outputs)
                 and not _is_reduction_block(sch, b)]
        return bool(inner) and expanded_size(sch, blocks, inner) > BUDGET
    except Exception:
        return False


def apply_default_schedules(mod, target, rules: list | None = None):
    """Schedule every unscheduled PrimFunc of `mod` with the first rule that takes it.

    Returns (module, ScheduleStats); `mod` itself is left unchanged. Scheduled kernels are marked
    `tirx.is_scheduled`.
    """
    from tvm import tirx

    rules = default_rules() if rules is None else rules
    by_rule: dict[str, int] = {}
    unscheduled: list[str] = []
    updates = {}
    with target:
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
                continue
            done = False
            oversized = _inlining_oversized(func)
            for rule in rules:
                if oversized and not isinstance(rule, (PackedGemm, Injective)):
                    continue        # rules that inline everything (dlight's) would grow a giant expression
                try:
                    sch = rule.apply(func, target, False)
                except Exception:
                    sch = None
                if sch is None:
                    continue
                if isinstance(sch, list):
                    sch = sch[0]
                scheduled = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                if ROWWISE_ATTR in (scheduled.attrs or {}) and getattr(rule, "whole_rows", False):
                    scheduled = scheduled.with_attr(WHOLE_ROWS_ATTR, True)      # inplace_rowwise may use it
                if getattr(rule, "serial_below", 0):            # (dlight's rules have none)
                    scheduled = scheduled.with_attr(SERIAL_BELOW_ATTR, rule.serial_below)   # parallel_guard
                updates[gv] = scheduled
                name = type(rule).__name__
                by_rule[name] = by_rule.get(name, 0) + 1
                done = True
                break
            if not done:
                unscheduled.append(gv.name_hint)
    if updates:
        mod = mod.clone()           # IRModule item assignment is in place: leave the caller's module as it was
    for gv, func in updates.items():
        mod[gv] = func
    return mod, ScheduleStats(by_rule, unscheduled)


def _branch_kernels(large, small, cond):
    """One kernel from two schedules of the same PrimFunc: `small` where `cond` holds at run time, `large`
    otherwise. Where they pack weights (blocks marked meta_schedule.layout_rewrite_preproc, split out and
    folded at build time), both must pack the same ones into the same panels: the merged kernel packs them
    once and `small` reads `large`'s packed buffers; None where they do not."""
    import tvm_ffi
    from tvm import ir, s_tir, tirx

    small = s_tir.renew_defs(small)         # its own loop / block variables: none defined twice
    vmap = {}
    for a, b in zip(small.params, large.params):
        vmap[a] = b
        for ea, eb in zip(getattr(a, "shape", None) or (), getattr(b, "shape", None) or ()):
            if isinstance(ea, tirx.Var):
                vmap[ea] = eb
    small = small.with_body(tvm_ffi.structural_map(small.body, [(tirx.Var, lambda v: vmap.get(v, v))]))
    root_l, root_s = _root_block(large), _root_block(small)
    pre_l, rest_l = _split_preproc(root_l)
    pre_s, rest_s = _split_preproc(root_s)
    packed_l, packed_s = _packed_buffers(pre_l), _packed_buffers(pre_s)
    if set(packed_l) != set(packed_s):
        return None
    bmap = {}
    for src, buf in packed_s.items():
        other = packed_l[src]
        if buf.dtype != other.dtype or not tvm_ffi.structural_equal(list(buf.shape), list(other.shape)):
            return None
        bmap[buf] = other

    def load(n):
        return tirx.BufferLoad(bmap[n.source], n.indices) if n.source in bmap else n

    def region(n):
        return tirx.BufferRegion(bmap[n.source], n.region) if n.source in bmap else n

    rest_s = tvm_ffi.structural_map(rest_s, [(ir.expr.TensorLoad, load), (ir.expr.TensorRegion, region)])
    branch = tirx.IfThenElse(cond, rest_s, rest_l)
    body = tirx.SeqStmt([*pre_l, branch]) if pre_l else branch
    allocs = list(root_l.alloc_buffers) + [b for b in root_s.alloc_buffers if b not in bmap]
    block = s_tir.SBlock(root_l.iter_vars, root_l.reads, root_l.writes, root_l.name_hint, body, root_l.init,
                         allocs, root_l.match_buffers, root_l.annotations)
    return large.with_body(s_tir.SBlockRealize([], True, block))


def _root_block(func):
    """The root SBlock of a scheduled PrimFunc."""
    body = func.body
    if not hasattr(body, "block") and hasattr(body, "seq") and len(body.seq) == 1:
        body = body.seq[0]
    return body.block


def _split_preproc(root):
    """(statements of `root` that hold weight-repacking blocks, one statement of the rest)."""
    from tvm import tirx

    pre, rest = [], []
    for st in list(root.body.seq) if isinstance(root.body, tirx.SeqStmt) else [root.body]:
        (pre if _preproc_blocks(st) else rest).append(st)
    return pre, rest[0] if len(rest) == 1 else tirx.SeqStmt(rest)


def _packed_buffers(stmts) -> dict:
    """{weight parameter: its packed copy} of the weight-repacking blocks in `stmts`."""
    return {b.reads[0].source: b.writes[0].source for st in stmts for b in _preproc_blocks(st)}


def _preproc_blocks(stmt) -> list:
    """The blocks under `stmt` marked meta_schedule.layout_rewrite_preproc."""
    from tvm import s_tir

    found, stack = [], [stmt]
    while stack:                   # the statement tree: SeqStmt.seq, For/Let/Attr/SBlock.body, SBlockRealize.block
        node = stack.pop()
        if node is None:
            continue
        if isinstance(node, s_tir.SBlock) and "meta_schedule.layout_rewrite_preproc" in node.annotations:
            found.append(node)
        stack.extend(getattr(node, "seq", None) or ())
        for attr in ("body", "block", "then_case", "else_case", "init"):
            child = getattr(node, attr, None)
            if child is not None and not isinstance(child, (int, float, str)):
                stack.append(child)
    return found
