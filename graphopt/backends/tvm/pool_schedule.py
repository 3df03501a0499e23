"""WindowMax: the default CPU schedule of max pooling over channels-last (NHWC) tensors.

PackedGemm's register tile (rows of output pixels x channel vectors, channel blocks outside the pixel loop)
suits a convolution, whose weight panel is reused across pixels. A max pool has no weights: each output pixel
reads its window once. Under that tile, on AVX2 (6-pixel tiles over 56-wide rows, a guarded tail) ResNet-18's
stem pool took 0.26-0.33 ms inside the model against 0.07 ms for this schedule (one run each on a 2-core Zen 4,
`x86:haswell`): here one output pixel's channels (at most 8 vectors, a < 1 KiB stack tile held in registers)
take the max over the window in order, then are stored as one contiguous run; output rows run in parallel.

Contract: loop order and tiling only. Each output is the same T.max chain over the window, in the same order,
as the unscheduled kernel: bit for bit its result (NaN and -0 included: the expression does not change).
Takes a kernel only when it is a single max-reduction block (after inlining its padding producer) over four
static spatial axes whose innermost (channels) is read at the same index and divides into whole vectors;
anything else is left to the next rule.
"""
from __future__ import annotations

import math

from .schedules import _CpuRule, _is_pad_block, _loops_are_iters, _one_reduction_block, cpu_vector
from .unchecked_schedule import schedule as unchecked_schedule

__all__ = ["WindowMax"]

_MAX_VECTORS = 8            # accumulators per tile: 8 of AVX2's 16 registers, 8 of AVX-512's 32
_PARALLEL_MIN = 1 << 16     # max operations (outputs x window) below which one thread is faster


class WindowMax(_CpuRule):
    """Max pooling, NHWC: parallel over (batch, output row), one output pixel's channel vectors per tile."""

    def _apply(self, func, target):
        from tvm import tirx

        sch = unchecked_schedule(func)
        found = _one_reduction_block(sch)
        if found is None:
            return None
        blocks, main = found
        others = [b for b in blocks if not sch.get(b).same_as(sch.get(main))]
        if any(not _is_pad_block(sch, b) for b in others):
            return None                     # an epilogue or another producer: PackedGemm's case
        if len(sch.get_producers(main)) != len(others):
            return None
        blk = sch.get(main)
        if not isinstance(blk.body, tirx.BufferStore) or not isinstance(blk.body.value, tirx.Max):
            return None
        ivs = list(blk.iter_vars)
        kinds = [int(iv.iter_type) for iv in ivs]
        spatial = [i for i, k in enumerate(kinds) if k == tirx.IterVar.DataPar]
        if spatial != [0, 1, 2, 3] or len(ivs) < 5 or any(k != tirx.IterVar.CommReduce for k in kinds[4:]):
            return None
        ext = [iv.dom.extent for iv in ivs]
        if any(not isinstance(e, tirx.IntImm) for e in ext):
            return None                     # dynamic extents: PackedGemm tiles those
        ext = [int(e) for e in ext]
        channel = ivs[3].var
        if len(blk.writes) != 1 or not blk.reads:
            return None
        out = blk.writes[0].source
        for region in blk.reads:            # channel-wise: the input is read at the output's channel
            if region.source.same_as(out):
                continue
            last = region.region[-1]
            if not (int(getattr(last.extent, "value", -1)) == 1 and last.min.same_as(channel)):
                return None
        lanes = cpu_vector(target).lanes(out.dtype)
        if ext[3] % lanes:
            return None
        if not _loops_are_iters(sch, main):
            return None

        for b in others:
            sch.compute_inline(b)
        loops = sch.get_loops(main)
        n, h, w, c = loops[:4]
        reduce_loops = loops[4:]
        nvec = ext[3] // lanes
        group = max(d for d in range(1, _MAX_VECTORS + 1) if nvec % d == 0)
        cb, cv, ci = sch.split(c, [nvec // group, group, lanes])
        sch.reorder(n, h, cb, w, *reduce_loops, cv, ci)
        outer = sch.fuse(n, h, cb)
        if math.prod(ext) >= _PARALLEL_MIN:
            sch.parallel(outer)
        tile = sch.cache_write(main, 0, "global")
        sch.reverse_compute_at(tile, w)
        store = sch.get_loops(tile)
        sch.vectorize(sch.split(store[-1], [None, lanes])[1])
        sch.unroll(cv)
        sch.vectorize(ci)
        init = sch.decompose_reduction(main, reduce_loops[0])
        sch.vectorize(sch.get_loops(init)[-1])
        return sch
